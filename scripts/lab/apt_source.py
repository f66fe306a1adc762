"""Print the Debian mirror (and its keyring) that this machine's apt uses.

The lab image must come from the same mirror the machine is configured for,
and no mirror host may be written into the repository, so it is read at run
time from the one-line format (/etc/apt/sources.list, sources.list.d/*.list)
and the deb822 format (sources.list.d/*.sources).

Output, one line: ``<uri> <keyring-or-empty>``. Exit status 1 when no ``deb``
entry carries the requested suite with the ``main`` component.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Iterator


def _one_line_entries(path: str) -> Iterator[tuple[str, list[str], list[str], str]]:
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if fields[0] != "deb":
                continue
            fields = fields[1:]
            keyring = ""
            if fields and fields[0].startswith("["):
                # Options block: "[arch=amd64 signed-by=/path]", possibly spread over fields.
                options = []
                while fields:
                    item = fields.pop(0)
                    options.append(item.strip("[]"))
                    if item.endswith("]"):
                        break
                for option in options:
                    key, _sep, value = option.partition("=")
                    if key.lower() == "signed-by":
                        keyring = value
            if len(fields) < 2:
                continue
            yield fields[0], [fields[1]], fields[2:], keyring


def _deb822_entries(path: str) -> Iterator[tuple[str, list[str], list[str], str]]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    stanza: dict[str, str] = {}
    last_key = ""

    def flush() -> Iterator[tuple[str, list[str], list[str], str]]:
        if stanza.get("enabled", "yes").lower() == "no":
            return
        if "deb" not in stanza.get("types", "").split():
            return
        keyring = stanza.get("signed-by", "").strip()
        # Signed-By may hold an inline armored key instead of a path: not usable here.
        if not keyring.startswith("/"):
            keyring = ""
        for uri in stanza.get("uris", "").split():
            yield uri, stanza.get("suites", "").split(), stanza.get("components", "").split(), keyring

    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if stanza:
                yield from flush()
            stanza = {}
            last_key = ""
            continue
        if raw[0].isspace() and last_key:
            stanza[last_key] += "\n" + raw.strip()
            continue
        key, _sep, value = raw.partition(":")
        last_key = key.strip().lower()
        stanza[last_key] = value.strip()


def entries(root: str) -> Iterator[tuple[str, list[str], list[str], str]]:
    main_list = os.path.join(root, "etc/apt/sources.list")
    if os.path.isfile(main_list):
        yield from _one_line_entries(main_list)
    parts = os.path.join(root, "etc/apt/sources.list.d")
    for path in sorted(glob.glob(os.path.join(parts, "*.list"))):
        yield from _one_line_entries(path)
    for path in sorted(glob.glob(os.path.join(parts, "*.sources"))):
        yield from _deb822_entries(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="bookworm")
    parser.add_argument("--root", default="/", help="read apt sources below this directory")
    args = parser.parse_args()
    for uri, suites, components, keyring in entries(args.root):
        if args.suite in suites and "main" in components:
            print(f"{uri.rstrip('/')} {keyring}".rstrip())
            return 0
    print(f"no 'deb' source with suite {args.suite} and component main in apt sources", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
