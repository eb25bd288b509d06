"""Issue #14: bad inputs are refused before any work, with one message that names the field.

Each row of ``ROWS`` is a test and a row of the table in ``docs/reliability.md``; the table holds
the real messages (``python tests/test_reliability.py`` rewrites it from the rows). A CLI row
runs ``fedspine`` in this process and checks: exit code 2, one line ``fedspine: error: ...``
ending stderr, no traceback, the field named, and no run dir. An API row checks the error names the
argument and the object is left as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
SMOKE = "experiments/configs/smoke.yaml"
START, END = "<!-- rows: python tests/test_reliability.py -->", "<!-- end of rows -->"


@dataclass(frozen=True)
class Row:
    input: str  # what the user gives, as the table shows it (<tmp> = a scratch folder)
    where: str  # what refuses it
    names: str  # what the message must name: the field, file, flag or argument
    run: Callable[[Path], str]  # the error message, given the scratch folder (asserts the refusal)


def make_files(tmp: Path) -> None:
    """The bad files some rows point at."""
    (tmp / "dup.yaml").write_text("seed: 0\nmodel: {name: tiny-bert}\nseed: 1\n")
    (tmp / "syntax.yaml").write_text("model: {name: tiny-bert\n  max_length: [32\n")
    (tmp / "list.yaml").write_text("- seed: 0\n")
    (tmp / "bad.toml").write_text("seed = 0\nseed = 1\n")
    (tmp / "empty.csv").write_text("")
    (tmp / "wrong.csv").write_text("review,stars\ngood,5\nbad,1\n")
    (tmp / "data.txt").write_text("good\tpos\n")
    (tmp / "emptymodel").mkdir()
    (tmp / "afile").write_text("not a folder")
    (tmp / "conf.d").mkdir()


def cli(*args: str, config: str | None = SMOKE) -> Callable[[Path], str]:
    """A row that runs ``fedspine run`` (or ``demo``) on the smoke config plus ``args``."""

    def run(tmp: Path) -> str:
        from fedspine.cli import main

        argv = [a.replace("<tmp>", str(tmp)) for a in args]
        if argv[:1] not in (["demo"], ["flower"]):
            head = ["run", *(["--config", config.replace("<tmp>", str(tmp))] if config else [])]
            if "--resume" not in argv:
                head += [f"log.dir={tmp}/runs", "log.progress=false"]
            argv = [*head, *argv]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        text = err.getvalue()
        assert rc == 2, f"accepted (rc {rc}): {argv}\n{text}"
        assert "Traceback" not in text, text
        # one error line, the last (a model load may log its own notes before it)
        errors = [line for line in text.splitlines() if line.startswith("fedspine: error: ")]
        assert len(errors) == 1 and text.rstrip().endswith(errors[0]), text
        assert not (tmp / "runs").exists(), "a refused run wrote its run dir"
        return errors[0].removeprefix("fedspine: error: ")

    return run


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


def allocator_other_arm(tmp: Path) -> str:
    from fedspine.bandit import Allocator, ArmSpace, RoundReport

    space = ArmSpace.grid([0.0, 0.5], [4, 8])
    alloc = Allocator(space, seed=0)
    arms = alloc.assign([0, 1], 1)
    before = json.dumps(alloc.state_dict(), sort_keys=True)
    other = next(space[i] for i in range(len(space)) if space[i] != arms[0])
    msg = refused(
        lambda: alloc.observe_round(
            [RoundReport(0, other, 1.0, 1.0, 0.9), RoundReport(1, arms[1], 1.0, 1.0, 0.9)]
        )
    )
    assert json.dumps(alloc.state_dict(), sort_keys=True) == before  # nothing learnt, nothing cleared
    return msg


TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def prune_and_tune(adapter: Callable, **kwargs) -> Callable[[Path], str]:
    """A row that builds ``PruneAndTune`` on a tiny BERT wrapped by ``adapter``; the refused
    model must be the same peft model with the same adapter values afterwards."""

    def run(tmp: Path) -> str:
        from peft import PeftModel
        from tiny_models import tiny_bert

        from fedspine.lora import extract
        from fedspine.pruning import KeptIndexMap, arch_shape
        from fedspine.pruning.iterative import PruneAndTune, PruneSchedule

        model = adapter(tiny_bert())
        hf = model.base_model.model if isinstance(model, PeftModel) else model
        before = extract(model) if isinstance(model, PeftModel) else None
        msg = refused(
            lambda: PruneAndTune(model, KeptIndexMap.full(arch_shape(hf)), PruneSchedule(0.5), 20, **kwargs)
        )
        if before is not None:
            after = extract(model)
            assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in after)
        return msg

    return run


def _attach(rank=8, **kw):
    def make(m):
        from fedspine.lora import attach

        return attach(m, rank, **kw)

    return make


def _lora(adapters=1, **kw):
    def make(m):
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(m, LoraConfig(r=8, **{"target_modules": TARGETS, **kw}))
        for i in range(1, adapters):
            pm.add_adapter(f"second{i}", LoraConfig(r=4, target_modules=TARGETS))
        return pm

    return make


V, L, C, W, K = "config.validate", "config.load_config", "fl.build.check", "fl.world.World.build", "cli"
ROWS = [
    # numbers: ranges, inf and NaN
    Row("fleet.devices=0", V, "fleet.devices", cli("fleet.devices=0")),
    Row("train.lr=.inf", V, "train.lr", cli("train.lr=.inf")),
    Row("train.lr=.nan", V, "train.lr", cli("train.lr=.nan")),
    Row("train.lr=-1", V, "train.lr", cli("train.lr=-1")),
    Row("train.server_lr=.inf", V, "train.server_lr", cli("train.server_lr=.inf")),
    Row("train.head_lr=.inf", V, "train.head_lr", cli("train.head_lr=.inf")),
    Row("data.alpha=.inf", V, "data.alpha", cli("data.alpha=.inf")),
    Row("data.alpha=0", V, "data.alpha", cli("data.alpha=0")),
    Row("train.round_to=0", V, "train.round_to", cli("train.round_to=0")),
    Row("train.local_steps=0", V, "train.local_steps", cli("train.local_steps=0")),
    Row("train.batch_size=0", V, "train.batch_size", cli("train.batch_size=0")),
    Row("train.server_momentum=1", V, "train.server_momentum", cli("train.server_momentum=1")),
    Row("data.max_test=0", V, "data.max_test", cli("data.max_test=0")),
    Row("data.max_test=-5", V, "data.max_test", cli("data.max_test=-5")),
    Row("data.min_size=0", V, "data.min_size", cli("data.min_size=0")),
    Row("data.test_fraction=1", V, "data.test_fraction", cli("data.test_fraction=1")),
    Row("data.max_examples=5", V, "data.max_examples", cli("data.max_examples=5")),
    Row("eval.target_accuracy=.nan", V, "eval.target_accuracy", cli("eval.target_accuracy=.nan")),
    Row("eval.target_accuracy=1.5", V, "eval.target_accuracy", cli("eval.target_accuracy=1.5")),
    Row("eval.every=0", V, "eval.every", cli("eval.every=0")),
    Row("fleet.participation=0", V, "fleet.participation", cli("fleet.participation=0")),
    Row("fleet.spread=1", V, "fleet.spread", cli("fleet.spread=1")),
    Row("arms.ratios=[1.0]", V, "arms.ratios", cli("arms.ratios=[1.0]")),
    Row("arms.ranks=[]", V, "arms.ranks", cli("arms.ranks=[]")),
    Row("checkpoint_every=0", V, "checkpoint_every", cli("checkpoint_every=0")),
    Row("seed=-1", V, "seed", cli("seed=-1")),
    # types and names
    Row("seed=abc", "config (types)", "seed", cli("seed=abc")),
    Row("seed=1.5", "config (types)", "seed", cli("seed=1.5")),
    Row("train.rounds=2.5", "config (types)", "train.rounds", cli("train.rounds=2.5")),
    Row("train.lrr=0.1", "config (types)", "train.lrr", cli("train.lrr=0.1")),
    Row("strategy.name=fedsgd", V, "strategy.name", cli("strategy.name=fedsgd")),
    Row("strategy.aggregation=median", V, "strategy.aggregation", cli("strategy.aggregation=median")),
    Row("data.partition=shards", V, "data.partition", cli("data.partition=shards")),
    Row("model.name=bert-base", V, "model.name", cli("model.name=bert-base")),
    Row("model.task=causal-lm", V, "model.name", cli("model.task=causal-lm")),
    Row(
        "strategy.name=fixed-prune strategy.params.ratio=1.5",
        C,
        "strategy.params.ratio",
        cli("strategy.name=fixed-prune", "strategy.params.ratio=1.5"),
    ),
    Row(
        "train.runner=batched train.importance=magnitude",
        C,
        "train.runner",
        cli("train.runner=batched", "train.importance=magnitude"),
    ),
    # paths
    Row("log.dir=<tmp>/afile", V, "log.dir", cli("log.dir=<tmp>/afile")),
    Row("log.dir=<tmp>/afile/runs", V, "log.dir", cli("log.dir=<tmp>/afile/runs")),
    Row("log.name=a/b", V, "log.name", cli("log.name=a/b")),
    Row("model.name=<tmp>/emptymodel", V, "model.name", cli("model.name=<tmp>/emptymodel")),
    Row("data.source=<tmp>/empty.csv (0 bytes)", V, "data.source", cli("data.source=<tmp>/empty.csv")),
    Row("data.source=<tmp>/emptymodel (empty folder)", V, "data.source", cli("data.source=<tmp>/emptymodel")),
    Row("data.source=<tmp>/wrong.csv on tiny-bert", V, "model.name", cli("data.source=<tmp>/wrong.csv")),
    Row(
        "data.source=<tmp>/wrong.csv (no text/label columns)",
        W,
        "data.source",
        cli("data.source=<tmp>/wrong.csv", "model.name=all-minilm-l6-v2"),
    ),
    Row(
        "data.source=<tmp>/data.txt (unknown file type)",
        W,
        "data.source",
        cli("data.source=<tmp>/data.txt", "model.name=all-minilm-l6-v2"),
    ),
    # what only the model and the data can tell
    Row("arms.ranks=[4,128]", W, "arms.ranks", cli("arms.ranks=[4,128]")),
    Row("model.max_length=4096", W, "model.max_length", cli("model.max_length=4096")),
    Row("fleet.devices=300 (too few examples)", W, "fleet.devices", cli("fleet.devices=300")),
    Row(
        "fleet.devices=40 data.alpha=0.01 (no partition)",
        W,
        "data.alpha",
        cli("fleet.devices=40", "data.alpha=0.01", "data.min_size=8"),
    ),
    # config files and overrides
    Row("--config <tmp>/dup.yaml (seed twice)", L, "dup.yaml", cli(config="<tmp>/dup.yaml")),
    Row("--config <tmp>/syntax.yaml", L, "syntax.yaml", cli(config="<tmp>/syntax.yaml")),
    Row("--config <tmp>/list.yaml (a list)", L, "list.yaml", cli(config="<tmp>/list.yaml")),
    Row("--config <tmp>/bad.toml (seed twice)", L, "bad.toml", cli(config="<tmp>/bad.toml")),
    Row("--config <tmp>/missing.yaml", L, "missing.yaml", cli(config="<tmp>/missing.yaml")),
    Row("--config <tmp>/conf.d (a folder)", L, "conf.d", cli(config="<tmp>/conf.d")),
    Row("train.lr (no =)", L, "train.lr", cli("train.lr")),
    Row("arms.ranks=[4,", L, "arms.ranks", cli("arms.ranks=[4,")),
    Row("model=tiny-bert (not a section)", "config (types)", "model", cli("model=tiny-bert")),
    # flags
    Row("run --resume <tmp>/nothing", K, "--resume", cli("--resume", "<tmp>/nothing", config=None)),
    Row("demo --every 0", K, "--every", cli("demo", "--every", "0")),
    Row("demo --devices 0", K, "--devices", cli("demo", "--devices", "0")),
    Row("demo --safe-slack inf", K, "--safe-slack", cli("demo", "--safe-slack", "inf")),
    Row("demo --policy greedy", K, "--policy", cli("demo", "--policy", "greedy")),
    Row(
        "flower sim arms.ranks=[128]",
        "flower (World.build)",
        "arms.ranks",
        cli("flower", "sim", "--config", SMOKE, "--out", "<tmp>/runs", "arms.ranks=[128]"),
    ),
    # public API
    Row(
        "Allocator.observe_round: a report for another arm than assigned",
        "bandit.Allocator",
        "arm (device 0)",
        allocator_other_arm,
    ),
    Row(
        "PruneAndTune(rank=4) on a rank-8 adapter", "PruneAndTune", "rank", prune_and_tune(_attach(), rank=4)
    ),
    Row(
        "PruneAndTune(alpha=8) on an alpha-16 adapter",
        "PruneAndTune",
        "alpha",
        prune_and_tune(_attach(), alpha=8),
    ),
    Row(
        "PruneAndTune on LoRA on q/v only (LoRA-gradient importance)",
        "PruneAndTune",
        "importance 'lora_gradient'",
        prune_and_tune(_attach(targets=["query", "value"])),
    ),
    Row("PruneAndTune on DoRA", "PruneAndTune", "LoraConfig.use_dora", prune_and_tune(_lora(use_dora=True))),
    Row(
        "PruneAndTune on LoRA with biases",
        "PruneAndTune",
        "LoraConfig.bias",
        prune_and_tune(_lora(bias="all")),
    ),
    Row(
        "PruneAndTune on a rank_pattern",
        "PruneAndTune",
        "LoraConfig.rank_pattern",
        prune_and_tune(_lora(rank_pattern={"query": 4})),
    ),
    Row(
        "PruneAndTune on two adapters",
        "PruneAndTune",
        "exactly one adapter",
        prune_and_tune(_lora(adapters=2)),
    ),
    Row(
        "PruneAndTune on LoRA on the embeddings",
        "PruneAndTune",
        "word_embeddings",
        prune_and_tune(_lora(target_modules=[*TARGETS, "word_embeddings"])),
    ),
    Row("PruneAndTune on a plain model", "PruneAndTune", "model", prune_and_tune(lambda m: m)),
    Row(
        "PruneAndTune(importance='random')",
        "PruneAndTune",
        "importance",
        prune_and_tune(_attach(), importance="random"),
    ),
    Row(
        "PruneAndTune(importance='taylor') without calib",
        "PruneAndTune",
        "calib",
        prune_and_tune(_attach(), importance="taylor"),
    ),
]


def message(row: Row, tmp: Path) -> str:
    """The row's error message as the table shows it: the scratch folder as ``<tmp>``."""
    make_files(tmp)
    return row.run(tmp).replace(str(tmp), "<tmp>")


