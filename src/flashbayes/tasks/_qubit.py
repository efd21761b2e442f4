"""`qubit_rabi`: the Rabi frequency and dephasing time of a driven qubit, one outcome at a time.

theta = (omega, T2). A measurement at time t >= 0 returns 1 with probability

    p(t; omega, T2) = (1 - D(t, T2) cos(omega t)) / 2,   D = exp(-t / T2) for T2 > 0, else 0

(D is continued by its limit at T2 -> 0+, so the likelihood is defined on all of R^2, where a
GMM prior lives). A data row is (t, outcome). docs/filtering.md states the model and the
prior family.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes.distributions import gmm_moments
from flashbayes.tasks._base import Task, register, sample_gmm_family

_EPS = 1e-6  # outcome probabilities are kept in [eps, 1 - eps]


def outcome_probability(theta, t):
    """P(outcome = 1 | theta = (omega, T2), t); broadcasts over leading axes."""
    omega, t2 = theta[..., 0], theta[..., 1]
    decay = jnp.where(t2 > 0, jnp.exp(-t / jnp.where(t2 > 0, t2, 1.0)), 0.0)
    p = 0.5 * (1.0 - decay * jnp.cos(omega * t))
    return jnp.clip(p, _EPS, 1 - _EPS)


@register("qubit_rabi")
class QubitRabi(Task):
    """Rabi oscillation with dephasing: infer (omega, T2) from single-shot outcomes.

    Priors: K = 1..5 components; means omega ~ U[omega_range], T2 ~ U[t2_range]; per-axis
    scales LogUniform between `scale_range` times the range's width (a wide span, so that the
    narrow posteriors met late in a sequence are inside the training family); random
        correlations. Measurement times t ~ U[0, t_max]. One problem holds 0..n_max outcomes: the
    filter conditions the prior on all outcomes so far in one pass (up to n_max of them; see
    docs/filtering.md), rather than feeding back after every outcome.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("qubit_rabi")
        >>> p = task.sample_problem(jax.random.key(0), n=1)
        >>> p.data.shape
        (1, 2)
    """

    description = "driven qubit: (omega, T2) from single-shot outcomes (grid reference)"
    param_names = ("omega", "T2")
    has_exact = False
    dynamic = False

    def __init__(self, *, omega_range: tuple[float, float] = (0.5, 3.0),
                 t2_range: tuple[float, float] = (2.0, 10.0),
                 scale_range: tuple[float, float] = (0.005, 0.3), t_max: float = 10.0,
                 n_min: int = 0, n_max: int = 50, k_min: int = 1, k_max: int = 5,
                 canonical: bool = True):
        self.theta_dim, self.data_dim = 2, 2
        self.canonical = bool(canonical)
        self.omega_range = tuple(float(v) for v in omega_range)
        self.t2_range = tuple(float(v) for v in t2_range)
        self.scale_range = tuple(float(v) for v in scale_range)
        self.t_max = float(t_max)
        if not self.t_max > 0:
            raise ValueError(f"t_max: expected > 0; got {t_max}")
        self.n_min, self.n_max = int(n_min), int(n_max)
        self.k_min, self.k_max = int(k_min), int(k_max)
        lo = np.array([self.omega_range[0], self.t2_range[0]])
        width = np.array([self.omega_range[1] - self.omega_range[0],
                          self.t2_range[1] - self.t2_range[0]])
        self._lo = jnp.asarray(lo, jnp.float32)
        self._width = jnp.asarray(width, jnp.float32)

    def _sample_prior(self, key, state):
        # the shared family on the unit square, mapped to the parameter box per axis
        w, m, s, cmask = sample_gmm_family(
            key, d=2, k_min=self.k_min, k_max=self.k_max, mean_low=0.0, mean_high=1.0,
            scale_low=self.scale_range[0], scale_high=self.scale_range[1])
        means = self._lo + m * self._width
        tril = self._width[:, None] * s
        tril = jnp.where(cmask[:, None, None], tril, jnp.eye(2))
        means = jnp.where(cmask[:, None], means, 0.0)
        return w, means, tril, cmask, None

    # -- what the network reads ------------------------------------------------------------------
    @property
    def uses_frame(self) -> bool:
        """Whether each outcome reaches the network as features of the prior (`data_to_frame`)."""
        return self.canonical

    @property
    def network_data_dim(self) -> int:
        return 9 if self.canonical else self.data_dim

    def network_frame(self, weights, means, scale_tril, cmask):
        """No turn of theta (the identity); the prior's overall mean and sd of (omega, T2),
        which `data_to_frame` reads."""
        w = jnp.where(cmask, weights, 0.0)
        m, cov = gmm_moments(w / jnp.sum(w), jnp.where(cmask[:, None], means, 0.0), scale_tril)
        return jnp.eye(2), (m, jnp.sqrt(jnp.maximum(jnp.diagonal(cov), 1e-12)))

    def data_to_frame(self, data, aux):
        """Each outcome (t, y) as nine features at the prior's overall mean (omega_0, T2_0)
        and sd (s_omega, s_T2), with s = 2 y - 1, D = exp(-t / T2_0) and phase omega_0 t:
        s, t / t_max, D, cos and sin of the phase, s D cos, s D sin, the phase spread
        s_omega t and the decay's sensitivity D t s_T2 / T2_0^2. The outcome and the time are
        among them, so the map loses nothing; the rest saves the network from learning
        cos(omega t) of raw numbers."""
        (m_omega, m_t2), (s_omega, s_t2) = aux
        t, s = data[..., 0], 2.0 * data[..., 1] - 1.0
        t2 = jnp.maximum(m_t2, 1e-3)
        decay = jnp.exp(-t / t2)
        cos, sin = jnp.cos(m_omega * t), jnp.sin(m_omega * t)
        return jnp.stack([s, t / self.t_max, decay, cos, sin, s * decay * cos, s * decay * sin,
                          s_omega * t, decay * t * s_t2 / t2**2], -1)

    def _simulate(self, key, theta, n):
        kt, ky = jax.random.split(key)
        t = jax.random.uniform(kt, (n,), maxval=self.t_max)
        y = jax.random.bernoulli(ky, outcome_probability(theta, t)).astype(jnp.float32)
        return jnp.stack([t, y], 1)

    def log_likelihood(self, theta, data, mask=None):
        p = outcome_probability(theta[..., None, :], data[:, 0])
        y = data[:, 1]
        ll = y * jnp.log(p) + (1 - y) * jnp.log1p(-p)
        if mask is not None:
            ll = jnp.where(mask, ll, 0.0)
        return jnp.sum(ll, -1)

    def validate_data(self, data: Any) -> np.ndarray:
        x = super().validate_data(data)
        if np.any(x[:, 0] < 0):
            raise ValueError("data: expected measurement times t >= 0 in column 0; got a "
                             "negative time")
        if not np.all(np.isin(x[:, 1], (0.0, 1.0))):
            raise ValueError("data: expected outcomes 0 or 1 in column 1; got "
                             f"{sorted(set(np.unique(x[:, 1]).tolist()) - {0.0, 1.0})[:3]}")
        return x

    def data_out_of_range(self, data: np.ndarray) -> str:
        if data.size and float(np.max(data[:, 0])) > self.t_max:
            return (f"measurement time {float(np.max(data[:, 0])):.3g} beyond the trained "
                    f"t_max = {self.t_max:g}")
        return ""

    def grid_log_likelihood(self, points: np.ndarray, data: np.ndarray) -> np.ndarray:
        """Log likelihood of all data rows at each grid point (float64, NumPy)."""
        pts = np.asarray(points, np.float64)
        t = np.asarray(data, np.float64)[:, 0]
        y = np.asarray(data, np.float64)[:, 1]
        omega, t2 = pts[:, :1], pts[:, 1:]
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            decay = np.where(t2 > 0, np.exp(-t[None, :] / np.where(t2 > 0, t2, 1.0)), 0.0)
        p = np.clip(0.5 * (1 - decay * np.cos(omega * t[None, :])), _EPS, 1 - _EPS)
        return np.sum(y * np.log(p) + (1 - y) * np.log1p(-p), 1)
