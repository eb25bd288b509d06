"""Run logging: a JSONL file per run, always; Weights & Biases when enabled (offline by default
for real runs so nothing needs a login; disabled in tests). wandb is imported only when used.

(Import it as ``fedspine.logging``; never run scripts from inside ``fedspine/``, where this
module would shadow the standard library's ``logging``.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        config: dict[str, Any],
        wandb_mode: str = "disabled",
        project: str = "fedspine",
        name: str | None = None,
        group: str | None = None,
        resume: bool = False,
    ):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if not resume and self.path.exists():
            self.path.unlink()
        write_atomic(self.dir / "config.json", json.dumps(config, indent=2, default=str))
        self._wandb = None
        self._arm_rows: list[list[Any]] = []
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=project,
                name=name,
                group=group,
                mode=wandb_mode,
                dir=str(self.dir),
                config=config,
                reinit="finish_previous",
            )

    def log_round(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        for device, (ratio, rank) in record.get("arms", {}).items():
            self._arm_rows.append(
                [record["round"], device, record.get("tiers", {}).get(device, ""), ratio, rank]
            )
        if self._wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
            self._wandb.log(scalars, step=record["round"])

    def replace(self, records: list[dict[str, Any]]) -> None:
        """On resume: the log holds exactly the checkpointed rounds (later lines were never
        checkpointed and will be recomputed)."""
        write_atomic(self.path, "".join(json.dumps(r, default=float) + "\n" for r in records))

    def finish(self, summary: dict[str, Any]) -> None:
        write_atomic(self.dir / "summary.json", json.dumps(summary, indent=2, default=float))
        if self._wandb is not None:
            import wandb

            self._wandb.log(
                {
                    "arms": wandb.Table(
                        columns=["round", "device", "tier", "ratio", "rank"], data=self._arm_rows
                    )
                }
            )
            self._wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self._wandb.finish()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a kill leaves the old file or the new one, never half of one
    (``--resume`` reads config.json; a resume rewrites metrics.jsonl)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
