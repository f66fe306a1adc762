"""A throwaway two-namespace network for the kernel tests, and the probe sample.

``pg-dst-<tag>`` plays the host under test: it carries that host's addresses
and the ruleset. ``pg-src-<tag>`` is the prober: it carries every source
address of the sample (/32 and /128 on its veth). Both namespaces route
everything on-link over the veth pair, so each side answers ARP/ND for its
own addresses and no address ever reaches a real network.
"""

import datetime
import ipaddress
import json
import random
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

AGENT = Path(__file__).with_name("nsagent.py")
# A fixed day: the example's expired flow (office-legacy-ftp) is then always
# expired and office-dashboards always live, whatever the date of the run.
TODAY = datetime.date(2026, 1, 15)
# Hosts of the example inventory under test: web1 (reject, a flow from
# "any"), db1 (drop), mon1 (UDP and TCP flows from networks and groups),
# desk1 (egress).
HOSTS = ("web1", "db1", "mon1", "desk1")
# Sources chosen by hand: inside and just outside each network of the catalog,
# and addresses no flow names.
HAND_PICKED = (
    "10.20.0.5", "10.20.255.254", "10.21.0.1", "10.99.0.7", "10.99.1.7", "172.30.89.49",
    "172.30.89.100", "172.30.90.1", "192.0.2.10", "198.51.100.20",
    "2001:db8:20::5", "2001:db8:20:ffff::1", "2001:db8:21::1", "2001:db8:99::7", "2001:db8:99:1::7",
    "fd89:7067::5f", "fd89:7067::100", "fd89:7068::1", "2001:db8:ffff::1",
)
# Ports no flow opens but that are commonly exposed (telnet, SNMP, MySQL,
# Redis, Docker's API).
UNCATALOGED = (23, 161, 2375, 3306, 6379)
# A dropped SYN must be one packet in the deny counter: give up before the
# first retransmission (1 s). UDP has no retransmission, so its echo may take
# longer under load. Probes run concurrently, so this is paid once per run.
TCP_TIMEOUT = 0.5
UDP_TIMEOUT = 1.0


