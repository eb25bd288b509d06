"""Run every variant of an experiment on the same fleet, data and budget; write results.md + figures.

    python experiments/compare.py --config experiments/configs/main.yaml --size cpu --seeds 1
    python experiments/compare.py --config experiments/configs/main.yaml --smoke      # CI size

Runs land in OUT/runs/<group>/<variant>/seed<k>/; rerunning the command picks up where it
stopped (finished runs are read back, a killed one resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment spec (experiments/configs/<name>.yaml)")
    ap.add_argument("--size", default="full", help="a size named in the spec (smoke, cpu, ...) or 'full'")
    ap.add_argument("--smoke", action="store_true", help="same as --size smoke")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the spec's)")
    ap.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds run are FIRST .. FIRST+SEEDS-1 (default 0): fresh seeds for a confirmation",
    )
    ap.add_argument("--out", default=None, help="output folder (default results/<name>[-<size>])")
    ap.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "online"])
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--groups", nargs="+", default=None, help="run only these groups of a sweep")
    ap.add_argument("--variants", nargs="+", default=None, help="run only these variants")
    ap.add_argument(
        "--reuse",
        nargs="+",
        default=(),
        metavar="DIR",
        help="copy any run whose exact config already finished under DIR (e.g. results/main-cpu) "
        "instead of running it again; results.md lists the copies",
    )
    ap.add_argument(
        "--partial",
        action="store_true",
        help="run nothing: write the tables from the runs finished so far and list the missing ones",
    )
    ap.add_argument(
        "--shard",
        default=None,
        help="K/N: run only every N-th run starting at the K-th (1-based), e.g. two processes with "
        "1/2 and 2/2; then rerun without --shard to read them back and write the tables",
    )
    args = ap.parse_args(argv)

    from fedspine.experiments import load_experiment, plan, read_finished, run_cells, write_results

    size = "smoke" if args.smoke else args.size
    try:
        exp = load_experiment(args.config)
        cells = plan(exp, size=size, seeds=args.seeds, first_seed=args.first_seed)
        if args.groups:
            unknown = sorted(set(args.groups) - set(exp.groups))
            if unknown:
                raise ValueError(f"--groups {unknown} not in the spec; have {list(exp.groups)}")
            cells = [c for c in cells if c.group in args.groups]
        if args.variants:
            unknown = sorted(set(args.variants) - set(exp.variants))
            if unknown:
                raise ValueError(f"--variants {unknown} not in the spec; have {list(exp.variants)}")
            cells = [c for c in cells if c.variant in args.variants]
        shard = _shard(args.shard)
    except ValueError as exc:  # before any work: name the field and what is allowed
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"results/{exp.name}{'' if size == 'full' else '-' + size}")
    print(f"{exp.title}: {len(cells)} runs, size {size} -> {out}")
    if shard is not None:
        k, n = shard
        run_cells(cells[k - 1 :: n], out, wandb=args.wandb, group_name=exp.name, reuse=args.reuse)
        print(f"shard {k}/{n} done; rerun without --shard to write the tables")
        return 0
    if args.partial:
        results, missing = read_finished(cells, out)
        if not results:
            print(f"error: no finished runs under {out}", file=sys.stderr)
            return 2
    else:
        results = run_cells(cells, out, wandb=args.wandb, group_name=exp.name, reuse=args.reuse)
        missing = []
    command = "python experiments/compare.py " + shlex.join(
        ["--config", args.config, "--size", size, "--seeds", str(args.seeds or exp.seeds)]
        + (["--first-seed", str(args.first_seed)] if args.first_seed else [])
        + ["--out", str(out)]
        + (["--groups", *args.groups] if args.groups else [])
        + (["--variants", *args.variants] if args.variants else [])
        + (["--reuse", *map(str, args.reuse)] if args.reuse else [])
    )
    path = write_results(
        exp, results, out, command=command, size=size, figures=not args.no_figures, missing=missing
    )
    print(path.read_text())
    return 0


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N, got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


if __name__ == "__main__":
    sys.exit(main())
