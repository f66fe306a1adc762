"""The iptables backend's host steps in a real kernel: revert, variant switches, removal.

What the firewall module does on a host (``host/firewall/backends.py``, ``IptablesBackend``: validate, apply
steps, live/compare, restore steps), run inside the namespace under test, through
iptables-nft and iptables-legacy: a snapshot taken before a change is restored exactly, sets
and counters included; moving from ipsets to per-source rules destroys the sets, turning egress
off removes ``PORTGUARD-OUT`` and its sets; removal leaves nothing of ours; foreign rules and a
foreign ipset stay byte-identical throughout; after the revert, packets follow the catalog.
"""

import json
import sys

import pytest
from kernel_backends import Iptables, check_traffic

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables

pytestmark = pytest.mark.kernel

HOST = "web1"
AGENT = r"""
import json, sys
request = json.load(sys.stdin)
sys.path[:0] = request["sys_path"]
from ansible_collections.portguard.hardening.plugins.module_utils.host.firewall.backends import IptablesBackend
from ansible_collections.portguard.hardening.plugins.module_utils.host.run import run_steps
backend = IptablesBackend(request["suffix"])
op, out = request["op"], None
if op == "apply":
    backend.validate(request["ruleset"])
    run_steps(backend.apply_steps(request["ruleset"]))
elif op == "compare":
    before, after = backend.compare(request["ruleset"])
    out = {"live_only": sorted(set(before) - set(after)), "rendered_only": sorted(set(after) - set(before)),
           "equal": before == after}
elif op == "snapshot":
    with open(request["path"], "w") as handle:
        json.dump(backend.restore_steps(backend.live()), handle)
elif op == "revert":
    with open(request["path"]) as handle:
        run_steps(json.load(handle))
elif op == "absent":
    run_steps(backend.restore_steps(None))
    out = backend.live()
print(json.dumps(out))
"""


def host(lab, suffix, op, ruleset=None, path=None):
    request = {"op": op, "suffix": suffix, "ruleset": ruleset, "path": path, "sys_path": sys.path}
    return json.loads(lab.ns(lab.dst, sys.executable, "-c", AGENT, input=json.dumps(request)).stdout)


def our_sets(lab):
    return sorted(name for name in lab.ns(lab.dst, "ipset", "list", "-n").stdout.split() if name.startswith("portguard-"))


@pytest.mark.parametrize("variant", ["default", "legacy"])
def test_revert_switches_and_removal(netlab, compile_example, tmp_path, variant):
    backend = Iptables(variant)
    suffix = "-legacy" if variant == "legacy" else ""
    policy = compile_example()
    sets = render_iptables(policy.host(HOST), ipset=True).as_dict()
    rules = render_iptables(policy.host(HOST)).as_dict()
    egress = render_iptables(compile_example(**{HOST: {"portguard_egress": True}}).host(HOST), ipset=True).as_dict()
    lab = netlab
    lab.reset_firewall()
    lab.become(HOST)
    backend.create_foreign(lab)
    foreign = backend.foreign(lab, strip_counters=True)  # probes below pass the foreign nat jump

    def converged(ruleset):
        host(lab, suffix, "apply", ruleset)
        found = host(lab, suffix, "compare", ruleset)
        assert found["equal"], f"live differs from rendered: {found}"

    converged(sets)
    assert our_sets(lab) == ["portguard-in4", "portguard-in6"]
    check_traffic(lab, backend, policy, HOST)  # set counters are now non-zero: the revert must keep them
    counted = sorted(lab.ns(lab.dst, "ipset", "save", "portguard-in4").stdout.splitlines())
    assert any(" packets 0 " not in line for line in counted if line.startswith("add "))
    snapshot = str(tmp_path / "restore.json")
    host(lab, suffix, "snapshot", path=snapshot)

    converged(rules)  # ipset -> per-source rules: the sets are gone
    assert our_sets(lab) == []
    host(lab, suffix, "revert", path=snapshot)
    assert host(lab, suffix, "compare", sets)["equal"]
    assert sorted(lab.ns(lab.dst, "ipset", "save", "portguard-in4").stdout.splitlines()) == counted, \
        "the revert did not restore the sets as they were, counters included"
    check_traffic(lab, backend, policy, HOST)

    converged(egress)  # egress on: out sets and chain; then off again: both go
    assert our_sets(lab) == ["portguard-in4", "portguard-in6", "portguard-out4", "portguard-out6"]
    converged(sets)
    assert our_sets(lab) == ["portguard-in4", "portguard-in6"]
    assert backend.copies(lab) == backend.expected_copies(policy.host(HOST))

    assert host(lab, suffix, "absent") is None
    assert our_sets(lab) == []
    assert backend.foreign(lab, strip_counters=True) == foreign, "foreign rules or sets changed"
