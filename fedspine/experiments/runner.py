"""Run the cells of an experiment, each into its own run directory, resumably.

Each run writes its own run directory (metrics.jsonl, summary.json, checkpoint), so a killed
comparison resumes where it stopped and a finished run is never repeated; a run whose exact config
already finished elsewhere (``reuse``) is copied instead of run again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspine.experiments.spec import Cell


@dataclass
class CellResult:
    cell: Cell
    records: list[dict[str, Any]]
    summary: dict[str, Any]


def finished_runs(roots: Sequence[str | Path]) -> dict[str, Path]:
    """Finished run directories under ``roots``, keyed by their exact config (canonical JSON)."""
    found: dict[str, Path] = {}
    for root in roots:
        for cfg_path in sorted(Path(root).rglob("config.json")):
            if (cfg_path.parent / "summary.json").exists() and (cfg_path.parent / "metrics.jsonl").exists():
                found.setdefault(_config_key(_stored_config(cfg_path)), cfg_path.parent)
    return found


def _config_key(cfg: Any) -> str:
    return json.dumps(cfg, sort_keys=True)


def _effect_key(cfg: Any, recorded: Any = None) -> str | None:
    """A run's config with its strategy parameters as it resolved them (``recorded``, from its
    summary; None: today's defaults): runs with the same key do the same, whether a parameter was
    spelled out or left at a default. None when today's code cannot read the parameters."""
    from fedspine.fl.strategies import recorded_params, resolved_params

    try:
        name, raw = cfg["strategy"]["name"], cfg["strategy"]["params"]
        params = recorded_params(name, recorded) if recorded is not None else resolved_params(name, raw)
    except Exception:  # a strategy or parameter since removed: matches nothing
        return None
    return _config_key({**cfg, "strategy": {**cfg["strategy"], "params": params}})


