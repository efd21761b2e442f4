"""Reference filters for nonlinear observations: Gaussian-sum EKF and UKF, and a bootstrap
particle filter.

All three work on any task with a measurement model: `task.measurement` (e.g. the range and
bearing of `nonlinear_tracking`) or, for linear tasks, `task.H` and `task.R` (`lti_tracking`,
where the EKF and UKF are exact Kalman filters). The EKF and UKF run in float64 on the host with
the update maths of `flashbayes.tasks._nonlinear`; the particle filter is one compiled
`jax.lax.scan` in float32 whatever JAX's default precision.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes.distributions import GMM
from flashbayes.reference._filters import register_filter
from flashbayes.tasks._nonlinear import LinearMeasurement, ekf_components, ukf_components


def _measurement(task: Any, who: str):
    meas = getattr(task, "measurement", None)
    if meas is not None:
        return meas
    if hasattr(task, "H") and hasattr(task, "R"):
        return LinearMeasurement(task.H, task.R)
    raise ValueError(f"{who}: expected a task with a measurement model (`measurement`, or `H` "
                     f"and `R`); got {getattr(task, 'name', type(task).__name__)!r}")


def _gaussian_sum(task: Any, prior: GMM, ys: np.ndarray, observed: np.ndarray, update,
                  who: str) -> list[GMM]:
    if not isinstance(prior, GMM):
        raise TypeError(f"prior: expected a GMM; got {type(prior).__name__}")
    meas = _measurement(task, who)
    dynamic = getattr(task, "dynamic", False)
    w = np.asarray(prior.weights, np.float64)
    m = np.asarray(prior.means, np.float64)
    L = np.asarray(prior.scale_tril, np.float64)
    if dynamic:
        F, Q = np.asarray(task.F, np.float64), np.asarray(task.Q, np.float64)
    out = []
    for y, obs in zip(np.asarray(ys, np.float64), observed):
        if dynamic:
            m = m @ F.T
            P = np.einsum("ij,kjl,ml->kim", F, L @ np.swapaxes(L, -1, -2), F) + Q
            L = np.linalg.cholesky(0.5 * (P + np.swapaxes(P, -1, -2)))
        if obs:
            w, m, L = update(w, m, L, y, meas, np)
            keep = w > 0  # components whose weight underflowed carry nothing
            w, m, L = w[keep], m[keep], L[keep]
        out.append(GMM.unchecked(w, m, L))
    return out


@register_filter("ekf")
def ekf(key: Any, task: Any, prior: GMM, ys: np.ndarray, observed: np.ndarray,
        **options: Any) -> list[GMM]:
    """Gaussian-sum extended Kalman filter: one EKF per prior component (linearised at the
    component's mean, Joseph-form covariance, bearing residuals wrapped by the measurement
    model), weights multiplied by each component's approximate evidence N(r; 0, H P H^T + R).
    Float64; deterministic (`key` is unused). Equals the Kalman filter for linear tasks.

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("nonlinear_tracking")
        >>> prior = fb.GMM([1.0], [[5.0, 0.0, 0.0, 1.0]], [0.5 * np.eye(4)])
        >>> res = fb.filter("ekf", prior, [[5.0, 0.02], [5.0, 0.04]], key=jax.random.key(0),
        ...                 task=task)
        >>> len(res), res[1].n_components
        (2, 1)
    """
    if options:
        raise TypeError(f"ekf: unexpected options {sorted(options)}")
    return _gaussian_sum(task, prior, ys, observed, ekf_components, "ekf")


@register_filter("ukf")
def ukf(key: Any, task: Any, prior: GMM, ys: np.ndarray, observed: np.ndarray, *,
        alpha: float = 1.0, beta: float = 2.0, kappa: float = 0.0, **options: Any) -> list[GMM]:
    """Gaussian-sum unscented Kalman filter: one UKF per prior component (scaled unscented
    transform with 2d + 1 sigma points; defaults alpha = 1, beta = 2, kappa = 0, i.e. points at
    m +- sqrt(d) L e_i, centre weight 0 for the mean and 2 for the covariance; bearings averaged
    through wrapped residuals), weights multiplied by each component's approximate evidence.
    Float64; deterministic (`key` is unused). Equals the Kalman filter for linear tasks.

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("nonlinear_tracking")
        >>> prior = fb.GMM([1.0], [[5.0, 0.0, 0.0, 1.0]], [0.5 * np.eye(4)])
        >>> res = fb.filter("ukf", prior, [[5.0, 0.02]], key=jax.random.key(0), task=task)
        >>> res[0].mean().shape
        (4,)
    """
    if options:
        raise TypeError(f"ukf: unexpected options {sorted(options)}")
    for name, v in (("alpha", alpha), ("beta", beta), ("kappa", kappa)):
        if not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite number; got {v!r}")
    d = int(np.shape(prior.means)[-1]) if isinstance(prior, GMM) else 0
    if not alpha > 0 or not alpha**2 * (d + kappa) > 0:
        raise ValueError(f"alpha, kappa: expected alpha > 0 and alpha^2 (d + kappa) > 0; got "
                         f"{alpha}, {kappa} with d = {d}")
    update = functools.partial(ukf_components, alpha=alpha, beta=beta, kappa=kappa)
    return _gaussian_sum(task, prior, ys, observed, update, "ukf")


# -- bootstrap particle filter ---------------------------------------------------------------------


def _systematic(key, w):
    n = w.shape[0]
    u = (jax.random.uniform(key, dtype=w.dtype) + jnp.arange(n, dtype=w.dtype)) / n
    return jnp.minimum(jnp.searchsorted(jnp.cumsum(w), u), n - 1)


def _multinomial(key, w):
    return jax.random.categorical(key, jnp.log(w), shape=w.shape)


LABELS = 8  # kernel groups: a particle belongs to the prior component it was drawn from (mod 8)


class ParticleFilter:
    """A compiled bootstrap particle filter for a dynamic task (state moved by `task.F` plus
    N(0, `task.Q`) noise, weights by `task.log_likelihood`). Float32.

    Each step resamples when the effective sample size of the current weights is below
    `ess_threshold * num_particles` (systematic or multinomial resampling), moves every
    particle through the transition, and reweights by the likelihood of the observation. It
    also records what the density of `ParticlePosterior` needs: a kernel bandwidth for each
    group of predicted particles and the density's normaliser. Every particle carries the
    index of the prior component it was drawn from (its group; indices are taken mod
    `LABELS`). With `density=False` the filter skips that bookkeeping (the plain bootstrap
    filter, for timing). The compiled programs are built once per setting.

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> from flashbayes.reference._nonlinear_filters import ParticleFilter
        >>> pf = ParticleFilter.get(fb.tasks.get("lti_tracking"), 1000)
        >>> prior = fb.GMM([1.0], [[0.0, 0.0, 1.0, 0.0]], [np.eye(4)])
        >>> particles, log_weights, groups, ancestors = pf.init(jax.random.key(0), prior)
        >>> particles.shape
        (1000, 4)
    """

    def __init__(self, task: Any, num_particles: int, ess_threshold: float = 0.5,
                 resampling: str = "systematic", density: bool = True):
        if not getattr(task, "dynamic", False):
            raise ValueError(f"particle: expected a task whose state moves (task.dynamic); got "
                             f"{getattr(task, 'name', type(task).__name__)!r}")
        self.task, self.n = task, num_particles
        d = self.d = int(task.theta_dim)
        F = jnp.asarray(task.F, jnp.float32)
        Q = jnp.asarray(task.Q, jnp.float32)
        LQ = jnp.asarray(np.linalg.cholesky(np.asarray(task.Q, np.float64)), jnp.float32)
        resample = _systematic if resampling == "systematic" else _multinomial
        loglik = jax.vmap(lambda x, y: task.log_likelihood(x, y[None]).astype(jnp.float32),
                          in_axes=(0, None))
        threshold = ess_threshold * num_particles
        log_norm = 0.5 * d * math.log(2 * math.pi)

        def bandwidths(x, logw, onehot, n_eff):
            """Per group k: h_k chol(C_k + Q), C_k the weighted covariance of the group's
            predicted particles, h_k Silverman's factor for its effective sample size."""
            wl = jnp.exp(logw)[:, None] * onehot  # (N, L)
            tot = jnp.maximum(jnp.sum(wl, 0), 1e-30)
            mu = (wl.T @ x) / tot[:, None]
            dx = x[:, None, :] - mu[None]
            cov = jnp.einsum("nk,nki,nkj->kij", wl, dx, dx) / tot[:, None, None]
            h = (4.0 / ((d + 2) * jnp.maximum(n_eff, 1.0))) ** (1.0 / (d + 4))
            return h[:, None, None] * jnp.linalg.cholesky(cov + Q)

        def step(state, inp):
            x, logw, g, anc = state
            y, obs, key = inp
            k1, k2, k3 = jax.random.split(key, 3)
            w = jnp.exp(logw)
            ess = 1.0 / jnp.sum(w**2)
            idx = resample(k1, w)
            do = ess < threshold
            x = jnp.where(do, x[idx], x)
            g = jnp.where(do, g[idx], g)
            anc = jnp.where(do, idx, anc)  # ancestor at the last resampling: copies share it
            logw = jnp.where(do, jnp.full_like(logw, -math.log(num_particles)), logw)
            x = x @ F.T + jax.random.normal(k2, x.shape, jnp.float32) @ LQ.T
            ll = jnp.where(obs, loglik(x, y), 0.0)
            log_z = jax.nn.logsumexp(logw + ll)
            new = logw + ll - log_z
            if not density:
                return (x, new, g, anc), (x, new, logw, g, jnp.zeros((LABELS, d, d)), 0.0,
                                          log_z)
            # effective count of distinct particles per group: the effective sample size of
            # the weights summed over the copies of each ancestor (copies sit in one clump)
            w_anc = jnp.zeros_like(logw).at[anc].add(jnp.exp(logw))
            g_anc = jnp.zeros_like(g).at[anc].set(g)
            wl = w_anc[:, None] * (g_anc[:, None] == jnp.arange(LABELS))
            n_eff = jnp.sum(wl, 0) ** 2 / jnp.maximum(jnp.sum(wl**2, 0), 1e-30)
            onehot = (g[:, None] == jnp.arange(LABELS)).astype(jnp.float32)
            lh = bandwidths(x, logw, onehot, n_eff)
            # the density's normaliser from one draw per kernel (unbiased for the integral of
            # lik x kernel density)
            eps = jax.random.normal(k3, x.shape, jnp.float32)
            jit = x + jnp.einsum("nij,nj->ni", lh[g], eps)
            log_zh = jnp.where(obs, jax.nn.logsumexp(logw + loglik(jit, y)), 0.0)
            return (x, new, g, anc), (x, new, logw, g, lh, log_zh, log_z)

        def run(state, ys, obs, keys):
            return jax.lax.scan(step, state, (ys, obs, keys))[1]

        def log_prob(x, logw_pred, g, lh, y, obs, log_zh, pts):
            # log [lik(y | p) sum_i w_i N(p; x_i, H_g(i)) / Z_h]
            inv = jax.vmap(lambda L: jax.scipy.linalg.solve_triangular(
                L, jnp.eye(d, dtype=L.dtype), lower=True))(lh)  # (L, d, d)
            logdet = jnp.sum(jnp.log(jnp.diagonal(lh, axis1=-2, axis2=-1)), -1)  # (L,)
            a = jnp.einsum("nij,nj->ni", inv[g], x)
            base = logw_pred - logdet[g]
            ll = jnp.where(obs, loglik(pts, y), 0.0)

            def one(p):
                b = inv @ p  # (L, d)
                return jax.nn.logsumexp(base - 0.5 * jnp.sum((b[g] - a) ** 2, -1))

            mix = jax.lax.map(one, pts, batch_size=32)
            return ll + mix - log_zh - log_norm

        self._step = jax.jit(lambda state, y, obs, key: step(state, (y, obs, key)))
        self._run = jax.jit(run)
        self._log_prob = jax.jit(log_prob)

    @classmethod
    @functools.lru_cache(maxsize=8)
    def get(cls, task: Any, num_particles: int, ess_threshold: float = 0.5,
            resampling: str = "systematic", density: bool = True) -> ParticleFilter:
        """The compiled filter for these settings (built once, then reused)."""
        return cls(task, num_particles, ess_threshold, resampling, density)

    def init(self, key, prior: GMM):
        """num_particles draws from the prior, equally weighted, the index of the component
        each was drawn from (mod `LABELS`) and its ancestor index (itself)."""
        k1, k2 = jax.random.split(key)
        w = jnp.asarray(prior.weights, jnp.float32)
        comp = jax.random.categorical(k1, jnp.log(w), shape=(self.n,))
        eps = jax.random.normal(k2, (self.n, self.d), jnp.float32)
        L = jnp.asarray(prior.scale_tril, jnp.float32)[comp]
        x = jnp.asarray(prior.means, jnp.float32)[comp] + jnp.einsum("nij,nj->ni", L, eps)
        return (x, jnp.full((self.n,), -math.log(self.n), jnp.float32),
                (comp % LABELS).astype(jnp.int32), jnp.arange(self.n, dtype=jnp.int32))

    def step(self, key, state, y, observed: bool):
        """One update (resample if needed, move, reweight): the new state and the step's
        outputs (particles, log weights, predicted log weights, groups, bandwidth factors, log
        normaliser of the density, log evidence increment)."""
        return self._step(state, jnp.asarray(y, jnp.float32), jnp.asarray(observed), key)

    def run(self, key, state, ys, observed):
        """All steps in one compiled scan: the outputs of `step` stacked over T steps."""
        keys = jax.random.split(key, len(ys))
        return self._run(state, jnp.asarray(ys, jnp.float32), jnp.asarray(observed, bool), keys)


