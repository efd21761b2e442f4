"""Per-query-point Gaussian mixtures: the posterior predictive of the GP references and of the
GMM-head PFN (the Distribution Transformer variant of `gp_hyperprior`)."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp, ndtr
from jaxtyping import Array, Float

from flashbayes.distributions._info import Info


class GaussianMixturePredictive(eqx.Module):
    """Per query point j, p(y_j) = sum_s w_sj N(y_j; means[s, j], variances[s, j]).

    Args:
        weights: (S,) mixture weights shared by every query point, or (S, m) weights of each
            query point's own mixture (normalised over S here).
        means, variances: (S, m).
        info: what the engine reports (hyperparameters, seconds, diagnostics).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> p = GaussianMixturePredictive(jnp.ones(1), jnp.zeros((1, 2)), jnp.ones((1, 2)))
        >>> [round(float(v), 4) for v in p.log_prob(jnp.zeros(2))]
        [-0.9189, -0.9189]
        >>> round(float(p.quantile(0.975)[0]), 3), p.sample(jax.random.key(0), 3).shape
        (1.96, (3, 2))
    """

    weights: Float[Array, "S m"]
    means: Float[Array, "S m"]
    variances: Float[Array, "S m"]
    info: Info = eqx.field(static=True)

    def __init__(self, weights, means, variances, info: dict | None = None):
        means = jnp.asarray(means)
        w = jnp.asarray(weights, means.dtype)
        if means.ndim != 2 or jnp.shape(variances) != means.shape or \
                w.shape not in (means.shape[:1], means.shape):
            raise ValueError(f"expected weights (S,) or (S, m), means and variances (S, m); "
                             f"got {w.shape}, {means.shape}, {jnp.shape(variances)}")
        w = jnp.broadcast_to(w.reshape(w.shape[0], -1), means.shape)
        if not isinstance(w, jax.core.Tracer):
            wn = np.asarray(w)
            if not (np.all(wn >= 0) and np.all(wn.sum(0) > 0)):
                raise ValueError("weights: expected non-negative values with a positive sum for "
                                 f"every query point; got values in [{wn.min()}, {wn.max()}]")
        self.weights = w / jnp.sum(w, 0, keepdims=True)
        self.means = means
        self.variances = jnp.asarray(variances, means.dtype)
        self.info = Info(info or {})

    def log_prob(self, y: Float[Array, " m"]) -> Float[Array, " m"]:
        """(m,) log predictive density of one value per query point."""
        y = jnp.asarray(y, self.means.dtype)
        lp = (-0.5 * (y[None] - self.means) ** 2 / self.variances
              - 0.5 * jnp.log(2 * math.pi * self.variances))
        return logsumexp(lp + jnp.log(self.weights), axis=0)

    def cdf(self, y: Float[Array, " m"]) -> Float[Array, " m"]:
        y = jnp.asarray(y, self.means.dtype)
        return jnp.sum(self.weights * ndtr((y[None] - self.means)
                                                    / jnp.sqrt(self.variances)), 0)

    def mean(self) -> Float[Array, " m"]:
        return jnp.sum(self.weights * self.means, 0)

    def variance(self) -> Float[Array, " m"]:
        m = self.mean()
        return jnp.sum(self.weights * (self.variances + self.means**2), 0) - m**2

    def quantile(self, q) -> Float[Array, " m"]:
        """(m,) quantiles at level q (a scalar or (m,) in (0, 1)), by bisection on the CDF (one
        compiled program per shape)."""
        q = jnp.broadcast_to(jnp.asarray(q, self.means.dtype), self.means.shape[1:])
        return _quantile(self.weights, self.means, self.variances, q)

    def sample(self, key: Array, n: int) -> Float[Array, "n m"]:
        """(n, m) draws; each query point draws its own mixture component."""
        k1, k2 = jax.random.split(key)
        comp = jax.random.categorical(k1, jnp.log(self.weights).T, axis=-1,
                                      shape=(n, self.means.shape[1]))
        cols = jnp.arange(self.means.shape[1])[None]
        eps = jax.random.normal(k2, (n, self.means.shape[1]), self.means.dtype)
        return self.means[comp, cols] + jnp.sqrt(self.variances[comp, cols]) * eps

    @property
    def n_queries(self) -> int:
        return self.means.shape[1]

    def gmm(self, j: int):
        """The predictive of query point j as a one-dimensional `fb.GMM` (to feed the rest of
        the library: diagnostics, a prior for the next step)."""
        from flashbayes.distributions._gmm import GMM

        if not -self.n_queries <= j < self.n_queries:
            raise IndexError(f"query point: expected an index below {self.n_queries}; got {j}")
        return GMM(self.weights[:, j], self.means[:, j, None],
                   jnp.sqrt(self.variances[:, j])[:, None, None])


@jax.jit
def _quantile(weights, means, variances, q):
    sd = jnp.sqrt(variances)

    def body(_, bounds):
        a, b = bounds
        mid = 0.5 * (a + b)
        below = jnp.sum(weights * ndtr((mid[None] - means) / sd), 0) < q
        return jnp.where(below, mid, a), jnp.where(below, b, mid)

    a, b = jax.lax.fori_loop(0, 80, body, (jnp.min(means - 12 * sd, 0),
                                           jnp.max(means + 12 * sd, 0)))
    return 0.5 * (a + b)
