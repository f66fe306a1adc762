"""Every name the renderers write and the host or the counter reader must find again, defined once.

Pure: no I/O. The renderers (nftables.py, iptables.py, ipset.py) write these names, the host side
(host/firewall/) finds, replaces, persists and removes what carries them, and the activity reader
finds the counters under them. Readers look names up here (SET_KEYS, CHAIN_DIRECTIONS); they never
guess a direction or family back from a name.
"""

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import PortguardError
from ansible_collections.portguard.hardening.plugins.module_utils.core.validate import MAX_TEXT_BYTES

DIRECTIONS = ("in", "out")
FAMILIES = (4, 6)
PROTOCOLS = ("tcp", "udp")

# nftables: one table; its base chains, named counters and per-(direction, family, proto) sets.
NFT_FAMILY = "inet"
NFT_TABLE = "portguard"
NFT_TABLE_REF = f"{NFT_FAMILY} {NFT_TABLE}"  # as nft commands and listings name it
NFT_CHAINS = {"in": "input", "out": "output"}  # base chain of a direction, hooked where it is named
NFT_ADDRESS_TYPES = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}


def nft_set_name(direction: str, family: int, proto: str) -> str:
    return f"{direction}{family}_{proto}"


NFT_SET_KEYS = {nft_set_name(d, f, p): (d, f, p) for d in DIRECTIONS for f in FAMILIES for p in PROTOCOLS}
NFT_CHAIN_DIRECTIONS = {chain: direction for direction, chain in NFT_CHAINS.items()}


def denied_counter(direction: str) -> str:
    """The named counter of a direction's default verdict (nftables), the comment of its rule (iptables)."""
    return f"denied_{direction}"


DENIED_COUNTERS = {denied_counter(d): d for d in DIRECTIONS}


def default_verdict(settings) -> str:
    """What both renderers do with a packet the whitelist does not match: accept, drop or reject."""
    if settings.mode == "audit":
        return "accept"
    return "drop" if settings.deny == "drop" else "reject"


# iptables: a chain of our own per direction in the filter table, jumped to from a built-in chain.
IPT_TABLE = "filter"
IPT_CHAINS = {"in": "PORTGUARD-IN", "out": "PORTGUARD-OUT"}
IPT_BUILTINS = {"in": "INPUT", "out": "OUTPUT"}
IPT_CHAIN_DIRECTIONS = {chain: direction for direction, chain in IPT_CHAINS.items()}
IPT_JUMPS = {IPT_CHAINS[d]: IPT_BUILTINS[d] for d in DIRECTIONS}  # our chain -> the built-in that jumps to it
IPT_FAMILIES = {4: "ipv4", 6: "ipv6"}  # the key of a family's payload (ruleset.ipv4, iptables-save per family)
IPT_TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "LOG", "NFLOG"}  # a payload jumping elsewhere is refused

# ipset (iptables backend): one set per (direction, family).
SET_TYPE = "hash:net,port"
SET_FAMILIES = {4: "inet", 6: "inet6"}
SET_SWAP_SUFFIX = "-new"  # the payload fills <set>-new, then swaps it with <set>


def set_name(direction: str, family: int) -> str:
    return f"portguard-{direction}{family}"


SET_KEYS = {set_name(d, f): (d, f) for d in DIRECTIONS for f in FAMILIES}  # the inverse of set_name
SETS = {name: SET_FAMILIES[family] for name, (_direction, family) in SET_KEYS.items()}  # name -> ipset family

# Byte limits of comments, as each tool enforces them.
NFT_COMMENT_BYTES = MAX_TEXT_BYTES  # nft refuses a longer comment ("comment too long, 128 characters maximum")
# xt_comment holds 256 bytes with the terminating NUL: iptables keeps 255 and cuts the rest (inside a
# character, too), so a longer rendered comment would differ from the live one on every run.
IPT_COMMENT_BYTES = 255
SET_COMMENT_BYTES = 255  # ipset refuses a longer element comment ("longer than the maximum allowed 255")

# The host: run state (gone at reboot), persisted files, boot unit and loader.
STATE_DIR = "/run/portguard"
PERSIST_DIR = "/etc/portguard"
UNIT_NAME = "portguard.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
LOADER_PATH = "/usr/local/sbin/portguard-load"
NFT_PERSIST_FILES = ("ruleset.nft", "fallback.nft")
IPT_PERSIST_FILES = ("ruleset.ipset", "sets", "ruleset.ipv4", "ruleset.ipv6", "fallback.ipv4", "fallback.ipv6",
                     "jumps")
PERSIST_FILES = NFT_PERSIST_FILES + IPT_PERSIST_FILES  # state absent removes these and nothing else
# Their presence says a confirmed ruleset was persisted (one per backend).
PERSIST_EVIDENCE = ("ruleset.nft", "jumps")


class PayloadRefused(PortguardError):
    """A ruleset payload that does more than write portguard's own table, chains or sets."""