class ParticlePosterior:
    """The particle filter's posterior at one step: weighted particles, and a density.

    `log_prob` is the likelihood times a kernel density of the predicted particles,
    q(x_t) = lik(y_t | x_t) sum_i w_i N(x_t; x_i, H_g(i)) / Z_h, with (x_i, w_i) the moved
    particles and their weights before the update, g(i) the prior component particle i
    descends from, H_g = h_g^2 (C_g + Q) with C_g the weighted covariance of group g, h_g
    Silverman's factor (4 / ((d + 2) n_g))^(1 / (d + 4)) and n_g the group's effective count of
    distinct particles (the effective sample size of the weights summed over the copies of
    each ancestor since the last resampling, which sit in one clump), and Z_h the
    filter's estimate of the normaliser (one draw from each kernel). Only the prediction is
    smoothed: the observation's likelihood enters exactly, so sharp features it makes (a
    bearing's arc) are kept; one bandwidth per prior component keeps a multimodal prior from
    being smoothed across its modes. The density converges to the exact filtering density as
    the number of particles grows (h_g -> 0). `sample` draws particles by weight (multinomial);
    `mean` and `cov` are the weighted moments.
    """

    def __init__(self, pf: ParticleFilter, particles, log_weights, log_weights_pred, groups,
                 lh, y, observed: bool, log_zh, log_evidence):
        self._pf = pf
        self.particles, self.log_weights = particles, log_weights
        self._density = (log_weights_pred, groups, lh)
        self._y = jnp.asarray(y, jnp.float32)
        self._observed = bool(observed)
        self._log_zh = log_zh
        self.log_evidence = log_evidence

    @property
    def weights(self) -> np.ndarray:
        return np.exp(np.asarray(self.log_weights, np.float64))

    @property
    def ess(self) -> float:
        """Effective sample size of the weighted particles."""
        w = self.weights / self.weights.sum()
        return float(1.0 / np.sum(w**2))

    def mean(self) -> np.ndarray:
        w = self.weights / self.weights.sum()
        return w @ np.asarray(self.particles, np.float64)

    def cov(self) -> np.ndarray:
        w = self.weights / self.weights.sum()
        c = np.asarray(self.particles, np.float64) - self.mean()
        return (w[:, None] * c).T @ c

    def sample(self, key, n: int):
        idx = jax.random.categorical(key, jnp.asarray(self.log_weights), shape=(int(n),))
        return self.particles[idx]

    def log_prob(self, theta) -> np.ndarray:
        x = jnp.asarray(theta, jnp.float32)
        if x.shape[-1:] != (self._pf.d,):
            raise ValueError(f"theta: expected shape (..., {self._pf.d}); got {x.shape}")
        flat = x.reshape(-1, self._pf.d)
        lp = self._pf._log_prob(self.particles, *self._density, self._y,
                                jnp.asarray(self._observed), self._log_zh, flat)
        return np.asarray(lp, np.float64).reshape(x.shape[:-1])


