"""Run the collection's prober inside a network namespace and print what it found.

    ip netns exec NS python probe_runner.py COLLECTIONS_DIR < request.json

``COLLECTIONS_DIR`` holds ``ansible_collections/portguard/hardening`` (the
checkout's ``.build/collections``). The request is JSON: ``targets`` (a list of
``[address, port, proto, source or null]``) and/or ``sweep`` (``{"address": A,
"first": 1, "last": 65535}``: TCP, appended after the targets), plus
``timeout`` and ``concurrency`` (null: the prober's default). Prints JSON:
``results``, ``elapsed`` (seconds of ``probe_ports`` alone) and
``concurrency`` (the default it would pick). Used by the kernel tests and by
bench/bench_port_probe.py.
"""

import json
import sys
import time


def main() -> None:
    sys.path.insert(0, sys.argv[1])
    from ansible_collections.portguard.hardening.plugins.module_utils.host.probe import probe_ports
    from ansible_collections.portguard.hardening.plugins.module_utils.host.probe_limits import default_concurrency

    request = json.load(sys.stdin)
    targets = [tuple(target) for target in request.get("targets", [])]
    sweep = request.get("sweep")
    if sweep:
        targets += [(sweep["address"], port, "tcp") for port in range(sweep["first"], sweep["last"] + 1)]
    kwargs = {"timeout": request.get("timeout", 1.0)}
    if request.get("concurrency"):
        kwargs["concurrency"] = request["concurrency"]
    started = time.monotonic()
    results = probe_ports(targets, **kwargs)
    elapsed = time.monotonic() - started
    # dumps, not dump: json.dump streams through the pure-Python encoder, seconds for a full sweep.
    sys.stdout.write(json.dumps({"results": results, "elapsed": elapsed, "concurrency": default_concurrency()}))


if __name__ == "__main__":
    main()
