r"""Fleet-level models that pool what every device reports (ours, not in the FedSpine paper).

Per-device bandits learn each device on its own; a round, however, lasts as long as its
slowest device, and the *relative* cost of the arms is much the same on every device (fewer kept
channels and a lower rank mean less compute and fewer bytes everywhere); what differs is each
device's speed. So we pool observations into a two-factor model

.. math:: \log y_{i,a} \approx \theta_i + \phi_a

(a device effect plus an arm effect), fitted by weighted least squares (solved exactly in the
arm effects, :func:`fit_factors`). For round times, :math:`\theta_i` is the device's slowness
and :math:`\phi_a` the arm's cost: after a single round on a device the model predicts its
time on every arm anyone has run.
The same model over rewards (``fedspine.bandit.policies.pooled``) separates what an arm buys from
how easy a device's data is. Nothing about device speed is given in advance.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def fit_factors(log_sum: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Device effects theta (NaN for rows without data) and arm effects phi (NaN for columns
    without data) of ``log y ~ theta_i + phi_a``, phi centred on its observed arms.

    ``log_sum[i, a]`` is the weighted sum of log observations, ``weight[i, a]`` their weight. The
    weighted least-squares fit is solved exactly: theta is eliminated (``theta_i = (s_i -
    sum_a w_ia phi_a) / w_i``), which leaves a system in the arms alone, ``(diag(w_a) - W^T
    diag(1/w_i) W) phi = s_a - W^T (s_i / w_i)``, a few dozen unknowns whatever the fleet's
    size. Its matrix is singular along each group of arms that no device connects to the others;
    the minimum-norm solution centres each such group. (Alternating sweeps, which this replaced,
    converge slowly when most devices play one or two arms: eight sweeps left arm effects at
    half their size.)"""
    w = weight
    row_w, col_w = w.sum(axis=1), w.sum(axis=0)
    row_s, col_s = log_sum.sum(axis=1), log_sum.sum(axis=0)
    rows, seen = row_w > 0, col_w > 0
    theta = np.full(w.shape[0], np.nan)
    phi = np.full(w.shape[1], np.nan)
    if not seen.any():
        return theta, phi
    # Rows without data and unseen columns are all zeros, so the products run on the whole
    # arrays (no copy of a fleet-sized submatrix) and the unseen arms are dropped afterwards.
    # Dividing (not multiplying by 1/w) keeps a lone arm's row exact, so an arm no device
    # connects to another gets an exactly zero row; rcond drops what rounding leaves elsewhere.
    scaled = np.divide(w, row_w[:, None], out=np.zeros_like(w), where=rows[:, None])
    lap = np.diag(col_w) - scaled.T @ w
    rhs = col_s - scaled.T @ row_s
    sol = np.linalg.lstsq(lap[np.ix_(seen, seen)], rhs[seen], rcond=1e-10)[0]
    sol -= sol.mean()
    phi[seen] = sol
    full = np.where(seen, phi, 0.0)
    theta[rows] = (row_s[rows] - (w @ full)[rows]) / row_w[rows]
    return theta, phi


# quality below this counts as this much in the log model (a round that bought nothing)
VALUE_FLOOR = 1e-3


def _decay_rows(decay: float, lanes: np.ndarray, *arrays: np.ndarray) -> None:
    """Multiply rows ``lanes`` (distinct) of each array by ``decay``; in place, without a gather,
    when they are every row (a whole fleet's round)."""
    every = lanes.size == arrays[0].shape[0]
    for a in arrays:
        if every:
            a *= decay
        else:
            a[lanes] *= decay


