"""``python -m fedspine.flower sim|deploy``: fedspine on Flower on this machine, in one command.

``sim`` starts a SuperLink with the simulation runtime (one virtual SuperNode per device, Ray);
``deploy`` starts a SuperLink and one real ``flower-supernode`` process per device. Both submit
the app with ``flwr run``, wait for the run, print its summary and stop every process they
started. Arguments are those of ``fedspine run`` (a config file and ``section.field=value``
overrides). Parsing and dispatch only; see docs/flower.md for the equivalent manual commands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedspine flower", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="runtime", required=True)
    for name, what in (("sim", "Flower's simulation runtime"), ("deploy", "real SuperNode processes")):
        p = sub.add_parser(name, help=f"run on {what}, all on 127.0.0.1")
        p.add_argument("--config", default=None, help="fedspine YAML/TOML run config (default: built-in)")
        p.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.rounds=5")
        p.add_argument("--out", default=None, help="work directory (default: runs/flower-<runtime>)")
        p.add_argument("--round-timeout", type=float, default=600.0, help="seconds per round per device")
        p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
        if name == "sim":
            p.add_argument("--cpus-per-device", type=int, default=1, help="Ray CPUs per virtual device")
    args = ap.parse_args(argv)

    from fedspine.config import ConfigError, load_config
    from fedspine.fl.build import check
    from fedspine.fl.world import World
    from fedspine.flower.local import LocalFederation, write_app

    try:
        cfg = check(load_config(args.config, args.overrides))
        World.build(cfg)  # what the model and the data refuse, here rather than inside Flower's apps
    except ConfigError as exc:
        print(f"fedspine: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"runs/flower-{args.runtime}").resolve()
    run_config = {
        "config": str(Path(args.config).resolve()) if args.config else "",
        "overrides": shlex.join(args.overrides),
        "run-dir": str(out / "run"),
        "state-dir": str(out / "devices"),
        "round-timeout": args.round_timeout,
    }
    n = cfg.fleet.devices
    if args.runtime == "sim":
        fed = LocalFederation(out / "flower", simulation=True)
        fed_cfg = {"num-supernodes": n, "client-resources-num-cpus": args.cpus_per_device}
    else:
        nodes = [
            {"partition-id": i, "num-partitions": n, "state-dir": str(out / f"node{i}")} for i in range(n)
        ]
        fed, fed_cfg = LocalFederation(out / "flower", simulation=False, nodes=nodes), None
    print(f"fedspine on Flower ({args.runtime}, {n} devices); logs in {out / 'flower'}", flush=True)
    with fed:
        app = write_app(out / "app")
        result = fed.run(app, run_config, federation_config=fed_cfg, timeout_s=args.timeout)
    print(result.log)
    summary = out / "run" / "summary.json"
    if summary.exists():
        print(json.dumps(json.loads(summary.read_text()), indent=2))
    print(f"run {result.run_id}: {result.status}; per-round metrics: {out / 'run' / 'metrics.jsonl'}")
    left = fed.leftovers()
    if left:
        print(f"warning: processes still running: {left}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
