"""Target tracking: a 2-D constant-velocity target (state [px, py, vx, vy]).

`lti_tracking` observes the position with Gaussian noise (linear, exact Gaussian-sum Kalman
filter). The state moves between observations: these tasks carry a `transition` that the
filter applies between updates. docs/filtering.md states the model.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes.distributions import GMM
from flashbayes.tasks._base import Task, random_rotation, register, sample_gmm_family
from flashbayes.tasks._linear import gaussian_sum_update


def constant_velocity(dt: float, accel_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """F and Q of a 2-D constant-velocity model with white-noise acceleration (float64)."""
    f1 = np.array([[1.0, dt], [0.0, 1.0]])
    q1 = accel_sd**2 * np.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]])
    # state order [px, py, vx, vy]: a 2x2 block per (position, velocity) pair
    return np.kron(f1, np.eye(2)), np.kron(q1, np.eye(2))


def predict_components(means, scale_tril, F, Q):
    """Gaussian transition of every component: m -> F m, P -> F P F^T + Q (JAX, (K, d))."""
    m = means @ F.T
    cov = jnp.einsum("ij,kjl,ml->kim", F, scale_tril @ jnp.swapaxes(scale_tril, -1, -2), F) + Q
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    return m, jnp.linalg.cholesky(cov)


def kalman_components(weights, means, scale_tril, y, H, R):
    """Kalman update of every component with one observation y = H x + v; the weights are
    multiplied by each component's evidence N(y; H m, H P H^T + R). JAX, Joseph form."""
    d = means.shape[-1]

    def one(m, L):
        P = L @ L.T
        S = H @ P @ H.T + R
        K = jnp.linalg.solve(S, H @ P).T
        r = y - H @ m
        A = jnp.eye(d) - K @ H
        P_new = A @ P @ A.T + K @ R @ K.T
        P_new = 0.5 * (P_new + P_new.T)
        Ls = jnp.linalg.cholesky(S)
        z = jax.scipy.linalg.solve_triangular(Ls, r, lower=True)
        ll = (-0.5 * z @ z - jnp.sum(jnp.log(jnp.diagonal(Ls)))
              - 0.5 * y.shape[0] * math.log(2 * math.pi))
        return m + K @ r, jnp.linalg.cholesky(P_new), ll

    m_new, L_new, ll = jax.vmap(one)(means, scale_tril)
    logw = jnp.log(jnp.maximum(weights, 1e-30)) + ll
    logw = jnp.where(weights > 0, logw, -jnp.inf)
    return jax.nn.softmax(logw), m_new, L_new


