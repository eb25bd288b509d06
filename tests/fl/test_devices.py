"""Device profiles, the fleet builder and the round-time model (fedspine.fl.devices / time_model)."""

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest

from fedspine.fl.devices import (
    AGX_XAVIER,
    GIB,
    JETSON_TX2,
    PAPER_MIX,
    PROFILES,
    XAVIER_NX,
    DeviceProfile,
    FleetSpec,
    LinkSpec,
    fleet,
    paper_fleet,
    paper_mix_counts,
    tiers,
)
from fedspine.fl.time_model import (
    RoundWork,
    Workload,
    kept_counts,
    memory_bytes,
    payload_bytes,
    round_time,
    round_work,
    round_work_for_map,
    round_work_for_ratio,
    train_flops,
)
from fedspine.pruning.index_map import ArchShape, KeptIndexMap

# Tiny shape for hand computation: 1 layer, 2 heads of dim 2, hidden 4, 8 MLP channels, BERT MLP.
TINY = ArchShape(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=2, intermediate_size=8, hidden_size=4)
TINY_KEPT = dict(kept_heads=2, kept_kv_heads=2, kept_channels=8)
TINY_LOAD = Workload(
    lora_rank=1, lora_modules=("q",), mlp_matrices=2, steps=1, batch=1, seq_len=2, vocab_size=10
)

SMOL = ArchShape(30, 9, 3, 64, 1536, 576)  # SmolLM2-135M
SMOL_LOAD = Workload(lora_rank=8, steps=20, batch=16, seq_len=128, vocab_size=49152, mlp_matrices=3)


def test_train_flops_by_hand_on_a_tiny_shape():
    # Per token: base weights P = d*hd*(2h + 2kv) + 2*d*c = 4*2*8 + 2*4*8 = 128, LM head d*V = 40:
    #   frozen, 4 * (128 + 40) = 672; attention 12 * h * hd * seq = 12*2*2*2 = 96;
    #   LoRA on q (4 -> 4), rank 1: 6 * 1 * (4 + 4) = 48.  816 per token, 2 tokens.
    flops = train_flops(TINY, TINY_LOAD, **TINY_KEPT)
    assert flops == 2 * (672 + 96 + 48)


def test_flops_fall_with_pruning_and_grow_with_rank_steps_and_seq():
    def f(ratio=0.0, **over):
        load = dataclasses.replace(SMOL_LOAD, **over)
        return train_flops(SMOL, load, **kept_counts(SMOL, ratio, mlp_matrices=3))

    assert f(0.5) < f(0.3) < f(0.0)
    assert f(lora_rank=4) < f(lora_rank=8) < f(lora_rank=32)
    assert f(steps=10) * 2 == f(steps=20)
    assert f(seq_len=64) < f(seq_len=128) < f(seq_len=256)
    # the seq^2 attention term makes doubling seq more than double the work
    assert f(seq_len=256) > 2 * f(seq_len=128)


def test_payload_bytes_by_hand_with_grouped_query_attention():
    shape = ArchShape(
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=6, hidden_size=8
    )
    load = Workload(lora_rank=2, mlp_matrices=3, steps=1, batch=1, seq_len=8, vocab_size=0)  # all roles
    kept = dict(kept_heads=2, kept_kv_heads=1, kept_channels=4)
    pay = payload_bytes(shape, load, **kept)
    # (d_in + d_out) per layer: q 8+4, k 8+2, v 8+2, o 4+8, gate 8+4, up 8+4, down 4+8 = 80
    adapter = 2 * 80 * 2 * 4  # rank * widths * layers * fp32
    index = (2 + 1 + 4) * 2 * 4  # kept heads + kv heads + channels, per layer, int32
    assert (pay.up_bytes, pay.down_bytes) == (adapter + index, adapter)
    half = payload_bytes(shape, dataclasses.replace(load, adapter_dtype_bytes=2), **kept)
    assert half.down_bytes == adapter // 2


def test_memory_bytes_by_hand_on_a_tiny_shape():
    mem = memory_bytes(TINY, TINY_LOAD, **TINY_KEPT)
    weights = (128 + 10 * 4) * 4  # prunable weights + tied embedding, fp32
    lora = 4 * 1 * 8 * 4  # params, grads, AdamW m and v of 8 LoRA params, fp32
    # per token: 4d + 2(h+kv)hd + 2h*seq + 2(mlp-1)c + r*modules = 16 + 16 + 8 + 16 + 1
    acts = 1 * 2 * 57 * 4
    logits = 2 * 1 * 2 * 10 * 4
    assert mem == weights + lora + acts + logits
    # a classification head: no logits over the vocabulary, but the embedding table stays in memory
    cls_load = dataclasses.replace(TINY_LOAD, lm_head=False)
    assert memory_bytes(TINY, cls_load, **TINY_KEPT) == weights + lora + acts
    flops_cls = train_flops(TINY, cls_load, **TINY_KEPT)
    assert flops_cls == 2 * (4 * 128 + 96 + 48)


