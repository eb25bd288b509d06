"""The experiment spec: what varies (variants, groups, sizes, seeds) around one shared run config.

A spec is a YAML file with two sections: ``run`` (an ordinary run config, the shared budget) and
``experiment`` (what varies)::

    experiment:
      name: main
      title: FedSpine vs baselines
      about: one paragraph on what the experiment shows
      reference: fedspine            # speed-ups are this variant's, over every other one
      seeds: 3
      variants:                      # label -> overrides of the run config
        fedspine: {strategy.name: fedspine}
        hetlora: {strategy.name: hetlora}
      groups:                        # optional sweep: every variant runs in every group
        alpha=0.1: {data.alpha: 0.1}
        sparsity=0.4:                # what differs per variant goes under per_variant
          per_variant: {fixed-prune: {strategy.params: {ratio: 0.4}}}
      sizes:                         # named overrides; "full" is the run config as written
        smoke:
          model.name: tiny-bert
          data.source: synthetic
          per_variant: {hetlora: {train.rounds: 2}}   # a variant's own settings at this size
      sweeps:                        # optional: groups that set one field are points on an axis
        fleet.link_scale: {label: link bandwidth (x Wi-Fi), default: 1.0, log: true}

A sweep's points are the groups that override only its field, plus the groups that override
nothing (at ``default``, the value the run config stands for); results.md gets a table and a
figure of the reference's speed-up along it.

``plan`` turns a spec into cells (group x seed x variant), each with its validated run config
and its own run directory. Same seed across variants means the same partition, fleet and jitter
stream: the only difference is the variant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedspine.config import RunConfig, config_from_mapping

FULL = "full"


@dataclass(frozen=True)
class Sweep:
    """An axis through the groups (``Experiment.sweeps``): ``field`` is a dotted config field."""

    field: str
    label: str
    default: float
    log: bool = False


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    about: str
    run: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    reference: str
    seeds: int = 1
    groups: dict[str, dict[str, Any]] = field(default_factory=lambda: {"": {}})
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""
    sweeps: tuple[Sweep, ...] = ()

    def size_names(self) -> list[str]:
        return [FULL, *sorted(self.sizes)]

    def sweep_points(self, sweep: Sweep) -> dict[str, float]:
        """Group -> the sweep's value there, in spec order."""
        points = {}
        for group, overrides in self.groups.items():
            shared = {k: v for k, v in overrides.items() if k != "per_variant"}
            if not shared:
                points[group] = sweep.default
            elif set(shared) == {sweep.field}:
                points[group] = float(shared[sweep.field])
        return points

    def config(self, *, size: str, group: str, variant: str, seed: int) -> RunConfig:
        """The run config of one cell: run section < size < group < variant < the group's
        ``per_variant`` entry for it < the size's ``per_variant`` entry for it < seed."""
        shared = dict(self.groups[group])
        per_variant = shared.pop("per_variant", None) or {}
        sized = dict(self.sizes.get(size, {}))
        sized_per_variant = sized.pop("per_variant", None) or {}
        overrides = {
            **sized,
            **shared,
            **self.variants[variant],
            **(per_variant.get(variant) or {}),
            **(sized_per_variant.get(variant) or {}),
        }
        overrides["seed"] = seed
        return config_from_mapping(self.run, overrides)


@dataclass(frozen=True)
class Cell:
    group: str
    variant: str
    seed: int
    cfg: RunConfig

    def run_dir(self, out: Path) -> Path:
        return out / "runs" / (slug(self.group) or "all") / slug(self.variant) / f"seed{self.seed}"


