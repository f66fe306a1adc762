"""Validation of single catalog values.

Each function takes a raw value and the path of its key, returns a normalized
value or raises a typed ``CatalogError`` naming that path. Nothing here trusts
a string: whatever reaches a rendered rule went through one of these.
"""

import datetime
import ipaddress
import re
import socket
import unicodedata

from ansible_collections.portguard.hardening.plugins.module_utils.core.errors import (
    AddressError,
    AmbiguousNameError,
    ExpiryError,
    PortError,
    ProtocolError,
    RenderError,
    SchemaError,
    UnsafeStringError,
)

MAX_TEXT_BYTES = 128
PROTOCOLS = ("tcp", "udp")

# Characters that end or escape a quoted string in nft or iptables-restore
# syntax, or that a shell would interpret if someone pasted a rule.
_FORBIDDEN_CHARS = frozenset("\"'\\`")
_FORBIDDEN_RE = re.compile("[" + re.escape("".join(sorted(_FORBIDDEN_CHARS))) + "]")
# Patterns end in \Z, not $: $ also matches before a trailing newline. re.ASCII: \d is 0-9
# only, not every Unicode digit that int() would read.
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}\Z", re.ASCII)
_V4_RE = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}(?:/(?:0|[1-9]\d?))?\Z", re.ASCII)
_V6_RE = re.compile(r"^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:/(?:0|[1-9]\d{0,2}))?\Z", re.ASCII)
_HOSTNAME_RE = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+\.?\Z", re.ASCII)
_PORT_RE = re.compile(r"^([1-9]\d{0,4})(?:-([1-9]\d{0,4}))?\Z", re.ASCII)
_LOG_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:= -]{1,29}\Z", re.ASCII)
# Inventory host and group names: the characters of catalog names, plus ':' (hosts named by an
# IPv6 address), a leading digit or '_' (hosts named by an IPv4 address, Ansible group names),
# up to the length of a DNS name. Dynamic inventories let other people choose these names.
_INVENTORY_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252}\Z", re.ASCII)
_INVENTORY_NAME_BAD_RE = re.compile(r"[^A-Za-z0-9_.:-]", re.ASCII)
# What a key may look like to be written bare in a path (portguard_networks.office).
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*\Z", re.ASCII)
_SHOWN_CHARS = 40  # of a value, in messages
# Never written into a rule, whatever validated it: what ends a quoted string or a line in nft,
# iptables-restore or ipset restore input (every C0/C1 control, the Unicode line separators).
_RULE_TEXT_UNSAFE_RE = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]')
# Fast path of parse_network (a catalog holds thousands of addresses; ipaddress is slow at that, see
# docs/benchmarks.md): only plain forms that the full checks below accept. IPv4 as the canonical dotted quad
# (what inet_ntoa writes back), IPv6 as hex groups of 1-4 ASCII digits with at most one "::", no embedded
# IPv4, no zone; prefixes without leading zeros. Anything else, and any value the fast path doubts, takes
# the full path, which also writes the error messages.
_V4_PREFIXES = {str(bits): bits for bits in range(33)}  # "0" to "32", no leading zeros
_HEXTETS = r"[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4})*"
_FAST_V6_RE = re.compile(rf"((?:{_HEXTETS})?(?:::(?:{_HEXTETS})?)?)(?:/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?")
_V4_HOST_BITS = [(1 << (32 - bits)) - 1 for bits in range(33)]
_V6_HOST_BITS = [(1 << (128 - bits)) - 1 for bits in range(129)]
_FROM_BYTES = int.from_bytes
_ATON = socket.inet_aton
_NTOA = socket.inet_ntoa


_TYPE_NAMES = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"), (dict, "a mapping"),
               ((list, tuple), "a list"))  # bool before int: a bool is an int too


def type_name(value) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), type(value).__name__)


def shown(value) -> str:
    """``value`` for a message: quoted, every non-printable character escaped, long values cut."""
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        text = repr(value[:_SHOWN_CHARS])
        return f"{text[:-1]}...{text[-1]}"
    return repr(value) if value is None or isinstance(value, (str, int, float)) else type_name(value)


