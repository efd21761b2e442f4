"""The Riemann ("bar") distribution: a histogram density on fixed borders with half-normal tails.

K buckets on borders b_0 < b_1 < ... < b_K. Buckets 1..K-2 are uniform on [b_k, b_{k+1}]. The
outer buckets have full support: bucket 0 is a half-normal on (-inf, b_1] with scale b_1 - b_0,
bucket K-1 a half-normal on [b_{K-1}, inf) with scale b_K - b_{K-1}. Bucket probabilities come
from logits, so a network head of K outputs parametrises a density over the whole real line.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri
from jaxtyping import Array, Float

from flashbayes.distributions._info import Info

_LOG_HALFNORMAL = math.log(2.0) - 0.5 * math.log(2 * math.pi)
_HALFNORMAL_MEAN = math.sqrt(2.0 / math.pi)
_HALFNORMAL_MEDIAN = 0.6744897501960817  # Phi^-1(3/4)


def bar_borders(samples: np.ndarray, n_buckets: int, *, min_width: float = 1e-6) -> np.ndarray:
    """Bucket borders from samples of the variable (e.g. prior-predictive draws).

    The inner borders b_1..b_{K-1} are the sample quantiles at k / K, so every bucket holds the
    same prior mass. The outer borders set the tail scales: each tail's half-normal is given
    the median the samples have beyond b_1 (or b_{K-1}), i.e. the quantile at 1 / (2K) (or
    1 - 1 / (2K)). Borders closer than `min_width` (ties) are pushed apart.

    Example:
        >>> import numpy as np
        >>> b = bar_borders(np.random.default_rng(0).normal(size=10_000), 4)
        >>> b.shape, bool(np.all(np.diff(b) > 0)), abs(round(float(b[2]), 1))
        ((5,), True, 0.0)
    """
    x = np.asarray(samples, np.float64).ravel()
    if int(n_buckets) != n_buckets or n_buckets < 3:
        raise ValueError(f"n_buckets: expected an integer >= 3; got {n_buckets!r}")
    if x.size < n_buckets or not np.all(np.isfinite(x)):
        raise ValueError(f"samples: expected at least n_buckets = {n_buckets} finite values; "
                         f"got {x.size} values")
    k = int(n_buckets)
    inner = np.quantile(x, np.arange(1, k) / k)
    gaps = np.maximum(np.diff(inner), min_width)
    inner = inner[0] + np.concatenate([[0.0], np.cumsum(gaps)])
    lo, hi = np.quantile(x, [0.5 / k, 1.0 - 0.5 / k])
    left = max(inner[0] - lo, min_width) / _HALFNORMAL_MEDIAN
    right = max(hi - inner[-1], min_width) / _HALFNORMAL_MEDIAN
    return np.concatenate([[inner[0] - left], inner, [inner[-1] + right]])


class BarDistribution(eqx.Module):
    """A batch of bar distributions sharing one set of borders.

    Args:
        borders: (K + 1,) increasing borders (see the module docstring for the tails).
        logits: (..., K) unnormalised log bucket probabilities; the leading axes are the batch.
        info: what produced it (`fb.infer` says which path it took); an `Info` dict.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> bar = BarDistribution(jnp.array([-1.0, 0.0, 1.0, 2.0]), jnp.zeros((2, 3)))
        >>> bar.log_prob(jnp.array([0.5, 0.5])).shape
        (2,)
        >>> round(float(bar.cdf(jnp.array(1.0))[0]), 4)
        0.6667
        >>> bar.sample(jax.random.key(0), 5).shape
        (5, 2)
    """

    borders: Float[Array, " K1"]
    logits: Float[Array, "... K"]
    info: Info = eqx.field(static=True, default=None)

    def __init__(self, borders, logits, info: dict | None = None):
        self.borders = jnp.asarray(borders)
        self.logits = jnp.asarray(logits)
        self.info = Info(info or {})
        if self.borders.ndim != 1 or self.borders.shape[0] < 4:
            raise ValueError(f"borders: expected a 1-D array of at least 4 values; got shape "
                             f"{self.borders.shape}")
        if self.logits.shape[-1:] != (self.borders.shape[0] - 1,):
            raise ValueError(f"logits: expected last axis {self.borders.shape[0] - 1} (one per "
                             f"bucket); got shape {self.logits.shape}")

    @property
    def n_buckets(self) -> int:
        return self.borders.shape[0] - 1

    @property
    def widths(self) -> Array:
        return jnp.diff(self.borders)

    @property
    def log_probs(self) -> Array:
        """(..., K) normalised log bucket probabilities."""
        return jax.nn.log_softmax(self.logits, -1)

    @property
    def probs(self) -> Array:
        return jax.nn.softmax(self.logits, -1)

    def _broadcast(self, v):
        v = jnp.asarray(v, self.logits.dtype)
        shape = jnp.broadcast_shapes(v.shape, self.logits.shape[:-1])
        return (jnp.broadcast_to(v, shape),
                jnp.broadcast_to(self.logits, (*shape, self.logits.shape[-1])))

    def _bucket(self, y):
        return jnp.clip(jnp.searchsorted(self.borders[1:-1], y, side="right"), 0,
                        self.n_buckets - 1)

    def log_prob(self, y: Array) -> Array:
        """Log density at y; y and the batch shape broadcast against each other."""
        y, logits = self._broadcast(y)
        b, w, k = self.borders, self.widths, self.n_buckets
        idx = self._bucket(y)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), idx[..., None], -1)[..., 0]
        inner = lp - jnp.log(w[idx])
        left = (lp + _LOG_HALFNORMAL - jnp.log(w[0]) - 0.5 * ((b[1] - y) / w[0]) ** 2)
        right = (lp + _LOG_HALFNORMAL - jnp.log(w[-1])
                 - 0.5 * ((y - b[k - 1]) / w[-1]) ** 2)
        return jnp.where(idx == 0, left, jnp.where(idx == k - 1, right, inner))

    def expected_log_prob(self, mean: Array, var: Array) -> Array:
        """E[log p(Y)] for Y ~ N(mean, var), in closed form (the cross-entropy of this
        distribution against a Gaussian, negated): each bucket's Gaussian mass times its log
        density, and for the half-normal tails the Gaussian's truncated second moment.
        `mean` and `var` broadcast against the batch shape.

        Example:
            >>> import jax.numpy as jnp
            >>> bar = BarDistribution(jnp.linspace(-4.0, 4.0, 81), jnp.zeros(80))
            >>> round(float(bar.expected_log_prob(0.0, 1.0)), 2)  # a flat histogram on [-4, 4]
            -2.08
        """
        mean, logits = self._broadcast(mean)
        sd = jnp.sqrt(jnp.broadcast_to(jnp.asarray(var, logits.dtype), mean.shape))
        b, w, k = self.borders, self.widths, self.n_buckets
        z = (b[1:-1] - mean[..., None]) / sd[..., None]  # (..., K - 1) inner borders
        lo, up = ndtr(z), ndtr(-z)  # P(Y < b_k), P(Y > b_k), each accurate on its own side
        # inner bucket masses, from the tail on the side where the difference is accurate
        inner = jnp.where(z[..., :-1] > 0, up[..., :-1] - up[..., 1:], lo[..., 1:] - lo[..., :-1])
        mass = jnp.concatenate([lo[..., :1], jnp.maximum(inner, 0.0), up[..., -1:]], -1)
        lp = jax.nn.log_softmax(logits, -1)
        out = jnp.sum(mass[..., 1:-1] * (lp[..., 1:-1] - jnp.log(w[1:-1])), -1)
        # tails: E[(a - Z)^2; Z < a] = (a^2 + 1) Phi(a) + a phi(a) for Z ~ N(0, 1)
        a_left, a_right = z[..., 0], -z[..., -1]
        phi_l, phi_r = (jnp.exp(-0.5 * a**2) / math.sqrt(2 * math.pi) for a in (a_left, a_right))
        sq_left = sd**2 * ((a_left**2 + 1.0) * lo[..., 0] + a_left * phi_l)
        sq_right = sd**2 * ((a_right**2 + 1.0) * up[..., -1] + a_right * phi_r)
        out += mass[..., 0] * (lp[..., 0] + _LOG_HALFNORMAL - jnp.log(w[0])) \
            - 0.5 * sq_left / w[0] ** 2
        out += mass[..., -1] * (lp[..., k - 1] + _LOG_HALFNORMAL - jnp.log(w[-1])) \
            - 0.5 * sq_right / w[-1] ** 2
        return out

    def cdf(self, y: Array) -> Array:
        """P(Y <= y)."""
        y, logits = self._broadcast(y)
        b, w, k = self.borders, self.widths, self.n_buckets
        p = jax.nn.softmax(logits, -1)
        before = jnp.cumsum(p, -1) - p
        idx = self._bucket(y)
        pk = jnp.take_along_axis(p, idx[..., None], -1)[..., 0]
        ck = jnp.take_along_axis(before, idx[..., None], -1)[..., 0]
        inner = ck + pk * jnp.clip((y - b[idx]) / w[idx], 0.0, 1.0)
        left = pk * 2.0 * ndtr(-(b[1] - y) / w[0])
        right = ck + pk * (2.0 * ndtr((y - b[k - 1]) / w[-1]) - 1.0)
        return jnp.where(idx == 0, left, jnp.where(idx == k - 1, right, inner))

    def quantile(self, q: Array) -> Array:
        """The inverse of `cdf`: q (broadcastable to the batch shape, values in (0, 1))."""
        q, logits = self._broadcast(q)
        b, w, k = self.borders, self.widths, self.n_buckets
        p = jax.nn.softmax(logits, -1)
        cum = jnp.cumsum(p, -1)
        idx = jnp.clip(jnp.sum(cum <= q[..., None], -1), 0, k - 1)
        pk = jnp.take_along_axis(p, idx[..., None], -1)[..., 0]
        ck = jnp.take_along_axis(cum - p, idx[..., None], -1)[..., 0]
        r = jnp.clip((q - ck) / jnp.maximum(pk, 1e-30), 0.0, 1.0)
        tiny = jnp.finfo(q.dtype).tiny
        inner = b[idx] + r * w[idx]
        left = b[1] + w[0] * ndtri(jnp.clip(0.5 * r, tiny, 0.5))
        right = b[k - 1] + w[-1] * ndtri(jnp.clip(0.5 * (1.0 + r), 0.5, 1.0 - 1e-7))
        return jnp.where(idx == 0, left, jnp.where(idx == k - 1, right, inner))

    def mean(self) -> Array:
        """(...,) expected value."""
        b, w = self.borders, self.widths
        mid = 0.5 * (b[:-1] + b[1:])
        mid = mid.at[0].set(b[1] - w[0] * _HALFNORMAL_MEAN)
        mid = mid.at[-1].set(b[-2] + w[-1] * _HALFNORMAL_MEAN)
        return jnp.sum(self.probs * mid, -1)

    def variance(self) -> Array:
        """(...,) variance (law of total variance over the buckets)."""
        b, w = self.borders, self.widths
        mid = 0.5 * (b[:-1] + b[1:])
        second = mid**2 + w**2 / 12.0
        # half-normal tails: E[(b - scale |Z|)^2] = b^2 - 2 b scale sqrt(2/pi) + scale^2
        second = second.at[0].set(b[1] ** 2 - 2 * b[1] * w[0] * _HALFNORMAL_MEAN + w[0] ** 2)
        second = second.at[-1].set(b[-2] ** 2 + 2 * b[-2] * w[-1] * _HALFNORMAL_MEAN
                                   + w[-1] ** 2)
        m = self.mean()
        return jnp.maximum(jnp.sum(self.probs * second, -1) - m**2, 0.0)

    def sample(self, key: Array, n: int) -> Array:
        """(n, ...) draws, by inverting the CDF at uniform variates."""
        u = jax.random.uniform(key, (n, *self.logits.shape[:-1]), self.logits.dtype,
                               minval=1e-7, maxval=1.0 - 1e-7)
        return jax.vmap(self.quantile)(u)
