"""Experiment 5a: what a device deploys at 20/30/50% sparsity, against the unpruned model that
HetLoRA (and every no-pruning baseline) leaves each device with.

    python experiments/deploy.py                       # all-MiniLM-L6-v2, ratios 0.2 0.3 0.5
    python experiments/deploy.py --smoke               # tiny random BERT (CI)

The paper reports, at 50% sparsity, inference time about 51% of HetLoRA's and training memory
about 115% of it. For every ratio we prune a copy of the model (magnitude importance, the same
structured pruning the clients run) and report, each against the unpruned model *measured in the
same run*:

* parameters;
* inference latency (batch x length random tokens, ``torch.inference_mode``): the pruned and the
  unpruned model are timed alternately, ``--repeats`` pairs, and the median of per-pair ratios is
  reported, so background load hits both alike;
* training memory of one LoRA step (rank ``--rank``, AdamW state, activations): measured with
  ``torch.cuda.max_memory_allocated`` on a GPU, otherwise *modelled* with
  ``fedspine.fl.time_model.memory_bytes`` (the model the simulator uses to fail devices that run
  out of memory); the table says which.

Writes ``results.md``, ``results.json`` and a bar chart under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="tiny random BERT, 3 repeats (CI)")
    ap.add_argument("--out", default=None, help="default results/deploy[-smoke]")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.repeats, args.length = "tiny-bert", 3, 16
    if not all(0 < r < 1 for r in args.ratios):
        print(f"error: --ratios must be in (0, 1), got {args.ratios}", file=sys.stderr)
        return 2

    import torch

    from fedspine.experiments import environment
    from fedspine.fl.time_model import Workload, layer_counts, memory_bytes
    from fedspine.lora import attach
    from fedspine.models import build_model
    from fedspine.pruning import arch_shape, family_of, prune_to_ratio
    from fedspine.pruning.index_map import KeptIndexMap

    out = Path(args.out or ("results/deploy-smoke" if args.smoke else "results/deploy"))
    out.mkdir(parents=True, exist_ok=True)
    base, _ = build_model(args.model, 2, seed=0)
    fam = family_of(base)
    shape = arch_shape(base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = int(base.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=gen)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)

    def latency_s(model) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(**batch)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

    def train_memory(model, kept) -> tuple[float, str]:
        if device == "cuda":
            peft_model = attach(copy.deepcopy(model), args.rank, seed=0).to(device)
            opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
            torch.cuda.reset_peak_memory_stats()
            peft_model(**batch, labels=labels).loss.backward()
            opt.step()
            return float(torch.cuda.max_memory_allocated()), "measured (CUDA)"
        return float(
            memory_bytes(
                shape,
                Workload(
                    lora_rank=args.rank,
                    steps=1,  # one step's peak: the step count does not enter the memory
                    batch=args.batch,
                    seq_len=args.length,
                    vocab_size=0,
                    mlp_matrices=fam.mlp_matrices,
                    lm_head=False,
                ),
                **layer_counts(kept),
            )
        ), "modelled (time model)"

    dense = copy.deepcopy(base).to(device).eval()
    full_params = sum(p.numel() for p in dense.parameters())
    dense_mem, mem_how = train_memory(base, KeptIndexMap.full(shape))
    rows = []
    for ratio in args.ratios:
        pruned = copy.deepcopy(base)
        kept, achieved = prune_to_ratio(pruned, ratio, "magnitude")
        pruned = pruned.to(device).eval()
        for m in (dense, pruned):  # warm-up
            latency_s(m)
        pairs = [latency_s(pruned) / latency_s(dense) for _ in range(args.repeats)]
        mem, _ = train_memory(pruned, kept)
        rows.append(
            {
                "ratio": ratio,
                "achieved": achieved,
                "params": sum(p.numel() for p in pruned.parameters()),
                "latency_ratio": statistics.median(pairs),
                "memory_ratio": mem / dense_mem,
                "memory_mb": mem / 2**20,
            }
        )
        print(
            f"ratio {ratio:.2f} (achieved {achieved:.3f}): params {rows[-1]['params'] / full_params:.3f}, "
            f"inference time {rows[-1]['latency_ratio']:.3f}, training memory {rows[-1]['memory_ratio']:.3f} "
            "of the unpruned model",
            flush=True,
        )
    command = "python experiments/deploy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment()
    md = [
        "# Experiment 5a: deployed model at 20/30/50% sparsity vs the unpruned (HetLoRA) model",
        "",
        f"Reproduce: `{command.strip()}`",
        "",
        f"Model `{args.model}` ({full_params / 1e6:.1f}M params), batch {args.batch} x {args.length} tokens, "
        f"LoRA rank {args.rank}; inference on {device}, median of {args.repeats} alternating pairs; "
        f"training memory {mem_how}, unpruned: {dense_mem / 2**20:.0f} MiB.",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "",
        "Each column is a fraction of the unpruned model's value, measured in the same run.",
        "",
        "| target ratio | achieved | params | inference time | training memory |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['ratio']:.2f} | {r['achieved']:.3f} | {r['params'] / full_params:.3f} | "
            f"{r['latency_ratio']:.3f} | {r['memory_ratio']:.3f} |"
        )
    md += ["", "Paper, at 50%: inference time about 0.51 of HetLoRA's, training memory about 1.15 of it.", ""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = range(len(rows))
        w = 0.27
        for k, (key, label) in enumerate(
            [("params", "params"), ("latency_ratio", "inference time"), ("memory_ratio", "training memory")]
        ):
            vals = [r[key] / full_params if key == "params" else r[key] for r in rows]
            ax.bar([x + (k - 1) * w for x in xs], vals, w, label=label)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(xs), [f"{r['ratio']:.0%}" for r in rows])
        ax.set(xlabel="pruning ratio", ylabel="fraction of the unpruned model", title=args.model)
        ax.legend(fontsize=8)
        fig.tight_layout()
        (out / "figures").mkdir(exist_ok=True)
        fig.savefig(out / "figures" / "deploy.png", dpi=110)
        md += ["![deployment](figures/deploy.png)", ""]
    except ImportError:
        print("matplotlib missing: no figure (pip install -e '.[experiments]')", file=sys.stderr)
    (out / "results.md").write_text("\n".join(md))
    record = {"command": command, "environment": env, "memory": mem_how, "rows": rows}
    (out / "results.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
