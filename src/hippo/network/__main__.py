"""``python -m hippo.network up|down|status`` -- the local clinical network (see :mod:`hippo.network.stack`).

Examples::

    python -m hippo.network up --model outputs/train/runs/<run>/model.pt
    python -m hippo.network status
    python -m hippo.network down
    python -m hippo.network up --config conf/network.yaml --set viewer.port=3001 --only orthanc,viewer

Orthanc's REST API needs credentials: the generated service account is in
``<root>/orthanc/credentials.json`` (mode 0600; ``status`` prints the path), e.g.
``curl -u "hippo:$(python -c 'import json;print(json.load(open("outputs/network/orthanc/credentials.json"))["password"])')" http://127.0.0.1:8042/studies``.

Exit codes: 0 ok (``status``: every recorded service running), 1 error (``status``: not up), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from hippo.network.stack import SERVICES, Network, NetworkError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hippo.network",
                                description="Start, stop or inspect the local clinical network "
                                            "(Orthanc + Lua routing, AI listener, OHIF viewer).")
    p.add_argument("command", choices=("up", "down", "status"))
    p.add_argument("--config", default=None, help="network configuration (default: conf/network.yaml)")
    p.add_argument("--model", default=None, help="model file for the listener (overrides model_path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration value (dotted key), e.g. viewer.port=3001; repeatable")
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of {','.join(SERVICES)} to start (up only)")
    p.add_argument("--json", action="store_true", help="print status as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return p


def _print_status(status: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    print(f"network {'up' if status['up'] else 'not up'} (state: {status['state']})")
    for name, s in status["services"].items():
        ports = ", ".join(f"{p}{'' if ok else ' (closed)'}" for p, ok in s["listening"].items())
        state = f"running pid {s['pid']}" if s["running"] else "not running"
        print(f"  {name:9s} {state:22s} {s['url']}  ports {ports}" + (f"  log {s['log']}" if s["log"] else ""))
        if "rest" in s:
            print(f"  {'':9s} REST API: {s['rest']}")
    if status.get("credentials"):
        print(f"Orthanc's REST API needs HTTP Basic credentials: {status['credentials']} (mode 0600)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        network = Network(load_config(args.config, args.set), model_path=args.model)
        if args.command == "up":
            _print_status(network.up(only=only), args.json)
            return 0
        if args.command == "down":
            for name, what in network.down().items():
                print(f"{name}: {what}")
            return 0
        status = network.status()
        _print_status(status, args.json)
        return 0 if status["up"] else 1
    except (NetworkError, FileNotFoundError, ValueError, TypeError) as exc:
        print(f"hippo.network: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
