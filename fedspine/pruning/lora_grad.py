r"""LoRA-gradient importance (LoRAPrune's criterion, which FedSpine uses on the device).

**Paper** ([S] in ``shared/paper.md`` §2.2): FedSpine estimates the importance of heads and
MLP channels from the gradients the LoRA factors already produce, never from gradients of the
frozen base weights, and smooths it across local iterations before pruning. **Formula**
(LoRAPrune, Zhang et al., arXiv 2305.18403; its public code ``loraprune/utils.py``):

.. math::
    G = \nabla B\, A + B\, \nabla A - \nabla B\, \nabla A, \qquad
    S = \lvert G \odot (W + s\, B A) \rvert

:math:`G` equals :math:`BA - (B - \nabla B)(A - \nabla A)`: the change of the low-rank update
after one unit gradient step, a proxy for the merged weight's gradient that costs three small
matmuls instead of a full :math:`d_{out} \times d_{in}` weight gradient. :math:`S` is summed
over the input side for modules pruned by output rows (q/k/v, up/gate, BERT intermediate) and
over the output side for modules pruned by input columns (o, down, BERT output), then, per
module, normalised to unit L2 norm (LoRAPrune) so that modules of different scale add fairly;
the EMA across steps is :math:`s \leftarrow \beta s + (1 - \beta) s_{now}` with
:math:`\beta = 0.9` (LoRAPrune's value).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def lora_element_scores(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """``|G * (W + s B A)|`` for one LoRA-wrapped Linear (shapes: W (out, in), A (r, in), B (out, r)),
    or for a stack of them (leading batch dims on A, B and the gradients; W shared).

    Computed as ``G = [dB | B] @ [A - dA ; dA]`` (the same sum, one matmul of rank 2r) and
    ``W + s B A`` as one fused multiply-add, then multiplied in place: the three full-size
    temporaries of the textbook form cost more than the matmuls on a CPU.
    """
    left = torch.cat([grad_b, lora_b], dim=-1)
    right = torch.cat([lora_a - grad_a, grad_a], dim=-2)
    g = left @ right
    merged = (
        torch.baddbmm(weight, lora_b, lora_a, alpha=scaling)
        if lora_a.dim() == 3
        else torch.addmm(weight, lora_b, lora_a, alpha=scaling)
    )
    return g.mul_(merged).abs_()


def reduce_scores(element_scores: torch.Tensor, axis: str) -> torch.Tensor:
    """Per-row (``axis="out"``) or per-column (``axis="in"``) sums, normalised to unit L2 norm."""
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
    s = element_scores.sum(dim=1 if axis == "out" else 0)
    norm = torch.linalg.vector_norm(s)
    return s / norm if norm > 0 else s


class LoRAGradientImportance:
    """EMA of LoRA-gradient scores per module, accumulated after each backward pass.

    ``modules`` maps a name to ``(lora_layer, axis)``: a peft ``lora.Linear`` (its
    ``base_layer``, ``lora_A``/``lora_B`` for the active adapter and ``scaling``) and the side
    it is pruned on. Call :meth:`accumulate` after ``loss.backward()`` and before the optimizer
    clears the gradients. Reset it after a prune: the units have changed.
    """

    def __init__(self, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.scores: dict[str, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def accumulate(
        self, modules: Iterable[tuple[str, torch.nn.Module, str]], adapter: str = "default"
    ) -> None:
        for name, layer, axis in modules:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if a.grad is None or b.grad is None:
                raise ValueError(
                    f"{name}: LoRA factors have no gradients; call accumulate() after backward()"
                )
            elem = lora_element_scores(
                layer.base_layer.weight.float(),
                a.float(),
                b.float(),
                a.grad.float(),
                b.grad.float(),
                float(layer.scaling[adapter]),
            )
            now = reduce_scores(elem, axis)
            old = self.scores.get(name)
            self.scores[name] = now if old is None else self.beta * old + (1.0 - self.beta) * now
        self.steps += 1

    def reset(self) -> None:
        self.scores.clear()
        self.steps = 0