def test_a_model_too_big_for_the_device_fails_the_round_and_still_draws_jitter():
    work = round_work_for_ratio(SMOL, 0.0, SMOL_LOAD)
    assert work.memory_bytes > 1 * GIB  # 135M params at fp32 plus activations of 16 x 128 tokens
    tiny_device = dataclasses.replace(XAVIER_NX, name="made-up-1gb", memory_bytes=GIB)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    bad = round_time(tiny_device, work, rng_a)
    assert bad.failed and "memory" in bad.reason and "made-up-1gb" in bad.reason
    assert math.isnan(bad.total_s) and bad.energy_j == 0.0
    ok = round_time(XAVIER_NX, work, rng_b)  # about 4 GiB fits the NX's 6.5 usable GiB
    assert not ok.failed and ok.total_s > 0
    assert rng_a.random() == rng_b.random()  # a failure consumes the same draw as a success
    # pruning shrinks the requirement
    assert round_work_for_ratio(SMOL, 0.5, SMOL_LOAD).memory_bytes < work.memory_bytes


def test_round_time_is_compute_plus_comm_times_a_seeded_jitter():
    work = RoundWork(flops=2e12, up_bytes=5e6, down_bytes=1e7, memory_bytes=0)
    quiet = dataclasses.replace(JETSON_TX2, jitter_sigma=0.0)
    t = round_time(quiet, work, np.random.default_rng(0))
    compute = 2e12 / (JETSON_TX2.flops_per_s * JETSON_TX2.utilisation)
    comm = 5e6 / JETSON_TX2.up_bytes_per_s + 1e7 / JETSON_TX2.down_bytes_per_s
    assert t.compute_s == pytest.approx(compute) and t.comm_s == pytest.approx(comm)
    assert t.total_s == pytest.approx(compute + comm)
    assert t.energy_j == pytest.approx(JETSON_TX2.power_w * t.total_s)

    def five_rounds(seed):
        rng = np.random.default_rng(seed)
        return [round_time(JETSON_TX2, work, rng).total_s for _ in range(5)]

    a = five_rounds(7)
    assert a == five_rounds(7) and len(set(a)) == 5 and five_rounds(8)[0] != a[0]
    factors = np.array(a) / (compute + comm)
    assert np.all((factors > 0.5) & (factors < 2.0))  # sigma 0.1


def test_measured_times_pass_through_without_drawing():
    work = round_work_for_ratio(SMOL, 0.0, SMOL_LOAD)
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    t = round_time(AGX_XAVIER, work, rng, measured_s=12.5)
    assert (t.total_s, t.measured, t.failed) == (12.5, True, False)
    assert t.energy_j == AGX_XAVIER.power_w * 12.5 and math.isnan(t.compute_s)
    assert rng.bit_generator.state == state
    with pytest.raises(ValueError, match="measured_s"):
        round_time(AGX_XAVIER, work, rng, measured_s=-1.0)


def test_kept_index_map_wrapper_matches_the_counts():
    km = KeptIndexMap.full(SMOL).compose([(range(6), range(680))] * SMOL.num_layers)
    by_map = round_work_for_map(km, SMOL_LOAD)
    by_counts = round_work(SMOL, SMOL_LOAD, kept_heads=6, kept_kv_heads=2, kept_channels=680)
    assert by_map == by_counts == round_work_for_ratio(SMOL, 0.5, SMOL_LOAD)


@pytest.mark.parametrize(
    "shape, mlp",
    [(SMOL, 3), (ArchShape(6, 12, 12, 32, 1536, 384), 2), (ArchShape(2, 4, 2, 8, 40, 32), 3)],
)
def test_kept_counts_match_the_pruner_plan(shape, mlp):
    pytest.importorskip("torch")
    from fedspine.pruning.structured import plan_counts

    for ratio in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9):
        plan = plan_counts(shape, ratio, mlp_matrices=mlp)
        got = kept_counts(shape, ratio, mlp_matrices=mlp)
        assert (got["kept_heads"], got["kept_channels"]) == (plan.keep_heads, plan.keep_channels), ratio
        assert got["kept_kv_heads"] == plan.keep_heads // shape.group_size


def test_work_inputs_are_validated_by_name():
    with pytest.raises(ValueError, match="kept_heads"):
        train_flops(TINY, TINY_LOAD, **{**TINY_KEPT, "kept_heads": 3})
    with pytest.raises(ValueError, match="lora_modules"):
        dataclasses.replace(TINY_LOAD, lora_modules=("q", "gate"))
    with pytest.raises(ValueError, match="steps"):
        dataclasses.replace(TINY_LOAD, steps=0)
    for field, bad in [
        ("lora_rank", 0),
        ("vocab_size", -1),
        ("mlp_matrices", 4),
        ("lm_head", 1),
        ("batch", 1.0),
    ]:
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(TINY_LOAD, **{field: bad})
    plain = dataclasses.replace(TINY_LOAD, lora_rank=np.int64(4), lora_modules=["q", "v"])
    assert type(plain.lora_rank) is int and plain.lora_modules == ("q", "v") and hash(plain)
    with pytest.raises(ValueError, match="RoundWork.flops"):
        RoundWork(flops=-1.0, up_bytes=0, down_bytes=0, memory_bytes=0)


