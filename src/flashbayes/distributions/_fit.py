"""EM fit of a Gaussian mixture to samples."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from flashbayes.distributions._gmm import GMM


def fit_gmm(key: Array, samples: ArrayLike, n_components: int, *, n_iter: int = 200,
            cov_floor: float = 1e-6) -> GMM:
    """Fit a GMM to samples by expectation-maximisation.

    Initialisation is k-means++ seeding from `key`. A ridge of `cov_floor` times the overall
    sample variance (per dimension) is added to every component covariance at each M-step, so
    that no component collapses onto a single draw.

    Args:
        key: PRNG key for the initialisation.
        samples: (n, d) draws (a (n,) array is taken as d = 1).
        n_components: K, number of mixture components.
        n_iter: EM iterations.
        cov_floor: relative covariance floor.

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> x = np.concatenate([np.random.default_rng(0).normal(-2, 0.5, 500),
        ...                     np.random.default_rng(1).normal(2, 0.5, 500)])
        >>> g = fb.fit_gmm(jax.random.key(0), x, 2)
        >>> sorted(np.round(np.asarray(g.means[:, 0])).tolist())
        [-2.0, 2.0]
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"samples: expected shape (n, d) or (n,); got {x.shape}")
    if not isinstance(n_components, int | np.integer) or n_components < 1:
        raise ValueError(f"n_components: expected a positive integer; got {n_components!r}")
    if x.shape[0] < n_components:
        raise ValueError(f"samples: expected at least n_components={n_components} draws; got "
                         f"{x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples: expected finite values; got NaN or inf")
    spread = x.std(0)
    if np.any(spread <= 1e-12 * (1.0 + np.abs(x).max(0))):
        raise ValueError("samples: expected every dimension to vary; got a constant dimension "
                         f"(index {int(np.argmin(spread))})")
    w, m, s = fit_gmm_arrays(key, jnp.asarray(x, jnp.float32), int(n_components),
                             n_iter=int(n_iter), cov_floor=float(cov_floor))
    return GMM.unchecked(w, m, s)


@functools.partial(jax.jit, static_argnames=("n_components", "n_iter"))
def fit_gmm_arrays(key: Array, x: Float[Array, "n d"], n_components: int, *, n_iter: int = 200,
                   cov_floor: float = 1e-6):
    """Jit-able, vmappable core of `fit_gmm`: returns (weights, means, scale_tril)."""
    n, d = x.shape
    k = n_components
    mu = x.mean(0)
    xc = x - mu
    scale = jnp.sqrt(jnp.mean(xc**2, axis=0)) + 1e-12
    z = xc / scale  # EM runs on standardised draws
    floor = jnp.maximum(cov_floor, 1e-6) * jnp.eye(d)

    # k-means++ seeding
    def seed(carry, key_i):
        centers, count = carry
        dist2 = jnp.min(jnp.sum((z[:, None, :] - centers[None]) ** 2, -1)
                        + jnp.where(jnp.arange(k) < count, 0.0, jnp.inf)[None], axis=1)
        p = dist2 / jnp.sum(dist2)
        idx = jax.random.choice(key_i, n, p=p)
        centers = centers.at[count].set(z[idx])
        return (centers, count + 1), None

    k0, key = jax.random.split(key)
    first = z[jax.random.randint(k0, (), 0, n)]
    centers = jnp.zeros((k, d)).at[0].set(first)
    (centers, _), _ = jax.lax.scan(seed, (centers, 1), jax.random.split(key, k - 1))

    init_cov = jnp.broadcast_to(jnp.eye(d) * (1.0 / k), (k, d, d))
    init = (jnp.full((k,), 1.0 / k), centers, init_cov)

    def step(params, _):
        w, m, cov = params
        L = jnp.linalg.cholesky(cov)
        diff = z[:, None, :] - m[None]  # (n, k, d)
        sol = jax.vmap(lambda Lk, dk: jax.scipy.linalg.solve_triangular(Lk, dk.T, lower=True).T,
                       in_axes=(0, 1), out_axes=1)(L, diff)
        logdet = jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)
        logp = -0.5 * jnp.sum(sol**2, -1) - logdet + jnp.log(w)
        r = jax.nn.softmax(logp, axis=1)  # (n, k)
        nk = r.sum(0) + 1e-10
        w_new = nk / n
        m_new = (r.T @ z) / nk[:, None]
        dm = z[:, None, :] - m_new[None]
        cov_new = jnp.einsum("nk,nki,nkj->kij", r, dm, dm) / nk[:, None, None] + floor
        return (w_new, m_new, cov_new), None

    (w, m, cov), _ = jax.lax.scan(step, init, None, length=n_iter)
    means = m * scale + mu
    cov = cov * scale[:, None] * scale[None, :]
    w = w / w.sum()
    return w, means, jnp.linalg.cholesky(cov)
