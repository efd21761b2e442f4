"""`gp_hyperprior`: functions drawn from a Gaussian process whose hyperparameters have priors.

The generative model (defaults: the shipped models' hyperprior):

    l ~ LogNormal(log 0.2, 0.5)          lengthscale (isotropic)
    s ~ LogNormal(0, 0.5)                output standard deviation
    sigma ~ LogNormal(log 0.1, 0.5)      noise standard deviation
    m ~ Normal(0, 0.5^2)                 constant mean
    x_i ~ Uniform[0, 1]^D
    f ~ GP(0, k), k(x, x') = s^2 r(|x - x'| / l), r = RBF or Matern-5/2
    y_i = m + f(x_i) + eps_i, eps_i ~ N(0, sigma^2)

Hyperparameters are ordered (lengthscale, outputscale, noise, mean) everywhere; the
unconstrained vector is (log l, log s, log sigma, m).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jaxtyping import Array, Bool, Float

from flashbayes.tasks._predictive import (
    PredictiveBatch,
    PredictiveProblem,
    PredictiveTask,
    register_predictive,
)

KERNELS = ("rbf", "matern52")
_LOG_2PI = math.log(2 * math.pi)


def kernel_matrix(kernel: str, x1: Float[Array, "n D"], x2: Float[Array, "m D"],
                  lengthscale: Array, outputscale: Array, *, xp: Any = jnp
                  ) -> Float[Array, "n m"]:
    """Covariance matrix s^2 r(|x - x'| / l) for `kernel` in ("rbf", "matern52").

    RBF: r(d) = exp(-d^2 / 2); Matern-5/2: r(d) = (1 + sqrt5 d + 5 d^2 / 3) exp(-sqrt5 d).
    `xp` is the array module: jax.numpy (default, traceable) or numpy (float64 on the host).

    Example:
        >>> import jax.numpy as jnp
        >>> k = kernel_matrix("rbf", jnp.zeros((1, 1)), jnp.ones((1, 1)), 1.0, 2.0)
        >>> round(float(k[0, 0]), 4)  # 4 exp(-1/2)
        2.4261
    """
    diff = (x1[:, None, :] - x2[None, :, :]) / lengthscale
    d2 = xp.sum(diff**2, -1)
    if kernel == "rbf":
        r = xp.exp(-0.5 * d2)
    elif kernel == "matern52":
        # the gradient of sqrt at 0 is infinite: take sqrt of a floored value, then mask
        d = xp.where(d2 > 0, xp.sqrt(xp.where(d2 > 0, d2, 1.0)), 0.0)
        r = (1.0 + math.sqrt(5.0) * d + 5.0 / 3.0 * d2) * xp.exp(-math.sqrt(5.0) * d)
    else:
        raise ValueError(f"kernel: expected one of {KERNELS}; got {kernel!r}")
    return outputscale**2 * r


def _masked_cov(kernel, hyper, x, mask, jitter):
    """Noisy covariance of the context; padded rows are replaced by independent unit rows."""
    l, s, sigma = hyper[0], hyper[1], hyper[2]
    k = kernel_matrix(kernel, x, x, l, s)
    both = mask[:, None] & mask[None, :]
    diag = jnp.where(mask, sigma**2 + jitter * s**2, 1.0)
    return jnp.where(both, k, 0.0) + jnp.diag(diag)


def gp_log_marginal(kernel: str, hyper: Float[Array, " 4"], x: Float[Array, "n D"],
                    y: Float[Array, " n"], mask: Bool[Array, " n"] | None = None, *,
                    jitter: float = 1e-6) -> Array:
    """log p(y | x, hyper): the exact GP marginal likelihood of the (unmasked) rows.

    Example:
        >>> import jax.numpy as jnp
        >>> h = jnp.array([0.2, 1.0, 0.1, 0.0])
        >>> lp = gp_log_marginal("rbf", h, jnp.zeros((1, 1)), jnp.zeros(1))
        >>> round(float(lp), 4)  # log N(0; 0, 1 + 0.01)
        -0.9239
    """
    if mask is None:
        mask = jnp.ones(y.shape[0], bool)
    cov = _masked_cov(kernel, hyper, x, mask, jitter)
    chol = jnp.linalg.cholesky(cov)
    r = jnp.where(mask, y - hyper[3], 0.0)
    a = jsl.solve_triangular(chol, r, lower=True)
    n = jnp.sum(mask)
    return (-0.5 * jnp.sum(a**2) - jnp.sum(jnp.log(jnp.diagonal(chol)))
            - 0.5 * n * _LOG_2PI)


def gp_predict(kernel: str, hyper: Float[Array, " 4"], x: Float[Array, "n D"],
               y: Float[Array, " n"], query_x: Float[Array, "m D"],
               mask: Bool[Array, " n"] | None = None, *, jitter: float = 1e-6
               ) -> tuple[Float[Array, " m"], Float[Array, " m"]]:
    """Mean and variance of the GP posterior predictive of a new observation y* at each query
    point (observation noise included), given fixed hyperparameters.

    Example:
        >>> import jax.numpy as jnp
        >>> h = jnp.array([0.2, 1.0, 0.1, 0.5])
        >>> mu, var = gp_predict("rbf", h, jnp.zeros((1, 1)), jnp.ones(1), jnp.full((1, 1), 5.0))
        >>> [round(float(mu[0]), 4), round(float(var[0]), 4)]  # far away: the prior
        [0.5, 1.01]
    """
    if mask is None:
        mask = jnp.ones(y.shape[0], bool)
    l, s, sigma, m = hyper[0], hyper[1], hyper[2], hyper[3]
    cov = _masked_cov(kernel, hyper, x, mask, jitter)
    chol = jnp.linalg.cholesky(cov)
    r = jnp.where(mask, y - m, 0.0)
    kq = jnp.where(mask[None, :], kernel_matrix(kernel, query_x, x, l, s), 0.0)  # (m, n)
    alpha = jsl.cho_solve((chol, True), r)
    v = jsl.solve_triangular(chol, kq.T, lower=True)  # (n, m)
    mean = m + kq @ alpha
    var = s**2 * (1.0 + jitter) - jnp.sum(v**2, 0) + sigma**2
    return mean, jnp.maximum(var, sigma**2)


@register_predictive("gp_hyperprior")
class GPHyperprior(PredictiveTask):
    """Data sets from a GP with LogNormal / Normal hyperpriors on lengthscale, output scale,
    noise and constant mean (see the module docstring and docs/gp.md).

    Args:
        kernel: "rbf" or "matern52".
        x_dim: input dimension D (1, 2 or 3); inputs are uniform on [0, 1]^D.
        n_min, n_max: range of the number of context points (1 <= n_min <= n_max).
        lengthscale, outputscale, noise: (mu, tau) of LogNormal hyperpriors: log value
            ~ N(mu, tau^2).
        mean: (mu, tau) of the Normal hyperprior on the constant mean.
        jitter: added to the diagonal of every covariance, in units of s^2 (float32 safety).

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get_predictive("gp_hyperprior")
        >>> b = task.sample_batch(jax.random.key(0), 8, n_query=5)
        >>> b.context_x.shape, b.query_y.shape, b.hyper.shape
        ((8, 100, 1), (8, 5), (8, 4))
    """

    description = "GP with hyperpriors on lengthscale, output scale, noise and mean (predictive)"
    hyper_names = ("lengthscale", "outputscale", "noise", "mean")

    def __init__(self, *, kernel: str = "rbf", x_dim: int = 1, n_min: int = 1, n_max: int = 100,
                 lengthscale: tuple[float, float] = (math.log(0.2), 0.5),
                 outputscale: tuple[float, float] = (0.0, 0.5),
                 noise: tuple[float, float] = (math.log(0.1), 0.5),
                 mean: tuple[float, float] = (0.0, 0.5), jitter: float = 1e-6):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {KERNELS}; got {kernel!r}")
        if int(x_dim) != x_dim or not 1 <= int(x_dim) <= 3:
            raise ValueError(f"x_dim: expected 1, 2 or 3; got {x_dim!r}")
        if not (int(n_min) == n_min and int(n_max) == n_max and 1 <= n_min <= n_max):
            raise ValueError(f"n_min, n_max: expected integers with 1 <= n_min <= n_max; "
                             f"got {n_min!r}, {n_max!r}")
        prior = {}
        for name, value in (("lengthscale", lengthscale), ("outputscale", outputscale),
                            ("noise", noise), ("mean", mean)):
            try:
                mu, tau = (float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name}: expected a pair (mu, tau); got {value!r}") from exc
            if not (math.isfinite(mu) and math.isfinite(tau) and tau > 0):
                raise ValueError(f"{name}: expected finite mu and tau > 0; got {value!r}")
            prior[name] = (mu, tau)
        self.kernel = kernel
        self.x_dim = int(x_dim)
        self.n_min, self.n_max = int(n_min), int(n_max)
        self.jitter = float(jitter)
        # (mu, tau) of the unconstrained hyperparameters (log l, log s, log sigma, m)
        self.prior_loc = np.array([prior[k][0] for k in self.hyper_names])
        self.prior_scale = np.array([prior[k][1] for k in self.hyper_names])

    # -- hyperprior ---------------------------------------------------------------------------
    def sample_hyper(self, key: Array) -> Float[Array, " 4"]:
        """One draw of (lengthscale, outputscale, noise, mean) from the hyperprior."""
        z = jnp.asarray(self.prior_loc) + jnp.asarray(self.prior_scale) * jax.random.normal(
            key, (4,))
        return self.constrain(z)

    @staticmethod
    def constrain(z: Float[Array, "... 4"]) -> Float[Array, "... 4"]:
        """(log l, log s, log sigma, m) -> (l, s, sigma, m)."""
        return jnp.concatenate([jnp.exp(z[..., :3]), z[..., 3:]], -1)

    @staticmethod
    def unconstrain(hyper: Float[Array, "... 4"]) -> Float[Array, "... 4"]:
        """(l, s, sigma, m) -> (log l, log s, log sigma, m)."""
        return jnp.concatenate([jnp.log(hyper[..., :3]), hyper[..., 3:]], -1)

    def log_hyperprior_unconstrained(self, z: Float[Array, " 4"]) -> Array:
        """Log density of the unconstrained hyperparameters (the Jacobian of exp included)."""
        loc, scale = jnp.asarray(self.prior_loc), jnp.asarray(self.prior_scale)
        u = (z - loc) / scale
        return jnp.sum(-0.5 * u**2 - jnp.log(scale) - 0.5 * _LOG_2PI)

    # -- GP maths -----------------------------------------------------------------------------
    def log_marginal(self, hyper, x, y, mask=None):
        """log p(y | x, hyper) with this task's kernel (see `gp_log_marginal`)."""
        return gp_log_marginal(self.kernel, hyper, x, y, mask, jitter=self.jitter)

    def predict(self, hyper, x, y, query_x, mask=None):
        """Predictive mean and variance of y* (see `gp_predict`)."""
        return gp_predict(self.kernel, hyper, x, y, query_x, mask, jitter=self.jitter)

    # -- data sets ----------------------------------------------------------------------------
    def _one(self, key: Array, n_query: int, n: int | None = None, exact: bool = False):
        kh, kn, kx, kq, kz = jax.random.split(key, 5)
        hyper = self.sample_hyper(kh)
        if n is None:
            n = jax.random.randint(kn, (), self.n_min, self.n_max + 1)
        cx = jax.random.uniform(kx, (self.n_max, self.x_dim))
        qx = jax.random.uniform(kq, (n_query, self.x_dim))
        allx = jnp.concatenate([cx, qx], 0)
        l, s, sigma, m = hyper[0], hyper[1], hyper[2], hyper[3]
        cov = kernel_matrix(self.kernel, allx, allx, l, s)
        cov = cov + jnp.diag(jnp.full(allx.shape[0], sigma**2 + self.jitter * s**2))
        chol = jnp.linalg.cholesky(cov)
        z = jax.random.normal(kz, (allx.shape[0],))
        y = m + chol @ z
        cmask = jnp.arange(self.n_max) < n
        cx = jnp.where(cmask[:, None], cx, 0.0)
        cy = jnp.where(cmask, y[:self.n_max], 0.0)
        batch = PredictiveBatch(cx, cy, cmask, qx, y[self.n_max:], hyper)
        if not exact:
            return batch
        # The real context rows come first, so y[:n] = m + chol[:n, :n] z[:n] fixes z[:n], and
        # a query value is m + chol[q, :n] z[:n] plus independent N(0, 1) terms on the other
        # columns: its exact predictive given the real context, with no further solve.
        seen = jnp.arange(allx.shape[0]) < n
        rows = chol[self.n_max:]
        mean = m + jnp.where(seen, rows, 0.0) @ z
        var = jnp.sum(jnp.where(seen, 0.0, rows**2), -1)
        return batch, mean, var

    def sample_batch(self, key: Array, batch_size: int, *, n_query: int = 50
                     ) -> PredictiveBatch:
        """`batch_size` data sets: context padded to `n_max` rows (n uniform on
        n_min..n_max), `n_query` query points each; jit-able (sizes static)."""
        return jax.vmap(lambda k: self._one(k, n_query))(jax.random.split(key, batch_size))

    def sample_batch_exact(self, key: Array, batch_size: int, *, n_query: int = 50
                           ) -> tuple[PredictiveBatch, Array, Array]:
        """The data sets of `sample_batch` (the same draws for the same key), with the mean and
        variance, each (batch_size, n_query), of the exact predictive of y* at every query
        point given the real context points and the data set's true hyperparameters (what
        `predict` returns), read off the joint draw's Cholesky factor. Jit-able.

        Example:
            >>> import jax
            >>> import flashbayes as fb
            >>> task = fb.tasks.get_predictive("gp_hyperprior", n_max=5)
            >>> batch, mean, var = task.sample_batch_exact(jax.random.key(0), 2, n_query=3)
            >>> mean.shape, var.shape
            ((2, 3), (2, 3))
        """
        return jax.vmap(lambda k: self._one(k, n_query, exact=True))(
            jax.random.split(key, batch_size))

    def sample_problem(self, key: Array, *, n: int, n_query: int = 50) -> PredictiveProblem:
        """One data set with exactly n context points, as NumPy arrays.

        Example:
            >>> import jax
            >>> import flashbayes as fb
            >>> p = fb.tasks.get_predictive("gp_hyperprior").sample_problem(
            ...     jax.random.key(0), n=3, n_query=2)
            >>> p.context_x.shape, p.context_y.shape, p.query_x.shape
            ((3, 1), (3,), (2, 1))
        """
        if int(n) != n or not self.n_min <= n <= self.n_max:
            raise ValueError(f"n: expected an integer in {self.n_min}..{self.n_max}; got {n!r}")
        if int(n_query) != n_query or n_query < 1:
            raise ValueError(f"n_query: expected a positive integer; got {n_query!r}")
        n = int(n)
        b = self._one(key, int(n_query), n)
        return PredictiveProblem(
            context_x=np.asarray(b.context_x)[:n].astype(np.float64),
            context_y=np.asarray(b.context_y)[:n].astype(np.float64),
            query_x=np.asarray(b.query_x, np.float64), query_y=np.asarray(b.query_y, np.float64),
            hyper=np.asarray(b.hyper, np.float64))

    def validate(self, context_x: Any, context_y: Any, query_x: Any
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check shapes (n, D), (n,), (m, D) and finiteness; 1-D inputs are read as D = 1."""
        out = []
        for name, value, ndim in (("context_x", context_x, 2), ("context_y", context_y, 1),
                                  ("query_x", query_x, 2)):
            try:
                a = np.asarray(value, np.float64)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{name}: expected an array of numbers; got "
                                f"{type(value).__name__}") from exc
            if ndim == 2 and a.ndim == 1 and self.x_dim == 1:
                a = a[:, None]
            if a.ndim != ndim or (ndim == 2 and a.shape[1] != self.x_dim):
                want = f"(n, {self.x_dim})" if ndim == 2 else "(n,)"
                raise ValueError(f"{name}: expected shape {want}; got {a.shape}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{name}: expected finite values; got NaN or inf")
            out.append(a)
        cx, cy, qx = out
        if cx.shape[0] != cy.shape[0]:
            raise ValueError(f"context_y: expected {cx.shape[0]} values (one per context_x row); "
                             f"got {cy.shape[0]}")
        if qx.shape[0] < 1:
            raise ValueError("query_x: expected at least one query point; got 0")
        return cx, cy, qx
