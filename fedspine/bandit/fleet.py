r"""Fleet-level model of round times and arm quality, used to keep exploration from creating
stragglers (ours, not in the FedSpine paper).

Per-device bandits learn each device on its own; a round, however, lasts as long as its
slowest device, so one slow device trying a heavy arm stalls everyone. Yet the *relative*
cost of the arms is much the same on every device (fewer kept channels and a lower rank mean
less compute and fewer bytes everywhere); what differs is each device's speed. So we pool all
devices' observed times into a two-factor model

.. math:: \log T_{i,a} \approx \theta_i + \phi_a

(device slowness plus arm cost), fitted by a few sweeps of alternating weighted least squares.
After a single round on a device, its :math:`\theta_i` is known and the model predicts its time
on every arm, including arms it never tried. The quality factor of the reward is pooled per arm
over all devices too. Together they predict every device's reward on every arm, hence the
makespan a reward-optimal fleet would have; the allocator lets each device explore only arms
predicted to finish within it (see ``Allocator.safe_arms``). Nothing about device speed is given
in advance: all of it is learnt from observed round times.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class FleetModel:
    """Pooled log-time statistics per (device lane, arm), discounted per device by ``decay`` so
    a device whose speed changes (thermal throttling, a new network) is re-learnt; and the
    reward's quality factor pooled per arm."""

    def __init__(self, n_arms: int, decay: float = 0.9, sweeps: int = 8):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.n_arms, self.decay, self.sweeps = n_arms, float(decay), int(sweeps)
        self.log_sum = np.zeros((0, n_arms))
        self.weight = np.zeros((0, n_arms))
        self.quality_sum = np.zeros(n_arms)
        self.quality_n = np.zeros(n_arms)

    @property
    def n_lanes(self) -> int:
        return self.log_sum.shape[0]

    def add_lanes(self, n: int) -> None:
        self.log_sum = np.concatenate([self.log_sum, np.zeros((n, self.n_arms))])
        self.weight = np.concatenate([self.weight, np.zeros((n, self.n_arms))])

    def observe(self, lanes: np.ndarray, arms: np.ndarray, times_s: np.ndarray, quality: np.ndarray) -> None:
        """Record completed rounds (lanes distinct)."""
        self.quality_sum += np.bincount(arms, weights=quality, minlength=self.n_arms)
        self.quality_n += np.bincount(arms, minlength=self.n_arms)
        keep = times_s > 0
        lanes, arms, times_s = lanes[keep], arms[keep], times_s[keep]
        if lanes.size == 0:
            return
        self.log_sum[lanes] *= self.decay
        self.weight[lanes] *= self.decay
        self.log_sum[lanes, arms] += np.log(times_s)
        self.weight[lanes, arms] += 1.0

    def fit(self) -> tuple[np.ndarray, np.ndarray]:
        """Device slowness theta (NaN for devices never observed) and arm cost phi (NaN for arms
        nobody ran), phi centred on its observed arms. A pure function of the statistics (cold
        start every time), so inspecting the model never changes a later choice."""
        # Weighted means of log T: with sum(w * mean) = log_sum, each sweep is two mat-vecs.
        w = self.weight
        row_w, col_w = w.sum(axis=1), w.sum(axis=0)
        row_s, col_s = self.log_sum.sum(axis=1), self.log_sum.sum(axis=0)
        safe_row, safe_col = np.where(row_w > 0, row_w, 1.0), np.where(col_w > 0, col_w, 1.0)
        phi = np.zeros(w.shape[1])
        theta = np.zeros(w.shape[0])
        for _ in range(self.sweeps):
            theta = np.where(row_w > 0, (row_s - w @ phi) / safe_row, 0.0)
            phi = np.where(col_w > 0, (col_s - theta @ w) / safe_col, 0.0)
            if (col_w > 0).any():
                shift = phi[col_w > 0].mean()
                phi, theta = phi - shift, theta + shift
        return np.where(row_w > 0, theta, np.nan), np.where(col_w > 0, phi, np.nan)

    def predict(self, lanes: np.ndarray) -> np.ndarray:
        """Predicted round time (seconds) per (lane, arm); NaN where the model cannot tell."""
        theta, phi = self.fit()
        return np.exp(theta[lanes, None] + phi[None, :])

    def quality(self) -> np.ndarray:
        """Mean quality factor per arm over the fleet (NaN for arms nobody completed)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.quality_n > 0, self.quality_sum / self.quality_n, np.nan)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "sweeps": self.sweeps,
            "log_sum": self.log_sum.tolist(),
            "weight": self.weight.tolist(),
            "quality_sum": self.quality_sum.tolist(),
            "quality_n": self.quality_n.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.sweeps = float(state["decay"]), int(state["sweeps"])
        self.log_sum = np.asarray(state["log_sum"], dtype=np.float64).reshape(-1, self.n_arms)
        self.weight = np.asarray(state["weight"], dtype=np.float64).reshape(-1, self.n_arms)
        self.quality_sum = np.asarray(state["quality_sum"], dtype=np.float64)
        self.quality_n = np.asarray(state["quality_n"], dtype=np.float64)
