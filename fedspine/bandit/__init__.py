"""Online multi-armed-bandit allocation of (pruning ratio, LoRA rank) per device.

numpy only: importing this package does not import torch, so any FL system can use it.

>>> from fedspine.bandit import Allocator, ArmSpace, RoundReport
>>> alloc = Allocator(ArmSpace.grid([0.0, 0.25, 0.5], [4, 8, 16]), policy="s-ucb", seed=0)
>>> arms = alloc.assign(["phone-a", "phone-b"], round=1)
>>> sorted(arms)
['phone-a', 'phone-b']
"""

from fedspine.bandit.allocator import Allocator, DeviceId, RoundReport
from fedspine.bandit.arms import Arm, ArmSpace
from fedspine.bandit.policies import POLICIES, Policy, make_policy
from fedspine.bandit.reward import RewardConfig

__all__ = [
    "POLICIES",
    "Allocator",
    "Arm",
    "ArmSpace",
    "DeviceId",
    "Policy",
    "RewardConfig",
    "RoundReport",
    "make_policy",
]
