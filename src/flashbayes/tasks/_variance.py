"""`gaussian_variance`: log sigma^2 with an inverse-gamma prior reaching the model as a GMM fit."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import digamma, gammaln, polygamma
from jaxtyping import Array

from flashbayes.distributions import GMM, fit_gmm, fit_gmm_arrays
from flashbayes.tasks._base import Task, register


class LogInverseGamma:
    """Distribution of theta = log sigma^2 when sigma^2 ~ InverseGamma(a, b).

    Implements the posterior interface (sample, log_prob, mean, cov).

    Example:
        >>> import jax
        >>> d = LogInverseGamma(3.0, 2.0)
        >>> d.sample(jax.random.key(0), 4).shape
        (4, 1)
    """

    dim = 1

    def __init__(self, a: float, b: float):
        if not (np.isfinite(a) and np.isfinite(b) and a > 0 and b > 0):
            raise ValueError(f"expected a > 0 and b > 0; got a={a}, b={b}")
        self.a, self.b = float(a), float(b)

    def log_prob(self, theta):
        t = jnp.asarray(theta)[..., 0]
        a, b = self.a, self.b
        return a * math.log(b) - gammaln(a) - a * t - b * jnp.exp(-t)

    def sample(self, key: Array, n: int):
        g = jax.random.gamma(key, self.a, (int(n),))
        return (math.log(self.b) - jnp.log(g))[:, None]

    def mean(self):
        return jnp.array([math.log(self.b) - float(digamma(self.a))])

    def cov(self):
        return jnp.array([[float(polygamma(1, self.a))]])

    def __repr__(self) -> str:
        return f"LogInverseGamma(a={self.a:.4g}, b={self.b:.4g})"


@register("gaussian_variance")
class GaussianVariance(Task):
    """theta = log sigma^2; x_i ~ N(0, sigma^2); sigma^2 ~ InverseGamma(a, b) with
    a ~ U[2, 6], b ~ U[0.5, 4], given to the model as a 4-component GMM fitted by EM to 10,000
    draws of log sigma^2.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("gaussian_variance")
        >>> p = task.sample_problem(jax.random.key(0), n=10)
        >>> p.prior.n_components, p.data.shape
        (4, (10, 1))
    """

    description = ("log sigma^2 of zero-mean Gaussian data; inverse-gamma prior fitted as a GMM "
                   "(exact conjugate posterior)")
    has_exact = True

    def __init__(self, *, a_range: tuple[float, float] = (2.0, 6.0),
                 b_range: tuple[float, float] = (0.5, 4.0), n_min: int = 0, n_max: int = 30,
                 n_components: int = 4, n_draws: int = 10_000, bank_size: int = 1024):
        self.theta_dim = 1
        self.data_dim = 1
        self.a_range, self.b_range = tuple(a_range), tuple(b_range)
        self.n_min, self.n_max = int(n_min), int(n_max)
        self.k_max = int(n_components)
        self.n_draws = int(n_draws)
        self.bank_size = int(bank_size)

    def user_prior(self, a: float, b: float) -> LogInverseGamma:
        return LogInverseGamma(a, b)

    def prior_to_gmm(self, key: Array, user_prior: LogInverseGamma) -> GMM:
        """The GMM the model sees: EM fit to `n_draws` draws of log sigma^2."""
        k1, k2 = jax.random.split(key)
        return fit_gmm(k2, user_prior.sample(k1, self.n_draws), self.k_max)

    def prepare(self, key: Array) -> Any:
        """A bank of (a, b) priors with their GMM fits, shared by all training batches."""
        return self._bank(key, self.bank_size)

    def _bank(self, key, size):
        ka, kb, kd, kf = jax.random.split(key, 4)
        a = jax.random.uniform(ka, (size,), minval=self.a_range[0], maxval=self.a_range[1])
        b = jax.random.uniform(kb, (size,), minval=self.b_range[0], maxval=self.b_range[1])

        def fit(args):
            ai, bi, kdi, kfi = args
            g = jax.random.gamma(kdi, ai, (self.n_draws,))
            draws = (jnp.log(bi) - jnp.log(g))[:, None]
            return fit_gmm_arrays(kfi, draws, self.k_max)

        w, m, s = jax.lax.map(fit, (a, b, jax.random.split(kd, size), jax.random.split(kf, size)),
                              batch_size=32)
        return {"a": a, "b": b, "weights": w, "means": m, "scale_tril": s}

    def _sample_prior(self, key, state):
        if state is None:
            raise ValueError("gaussian_variance needs task.prepare(key) before sampling batches")
        i = jax.random.randint(key, (), 0, state["a"].shape[0])
        cmask = jnp.ones((self.k_max,), bool)
        return (state["weights"][i], state["means"][i], state["scale_tril"][i], cmask,
                (state["a"][i], state["b"][i]))

    def _sample_theta(self, key, weights, means, scale_tril, aux):
        a, b = aux
        return (jnp.log(b) - jnp.log(jax.random.gamma(key, a)))[None]

    def _simulate(self, key, theta, n):
        return jax.random.normal(key, (n, 1)) * jnp.exp(0.5 * theta[0])

    def _user_prior(self, aux):
        a, b = aux
        return LogInverseGamma(float(a), float(b))

    def sample_problem(self, key, *, n=None, state=None):
        if state is None:
            state = self._bank(jax.random.fold_in(key, 7), 1)
        return super().sample_problem(key, n=n, state=state)

    def log_likelihood(self, theta, data, mask=None):
        x = data[..., 0]
        ll = -0.5 * x**2 * jnp.exp(-theta[0]) - 0.5 * theta[0] - 0.5 * math.log(2 * math.pi)
        if mask is not None:
            ll = jnp.where(mask, ll, 0.0)
        return jnp.sum(ll)

    def exact_posterior(self, prior: LogInverseGamma, data: Any) -> LogInverseGamma:
        """InverseGamma(a + n/2, b + sum x^2 / 2) for sigma^2, as a distribution of log sigma^2."""
        if not isinstance(prior, LogInverseGamma):
            raise TypeError("prior: expected the user's LogInverseGamma prior (the GMM is only "
                            f"its fit); got {type(prior).__name__}")
        x = self.validate_data(data)
        return LogInverseGamma(prior.a + 0.5 * x.shape[0], prior.b + 0.5 * float(np.sum(x**2)))
