"""`sbi_<name>`: an sbibm simulator under a family of GMM priors, for the Distribution
Transformer's prior-swap route of simulation-based inference.

A neural posterior estimator (`fb.sbi.train_npe`) learns p(theta | x) under one fixed prior; a new
prior then needs importance re-weighting (`fb.sbi.prior_swap`), which fails when the new prior
puts its mass where the old posterior has few draws. Here the prior is an input instead: the
network sees (prior GMM, x) and returns the posterior GMM, for any prior of the family, in one
forward pass. Training needs only the simulator: theta is drawn from a random GMM prior and x from
the simulator.

The prior family is the shared one (`sample_gmm_family`) laid over the sbibm prior's scale: per
axis, component means at loc + sd * U[mean_range] and component scales sd * LogUniform[
scale_range], with random rotations, where loc and sd are the sbibm prior's mean and standard
deviation. A data set holds n = 1..n_max independent simulations at the same theta (one, as in
sbibm, by default); 5 % of training problems hold none.

For the linear-Gaussian simulators (`sbi_gaussian_linear`, `sbi_gaussian_linear_uniform`:
x = theta + N(0, 0.1 I)) and for `sbi_gaussian_mixture` (x = theta plus an equal mixture of
N(0, I) and N(0, 0.01 I)) the posterior under a GMM prior is a GMM in closed form
(`exact_posterior`). For the linear ones the model is also translation equivariant: it centres
the prior and shifts x to match before the network runs. For slcp and bernoulli_glm the task's
likelihood gives a NUTS reference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes.distributions import GMM
from flashbayes.tasks._base import Task, register, sample_gmm_family

#: sbibm tasks offered here; sir is left out (its simulator needs beta, gamma > 0, which a GMM
#: prior on R^2 does not respect)
SIMULATOR_TASKS = ("gaussian_linear", "gaussian_linear_uniform", "gaussian_mixture",
                   "bernoulli_glm", "slcp")
_LINEAR = ("gaussian_linear", "gaussian_linear_uniform")
_P_EMPTY = 0.05  # share of training problems without data (the posterior is the prior)


class SimulatorTask(Task):
    """Base of the `sbi_<name>` tasks: an sbibm simulator with a GMM prior family.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("sbi_gaussian_linear")
        >>> p = task.sample_problem(jax.random.key(0), n=1)
        >>> p.data.shape, p.prior.dim
        ((1, 10), 10)
        >>> post = task.exact_posterior(p.prior, p.data)
        >>> post.n_components == p.prior.n_components
        True
    """

    sbi_name: str = ""

    def __init__(self, *, mean_range: tuple[float, float] = (-1.5, 1.5),
                 scale_range: tuple[float, float] = (0.1, 2.0), n_max: int = 1,
                 k_min: int = 1, k_max: int = 5):
        from flashbayes.sbi import tasks as sbi_tasks

        self.sbi_task = sbi_tasks.get(self.sbi_name)
        self.theta_dim, self.data_dim = self.sbi_task.dim_theta, self.sbi_task.dim_x
        self.mean_range = tuple(float(v) for v in mean_range)
        self.scale_range = tuple(float(v) for v in scale_range)
        if len(self.mean_range) != 2 or not self.mean_range[0] < self.mean_range[1]:
            raise ValueError(f"mean_range: expected (low, high) with low < high; got {mean_range}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError("scale_range: expected (low, high) with 0 < low <= high; got "
                             f"{scale_range}")
        self.n_min, self.n_max = 0, int(n_max)
        if self.n_max < 1:
            raise ValueError(f"n_max: expected >= 1; got {n_max}")
        self.k_min, self.k_max = int(k_min), int(k_max)
        prior = self.sbi_task.prior()
        self.loc = np.asarray(prior.mean, np.float64)
        self.sd = np.sqrt(np.asarray(prior.variance, np.float64))
        self.has_exact = self.sbi_name in (*_LINEAR, "gaussian_mixture")

    def _sample_prior(self, key, state):
        w, m, s, cmask = sample_gmm_family(
            key, d=self.theta_dim, k_min=self.k_min, k_max=self.k_max,
            mean_low=self.mean_range[0], mean_high=self.mean_range[1],
            scale_low=self.scale_range[0], scale_high=self.scale_range[1])
        loc, sd = jnp.asarray(self.loc, jnp.float32), jnp.asarray(self.sd, jnp.float32)
        means = loc + sd * m
        if self.translation_equivariant:  # zero mean: see `translation_equivariant`
            means = means - jnp.sum(w[:, None] * means, 0)
        means = jnp.where(cmask[:, None], means, 0.0)
        tril = jnp.where(cmask[:, None, None], sd[:, None] * s, jnp.eye(self.theta_dim))
        return w, means, tril, cmask, None

    @property
    def translation_equivariant(self) -> bool:
        """x = theta + noise: shifting theta by c shifts x by c, so the model centres each prior
        (and shifts x to match) before the network runs, and trains on centred priors only."""
        return self.sbi_name in _LINEAR

    def data_offset(self, theta_shift):
        """The shift of x that matches a shift of theta (the linear simulators only)."""
        return theta_shift

    def _sample_n(self, key):
        k_e, k_n = jax.random.split(key)
        n = jax.random.randint(k_n, (), 1, self.n_max + 1)
        return jnp.where(jax.random.bernoulli(k_e, _P_EMPTY), 0, n)

    def _simulate(self, key, theta, n):
        sim = self.sbi_task.simulator
        return jax.vmap(lambda k: sim(k, theta))(jax.random.split(key, n)).astype(jnp.float32)

    def log_likelihood(self, theta, data, mask=None):
        ll = jax.vmap(lambda x: self.sbi_task.log_likelihood(theta, x))(jnp.asarray(data))
        if mask is not None:
            ll = jnp.where(mask, ll, 0.0)
        return jnp.sum(ll)

    def exact_posterior(self, prior: GMM, data: Any) -> GMM:
        """The closed-form GMM posterior: for the linear-Gaussian simulators, a Gaussian-sum
        update (as many components as the prior); for gaussian_mixture, whose noise is an equal
        mixture of N(0, I) and N(0, 0.01 I), every prior component splits in two per
        simulation (2^n K components for n simulations)."""
        if not self.has_exact:
            return super().exact_posterior(prior, data)
        from flashbayes.sbi._tasks import _GL_VAR, _GM_SCALES
        from flashbayes.tasks._linear import gaussian_sum_update

        if not isinstance(prior, GMM):
            raise TypeError(f"prior: expected a GMM; got {type(prior).__name__}")
        if prior.dim != self.theta_dim:
            raise ValueError(f"prior: expected dimension {self.theta_dim}; got {prior.dim}")
        x = self.validate_data(data)
        d = self.theta_dim
        if self.sbi_name in _LINEAR:
            return gaussian_sum_update(prior, np.eye(d), _GL_VAR * np.eye(d), x)
        logw = np.log(np.maximum(np.asarray(prior.weights, np.float64), 1e-300))
        m = np.asarray(prior.means, np.float64)
        ls = np.asarray(prior.scale_tril, np.float64)
        cov = ls @ np.swapaxes(ls, -1, -2)
        for row in x:
            parts = [_noise_update(logw + np.log(0.5), m, cov, row, sd**2) for sd in _GM_SCALES]
            logw, m, cov = (np.concatenate(a) for a in zip(*parts))
        w = np.exp(logw - logw.max())
        return GMM(weights=w / w.sum(), means=m, scale_tril=np.linalg.cholesky(cov))


def _noise_update(logw, means, cov, x, var):
    """Components (log weights, means, covariances) updated by one x = theta + N(0, var I):
    the Kalman update of each, its weight times the evidence N(x; m, S + var I). Float64."""
    d = means.shape[1]
    c = cov + var * np.eye(d)
    r = x - means
    gain = np.swapaxes(np.linalg.solve(c, cov), -1, -2)  # S C^-1 (both symmetric)
    new_m = means + np.einsum("kij,kj->ki", gain, r)
    new_cov = cov - gain @ cov
    new_cov = 0.5 * (new_cov + np.swapaxes(new_cov, -1, -2))
    quad = np.einsum("ki,ki->k", r, np.linalg.solve(c, r[..., None])[..., 0])
    log_ev = -0.5 * (quad + np.linalg.slogdet(c)[1] + d * np.log(2 * np.pi))
    return logw + log_ev, new_m, new_cov


def _register(sbi_name: str) -> None:
    cls = type(f"Simulator_{sbi_name}", (SimulatorTask,), {
        "sbi_name": sbi_name,
        "description": f"sbibm {sbi_name} simulator under GMM priors (prior-swap route)",
        "__module__": __name__,
    })
    register(f"sbi_{sbi_name}")(cls)


for _name in SIMULATOR_TASKS:
    _register(_name)
