"""Arms and arm spaces: what the allocator can tell a device to do in one round."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# Ratios are stored rounded so that 0.1 + 0.2 and 0.3 name the same arm (and survive JSON).
_RATIO_DECIMALS = 6


def _as_ratio(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number in [0, 1), got {value!r}")
    ratio = float(value)
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    return round(ratio, _RATIO_DECIMALS)


def _as_rank(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True, order=True)
class Arm:
    """One configuration for one device and round: structured pruning ratio and LoRA rank.

    >>> Arm(0.25, 8)
    Arm(ratio=0.25, rank=8)
    """

    ratio: float
    rank: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", _as_ratio(self.ratio, "Arm.ratio"))
        object.__setattr__(self, "rank", _as_rank(self.rank, "Arm.rank"))

    def to_list(self) -> list[float | int]:
        return [self.ratio, self.rank]


class ArmSpace:
    """A finite, immutable set of arms, kept sorted by (ratio, rank).

    The index of an arm (``space.index(arm)``) is its position in that order; policies work on
    indices. A Cartesian space (every ratio paired with every rank, see :meth:`grid`) has
    ``index = ratio_index * len(ranks) + rank_index``, which S-UCB relies on.

    >>> space = ArmSpace.grid(ratios=[0.0, 0.25, 0.5], ranks=[4, 8])
    >>> len(space), space[3]
    (6, Arm(ratio=0.25, rank=8))
    >>> space.index(Arm(0.5, 4))
    4
    """

    def __init__(self, arms: Iterable[Arm | Sequence[float | int]]):
        parsed: list[Arm] = []
        for i, a in enumerate(arms):
            if isinstance(a, Arm):
                parsed.append(a)
            elif isinstance(a, Sequence) and not isinstance(a, str) and len(a) == 2:
                parsed.append(Arm(_as_ratio(a[0], f"arms[{i}].ratio"), _as_rank(a[1], f"arms[{i}].rank")))
            else:
                raise ValueError(f"arms[{i}] must be an Arm or a (ratio, rank) pair, got {a!r}")
        if not parsed:
            raise ValueError("arms must not be empty")
        seen: set[Arm] = set()
        for a in parsed:
            if a in seen:
                raise ValueError(f"arms contains a duplicate: {a}")
            seen.add(a)
        self._arms: tuple[Arm, ...] = tuple(sorted(parsed))
        self._index = {a: i for i, a in enumerate(self._arms)}
        self.ratios: tuple[float, ...] = tuple(sorted({a.ratio for a in self._arms}))
        self.ranks: tuple[int, ...] = tuple(sorted({a.rank for a in self._arms}))
        self.is_grid = len(self._arms) == len(self.ratios) * len(self.ranks)

    @classmethod
    def grid(cls, ratios: Sequence[float], ranks: Sequence[int]) -> ArmSpace:
        """Every ratio paired with every rank; duplicates in either list are an error."""
        rs = [_as_ratio(r, f"ratios[{i}]") for i, r in enumerate(ratios)]
        ks = [_as_rank(k, f"ranks[{i}]") for i, k in enumerate(ranks)]
        for name, values in (("ratios", rs), ("ranks", ks)):
            if not values:
                raise ValueError(f"{name} must not be empty")
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"{name} contains duplicates: {dup}")
        return cls(Arm(r, k) for r in rs for k in ks)

    # --- container protocol -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._arms)

    def __iter__(self) -> Iterator[Arm]:
        return iter(self._arms)

    def __getitem__(self, i: int) -> Arm:
        return self._arms[i]

    def __contains__(self, arm: object) -> bool:
        return isinstance(arm, Arm) and arm in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArmSpace) and self._arms == other._arms

    def __hash__(self) -> int:
        return hash(self._arms)

    def __repr__(self) -> str:
        if self.is_grid:
            return f"ArmSpace.grid(ratios={list(self.ratios)}, ranks={list(self.ranks)})"
        return f"ArmSpace({[a.to_list() for a in self._arms]})"

    @property
    def arms(self) -> tuple[Arm, ...]:
        return self._arms

    @property
    def max_ratio(self) -> float:
        return self.ratios[-1]

    @property
    def arm_index_map(self) -> Mapping[Arm, int]:
        """Read-only arm -> index mapping, for hot loops that cannot afford :meth:`index`."""
        return MappingProxyType(self._index)

    def index(self, arm: Arm | Sequence[float | int], what: str = "arm") -> int:
        """Position of ``arm``; ``ValueError`` naming ``what`` if it is not in the space."""
        try:
            key = arm if isinstance(arm, Arm) else Arm(*arm)  # type: ignore[misc]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} must be an Arm(ratio, rank), got {arm!r}: {exc}") from None
        try:
            return self._index[key]
        except KeyError:
            raise ValueError(f"{what} {key} is not in the arm space {self!r}") from None

    # --- refinement ----------------------------------------------------------------------
    def refine(self, best: Arm | Sequence[float | int]) -> ArmSpace:
        """Add midpoints between ``best`` and its nearest neighbours along each axis (and their
        combinations), so a grid gets finer only where it pays off.

        Ranks are integers: the rank midpoint is rounded down and skipped when it coincides with
        an endpoint (there is nothing between 1 and 2). The paper partitions and refines the
        continuous (ratio, rank) space [paper §2.4, S]; this local grid refinement is our
        discrete form of that step.

        >>> ArmSpace.grid([0.0, 0.5], [4, 16]).refine(Arm(0.5, 16)).ratios
        (0.0, 0.25, 0.5)
        """
        best_arm = self[self.index(best, "best")]
        ratio_mids = [best_arm.ratio]
        for other in _neighbours(self.ratios, best_arm.ratio):
            ratio_mids.append(round((best_arm.ratio + other) / 2, _RATIO_DECIMALS))
        rank_mids = [best_arm.rank]
        for other in _neighbours(self.ranks, best_arm.rank):
            mid = (best_arm.rank + other) // 2
            if mid not in (best_arm.rank, other):
                rank_mids.append(mid)
        new = {Arm(r, k) for r in ratio_mids for k in rank_mids}
        return ArmSpace(set(self._arms) | new)

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"arms": [a.to_list() for a in self._arms]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> ArmSpace:
        return cls(state["arms"])


def _neighbours(values: Sequence[float] | Sequence[int], v: float | int) -> list[Any]:
    i = list(values).index(v)
    out = []
    if i > 0:
        out.append(values[i - 1])
    if i + 1 < len(values):
        out.append(values[i + 1])
    return out