def test_paper_fleet_has_the_testbed_mix_and_a_seeded_spread():
    devices = paper_fleet(80, seed=0)
    names = [p.name for p in devices]
    assert (names.count("tx2"), names.count("nx"), names.count("agx")) == (30, 40, 10)
    assert paper_mix_counts(8) == (3, 4, 1) and sum(paper_mix_counts(13)) == 13
    assert devices == paper_fleet(80, seed=0) and devices != paper_fleet(80, seed=1)
    for p in devices:
        base = PROFILES[p.name]
        for field in ("flops_per_s", "up_bytes_per_s", "down_bytes_per_s"):
            assert 0.85 <= getattr(p, field) / getattr(base, field) <= 1.15
        assert (p.memory_bytes, p.power_w, p.utilisation) == (
            base.memory_bytes,
            base.power_w,
            base.utilisation,
        )
    t = tiers(devices)
    assert t["0"] == "tx2" and t["30"] == "nx" and t["79"] == "agx" and len(t) == 80
    slow = paper_fleet(4, seed=0, link=LinkSpec(1e5, 2e5), spread=0.0)
    assert all((p.up_bytes_per_s, p.down_bytes_per_s) == (1e5, 2e5) for p in slow)


def test_fleet_spec_is_validated():
    with pytest.raises(ValueError, match="FleetSpec.spread"):
        FleetSpec(((JETSON_TX2, 2),), spread=1.5)
    with pytest.raises(ValueError, match="count"):
        FleetSpec(((JETSON_TX2, -1),))
    assert len(fleet(FleetSpec(((JETSON_TX2, 2), (AGX_XAVIER, 3))), np.random.default_rng(0))) == 5


@pytest.mark.parametrize(
    "field, bad",
    [
        ("name", ""),
        ("flops_per_s", 0.0),
        ("memory_bytes", 1.5),
        ("up_bytes_per_s", -1.0),
        ("down_bytes_per_s", float("inf")),
        ("jitter_sigma", -0.1),
        ("power_w", 0),
        ("utilisation", 1.5),
        ("utilisation", 0.0),
    ],
)
def test_profile_validation_names_the_field(field, bad):
    with pytest.raises(ValueError, match=f"DeviceProfile.{field}"):
        dataclasses.replace(JETSON_TX2, **{field: bad})


def test_shipped_profiles_are_ordered_by_speed():
    eff = [p.effective_flops_per_s for p in (JETSON_TX2, XAVIER_NX, AGX_XAVIER)]
    assert eff == sorted(eff)
    assert isinstance(JETSON_TX2, DeviceProfile) and JETSON_TX2.memory_bytes < 8 * GIB


def test_device_and_time_model_import_without_torch():
    code = (
        "import sys; import fedspine.fl, fedspine.fl.devices, fedspine.fl.time_model; "
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_fleet_mix_is_the_bandits_one_definition():
    from collections import Counter

    from fedspine.bandit.synthetic import PAPER_TIERS, SyntheticFleet

    assert [(p.name, k / 80) for p, k in PAPER_MIX] == [(name, share) for name, share, _, _ in PAPER_TIERS]
    for n in range(1, 100):
        tiers = Counter(SyntheticFleet.paper_mix(n).tiers)
        assert (tiers["tx2"], tiers["nx"], tiers["agx"]) == paper_mix_counts(n)


def test_compute_spread_sets_the_fastest_over_slowest_tier_and_keeps_the_order():
    from fedspine.fl.devices import paper_fleet, scaled_link

    def ratios(cs):
        speeds = {p.name: p.effective_flops_per_s for p in paper_fleet(80, 0, spread=0.0, compute_spread=cs)}
        return {k: v / speeds["tx2"] for k, v in speeds.items()}

    assert ratios(None)["agx"] == pytest.approx(4.41, abs=0.01)
    assert ratios(8.3)["agx"] == pytest.approx(8.3) and 1 < ratios(8.3)["nx"] < 8.3
    assert list(ratios(1.0).values()) == pytest.approx([1.0, 1.0, 1.0])
    assert paper_fleet(8, 0, spread=0.0, link=scaled_link(0.5))[0].up_bytes_per_s == pytest.approx(
        20e6 / 8 * 0.5
    )
    with pytest.raises(ValueError, match="compute_spread must be a finite number >= 1"):
        paper_fleet(8, 0, compute_spread=0.5)
