"""Read the counters of our table or chains: deny counters and per-entry hits."""

import json
import re
import shutil
import subprocess

TABLE = "portguard"
_SAVE_RE = re.compile(r"^\[(\d+):(\d+)\] -A (PORTGUARD-(?:IN|OUT)) (.*)$")
_COMMENT_RE = re.compile(r'--comment (?:"([^"]*)"|(\S+))')


def _run(argv):
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _value_text(value) -> str:
    if isinstance(value, dict):
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{_value_text(low)}-{_value_text(high)}"
    return str(value)


def parse_nft_json(text: str) -> dict:
    """Counters from ``nft -j list table inet portguard``."""
    result = {"backend": "nftables", "denied_in": None, "denied_out": None, "elements": []}
    for item in json.loads(text).get("nftables", []):
        if "counter" in item and item["counter"].get("name", "").startswith("denied_"):
            result[item["counter"]["name"]] = item["counter"]["packets"]
        if "set" in item:
            for element in item["set"].get("elem", []):
                body = element.get("elem", element)
                concat = body.get("val", {}).get("concat", [None, None])
                counter = body.get("counter", {})
                result["elements"].append({
                    "set": item["set"]["name"],
                    "addresses": _value_text(concat[0]),
                    "ports": _value_text(concat[1]),
                    "comment": body.get("comment", ""),
                    "packets": counter.get("packets", 0),
                    "bytes": counter.get("bytes", 0),
                })
    return result


def parse_iptables_save(texts: dict) -> dict:
    """Counters from ``iptables-save -c`` / ``ip6tables-save -c`` of the filter table, per family."""
    result = {"backend": "iptables", "denied_in": None, "denied_out": None, "elements": []}
    for family, text in sorted(texts.items()):
        for line in text.splitlines():
            match = _SAVE_RE.match(line.strip())
            if not match:
                continue
            packets, size, chain, rule = int(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
            comment_match = _COMMENT_RE.search(rule)
            comment = (comment_match.group(1) or comment_match.group(2)) if comment_match else ""
            if comment in ("denied_in", "denied_out"):
                result[comment] = (result[comment] or 0) + packets
            elif "-j ACCEPT" in rule and comment:
                result["elements"].append({"set": f"{chain}/{family}", "addresses": rule.split(" -p ")[0],
                                           "ports": rule, "comment": comment, "packets": packets, "bytes": size})
    return result


def read_counters() -> dict:
    """The counters of whichever backend holds our rules; ``backend: none`` when neither does."""
    if shutil.which("nft"):
        proc = _run(["nft", "-j", "list", "table", "inet", TABLE])
        if proc.returncode == 0:
            return parse_nft_json(proc.stdout)
    if shutil.which("iptables-save"):
        texts = {family: _run([tool, "-c", "-t", "filter"]).stdout
                 for tool, family in (("iptables-save", "ipv4"), ("ip6tables-save", "ipv6"))}
        if any("PORTGUARD-" in text for text in texts.values()):
            return parse_iptables_save(texts)
    return {"backend": "none", "denied_in": None, "denied_out": None, "elements": []}
