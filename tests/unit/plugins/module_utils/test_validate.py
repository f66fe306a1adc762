"""Single-value validation; the catalog-level cases live in validation_cases.yml."""

import datetime

import pytest

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    AddressError,
    PortError,
    UnsafeStringError,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import (
    MAX_TEXT_BYTES,
    check_text,
    parse_expiry,
    parse_network,
    parse_ports,
    parse_protocols,
    truncate_utf8,
)

# One, two, three and four bytes per character in UTF-8.
MIXED = "aé€😀" * 12


@pytest.mark.parametrize("text", [MIXED, "é" * 70, "€" * 50, "😀" * 40, "x" * 200])
def test_truncate_utf8_at_every_cut(text):
    encoded = text.encode("utf-8")
    for limit in range(len(encoded) + 2):
        cut = truncate_utf8(text, limit)
        assert text.startswith(cut)
        assert len(cut.encode("utf-8")) <= limit
        # The longest prefix that fits: one more character would not.
        if cut != text:
            assert len(text[: len(cut) + 1].encode("utf-8")) > limit


def test_truncate_utf8_default_limit_is_the_comment_limit():
    assert MAX_TEXT_BYTES == 128
    assert truncate_utf8("€" * 43) == "€" * 42
    assert truncate_utf8("x" * 128) == "x" * 128


def test_check_text_accepts_printable_unicode_up_to_the_limit():
    assert check_text("Café €, ports 80/443 (web) — owner: ops", "p") == "Café €, ports 80/443 (web) — owner: ops"
    assert check_text("€" * 42 + "xx", "p")
    with pytest.raises(UnsafeStringError):
        check_text("€" * 42 + "xxx", "p")


@pytest.mark.parametrize(("value", "expected"), [
    ("10.0.0.0/8", (4, 0x0A000000, 0x0AFFFFFF)),
    ("10.0.0.1", (4, 0x0A000001, 0x0A000001)),
    ("0.0.0.0/0", (4, 0, 2**32 - 1)),
    ("2001:db8::/32", (6, 0x20010DB8 << 96, (0x20010DB8 << 96) + 2**96 - 1)),
    ("::/0", (6, 0, 2**128 - 1)),
    ("::1", (6, 1, 1)),
])
def test_parse_network(value, expected):
    assert parse_network(value, "p") == expected


@pytest.mark.parametrize("value", ["10.0.0.1/32", "2001:db8::1/128"])
def test_parse_network_plain_refuses_prefixes(value):
    with pytest.raises(AddressError):
        parse_network(value, "p", plain=True)


@pytest.mark.parametrize(("value", "expected"), [
    (22, [(22, 22)]),
    ("22", [(22, 22)]),
    ("8000-8010", [(8000, 8010)]),
    ("1-65535", [(1, 65535)]),
    ("80-80", [(80, 80)]),
    ([443, "80", 443, "8000-8010"], [(80, 80), (443, 443), (8000, 8010)]),
])
def test_parse_ports(value, expected):
    assert parse_ports(value, "p") == expected


def test_parse_ports_names_the_list_item():
    with pytest.raises(PortError) as info:
        parse_ports([22, 23, "x"], "svc.port")
    assert info.value.path == "svc.port[2]"


def test_parse_protocols_normalizes_case_and_duplicates():
    assert parse_protocols(["UDP", "tcp", "udp"], "p") == ["tcp", "udp"]
    assert parse_protocols("Tcp", "p") == ["tcp"]


@pytest.mark.parametrize(("value", "expected"), [
    (datetime.date(2027, 1, 31), datetime.date(2027, 1, 31)),
    (datetime.datetime(2027, 1, 31, 12, 0), datetime.date(2027, 1, 31)),
    ("2027-01-31", datetime.date(2027, 1, 31)),
    ("2027-01-31T10:00:00Z", datetime.date(2027, 1, 31)),
])
def test_parse_expiry(value, expected):
    assert parse_expiry(value, "p") == expected