@register_filter("particle")
def particle(key: Any, task: Any, prior: GMM, ys: np.ndarray, observed: np.ndarray, *,
             num_particles: int = 10_000, ess_threshold: float = 0.5,
             resampling: str = "systematic", **options: Any) -> list[ParticlePosterior]:
    """Bootstrap particle filter (`num_particles` particles from the prior, resampling when the
    effective sample size falls below `ess_threshold * num_particles`, "systematic" or
    "multinomial"), one compiled `jax.lax.scan` over the steps. Each posterior holds the
    weighted particles and a density (`ParticlePosterior`: exact likelihood times a kernel
    density of the predicted particles).

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("nonlinear_tracking")
        >>> prior = fb.GMM([1.0], [[5.0, 0.0, 0.0, 1.0]], [0.5 * np.eye(4)])
        >>> res = fb.filter("particle", prior, [[5.0, 0.02]], key=jax.random.key(0), task=task,
        ...                 num_particles=1000)
        >>> res[0].particles.shape
        (1000, 4)
    """
    if options:
        raise TypeError(f"particle: unexpected options {sorted(options)}")
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) \
            or num_particles < 2:
        raise ValueError(f"num_particles: expected an integer >= 2; got {num_particles!r}")
    if not isinstance(ess_threshold, int | float) or not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold: expected a number in [0, 1]; got {ess_threshold!r}")
    if resampling not in ("systematic", "multinomial"):
        raise ValueError(f"resampling: expected 'systematic' or 'multinomial'; got "
                         f"{resampling!r}")
    if not isinstance(prior, GMM):
        raise TypeError(f"prior: expected a GMM; got {type(prior).__name__}")
    pf = ParticleFilter.get(task, num_particles, float(ess_threshold), resampling)
    k_init, k_run = jax.random.split(key)
    state = pf.init(k_init, prior)
    outs = pf.run(k_run, state, np.asarray(ys, np.float64), np.asarray(observed))
    xs, logws, logws_pred, groups, lhs, log_zh, log_z = outs
    return [ParticlePosterior(pf, xs[t], logws[t], logws_pred[t], groups[t], lhs[t], ys[t],
                              bool(observed[t]), log_zh[t], log_z[t]) for t in range(len(ys))]
