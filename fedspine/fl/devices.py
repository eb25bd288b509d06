"""Device profiles for the simulated fleet: compute, memory, link, jitter and power per device.

Flower's simulation cannot give clients different speeds, so a round's duration comes from a time
model (``fedspine.fl.time_model``, anchors.md §e.3) applied to one ``DeviceProfile`` per device.
The bandit never sees these numbers; it only sees the round times they produce.

Where the numbers come from:

- **Peak FP16 throughput, memory and power modes: public spec sheets** (NVIDIA's Jetson module
  data sheets and product pages), quoted from memory where marked "unverified". They are
  peaks: tensor-core numbers for Volta/Ampere, CUDA-core packed FP16 for Pascal (TX2 has no
  tensor cores).
- **Utilisation: ours.** Training on edge devices reaches a small fraction of peak (small,
  memory-bandwidth-bound matmuls on a shared LPDDR bus, framework overhead); Woisetschläger et
  al. 2023 (arXiv 2310.03150, FLAN-T5 LoRA fine-tuning on Jetson AGX Orin) find low model FLOP
  utilisation on the edge compared with a data-centre GPU. Our per-tier values are chosen so the
  effective speeds are plausible, not measured; calibrate them on real hardware when available.
- **Link bandwidth: ours.** FedSpine's paper gives no network numbers [paper.md §3]; we assume a
  Wi-Fi-class link shared by many devices (``WIFI``), the same for every tier, and configurable.
- **Memory: spec-sheet total minus an OS / CUDA-context reserve (ours).** Jetson memory is shared
  by CPU and GPU, so the training process never gets all of it.

numpy only: no torch import.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedspine.bandit.synthetic import PAPER_TIERS, paper_mix_counts  # the one definition of the mix

GIB = 2**30


def _positive_real(cls: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{cls}.{name} must be a finite real number {bound}, got {value!r}")


@dataclass(frozen=True)
class LinkSpec:
    """A device's network link: sustained payload throughput each way, in bytes per second."""

    up_bytes_per_s: float
    down_bytes_per_s: float

    def __post_init__(self) -> None:
        _positive_real("LinkSpec", "up_bytes_per_s", self.up_bytes_per_s)
        _positive_real("LinkSpec", "down_bytes_per_s", self.down_bytes_per_s)


# Ours (no source): a Wi-Fi-class (802.11ac) cell shared by tens of devices, so each device sees a few
# MB/s of sustained payload throughput, with the uplink slower than the downlink (20 / 50 Mbit/s).
WIFI = LinkSpec(up_bytes_per_s=20e6 / 8, down_bytes_per_s=50e6 / 8)


def scaled_link(scale: float, link: LinkSpec = WIFI) -> LinkSpec:
    """``link`` with both directions' throughput times ``scale`` (a link-bandwidth sweep)."""
    return LinkSpec(link.up_bytes_per_s * scale, link.down_bytes_per_s * scale)


# Ours: the OS, the CUDA context and the framework keep about this much of a Jetson's shared memory.
OS_RESERVE_BYTES = int(1.5 * GIB)

# Ours: per-round multiplicative noise (thermal throttling, OS activity, link variation).
DEFAULT_JITTER_SIGMA = 0.1


@dataclass(frozen=True)
class DeviceProfile:
    """One device's resources.

    ``flops_per_s`` is the spec-sheet peak (FP16); the time model divides work by
    ``effective_flops_per_s = flops_per_s * utilisation``. ``memory_bytes`` is what a training
    process may use; a round whose modelled requirement exceeds it fails. ``jitter_sigma`` is the
    sigma of the log-normal factor applied to each round's time. ``power_w`` is the draw while
    training (the energy model charges it for the whole round).
    """

    name: str
    flops_per_s: float
    memory_bytes: int
    up_bytes_per_s: float
    down_bytes_per_s: float
    jitter_sigma: float
    power_w: float
    utilisation: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DeviceProfile.name must be a non-empty string, got {self.name!r}")
        _positive_real("DeviceProfile", "flops_per_s", self.flops_per_s)
        m = self.memory_bytes
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"DeviceProfile.memory_bytes must be a positive integer, got {m!r}")
        _positive_real("DeviceProfile", "up_bytes_per_s", self.up_bytes_per_s)
        _positive_real("DeviceProfile", "down_bytes_per_s", self.down_bytes_per_s)
        _positive_real("DeviceProfile", "jitter_sigma", self.jitter_sigma, allow_zero=True)
        if self.jitter_sigma > 2.0:
            raise ValueError(f"DeviceProfile.jitter_sigma must be in [0, 2], got {self.jitter_sigma!r}")
        _positive_real("DeviceProfile", "power_w", self.power_w)
        u = self.utilisation
        _positive_real("DeviceProfile", "utilisation", u)
        if u > 1.0:
            raise ValueError(f"DeviceProfile.utilisation must be in (0, 1], got {u!r}")

    @property
    def effective_flops_per_s(self) -> float:
        """Sustained training throughput: peak times utilisation."""
        return float(self.flops_per_s) * float(self.utilisation)

    def with_link(self, link: LinkSpec) -> DeviceProfile:
        """The same device on another network link."""
        return replace(self, up_bytes_per_s=link.up_bytes_per_s, down_bytes_per_s=link.down_bytes_per_s)


