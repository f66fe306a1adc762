"""The ways a ruleset gets into a kernel, as the host module does it, plus the foreign rules around it.

Each backend knows how to load a rendered ruleset (twice is a replace), how
to read back our own rules (and sets) in the form the renderer writes them,
how to read the deny counters, and how to set up and snapshot foreign rules
(Docker-like nat and filter chains, a fail2ban-like nft table, and for
iptables a fail2ban-like ipset with a rule using it) that loading ours must
not touch. The iptables backends load through the host module's own steps
(``IptablesBackend.apply_steps``, host/firewall/backends.py), in the ipset variant or in
the per-source rules fallback.
"""

import contextlib
import re
import secrets
import shutil

from kernel_lab import NetLab, compare, denied_states, matrix, normalize_nft, rendered_table, run, short
from support.requirements import require

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import SETS
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.ipset import normalize_ipset
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import IptablesBackend

# A fail2ban-like native table: a base chain of its own on the input hook,
# banning an address the sample never uses.
FOREIGN_NFT = """table inet f2b-table {
\tset addr-set-sshd {
\t\ttype ipv4_addr
\t\telements = { 198.51.100.7 }
\t}

\tchain f2b-chain {
\t\ttype filter hook input priority filter - 1; policy accept;
\t\ttcp dport 22 ip saddr @addr-set-sshd reject with icmp port-unreachable
\t}
}
"""
# What Docker and a hand-made INPUT rule leave in iptables. No sampled packet
# matches a foreign filter rule; the nat PREROUTING jump does see probes (it
# matches every local destination), which is why counters are compared only
# around loads, when no probe runs.
FOREIGN_IPV4 = """*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
:FORWARD DROP [0:0]
:DOCKER - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-USER - [0:0]
-A INPUT -s 198.51.100.1/32 -j DROP
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-ISOLATION-STAGE-1 -j RETURN
-A DOCKER-USER -j RETURN
COMMIT
"""
FOREIGN_IPV6 = """*filter
:DOCKER-USER - [0:0]
-A INPUT -s 2001:db8:dead::1/128 -j DROP
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""
OUR_TABLE = ("inet", "portguard")
# A fail2ban-like ipset, and the rule that uses it (an address the sample never uses).
FOREIGN_IPSET = """create f2b-sshd hash:ip family inet hashsize 1024 maxelem 65536 counters comment
add f2b-sshd 198.51.100.7 packets 0 bytes 0 comment "banned"
"""
FOREIGN_SET_RULE = ("-A", "INPUT", "-m", "set", "--match-set", "f2b-sshd", "src", "-p", "tcp", "--dport", "22", "-j", "DROP")


class ScratchNamespace:
    """One namespace without a network, for tests that load and read back rulesets but send no packets.

    It stands in for a ``NetLab`` wherever a backend only loads and lists (``dst`` is the namespace).
    """

    def __init__(self):
        self.dst = f"pg-scratch-{secrets.token_hex(3)}"
        self.used_legacy = False

    def ns(self, namespace: str, *command: str, input: str | None = None, check: bool = True):
        return run("ip", "netns", "exec", namespace, *command, input=input, check=check)

    def reset_firewall(self) -> None:
        """Empty every table and set of this namespace (and only of it)."""
        self.ns(self.dst, "nft", "flush", "ruleset")
        if self.used_legacy:
            for tool in ("iptables-legacy", "ip6tables-legacy"):
                self.ns(self.dst, tool, "-w", "-t", "filter", "-F")
                self.ns(self.dst, tool, "-w", "-t", "filter", "-X")
        if shutil.which("ipset"):
            self.ns(self.dst, "ipset", "destroy")


@contextlib.contextmanager
def scratch_namespace():
    """A ``ScratchNamespace`` that exists inside the ``with`` block; reset it before use."""
    require("ip", "nft")
    namespace = ScratchNamespace()
    run("ip", "netns", "add", namespace.dst)
    try:
        yield namespace
    finally:
        run("ip", "netns", "delete", namespace.dst, check=False)


def nft_tables(lab: NetLab) -> list[tuple[str, str]]:
    listing = lab.ns(lab.dst, "nft", "list", "tables").stdout
    return [tuple(line.split()[1:3]) for line in listing.splitlines() if line.startswith("table ")]


def nft_snapshot(lab: NetLab, skip=()) -> dict:
    """Every table but ours (and ``skip``), exactly as ``nft list table`` prints it, counters included."""
    return {f"{family} {name}": lab.ns(lab.dst, "nft", "list", "table", family, name).stdout
            for family, name in nft_tables(lab) if (family, name) != OUR_TABLE and (family, name) not in skip}


class Nftables:
    name = "nftables"
    tools = ("nft", "iptables-nft-restore", "ip6tables-nft-restore")

    def render(self, policy) -> str:
        return render_nftables(policy)

    def load(self, lab: NetLab, policy) -> None:
        lab.ns(lab.dst, "nft", "-f", "-", input=self.render(policy))

    def create_foreign(self, lab: NetLab) -> None:
        # The tables iptables-nft makes for Docker and for a hand-made rule, and a native one.
        lab.ns(lab.dst, "iptables-nft-restore", "--noflush", input=FOREIGN_IPV4)
        lab.ns(lab.dst, "ip6tables-nft-restore", "--noflush", input=FOREIGN_IPV6)
        lab.ns(lab.dst, "nft", "-f", "-", input=FOREIGN_NFT)

    def foreign(self, lab: NetLab, strip_counters: bool = False) -> dict:
        snapshot = nft_snapshot(lab)
        return {key: normalize_nft(text) for key, text in snapshot.items()} if strip_counters else snapshot

    def live(self, lab: NetLab) -> str:
        return normalize_nft(lab.ns(lab.dst, "nft", "list", "table", *OUR_TABLE).stdout)

    def expected(self, policy) -> str:
        return rendered_table(self.render(policy))

    def copies(self, lab: NetLab) -> dict:
        return {"table inet portguard": nft_tables(lab).count(OUR_TABLE)}

    def expected_copies(self, policy) -> dict:
        return {"table inet portguard": 1}

    def counter(self, lab: NetLab, direction: str) -> int:
        text = lab.ns(lab.dst, "nft", "list", "counter", *OUR_TABLE, f"denied_{direction}").stdout
        return int(re.search(r"packets (\d+)", text).group(1))


_SAVE_COUNTS = re.compile(r"^\[\d+:\d+\] ")
_POLICY_COUNTS = re.compile(r"^(:\S+ \S+) \[\d+:\d+\]$")
_OURS = re.compile(r"^(:PORTGUARD-|-A PORTGUARD-|-A (INPUT|OUTPUT) -j PORTGUARD-(IN|OUT)$)")


def ipset_save(lab: NetLab, ours: bool) -> str:
    """``ipset save`` of our sets (``ours``) or of every other set, in the host under test."""
    names = lab.ns(lab.dst, "ipset", "list", "-n").stdout.split()
    return "".join(lab.ns(lab.dst, "ipset", "save", name).stdout for name in sorted(names)
                   if (name.removesuffix("-new") in SETS) == ours)


class Iptables:
    """``variant`` "default" is whatever ``iptables-restore`` is (iptables-nft on Debian 12); "legacy" is x_tables.

    ``ipset`` renders the whitelist into ipsets; without it, one rule per source (the fallback).
    """

    name = "iptables"

    def __init__(self, variant: str, ipset: bool = True):
        self.variant = variant
        self.ipset = ipset
        suffix = "-legacy" if variant == "legacy" else ""
        self.host = IptablesBackend(suffix)
        self.cmd = {family: f"{prefix}{suffix}" for family, prefix in ((4, "iptables"), (6, "ip6tables"))}
        self.restore = {family: f"{prefix}{suffix}-restore" for family, prefix in ((4, "iptables"), (6, "ip6tables"))}
        self.save = {family: f"{prefix}{suffix}-save" for family, prefix in ((4, "iptables"), (6, "ip6tables"))}
        self.tools = ("nft", "ipset", *self.cmd.values(), *self.restore.values(), *self.save.values())

    def render(self, policy):
        return render_iptables(policy, ipset=self.ipset)

    def _payload(self, ruleset, family: int) -> str:
        return ruleset.ipv4 if family == 4 else ruleset.ipv6

    def load(self, lab: NetLab, policy) -> None:
        """What the firewall module does: its apply steps (sets, chains without flushing, each jump once)."""
        lab.used_legacy |= self.variant == "legacy"
        for argv, data in self.host.apply_steps(self.render(policy).as_dict()):
            lab.ns(lab.dst, *argv, input=data)

    def create_foreign(self, lab: NetLab) -> None:
        lab.used_legacy |= self.variant == "legacy"
        lab.ns(lab.dst, self.restore[4], "-w", "5", "--noflush", input=FOREIGN_IPV4)
        lab.ns(lab.dst, self.restore[6], "-w", "5", "--noflush", input=FOREIGN_IPV6)
        lab.ns(lab.dst, "nft", "-f", "-", input=FOREIGN_NFT)
        lab.ns(lab.dst, "ipset", "restore", input=FOREIGN_IPSET)
        lab.ns(lab.dst, self.cmd[4], "-w", "5", *FOREIGN_SET_RULE)

    def _save(self, lab: NetLab, family: int, *args: str) -> str:
        return lab.ns(lab.dst, self.save[family], *args).stdout

    def foreign(self, lab: NetLab, strip_counters: bool = False) -> dict:
        """Every table of both families minus our chains and jumps, and every nft table iptables does not show.

        Rule counters are kept; the packet counters of built-in chain policies
        are blanked, because IPv6 neighbour discovery and MLD may bump them at
        any moment.
        """
        snapshot = {}
        for family in (4, 6):
            lines = []
            for line in self._save(lab, family, "-c").splitlines():
                if line.startswith("#"):
                    continue  # "Generated by ... on <date>"
                if _OURS.match(_SAVE_COUNTS.sub("", line)):
                    continue
                line = _POLICY_COUNTS.sub(r"\1", line)
                lines.append(_SAVE_COUNTS.sub("", line) if strip_counters else line)
            snapshot[f"{self.save[family]}"] = "\n".join(lines)
        # The filter tables are those iptables-nft shares with us; the save output above covers them.
        skip = {("ip", "filter"), ("ip6", "filter"), ("ip", "nat"), ("ip6", "nat")} if self.variant != "legacy" else set()
        for key, text in nft_snapshot(lab, skip=skip).items():
            snapshot[key] = normalize_nft(text) if strip_counters else text
        snapshot["ipset"] = ipset_save(lab, ours=False)
        return snapshot

    def _our_lines(self, lab: NetLab, family: int) -> list[str]:
        return [line for line in self._save(lab, family, "-t", "filter").splitlines()
                if line.startswith("-A PORTGUARD-")]

    def live(self, lab: NetLab) -> str:
        """Our rules as listed, then our sets as ``ipset save`` lists them (normalized like the host module does)."""
        lines = [line for family in (4, 6) for line in self._our_lines(lab, family)]
        return "\n".join(lines + normalize_ipset(ipset_save(lab, ours=True))) + "\n"

    def expected(self, policy) -> str:
        ruleset = self.render(policy)
        lines = [line for family in (4, 6) for line in self._payload(ruleset, family).splitlines()
                 if line.startswith("-A ")]
        return "\n".join(lines + normalize_ipset(ruleset.ipset, rendered=True)) + "\n"

    def copies(self, lab: NetLab) -> dict:
        found = {}
        for family in (4, 6):
            saved = self._save(lab, family, "-t", "filter").splitlines()
            for builtin, chain in (("INPUT", "PORTGUARD-IN"), ("OUTPUT", "PORTGUARD-OUT")):
                found[f"IPv{family} {builtin} -j {chain}"] = saved.count(f"-A {builtin} -j {chain}")
                found[f"IPv{family} :{chain}"] = sum(1 for line in saved if line.startswith(f":{chain} "))
        names = lab.ns(lab.dst, "ipset", "list", "-n").stdout.split()
        found["sets"] = sorted(name for name in names if name.startswith("portguard-"))
        return found

    def expected_copies(self, policy) -> dict:
        jumps = set(self.render(policy).jumps)
        return {f"IPv{family} {key}": int((builtin, chain) in jumps) for family in (4, 6)
                for builtin, chain in (("INPUT", "PORTGUARD-IN"), ("OUTPUT", "PORTGUARD-OUT"))
                for key in (f"{builtin} -j {chain}", f":{chain}")} | {
            "sets": sorted(name for name, _family in self.render(policy).sets)}

    def counter(self, lab: NetLab, direction: str) -> int:
        pattern = re.compile(rf"^\[(\d+):\d+\] -A PORTGUARD-{direction.upper()} -m comment --comment denied_{direction} ")
        total = 0
        for family in (4, 6):
            hits = [int(m.group(1)) for m in map(pattern.match, self._save(lab, family, "-c", "-t", "filter").splitlines())
                    if m]
            assert len(hits) == 1, f"IPv{family}: expected one denied_{direction} rule, found {len(hits)}"
            total += hits[0]
        return total


def _probe(lab: NetLab, backend, policy, host: str, direction: str, sources, ports, require_both: bool):
    """Probe every (address, port, protocol) of the sample in one direction.

    Returns the cases, their states, the catalog's decisions, how much the
    deny counter rose, and the bounds it must lie in: one packet per probe
    the catalog denies (plus one per retried one), and at most as many more
    as TCP retransmitted in the prober's namespace (a SYN re-sent because the
    machine was too slow to give up in time).
    """
    hp = policy.host(host)
    cases = matrix(sources, ports)
    if direction == "in":
        namespace = lab.src
        probes = [[lab.target(source), port, proto, source] for source, port, proto in cases]
        expected = [policy.allowed(source, host, port, proto) for source, port, proto in cases]
    else:
        namespace = lab.dst  # the prober's addresses are the destinations
        probes = [[address, port, proto, None] for address, port, proto in cases]
        expected = [hp.allowed_out(address, port, proto) for address, port, proto in cases]
    if require_both:
        for family in (4, 6):
            wanted = [want for (address, _port, _proto), want in zip(cases, expected) if (":" in address) == (family == 6)]
            assert any(wanted) and not all(wanted), f"the IPv{family} sample must hold allowed and denied cases"
    through = [True] * len(cases) if hp.settings.mode == "audit" else expected
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


def check_traffic(lab: NetLab, backend, policy, host: str, sources=None, ports=None, require_both=False) -> None:
    """Real probes, in each direction the host filters, must get through exactly as the catalog decides.

    Enforce: through iff allowed, and (inbound) denied probes fail as
    ``portguard_deny`` says. Audit: everything through. Both: the deny
    counter counts one packet per denied probe.
    """
    hp = policy.host(host)
    sources = lab.sources() if sources is None else [s for s in sources if s in lab.src_addresses]
    ports = lab.sample.ports if ports is None else ports
    for direction in ["in", "out"] if hp.settings.egress else ["in"]:
        cases, states, expected, counted, (low, high) = _probe(lab, backend, policy, host, direction, sources, ports,
                                                               require_both)
        if hp.settings.mode == "audit":
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
