"""How long one allocator round (assign + observe_round) takes for 10 to 10,000 devices.

    python scripts/bench_bandit.py                     # the default allocator (deadline, pooled-ucb)
    python scripts/bench_bandit.py --objective paper   # the paper-style reconstruction (s-ucb, safe cap)
    python scripts/bench_bandit.py --all-policies      # every registered policy at each fleet size

Target (issue #2): under 50 ms for 10,000 devices on the 2-core CPU machine. Reports are built
before the clock starts, so the numbers are the allocator's own cost.

numpy's BLAS is pinned to one thread unless OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS) is set:
the allocator's matrices are a few dozen arms wide, and with training busy on the other cores a
multithreaded BLAS waits for descheduled threads (77-672 ms a round measured so at 10,000
devices, against 28 ms on one thread).
"""

from __future__ import annotations

import os

if "OPENBLAS_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy loads its BLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from fedspine.bandit import POLICIES, Allocator, ArmSpace  # noqa: E402
from fedspine.bandit.synthetic import SyntheticFleet  # noqa: E402


def bench(
    n_devices: int,
    policy: str | None,
    rounds: int,
    warmup: int,
    safe: bool,
    objective: str = "deadline",
    **settings: object,
) -> dict[str, float]:
    space = ArmSpace.grid([round(0.1 * i, 1) for i in range(8)], [4, 8, 16, 32])
    fleet = SyntheticFleet.paper_mix(n_devices, seed=0)
    alloc = Allocator(
        space, policy=policy, seed=0, safe_slack=0.05 if safe else None, objective=objective, **settings
    )
    rng = np.random.default_rng(1)
    devices = list(range(n_devices))
    t_assign, t_observe = [], []
    for rnd in range(1, warmup + rounds + 1):
        t0 = time.perf_counter()
        arms = alloc.assign(devices, rnd)
        t1 = time.perf_counter()
        reports = fleet.run_round([arms[d] for d in devices], space, rng)
        t2 = time.perf_counter()
        alloc.observe_round(reports)
        t3 = time.perf_counter()
        if rnd > warmup:
            t_assign.append(t1 - t0)
            t_observe.append(t3 - t2)
    a, o = statistics.median(t_assign) * 1e3, statistics.median(t_observe) * 1e3
    return {"assign_ms": a, "observe_ms": o, "total_ms": a + o}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 1_000, 10_000])
    ap.add_argument("--objective", default="deadline", choices=["deadline", "paper"])
    ap.add_argument("--policy", default=None, choices=sorted(POLICIES), help="default: the objective's own")
    ap.add_argument("--all-policies", action="store_true")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first, so state is not empty")
    ap.add_argument("--no-safe", action="store_true", help="objective paper: turn the safe cap off")
    ap.add_argument(
        "--value-round-effect", action="store_true", help="objective deadline: the value model's round effect"
    )
    args = ap.parse_args()
    settings = {"value_round_effect": True} if args.value_round_effect else {}
    policies = sorted(POLICIES) if args.all_policies else [args.policy]
    print(f"{'policy':<20}{'devices':>9}{'assign ms':>11}{'observe ms':>12}{'total ms':>10}")
    for policy in policies:
        for n in args.sizes:
            r = bench(
                n,
                policy,
                args.rounds,
                args.warmup,
                safe=not args.no_safe,
                objective=args.objective,
                **settings,
            )
            print(
                f"{policy or 'default':<20}{n:>9}"
                f"{r['assign_ms']:>11.2f}{r['observe_ms']:>12.2f}{r['total_ms']:>10.2f}"
            )


if __name__ == "__main__":
    main()