def _jetson(
    name: str, peak_fp16_flops_per_s: float, total_gib: int, power_w: float, utilisation: float
) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        flops_per_s=peak_fp16_flops_per_s,
        memory_bytes=total_gib * GIB - OS_RESERVE_BYTES,
        up_bytes_per_s=WIFI.up_bytes_per_s,
        down_bytes_per_s=WIFI.down_bytes_per_s,
        jitter_sigma=DEFAULT_JITTER_SIGMA,
        power_w=power_w,
        utilisation=utilisation,
    )


# Peak FP16, memory and power: NVIDIA Jetson module data sheets / product pages [spec]. Utilisation [ours].
# Tier names "tx2" / "nx" / "agx" are the labels the strategies' tier tables use.
#
# Jetson TX2: 256-core Pascal, no tensor cores; 1.33 TFLOPS FP16 (= 256 x 2 FLOP/FMA x 2 packed FP16
# x 1.3 GHz); 8 GB LPDDR4; 7.5 / 15 W modes. Utilisation 0.15 (ours; a CUDA-core peak is easier to
# approach than a tensor-core one).
JETSON_TX2 = _jetson("tx2", 1.33e12, 8, power_w=15.0, utilisation=0.15)
# Jetson Xavier NX: 384-core Volta + 48 tensor cores at up to 1.1 GHz; 8 GB LPDDR4x; 10 / 15 W modes
# (20 W in later JetPacks). FP16 peak: NVIDIA quotes about 6 TFLOPS (unverified, from memory; 48 TC x
# 128 FLOP/clk x 1.1 GHz = 6.8 is the arithmetic upper bound). Utilisation 0.08 (ours).
XAVIER_NX = _jetson("nx", 6.0e12, 8, power_w=15.0, utilisation=0.08)
# Jetson AGX Xavier: 512-core Volta + 64 tensor cores at up to 1.377 GHz; 11 TFLOPS FP16 (NVIDIA;
# 64 x 128 x 1.377 GHz = 11.3); 32 GB LPDDR4x (16 / 64 GB variants exist); 10 / 15 / 30 W modes.
AGX_XAVIER = _jetson("agx", 11.0e12, 32, power_w=30.0, utilisation=0.08)
# Jetson AGX Orin 32 GB / 64 GB: 1792 / 2048-core Ampere, 56 / 64 tensor cores, 930 MHz / 1.3 GHz;
# 15-40 W / 15-60 W. Dense FP16 peak derived from the data sheets' GPU sparse INT8 figure (108 / 170
# TOPS) divided by 4 (sparsity 2x, INT8 vs FP16 2x): about 27 / 42.5 TFLOPS. Unsure: derived, not
# quoted. Utilisation 0.05 (ours; Woisetschläger et al. 2023 measured low utilisation on this module).
AGX_ORIN_32GB = _jetson("orin-32gb", 27.0e12, 32, power_w=40.0, utilisation=0.05)
AGX_ORIN_64GB = _jetson("orin-64gb", 42.5e12, 64, power_w=60.0, utilisation=0.05)

PROFILES: dict[str, DeviceProfile] = {
    p.name: p for p in (JETSON_TX2, XAVIER_NX, AGX_XAVIER, AGX_ORIN_32GB, AGX_ORIN_64GB)
}

# FedSpine's testbed: 30 TX2 + 40 NX + 10 AGX [paper.md §3: count from the paper, mix from a secondary
# source], defined once, as the shares of ``fedspine.bandit.synthetic.PAPER_TIERS`` (of 80 devices).
# Which NX / AGX generation is not stated; we take Xavier NX and AGX Xavier (most likely).
_PAPER_PROFILES = {"tx2": JETSON_TX2, "nx": XAVIER_NX, "agx": AGX_XAVIER}
PAPER_MIX: tuple[tuple[DeviceProfile, int], ...] = tuple(
    (_PAPER_PROFILES[name], round(share * 80)) for name, share, _, _ in PAPER_TIERS
)


