"""Adapters as plain peft adapters. The run saves the global adapter at chosen rounds; loaded
with ``PeftModel.from_pretrained`` on the unpruned base it scores what the simulator recorded. A
device's export (pruned base + adapter) loads with plain peft and is its in-memory model."""

import copy
import json

import pytest
import torch
from peft import PeftModel

from fedspine.config import load_config
from fedspine.fl import checkpoint
from fedspine.fl.build import check
from fedspine.fl.simulator import Simulation, run, run_in_dir
from fedspine.fl.world import World
from fedspine.pruning import export_for_deployment, load_pruned

BASE = [
    "log.progress=false",
    "fleet.devices=6",
    "train.rounds=3",
    "train.local_steps=4",
    "train.prune_interval=2",
    "data.max_examples=400",
    "train.lr=0.01",  # so that the global accuracy moves between rounds 2 and 3 (0.55, 0.625)
    "arms.ranks=[2,4]",
]


def _logits(model, data):
    with torch.no_grad():
        model.eval()
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 3-round run into a run dir, adapters saved after round 2 and at the end; then a fresh
    ``Simulation`` restored from its checkpoint (the simulator's own global and device models)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [*BASE, "log.save_adapter_rounds=[2]", "log.save_adapter_final=true"])
    result = run_in_dir(cfg, run_dir)
    world = World.build(cfg)  # the unpruned base, rebuilt from the config alone
    sim = Simulation(cfg, world=world)
    sim.restore(*checkpoint.load(run_dir / "checkpoint"))
    return run_dir, result, world, sim


def test_saved_global_adapters_load_with_plain_peft_and_give_the_recorded_accuracy(finished):
    run_dir, result, world, sim = finished
    adapters = run_dir / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["final", "round-0002"]
    accs = [r["accuracy"] for r in result.records]
    assert accs[1] != accs[2]  # else equal accuracies below would not tell the adapters apart
    for name, rnd in (("round-0002", 2), ("final", 3)):
        model = PeftModel.from_pretrained(copy.deepcopy(world.model0), adapters / name)
        assert model.peft_config["default"].r == 4  # r_max: the global adapter's rank
        assert world.task.evaluate(model, world.data.test)["accuracy"] == accs[rnd - 1], name

    final = PeftModel.from_pretrained(copy.deepcopy(world.model0), adapters / "final")
    expected = _logits(sim.global_model(), world.data.test)  # the simulator's global model, round 3
    torch.testing.assert_close(_logits(final, world.data.test), expected, rtol=0, atol=1e-6)
    early = PeftModel.from_pretrained(copy.deepcopy(world.model0), adapters / "round-0002")
    assert not torch.allclose(_logits(early, world.data.test), expected)


def test_device_export_loads_with_plain_peft_on_its_pruned_base(finished, tmp_path):
    _, _, world, sim = finished
    device = max(sim.server.kept, key=lambda d: sim.server.kept_map(d).sparsity(world.family.mlp_matrices))
    kept = sim.server.kept_map(device)
    assert kept.sparsity(world.family.mlp_matrices) > 0  # a pruned device
    model = sim.device_model(device)
    expected = _logits(model, world.data.test)
    export_for_deployment(model, tmp_path, kept_map=kept, adapter=True)
    assert json.loads((tmp_path / "fedspine_pruning.json").read_text())["adapter"] == "adapter"
    reloaded = PeftModel.from_pretrained(load_pruned(tmp_path), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, world.data.test), expected, rtol=0, atol=1e-5)
    accuracy = world.task.evaluate(reloaded, world.data.test)["accuracy"]
    assert accuracy == sim.evaluate_device(device, sim.runner.device_models()[device])
    with pytest.raises(ValueError, match="device 'd999' has no model in this process"):
        sim.device_model("d999")


def test_adapter_saving_is_checked_before_any_work():
    with pytest.raises(
        ValueError, match=r"log.save_adapter_rounds must be round numbers in \[1, train.rounds = 3\]"
    ):
        load_config(None, [*BASE, "log.save_adapter_rounds=[0]"])
    with pytest.raises(ValueError, match=r"log.save_adapter_rounds must be .*got \(2, 4\)"):
        load_config(None, [*BASE, "log.save_adapter_rounds=[2,4]"])
    with pytest.raises(ValueError, match="log.save_adapter_final must be bool"):
        load_config(None, [*BASE, "log.save_adapter_final=maybe"])
    flora = load_config(None, [*BASE, "strategy.name=flora", "log.save_adapter_final=true"])
    with pytest.raises(ValueError, match="rule 'flora' as a peft adapter: it folds each round into the base"):
        check(flora)
    assert check(load_config(None, [*BASE, "strategy.name=flora"]))  # fine without saving
    with pytest.raises(ValueError, match="need adapter_dir"):
        run(load_config(None, [*BASE, "log.save_adapter_final=true"]))
