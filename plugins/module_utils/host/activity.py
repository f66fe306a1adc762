"""Read what our table or chains saw: deny counters, per-entry hits, and the log lines of denied packets.

Host side: this file reads; the parsers of each backend's counters live with that backend
(core/backends/), the kernel log's parsers here. The kernel log is read from ``/dev/kmsg``
(sequence numbers make a cursor, so a later run reads only what is new), or
from journald's kernel log where ``/dev/kmsg`` is not readable. A container
usually has neither, and the kernel drops the log of a non-init network
namespace unless ``net.netfilter.nf_log_all_netns=1`` on the machine: such
hosts are reported from their counters alone.

Kernel records carry text that users choose (a segfault line ends with the name
of the crashing file; root may write records to /dev/kmsg, which the kernel files
under the user facility): a record counts only when it comes from the kernel
facility and its message starts with our prefix.
"""

import errno
import ipaddress
import json
import os
import re
import shutil
import time

from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.contract import (
    IPT_TABLE,
    NFT_TABLE_REF,
    SET_KEYS,
    STATE_DIR,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.ipset import parse_ipset_save
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.iptables import (
    holds_ours,
    parse_iptables_save,
)
from ansible_collections.portguard.hardening.plugins.module_utils.core.backends.nftables import parse_nft_json
from ansible_collections.portguard.hardening.plugins.module_utils.host.run import run

KERNEL_FACILITY = 0
KMSG = "/dev/kmsg"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
_FIELD_RE = re.compile(r"\b(IN|OUT|SRC|DST|PROTO|SPT|DPT|TYPE|CODE)=(\S*)")


def _ipset_save_ours() -> str:
    if not shutil.which("ipset"):
        return ""
    names = run(["ipset", "list", "-n"], check=False).stdout.split()
    return "".join(run(["ipset", "save", name], check=False).stdout for name in sorted(names) if name in SET_KEYS)


def read_counters() -> dict:
    """The counters of whichever backend holds our rules; ``backend: none`` when neither does."""
    if shutil.which("nft"):
        proc = run(["nft", "-j", "list", "table", *NFT_TABLE_REF.split()], check=False)
        if proc.returncode == 0:
            return parse_nft_json(proc.stdout)
    if shutil.which("iptables-save"):
        texts = {family: run([tool, "-c", "-t", IPT_TABLE], check=False).stdout
                 for tool, family in (("iptables-save", "ipv4"), ("ip6tables-save", "ipv6"))}
        if any(holds_ours(text) for text in texts.values()):
            result = parse_iptables_save(texts)
            # the ipset variant keeps its whitelist, and the per-entry counters, in sets
            result["elements"] += parse_ipset_save(_ipset_save_ours())
            return result
    return {"backend": "none", "denied_in": None, "denied_out": None, "logged_in": None, "logged_out": None,
            "elements": []}


# The kernel log ----------------------------------------------------------------------------


def parse_log_message(message: str, prefix: str):
    """One ``LOG``/``log`` line of a denied packet, or None when it is not ours.

    The kernel writes ``<prefix>IN=eth0 OUT= MAC=... SRC=... DST=... ... PROTO=TCP SPT=.. DPT=..``
    (IPv6 addresses fully expanded); ICMP lines carry TYPE and CODE instead of ports. The prefix
    anywhere else in a line is text someone else wrote.
    """
    if not message.startswith(prefix):
        return None
    fields = {}
    for key, value in _FIELD_RE.findall(message[len(prefix):]):
        fields.setdefault(key, value)  # the first LEN-like repeat wins; the IP header comes first
    if "SRC" not in fields or "DST" not in fields or "PROTO" not in fields:
        return None
    try:
        src, dst = str(ipaddress.ip_address(fields["SRC"])), str(ipaddress.ip_address(fields["DST"]))
    except ValueError:
        return None
    event = {"direction": "in" if fields.get("IN") else "out", "src": src, "dst": dst,
             "proto": fields["PROTO"].lower(), "port": None}
    if "DPT" in fields and fields["DPT"].isdigit():
        event["port"] = int(fields["DPT"])
    elif "TYPE" in fields:
        event["port"] = f"type {fields['TYPE']}"
    return event


def parse_kmsg_record(record: str):
    """``(facility, sequence, microseconds since boot, message)`` of one /dev/kmsg record, or None.

    A record is ``<priority>,<sequence>,<microseconds>,<flags>[,...];<message>``; the facility is the
    priority without its three level bits: ``KERNEL_FACILITY`` for the kernel's own records, another
    one for what user space wrote to /dev/kmsg (the kernel never lets it claim the kernel's).
    """
    header, sep, rest = record.partition(";")
    if not sep:
        return None
    parts = header.split(",")
    if len(parts) < 3 or not all(part.isdigit() for part in parts[:3]):
        return None
    return int(parts[0]) >> 3, int(parts[1]), int(parts[2]), rest.split("\n", 1)[0]


def _boot_id() -> str:
    try:
        with open(BOOT_ID) as handle:
            return handle.read().strip()
    except OSError:
        return ""


class _Groups:
    """Denied packets grouped by direction, source, destination, protocol and port."""

    def __init__(self, prefix, addresses, not_before=None):
        self.prefix = prefix
        self.not_before = not_before
        self.mine = {str(ipaddress.ip_address(a)) for a in addresses or ()}
        self.groups: dict[tuple, dict] = {}
        self.lines = 0

    def add(self, message, when):
        event = parse_log_message(message, self.prefix)
        if event is None or (self.not_before is not None and when < self.not_before):
            return
        # The kernel log is shared by every network namespace of the machine: keep this host's packets only.
        own = event["dst"] if event["direction"] == "in" else event["src"]
        if self.mine and own not in self.mine:
            return
        self.lines += 1
        key = (event["direction"], event["src"], event["dst"], event["proto"], str(event["port"]))
        group = self.groups.get(key)
        if group is None:
            self.groups[key] = dict(event, count=1, first=when, last=when)
        else:
            group["count"] += 1
            group["first"] = min(group["first"], when)
            group["last"] = max(group["last"], when)

    def result(self, source, cursor, **extra):
        groups = [self.groups[key] for key in sorted(self.groups)]
        return {"source": source, "readable": True, "cursor": cursor, "lines": self.lines, "groups": groups, **extra}


def read_kmsg(prefix: str, addresses=(), since=None, path: str = KMSG, not_before=None) -> dict:
    """Our log lines in the kernel ring buffer, newer than the ``since`` cursor (``{boot_id, seq}``)."""
    boot_id = _boot_id()
    after = since.get("seq") if since and since.get("boot_id") == boot_id and since.get("source") == "kmsg" else None
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    groups = _Groups(prefix, addresses, not_before if after is None else None)
    # kmsg stamps records with the monotonic clock; wall time = now - (monotonic now - stamp)
    offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
    first_seq, last_seq = None, after
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while we read: the next read continues
                    continue
                raise
            parsed = parse_kmsg_record(record)
            if parsed is None:
                continue
            facility, seq, usec, message = parsed
            if first_seq is None:
                first_seq = seq
            if after is not None and seq <= after:
                continue
            last_seq = seq
            if facility == KERNEL_FACILITY:
                groups.add(message, round(offset + usec / 1e6, 3))
    finally:
        os.close(fd)
    # Records between the cursor and the oldest one still in the buffer were overwritten unread.
    lost = after is not None and first_seq is not None and first_seq > after + 1
    return groups.result("kmsg", {"source": "kmsg", "boot_id": boot_id, "seq": last_seq}, lost=lost)


def read_journal(prefix: str, addresses=(), since=None, not_before=None) -> dict:
    """Our log lines in journald's kernel log, after the ``since`` cursor."""
    argv = ["journalctl", "-k", "-o", "json", "--no-pager", "-q", f"--grep={re.escape(prefix.strip())}",
            f"SYSLOG_FACILITY={KERNEL_FACILITY}"]
    if since and since.get("source") == "journal" and since.get("cursor"):
        argv.append(f"--after-cursor={since['cursor']}")
    proc = run(argv, check=False)
    if proc.returncode not in (0, 1):  # 1: nothing matched
        raise OSError(proc.stderr.strip() or f"journalctl failed ({proc.returncode})")
    cursor = since.get("cursor") if since and since.get("source") == "journal" else None
    groups = _Groups(prefix, addresses, not_before if cursor is None else None)
    for line in proc.stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = entry.get("MESSAGE")
        cursor = entry.get("__CURSOR", cursor)
        # journald files every /dev/kmsg record as transport "kernel", with the record's own facility.
        if not isinstance(message, str) or entry.get("SYSLOG_FACILITY") != str(KERNEL_FACILITY) \
                or entry.get("_TRANSPORT") != "kernel":
            continue
        groups.add(message, round(int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6, 3))
    return groups.result("journal", {"source": "journal", "cursor": cursor}, lost=False)


def read_log(prefix: str, addresses=(), since=None, kmsg: str = KMSG, not_before=None) -> dict:
    """The log lines of denied packets from /dev/kmsg, else journald; says why when neither is readable.

    Without a cursor (a first report), lines older than ``not_before`` are left out: they were written
    before our table was last replaced, possibly by another ruleset or another host with the same address.
    """
    reasons = []
    if os.path.exists(kmsg):
        try:
            return read_kmsg(prefix, addresses, since, kmsg, not_before)
        except OSError as exc:
            reasons.append(f"{kmsg}: {exc.strerror or exc}")
    else:
        reasons.append(f"no {kmsg} (a container gets it only with --device /dev/kmsg and CAP_SYSLOG)")
    if shutil.which("journalctl") and os.path.isdir("/run/systemd/journal"):
        try:
            return read_journal(prefix, addresses, since, not_before)
        except OSError as exc:
            reasons.append(f"journalctl: {exc}")
    else:
        reasons.append("no journald")
    return {"source": "none", "readable": False, "reason": "; ".join(reasons), "cursor": since, "lines": 0,
            "groups": [], "lost": False}


def last_replaced():
    """When our table or chains were last replaced (which resets their counters): apply or revert."""
    found = []
    for name, what in (("applied.json", "applied"), ("reverted.json", "reverted")):
        try:
            with open(os.path.join(STATE_DIR, name)) as handle:
                record = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(record.get("at"), (int, float)):
            found.append({"at": float(record["at"]), "event": what})
    return max(found, key=lambda r: r["at"]) if found else None


def read_activity(*, read_logs: bool, prefix: str, addresses=(), since=None) -> dict:
    """Everything the report needs from a host, in one module call."""
    replaced = last_replaced()
    result = {"counters": read_counters(), "now": round(time.time(), 3), "boot_id": _boot_id(), "replaced": replaced}
    if read_logs:
        # a second of slack: kmsg stamps drift a little from the wall clock
        result["log"] = read_log(prefix, addresses, since, not_before=replaced["at"] - 1 if replaced else None)
    return result