@dataclass(frozen=True)
class FleetSpec:
    """A fleet as (tier profile, device count) pairs, with a seeded spread within each tier.

    Every device of a tier gets the tier's profile with ``flops_per_s``, ``up_bytes_per_s`` and
    ``down_bytes_per_s`` each multiplied by an independent ``Uniform(1 - spread, 1 + spread)``
    (ours: units of one model differ by cooling, power mode, firmware and radio conditions).
    Memory, power and utilisation are the tier's.
    """

    tiers: tuple[tuple[DeviceProfile, int], ...]
    spread: float = 0.15

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("FleetSpec.tiers must hold at least one (profile, count) pair")
        for i, pair in enumerate(self.tiers):
            if len(pair) != 2 or not isinstance(pair[0], DeviceProfile):
                raise ValueError(f"FleetSpec.tiers[{i}] must be a (DeviceProfile, count) pair, got {pair!r}")
            k = pair[1]
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
                raise ValueError(f"FleetSpec.tiers[{i}] count must be a non-negative integer, got {k!r}")
        if sum(int(k) for _, k in self.tiers) < 1:
            raise ValueError("FleetSpec.tiers must hold at least one device in total")
        s = self.spread
        ok = isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s)
        if not ok or not 0.0 <= s < 1.0:
            raise ValueError(f"FleetSpec.spread must be in [0, 1), got {s!r}")

    @property
    def n_devices(self) -> int:
        return sum(int(k) for _, k in self.tiers)


def fleet(spec: FleetSpec, rng: np.random.Generator) -> list[DeviceProfile]:
    """One profile per device, tiers in the order given (device ``i`` is list entry ``i``).

    Draws, per tier, the compute, uplink and downlink factors in that order from ``rng``.
    """
    out: list[DeviceProfile] = []
    lo, hi = 1.0 - spec.spread, 1.0 + spec.spread
    for base, k in spec.tiers:
        compute, up, down = (rng.uniform(lo, hi, int(k)) for _ in range(3))
        out += [
            replace(
                base,
                flops_per_s=base.flops_per_s * float(c),
                up_bytes_per_s=base.up_bytes_per_s * float(u),
                down_bytes_per_s=base.down_bytes_per_s * float(d),
            )
            for c, u, d in zip(compute, up, down, strict=True)
        ]
    return out


def paper_fleet(
    n: int = 80,
    seed: int = 0,
    *,
    spread: float = 0.15,
    link: LinkSpec = WIFI,
    compute_spread: float | None = None,
) -> list[DeviceProfile]:
    """FedSpine's testbed mix (30 TX2 + 40 Xavier NX + 10 AGX Xavier) scaled to ``n`` devices, on
    ``link``, with a ``spread`` within each tier drawn from ``np.random.default_rng(seed)``.

    ``compute_spread`` sets the fastest tier's effective compute over the slowest's (None keeps
    the profiles' own, about 4.4x); see :func:`with_compute_spread`."""
    counts = paper_mix_counts(n)
    base = (
        [p for p, _ in PAPER_MIX]
        if compute_spread is None
        else with_compute_spread([p for p, _ in PAPER_MIX], compute_spread)
    )
    tiers = tuple((p.with_link(link), k) for p, k in zip(base, counts, strict=True))
    return fleet(FleetSpec(tiers, spread), np.random.default_rng(seed))


def with_compute_spread(profiles: Sequence[DeviceProfile], ratio: float) -> list[DeviceProfile]:
    """The profiles with their effective compute stretched (or squeezed) so that the fastest over
    the slowest is ``ratio``; the slowest stays as it is and the others keep their place on a log
    scale: ``speed_t' = slowest * (speed_t / slowest) ** (log ratio / log current_ratio)`` (ours; a
    sweep of the fleet's heterogeneity, 1 = every tier as fast as the slowest)."""
    if not (isinstance(ratio, numbers.Real) and math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"compute_spread must be a finite number >= 1, got {ratio!r}")
    speeds = np.array([p.effective_flops_per_s for p in profiles])
    slowest, current = speeds.min(), speeds.max() / speeds.min()
    power = 0.0 if current == 1.0 else math.log(ratio) / math.log(current)
    target = slowest * (speeds / slowest) ** power
    return [
        replace(p, flops_per_s=p.flops_per_s * float(t / s))
        for p, t, s in zip(profiles, target, speeds, strict=True)
    ]


def tiers(profiles: Sequence[DeviceProfile], device_ids: Sequence[str] | None = None) -> dict[str, str]:
    """Device id -> tier name, for logging and for the tier-based baselines.

    Device ids default to ``"0"``, ``"1"``, ... (the list positions as strings, the ids the
    strategies use).
    """
    ids = [str(i) for i in range(len(profiles))] if device_ids is None else list(device_ids)
    if len(ids) != len(profiles):
        raise ValueError(f"device_ids must have one id per profile ({len(profiles)}), got {len(ids)}")
    if len(set(ids)) != len(ids):
        raise ValueError("device_ids must be distinct")
    return {d: p.name for d, p in zip(ids, profiles, strict=True)}
