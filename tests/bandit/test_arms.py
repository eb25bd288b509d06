import json
import math

import pytest

from fedspine.bandit import Arm, ArmSpace


@pytest.mark.parametrize(
    "ratio, rank, needle",
    [
        (1.0, 8, "1.0"),
        (-0.1, 8, "-0.1"),
        (math.nan, 8, "nan"),
        (0.2, 0, "0"),
        (0.2, 2.5, "2.5"),
        (0.2, True, "True"),
        ("0.2", 8, "'0.2'"),
    ],
)
def test_arm_rejects_bad_values_and_names_them(ratio, rank, needle):
    with pytest.raises(ValueError) as exc:
        Arm(ratio, rank)
    assert needle in str(exc.value)


def test_grid_validation_names_the_offending_entry():
    with pytest.raises(ValueError, match=r"ratios\[1\].*1\.5"):
        ArmSpace.grid([0.0, 1.5], [4])
    with pytest.raises(ValueError, match=r"ranks\[0\].*-4"):
        ArmSpace.grid([0.0], [-4])
    with pytest.raises(ValueError, match=r"ratios contains duplicates: \[0.5\]"):
        ArmSpace.grid([0.5, 0.5], [4])
    with pytest.raises(ValueError, match=r"ranks contains duplicates: \[8\]"):
        ArmSpace.grid([0.5], [8, 8])
    with pytest.raises(ValueError, match="duplicate"):
        ArmSpace([(0.1, 4), Arm(0.1, 4)])
    with pytest.raises(ValueError, match="must not be empty"):
        ArmSpace([])


def test_grid_order_and_index():
    space = ArmSpace.grid([0.5, 0.0, 0.25], [8, 4])
    assert space.ratios == (0.0, 0.25, 0.5) and space.ranks == (4, 8) and space.is_grid
    assert [space.index(a) for a in space] == list(range(6))
    # Cartesian layout: index = ratio_index * n_ranks + rank_index (S-UCB relies on it).
    assert space.index(Arm(0.25, 8)) == 1 * 2 + 1
    assert space.index((0.1 + 0.15, 8)) == 3  # float noise is rounded away
    with pytest.raises(ValueError, match=r"arm Arm\(ratio=0.3, rank=4\) is not in the arm space"):
        space.index(Arm(0.3, 4))


def test_refine_adds_midpoints_around_the_best_arm_only():
    space = ArmSpace.grid([0.0, 0.2, 0.4, 0.6], [4, 8, 16])
    refined = space.refine(Arm(0.4, 8))
    added = set(refined) - set(space)
    assert added == {
        Arm(0.3, 8),
        Arm(0.5, 8),  # ratio midpoints at the best rank
        Arm(0.4, 6),
        Arm(0.4, 12),  # rank midpoints at the best ratio
        Arm(0.3, 6),
        Arm(0.3, 12),
        Arm(0.5, 6),
        Arm(0.5, 12),  # their combinations
    }
    assert set(space) <= set(refined)
    assert not refined.is_grid  # refined locally, not everywhere
    # Ranks 1 and 2 have no integer between them; a corner arm has one neighbour per axis.
    corner = ArmSpace.grid([0.0, 0.5], [1, 2]).refine(Arm(0.0, 1))
    assert set(corner) == {Arm(0.0, 1), Arm(0.0, 2), Arm(0.5, 1), Arm(0.5, 2), Arm(0.25, 1)}
    with pytest.raises(ValueError, match="best"):
        space.refine(Arm(0.9, 8))


def test_space_json_round_trip():
    space = ArmSpace.grid([0.0, 0.3], [4, 16]).refine(Arm(0.3, 4))
    again = ArmSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space and hash(again) == hash(space)
