"""No log flood under a port scan: the rendered log rule writes at most burst + rate x minutes lines.

A throwaway pair of network namespaces (``pgr-scan-src-*`` / ``pgr-scan-dst-*``, 172.30.112.0/24 on a veth
pair, never the machine's own namespace) gets the ruleset the collection renders for a host with
``portguard_log_rate: 10`` and ``portguard_log_burst: 5``. The source then sends one SYN to every TCP port
(1-65535), sweep after sweep for 13 seconds. The kernel writes the log of a namespace other than the machine's only with
``net.netfilter.nf_log_all_netns=1``: the test sets it and restores the previous value.

Measured per backend: the deny counter counts every SYN, the log rule's own counter and the lines
found in /dev/kmsg (read with the report's reader, filtered on the destination address) are equal, and at
most ``burst + ceil(rate x minutes)`` (plus one for a refill at the boundary).
"""

import contextlib
import math
import secrets
import subprocess
import time

import pytest
from support.catalogs import ssh_only_catalog
from support.kernel_log import NF_LOG_ALL_NETNS, namespaces_log
from support.requirements import require

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import (
    parse_iptables_save,
    render_iptables,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import (
    parse_nft_json,
    render_nftables,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.host import activity

pytestmark = [pytest.mark.kernel]

SRC, DST = "172.30.112.1", "172.30.112.2"
RATE, BURST = 10, 5
CATALOG = ssh_only_catalog(to="target", admin="192.0.2.0/24")
HOSTVARS = {"target": {"portguard_addresses": [DST], "portguard_log_rate": RATE, "portguard_log_burst": BURST,
                       "portguard_deny": "drop", "portguard_log_prefix": "pgr-scan: "}}

# Full sweeps of every TCP port until SCAN_SECONDS have passed (long enough for the limit to refill twice).
# One SYN per port: a non-blocking connect sends it, closing the socket in SYN-SENT sends nothing more.
SCAN_SECONDS = 13
SCANNER = r"""
import socket, sys, time
dst, duration = sys.argv[1], float(sys.argv[2])
start, sent = time.monotonic(), 0
while sent == 0 or time.monotonic() - start < duration:
    for port in range(1, 65536):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect((dst, port))
        except BlockingIOError:
            pass
        sock.close()
        sent += 1
print(sent, time.monotonic() - start)
"""


def run(*argv, input=None):
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


@contextlib.contextmanager
def namespaces():
    tag = secrets.token_hex(3)
    src, dst = f"pgr-scan-src-{tag}", f"pgr-scan-dst-{tag}"
    try:
        run("ip", "netns", "add", src)
        run("ip", "netns", "add", dst)
        run("ip", "link", "add", f"pgs{tag}", "netns", src, "type", "veth", "peer", "name", f"pgd{tag}", "netns", dst)
        for ns, link, address in ((src, f"pgs{tag}", SRC), (dst, f"pgd{tag}", DST)):
            run("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", link)
            run("ip", "-n", ns, "link", "set", link, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        yield src, dst
    finally:
        for ns in (src, dst):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def load(backend, ns, policy):
    if backend == "nftables":
        run("ip", "netns", "exec", ns, "nft", "-f", "-", input=render_nftables(policy))
        return
    rules = render_iptables(policy)
    for tool, payload in (("iptables", rules.ipv4), ("ip6tables", rules.ipv6)):
        run("ip", "netns", "exec", ns, f"{tool}-restore", "--noflush", input=payload)
        for builtin, chain in rules.jumps:
            run("ip", "netns", "exec", ns, tool, "-I", builtin, "1", "-j", chain)


def counters(backend, ns):
    if backend == "nftables":
        return parse_nft_json(run("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "portguard"))
    return parse_iptables_save({"ipv4": run("ip", "netns", "exec", ns, "iptables-save", "-c", "-t", "filter")})


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_port_scan_writes_at_most_burst_plus_rate_lines(backend):
    require("ip", "nft" if backend == "nftables" else "iptables-restore")
    if not NF_LOG_ALL_NETNS.exists():
        require("nf_log_all_netns sysctl")
    policy = compile_catalog(CATALOG, {"all": ["target"]}, HOSTVARS).host("target")
    prefix = policy.settings.log_prefix
    with namespaces() as (src, dst), namespaces_log():
        load(backend, dst, policy)
        cursor = activity.read_kmsg(prefix, [DST])["cursor"]
        started = time.monotonic()
        sent, seconds = run("ip", "netns", "exec", src, "python3", "-c", SCANNER, DST, str(SCAN_SECONDS)).split()
        sent, seconds = int(sent), float(seconds)
        time.sleep(0.5)  # let the last lines reach the ring buffer
        elapsed = time.monotonic() - started
        found = activity.read_kmsg(prefix, [DST], since=cursor)
        seen = counters(backend, dst)
    bound = BURST + math.ceil(RATE * elapsed / 60) + 1
    print(f"{backend}: {sent} SYNs ({sent // 65535} sweeps of 1-65535) in {seconds:.1f} s; denied "
          f"{seen['denied_in']}, log rule {seen['logged_in']}, lines {found['lines']}, bound {bound}")
    assert sent % 65535 == 0 and sent >= 65535
    assert seen["denied_in"] == sent
    assert found["lines"] == seen["logged_in"], "every line the limit let through reached the kernel log"
    # the burst at once, then the rate refills (10/minute: one more line every 6 s)
    assert BURST + 1 <= found["lines"] <= bound
    assert {(g["src"], g["proto"]) for g in found["groups"]} == {(SRC, "tcp")}
