"""Display-safe text for what other people chose: process names, command lines, log and catalog strings.

A local user names the rogue listener the audit exists to catch (``prctl(PR_SET_NAME)``, any byte
but NUL) and writes its command line. Shown as they are, control characters steer the terminal of
the CI log, make a JUnit file invalid XML (the failing test case then disappears from the gate),
and bidi overrides make a page read other than it is. Every such character is shown as a visible
escape instead. Standard library only: this runs on managed hosts and on the controller.
"""

import unicodedata

# What does not print: controls (C0, DEL, C1), format characters (bidi embeddings, overrides and
# isolates U+202A-U+202E and U+2066-U+2069 among them), surrogates (bytes that were not UTF-8),
# unassigned code points (U+FFFE and U+FFFF, which XML 1.0 forbids, among them), line and
# paragraph separators.
_HIDDEN = frozenset(("Cc", "Cf", "Cs", "Cn", "Zl", "Zp"))


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by the surrogateescape decoder
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text) -> str:
    """``text`` with every character that does not print shown as an escape (``\\x1b``, ``\\u202e``).

    Printable text comes back unchanged, so every output can apply it again to text that was
    already escaped where it was collected.
    """
    text = str(text)
    if text.isascii() and text.isprintable():
        return text
    return "".join(_escape(char) if unicodedata.category(char) in _HIDDEN else char for char in text)


def escape_bytes(raw: bytes) -> str:
    """Bytes from the kernel as display-safe text that maps back to them exactly.

    Backslashes are doubled, so ``\\x1b`` in the result always stands for the byte 0x1b; a byte
    that is not UTF-8 is ``\\xNN``, a code point that does not print ``\\uNNNN``.
    """
    return printable(raw.decode("utf-8", "surrogateescape").replace("\\", "\\\\"))
