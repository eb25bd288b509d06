"""The server side of a round, as functions of plain messages (numpy only).

``Server.configure`` turns the strategy's arms into one ``TrainIns`` per device (the global
adapter projected onto what that device kept, at its rank); ``Server.finish`` takes the
``TrainRes``/``Failure`` messages back, feeds the strategy, and aggregates with the strategy's
rule. It holds no device objects, only the last kept-index map each device reported, so the
same class serves the in-process simulator and a Flower ServerApp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedspine.config import ClientConfig
from fedspine.fl.messages import Failure, TrainIns, TrainRes
from fedspine.fl.screening import NormScreen, check_update, expected_shapes
from fedspine.fl.strategies import ArmAssigner
from fedspine.lora.aggregate import DeviceUpdate, get_aggregator
from fedspine.pruning.index_map import ArchShape, KeptIndexMap, ModuleSlice

ModuleRoles = Mapping[str, tuple[int, str]]  # module path -> (layer, role)


class Server:
    def __init__(
        self,
        strategy: ArmAssigner,
        *,
        shape: ArchShape,
        module_roles: ModuleRoles,
        global_shapes: Mapping[str, tuple[int, int]],
        heads: Mapping[str, np.ndarray],
        r_max: int,
        client_config: ClientConfig,
        seed: int = 0,
        init_seed: int | None = None,
        aggregation: str | None = None,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        norm_k: float | None = 10.0,
        norm_history: int = 16,
        min_success: int = 1,
        scaling: float = 1.0,
    ):
        """``client_config`` is what every device is told to train with, and ``seed`` the run's
        seed (each device derives its round's randomness from it; ``init_seed``, default ``seed``,
        seeds the rule's initial state). ``aggregation`` replaces the
        strategy's own rule (an ablation); None keeps it.

        ``server_lr``/``server_momentum`` (ours, FedAvgM, Hsu et al. 2019) treat the rule's
        aggregate minus the old state as a pseudo-gradient: ``m = β m + Δ``, ``state += η m``.
        The defaults (1, 0) are plain aggregation. Under label skew a round whose sampled devices
        all lean one way moves the global model a full step that way; momentum averages that over
        rounds. Applied to every array whose shape the rule keeps (factors, heads, base deltas).

        ``screen`` checks updates (``fedspine.fl.screening``: ``norm_k``/``norm_history`` bound
        their size, ``scaling`` is the LoRA scale in it); ``finish`` aggregates only a round with
        at least ``min_success`` accepted updates.
        """
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        self.server_lr, self.server_momentum = float(server_lr), float(server_momentum)
        self.momentum: dict[str, np.ndarray] = {}
        self.strategy = strategy
        self.rule = get_aggregator(aggregation or strategy.aggregation)
        self.shape, self.module_roles = shape, dict(module_roles)
        self.global_shapes, self.r_max = dict(global_shapes), int(r_max)
        self.client_config, self.seed = client_config, int(seed)
        init = seed if init_seed is None else init_seed
        self.state = self.rule.init_state(self.global_shapes, self.r_max, rng=init, heads=dict(heads))
        self.kept: dict[str, KeptIndexMap] = {}
        self.head_shapes = {k: tuple(np.shape(v)) for k, v in heads.items()}
        self.norms = NormScreen(norm_k, norm_history, scaling)
        self.min_success = int(min_success)

    def kept_map(self, device: str) -> KeptIndexMap:
        return self.kept.get(device) or KeptIndexMap.full(self.shape)

    def slices(self, device: str) -> dict[str, ModuleSlice]:
        """What ``device`` kept, per adapted module, in original coordinates."""
        return _slices(self.kept_map(device), self.module_roles)

    def configure(self, rnd: int, devices: Sequence[str]) -> dict[str, TrainIns]:
        arms = self.strategy.configure(rnd, devices)
        out = {}
        for d in devices:
            arm = arms[d]
            rank = min(arm.rank, self.r_max)
            dist = self.rule.distribute(self.state, self.slices(d), rank)
            out[d] = TrainIns(
                rnd, d, arm.ratio, rank, dist.adapter, dist.base_delta, self.client_config, self.seed
            )
        return out

    def check(self, res: TrainRes, ins: TrainIns) -> str:
        """Why ``res``, the answer to ``ins``, cannot be used on its own ("" when it can)."""
        return check_update(res, ins, self.kept_map(ins.device_id), self._shapes_for)

    def _shapes_for(self, kept: KeptIndexMap, rank: int) -> dict[str, tuple[int, ...]]:
        return expected_shapes(_slices(kept, self.module_roles), self.global_shapes, self.head_shapes, rank)

    def screen(
        self, results: Sequence[TrainRes], ins: Mapping[str, TrainIns]
    ) -> tuple[list[TrainRes], dict[str, str]]:
        """The updates the strategy and the aggregator may see, and {device: why} for the rest:
        each ``check``-ed on its own, then the passing ones' sizes against each other."""
        rejected = {r.device_id: why for r in results if (why := self.check(r, ins[r.device_id]))}
        accepted, too_large = self.norms.screen([r for r in results if r.device_id not in rejected])
        return accepted, {**rejected, **too_large}

    def finish(
        self,
        rnd: int,
        results: Sequence[TrainRes],
        failures: Sequence[Failure],
        round_time_s: Mapping[str, float],
    ) -> bool:
        """Feed the strategy, record what each device kept, aggregate the completed updates;
        whether it aggregated (at least ``min_success`` updates).

        A failed device contributes nothing, so a slow or crashed client never corrupts the
        global state; its kept map stays what it last reported. ``results`` are screened ones.
        """
        self.strategy.observe(rnd, results, failures, round_time_s)
        for r in results:
            self.kept[r.device_id] = KeptIndexMap.from_dict(r.kept_map)
        updates = [DeviceUpdate(r.adapter, self.slices(r.device_id), r.rank, r.num_samples) for r in results]
        if not updates or len(updates) < self.min_success:
            return False
        new = self.rule.aggregate(self.state, updates, global_shapes=self.global_shapes, r_max=self.r_max)
        self.state = self._server_step(self.state, new)
        return True

    def _server_step(
        self, old: Mapping[str, np.ndarray], new: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if self.server_lr == 1.0 and self.server_momentum == 0.0:
            return new
        return server_step(old, new, self.momentum, lr=self.server_lr, momentum=self.server_momentum)

    def full_model_adapter(self, rank: int | None = None):
        """The global adapter for the unpruned model (for evaluating "the global model")."""
        return self.rule.distribute(
            self.state, _slices(KeptIndexMap.full(self.shape), self.module_roles), rank or self.r_max
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "global": {k: v.copy() for k, v in self.state.items()},
            "momentum": {k: v.copy() for k, v in self.momentum.items()},
            "kept": {d: m.to_dict() for d, m in self.kept.items()},
            "strategy": self.strategy.state_dict(),
            "norm_history": self.norms.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = {k: np.asarray(v) for k, v in state["global"].items()}
        self.momentum = {k: np.asarray(v) for k, v in state.get("momentum", {}).items()}
        self.kept = {d: KeptIndexMap.from_dict(m) for d, m in state["kept"].items()}
        self.strategy.load_state_dict(state["strategy"])
        self.norms.load_state_dict(state.get("norm_history", []))  # absent: written before screening


def server_step(
    old: Mapping[str, np.ndarray],
    new: dict[str, np.ndarray],
    buffer: dict[str, np.ndarray],
    *,
    lr: float,
    momentum: float,
) -> dict[str, np.ndarray]:
    """FedAvgM on ``new - old`` per key; updates ``buffer`` in place, returns the stepped state.

    A key the rule reshaped (FLoRA folds its stack into the base) or created is taken as is.
    """
    out = dict(new)
    for key, value in new.items():
        prev = old.get(key)
        if prev is None or np.shape(prev) != np.shape(value):
            buffer.pop(key, None)
            continue
        step = value - prev
        if momentum:
            step = buffer[key] = momentum * buffer.get(key, 0.0) + step
        out[key] = (prev + lr * step).astype(value.dtype, copy=False)
    return out


def _slices(kept: KeptIndexMap, module_roles: ModuleRoles) -> dict[str, ModuleSlice]:
    per_layer = [kept.role_slices(i) for i in range(len(kept.layers))]
    return {path: per_layer[layer][role] for path, (layer, role) in module_roles.items()}
