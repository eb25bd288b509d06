"""Bandit policies, registered by name (the names configs and the CLI use)."""

from __future__ import annotations

from typing import Any

from fedspine.bandit.arms import ArmSpace
from fedspine.bandit.policies.base import Policy, init_params
from fedspine.bandit.policies.exp3 import EXP3
from fedspine.bandit.policies.greedy import EpsilonGreedy, UniformRandom
from fedspine.bandit.policies.pooled import PooledUCB
from fedspine.bandit.policies.sucb import SmoothUCB
from fedspine.bandit.policies.thompson import GaussianThompson
from fedspine.bandit.policies.ucb import UCB1, DiscountedUCB, SlidingWindowUCB

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        SmoothUCB,
        UCB1,
        DiscountedUCB,
        SlidingWindowUCB,
        EXP3,
        GaussianThompson,
        EpsilonGreedy,
        UniformRandom,
        PooledUCB,
    )
}


def make_policy(name: str, space: ArmSpace, **params: Any) -> Policy:
    """Build a registered policy; unknown names or parameters list what is allowed."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
    cls = POLICIES[name]
    allowed = init_params(cls)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for policy {name!r}; allowed: {allowed}")
    return cls(space, **params)


__all__ = [
    "POLICIES",
    "EXP3",
    "UCB1",
    "DiscountedUCB",
    "EpsilonGreedy",
    "GaussianThompson",
    "Policy",
    "PooledUCB",
    "SlidingWindowUCB",
    "SmoothUCB",
    "UniformRandom",
    "make_policy",
]
