"""Rendered rulesets in a real kernel: loaded next to foreign rules, then tested with real packets.

For each backend (nftables; iptables through the default ``iptables-restore``,
which is iptables-nft on Debian 12, and iptables-legacy, each with the
whitelist in ipsets and with the per-source rules fallback) and for hosts of
the example inventory, the host's ruleset is loaded into a throwaway namespace
that already holds Docker-like iptables chains, a fail2ban-like nft table
(and for iptables a fail2ban-like ipset), and TCP and UDP probes over IPv4 and IPv6, from every sampled source
to every sampled port, must get through exactly when ``Policy.allowed`` says
so (enforce), or always (audit), with the deny counter counting every probe
the catalog does not allow.
"""

import pytest
from kernel_backends import check_traffic
from kernel_lab import HOSTS

pytestmark = pytest.mark.kernel


@pytest.fixture
def prepared(netlab, backend):
    """``prepared(host)``: the namespace reset, given ``host``'s addresses and the foreign rules."""

    def prepare(host):
        netlab.reset_firewall()
        netlab.become(host)
        backend.create_foreign(netlab)
        return netlab

    return prepare


@pytest.mark.parametrize("host", HOSTS)
def test_loading_twice_leaves_foreign_rules_alone(prepared, backend, compile_example, host):
    policy = compile_example().host(host)
    lab = prepared(host)
    foreign = backend.foreign(lab)
    backend.load(lab, policy)
    assert backend.foreign(lab) == foreign, "the first load changed foreign rules"
    backend.load(lab, policy)
    assert backend.foreign(lab) == foreign, "the second load (a replace) changed foreign rules"
    assert backend.copies(lab) == backend.expected_copies(policy), "a reload duplicated or lost our chains/jumps"


@pytest.mark.parametrize("host", HOSTS)
def test_live_rules_read_back_as_rendered(prepared, backend, compile_example, host):
    """What the kernel lists (counter values aside) is the rendered text: drift detection relies on it."""
    policy = compile_example().host(host)
    lab = prepared(host)
    backend.load(lab, policy)
    backend.load(lab, policy)
    assert backend.live(lab) == backend.expected(policy)


# Every host in both modes with its own settings, and desk1 once more with
# "drop", so that egress is also tested dropping.
SCENARIOS = [(host, mode, {}) for mode in ("enforce", "audit") for host in HOSTS] + [
    ("desk1", "enforce", {"portguard_deny": "drop"})]


@pytest.mark.parametrize(("host", "mode", "variables"), SCENARIOS,
                         ids=[f"{h}-{m}{'-drop' if v else ''}" for h, m, v in SCENARIOS])
def test_packets_follow_the_catalog(prepared, backend, compile_example, host, mode, variables):
    policy = compile_example(**{host: {"portguard_mode": mode, **variables}})
    lab = prepared(host)
    backend.load(lab, policy.host(host))
    foreign = backend.foreign(lab, strip_counters=True)
    check_traffic(lab, backend, policy, host, require_both=True)
    assert backend.foreign(lab, strip_counters=True) == foreign, "foreign rules changed while probing"