def key_path(base: str, key) -> str:
    """The path of ``key`` under ``base``: ``base.key``, or ``base['key']`` (escaped) for any other key.

    A key comes from the inventory or the catalog before it is checked: written raw, a newline
    or an escape sequence in it would reach the error message, the terminal and the CI log.
    """
    if isinstance(key, str) and _PLAIN_KEY_RE.match(key):
        return f"{base}.{key}"
    return f"{base}[{shown(key)}]"


def check_inventory_name(value, kind: str) -> str:
    """An inventory host (``kind`` "host") or group name, which the rendered rulesets may carry.

    Refused names name the host or group (escaped) in the path ``hostvars[...]`` or ``groups[...]``.
    """
    if isinstance(value, str) and _INVENTORY_NAME_RE.match(value) and value not in ("any", "all"):
        return value  # the common case, without building a path
    path = key_path("hostvars" if kind == "host" else "groups", value)
    if not isinstance(value, str):
        raise SchemaError(path, f"an inventory {kind} name must be a string, got {type_name(value)}")
    if not _INVENTORY_NAME_RE.match(value):
        bad = _INVENTORY_NAME_BAD_RE.search(value)
        found = f" ({shown(bad.group())} is not one)" if bad else ""
        raise UnsafeStringError(path, f"inventory {kind} name refused: 1-253 letters, digits and '_', '.', ':', '-' "
                                      f"are allowed, the first not '.', ':' or '-'{found}")
    if value == "any" or (kind == "host" and value == "all"):
        meaning = "every address" if value == "any" else "every inventory host"
        raise AmbiguousNameError(path, f"an inventory {kind} cannot be named {value!r}: in flows it means {meaning}")
    return value


def check_host_target(value, path: str) -> str:
    """``ansible_host`` that is not an address: a DNS name or a container name, kept out of rules."""
    if not isinstance(value, str) or not _INVENTORY_NAME_RE.match(value):
        raise UnsafeStringError(path, f"expected an address or a host name of letters, digits, '_', '.', ':', '-', "
                                      f"got {shown(value)}")
    return value


def rule_text(value: str, what: str) -> str:
    """``value`` as it goes into a rendered rule, or ``RenderError``: the renderers' own last check.

    Everything the catalog and the inventory give is validated before; this keeps a
    policy built some other way from ending a quoted string or a line of the payload.
    """
    if not isinstance(value, str) or _RULE_TEXT_UNSAFE_RE.search(value):
        raise RenderError(f"refusing to render {what} {shown(value)}: a quote, backslash or control character "
                          "would change the rule")
    return value


