"""The fast path of ``parse_network`` against the full checks it short-cuts.

``parse_network`` answers the common valid forms with a regex and
``inet_aton``/``inet_pton`` and leaves everything else to the ``ipaddress``
based checks (``_parse_network_full``), which also write the errors. Whatever
the input, both must give the same result or the same error and message.
"""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ansible_collections.portguard.hardening.plugins.module_utils.core import validate
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import CatalogError

SETTINGS = settings(max_examples=300, deadline=None)
TRICKY = [
    "010.0.0.1", "01.2.3.4", "1.2.3.04", "0.0.0.00", "00.0.0.0/0", "1.2.3.4/010", "0.0.0.0/00", "10.0.0.0/08",
    "10.0.0.0/8 ", "2001:db8::/032", "::/000", "10/8", "10.0.0", "1.2.3.4.5", "256.0.0.0", "1.2.3.4/08", "1.2.3.4/33",
    "1.2.3.4/", "/8", "", "1", "167772161", "0x0a.0.0.1", "10.0.1", "1.2.3.4 junk", "1.2.3.4\x00",
    "10.0.0.1\n", "10.0.0.0/8\n", " 1.2.3.4", "1.2.3.4 ", "1.2.3.4/ 8", "１.2.3.4", "1.2.3.٤", "1.2.3.4/٨",
    "10.0.0.1/24", "0.0.0.0/0", "255.255.255.255/32",
    "::", "::/0", "::/00", "::1", "1::", ":", ":::", "1:::2", "1::2::3", ":1:2:3:4:5:6:7", "1:2:3:4:5:6:7:",
    "1:2:3:4:5:6:7", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8::",
    "::1:2:3:4:5:6:7:8", "1::2:3:4:5:6:7:8", "1::2:3:4:5:6:7", "00001::", "0001::", "FFFF::", "ffff::/16",
    "fe80::1%eth0", "fe80::/9", "2001:db8::/129", "2001:db8::/0128", "2001:db8::1/64",
    "::ffff:1.2.3.4", "::ffff:0:0/96", "::ffff:0:0/95", "::ffff:102:304", "::ffff:102:304/127", "::1.2.3.4",
    "1:2:3:4:5:6:1.2.3.4", "::\n", "1::/1\n", "g::", "1::-1",
]


def outcome(function, value, plain):
    try:
        return function(value, "p", plain)
    except CatalogError as exc:
        return type(exc), exc.path, str(exc)


def _public(value, path, plain):
    return validate.parse_network(value, path, plain=plain)


def assert_same(value):
    for plain in (False, True):
        assert outcome(_public, value, plain) == outcome(validate._parse_network_full, value, plain), (value, plain)


def test_fast_path_is_in_use():
    # On Linux the C library reads addresses as ipaddress does; without the fast path compiles are 2-3x slower.
    assert validate._FAST_PATH
    assert validate._parse_network_fast("10.0.0.0/8", False) == (4, 0x0A000000, 0x0AFFFFFF)
    assert validate._parse_network_fast("2001:db8::/32", False) is not None


@pytest.mark.parametrize("value", TRICKY)
def test_tricky_values(value):
    assert_same(value)


def _spellings(network):
    address, prefix = network.network_address, network.prefixlen
    texts = [str(address), str(network)]
    if address.version == 6:
        texts += [address.exploded, address.exploded.upper(), f"{address.exploded}/{prefix}",
                  ":".join(part.lstrip("0") or "0" for part in address.exploded.split(":"))]
    return texts


@SETTINGS
@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 128))
def test_valid_networks_and_hosts(address, prefix):
    prefix = min(prefix, address.max_prefixlen)
    network = ipaddress.ip_network((address, prefix), strict=False)
    for text in [*_spellings(network), f"{address}/{prefix}"]:
        assert_same(text)


@SETTINGS
@given(st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), st.just("")),
       st.lists(st.tuples(st.integers(0, 40), st.sampled_from("0123456789abcdefABCDEFg:./%\n ١x-")), max_size=4))
def test_mutated_addresses(text, edits):
    chars = list(text)
    for position, char in edits:
        if chars and position % 3 == 0:
            del chars[position % len(chars)]
        elif chars and position % 3 == 1:
            chars[position % len(chars)] = char
        else:
            chars.insert(position % (len(chars) + 1), char)
    assert_same("".join(chars))


@SETTINGS
@given(st.lists(st.one_of(st.integers(0, 300).map(str), st.from_regex(r"\A[0-9]{1,4}\Z")), min_size=1, max_size=5),
       st.one_of(st.none(), st.from_regex(r"\A[0-9]{1,3}\Z")))
def test_dotted_quads(octets, prefix):
    assert_same(".".join(octets) + ("" if prefix is None else f"/{prefix}"))


@SETTINGS
@given(st.text(alphabet="0123456789abcdefABCDEF:./", max_size=45))
def test_random_strings(text):
    assert_same(text)
