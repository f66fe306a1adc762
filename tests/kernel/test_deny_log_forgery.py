"""Forged deny log lines never reach the activity report; a genuine one does.

A throwaway pair of network namespaces (the ones of test_log_flood.py) gets the ruleset the collection renders;
the machine logs their log rules while the test runs. Then, in the machine's kernel log:

- one genuine line: a SYN from the source namespace to a denied port;
- a user-space record: ``<4>`` + prefix + fields written to /dev/kmsg. The kernel files it under the user
  facility whatever priority the writer asks for;
- a kernel record whose end a local user chose: a process faults on code mapped from a file whose name holds
  the prefix and fields, and the kernel's segfault line ends with that name (any user can do this; the test
  runs it as root because the interpreter lives under /root here). The kernel writes that line with
  ``debug.exception-trace=1``, its default.

Both forged records must be in the kernel log (else the test proves nothing), and ``read_kmsg``, the reader of
port_activity, must count the genuine line only.
"""

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.kernel_log import NF_LOG_ALL_NETNS, namespaces_log
from support.requirements import require, skip_or_fail
from test_log_flood import CATALOG, DST, HOSTVARS, SRC, load, namespaces

from ansible_collections.portguard.hardening.plugins.module_utils.core.catalog.compiler import compile_catalog
from ansible_collections.portguard.hardening.plugins.module_utils.host import activity

pytestmark = [pytest.mark.kernel]

# An instruction that reads address 0, per architecture.
FAULTING_CODE = {"x86_64": b"\x8b\x04\x25\x00\x00\x00\x00", "aarch64": bytes.fromhex("000080d2000040f9")}
# Maps the file named in argv[1] executable and jumps into it.
CRASHER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
address = libc.mmap(None, 4096, 0x1 | 0x4, 0x2, fd, 0)  # PROT_READ|PROT_EXEC, MAP_PRIVATE
if address in (None, ctypes.c_void_p(-1).value):
    sys.exit(f"mmap: {os.strerror(ctypes.get_errno())}")
ctypes.CFUNCTYPE(None)(address)()
"""
SYN = r"""
import socket, sys
sock = socket.socket()
sock.setblocking(False)
try:
    sock.connect((sys.argv[1], int(sys.argv[2])))
except BlockingIOError:
    pass
sock.close()
"""


def raw_records_after(seq):
    """Every record after ``seq`` in the kernel ring buffer, as /dev/kmsg gives it."""
    found = []
    fd = os.open(activity.KMSG, os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode("utf-8", "replace")
            except BlockingIOError:
                return found
            except BrokenPipeError:
                continue
            parsed = activity.parse_kmsg_record(record)
            if parsed and (seq is None or parsed[1] > seq):
                found.append(record)
    finally:
        os.close(fd)


def crash_in_file_named(name):
    code = FAULTING_CODE.get(platform.machine())
    if code is None:
        message = f"no faulting instruction known for {platform.machine()}"
        skip_or_fail(message)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / name
        path.write_bytes(code.ljust(4096, b"\0"))
        proc = subprocess.run([sys.executable, "-c", CRASHER, str(path)], capture_output=True, text=True,
                              check=False)
    assert proc.returncode in (-11, -7, -4), f"the crasher did not fault: {proc.returncode} {proc.stderr}"


def test_forged_records_are_ignored_and_a_genuine_one_counts():
    require("ip", "nft")
    if not NF_LOG_ALL_NETNS.exists() or not os.path.exists(activity.KMSG):
        require("nf_log_all_netns sysctl and /dev/kmsg")
    policy = compile_catalog(CATALOG, {"all": ["target"]}, HOSTVARS).host("target")
    prefix = policy.settings.log_prefix
    written = f"IN=pgd OUT= SRC=203.0.113.9 DST={DST} PROTO=TCP SPT=1 DPT=22"
    # the kernel appends "[offset+size]" to the file name: the trailing space keeps DPT a number
    named = f"IN=pgd OUT= SRC=203.0.113.7 DST={DST} PROTO=TCP SPT=1 DPT=23 "
    with namespaces() as (src, dst), namespaces_log():
        load("nftables", dst, policy)
        cursor = activity.read_kmsg(prefix, [DST])["cursor"]
        with open(activity.KMSG, "w") as kmsg:
            kmsg.write(f"<4>{prefix}{written}\n")
        crash_in_file_named(f"x {prefix}{named}")
        subprocess.run(["ip", "netns", "exec", src, sys.executable, "-c", SYN, DST, "6379"], check=True)
        time.sleep(0.5)  # let the genuine line reach the ring buffer
        raw = raw_records_after(cursor["seq"])
        found = activity.read_kmsg(prefix, [DST], since=cursor)
    user_written = [r for r in raw if r.split(";", 1)[1].startswith(prefix) and "203.0.113.9" in r]
    segfault = [r for r in raw if f" in x {prefix}" in r and "203.0.113.7" in r]
    assert user_written and int(user_written[0].split(",", 1)[0]) >> 3 == 1, "the user-space record is in the log"
    assert segfault and int(segfault[0].split(",", 1)[0]) >> 3 == 0, "the kernel's segfault line names the file"
    assert [(g["src"], g["port"], g["count"]) for g in found["groups"]] == [(SRC, 6379, 1)]
