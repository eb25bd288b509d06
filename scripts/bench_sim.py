"""Throughput of local training: the per-device fp32 path against the batched runner, side by side.

    python scripts/bench_sim.py                                   # the quick preset, 8 devices
    python scripts/bench_sim.py --devices 16 --steps 10 --scaling 10,80,320

For one round of the config's first ``--devices`` devices (``--steps`` local steps each, the
fixed-prune strategy so every device prunes as FedSpine's devices do), per path: device-steps/s,
real (unpadded) tokens/s, achieved TFLOP/s and MFU against the peak measured here (a 2048^2 bf16
and fp32 matmul, in the same run), and the ratio to the per-device fp32 path. For the batched
path also the share of its wall time spent outside forward/backward, a full simulated round's
share outside forward/backward (aggregation and evaluation included), and how the local
training time grows with the number of devices (``--scaling``, 2 local steps each, IID partition).

FLOPs (ours, an estimate): 4 x (weights of the device's kept Linear layers) per real token,
forward plus the activation gradients of backward (the frozen base gets no weight gradients);
attention scores and LoRA are left out. "useful" counts each device's own pruned model on its
real tokens; the batched path also computes the masked units and the padding, which this
leaves out, so its MFU is what a user gets, not what the matmul units did.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from fedspine.config import load_config
from fedspine.fl.batched import BatchedRunner
from fedspine.fl.client import step_seed
from fedspine.fl.runners import InProcessRunner
from fedspine.fl.simulator import Simulation
from fedspine.pruning.index_map import KeptIndexMap


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def linear_weights(world, kept: KeptIndexMap) -> int:
    """Weights of the kept model's prunable Linears (q, k, v, o, MLP) plus the other Linears."""
    s = kept.shape
    hidden, hd = s.hidden_size, s.head_dim
    mlp = world.family.mlp_matrices
    total = 0
    for lk in kept.layers:
        total += hidden * hd * (2 * len(lk.heads) + 2 * len(lk.kv_heads)) + mlp * hidden * len(lk.channels)
    prunable = {
        p
        for i in range(s.num_layers)
        for ps in world.family.module_paths(world.model0, i).values()
        for p in ps
    }
    for name, mod in world.model0.named_modules():
        if isinstance(mod, torch.nn.Linear) and name not in prunable:
            total += mod.weight.numel()
    return total


