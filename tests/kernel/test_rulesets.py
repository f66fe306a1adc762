"""Rendered rulesets in a real kernel: loaded next to foreign rules, then tested with real packets.

For each backend (nftables; iptables through the default ``iptables-restore``,
which is iptables-nft on Debian 12; iptables-legacy) and for hosts of the
example inventory, the host's ruleset is loaded into a throwaway namespace
that already holds Docker-like iptables chains and a fail2ban-like nft
table, and TCP and UDP probes over IPv4 and IPv6, from every sampled source
to every sampled port, must get through exactly when ``Policy.allowed`` says
so (enforce), or always (audit), with the deny counter counting every probe
the catalog does not allow.
"""

import pytest
from kernel_backends import Iptables, Nftables
from kernel_lab import HOSTS, compare, denied_states, matrix, require, short

pytestmark = pytest.mark.kernel

BACKENDS = {"nftables": Nftables, "iptables": lambda: Iptables("default"),
            "iptables-legacy": lambda: Iptables("legacy")}


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request):
    chosen = BACKENDS[request.param]()
    require(*chosen.tools)
    return chosen


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


def _probe(lab, backend, policy, host: str, direction: str, audit: bool):
    """Probe every (address, port, protocol) of the sample in one direction.

    Returns the cases, their states, the catalog's decisions, how much the
    deny counter rose, and the bounds it must lie in: one packet per probe
    the catalog denies (plus one per retried one), and at most as many more
    as TCP retransmitted in the prober's namespace (a SYN re-sent because the
    machine was too slow to give up in time).
    """
    hp = policy.host(host)
    cases = matrix(lab.sources(), lab.sample.ports)
    if direction == "in":
        namespace = lab.src
        probes = [[lab.target(source), port, proto, source] for source, port, proto in cases]
        expected = [policy.allowed(source, host, port, proto) for source, port, proto in cases]
    else:
        namespace = lab.dst  # the prober's addresses are the destinations
        probes = [[address, port, proto, None] for address, port, proto in cases]
        expected = [hp.allowed_out(address, port, proto) for address, port, proto in cases]
    for family in (4, 6):
        wanted = [want for (address, _, _), want in zip(cases, expected) if (":" in address) == (family == 6)]
        assert any(wanted) and not all(wanted), f"the IPv{family} sample must hold allowed and denied cases"
    through = [True] * len(cases) if audit else expected
    lab.flush_conntrack()
    before, retransmits = backend.counter(lab, direction), lab.tcp_retransmits(namespace)
    states = lab.probe(namespace, probes)
    # A probe that should get through but timed out gets one more, slower try:
    # a busy machine must not fail the test, and a wrong drop times out again.
    retry = [index for index, state in enumerate(states) if state == "timeout" and through[index]]
    if retry:
        for index, state in zip(retry, lab.probe(namespace, [probes[i] for i in retry], 0.9, 3.0)):
            states[index] = state
    counted = backend.counter(lab, direction) - before
    low = expected.count(False) + sum(1 for index in retry if not expected[index])
    high = low + lab.tcp_retransmits(namespace) - retransmits
    return cases, states, expected, counted, (low, high)


# Every host in both modes with its own settings, and desk1 once more with
# "drop", so that egress is also tested dropping.
SCENARIOS = [(host, mode, {}) for mode in ("enforce", "audit") for host in HOSTS] + [
    ("desk1", "enforce", {"portguard_deny": "drop"})]


@pytest.mark.parametrize(("host", "mode", "variables"), SCENARIOS,
                         ids=[f"{h}-{m}{'-drop' if v else ''}" for h, m, v in SCENARIOS])
def test_packets_follow_the_catalog(prepared, backend, compile_example, host, mode, variables):
    policy = compile_example(**{host: {"portguard_mode": mode, **variables}})
    hp = policy.host(host)
    lab = prepared(host)
    backend.load(lab, hp)
    foreign = backend.foreign(lab, strip_counters=True)
    directions = ["in", "out"] if hp.settings.egress else ["in"]
    for direction in directions:
        cases, states, expected, counted, (low, high) = _probe(lab, backend, policy, host, direction, mode == "audit")
        if mode == "audit":
            blocked = compare(cases, states, [True] * len(cases))
            assert not blocked, f"audit mode blocked {direction}bound traffic:\n{short(blocked)}"
        else:
            wrong = compare(cases, states, expected)
            assert not wrong, f"{len(wrong)} of {len(cases)} {direction}bound probes disagree with the catalog:\n" \
                              f"{short(wrong)}"
            if direction == "in":
                unlike = denied_states(cases, states, expected, hp.settings.deny)
                assert not unlike, f"denied probes did not {hp.settings.deny}:\n{short(unlike)}"
        assert low <= counted <= high, f"denied_{direction} counted {counted} packets, expected " + \
            (f"{low} (one per probe the catalog denies)" if low == high else f"{low} to {high} (SYNs were retransmitted)")
    assert backend.foreign(lab, strip_counters=True) == foreign, "foreign rules changed while probing"