def run(*command: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, input=input, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


# The sample ---------------------------------------------------------------------


def _usable(address) -> bool:
    if address.is_multicast or address.is_loopback or address.is_link_local or address.is_unspecified:
        return False
    if address.is_reserved or address.version == 4 and address in ipaddress.ip_network("0.0.0.0/8"):
        return False
    return address.version == 4 or address not in ipaddress.ip_network("::ffff:0:0/96")


@dataclass(frozen=True)
class Sample:
    sources: tuple[str, ...]
    ports: tuple[int, ...]
    host_addresses: dict  # host -> tuple of addresses


def _catalog_ports(variables: dict) -> set[int]:
    """Every cataloged port, and for a range its bounds, middle and outside neighbours."""
    ports = set()
    for spec in (variables.get("portguard_services") or {}).values():
        for part in spec["port"] if isinstance(spec["port"], list) else [spec["port"]]:
            low, _unused, high = str(part).partition("-")
            low, high = int(low), int(high or low)
            ports.update({low, high} if low == high else {low - 1, low, (low + high) // 2, high, high + 1})
    return {port for port in ports if 0 < port < 65536}


def build_sample(policy, variables: dict, hosts=HOSTS, seed: int = 2, extra_sources=HAND_PICKED) -> Sample:
    """Sources and ports that exercise the policy of ``hosts``: generated from it, not typed in.

    Sources: ``extra_sources``, every inventory host's addresses and, for
    every whitelist entry of the hosts (ingress and egress), its first and
    last address and the neighbours just outside. Ports: every cataloged
    port, the bounds of every entry and their outside neighbours, commonly
    exposed uncataloged ports and one random high port.
    """
    sources = {ipaddress.ip_address(a) for a in extra_sources}
    host_addresses = {}
    for host, settings in policy.hosts.items():
        host_addresses[host] = settings.addresses
        sources.update(ipaddress.ip_address(a) for a in settings.addresses)
    ports = _catalog_ports(variables) | set(UNCATALOGED)
    rng = random.Random(seed)
    ports.add(rng.randrange(40000, 50000))
    for host in hosts:
        hp = policy.host(host)
        for entry in (*hp.ingress, *hp.egress):
            cls = ipaddress.IPv4Address if entry.family == 4 else ipaddress.IPv6Address
            top = 2**32 - 1 if entry.family == 4 else 2**128 - 1
            for value in (entry.addr_lo - 1, entry.addr_lo, entry.addr_hi, entry.addr_hi + 1):
                if 0 <= value <= top:
                    sources.add(cls(value))
            ports.update(p for p in (entry.port_lo - 1, entry.port_lo, entry.port_hi, entry.port_hi + 1) if 0 < p < 65536)
    usable = sorted((a for a in sources if _usable(a)), key=lambda a: (a.version, a))
    return Sample(tuple(str(a) for a in usable), tuple(sorted(ports)), host_addresses)


def merge_samples(samples) -> Sample:
    """One sample holding every source and port of ``samples`` (for a lab that serves them all)."""
    samples = list(samples)
    sources = {ipaddress.ip_address(a) for sample in samples for a in sample.sources}
    ports = {port for sample in samples for port in sample.ports}
    host_addresses = {host: addresses for sample in samples for host, addresses in sample.host_addresses.items()}
    return Sample(tuple(str(a) for a in sorted(sources, key=lambda a: (a.version, a))), tuple(sorted(ports)),
                  host_addresses)


# The network ---------------------------------------------------------------------


class NetLab:
    """Two namespaces joined by a veth pair, with listeners on every sampled port in both."""

    def __init__(self, sample: Sample):
        tag = secrets.token_hex(3)
        self.sample = sample
        self.dst, self.src = f"pg-dst-{tag}", f"pg-src-{tag}"
        self.dst_if, self.src_if = f"pgd{tag}", f"pgs{tag}"
        self.listeners: list[subprocess.Popen] = []
        self.src_addresses: set[str] = set()
        self.dst_addresses: tuple[str, ...] = ()
        self.used_legacy = False

    # plumbing
    def ns(self, namespace: str, *command: str, input: str | None = None, check: bool = True):
        return run("ip", "netns", "exec", namespace, *command, input=input, check=check)

    def _batch(self, namespace: str, lines: list[str]) -> None:
        if lines:
            run("ip", "-n", namespace, "-batch", "-", input="\n".join(lines) + "\n")

    def _address_lines(self, verb: str, interface: str, addresses) -> list[str]:
        lines = []
        for address in addresses:
            if ":" in address:
                lines.append(f"address {verb} {address}/128 dev {interface}" + (" nodad" if verb == "add" else ""))
            else:
                lines.append(f"address {verb} {address}/32 dev {interface}")
        return lines

    def setup(self) -> None:
        for namespace in (self.dst, self.src):
            run("ip", "netns", "add", namespace)
            # No duplicate address detection, so addresses (link-local ones too)
            # are usable at once and no tentative-address traffic shows up later.
            for key in ("default", "all"):
                self.ns(namespace, "sysctl", "-qw", f"net.ipv6.conf.{key}.accept_dad=0")
            # The kernel rate-limits ICMP errors per peer (a burst of 6, then 1/s) and
            # in total; with hundreds of rejected probes from one source, "reject"
            # would then look like "drop". The ratemasks lift both limits, in our
            # namespaces only: the tests check what the ruleset answers, not the limiter.
            # (net.ipv6.icmp.ratemask is young; the per-peer ratelimit=0 is the fallback.)
            for setting in ("net.ipv4.icmp_ratemask=0", "net.ipv6.icmp.ratelimit=0"):
                self.ns(namespace, "sysctl", "-qw", setting)
            self.ns(namespace, "sysctl", "-qw", "net.ipv6.icmp.ratemask=", check=False)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "link", "add", self.dst_if, "netns", self.dst, "type", "veth",
            "peer", "name", self.src_if, "netns", self.src)
        for namespace, interface in ((self.dst, self.dst_if), (self.src, self.src_if)):
            self._batch(namespace, [f"link set {interface} up", *self._route_lines(interface)])
        self.src_addresses = set(self.sample.sources)
        self._batch(self.src, self._address_lines("add", self.src_if, sorted(self.src_addresses)))
        ports = [str(p) for p in self.sample.ports]
        for namespace in (self.dst, self.src):
            process = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, str(AGENT), "listen", *ports],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.listeners.append(process)
            if process.stdout.readline().strip() != "ready":
                raise AssertionError(f"listener in {namespace} did not start")

    def teardown(self) -> None:
        for process in self.listeners:
            try:
                process.stdin.close()
                process.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        for namespace in (self.dst, self.src):
            run("ip", "netns", "delete", namespace, check=False)

    # state of the host under test
    def become(self, host: str) -> tuple[str, ...]:
        """Give the dst namespace ``host``'s addresses (taking them off the prober); returns them."""
        wanted = tuple(self.sample.host_addresses[host])
        leaving = [a for a in self.dst_addresses if a not in wanted]
        taking = [a for a in wanted if a in self.src_addresses]
        giving_back = [a for a in leaving if a in self.sample.sources]
        self._batch(self.src, self._address_lines("del", self.src_if, taking)
                    + self._address_lines("add", self.src_if, giving_back))
        self.src_addresses = (self.src_addresses - set(taking)) | set(giving_back)
        # New addresses first: removing the last IPv4 address of a device removes its routes too.
        self._batch(self.dst, self._address_lines("add", self.dst_if, [a for a in wanted if a not in self.dst_addresses])
                    + self._address_lines("del", self.dst_if, leaving) + self._route_lines(self.dst_if))
        self.dst_addresses = wanted
        for namespace in (self.dst, self.src):
            run("ip", "-n", namespace, "neigh", "flush", "all")
        return wanted

    @staticmethod
    def _route_lines(interface: str) -> list[str]:
        return [f"route replace 0.0.0.0/0 dev {interface}", f"route replace ::/0 dev {interface}"]

    def sources(self) -> list[str]:
        """The prober's addresses (the host under test's own are not among them)."""
        return [a for a in self.sample.sources if a in self.src_addresses]

    def target(self, source: str) -> str:
        """The host under test's address of the family of ``source``."""
        family = 6 if ":" in source else 4
        return next(a for a in self.dst_addresses if (6 if ":" in a else 4) == family)

    def check_reachability(self) -> None:
        """With no ruleset, every port answers and every source is answered, both ways.

        So a probe blocked later is blocked by a filter. Listeners are bound to
        the wildcard address and routes are per family, so every port from one
        source per family, and every source on one port, covers the lab.
        """
        sources = self.sources()
        firsts = [next(s for s in sources if (":" in s) == v6) for v6 in (False, True)]
        cases = sorted(set(matrix(firsts, self.sample.ports) + matrix(sources, self.sample.ports[:1])))
        inbound = self.probe(self.src, [[self.target(s), port, proto, s] for s, port, proto in cases], 2.0, 2.0)
        outbound = self.probe(self.dst, [[s, port, proto, None] for s, port, proto in cases], 2.0, 2.0)
        failed = [f"{direction} {s} {port}/{proto}: {state}" for direction, states in (("in", inbound), ("out", outbound))
                  for (s, port, proto), state in zip(cases, states) if state != "open"]
        assert not failed, "the lab itself does not pass traffic:\n" + short(failed)

    def tcp_retransmits(self, namespace: str) -> int:
        """TCP segments retransmitted by ``namespace`` so far (its own SNMP counters)."""
        lines = [line.split() for line in self.ns(namespace, "cat", "/proc/net/snmp").stdout.splitlines()
                 if line.startswith("Tcp:")]
        return int(dict(zip(lines[0], lines[1]))["RetransSegs"])

    def reset_firewall(self) -> None:
        """Empty every table of the host under test (our namespace only), and its conntrack table."""
        self.ns(self.dst, "nft", "flush", "ruleset")
        if self.used_legacy:
            for tool in ("iptables-legacy", "ip6tables-legacy"):
                for table in ("filter", "nat"):
                    self.ns(self.dst, tool, "-w", "-t", table, "-F")
                    self.ns(self.dst, tool, "-w", "-t", table, "-X")
                self.ns(self.dst, tool, "-w", "-P", "FORWARD", "ACCEPT")
        if shutil.which("ipset"):
            self.ns(self.dst, "ipset", "destroy")  # every set of this namespace; no rule references them now
        self.flush_conntrack()

    def flush_conntrack(self) -> None:
        # Probes are new connections from fresh source ports anyway; this only
        # keeps one run's entries from outliving it.
        if shutil.which("conntrack"):
            for namespace in (self.dst, self.src):
                for family in ("ipv4", "ipv6"):
                    self.ns(namespace, "conntrack", "-F", "-f", family, check=False)

    def probe(self, namespace: str, probes: list, tcp_timeout: float = TCP_TIMEOUT, udp_timeout: float = UDP_TIMEOUT,
              parallel: int = 2500) -> list[str]:
        """Run ``[dst, port, proto, src or None]`` probes from ``namespace``; one state each (see nsagent.py)."""
        request = json.dumps({"tcp_timeout": tcp_timeout, "udp_timeout": udp_timeout, "parallel": parallel,
                              "probes": probes})
        result = self.ns(namespace, sys.executable, str(AGENT), "probe", input=request)
        return json.loads(result.stdout)


# Checking a matrix ----------------------------------------------------------------

ADMIN_PROHIBITED = {"EHOSTUNREACH", "EACCES"}


def matrix(sources, ports, protos=("tcp", "udp")):
    return [(source, port, proto) for source in sources for port in ports for proto in protos]


def compare(cases, states, expected) -> list[str]:
    """Readable lines for every case where what got through differs from the decision."""
    return [f"{source} -> {port}/{proto}: got {state}, catalog says {'allow' if want else 'deny'}"
            for (source, port, proto), state, want in zip(cases, states, expected) if (state == "open") != want]


def denied_states(cases, states, expected, deny: str) -> list[str]:
    """Denied probes that did not fail the way ``portguard_deny`` says (reject: admin-prohibited, drop: silence)."""
    wanted = ADMIN_PROHIBITED if deny == "reject" else {"timeout"}
    return [f"{source} -> {port}/{proto}: {state}, expected {' or '.join(sorted(wanted))}"
            for (source, port, proto), state, want in zip(cases, states, expected) if not want and state not in wanted]


def short(lines: list[str], limit: int = 25) -> str:
    more = f"\n... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


# Listings ----------------------------------------------------------------------

_COUNTER = re.compile(r"counter packets \d+ bytes \d+")
_NAMED_COUNTER_BODY = re.compile(r"^\t\tpackets \d+ bytes \d+\n", re.MULTILINE)


def normalize_nft(text: str) -> str:
    """An ``nft list`` output without counter values: anonymous ``counter`` and named counters' bodies."""
    return _NAMED_COUNTER_BODY.sub("", _COUNTER.sub("counter", text))


def rendered_table(text: str) -> str:
    """The table definition of a rendered ruleset, from ``table inet portguard {`` on."""
    start = text.index("table inet portguard {")
    return text[start:]