def one_round(cfg, path: str, devices: int):
    """(seconds, device-steps, real tokens, useful FLOPs, runner) for one round of local training."""
    precision = {"per-device-fp32": "fp32", "per-device-bf16": "bf16", "batched-fp32": "fp32"}.get(
        path, "bf16"
    )
    runner_name = "per-device" if path.startswith("per-device") else "batched"
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, precision=precision, runner=runner_name, batch_devices=devices),
    )
    sim = Simulation(cfg)
    world = sim.world
    ids = world.device_ids[:devices]
    ins = sim.server.configure(1, ids)
    runner = (
        InProcessRunner(world) if runner_name == "per-device" else BatchedRunner(world, group_size=devices)
    )
    tokens = {d: 0 for d in ids}
    steps = cfg.train.local_steps
    for d in ids:  # the real tokens each device trains on, from its own stream (as the runners draw it)
        gen = torch.Generator().manual_seed(step_seed(ins[d].seed, d, 1))
        batches = world.local_data(d).batches(gen)
        tokens[d] = sum(int(next(batches)["attention_mask"].sum()) for _ in range(steps))
    start = time.perf_counter()
    replies = runner.execute(1, ins, {d: sim.server.kept_map(d) for d in ids})
    seconds = time.perf_counter() - start
    flops = 0.0
    for d in ids:
        before = linear_weights(world, sim.server.kept_map(d))
        after = linear_weights(world, KeptIndexMap.from_dict(replies[d].result.kept_map))
        flops += 4 * tokens[d] * (before + after) / 2  # the round prunes midway: average of the two
    return seconds, devices * steps, sum(tokens.values()), flops, runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="experiments/configs/quick.yaml")
    ap.add_argument("--devices", type=int, default=8, help="devices in the round (and in one batched pass)")
    ap.add_argument("--steps", type=int, default=10, help="local steps per device")
    ap.add_argument("--paths", default="per-device-fp32,batched-fp32,batched-bf16")
    ap.add_argument("--scaling", default="10,80,320", help="device counts for the growth check ('' to skip)")
    ap.add_argument("overrides", nargs="*", help="config overrides, a.b=c")
    args = ap.parse_args()
    over = [
        "log.progress=false",
        "strategy.name=fixed-prune",
        f"train.local_steps={args.steps}",
        *args.overrides,
    ]
    cfg = load_config(args.config or None, over)
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"config {args.config} {' '.join(over)}")
    print(
        f"torch threads {torch.get_num_threads()}; matmul peak: bf16 {peaks['bf16']:.2f} TFLOP/s, "
        f"fp32 {peaks['fp32']:.2f} TFLOP/s (2048^2, measured now)"
    )
    print(f"\n{args.devices} devices x {args.steps} local steps, one round of local training")
    print(
        f"{'path':18s} {'seconds':>8s} {'dev-steps/s':>11s} {'tokens/s':>9s} {'TFLOP/s':>8s} "
        f"{'MFU':>6s} {'vs per-device fp32':>19s}"
    )
    base = None
    batched_runner = None
    for path in args.paths.split(","):
        seconds, dsteps, tokens, flops, runner = one_round(cfg, path, args.devices)
        rate = dsteps / seconds
        base = rate if base is None and path == "per-device-fp32" else base
        peak = peaks["bf16" if path.endswith("bf16") else "fp32"]
        tflops = flops / seconds / 1e12
        ratio = f"{rate / base:.2f}x" if base else "-"
        print(
            f"{path:18s} {seconds:8.1f} {rate:11.2f} {tokens / seconds:9.0f} {tflops:8.3f} "
            f"{tflops / peak:6.1%} {ratio:>19s}"
        )
        if path == "batched-bf16":
            batched_runner = runner
    if batched_runner is not None:
        tm = batched_runner._trainer.timing
        phases = {k: v for k, v in tm.items() if k not in ("device_steps", "tokens")}
        wall = sum(phases.values())
        fb = tm["forward"] + tm["backward"]
        print(
            f"\nbatched-bf16 local training, where the time goes (of {wall:.1f} s): "
            + ", ".join(f"{k} {v / wall:.0%}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1]))
        )
        print(f"  outside forward/backward: {1 - fb / wall:.0%} (probes counted outside)")
        # a full simulated round: local training plus aggregation, the clock and evaluation
        full = dataclasses.replace(
            cfg,
            train=dataclasses.replace(
                cfg.train, precision="bf16", runner="batched", batch_devices=args.devices
            ),
            fleet=dataclasses.replace(cfg.fleet, devices=args.devices, participation=1.0),
        )
        sim = Simulation(full)
        start = time.perf_counter()
        sim.run_round()
        round_wall = time.perf_counter() - start
        tm = sim.runner._trainer.timing
        print(
            f"  one full round of {args.devices} devices: {round_wall:.1f} s, outside forward/backward "
            f"{1 - (tm['forward'] + tm['backward']) / round_wall:.0%} (evaluation included)"
        )
    if args.scaling:
        print(
            "\nlocal training time against devices (batched-bf16, 2 local steps, passes of "
            f"{cfg.train.batch_devices}):"
        )
        first = None
        for n in [int(x) for x in args.scaling.split(",")]:
            # IID: a Dirichlet split of the quick data cannot give 320 devices 16 examples each
            c = dataclasses.replace(
                cfg,
                data=dataclasses.replace(cfg.data, partition="iid"),
                fleet=dataclasses.replace(cfg.fleet, devices=n, participation=1.0),
                train=dataclasses.replace(cfg.train, local_steps=2, precision="bf16", runner="batched"),
            )
            sim = Simulation(c)
            ids = sim.world.device_ids
            ins = sim.server.configure(1, ids)
            runner = BatchedRunner(sim.world, group_size=cfg.train.batch_devices)
            start = time.perf_counter()
            runner.execute(1, ins, {d: sim.server.kept_map(d) for d in ids})
            seconds = time.perf_counter() - start
            first = first or (seconds / n)
            print(
                f"  {n:4d} devices: {seconds:7.1f} s, {seconds / n * 1000:6.0f} ms per device "
                f"({seconds / n / first:.2f}x the per-device time at {args.scaling.split(',')[0]})"
            )


if __name__ == "__main__":
    main()