class FleetModel:
    """Pooled log-time statistics per (device lane, arm), discounted per device by ``decay`` so
    a device whose speed changes (thermal throttling, a new network) is re-learnt; and the
    reward's quality factor pooled per arm.

    ``change_factor`` (ours; None = off) detects such a change at once: an observed time more
    than that factor away from the device's own earlier times on the same arm wipes its older
    times (own times only: the pooled prediction can be off for one device by more than noise),
    so one surprising round re-estimates its speed instead of a slow EMA drift.

    ``round_effect`` (ours; off by default) removes a shift common to one round's quality
    before it enters the value model, ``log q[i, a, t] ~ theta_i + phi_a + tau_t``. Whatever
    moves every device's quality at once (the training phase: loss gains shrink as the model
    learns; a fleet-wide reward scale that grows with the best gain seen) would otherwise be
    read as the effect of the arms played in that round, against the arms of round 1.
    ``tau_t`` is the round's mean residual against the fit so far, over the reports whose
    device and arm the fit already knows (:meth:`_round_offset`); a report outside a whole
    round (:meth:`observe` with ``whole_round=False``) takes the last round's.
    """

    def __init__(
        self,
        n_arms: int,
        decay: float = 0.9,
        change_factor: float | None = None,
        round_effect: bool = False,
    ):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        if change_factor is not None and not change_factor > 1.0:
            raise ValueError(f"change_factor must be None (off) or > 1, got {change_factor!r}")
        self.n_arms, self.decay = n_arms, float(decay)
        self.change_factor = None if change_factor is None else float(change_factor)
        self.round_effect = bool(round_effect)
        self.value_offset = 0.0  # the last whole round's tau (round_effect), relative to round 1
        self.log_sum = np.zeros((0, n_arms))
        self.weight = np.zeros((0, n_arms))
        self.quality_sum = np.zeros(n_arms)
        self.quality_n = np.zeros(n_arms)
        # the quality factor per (lane, arm) in the same two-factor model, discounted like times:
        # what an arm buys, with each device's difficulty separated out (arm_values)
        self.value_log_sum = np.zeros((0, n_arms))
        self.value_weight = np.zeros((0, n_arms))
        self.value_sq_sum = np.zeros((0, n_arms))  # their squares, for the fit's residual (value_sigma)
        # round-time noise: squared log residuals of repeat runs against the device's own mean
        # on that arm, discounted per round like the times (noise_sigma)
        self.noise_sq = 0.0
        self.noise_n = 0.0

    @property
    def n_lanes(self) -> int:
        return self.log_sum.shape[0]

    def add_lanes(self, n: int) -> None:
        self.log_sum = np.concatenate([self.log_sum, np.zeros((n, self.n_arms))])
        self.weight = np.concatenate([self.weight, np.zeros((n, self.n_arms))])
        self.value_log_sum = np.concatenate([self.value_log_sum, np.zeros((n, self.n_arms))])
        self.value_weight = np.concatenate([self.value_weight, np.zeros((n, self.n_arms))])
        self.value_sq_sum = np.concatenate([self.value_sq_sum, np.zeros((n, self.n_arms))])

    def observe(
        self,
        lanes: np.ndarray,
        arms: np.ndarray,
        times_s: np.ndarray,
        quality: np.ndarray,
        whole_round: bool = True,
    ) -> None:
        """Record completed rounds (lanes distinct); ``whole_round``: the reports are one
        whole round (what ``round_effect`` estimates its shift from)."""
        self.quality_sum += np.bincount(arms, weights=quality, minlength=self.n_arms)
        self.quality_n += np.bincount(arms, minlength=self.n_arms)
        log_q = np.log(np.maximum(quality, VALUE_FLOOR))
        if self.round_effect:
            if whole_round:
                self.value_offset = self._round_offset(lanes, arms, log_q)
            log_q = log_q - self.value_offset
        _decay_rows(self.decay, lanes, self.value_log_sum, self.value_weight, self.value_sq_sum)
        self.value_log_sum[lanes, arms] += log_q
        self.value_sq_sum[lanes, arms] += log_q**2
        self.value_weight[lanes, arms] += 1.0
        keep = times_s > 0
        lanes, arms, times_s = lanes[keep], arms[keep], times_s[keep]
        if lanes.size == 0:
            return
        log_t = np.log(times_s)
        own_w = self.weight[lanes, arms]
        with np.errstate(invalid="ignore", divide="ignore"):
            before = np.where(own_w >= 0.5, self.log_sum[lanes, arms] / own_w, np.nan)
        jump = np.zeros(lanes.size, dtype=bool)
        if self.change_factor is not None:  # against the device's own times on that arm only
            jump = np.abs(log_t - before) > np.log(self.change_factor)  # NaN (unknown) compares False
        repeat = ~np.isnan(before) & ~jump  # a change is not noise
        self.noise_sq = self.decay * self.noise_sq + float(np.sum((log_t[repeat] - before[repeat]) ** 2))
        self.noise_n = self.decay * self.noise_n + float(repeat.sum())
        if self.change_factor is not None:
            changed = lanes[jump]
            self.log_sum[changed] = 0.0
            self.weight[changed] = 0.0
        _decay_rows(self.decay, lanes, self.log_sum, self.weight)
        self.log_sum[lanes, arms] += log_t
        self.weight[lanes, arms] += 1.0

    def _round_offset(self, lanes: np.ndarray, arms: np.ndarray, log_q: np.ndarray) -> float:
        """This round's shift of log quality: its mean residual against the value fit so far
        over the reports of known devices on known arms; the last round's where none is known
        (round 1 defines the level: 0)."""
        theta, phi = fit_factors(self.value_log_sum, self.value_weight)
        resid = log_q - theta[lanes] - phi[arms]
        known = np.isfinite(resid)
        return float(resid[known].mean()) if known.any() else self.value_offset

    def fit(self) -> tuple[np.ndarray, np.ndarray]:
        """Device slowness theta (NaN if never observed) and arm cost phi (NaN if nobody ran it)."""
        return fit_factors(self.log_sum, self.weight)

    def predict(self, lanes: np.ndarray) -> np.ndarray:
        """Predicted round time (seconds) per (lane, arm); NaN where the model cannot tell."""
        theta, phi = self.fit()
        return np.exp(theta[lanes, None] + phi[None, :])

    def predict_blended(
        self,
        lanes: np.ndarray,
        prior_weight: float = 1.0,
        fitted: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Like :meth:`predict`, but where a device has run an arm its own times count too: the
        pooled prediction enters as ``prior_weight`` pseudo-observations (ours). This corrects the
        two-factor model where it is off for one device (a link much slower than its compute).
        ``fitted`` passes a :meth:`fit` already at hand."""
        theta, phi = self.fit() if fitted is None else fitted
        pooled = theta[lanes, None] + phi[None, :]
        own_sum, own_w = self.log_sum[lanes], self.weight[lanes]
        with np.errstate(invalid="ignore"):
            mixed = (own_sum + prior_weight * pooled) / (own_w + prior_weight)
        return np.exp(mixed)

    def noise_sigma(self) -> float:
        """Standard deviation of a round's log time about the device's own mean on that arm
        (0 before any device repeated an arm). It includes the running mean's own error, so it
        over-states the noise by a factor of about ``sqrt(1 + 1/n)`` for ``n`` earlier runs."""
        return float(np.sqrt(self.noise_sq / self.noise_n)) if self.noise_n > 0 else 0.0

    def quality(self) -> np.ndarray:
        """Mean quality factor per arm over the fleet (NaN for arms nobody completed)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.quality_n > 0, self.quality_sum / self.quality_n, np.nan)

    def arm_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Log quality effect per arm (NaN where nobody completed it), device effects removed,
        and each arm's discounted number of observations."""
        _, effect = fit_factors(self.value_log_sum, self.value_weight)
        return effect, self.value_weight.sum(axis=0)

    def value_sigma(self) -> float:
        """Residual standard deviation of one round's log quality about the two-factor fit
        (device plus arm effect), ``sqrt(RSS / (n - devices - arms + 1))`` with discounted counts;
        ``inf`` while the fit has no degrees of freedom left (no evidence of the noise yet).
        The residual holds the round-to-round drift of a device's loss improvement as well as
        the noise, which is what a choice made on the pooled effects is exposed to."""
        w, s = self.value_weight, self.value_log_sum
        theta, phi = fit_factors(s, w)
        cells = w > 0
        fitted = np.where(cells, np.nan_to_num(theta)[:, None] + np.nan_to_num(phi)[None, :], 0.0)
        rss = float(np.sum(self.value_sq_sum) - 2.0 * np.sum(fitted * s) + np.sum(w * fitted**2))
        dof = float(w.sum()) - int(cells.any(axis=1).sum()) - int(cells.any(axis=0).sum()) + 1
        return float(np.sqrt(max(rss, 0.0) / dof)) if cells.any() and dof >= 1.0 else math.inf

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "change_factor": self.change_factor,
            "round_effect": self.round_effect,
            "value_offset": self.value_offset,
            "log_sum": self.log_sum.tolist(),
            "weight": self.weight.tolist(),
            "quality_sum": self.quality_sum.tolist(),
            "quality_n": self.quality_n.tolist(),
            "value_log_sum": self.value_log_sum.tolist(),
            "value_weight": self.value_weight.tolist(),
            "value_sq_sum": self.value_sq_sum.tolist(),
            "noise_sq": self.noise_sq,
            "noise_n": self.noise_n,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])  # older states also carry "sweeps", no longer used
        cf = state.get("change_factor")
        self.change_factor = None if cf is None else float(cf)
        self.round_effect = bool(state.get("round_effect", False))  # both added within version 3
        self.value_offset = float(state.get("value_offset", 0.0))
        self.log_sum = np.asarray(state["log_sum"], dtype=np.float64).reshape(-1, self.n_arms)
        self.weight = np.asarray(state["weight"], dtype=np.float64).reshape(-1, self.n_arms)
        self.quality_sum = np.asarray(state["quality_sum"], dtype=np.float64)
        self.quality_n = np.asarray(state["quality_n"], dtype=np.float64)
        shape = self.log_sum.shape
        self.value_log_sum = np.asarray(state["value_log_sum"], dtype=np.float64).reshape(shape)
        self.value_weight = np.asarray(state["value_weight"], dtype=np.float64).reshape(shape)
        if "value_sq_sum" in state:
            self.value_sq_sum = np.asarray(state["value_sq_sum"], dtype=np.float64).reshape(shape)
        else:  # added within version 3: each cell's observations taken as equal to their mean
            w = self.value_weight
            self.value_sq_sum = np.divide(self.value_log_sum**2, w, out=np.zeros(shape), where=w > 0)
        self.noise_sq = float(state.get("noise_sq", 0.0))  # added within version 3: older states
        self.noise_n = float(state.get("noise_n", 0.0))  # start the estimate afresh