def render(messages: list[str]) -> str:
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| input | where | error message |", "|---|---|---|"]
    lines += [f"| `{cell(r.input)}` | {r.where} | {cell(m)} |" for r, m in zip(ROWS, messages, strict=True)]
    return "\n".join(lines)


def doc_rows() -> dict[str, tuple[str, str]]:
    text = DOC.read_text()
    table = text[text.index(START) + len(START) : text.index(END)]
    out = {}
    for line in table.strip().splitlines()[2:]:
        m = re.fullmatch(r"\| `(.*)` \| (.*?) \| (.*) \|", line)
        assert m, line
        out[m.group(1).replace("\\|", "|")] = (m.group(2), m.group(3).replace("\\|", "|"))
    return out


def test_the_table_has_every_row_and_at_least_40():
    assert len(ROWS) >= 40 and len({r.input for r in ROWS}) == len(ROWS)
    assert list(doc_rows()) == [r.input for r in ROWS], "rewrite it: python tests/test_reliability.py"


@pytest.mark.parametrize("row", ROWS, ids=[r.input for r in ROWS])
def test_each_bad_input_is_refused_naming_the_field(row, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the smoke config is named relative to the repository
    got = message(row, tmp_path)
    assert row.names in got, f"the message does not name {row.names!r}: {got}"
    assert doc_rows()[row.input] == (row.where, got), "rewrite it: python tests/test_reliability.py"


def main() -> None:
    """Rewrite the table of docs/reliability.md from the rows and their real messages."""
    import os
    import tempfile

    import torch

    torch.set_num_threads(1)
    os.chdir(ROOT)
    messages = []
    for row in ROWS:
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context():
            messages.append(message(row, Path(tmp).resolve()))
    text = DOC.read_text()
    head, tail = text[: text.index(START) + len(START)], text[text.index(END) :]
    DOC.write_text(f"{head}\n{render(messages)}\n{tail}")
    print(f"{DOC}: {len(ROWS)} rows")


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout first, and tests/tiny_models.py
    main()
