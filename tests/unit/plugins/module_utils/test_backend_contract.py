"""The backends' contract: each name the renderers write is one the readers find again, by lookup."""

import re

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends import contract
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import (
    normalize_iptables,
    render_iptables,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables


def test_set_names_and_their_inverse_agree():
    for direction in contract.DIRECTIONS:
        for family in contract.FAMILIES:
            assert contract.SET_KEYS[contract.set_name(direction, family)] == (direction, family)
            for proto in contract.PROTOCOLS:
                name = contract.nft_set_name(direction, family, proto)
                assert contract.NFT_SET_KEYS[name] == (direction, family, proto)
    assert len(contract.SET_KEYS) == len(contract.DIRECTIONS) * len(contract.FAMILIES)
    assert set(contract.SETS) == set(contract.SET_KEYS)


def test_every_name_the_renderers_write_is_in_the_contract(example_policy, example_hosts):
    for host in example_hosts:
        text = render_nftables(example_policy.host(host))
        assert set(re.findall(r"\bset (\S+) \{", text)) <= set(contract.NFT_SET_KEYS)
        assert set(re.findall(r"\bchain (\S+) \{", text)) <= set(contract.NFT_CHAIN_DIRECTIONS)
        assert set(re.findall(r"\bcounter (denied_\w+) \{", text)) <= set(contract.DENIED_COUNTERS)
        assert set(re.findall(r"^table (\w+ \w+)", text, re.M)) == {contract.NFT_TABLE_REF}
        ruleset = render_iptables(example_policy.host(host), ipset=True)
        for payload in (ruleset.ipv4, ruleset.ipv6):
            assert set(re.findall(r"^:(\S+) ", payload, re.M)) <= set(contract.IPT_JUMPS)
            assert set(re.findall(r"--match-set (\S+) ", payload)) <= set(contract.SET_KEYS)
            # the reader finds every rule the renderer wrote
            assert len([line for line in normalize_iptables(payload) if line.startswith("-A ")]) == \
                len([line for line in payload.splitlines() if line.startswith("-A ")])
        assert {name for name, _family in ruleset.sets} <= set(contract.SET_KEYS)
        assert set(ruleset.jumps) <= {(builtin, chain) for chain, builtin in contract.IPT_JUMPS.items()}