class _DynamicMixin:
    """What a task whose state moves between observations adds: `F`, `Q` and `transition`."""

    dynamic = True

    def transition(self, prior: GMM) -> GMM:
        """The predicted distribution of the next state (each component moved; float64)."""
        if not isinstance(prior, GMM):
            raise TypeError(f"prior: expected a GMM; got {type(prior).__name__}")
        m = np.asarray(prior.means, np.float64) @ self.F.T
        ls = np.asarray(prior.scale_tril, np.float64)
        cov = np.einsum("ij,kjl,ml->kim", self.F, ls @ np.swapaxes(ls, -1, -2), self.F) + self.Q
        cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
        return GMM.unchecked(np.asarray(prior.weights, np.float64), m, np.linalg.cholesky(cov))

    def transition_arrays(self, weights, means, scale_tril):
        """`transition` on padded JAX arrays (K, ...) of one mixture, for compiled filters."""
        m, L = predict_components(means, scale_tril, self._F, self._Q)
        return weights, m, L

    def simulate_trajectory(self, key, x0, steps: int):
        """States x_1..x_T and observations y_1..y_T from x_0 (arrays (T, d), (T, p))."""

        def body(x, k):
            k1, k2 = jax.random.split(k)
            x = self._F @ x + self._LQ @ jax.random.normal(k1, x.shape)
            y = self._simulate(k2, x, 1)[0]
            return x, (x, y)

        _, (xs, ys) = jax.lax.scan(body, jnp.asarray(x0, jnp.float32),
                                   jax.random.split(key, steps))
        return xs, ys

    # -- training distribution shared by the tracking tasks -----------------------------------
    # (subclasses set k_min, k_max, mean_range, scale_range, empty_fraction, filtered_fraction
    # and build their bank of filtered priors in `prepare`)

    def _sample_n(self, key):
        # mostly one observation per update: an update with none is the identity
        return jnp.where(jax.random.uniform(key) < self.empty_fraction, self.n_min, self.n_max)

    def _family(self, key):
        return sample_gmm_family(
            key, d=4, k_min=self.k_min, k_max=self.k_max, mean_low=self.mean_range[0],
            mean_high=self.mean_range[1], scale_low=self.scale_range[0],
            scale_high=self.scale_range[1])

    def _cached_bank(self, key, build):
        """`build()`'s bank of filtered priors, built once per key and kept on the task."""
        tag = tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())
        cache = self.__dict__.setdefault("_banks", {})
        if tag not in cache:
            cache[tag] = build()
        return cache[tag]

    def problem_state(self, key):
        # a user's problem: a prior over the initial state, from the family alone
        return None

    def _sample_prior(self, key, state):
        kf, kb, ku, kr = jax.random.split(key, 4)
        fam = self._family(kf)
        if state is not None:
            i = jax.random.randint(kb, (), 0, state[0].shape[0])
            w_b, m_b, s_b, c_b = (a[i] for a in state)
            # the tracking models are invariant under orthogonal maps of the plane (rotations
            # and reflections; about the sensor for range and bearing) applied to positions and
            # velocities alike: a random one makes each banked prior many
            rot = jnp.kron(jnp.eye(2), random_rotation(kr, 2))
            pick = jax.random.uniform(ku) < self.filtered_fraction
            rotated = (w_b, m_b @ rot.T, jnp.linalg.cholesky(
                rot @ s_b @ jnp.swapaxes(s_b, -1, -2) @ rot.T), c_b)
            fam = tuple(jnp.where(pick, a, b) for a, b in zip(rotated, fam))
        w, m, s, cmask = fam
        s = jnp.where(cmask[:, None, None], s, jnp.eye(4))
        w = jnp.where(cmask, w, 0.0)
        w = w / jnp.sum(w)
        if getattr(self, "translation_equivariant", False):
            m = m - jnp.sum(w[:, None] * m, 0)  # zero mean: see translation_equivariant
        m = jnp.where(cmask[:, None], m, 0.0)
        return w, m, s, cmask, None

    def _init_dynamics(self, dt: float, accel_sd: float):
        self.dt, self.accel_sd = float(dt), float(accel_sd)
        if not self.dt > 0 or not self.accel_sd > 0:
            raise ValueError(f"dt, accel_sd: expected positive numbers; got {dt}, {accel_sd}")
        self.F, self.Q = constant_velocity(self.dt, self.accel_sd)
        self._F = jnp.asarray(self.F, jnp.float32)
        self._Q = jnp.asarray(self.Q, jnp.float32)
        self._LQ = jnp.asarray(np.linalg.cholesky(self.Q), jnp.float32)


