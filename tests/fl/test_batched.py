"""The batched runner against the per-device path it stands in for (``fedspine.fl.batched``).

Equality is stated for fp32 with dropout off (dropout draws from a different stream there): the
same kept maps, probe losses equal to float summation order, adapters within 1e-3 of each
tensor's largest entry plus 5% of one AdamW step (AdamW divides by the gradient's own size, so
float noise in a near-zero gradient can move an entry by a fraction of the learning rate).
"""

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import TINY
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fedspine.config import config_from_mapping
from fedspine.fl.batched import BATCHED_FAMILIES, BatchedRunner, _keep_mask
from fedspine.fl.build import check
from fedspine.fl.client import client_step
from fedspine.fl.placement import cpu_flags, cpu_has_bf16, resolve_device, resolve_precision
from fedspine.fl.runners import InProcessRunner
from fedspine.fl.simulator import Simulation, default_runner
from fedspine.fl.world import World
from fedspine.pruning.arch import FAMILIES, arch_shape, family_of


def _cfg(**over):
    raw = {
        "model": {"name": "tiny-bert", "max_length": 16},
        "data": {"max_examples": 400},
        "fleet": {"devices": 4},
        "train": {"rounds": 2, "local_steps": 6, "prune_interval": 3, "precision": "fp32", "batch_size": 8},
        "arms": {"ratios": [0.3, 0.5], "ranks": [4, 8, 16]},
        "strategy": {"name": "random-arm"},
        "log": {"progress": False},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return config_from_mapping(raw)


def _world(cfg) -> World:
    world = World.build(cfg)
    for m in world.model0.modules():  # equality is claimed without dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return world


def _close(ref: dict, got: dict, lr: float, rel: float = 1e-3) -> None:
    assert ref.keys() == got.keys()
    for key in ref:
        tol = rel * float(np.abs(ref[key]).max()) + 0.05 * lr
        assert np.abs(ref[key] - got[key]).max() <= tol, key


MODELS = pytest.mark.parametrize(
    "model",
    [
        {"model__name": "tiny-bert"},
        {"model__name": "tiny-llama"},
        {"model__name": "tiny-llama", "model__task": "causal-lm"},
    ],
    ids=["bert", "llama", "llama-lm"],
)


@MODELS
def test_one_round_equals_the_per_device_path(model):
    cfg = _cfg(**model)
    _one_round_equals_the_per_device_path(cfg, _world(cfg))


@pytest.mark.parametrize(
    ("model_type", "task"),
    [
        ("roberta", "classification"),
        ("qwen2", "classification"),
        ("qwen3", "causal-lm"),
        ("mistral", "causal-lm"),
    ],
)
def test_other_registered_model_types_batch_equal_to_the_per_device_path(model_type, task):
    """Every model type of the registry batches: the mask recipe is keyed by family, and the
    hooks find modules by role. The world's tiny model is swapped for one of ``model_type``."""
    cfg = _cfg(model__name="tiny-bert" if task == "classification" else "tiny-llama", model__task=task)
    world = _world(cfg)
    config = TINY[model_type]().config
    config.update({"num_labels": world.data.num_labels, "use_cache": False})
    if config.pad_token_id is None:
        config.pad_token_id = 0  # decoders classify at the last non-pad token
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    world = dataclasses.replace(world, model0=model, family=family_of(model), shape=arch_shape(model))
    assert model.config.model_type == model_type
    assert {f.name for f in FAMILIES.values()} == set(BATCHED_FAMILIES)  # every family has a mask recipe
    _one_round_equals_the_per_device_path(cfg, world)


def _one_round_equals_the_per_device_path(cfg, world):
    sim = Simulation(cfg, world=world)
    world = sim.world
    ins = sim.server.configure(1, world.device_ids)
    assert len({i.rank for i in ins.values()}) > 1  # mixed ranks in one pass
    runner = BatchedRunner(world)
    got = runner.execute(1, ins, {d: sim.server.kept_map(d) for d in ins})
    assert runner.last_groups == [list(ins)]
    for d, i in ins.items():
        ref, _ = client_step(i, world.device_state(), world.local_data(d))
        res = got[d].result
        assert res.kept_map == ref.kept_map
        assert res.achieved_ratio == ref.achieved_ratio > 0
        assert res.loss_before == pytest.approx(ref.loss_before, rel=1e-5)
        assert res.loss_after == pytest.approx(ref.loss_after, rel=1e-4)
        _close(ref.adapter, res.adapter, cfg.train.lr)
        assert res.metrics["bf16"] == ref.metrics["bf16"] == 0.0


def test_a_run_gives_the_per_device_records():
    cfg = _cfg(train__runner="per-device")
    ref = Simulation(cfg, world=_world(cfg))
    assert isinstance(ref.runner, InProcessRunner)
    bcfg = _cfg(train__runner="batched")
    got = Simulation(bcfg, world=_world(bcfg))
    assert isinstance(got.runner, BatchedRunner)
    for _ in range(cfg.train.rounds):
        a, b = ref.run_round(), got.run_round()
        assert a["arms"] == b["arms"]
        assert a["round_time_s"] == pytest.approx(b["round_time_s"])  # same kept maps, same clock
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=0.02)
    for d, model in got.runner.device_models().items():  # rebuilt from the kept maps
        ref_model = ref.runner.device_models()[d]
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref_model.parameters())


