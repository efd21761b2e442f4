"""Reference posterior draws for any observation of an sbibm task, from its likelihood.

The shared data hold reference draws for observations 1-5 only. To check an estimator on
observations of our own, `reference_posterior` draws from p(theta | x) for any x:

- the closed form where the task has one (`task.exact_posterior`);
- a grid in two dimensions (sir): the unnormalised posterior on a 300 x 300 grid in the
  unconstrained parameters, the grid refined twice onto the region within 30 nats of the
  largest value, then cells drawn by their mass and a uniform point within each;
- otherwise NUTS (BlackJAX, `flashbayes.reference.nuts`) on the unconstrained parameters with
  16 chains started at prior draws, every second draw kept; a chain whose mean log density is
  more than 3 nats below the best chain's is stuck away from the mass and dropped (with 2,500
  draws the chains in the posterior agree to about 0.1 nat); n draws are then taken at random
  from the kept ones. For slcp each draw's signs of
  theta_3 and theta_4 are then flipped at random, because the likelihood depends on them only
  through their squares and the prior box is symmetric, so the posterior has four mirror-image
  modes that one chain does not cross.

Each route is checked against the shared reference draws (tests/test_sbi_tasks.py, slow tier).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

GRID = 300  # points per axis of the 2-D grid
GRID_WINDOW = 30.0  # nats below the largest grid value that a refined grid must cover
CHAIN_TOLERANCE = 3.0  # NUTS chains whose mean log density is further below the best are dropped


@functools.cache
def _unconstrained_log_density(name: str):
    """log p(T(z) | x) + log |T'(z)| up to a constant, T the bijection onto the prior's support.

    Cached per task so that every observation reuses one compiled NUTS program.
    """
    from numpyro.distributions.transforms import biject_to

    from flashbayes.sbi._tasks import get

    task = get(name)
    prior = task.prior()
    bij = biject_to(prior.support)

    def fn(z, x):
        theta = bij(z)
        lp = prior.log_prob(theta) + task.log_likelihood(theta, x)
        lp = lp + bij.log_abs_det_jacobian(z, theta)
        return jnp.where(jnp.isfinite(lp), lp, -jnp.inf)

    return fn, bij


def _grid_draws(task, key: jax.Array, x: jax.Array, n: int) -> np.ndarray:
    fn, bij = _unconstrained_log_density(task.name)
    batch = jax.jit(jax.vmap(fn, in_axes=(0, None)))
    k_prior, k_cell, k_jitter = jax.random.split(key, 3)
    z_prior = np.asarray(bij.inv(task.prior().sample(k_prior, (20_000,))), np.float64)
    lo, hi = np.quantile(z_prior, 0.0002, axis=0), np.quantile(z_prior, 0.9998, axis=0)
    refined = widened = 0
    while refined < 3:  # the prior's range, then twice onto where the posterior is
        axes = [np.linspace(lo[i], hi[i], GRID) for i in range(2)]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 2)
        lp = np.concatenate([np.asarray(batch(jnp.asarray(pts[i:i + 10_000], jnp.float32), x))
                             for i in range(0, len(pts), 10_000)]).astype(np.float64)
        if not np.isfinite(lp).any():
            raise ValueError("reference_posterior: the posterior is zero on the whole grid")
        keep = (lp > lp.max() - GRID_WINDOW).reshape(GRID, GRID)
        step = (hi - lo) / (GRID - 1)
        idx = [np.nonzero(keep.any(axis=1 - i))[0] for i in range(2)]
        at_edge = [(idx[i][0] == 0, idx[i][-1] == GRID - 1) for i in range(2)]
        if any(any(e) for e in at_edge):  # mass reaches the box's edge: widen that side
            widened += 1
            if widened > 10:
                raise RuntimeError("reference_posterior: the grid did not contain the "
                                   "posterior's mass after 10 widenings")
            for i in range(2):
                lo[i] -= (hi[i] - lo[i]) * at_edge[i][0]
                hi[i] += (hi[i] - lo[i]) * at_edge[i][1]
            continue
        refined += 1
        if refined < 3:
            lo = np.array([axes[i][max(idx[i][0] - 2, 0)] for i in range(2)])
            hi = np.array([axes[i][min(idx[i][-1] + 2, GRID - 1)] for i in range(2)])
    w = np.exp(lp - lp.max())
    cells = np.asarray(jax.random.choice(k_cell, len(pts), (n,), p=jnp.asarray(w / w.sum())))
    jitter = np.asarray(jax.random.uniform(k_jitter, (n, 2), minval=-0.5, maxval=0.5))
    z = pts[cells] + jitter * step
    return np.asarray(bij(jnp.asarray(z, jnp.float32)))


def _nuts_draws(task, key: jax.Array, x: jax.Array, n: int, *, num_chains: int = 16,
                num_warmup: int = 1000, chain_tolerance: float = CHAIN_TOLERANCE) -> np.ndarray:
    from flashbayes.reference import LogDensityTarget, nuts

    fn, bij = _unconstrained_log_density(task.name)
    k_init, k_run, k_perm, k_sym = jax.random.split(key, 4)
    init = bij.inv(task.prior().sample(k_init, (num_chains,)))
    # every second draw is kept, and up to three quarters of the chains may be dropped; at least
    # 250 kept per chain, so that a chain's mean log density is known to well within the tolerance
    per_chain = max(-(-4 * n // num_chains), 500)
    post = nuts(k_run, LogDensityTarget(fn, dim=task.dim_theta, args=(x,)),
                num_warmup=num_warmup, num_samples=per_chain, num_chains=num_chains,
                init=init, warn=False)
    z = np.asarray(post.draws["theta"])[:, ::2]
    # a chain caught on a ridge far from the posterior's mass is dropped: each chain's mean log
    # density must be within CHAIN_TOLERANCE nats of the best chain's
    lp = np.asarray(jax.vmap(jax.vmap(fn, in_axes=(0, None)), in_axes=(0, None))(
        jnp.asarray(z), x))
    mean_lp = np.where(np.isfinite(lp).all(1), lp.mean(1), -np.inf)
    if not np.isfinite(mean_lp.max()):
        raise RuntimeError("reference_posterior: no NUTS chain stayed where the posterior is "
                           "positive")
    kept = mean_lp >= mean_lp.max() - chain_tolerance
    z = z[kept].reshape(-1, task.dim_theta)
    if len(z) < n:
        raise RuntimeError(f"reference_posterior: only {int(kept.sum())} of {num_chains} NUTS "
                           f"chains reached the posterior's mass, {len(z)} draws for {n}")
    z = z[np.asarray(jax.random.permutation(k_perm, len(z)))[:n]]
    theta = np.asarray(bij(jnp.asarray(z)))
    if task.symmetry is not None:
        theta = np.asarray(task.symmetry(k_sym, jnp.asarray(theta)))
    return theta


def reference_method(task) -> str:
    """How `reference_posterior` draws for this task: "closed form", "grid" or "NUTS"."""
    if task.exact_posterior is not None:
        return "closed form"
    return "grid" if task.dim_theta == 2 else "NUTS"


def reference_posterior(task, key: jax.Array, x: Any, n: int) -> np.ndarray:
    """n draws (n, d) from the posterior of `task` given one observation x (see module doc)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer; got {n!r}")
    x = jnp.asarray(x, jnp.float32)
    if x.shape != (task.dim_x,):
        raise ValueError(f"x: expected shape ({task.dim_x},) for {task.name}; got {x.shape}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError(f"x: expected {task.dim_x} finite values; got "
                         f"{int((~jnp.isfinite(x)).sum())} NaN or infinite")
    method = reference_method(task)
    if method == "closed form":
        draws = task.exact_posterior(key, x, int(n))
    elif method == "grid":
        draws = _grid_draws(task, key, x, int(n))
    else:
        draws = _nuts_draws(task, key, x, int(n))
    return np.array(draws, np.float32)  # a writable copy
