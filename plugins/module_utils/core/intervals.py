"""Address and port intervals: sorted disjoint ``(lo, hi)`` integers, and their text as nft writes it."""

import bisect
import ipaddress
import operator
import socket

_LOW_HIGH = operator.itemgetter(0, 1)


def _v6_text_ipaddress(value: int) -> str:
    return str(ipaddress.IPv6Address(value))


def _v6_text_ntop(value: int) -> str:
    # ::/96 and ::ffff:0:0/96: inet_ntop writes an embedded IPv4 address there, ipaddress does not
    if value >> 32 in (0, 0xFFFF):
        return str(ipaddress.IPv6Address(value))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def _pick_v6_text():
    """inet_ntop is much faster than ipaddress (docs/benchmarks.md); use it only where it writes what ipaddress writes."""
    samples = ("2001:db8::1", "2001:db8:0:1:1:1:1:1", "1:0:0:2:0:0:0:3", "1:0:0:2:0:0:3:4", "fe80::", "::1:2:3:4:5",
               "2001:db8:ab:cd:ef:1234:5678:9abc", "1::", "0:1::", "ffff::ffff:1:2", "1:2:3:4:5:6:7:0")
    try:
        if all(_v6_text_ntop(int(ipaddress.IPv6Address(s))) == str(ipaddress.IPv6Address(s)) for s in samples):
            return _v6_text_ntop
    except (OSError, ValueError, AttributeError):
        pass
    return _v6_text_ipaddress


_v6_text = _pick_v6_text()


def address_text(family: int, value: int) -> str:
    """One address as ``ipaddress`` writes it (and as nft lists it), without building an address object."""
    if family == 4:
        return socket.inet_ntoa(value.to_bytes(4, "big"))
    return _v6_text(value)


_NTOA = socket.inet_ntoa


def interval_text(family: int, low: int, high: int) -> str:
    """An address range as nft writes it: an address, a CIDR or ``a-b``."""
    if low == high:  # most entries: one address, written here without further calls
        return _NTOA(low.to_bytes(4, "big")) if family == 4 else _v6_text(low)
    size = high - low + 1
    if size & (size - 1) == 0 and low % size == 0:
        bits = 32 if family == 4 else 128
        return f"{address_text(family, low)}/{bits - size.bit_length() + 1}"
    return f"{address_text(family, low)}-{address_text(family, high)}"


def interval_cidrs(family: int, low: int, high: int) -> list[str]:
    size = high - low + 1
    if size & (size - 1) == 0 and low % size == 0:  # one block (most entries): no summarizing needed
        bits = 32 if family == 4 else 128
        return [f"{address_text(family, low)}/{bits - size.bit_length() + 1}"]
    cls = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return [str(net) for net in ipaddress.summarize_address_range(cls(low), cls(high))]


def merge_intervals(intervals):
    """Union of ``(lo, hi, tag)`` intervals as sorted, disjoint ``(lo, hi, tags)``.

    Adjacent intervals are joined as well, so that the result is minimal.
    """
    merged = []
    for low, high, tag in sorted(intervals, key=_LOW_HIGH):
        if merged and low <= merged[-1][1] + 1:
            last = merged[-1]
            if high > last[1]:
                last[1] = high
            last[2].add(tag)
        else:
            merged.append([low, high, {tag}])
    return merged


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Union of ``(lo, hi)`` ranges as sorted, disjoint ``(lo, hi)``; adjacent ones are joined."""
    merged = []
    last_lo = last_hi = None
    for low, high in sorted(ranges):
        if last_hi is not None and low <= last_hi + 1:
            if high > last_hi:
                last_hi = high
        else:
            if last_hi is not None:
                merged.append((last_lo, last_hi))
            last_lo, last_hi = low, high
    if last_hi is not None:
        merged.append((last_lo, last_hi))
    return merged


def address_in(intervals: list[tuple[int, int]], starts: list[int], value: int) -> bool:
    """Is ``value`` inside sorted disjoint ``intervals`` (``starts`` are their lows)?"""
    index = bisect.bisect_right(starts, value) - 1
    return index >= 0 and intervals[index][1] >= value


def intervals_within(inner, outer) -> bool:
    """Is every interval of ``inner`` inside one of the sorted disjoint ``outer``?"""
    starts = [lo for lo, _unused in outer]
    for low, high in inner:
        index = bisect.bisect_right(starts, low) - 1
        if index < 0 or outer[index][1] < high:
            return False
    return True