def _by_effect(found: dict[str, Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in found.values():
        recorded = (_read_json(path / "summary.json") or {}).get("strategy_params")
        key = _effect_key(_stored_config(path / "config.json"), recorded)
        if key is not None:
            out.setdefault(key, path)
    return out


def _wanted(cell: Cell) -> dict[str, Any]:
    return json.loads(json.dumps(cell.cfg.to_dict()))


def _same_defaults(cell: Cell, source: Path) -> bool:
    """Whether a finished run elsewhere resolved the cell's strategy parameters as today's code
    does (a changed default changes a run, not its config). A run from before summaries recorded
    them is taken as the same: results.md says which runs were copied."""
    from fedspine.fl.strategies import recorded_params, resolved_params

    recorded = (_read_json(source / "summary.json") or {}).get("strategy_params")
    if recorded is None:
        return True
    name = cell.cfg.strategy.name
    # a parameter added since that run: at the value from before it existed (recorded_params);
    # a value the cell sets is in its config, which is compared apart
    return recorded_params(name, recorded) == resolved_params(name, cell.cfg.strategy.params)


def _is_finished(cell: Cell, out: Path) -> bool:
    run_dir = cell.run_dir(out)
    done = (run_dir / "summary.json").exists() and _stored_config(run_dir / "config.json") == _wanted(cell)
    return done and _same_defaults(cell, run_dir)


def read_finished(cells: Sequence[Cell], out: str | Path) -> tuple[list[CellResult], list[Cell]]:
    """The cells already finished under ``out`` (read back, nothing run) and the missing ones."""
    out = Path(out)
    done = [c for c in cells if _is_finished(c, out)]
    return [_read_back(c, c.run_dir(out)) for c in done], [c for c in cells if c not in done]


def _read_back(cell: Cell, run_dir: Path) -> CellResult:
    from fedspine.logging import read_metrics

    return CellResult(cell, read_metrics(run_dir), _read_json(run_dir / "summary.json"))


def run_cells(
    cells: Sequence[Cell],
    out: str | Path,
    *,
    wandb: str = "disabled",
    project: str = "fedspine",
    group_name: str | None = None,
    reuse: Sequence[str | Path] = (),
) -> list[CellResult]:
    """Run (or pick up) every cell; a finished cell with the same config is read back, a killed
    one resumes from its checkpoint, one whose config changed starts over.

    A cell whose exact config already ran to the end under one of the ``reuse`` folders (another
    experiment's results, say; the strategy's parameters compared as each run resolved them, so
    a default spelled out matches one left implicit, and a changed default matches nothing) is
    copied from there instead of run again; its summary records
    ``reused_from`` and results.md lists it. A run's numbers follow from its config and seed, so
    the copy is what a rerun would give, for none of the compute. Cells of this call whose configs
    are identical (an unpruned ceiling that ignores a sweep's arm grid, say) run once the same way.
    A cell of a strategy that never reads the clock, whose config differs from a finished run's
    only in the fleet's timing, is retimed from it (``fedspine.fl.retime``; ``retimed_from``). A
    cell of one that does (FedSpine), whose config differs from a finished run's only in the
    strategy's parameters, or whose own finished run ran under a default changed since, is that
    run when its parameters, fed the run's observations, allocate every arm it did
    (``fedspine.fl.replay``; ``replayed_from``)."""
    from fedspine.fl.replay import params_free_key
    from fedspine.fl.retime import timing_free_key
    from fedspine.fl.simulator import run_in_dir
    from fedspine.fl.strategies import STRATEGIES
    from fedspine.logging import write_atomic

    out = Path(out)
    elsewhere = finished_runs(reuse) if reuse else {}
    # the same runs by what they did: a run that spelled out today's defaults is a copy too
    effects = _by_effect(elsewhere)
    # Finished runs of strategies that never read the clock, by their config without the fleet's
    # timing fields: a cell that differs from one only there is retimed, not trained (fl.retime).
    retimable = {timing_free_key(json.loads(k)): p for k, p in elsewhere.items()}
    # Finished runs by their config without the strategy's parameters: a cell of a strategy that
    # reads the clock and differs from one only there is replayed first (fl.replay).
    replayable: dict[str, list[Path]] = {}
    for k, p in elsewhere.items():
        replayable.setdefault(params_free_key(json.loads(k)), []).append(p)
    worlds: dict[str, Any] = {}  # model section -> a World, for the time model's shapes
    results = []
    for i, cell in enumerate(cells, 1):
        run_dir = cell.run_dir(out)
        label = f"[{i}/{len(cells)}] {cell.group + ' ' if cell.group else ''}{cell.variant} seed {cell.seed}"
        want = _wanted(cell)
        reads_clock = STRATEGIES[cell.cfg.strategy.name].reads_clock
        have = _stored_config(run_dir / "config.json")
        if have is not None and have != want:
            print(f"{label}: config changed since the last run; starting over", flush=True)
            shutil.rmtree(run_dir)
            have = None
        if have is not None and (run_dir / "summary.json").exists() and not _same_defaults(cell, run_dir):
            have = _replayed(cell, run_dir, run_dir, label) if reads_clock else None
            if have is None:
                print(f"{label}: ran under other strategy defaults; starting over", flush=True)
                shutil.rmtree(run_dir)
        source = effects.get(_effect_key(want) or "")
        same = elsewhere.get(_config_key(want))
        if have is None and source is None and same is not None:
            print(f"{label}: {same} ran other strategy defaults; not copied", flush=True)
        if have is None and source is not None and source.resolve() != run_dir.resolve():
            run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(run_dir / "config.json", json.dumps(want, indent=2, default=str))
            shutil.copyfile(source / "metrics.jsonl", run_dir / "metrics.jsonl")
            summary = {**_read_json(source / "summary.json"), "reused_from": source.as_posix()}
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
            print(f"{label}: same config finished in {source}; copied", flush=True)
            have = want
        moved = retimable.get(timing_free_key(want)) if not reads_clock else None
        if have is None and source is None and moved is not None:
            have = _retimed(cell, moved, run_dir, label, worlds)
        if have is None and source is None and reads_clock:
            for like in replayable.get(params_free_key(want), []):
                if (have := _replayed(cell, like, run_dir, label)) is not None:
                    break
        if have is not None and (run_dir / "summary.json").exists():
            print(f"{label}: done before, read back", flush=True)
            results.append(_read_back(cell, run_dir))
            _remember(elsewhere, effects, retimable, replayable, want, run_dir)
            continue
        resume = (run_dir / "checkpoint").exists()
        print(f"{label}: {'resuming' if resume else 'running'} -> {run_dir}", flush=True)
        res = run_in_dir(
            cell.cfg,
            run_dir,
            resume=resume,
            wandb_mode=wandb,
            project=project,
            name="/".join(x for x in (group_name, cell.group, cell.variant, f"seed{cell.seed}") if x),
            group=group_name,
        )
        acc = res.summary.get("final_accuracy")
        print(
            f"{label}: final accuracy {acc if acc is None else f'{acc:.3f}'}, "
            f"simulated {res.summary['clock_s']:.0f} s, wall {res.summary['wall_s']:.0f} s",
            flush=True,
        )
        results.append(CellResult(cell, res.records, res.summary))
        _remember(elsewhere, effects, retimable, replayable, want, run_dir)
    return results


def _remember(
    elsewhere: dict[str, Path],
    effects: dict[str, Path],
    retimable: dict[str, Path],
    replayable: dict[str, list[Path]],
    config: Any,
    run_dir: Path,
) -> None:
    from fedspine.fl.replay import params_free_key
    from fedspine.fl.retime import timing_free_key

    elsewhere.setdefault(_config_key(config), run_dir)
    effects.setdefault(_effect_key(config) or "", run_dir)
    replayable.setdefault(params_free_key(config), []).append(run_dir)
    retimable.setdefault(timing_free_key(config), run_dir)


def _retimed(cell: Cell, source: Path, run_dir: Path, label: str, worlds: dict[str, Any]) -> Any:
    """Write ``cell``'s run as ``source``'s retimed onto the cell's fleet (``fedspine.fl.retime``)
    and return its config, or None (and say why) when it cannot be retimed: the cell then runs."""
    from fedspine.config import config_from_mapping
    from fedspine.fl.retime import RetimeError, retime, retime_summary
    from fedspine.fl.world import World
    from fedspine.logging import read_metrics, write_atomic

    if not _same_defaults(cell, source):
        return None
    model = json.dumps(_wanted(cell)["model"], sort_keys=True)
    try:
        ran = config_from_mapping(_read_json(source / "config.json"))
        if model not in worlds:
            worlds[model] = World.build(cell.cfg)
        records = retime(read_metrics(source), ran, cell.cfg, world=worlds[model])
    except RetimeError as exc:
        print(f"{label}: not retimed from {source}: {exc}", flush=True)
        return None
    summary = retime_summary(records, _read_json(source / "summary.json"), cell.cfg)
    summary.pop("reused_from", None)
    summary["retimed_from"] = source.as_posix()
    run_dir.mkdir(parents=True, exist_ok=True)  # the summary last: a run is finished once it exists
    write_atomic(run_dir / "config.json", json.dumps(_wanted(cell), indent=2, default=str))
    write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in records))
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    print(f"{label}: the same training finished in {source} on another fleet; retimed", flush=True)
    return _wanted(cell)