@register("lti_tracking")
class LTITracking(_DynamicMixin, Task):
    """A constant-velocity target in 2-D; noisy position measurements.

    x_t = F x_{t-1} + w, w ~ N(0, Q); y_t = H x_t + v, v ~ N(0, R), with H = [I 0] and
    R = noise_sd^2 I. The prior is over x_0; the first observation is y_1. One update uses
    0 or 1 observation. Training priors are the initial-state family (K = 1..5, means
    ~ U[-3, 3]^4, scales ~ LogUniform[0.2, 1.5]) and, for half of the batch, the exact
    predicted distributions after 1..`filter_steps` steps of a simulated track; every
    prior is shifted to zero mean (the model is translation equivariant, see
    `translation_equivariant`).

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("lti_tracking")
        >>> task.F.shape, task.H.shape
        ((4, 4), (2, 4))
    """

    description = "constant-velocity target, noisy positions (exact Gaussian-sum Kalman filter)"
    has_exact = True
    translation_equivariant = True

    def __init__(self, *, dt: float = 0.1, accel_sd: float = 1.0, noise_sd: float = 0.5,
                 n_min: int = 0, n_max: int = 1, k_min: int = 1, k_max: int = 5,
                 mean_range: tuple[float, float] = (-3.0, 3.0),
                 scale_range: tuple[float, float] = (0.2, 1.5), filter_steps: int = 25,
                 filtered_fraction: float = 0.5, empty_fraction: float = 0.1,
                 bank_size: int = 8192):
        self._init_dynamics(dt, accel_sd)
        self.theta_dim, self.data_dim = 4, 2
        self.noise_sd = float(noise_sd)
        self.H = np.hstack([np.eye(2), np.zeros((2, 2))])
        self.R = self.noise_sd**2 * np.eye(2)
        self._H = jnp.asarray(self.H, jnp.float32)
        self._R = jnp.asarray(self.R, jnp.float32)
        self.n_min, self.n_max = int(n_min), int(n_max)
        self.k_min, self.k_max = int(k_min), int(k_max)
        self.mean_range = tuple(mean_range)
        self.scale_range = tuple(scale_range)
        self.filter_steps = int(filter_steps)
        self.filtered_fraction = float(filtered_fraction)
        self.empty_fraction = float(empty_fraction)
        self.bank_size = int(bank_size)

    # -- training distribution ---------------------------------------------------------------
    def _filtered_prior(self, key):
        """The exact predicted distribution of x_{j+1} after j = 1..filter_steps updates of a
        simulated track started from a family prior."""
        kf, kx, kj, ks = jax.random.split(key, 4)
        w, m, s, cmask = self._family(kf)
        steps = jax.random.randint(kj, (), 1, self.filter_steps + 1)
        x0 = self._sample_theta(kx, w, m, s, None)
        _, ys = self.simulate_trajectory(ks, x0, self.filter_steps)

        def body(carry, inp):
            i, y = inp
            m_p, s_p = predict_components(carry[1], carry[2], self._F, self._Q)
            upd = kalman_components(carry[0], m_p, s_p, y, self._H, self._R)
            keep = i < steps
            return tuple(jnp.where(keep, a, b) for a, b in zip(upd, carry)), None

        (w, m, s), _ = jax.lax.scan(body, (w, m, s), (jnp.arange(self.filter_steps), ys))
        m, s = predict_components(m, s, self._F, self._Q)
        s = jnp.where(cmask[:, None, None], s, jnp.eye(4))
        return jnp.where(cmask, w, 0.0), m, s, cmask

    def prepare(self, key):
        """A bank of `bank_size` filtered priors (built once per key and cached)."""

        def build():
            make = jax.jit(jax.vmap(self._filtered_prior))
            chunks = [make(jax.random.split(k, 512))
                      for k in jax.random.split(key, max(1, self.bank_size // 512))]
            return tuple(jnp.concatenate(parts) for parts in zip(*chunks))

        return self._cached_bank(key, build)

    def _simulate(self, key, theta, n):
        eps = jax.random.normal(key, (n, 2)) * self.noise_sd
        return theta @ self._H.T + eps

    def log_likelihood(self, theta, data, mask=None):
        resid = data - theta @ self._H.T
        ll = (-0.5 * jnp.sum(resid**2, -1) / self.noise_sd**2
              - 2 * (math.log(self.noise_sd) + 0.5 * math.log(2 * math.pi)))
        if mask is not None:
            ll = jnp.where(mask, ll, 0.0)
        return jnp.sum(ll)

    def data_offset(self, theta_shift):
        """Data shift matching a shift of theta (translation equivariance: y - H c)."""
        return theta_shift @ self._H.T

    def exact_posterior(self, prior: GMM, data: Any) -> GMM:
        """Closed-form GMM posterior after the observations in `data` (no transition)."""
        if not isinstance(prior, GMM):
            raise TypeError(f"prior: expected a GMM; got {type(prior).__name__}")
        if prior.dim != 4:
            raise ValueError(f"prior: expected dimension 4; got {prior.dim}")
        return gaussian_sum_update(prior, self.H, self.R, self.validate_data(data))
