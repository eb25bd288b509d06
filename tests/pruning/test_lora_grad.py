import pytest
import torch
from peft import LoraConfig, get_peft_model

from fedspine.pruning.lora_grad import LoRAGradientImportance, lora_element_scores, reduce_scores


class Toy(torch.nn.Module):
    """up (8 -> 6), then rows 0 and 1 are silenced, then down (6 -> 4)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 6)
        self.down = torch.nn.Linear(6, 4)
        self.register_buffer("mask", torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]))

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)) * self.mask)


def test_g_is_the_change_of_ba_after_one_unit_gradient_step():
    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(s, generator=gen) for s in [(5, 7), (3, 7), (5, 3)])
    ga, gb = torch.randn(3, 7, generator=gen), torch.randn(5, 3, generator=gen)
    g = b @ a - (b - gb) @ (a - ga)
    expected = (g * (w + 2.0 * b @ a)).abs()
    torch.testing.assert_close(lora_element_scores(w, a, b, ga, gb, 2.0), expected)


def test_scores_per_unit_are_normalised_smoothed_and_need_no_base_weight_gradients():
    torch.manual_seed(0)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False)
    model = get_peft_model(Toy(), cfg)
    up, down = model.base_model.model.up, model.base_model.model.down
    assert not up.base_layer.weight.requires_grad  # frozen base: the criterion must not need its grad
    imp, snapshots = LoRAGradientImportance(beta=0.9), []
    for _ in range(3):
        model(torch.randn(16, 8)).pow(2).sum().backward()
        imp.accumulate([("up", up, "out"), ("down", down, "in")])
        snapshots.append(
            reduce_scores(
                lora_element_scores(
                    up.base_layer.weight,
                    up.lora_A["default"].weight,
                    up.lora_B["default"].weight,
                    up.lora_A["default"].weight.grad,
                    up.lora_B["default"].weight.grad,
                    up.scaling["default"],
                ),
                "out",
            )
        )
        model.zero_grad()
    assert up.base_layer.weight.grad is None
    assert imp.scores["up"].shape == (6,) and imp.scores["down"].shape == (6,)
    expected = 0.9 * (0.9 * snapshots[0] + 0.1 * snapshots[1]) + 0.1 * snapshots[2]
    torch.testing.assert_close(imp.scores["up"], expected)
    assert imp.steps == 3
    imp.reset()
    assert imp.scores == {} and imp.steps == 0


def test_ema_and_errors():
    imp = LoRAGradientImportance(beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        LoRAGradientImportance(beta=1.0)
    with pytest.raises(ValueError, match="axis"):
        reduce_scores(torch.ones(2, 2), "rows")
    layer = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["up"])).base_model.model.up
    with pytest.raises(ValueError, match="no gradients"):
        imp.accumulate([("up", layer, "out")])