def _replayed(cell: Cell, source: Path, run_dir: Path, label: str) -> Any:
    """Write ``cell``'s run as ``source``'s records when the cell's strategy, fed that run's
    observations, assigns every arm it did (``fedspine.fl.replay``), and return the cell's config;
    None (and say where they part, or why it cannot tell) when the cell must run."""
    from fedspine.config import config_from_mapping
    from fedspine.fl.replay import ReplayError, first_divergence
    from fedspine.fl.strategies import resolved_params
    from fedspine.logging import read_metrics, write_atomic

    try:
        records = read_metrics(source)
        ran = config_from_mapping(_read_json(source / "config.json"))
        parts = first_divergence(records, ran, cell.cfg)
    except ReplayError as exc:
        print(f"{label}: not replayed from {source}: {exc}", flush=True)
        return None
    if parts is not None:
        print(f"{label}: {source} allocates differently from round {parts}; not replayed", flush=True)
        return None
    summary = dict(_read_json(source / "summary.json"))
    summary.pop("reused_from", None)
    summary.setdefault("ran_strategy_params", summary.get("strategy_params"))  # what it was run with
    summary["strategy_params"] = resolved_params(cell.cfg.strategy.name, cell.cfg.strategy.params)
    summary["replayed_from"] = summary.get("replayed_from") or source.as_posix()
    run_dir.mkdir(parents=True, exist_ok=True)  # the summary last: a run is finished once it exists
    if source.resolve() != run_dir.resolve():
        write_atomic(run_dir / "metrics.jsonl", (source / "metrics.jsonl").read_text())
    write_atomic(run_dir / "config.json", json.dumps(_wanted(cell), indent=2, default=str))
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    print(f"{label}: the same allocation as {source}, round for round; replayed", flush=True)
    return _wanted(cell)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _stored_config(path: Path) -> Any:
    """A run's recorded config with the fields added to ``RunConfig`` since it ran filled in at
    their defaults. A new field's default is the behaviour from before it existed (the rule for
    adding one), so the run is the run today's config describes; without this every finished
    run would look changed, and be rerun, after any field is added."""
    stored = _read_json(path)
    if stored is None:
        return None
    from fedspine.config import RunConfig, fill_missing

    return fill_missing(stored, json.loads(json.dumps(RunConfig().to_dict())))


__all__ = ["CellResult", "finished_runs", "read_finished", "run_cells"]
