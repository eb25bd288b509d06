"""The server's optional FedAvgM step on the rule's aggregate."""

import numpy as np
import pytest

from fedspine.config import load_config
from fedspine.fl.server import server_step


def test_server_step_is_heavy_ball_momentum_on_the_aggregate_change():
    old = {"a": np.zeros(3, np.float32), "head": np.ones(2, np.float32)}
    buf: dict = {}
    s1 = server_step(
        old, {"a": np.full(3, 2.0, np.float32), "head": np.ones(2, np.float32)}, buf, lr=0.5, momentum=0.9
    )
    np.testing.assert_allclose(s1["a"], 1.0)  # 0 + 0.5 * 2
    np.testing.assert_allclose(s1["head"], 1.0)  # unchanged aggregate: no step
    s2 = server_step(s1, {"a": np.full(3, 1.0, np.float32), "head": s1["head"]}, buf, lr=0.5, momentum=0.9)
    np.testing.assert_allclose(s2["a"], 1.0 + 0.5 * (0.9 * 2.0 + 0.0))  # momentum carries round 1's step
    assert s2["a"].dtype == np.float32


def test_server_step_takes_reshaped_keys_as_they_are():
    buf = {"stack": np.ones(2)}
    out = server_step(
        {"stack": np.zeros(2)}, {"stack": np.ones(4), "new": np.ones(1)}, buf, lr=0.5, momentum=0.5
    )
    np.testing.assert_array_equal(out["stack"], np.ones(4))
    np.testing.assert_array_equal(out["new"], np.ones(1))
    assert "stack" not in buf


def test_server_optimiser_fields_are_validated():
    with pytest.raises(ValueError, match=r"train.server_momentum must be in \[0, 1\)"):
        load_config(None, ["train.server_momentum=1.0"])
    with pytest.raises(ValueError, match="train.server_lr must be a finite number > 0"):
        load_config(None, ["train.server_lr=0"])
