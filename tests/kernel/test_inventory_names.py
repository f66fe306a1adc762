"""Hostile inventory names never reach a kernel (issue 9, item 1).

Ansible's YAML inventory accepts a host named
``"web1\\nflush ruleset\\ntable inet pwn {...}\\n#"`` and a group named
``"ops\\nflush ruleset\\n#"``; dynamic inventories let other people choose such
names. Read through ``ansible-inventory`` like a play reads them, the
inventory goes through what the firewall action and the ``ruleset`` filter do
(compile, then render every host, both backends), and whatever was rendered is
loaded into a namespace that holds a foreign table. The compile must refuse
the whole play, naming the host or group (escaped), before any host is
rendered; the namespace must hold the foreign table, untouched, and nothing else.
"""

import importlib.util
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError
from kernel_backends import FOREIGN_NFT, scratch_namespace
from support.requirements import require

from ansible_collections.portguard.hardening.plugins.filter.portguard import ruleset
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import CatalogError

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def scratch():
    with scratch_namespace() as namespace:
        yield namespace


# load_inventory of tests/conftest.py (a conftest module cannot be imported by name from here).
_SPEC = importlib.util.spec_from_file_location("portguard_tests_root", Path(__file__).parents[1] / "conftest.py")
_ROOT = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_ROOT)

# The name, with the ';' that nft 1.0.6 wants between the closing braces on one line.
HOSTILE_HOST = "web1\nflush ruleset\ntable inet pwn { chain c { type filter hook input priority -500; policy accept; }; }\n#"
HOSTILE_GROUP = "ops\nflush ruleset\n#"
# The paths the refusals name them by: escaped (and the long one shortened).
HOST_PATH = "hostvars['web1\\nflush ruleset\\ntable inet pwn { chai...']: inventory host name"
GROUP_PATH = "groups['ops\\nflush ruleset\\n#']: inventory group name"
CATALOG = {
    "portguard_networks": {"office": ["10.20.0.0/16", "2001:db8:20::/48"], "admin_vpn": ["10.99.0.0/24"]},
    "portguard_services": {"ssh": {"port": 22, "purpose": "Remote administration", "owner": "platform"},
                           "https": {"port": 443, "purpose": "Public web traffic", "owner": "web"}},
    "portguard_flows": [{"name": "office-web", "from": "office", "to": "webservers", "services": ["https"]},
                        {"from": "webservers", "to": "dbservers", "services": ["ssh"]}],
    "portguard_management": {"from": "admin_vpn", "services": ["ssh"]},
}


def inventory(webservers, groups=None):
    return {"all": {"vars": CATALOG, "children": {
        "webservers": {"hosts": {name: {"portguard_addresses": [address]} for name, address in webservers.items()}},
        "dbservers": {"hosts": {"db1": {"portguard_addresses": ["10.0.2.1"]}}},
        **(groups or {})}}}


CASES = {
    # in a group that flows name
    "host-in-flows": (inventory({HOSTILE_HOST: "10.0.1.1", "web2": "10.0.1.2"}), HOST_PATH),
    # named by no flow: the play still renders and applies every host, this one included
    "host-in-no-flow": (inventory({"web2": "10.0.1.2"}, {"spare": {"hosts": {HOSTILE_HOST: {}}}}), HOST_PATH),
    # only a group name is bad, every host name is fine: the whole play is refused all the same
    "group": (inventory({"web2": "10.0.1.2"}, {HOSTILE_GROUP: {"hosts": {"db1": {}}}}), GROUP_PATH),
}


def tables(scratch) -> list[str]:
    return [line for line in scratch.ns(scratch.dst, "nft", "list", "tables").stdout.splitlines() if line]


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_names_are_refused_before_any_host_is_rendered(scratch, tmp_path, case):
    require("iptables-nft-restore", "ansible-inventory", root=True)
    data, path = CASES[case]
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(data))
    variables, groups, hostvars = _ROOT.load_inventory(tmp_path / "hosts.yml")
    assert HOSTILE_HOST in groups["all"] or HOSTILE_GROUP in groups, "Ansible changed the name on its way in"
    scratch.reset_firewall()
    scratch.ns(scratch.dst, "nft", "-f", "-", input=FOREIGN_NFT)
    foreign = scratch.ns(scratch.dst, "nft", "list", "ruleset").stdout

    rendered, refusals = [], []
    try:  # what the firewall action does for each host of the play
        policy = compile_catalog(variables, groups, hostvars)
        for host in groups["all"]:
            rendered += [("nft", render_nftables(policy.host(host))),
                         ("iptables-nft-restore", render_iptables(policy.host(host)).ipv4)]
    except CatalogError as exc:
        refusals.append(str(exc))
    for host in groups["all"]:  # what the ruleset filter does in a template or a debug task
        try:
            rendered.append(("nft", ruleset(hostvars, groups, host)))
        except AnsibleFilterError as exc:
            refusals.append(str(exc))
    for tool, payload in rendered:
        scratch.ns(scratch.dst, tool, "-f" if tool == "nft" else "--noflush", *(["-"] if tool == "nft" else []),
                   input=payload, check=False)

    assert scratch.ns(scratch.dst, "nft", "list", "ruleset").stdout == foreign, \
        f"a ruleset rendered from a hostile inventory name changed the kernel: {tables(scratch)}"
    assert not rendered, "a ruleset was rendered for some host although the inventory is refused"
    assert len(refusals) == 1 + len(groups["all"]), "the compile and the filter, for every host, must refuse"
    for refusal in refusals:
        assert path in refusal, refusal
        assert "\n" not in refusal, "the refusal itself carries the raw name"