def check_text(value, path: str) -> str:
    """A free-text value (purpose, owner, flow name) safe to quote in a rule."""
    if not isinstance(value, str):
        raise SchemaError(path, f"expected a string, got {type_name(value)}")
    if value.isascii() and value.isprintable() and not _FORBIDDEN_RE.search(value):
        # Printable ASCII holds no control or format character: the loop below would find nothing.
        if len(value) > MAX_TEXT_BYTES:
            raise UnsafeStringError(path, f"{len(value)} bytes after UTF-8 encoding; at most {MAX_TEXT_BYTES} are allowed")
        return value
    for char in value:
        if char in _FORBIDDEN_CHARS:
            raise UnsafeStringError(path, f"the character {char!r} is not allowed (it could end a quoted string in a rule)")
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            raise UnsafeStringError(path, f"control or format character U+{ord(char):04X} is not allowed")
    size = len(value.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise UnsafeStringError(path, f"{size} bytes after UTF-8 encoding; at most {MAX_TEXT_BYTES} are allowed")
    return value


def check_name(value, path: str, what: str) -> str:
    """A network or service name: a short identifier."""
    if not isinstance(value, str):
        raise SchemaError(path, f"a {what} name must be a string, got {type_name(value)}")
    check_text(value, path)
    if not _NAME_RE.match(value):
        raise SchemaError(
            path, f"{what} name {value!r} must start with a letter and use only letters, digits, '_', '.', '-' (64 at most)"
        )
    return value


def truncate_utf8(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """Cut ``text`` to at most ``limit`` bytes of UTF-8, never inside a character."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


def looks_like_address(value: str) -> bool:
    # Names have no '/' or ':' and are not all digits and dots, so such a value
    # (10/8, 10.0.0, fe80::1%eth0) is a malformed address, not an unknown name.
    return bool("/" in value or ":" in value or value.replace(".", "").isdigit() or _HOSTNAME_RE.match(value))


def parse_network(value, path: str, *, plain: bool = False) -> tuple[int, int, int]:
    """Parse a CIDR or an address into ``(family, first, last)`` as integers.

    ``plain`` refuses prefixes: the value must be one host address.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        hint = " (bare integers are not addresses: quote a dotted address)" if isinstance(value, int) else ""
        raise AddressError(path, f"expected an address as a string, got {type_name(value)}{hint}")
    fast = _parse_network_fast(value, plain) if _FAST_PATH else None
    if fast is not None:
        return fast
    return _parse_network_full(value, path, plain)


def _fast_v4(value: str, plain: bool):
    address, slash, prefix = value.partition("/")
    try:
        packed = _ATON(address)
    except (OSError, ValueError):
        return None
    # inet_aton also reads "10", "010" (octal), "1.2.3.4 junk": only the canonical dotted quad, the
    # one form ipaddress accepts, comes back unchanged from inet_ntoa.
    if _NTOA(packed) != address:
        return None
    first = _FROM_BYTES(packed, "big")
    if not slash:
        return 4, first, first
    bits = _V4_PREFIXES.get(prefix)
    if bits is None or plain:
        return None
    host_bits = _V4_HOST_BITS[bits]
    if first & host_bits:
        return None
    return 4, first, first | host_bits


def _fast_v6(value: str, plain: bool):
    match = _FAST_V6_RE.fullmatch(value)
    if match is None:
        return None
    address, prefix = match.groups()
    # The pattern allows one "::" at most; the number of groups is checked here, as
    # ipaddress does: eight without "::", at most seven with it ("::" stands for one or more).
    colons = address.count(":")
    if "::" in address:
        if colons - (address.startswith("::") or address.endswith("::")) > 7:
            return None
    elif colons != 7:
        return None
    try:
        first = _FROM_BYTES(socket.inet_pton(socket.AF_INET6, address), "big")
    except OSError:
        return None
    bits = 128 if prefix is None else int(prefix)
    if prefix is not None and plain:
        return None
    if bits >= 96 and first >> 32 == 0xFFFF:
        return None  # IPv4-mapped: refused below, with its message
    host_bits = _V6_HOST_BITS[bits]
    if first & host_bits:
        return None
    return 6, first, first | host_bits


def _parse_network_fast(value: str, plain: bool):
    """``parse_network`` of the common, valid forms, or None: then the full checks decide."""
    if ":" in value:
        return _fast_v6(value, plain) if "." not in value else None
    return _fast_v4(value, plain)


def _fast_path_agrees() -> bool:
    """The fast path leans on the C library's inet_aton/inet_pton: use it only where they read as ipaddress does."""
    samples = ("10.0.0.0/8", "192.168.255.254", "0.0.0.0/0", "255.255.255.255/32", "2001:db8::/32", "::/0", "::1",
               "fe80::/10", "2001:DB8:0:0:1:0:0:1", "1::", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "ffff:0:0:0:0:0:0:0/16")
    try:
        for sample in samples:
            network = ipaddress.ip_network(sample)
            expected = (network.version, int(network.network_address), int(network.broadcast_address))
            if _parse_network_fast(sample, False) != expected:
                return False
    except (OSError, ValueError, AttributeError):
        return False
    return True


_FAST_PATH = _fast_path_agrees()


def _parse_network_full(value: str, path: str, plain: bool) -> tuple[int, int, int]:
    if _HOSTNAME_RE.match(value):
        raise AddressError(path, f"{value!r} looks like a hostname; hostnames are not resolved, give addresses")
    if "%" in value:
        raise AddressError(path, f"{value!r}: zone indexes are not allowed")
    if _V4_RE.match(value):
        family = 4
    elif _V6_RE.match(value):
        family = 6
    else:
        raise AddressError(path, f"{value!r} is not an IPv4 or IPv6 address or network in CIDR form")
    if plain and "/" in value:
        raise AddressError(path, f"{value!r}: expected a single address, without a prefix length")
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        text = str(exc)
        if "host bits set" in text:
            raise AddressError(path, f"{value!r} has host bits set (did you mean {ipaddress.ip_network(value, strict=False)}?)") from None
        raise AddressError(path, f"{value!r} is not a valid IPv{family} address or network (leading zeros, octets over 255 and "
                                 f"prefixes over {32 if family == 4 else 128} are refused)") from None
    if network.version != family:
        raise AddressError(path, f"{value!r} is not a valid IPv{family} address or network")
    if family == 6 and network.prefixlen >= 96 and network.network_address.ipv4_mapped is not None:
        raise AddressError(path, f"{value!r} is an IPv4-mapped IPv6 address: write the IPv4 form instead")
    return family, int(network.network_address), int(network.broadcast_address)


def parse_ports(value, path: str) -> list[tuple[int, int]]:
    """A port, a ``"lo-hi"`` range, or a list of them, as sorted ranges."""
    if isinstance(value, list):
        if not value:
            raise PortError(path, "an empty list of ports")
        ranges = []
        for index, item in enumerate(value):
            if isinstance(item, list):
                raise PortError(f"{path}[{index}]", "nested lists of ports are not allowed")
            ranges.extend(parse_ports(item, f"{path}[{index}]"))
        return sorted(set(ranges))
    if isinstance(value, bool):
        raise PortError(path, f"expected a port number, got a boolean ({value})")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise PortError(path, f"port {value} is out of range 1-65535")
        return [(value, value)]
    if isinstance(value, float):
        raise PortError(path, f"expected a whole port number, got a float ({value})")
    if not isinstance(value, str):
        raise PortError(path, f"expected a port or a 'low-high' range, got {type_name(value)}")
    match = _PORT_RE.match(value)
    if not match:
        raise PortError(path, f"{value!r} is not a port or a 'low-high' range (one range per entry; use a list for several)")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    for port in (low, high):
        if port > 65535:
            raise PortError(path, f"port {port} is out of range 1-65535")
    if low > high:
        raise PortError(path, f"range {value!r} is reversed")
    return [(low, high)]


def parse_protocols(value, path: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ProtocolError(path, "an empty list of protocols")
    result = set()
    for index, item in enumerate(values):
        item_path = f"{path}[{index}]" if isinstance(value, list) else path
        if not isinstance(item, str) or isinstance(item, bool):
            raise ProtocolError(item_path, f"expected one of {', '.join(PROTOCOLS)}, got {type_name(item)} ({item!r})")
        if item.lower() not in PROTOCOLS:
            raise ProtocolError(item_path, f"unknown protocol {item!r}; expected one of {', '.join(PROTOCOLS)}")
        result.add(item.lower())
    return sorted(result)


def parse_expiry(value, path: str) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, str):
        try:
            return datetime.date.fromisoformat(value[:10]) if len(value) > 10 and value[10] in "T " else \
                datetime.date.fromisoformat(value)
        except ValueError:
            pass
    raise ExpiryError(path, f"expected a date (YYYY-MM-DD), got {type_name(value)} ({value!r})")


def parse_bool(value, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.lower() in ("true", "yes", "on")
    raise SchemaError(path, f"expected a boolean, got {type_name(value)} ({value!r})")


def parse_choice(value, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise SchemaError(path, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def parse_int(value, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SchemaError(path, f"expected an integer {low}-{high}, got {type_name(value)}")
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):  # "²" and "١٢" are digits to isdigit, not all to int
            raise SchemaError(path, f"expected an integer {low}-{high}, got {value!r}")
        value = int(value)
    if not low <= value <= high:
        raise SchemaError(path, f"{value} is out of range {low}-{high}")
    return value


def parse_log_prefix(value, path: str) -> str:
    if not isinstance(value, str) or not _LOG_PREFIX_RE.match(value):
        raise UnsafeStringError(path, "a log prefix is 1-29 characters of letters, digits, space and _ . : = -")
    return value
