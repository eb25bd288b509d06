"""Prune while tuning: FedSpine's on-device loop of LoRA steps and structured prunes.

**Paper** ([S], ``shared/paper.md`` §2.2): instead of jumping to the final sparsity, pruning steps
alternate with local LoRA recovery; the importance of heads and channels comes from the LoRA
gradients, smoothed across local iterations; 20 local iterations between prunes worked best.
**Ours**: the round's target ratio is approached with LoRAPrune's cubic schedule over the
round's prune events; a device never un-prunes (a lower target than what it already has is a
no-op); the adapter is carried across each prune exactly (see :meth:`PruneAndTune.prune_now`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from fedspine.lora.adapters import adapter_config, detach, load, reattach
from fedspine.lora.coords import project
from fedspine.pruning.arch import arch_shape, family_of, module_slices
from fedspine.pruning.index_map import KeptIndexMap, plan_kept_counts
from fedspine.pruning.lora_grad import LoRAGradientImportance
from fedspine.pruning.structured import (
    IMPORTANCE,
    UnitScores,
    plan_counts,
    prune_model,
    select_units,
    unit_scores,
)

LORA_GRADIENT = "lora_gradient"  # FedSpine's criterion, computed here during the local steps


def importance_names() -> list[str]:
    """The criteria ``PruneAndTune`` accepts: ``"lora_gradient"`` and every registered one."""
    return [LORA_GRADIENT, *sorted(IMPORTANCE)]


# Which side of each role's weight a unit owns: rows ("out") or columns ("in").
UNIT_AXIS = {"q": "out", "k": "out", "v": "out", "o": "in", "mlp_in": "out", "mlp_out": "in"}


@dataclass(frozen=True)
class PruneSchedule:
    """How a device prunes during one round of local training."""

    target_ratio: float
    prune_interval: int = 20  # local steps between prunes; 20 was best in the paper [S]
    round_to: int = 8  # MLP widths stay multiples of this (hardware-friendly)
    beta: float = 0.9  # EMA of the LoRA-gradient importance (LoRAPrune's value)

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_ratio < 1.0:
            raise ValueError(f"target_ratio must be in [0, 1), got {self.target_ratio!r}")
        if (
            isinstance(self.prune_interval, bool)
            or not isinstance(self.prune_interval, int)
            or self.prune_interval < 1
        ):
            raise ValueError(f"prune_interval must be a positive integer, got {self.prune_interval!r}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {self.round_to!r}")


def cubic_targets(start: float, target: float, events: int) -> list[float]:
    """Intermediate ratios for ``events`` prunes from ``start`` to ``target`` (LoRAPrune's cubic
    schedule: big steps while the model is still redundant, small ones near the target)."""
    if events < 1 or target <= start:
        return [max(start, target)] * max(events, 0)
    return [target - (target - start) * (1.0 - k / events) ** 3 for k in range(1, events + 1)]


def round_interval(prune_interval: int, steps: int) -> int:
    """Local steps between prunes in a round of ``steps``: ``prune_interval``, but at least one
    prune a round when the target asks for more than the device has (ours)."""
    return max(1, min(prune_interval, steps))


def round_targets(start: float, target: float, prune_interval: int, steps: int) -> list[float]:
    """The ratios a round of ``steps`` local steps prunes to, in order (one per interval)."""
    return cubic_targets(start, target, steps // round_interval(prune_interval, steps))


def kept_after_round(
    kept_map: KeptIndexMap, ratio: float, *, prune_interval: int, steps: int, round_to: int, mlp_matrices: int
) -> KeptIndexMap:
    """The kept counts a round of ``PruneAndTune`` toward ``ratio`` leaves, from ``kept_map``, as a
    map that keeps the first units (which units survive depends on the importance; how many, all
    the time model needs, does not)."""
    full = KeptIndexMap.full(kept_map.shape)
    for r in round_targets(kept_map.sparsity(mlp_matrices), ratio, prune_interval, steps):
        heads, chans = plan_kept_counts(kept_map, r, round_to=round_to, mlp_matrices=mlp_matrices)
        kept_map = full.compose([(range(heads), range(chans))] * kept_map.shape.num_layers)
    return kept_map


class PruneAndTune:
    """Owns a device's LoRA-wrapped model during local training and prunes it on schedule.

    Call :meth:`after_backward` once per local step, after ``loss.backward()`` and before the
    optimizer clears the gradients. When it returns True the model was pruned: ``self.model`` is a
    new peft model (same adapter values on the kept units) and the caller must rebuild its
    optimizer from ``self.model``'s trainable parameters (optimizer moments are reset; ours).

    ``importance`` is ``"lora_gradient"`` (FedSpine's, the default: EMA over the interval's
    steps) or any criterion of ``fedspine.pruning.IMPORTANCE`` (``"magnitude"``, ``"taylor"``),
    computed on the plain model at each prune; Taylor scores on ``calib``.

    The adapter keeps its own configuration across prunes (its ``LoraConfig``: rank, alpha,
    dropout, targets, heads). ``rank``, ``alpha`` and ``targets`` are optional checks of it, not
    changes. A layout that cannot be carried (:func:`fedspine.lora.adapters.adapter_config`; a
    trainable module that pruning would resize; LoRA-gradient importance without LoRA on both the
    attention and the MLP of every layer) is refused here, before anything changes.
    """

    def __init__(
        self,
        model: PeftModel,
        kept_map: KeptIndexMap,
        schedule: PruneSchedule,
        total_steps: int,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        targets: Sequence[str] | None = None,
        seed: int = 0,
        importance: str = "lora_gradient",
        calib: Any = None,
    ):
        if not isinstance(model, PeftModel):
            raise ValueError("model must be a peft model (fedspine.lora.attach)")
        if importance not in importance_names():
            raise ValueError(f"importance must be one of {importance_names()}, got {importance!r}")
        if importance == "taylor" and calib is None:
            raise ValueError("importance 'taylor' needs calib (a batch) to score units at each prune")
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        self.config = adapter_config(model)
        self.adapter_name = model.active_adapter
        self.model, self.kept_map, self.schedule = model, kept_map, schedule
        self.seed = seed
        self.importance_name, self.calib = importance, calib
        self.family = family_of(self.hf_model)
        self._check_layout(rank, alpha, targets)
        start = kept_map.sparsity(self.family.mlp_matrices)
        events = total_steps // schedule.prune_interval  # the caller clamps the interval (round_interval)
        self._targets = cubic_targets(start, schedule.target_ratio, events)
        self.importance = LoRAGradientImportance(beta=schedule.beta)
        self.steps = 0
        self.prunes = 0

    @property
    def hf_model(self) -> nn.Module:
        return self.model.base_model.model

    @property
    def rank(self) -> int:
        """The adapter's rank (its ``LoraConfig.r``), the same after every prune."""
        return int(self.config.r)

    def _check_layout(self, rank: int | None, alpha: float | None, targets: Sequence[str] | None) -> None:
        """What :meth:`prune_now` needs of the adapter, checked before anything changes."""
        c = self.config
        given = {"rank": (rank, c.r), "alpha": (alpha, c.lora_alpha)}
        if targets is not None:
            given["targets"] = (sorted(targets), sorted(c.target_modules))
        for name, (value, own) in given.items():
            if value is not None and value != own:
                raise ValueError(
                    f"{name} must be None or the adapter's own {own!r} (PruneAndTune keeps the adapter's "
                    f"configuration across prunes), got {value!r}"
                )
        hf, fam = self.hf_model, self.family
        resized = {
            p for i in range(len(self.kept_map.layers)) for ps in fam.module_paths(hf, i).values() for p in ps
        }
        for path, module in hf.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and any(
                r == path or r.startswith(path + ".") for r in resized
            ):
                raise ValueError(
                    f"modules_to_save {path!r} holds layers that pruning resizes; only modules outside the "
                    "pruned q/k/v/o/MLP layers (task heads) can be fully trained here"
                )
        if self.importance_name == LORA_GRADIENT:
            for i in range(len(self.kept_map.layers)):
                roles = {r for r, ps in fam.module_paths(hf, i).items() for p in ps if _has_lora(hf, p)}
                for kind, wanted in (("attention", {"q", "k", "v", "o"}), ("MLP", {"mlp_in", "mlp_out"})):
                    if not roles & wanted:
                        raise ValueError(
                            f"importance 'lora_gradient' needs LoRA on the {kind} of every layer (it scores "
                            f"units by their LoRA gradients); layer {i} has none there (targets "
                            f"{sorted(c.target_modules)}): add {kind} targets or use importance 'magnitude'"
                        )

    @property
    def achieved_ratio(self) -> float:
        return self.kept_map.sparsity(self.family.mlp_matrices)

    def _lora_modules(self) -> list[tuple[str, nn.Module, str]]:
        hf = self.hf_model
        out = []
        for i in range(len(self.kept_map.layers)):
            for role, paths in self.family.module_paths(hf, i).items():
                for path in paths:
                    layer = hf.get_submodule(path)
                    if hasattr(layer, "lora_A"):
                        out.append((path, layer, UNIT_AXIS[role]))
        return out

    def after_backward(self) -> bool:
        """Accumulate importance for this step; prune if the step ends an interval."""
        if self.importance_name == "lora_gradient":
            self.importance.accumulate(self._lora_modules())
        self.steps += 1
        if self.steps % self.schedule.prune_interval or self.prunes >= len(self._targets):
            return False
        ratio = self._targets[self.prunes]
        self.prunes += 1
        return self.prune_now(ratio)

    def unit_scores(self) -> UnitScores:
        """Per-layer head-unit and channel scores from the EMA'd LoRA-gradient module scores.

        Module scores are summed over each unit's coupled modules (LoRAPrune adds its per-module
        normalised scores the same way); a module without LoRA contributes nothing.
        """
        hf, fam = self.hf_model, self.family
        shape = arch_shape(hf)
        units, group = shape.num_kv_heads, shape.group_size
        heads, chans = [], []
        for i in range(shape.num_layers):
            h = torch.zeros(units)
            c = torch.zeros(shape.intermediate_size)
            for role, paths in fam.module_paths(hf, i).items():
                for path in paths:
                    s = self.importance.scores.get(path)
                    if s is None:
                        continue
                    if role in ("mlp_in", "mlp_out"):
                        c += s.cpu()
                    else:
                        h += s.cpu().view(units, -1).sum(1)
            heads.append(h.double().numpy())
            chans.append(c.double().numpy())
        return UnitScores(tuple(heads), tuple(chans), group)

    def prune_now(self, ratio: float) -> bool:
        """Prune toward ``ratio`` (of the original model) and carry the adapter across.

        The adapter is detached (not merged), the plain model is pruned through torch-pruning,
        the adapter tensors are sliced to the kept rows/columns, and a LoRA of the same
        configuration is re-attached with exactly those values: the model computes what a model
        with the removed units (and their adapter rows/columns) zeroed would compute. Returns
        False if nothing needed pruning.
        """
        fam = self.family
        plan = plan_counts(
            self.kept_map, ratio, round_to=self.schedule.round_to, mlp_matrices=fam.mlp_matrices
        )
        current = arch_shape(self.hf_model)
        if (plan.keep_heads, plan.keep_channels) == (current.num_heads, current.intermediate_size):
            return False
        was_training = self.model.training
        lora_scores = self.unit_scores() if self.importance_name == "lora_gradient" else None
        base, tensors = detach(self.model)
        # Other criteria score the plain model (they read base weights, and Taylor base gradients).
        scores = (
            lora_scores if lora_scores is not None else unit_scores(base, self.importance_name, self.calib)
        )
        positions = select_units(scores, plan.keep_heads, plan.keep_channels)
        relative = KeptIndexMap.full(current).compose(positions)  # positions as a map of the current model
        slices = module_slices(base, relative)
        self.kept_map = prune_model(base, self.kept_map, positions)
        self.model = reattach(base, self.config, seed=self.seed, adapter_name=self.adapter_name)
        load(self.model, project(tensors, slices, rank=self.rank), strict=True)
        self.model.train(was_training)
        self.importance.reset()
        return True


def _has_lora(model: nn.Module, path: str) -> bool:
    return isinstance(model.get_submodule(path), LoraLayer)


def removed_units(before: KeptIndexMap, after: KeptIndexMap) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, original query heads and channels removed between two maps (for tests and logs)."""
    out = []
    for b, a in zip(before.layers, after.layers, strict=True):
        out.append(
            (
                np.setdiff1d(np.asarray(b.heads), np.asarray(a.heads)),
                np.setdiff1d(np.asarray(b.channels), np.asarray(a.channels)),
            )
        )
    return out
