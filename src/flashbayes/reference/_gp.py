"""Reference posterior predictives for `gp_hyperprior`: the exact GP with the true
hyperparameters (oracle), type-II maximum likelihood, and NUTS over the hyperparameters.

Each returns a `GaussianMixturePredictive`: per query point, an equally weighted mixture of the
Gaussian GP predictives of S hyperparameter settings (S = 1 for the oracle and type-II ML). The
context is padded to the task's `n_max`, so each engine compiles one program per task and number
of query points. Computations run in float32 with the task's diagonal jitter (1e-6 s^2).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array

from flashbayes.distributions._mixture import GaussianMixturePredictive

_CACHE: dict[Any, Any] = {}


def _padded(task, context_x, context_y, query_x):
    cx, cy, qx = task.validate(context_x, context_y, query_x)
    n = cx.shape[0]
    if n > task.n_max:
        raise ValueError(f"context: expected at most n_max = {task.n_max} points for this task; "
                         f"got {n}")
    xp = np.zeros((task.n_max, task.x_dim))
    yp = np.zeros(task.n_max)
    xp[:n], yp[:n] = cx, cy
    return (jnp.asarray(xp, jnp.float32), jnp.asarray(yp, jnp.float32),
            jnp.asarray(np.arange(task.n_max) < n), jnp.asarray(qx, jnp.float32))


def _task_key(task):
    from flashbayes.tasks import task_params

    return (task.name, repr(sorted(task_params(task).items())))


def gp_oracle(task, hyper, context_x, context_y, query_x) -> GaussianMixturePredictive:
    """The exact GP predictive of y* with known hyperparameters (l, s, sigma, m): the lower
    bound on the expected NLPD of any method.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> from flashbayes.reference import gp_oracle
        >>> task = fb.tasks.get_predictive("gp_hyperprior")
        >>> p = task.sample_problem(jax.random.key(0), n=10, n_query=4)
        >>> gp_oracle(task, p.hyper, p.context_x, p.context_y, p.query_x).log_prob(
        ...     p.query_y).shape
        (4,)
    """
    h = np.asarray(hyper, np.float64)
    if h.shape != (4,) or not np.all(np.isfinite(h)) or not np.all(h[:3] > 0):
        raise ValueError(f"hyper: expected (lengthscale, outputscale, noise, mean) with positive "
                         f"scales; got {h.tolist() if h.size < 10 else h.shape}")
    x, y, mask, qx = _padded(task, context_x, context_y, query_x)
    key = ("oracle", _task_key(task))
    if key not in _CACHE:
        _CACHE[key] = jax.jit(task.predict)
    mu, var = _CACHE[key](jnp.asarray(h), x, y, qx, mask)
    return GaussianMixturePredictive(jnp.ones(1), mu[None], var[None],
                                     {"engine": "oracle", "hyper": h.tolist()})


def _type2_program(task, n_starts, steps, width, learning_rate):
    loc = jnp.asarray(task.prior_loc, jnp.float32)
    scale = jnp.asarray(task.prior_scale, jnp.float32)

    def to_z(u):  # a box of +-width prior standard deviations (tanh), as GP libraries bound
        return loc + width * scale * jnp.tanh(u)

    def run(key, x, y, mask, qx):
        def neg(u):
            return -task.log_marginal(task.constrain(to_z(u)), x, y, mask)

        opt = optax.adam(learning_rate)

        def fit(u0):
            def body(carry, _):
                u, state = carry
                grad = jax.grad(neg)(u)
                grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
                updates, state = opt.update(grad, state, u)
                return (optax.apply_updates(u, updates), state), None

            (u, _), _ = jax.lax.scan(body, (u0, opt.init(u0)), None, length=steps)
            return u, neg(u)

        # starts: hyperprior draws mapped into the box
        z0 = loc + scale * jax.random.normal(key, (n_starts, 4))
        u0 = jnp.arctanh(jnp.clip((z0 - loc) / (width * scale), -0.99, 0.99))
        us, values = jax.vmap(fit)(u0)
        values = jnp.where(jnp.isfinite(values), values, jnp.inf)
        best = jnp.argmin(values)
        hyper = task.constrain(to_z(us[best]))
        mu, var = task.predict(hyper, x, y, qx, mask)
        return hyper, -values[best], mu, var

    return jax.jit(run)


def gp_type2_ml(key: Array, task, context_x, context_y, query_x, *, n_starts: int = 8,
                steps: int = 300, width: float = 4.0, learning_rate: float = 0.05
                ) -> GaussianMixturePredictive:
    """Type-II maximum likelihood: the GP predictive at the hyperparameters that maximise the
    marginal likelihood, found by Adam (`steps` fixed steps, one compiled scan) from `n_starts`
    hyperprior draws, vmapped; the start with the highest marginal likelihood wins.

    The unconstrained hyperparameters (log l, log s, log sigma, m) are kept inside the box of
    +-`width` hyperprior standard deviations around the hyperprior's centre (as GP libraries
    bound their hyperparameters); the hyperprior itself does not enter the objective.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> from flashbayes.reference import gp_type2_ml
        >>> task = fb.tasks.get_predictive("gp_hyperprior")
        >>> p = task.sample_problem(jax.random.key(0), n=10, n_query=4)
        >>> pred = gp_type2_ml(jax.random.key(1), task, p.context_x, p.context_y, p.query_x)
        >>> pred.mean().shape, len(pred.info["hyper"])
        ((4,), 4)
    """
    for name, v in (("n_starts", n_starts), ("steps", steps)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name}: expected a positive integer; got {v!r}")
    x, y, mask, qx = _padded(task, context_x, context_y, query_x)
    ck = ("type2", _task_key(task), int(n_starts), int(steps), float(width), float(learning_rate))
    if ck not in _CACHE:
        _CACHE[ck] = _type2_program(task, int(n_starts), int(steps), float(width),
                                    float(learning_rate))
    hyper, lml, mu, var = _CACHE[ck](key, x, y, mask, qx)
    return GaussianMixturePredictive(
        jnp.ones(1), mu[None], var[None],
        {"engine": "type2_ml", "hyper": np.asarray(hyper).tolist(),
         "log_marginal": float(lml)})


def _nuts_logdensity(task):
    """One log-density function per task (the NUTS engine caches its program by function)."""
    key = ("nuts_fn", _task_key(task))
    if key not in _CACHE:
        def log_density(z, x, y, mask):
            return task.log_hyperprior_unconstrained(z) + task.log_marginal(
                task.constrain(z), x, y, mask)

        _CACHE[key] = log_density
    return _CACHE[key]


def gp_nuts(key: Array, task, context_x, context_y, query_x, *, num_warmup: int = 500,
            num_samples: int = 500, num_chains: int = 4, num_mix: int = 400,
            warn: bool = True) -> GaussianMixturePredictive:
    """The Bayes-optimal predictive: NUTS (BlackJAX, through `flashbayes.reference.nuts`) over
    the unconstrained hyperparameters with the analytic GP marginal likelihood, then the mixture
    of the GP predictives of `num_mix` draws spread evenly over all chains.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> from flashbayes.reference import gp_nuts
        >>> task = fb.tasks.get_predictive("gp_hyperprior")
        >>> p = task.sample_problem(jax.random.key(0), n=10, n_query=4)
        >>> pred = gp_nuts(jax.random.key(1), task, p.context_x, p.context_y, p.query_x,
        ...                num_warmup=200, num_samples=100, num_chains=2, num_mix=50,
        ...                warn=False)
        >>> pred.means.shape
        (50, 4)
    """
    from flashbayes.reference._nuts import diagnose, nuts
    from flashbayes.reference._target import LogDensityTarget

    if int(num_mix) != num_mix or not 1 <= num_mix <= num_samples * num_chains:
        raise ValueError(f"num_mix: expected an integer in 1..num_samples * num_chains = "
                         f"{num_samples * num_chains}; got {num_mix!r}")
    x, y, mask, qx = _padded(task, context_x, context_y, query_x)
    target = LogDensityTarget(_nuts_logdensity(task), dim=4, args=(x, y, mask))
    k_init, k_run = jax.random.split(key)
    # chains start at hyperprior draws
    z0 = (jnp.asarray(task.prior_loc) + jnp.asarray(task.prior_scale)
          * jax.random.normal(k_init, (num_chains, 4), jnp.float32))
    post = nuts(k_run, target, num_warmup=num_warmup, num_samples=num_samples,
                num_chains=num_chains, init=z0, warn=warn)
    z = np.asarray(post.draws["theta"], np.float64).reshape(-1, 4)
    idx = np.linspace(0, z.shape[0] - 1, int(num_mix)).round().astype(int)
    hyper = task.constrain(jnp.asarray(z[idx]))
    ck = ("nuts_mix", _task_key(task))
    if ck not in _CACHE:
        _CACHE[ck] = jax.jit(jax.vmap(task.predict, in_axes=(0, None, None, None, None)))
    mu, var = _CACHE[ck](hyper, x, y, qx, mask)
    info = {"engine": "nuts", "seconds": post.info["seconds"],
            "divergences": post.info["divergences"], "problems": diagnose(post),
            "hyper_mean": np.asarray(hyper).mean(0).tolist()}
    return GaussianMixturePredictive(jnp.ones(int(num_mix)), mu, var, info)