def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate a spec: every cell's run config is built (and so validated) here,
    before any work starts; errors say which variant/group/size broke which field."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"experiment file {str(p)!r} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) != {"experiment", "run"}:
        raise ValueError(f"{p}: an experiment file has exactly two sections, 'experiment' and 'run'")
    e = dict(raw["experiment"])
    allowed = {"name", "title", "about", "reference", "seeds", "variants", "groups", "sizes", "sweeps"}
    unknown = sorted(set(e) - allowed)
    if unknown:
        raise ValueError(f"{p}: unknown experiment field(s) {unknown}; allowed: {sorted(allowed)}")
    for key in ("name", "variants", "reference"):
        if key not in e:
            raise ValueError(f"{p}: experiment.{key} is required")
    variants = _overrides_table(e["variants"], f"{p}: experiment.variants")
    if e["reference"] not in variants:
        raise ValueError(
            f"{p}: experiment.reference must be one of {sorted(variants)}, got {e['reference']!r}"
        )
    exp = Experiment(
        name=str(e["name"]),
        title=str(e.get("title", e["name"])),
        about=str(e.get("about", "")).strip(),
        run=dict(raw["run"] or {}),
        variants=variants,
        reference=str(e["reference"]),
        seeds=int(e.get("seeds", 1)),
        groups=_overrides_table(e.get("groups") or {"": {}}, f"{p}: experiment.groups"),
        sizes=_overrides_table(e.get("sizes") or {}, f"{p}: experiment.sizes", allow_empty=True),
        source=str(p),
        sweeps=_sweeps(e.get("sweeps") or {}, f"{p}: experiment.sweeps"),
    )
    for sw in exp.sweeps:
        if len(exp.sweep_points(sw)) < 2:
            raise ValueError(
                f"{p}: experiment.sweeps.{sw.field}: needs at least two groups on it (groups that set only "
                f"{sw.field}, or nothing), got {sorted(exp.sweep_points(sw))}"
            )
    if exp.seeds < 1:
        raise ValueError(f"{p}: experiment.seeds must be >= 1, got {exp.seeds}")
    for where, table in (("groups", exp.groups), ("sizes", exp.sizes)):
        for name, overrides in table.items():
            extra = sorted(set(overrides.get("per_variant") or {}) - set(exp.variants))
            if extra:
                raise ValueError(
                    f"{p}: experiment.{where}.{name}.per_variant names {extra}, which are not variants; "
                    f"have {sorted(exp.variants)}"
                )
    for size in exp.size_names():
        for group in exp.groups:
            for variant in exp.variants:
                try:
                    exp.config(size=size, group=group, variant=variant, seed=0)
                except ValueError as exc:
                    where = (
                        f"size {size!r}, group {group!r}, variant {variant!r}"
                        if group
                        else f"size {size!r}, variant {variant!r}"
                    )
                    raise ValueError(f"{p}: {where}: {exc}") from None
    return exp


def _sweeps(raw: Any, where: str) -> tuple[Sweep, ...]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must map a config field to {{label, default, log}}, got {raw!r}")
    out = []
    for name, body in raw.items():
        body = body or {}
        extra = sorted(set(body) - {"label", "default", "log"}) if isinstance(body, dict) else None
        if extra is None or extra or not isinstance(body.get("default"), int | float):
            raise ValueError(
                f"{where}.{name} must be {{label, default: <number>, log: <bool>}}, got {body!r}"
            )
        label = str(body.get("label", name))
        out.append(Sweep(str(name), label, float(body["default"]), bool(body.get("log"))))
    return tuple(out)


def _overrides_table(raw: Any, where: str, *, allow_empty: bool = False) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict) or not (raw or allow_empty):
        raise ValueError(f"{where} must be a non-empty mapping of label -> overrides")
    out = {}
    for label, overrides in raw.items():
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}.{label} must map 'section.field' to a value, got {overrides!r}")
        out[str(label)] = dict(overrides)
    return out


def plan(exp: Experiment, *, size: str = FULL, seeds: int | None = None, first_seed: int = 0) -> list[Cell]:
    """Every (group, seed, variant) cell; seeds ``first_seed .. first_seed + seeds - 1`` (a
    confirmation on fresh seeds starts where the first runs stopped)."""
    if size not in exp.size_names():
        raise ValueError(f"size must be one of {exp.size_names()}, got {size!r}")
    n = exp.seeds if seeds is None else seeds
    if n < 1:
        raise ValueError(f"seeds must be >= 1, got {n}")
    if first_seed < 0:
        raise ValueError(f"first_seed must be >= 0, got {first_seed}")
    return [
        Cell(g, v, s, exp.config(size=size, group=g, variant=v, seed=s))
        for g in exp.groups
        for s in range(first_seed, first_seed + n)
        for v in exp.variants
    ]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")


__all__ = ["FULL", "Cell", "Experiment", "Sweep", "load_experiment", "plan"]
