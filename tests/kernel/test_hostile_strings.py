"""Arbitrary Unicode in every inventory-derived and catalog string: refused with its path, or harmless.

A small catalog and inventory (a target host ``h1`` in group ``g1``, a source
host ``h2`` whose addresses come from facts, a network, two services, one
flow, the management floor) has one of its strings replaced per example by
generated text: newlines, quotes, braces, semicolons, NUL, bidi marks, line
separators, long multi-byte text, and near-valid values (a valid one with
something inserted). Each example must either be refused by the compile with
a ``CatalogError`` whose path is that string's key (printable: the message
escapes what it quotes), or render rulesets that, loaded into a throwaway
namespace, hold exactly what was meant and nothing more:

- nftables: ``nft -c -f`` then ``nft -f``; ``nft -j list ruleset`` shows only
  the ``inet portguard`` table, with the rendered chains and counters, each
  chain's rules equal to those of the same settings rendered with benign
  names (the log prefix aside, which must read back as given), and each set
  holding one element per entry, with the rendered comment;
- iptables (per-source rules and the ipset variant, through the host
  module's apply steps): ``iptables-save`` shows only the filter table, only
  the built-in chains and ours, and our rules and sets read back exactly as
  rendered (comments included), plus the one jump.
"""

import copy
import dataclasses
import json
import re

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from kernel_backends import Iptables, scratch_namespace
from support.requirements import require

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import nft_set_name
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import (
    chain_rules,
    element_comment,
    render_nftables,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import CatalogError
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import HostPolicy
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import key_path

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


@pytest.fixture(scope="module")
def scratch():
    with scratch_namespace() as namespace:
        yield namespace


CATALOG = {
    "portguard_networks": {"n1": ["10.20.0.0/16", "2001:db8:20::/48"]},
    "portguard_services": {"s1": {"port": 443, "proto": "tcp", "purpose": "Public web", "owner": "web"},
                           "s2": {"port": 53, "proto": ["tcp", "udp"], "purpose": "DNS", "owner": "ops"}},
    "portguard_flows": [{"name": "f1", "from": ["n1", "h2"], "to": "g1", "services": ["s1", "s2"],
                         "description": "web and DNS"}],
    "portguard_management": {"from": "n1", "services": ["s1"]},
}
GROUPS = {"all": ["h1", "h2"], "g1": ["h1"]}
HOSTVARS = {
    "h1": {"portguard_addresses": ["10.0.1.1", "fd00::1"], "portguard_log_prefix": "pg-deny: ",
           "portguard_rollback_timeout": "30", "portguard_mode": "enforce"},
    "h2": {"ansible_host": "h2.example.net", "ansible_default_ipv4": {"address": "10.0.2.2"},
           "ansible_default_ipv6": {"address": "fd00::2"}},
}
# Names the base uses: a generated name equal to one of them is another (valid) inventory.
TAKEN = {"h1", "h2", "g1", "n1", "s1", "s2", "all"}


def rename(mapping, old, new):
    return {new if key == old else key: value for key, value in mapping.items()}


def _host(inventory, value, old):
    catalog, groups, hostvars = inventory
    groups = {name: [value if host == old else host for host in members] for name, members in groups.items()}
    for flow in catalog["portguard_flows"]:
        flow["from"] = [value if name == old else name for name in flow["from"]]
    return catalog, groups, rename(hostvars, old, value)


def _group(inventory, value):
    catalog, groups, hostvars = inventory
    catalog["portguard_flows"][0]["to"] = value
    return catalog, rename(groups, "g1", value), hostvars


def _network(inventory, value):
    catalog, groups, hostvars = inventory
    catalog["portguard_networks"] = rename(catalog["portguard_networks"], "n1", value)
    catalog["portguard_flows"][0]["from"][0] = value
    catalog["portguard_management"]["from"] = value
    return catalog, groups, hostvars


def _service(inventory, value):
    catalog, groups, hostvars = inventory
    catalog["portguard_services"] = rename(catalog["portguard_services"], "s1", value)
    catalog["portguard_flows"][0]["services"][0] = value
    catalog["portguard_management"]["services"] = [value]
    return catalog, groups, hostvars


def _set(*keys):
    def patch(inventory, value):
        target = inventory
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        return inventory
    return patch


# slot: (patch the inventory with a value, the path a refusal must name (or lie under), valid values)
SLOTS = {
    "target host name": (lambda inv, v: _host(inv, v, "h1"), lambda v: key_path("hostvars", v), ["h1", "web-1.example"]),
    "source host name": (lambda inv, v: _host(inv, v, "h2"), lambda v: key_path("hostvars", v), ["h2", "10.0.9.9"]),
    "group name": (_group, lambda v: key_path("groups", v), ["g1", "web_servers"]),
    "network name": (_network, lambda v: key_path("portguard_networks", v), ["n1", "office.lan"]),
    "service name": (_service, lambda v: key_path("portguard_services", v), ["s1", "https"]),
    "purpose": (_set(0, "portguard_services", "s1", "purpose"), lambda v: "portguard_services.s1.purpose", ["Web"]),
    "owner": (_set(0, "portguard_services", "s1", "owner"), lambda v: "portguard_services.s1.owner", ["web"]),
    "flow name": (_set(0, "portguard_flows", 0, "name"), lambda v: "portguard_flows[0].name", ["web-in"]),
    "flow description": (_set(0, "portguard_flows", 0, "description"), lambda v: "portguard_flows[0].description",
                         ["why"]),
    "flow source": (_set(0, "portguard_flows", 0, "from", 1), lambda v: "portguard_flows[0].from[1]",
                    ["h2", "10.0.7.0/24", "any"]),
    "network entry": (_set(0, "portguard_networks", "n1", 0), lambda v: "portguard_networks.n1",
                      ["10.20.0.0/16", "fd00:20::/64"]),
    "log prefix": (_set(2, "h1", "portguard_log_prefix"), lambda v: "hostvars.h1.portguard_log_prefix",
                   ["pg-deny: ", "deny"]),
    "address": (_set(2, "h1", "portguard_addresses", 0), lambda v: "hostvars.h1.portguard_addresses[0]",
                ["10.0.1.1", "fd00::1"]),
    "ansible_host": (_set(2, "h2", "ansible_host"), lambda v: "hostvars.h2.ansible_host", ["h2.example.net", "10.0.2.2"]),
    "address fact": (_set(2, "h2", "ansible_default_ipv4", "address"),
                     lambda v: "hostvars.h2.ansible_default_ipv4.address", ["10.0.2.2"]),
    "rollback timeout": (_set(2, "h1", "portguard_rollback_timeout"),
                         lambda v: "hostvars.h1.portguard_rollback_timeout", ["30", "3600"]),
    "mode": (_set(2, "h1", "portguard_mode"), lambda v: "hostvars.h1.portguard_mode", ["enforce", "audit"]),
}
SPECIAL = "\n\r\t\x00\x1b\x7f\x85\"'\\`{};#$@ /-_.:\u00a0\u200f\u202e\u2028\u2029\ufeffé€😀"
characters = st.one_of(st.sampled_from(SPECIAL), st.characters(blacklist_categories=("Cs",)))
texts = st.text(characters, max_size=30)
# Printable text with no quote or backslash: what free-text values may hold, to be loaded rather than refused.
printable = st.text(st.one_of(st.sampled_from(" {};#$@/-_.:é€😀\u00a0"), st.characters(
    blacklist_categories=("C", "Zl", "Zp"), blacklist_characters="\"'\\`")), min_size=1, max_size=60)


@st.composite
def examples(draw):
    slot = draw(st.sampled_from(sorted(SLOTS)))
    valid = SLOTS[slot][2]
    value = draw(st.one_of(
        texts,
        printable,
        printable,
        st.text(st.sampled_from("aé€😀 ;{"), min_size=100, max_size=140),  # around the 128-byte limit
        st.builds(lambda base, cut, extra: base[:cut] + extra + base[cut:], st.sampled_from(valid),
                  st.integers(0, 16), texts.filter(bool)),
        st.sampled_from(valid),
    ))
    return slot, value


def strip(node):
    """A JSON node without handles and counter values."""
    if isinstance(node, dict):
        return {key: "counter" if key == "counter" else strip(value) for key, value in node.items() if key != "handle"}
    if isinstance(node, list):
        return [strip(item) for item in node]
    return node


def listing(scratch) -> dict:
    """``nft -j list ruleset`` as {kind: [object]}."""
    found = {}
    for item in json.loads(scratch.ns(scratch.dst, "nft", "-j", "list", "ruleset").stdout)["nftables"]:
        (kind, body), = item.items()
        found.setdefault(kind, []).append(body)
    return found


_REFERENCE_RULES: dict = {}


def reference_rules(scratch, hp: HostPolicy) -> dict:
    """The rules of each chain for ``hp``'s settings, rendered around a benign host name and log prefix."""
    benign = dataclasses.replace(hp.settings, log_prefix="benign: ", addresses=())
    if benign not in _REFERENCE_RULES:
        scratch.reset_firewall()
        scratch.ns(scratch.dst, "nft", "-f", "-", input=render_nftables(HostPolicy("benign", benign, ())))
        _REFERENCE_RULES[benign] = rules_by_chain(listing(scratch))
    return _REFERENCE_RULES[benign]


def rules_by_chain(found: dict, prefix=None) -> dict:
    """Each chain's rules; the log statement's prefix checked against ``prefix`` and then left out."""
    chains = {}
    for rule in found.get("rule", []):
        expr = strip(rule["expr"])
        for statement in expr:
            if "log" in statement:
                assert prefix is None or statement["log"].pop("prefix") == prefix, "the log prefix changed"
                statement["log"].pop("prefix", None)
        chains.setdefault(rule["chain"], []).append(expr)
    return chains


def check_nftables(scratch, hp: HostPolicy):
    payload = render_nftables(hp)
    reference = reference_rules(scratch, hp)
    scratch.reset_firewall()
    scratch.ns(scratch.dst, "nft", "-c", "-f", "-", input=payload)
    scratch.ns(scratch.dst, "nft", "-f", "-", input=payload)
    found = listing(scratch)
    assert [(t["family"], t["name"]) for t in found["table"]] == [("inet", "portguard")], "another table appeared"
    assert all(body["table"] == "portguard" for kind, bodies in found.items() if kind not in ("metainfo", "table")
               for body in bodies)
    assert sorted(c["name"] for c in found["chain"]) == ["input"]
    assert sorted(c["name"] for c in found["counter"]) == ["denied_in"]
    chains = rules_by_chain(found, hp.settings.log_prefix)
    assert len(chains["input"]) == len(chain_rules(hp, "in"))
    assert chains == reference, "the rules differ from those of the same settings with benign names"
    sets = {body["name"]: body for body in found["set"]}
    assert sorted(sets) == sorted(nft_set_name("in", f, p) for f in (4, 6) for p in ("tcp", "udp"))
    for family in (4, 6):
        for proto in ("tcp", "udp"):
            elements = sets[nft_set_name("in", family, proto)].get("elem", [])
            comments = sorted(e["elem"].get("comment", "") for e in elements)
            expected = sorted(element_comment(e) for e in hp.entries("in", family, proto))
            assert comments == expected, f"{nft_set_name('in', family, proto)} holds other elements than rendered"


_SAVED_CHAIN = re.compile(r"^:(\S+) ")


def check_iptables(scratch, hp: HostPolicy, ipset: bool):
    backend = Iptables("default", ipset=ipset)
    scratch.reset_firewall()
    backend.load(scratch, hp)
    saved = {family: scratch.ns(scratch.dst, tool).stdout for family, tool in ((4, "iptables-save"), (6, "ip6tables-save"))}
    ruleset = backend.render(hp)
    for family, text in saved.items():
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        assert [line for line in lines if line.startswith("*")] == ["*filter"], "another table appeared"
        assert sorted(_SAVED_CHAIN.match(line).group(1) for line in lines if line.startswith(":")) == [
            "FORWARD", "INPUT", "OUTPUT", "PORTGUARD-IN"]
        rendered = [line for line in (ruleset.ipv4 if family == 4 else ruleset.ipv6).splitlines() if line.startswith("-A ")]
        assert sum(line.startswith("-A ") for line in lines) == len(rendered) + 1  # and the jump from INPUT
    assert backend.live(scratch) == backend.expected(hp), "the rules or sets read back differ from the render"


# The namespace is shared on purpose (reset in each check): one per example would cost more than the checks.
HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture]


@settings(max_examples=120, deadline=None, suppress_health_check=HEALTH)
@given(examples())
def test_every_string_is_refused_with_its_path_or_loads_as_meant(scratch, example):
    require("nft", "iptables-restore", "ip6tables-restore", "ipset")
    slot, value = example
    assume(value not in TAKEN or value in SLOTS[slot][2])
    patch, path, _valid = SLOTS[slot]
    catalog, groups, hostvars = patch(copy.deepcopy((CATALOG, GROUPS, HOSTVARS)), value)
    target = value if slot == "target host name" else "h1"
    try:
        hp = compile_catalog(catalog, groups, hostvars).host(target)
    except CatalogError as exc:
        expected = path(value)
        assert exc.path == expected or exc.path.startswith((f"{expected}.", f"{expected}[")), str(exc)
        assert str(exc).startswith(f"{exc.path}: ") and str(exc).isprintable(), repr(str(exc))
        event(f"{slot}: refused")
        return
    event(f"{slot}: loaded")
    check_nftables(scratch, hp)
    check_iptables(scratch, hp, ipset=False)
    check_iptables(scratch, hp, ipset=True)
