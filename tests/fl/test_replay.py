"""Replaying a finished run's allocation under other strategy parameters (fedspine.fl.replay)."""

import pytest

from fedspine.config import load_config
from fedspine.fl.replay import ReplayError, check_replayable, first_divergence
from fedspine.fl.simulator import run

TINY = [
    "log.progress=false",
    "fleet.devices=8",
    "train.rounds=4",
    "train.local_steps=4",
    "train.prune_interval=2",
    "data.max_examples=240",
    "strategy.name=fedspine",
]
# one variant that keeps every choice on this run, and two that part from it (checked below)
VARIANTS = [
    "strategy.params.value_confidence=0.0",
    "strategy.params.objective=paper",
    "strategy.params.explore_factor=1.5",
]


def strip(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


@pytest.fixture(scope="module")
def source():
    cfg = load_config(None, TINY)
    return cfg, run(cfg).records


def test_a_run_replays_to_itself(source):
    cfg, records = source
    assert first_divergence(records, cfg, cfg) is None


@pytest.mark.slow
def test_the_replay_says_exactly_where_a_real_run_of_the_other_parameters_parts(source):
    """The claim the module makes, checked against real runs: no divergence means the same
    records; a divergence at round k means the same arms before k and other arms at k."""
    cfg, records = source
    verdicts = []
    for override in VARIANTS:
        target = load_config(None, [*TINY, override])
        k = first_divergence(records, cfg, target)
        real = run(target).records
        if k is None:
            assert strip(real) == strip(records), override
        else:
            assert [r["arms"] for r in real[: k - 1]] == [r["arms"] for r in records[: k - 1]], override
            assert real[k - 1]["arms"] != records[k - 1]["arms"], override
        verdicts.append(k)
    assert None in verdicts and any(k is not None for k in verdicts)  # both cases were exercised


def test_it_refuses_what_it_cannot_replay(source):
    cfg, records = source
    with pytest.raises(ReplayError, match="'train.lr'"):
        check_replayable(cfg, load_config(None, [*TINY, "train.lr=0.01"]))
    older = [{k: v for k, v in r.items() if k != "reports"} for r in records]
    with pytest.raises(ReplayError, match="no per-device reports"):
        first_divergence(older, cfg, cfg)
    # where it logs is not what it learns
    assert check_replayable(cfg, load_config(None, [*TINY, "log.dir=elsewhere"])) is None