def test_what_cannot_be_batched_runs_per_device_or_is_refused():
    cfg = _cfg(train__importance="magnitude", train__rounds=1)
    sim = Simulation(cfg)
    record = sim.run_round()
    assert sim.runner.last_groups == [] and record["mean_sparsity"] > 0
    with pytest.raises(ValueError, match="train.runner 'batched' needs train.importance"):
        check(_cfg(train__importance="magnitude", train__runner="batched"))
    with pytest.raises(ValueError, match="flora"):
        check(_cfg(strategy__name="flora", train__runner="batched"))
    with pytest.raises(ValueError, match="train.runner"):
        check(_cfg(train__runner="fast"))


def test_bf16_trains_close_to_fp32():
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = _cfg(train__precision=precision)
        sim = Simulation(cfg, world=_world(cfg))
        ins = sim.server.configure(1, sim.world.device_ids)
        out[precision] = default_runner(cfg, sim.world).execute(
            1, ins, {d: sim.server.kept_map(d) for d in ins}
        )
    for d, reply in out["bf16"].items():
        res, ref = reply.result, out["fp32"][d].result
        assert res.metrics["bf16"] == 1.0
        assert all(np.isfinite(v).all() for v in res.adapter.values())
        assert res.loss_after == pytest.approx(ref.loss_after, abs=0.05)


def test_fast_dropout_mask_has_the_stated_rate_and_replays():
    gen = torch.Generator().manual_seed(3)
    keep, scale = _keep_mask(torch.Size([1000, 1000]), 0.1, gen, torch.device("cpu"))
    p_drop = round(0.1 * 2**15) / 2**15
    assert abs(1 - float(keep.float().mean()) - p_drop) < 2e-3
    assert scale == pytest.approx(1 / (1 - p_drop))
    again, _ = _keep_mask(
        torch.Size([1000, 1000]), 0.1, torch.Generator().manual_seed(3), torch.device("cpu")
    )
    assert torch.equal(keep, again)


def test_precision_follows_the_cpu_flags():
    plain = "processor : 0\nflags\t\t: fpu sse avx2\n"
    amx = "processor : 0\nflags\t\t: fpu avx2 amx_bf16 avx512_bf16\n"
    assert cpu_flags(plain) == {"fpu", "sse", "avx2"}
    assert not cpu_has_bf16(plain) and cpu_has_bf16(amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, cpuinfo=plain) == torch.float32  # the fallback
    assert resolve_precision("auto", cpu, cpuinfo=amx) == torch.bfloat16
    assert resolve_precision("fp32", cpu, cpuinfo=amx) == torch.float32  # forced
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="train.precision"):
        check(config_from_mapping({"train": {"precision": "fp16"}}))


@MODELS
def test_the_packed_forward_equals_the_padded_one(model):
    """Real tokens only (``PACKING``) gives the padded forward's losses and factor gradients."""
    cfg = _cfg(**model)
    world = _world(cfg)
    sim = Simulation(cfg, world=world)
    ids = world.device_ids
    ins = sim.server.configure(1, ids)
    trainer = BatchedRunner(world, group_size=len(ids)).trainer(ins[ids[0]].config)
    assert trainer.packing is not None
    devs = [trainer._device(ins[d], sim.server.kept_map(d), world.local_data(d), ins[d].config) for d in ids]
    ps = trainer._build_pass(devs)
    trainer._pass = ps
    batches = [next(d.data.batches(torch.Generator().manual_seed(j))) for j, d in enumerate(devs)]
    lengths = torch.Generator().manual_seed(1)
    for b in batches:  # right padding of various lengths (the synthetic texts fill max_length)
        for row, n in enumerate(
            torch.randint(3, b["input_ids"].shape[1] + 1, (len(b["input_ids"]),), generator=lengths)
        ):
            b["input_ids"][row, n:] = trainer.pad_id
            b["attention_mask"][row, n:] = 0
            if b["labels"].ndim == 2:
                b["labels"][row, n:] = -100
    factors = [t for ab in ps.lora.values() for t in ab]
    got = {}
    for packing in (trainer.packing, None):
        trainer.packing = packing
        batch, sizes = trainer._concat(batches)
        losses = torch.stack(trainer._losses(batch, sizes, [("ce", None)] * len(devs)))
        got[packing] = (losses.detach(), torch.autograd.grad(losses.sum(), factors))
        if packing is not None:  # fewer token rows than the padded batch, every real token kept
            assert ps.packed.ids.numel() < batch["input_ids"].numel()
            assert ps.packed.per_device * len(devs) >= int(batch["attention_mask"].sum())
    (lp, gp), (lu, gu) = got.values()
    torch.testing.assert_close(lp, lu, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp, gu, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()) + 1e-9)
    trainer._pass = None
