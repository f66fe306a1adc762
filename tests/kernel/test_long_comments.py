"""Long labels converge: what the kernel keeps of a comment is what was rendered (issue 9, item 5).

One source allowed to five documented services joins its labels into one
iptables comment of more than 255 bytes (the per-source rules variant); four
flows allowing the same source and port join theirs into one set element
comment of more than 255 bytes (ipset variant) and 128 bytes (nftables). The
kernel keeps 255 bytes of an iptables comment (``xt_comment``: 256 with the
NUL), ipset refuses more than 255 and nft more than 128. The render is
applied in a namespace through the host module's own steps, on iptables-nft
and iptables-legacy, and the host module's comparison of live and rendered
must then find no difference; otherwise every run reports a change,
re-applies and arms a revert. Labels once in ASCII and once where the cut
falls inside a two-byte character. The same holds for a log prefix that
``iptables-save`` prints without quotes.
"""

import pytest
from kernel_backends import Nftables, scratch_namespace
from support.requirements import require
from test_iptables_host import host

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import render_iptables
from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def scratch():
    with scratch_namespace() as namespace:
        yield namespace


SERVICES = {  # name: (port, purpose)
    "billing-api": (8443, "Billing interface for partners: invoices, credit notes, statements"),
    "order-feed": (9000, "Order feed: partners push new orders and cancellations every minute"),
    "stock-sync": (9100, "Stock levels pulled by partner shops to show availability"),
    "returns": (9200, "Returns and refunds portal for partner customer service desks"),
    "sftp-drop": (2222, "Nightly SFTP drop of settlement files, checked by the finance team"),
}


def catalog(accent: bool, pad: int):
    """Five services for one source (a long multiport comment), four flows on one port (a long element comment).

    ``accent`` writes every "e" as "é" (two bytes). ``pad`` x-es move the cut by one byte each: they
    end the purpose that opens the rule's comment (the lowest port's) and the flow name that opens
    the element's (the first flow name of billing-api's labels).
    """
    def text(value, padded=False):
        return (value.replace("e", "é") if accent else value) + "x" * pad * padded

    first_port = min(SERVICES.values())[0]
    return {
        "portguard_networks": {"partners": ["198.51.100.0/24", "2001:db8:51::/48"]},
        "portguard_services": {name: {"port": port, "purpose": text(purpose, port == first_port), "owner": "partners-team"}
                               for name, (port, purpose) in SERVICES.items()},
        "portguard_flows": [{"name": text("partner-integrations"), "from": "partners", "to": "webservers",
                             "services": sorted(SERVICES)}] + [
            {"name": text(f"partner-billing-{what}", what == "audit-trail"), "from": "partners", "to": "webservers",
             "services": ["billing-api"]} for what in ("audit-trail", "reconciliation", "dispute-handling")],
        "portguard_deny_all": True,
    }


def longest_label(policy, ipset: bool) -> bytes:
    """The longest text the renderer cuts into one comment: a set element's labels, or one source's rule's."""
    if ipset:
        texts = ["; ".join(dict.fromkeys(label.text() for label in entry.labels)) for entry in policy.ingress]
    else:
        texts = ["; ".join(dict.fromkeys(label.text() for entry in sorted(policy.ingress, key=lambda e: e.port_lo)
                                         if entry.family == 4 for label in entry.labels))]
    return max((text.encode() for text in texts), key=len)


def compiled(accent: bool, ipset: bool, **host_settings):
    """web1's policy; accented, with the first padding that puts a two-byte character across byte 255."""
    hostvars = {"web1": {"portguard_addresses": ["10.0.1.1", "fd00::1:1"], **host_settings}}
    for pad in range(12):
        policy = compile_catalog(catalog(accent, pad), {"all": ["web1"], "webservers": ["web1"]}, hostvars).host("web1")
        if not accent or longest_label(policy, ipset)[254:256].decode("utf-8", "ignore") == "é":
            return policy
    raise AssertionError("no padding puts a two-byte character across the cut")


def comments(payload: str) -> list[bytes]:
    return [line.split('comment "', 1)[1].split('"', 1)[0].encode() for line in payload.splitlines()
            if 'comment "' in line]


@pytest.mark.parametrize("accent", [False, True], ids=["ascii", "two-byte-at-the-cut"])
@pytest.mark.parametrize("ipset", [False, True], ids=["rules", "ipset"])
@pytest.mark.parametrize("variant", ["default", "legacy"])
def test_long_comments_read_back_as_rendered(scratch, variant, ipset, accent):
    suffix = "-legacy" if variant == "legacy" else ""
    require(f"iptables{suffix}-restore", f"ip6tables{suffix}-restore", *(["ipset"] if ipset else []))
    policy = compiled(accent, ipset)
    ruleset = render_iptables(policy, ipset=ipset).as_dict()
    assert len(longest_label(policy, ipset)) > 256, "the labels must be longer than a comment holds"
    assert max(map(len, comments(ruleset["ipv4"] + ruleset["ipset"]))) >= 254

    scratch.reset_firewall()
    scratch.used_legacy |= variant == "legacy"
    host(scratch, suffix, "apply", ruleset)
    found = host(scratch, suffix, "compare", ruleset)
    assert found["equal"], f"the live rules differ from the rendered ones: {found}"


def test_long_nft_element_comments_read_back_as_rendered(scratch):
    require("nft")
    backend, policy = Nftables(), compiled(True, True)
    scratch.reset_firewall()
    backend.load(scratch, policy)
    assert backend.live(scratch) == backend.expected(policy)


@pytest.mark.parametrize("variant", ["default", "legacy"])
def test_bare_log_prefix_reads_back_as_rendered(scratch, variant):
    suffix = "-legacy" if variant == "legacy" else ""
    require(f"iptables{suffix}-restore", f"ip6tables{suffix}-restore")
    ruleset = render_iptables(compiled(False, False, portguard_log_prefix="pgdeny")).as_dict()
    scratch.reset_firewall()
    scratch.used_legacy |= variant == "legacy"
    host(scratch, suffix, "apply", ruleset)
    found = host(scratch, suffix, "compare", ruleset)
    assert found["equal"], f"the live rules differ from the rendered ones: {found}"
