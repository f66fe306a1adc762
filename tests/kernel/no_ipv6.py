"""Run a command as on a kernel booted with ``ipv6.disable=1``: ``python no_ipv6.py COMMAND...``.

On such a kernel the IPv6 protocol family is not registered, so
``socket(AF_INET6, ...)`` fails with ``EAFNOSUPPORT``. A network namespace
cannot unregister a family (``net.ipv6.conf.*.disable_ipv6=1`` only removes
addresses: a dual-stack socket still binds ``::`` and serves IPv4), so this
installs a seccomp filter that makes every ``socket(AF_INET6, ...)`` call of
the command and its children fail with that errno, and nothing else. x86_64
and aarch64 only.
"""

import ctypes
import errno
import os
import platform
import socket
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
# (AUDIT_ARCH_*, __NR_socket) per machine.
ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
# Classic BPF opcodes.
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install() -> None:
    arch, nr_socket = ARCHES[platform.machine()]
    # seccomp_data: nr at offset 0, arch at 4, args[0] (low 32 bits on little endian) at 16.
    program = [
        (LD_W_ABS, 0, 0, 4),
        (JEQ_K, 0, 5, arch),
        (LD_W_ABS, 0, 0, 0),
        (JEQ_K, 0, 3, nr_socket),
        (LD_W_ABS, 0, 0, 16),
        (JEQ_K, 0, 1, socket.AF_INET6),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code)
    prog = SockFprog(len(program), ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


def main() -> None:
    install()
    os.execvp(sys.argv[1], sys.argv[1:])  # noqa: S606 - becomes the command, filter in place


if __name__ == "__main__":
    main()
