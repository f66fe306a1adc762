"""Inventory names on every path that reads the inventory, and the renderers' own last check.

The compiler's refusals are the data-driven cases of validation_cases.yml (the
kernel test tests/kernel/test_inventory_names.py loads what a hostile inventory
would render). Here: the lint and the filters refuse the same names the same
way, and the renderers refuse a policy built around validation rather than
write a newline or a quote from a name into a payload.
"""

import pytest
from ansible.errors import AnsibleFilterError

from ansible_collections.portguard.hardening.plugins.filter import lint as lint_filter
from ansible_collections.portguard.hardening.plugins.filter import portguard as filters
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import render_nftables
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.inventory import HostSettings
from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import RenderError
from ansible_collections.portguard.hardening.plugins.module_utils.core.lint import lint_catalog, lint_report
from ansible_collections.portguard.hardening.plugins.module_utils.core.policy import (
    Entry,
    HostPolicy,
    Label,
)

HOSTILE = "web9\nflush ruleset\n#"
CATALOG = {
    "portguard_networks": {"office": ["10.20.0.0/16"], "admin_vpn": ["10.99.0.0/24"]},
    "portguard_services": {"ssh": {"port": 22, "purpose": "Remote administration", "owner": "platform"},
                           "https": {"port": 443, "purpose": "Public web traffic", "owner": "web"}},
    "portguard_flows": [{"name": "office-web", "from": "office", "to": "webservers", "services": ["https"]},
                        {"name": "broken", "from": "office", "to": "webservers", "services": ["nosuch"]}],
    "portguard_management": {"from": "admin_vpn", "services": ["ssh"]},
}


def inventory(extra_groups=None, extra_hosts=()):
    groups = {"all": ["web1", *extra_hosts], "webservers": ["web1"], **(extra_groups or {})}
    hostvars = {"web1": {"portguard_addresses": ["10.0.1.1"], **CATALOG}}
    hostvars.update({host: {**CATALOG} for host in extra_hosts})
    return groups, hostvars


@pytest.mark.parametrize(("groups", "hostvars", "path"), [
    (*inventory(extra_hosts=[HOSTILE]), "hostvars['web9\\nflush ruleset\\n#']"),
    (*inventory({"ops\u202e": ["web1"]}), "groups['ops\\u202e']"),
], ids=["host", "group"])
def test_lint_refuses_inventory_names_like_the_compiler_and_lints_the_rest(groups, hostvars, path):
    findings = lint_catalog(CATALOG, groups, hostvars)
    errors = [(f.code, f.path) for f in findings if f.level == "error"]
    assert ("unsafe-string", path) in errors
    assert ("unknown-name", "portguard_flows[1].services[0]") in errors, "the rest of the catalog was not linted"
    report = lint_filter.lint(hostvars, groups)
    assert not report["ok"]
    assert any(line.startswith(f"ERROR unsafe-string {path}: inventory ") for line in report["lines"])
    assert all(line.isprintable() for line in lint_report(findings)["lines"])


@pytest.mark.parametrize("call", [
    lambda h, g: filters.ruleset(h, g, "web1"),
    lambda h, g: filters.ruleset(h, g, "web1", backend="iptables"),
    lambda h, g: filters.allowed(h, g, "10.20.0.1", "web1", 443),
    filters.summary,
    lambda h, g: filters.probe_plan(h, g, ["web1"]),
], ids=["ruleset", "ruleset-iptables", "allowed", "summary", "probe_plan"])
def test_filters_refuse_a_hostile_name_even_for_other_hosts(call):
    groups, hostvars = inventory(extra_hosts=[HOSTILE])
    with pytest.raises(AnsibleFilterError) as info:
        call(hostvars, groups)
    assert "hostvars['web9\\nflush ruleset\\n#']: inventory host name refused" in str(info.value)
    assert "\n" not in str(info.value)


def policy(host="web1", flow="office-web", prefix="portguard-deny: "):
    label = Label(flow, "https", "Public web traffic", "web")
    entry = Entry(4, "tcp", 0x0A140000, 0x0A14FFFF, 443, 443, (label,))
    return HostPolicy(host, HostSettings(log_prefix=prefix, addresses=("10.0.1.1",)), (entry,))


RENDERERS = {"nftables": render_nftables, "iptables": render_iptables,
             "iptables-ipset": lambda p: render_iptables(p, ipset=True)}


@pytest.mark.parametrize("renderer", list(RENDERERS))
@pytest.mark.parametrize("hostile", [
    {"host": HOSTILE}, {"host": 'web1"'}, {"flow": "web\nflush ruleset"}, {"flow": 'web" accept'},
    {"flow": "web\\"}, {"flow": "web\u2028x"}, {"flow": "web\x85"}, {"prefix": 'deny" accept #'},
], ids=repr)
def test_renderers_refuse_a_quote_or_a_line_break_from_any_name(renderer, hostile):
    with pytest.raises(RenderError):
        RENDERERS[renderer](policy(**hostile))


@pytest.mark.parametrize("renderer", list(RENDERERS))
def test_renderers_keep_harmless_punctuation_and_unicode(renderer):
    rendered = RENDERERS[renderer](policy(flow="café { } ; # $x @s — \u202b"))
    text = rendered if isinstance(rendered, str) else rendered.ipv4 + rendered.ipset
    assert "café { } ; # $x @s — \u202b/https" in text
