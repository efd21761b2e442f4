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


def _quadrature_box(logp, axes, eps):
    """Per axis, the span of grid values where the log density comes within log(eps) of its
    maximum (anywhere on the other axes), widened by one grid step on each side; where that
    span reaches the grid's end, the side is pushed out by half the grid's width instead. Also
    says whether any side was pushed out (the mass may lie further)."""
    keep = logp >= logp.max() + np.log(eps)
    box, open_side = [], False
    for j, axis in enumerate(axes):
        other = tuple(k for k in range(len(axes)) if k != j)
        idx = np.flatnonzero(keep.any(axis=other))
        step, half = axis[1] - axis[0], 0.5 * (axis[-1] - axis[0])
        lo = axis[0] - half if idx[0] == 0 else axis[idx[0]] - step
        hi = axis[-1] + half if idx[-1] == len(axis) - 1 else axis[idx[-1]] + step
        open_side |= bool(idx[0] == 0 or idx[-1] == len(axis) - 1)
        box.append((lo, hi))
    return box, open_side


def gp_quadrature(task, context_x, context_y, query_x, *, grid: int = 24, coarse: int = 16,
                  width: float = 5.0, rounds: int = 3, eps: float = 1e-10
                  ) -> GaussianMixturePredictive:
    """The Bayes-optimal predictive by deterministic quadrature over the hyperparameters.

    The constant mean is integrated out exactly (its Normal hyperprior N(mu, tau^2) adds tau^2
    to every covariance entry, context and query alike); (log l, log s, log sigma) are summed
    on a product grid. The first grid spans +-`width` hyperprior standard deviations with
    `coarse` points per axis; each of `rounds` further grids of `grid` points per axis spans
    the box where the posterior comes within a factor `eps` of its largest grid value, one
    step wider on each side (where the posterior reaches a grid's end, that side moves out by
    half the grid's width and the refinement goes on, up to 20 grids). On each lengthscale the
    kernel matrix is diagonalised once (float64), so every (s, sigma) pair costs O(n) for the
    marginal likelihood and O(n m) for the predictive. The predictive mixes the GP
    predictives of the grid points carrying all but `eps` of the posterior mass, weighted by
    it. No Monte Carlo error: it agrees with `gp_nuts` up to NUTS' own noise and takes
    0.1-0.4 s for up to 100 context points.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> from flashbayes.reference import gp_quadrature
        >>> task = fb.tasks.get_predictive("gp_hyperprior")
        >>> p = task.sample_problem(jax.random.key(0), n=10, n_query=4)
        >>> pred = gp_quadrature(task, p.context_x, p.context_y, p.query_x)
        >>> pred.log_prob(p.query_y).shape, pred.info["engine"]
        ((4,), 'quadrature')
    """
    from flashbayes.tasks._gp import kernel_matrix

    for name, v, least in (("grid", grid, 2), ("coarse", coarse, 2), ("rounds", rounds, 0)):
        if int(v) != v or v < least:
            raise ValueError(f"{name}: expected an integer >= {least}; got {v!r}")
    if not (np.isfinite(width) and width > 0 and 0 < eps < 1):
        raise ValueError(f"width, eps: expected width > 0 and 0 < eps < 1; got {width!r}, "
                         f"{eps!r}")
    cx, cy, qx = task.validate(context_x, context_y, query_x)
    n = cx.shape[0]
    loc = np.asarray(task.prior_loc, np.float64)
    scale = np.asarray(task.prior_scale, np.float64)
    tau2 = scale[3] ** 2
    r = cy - loc[3]
    jitter = task.jitter

    def kern(a, b, lengthscale):
        return kernel_matrix(task.kernel, a, b, lengthscale, 1.0, xp=np)

    eigs = {}  # lengthscale -> eigendecomposition, for the latest grid (its predictive too)

    def eig(lengthscale):
        if lengthscale not in eigs:
            lam, u = np.linalg.eigh(kern(cx, cx, lengthscale))
            eigs[lengthscale] = np.maximum(lam, 0.0), u
        return eigs[lengthscale]

    def parts(lam, u, s, sigma):
        """With C0 = U diag(d) U^T the covariance of the centred context without the mean's
        share (d: (..., n)), 1~ = U^T 1 and r~ = U^T r: a = 1^T C0^-1 1, b = 1^T C0^-1 r and
        c = r^T C0^-1 r; the mean's tau^2 1 1^T enters by Sherman-Morrison."""
        d = s[..., None] ** 2 * (lam + jitter) + sigma[..., None] ** 2
        ut, rt = u.sum(0), u.T @ r
        return d, ut, rt, (ut**2 / d).sum(-1), (ut * rt / d).sum(-1), (rt**2 / d).sum(-1)

    def log_post(axes):
        ls, ss, gs = axes
        eigs.clear()
        s, g = np.meshgrid(np.exp(ss), np.exp(gs), indexing="ij")
        out = np.empty((len(ls), len(ss), len(gs)))
        for i, zl in enumerate(ls):
            d, _, _, a, b, c = parts(*eig(np.exp(zl)), s, g)
            one = 1.0 + tau2 * a
            quad = c - tau2 * b**2 / one
            out[i] = -0.5 * (quad + np.log(d).sum(-1) + np.log(one) + n * np.log(2 * np.pi))
        for j, axis in enumerate(axes):
            shape = [1, 1, 1]
            shape[j] = -1
            out += (-0.5 * ((axis - loc[j]) / scale[j]) ** 2).reshape(shape)
        return out

    axes = [np.linspace(loc[j] - width * scale[j], loc[j] + width * scale[j], int(coarse))
            for j in range(3)]
    logp = log_post(axes)
    done = 0
    while True:
        box, open_side = _quadrature_box(logp, axes, eps)
        # refine `rounds` times, and (up to 20 grids in all) while mass reaches the grid's end
        if done >= int(rounds) and (not open_side or done >= max(int(rounds), 20)):
            break
        axes = [np.linspace(lo, hi, int(grid)) for lo, hi in box]
        logp = log_post(axes)
        done += 1
    w = np.exp(logp - logp.max())
    w /= w.sum()
    # the grid points carrying all but eps of the mass, by lengthscale
    order = np.argsort(w, axis=None)[::-1]
    count = int(np.searchsorted(np.cumsum(w.ravel()[order]), 1.0 - eps)) + 1
    picked = np.unravel_index(order[:count], w.shape)
    means, variances, weights = [], [], []
    for i in np.unique(picked[0]):
        sel = picked[0] == i
        s = np.exp(axes[1][picked[1][sel]])
        g = np.exp(axes[2][picked[2][sel]])
        lam, u = eig(np.exp(axes[0][i]))
        d, ut, rt, a, b, _ = parts(lam, u, s, g)
        kt = s[:, None, None] ** 2 * (kern(qx, cx, np.exp(axes[0][i])) @ u) + tau2 * ut  # (P,m,n)
        one = (1.0 + tau2 * a)[:, None]
        ku = (kt * ut / d[:, None, :]).sum(-1)
        means.append(loc[3] + (kt * rt / d[:, None, :]).sum(-1) - tau2 * ku * b[:, None] / one)
        explained = (kt**2 / d[:, None, :]).sum(-1) - tau2 * ku**2 / one
        prior_var = (s**2 * (1.0 + jitter) + g**2)[:, None] + tau2
        variances.append(np.maximum(prior_var - explained, (g**2)[:, None]))
        weights.append(w[i][picked[1][sel], picked[2][sel]])
    hyper_mean = np.array([np.sum(w * np.exp(axes[0])[:, None, None]),
                           np.sum(w * np.exp(axes[1])[None, :, None]),
                           np.sum(w * np.exp(axes[2])[None, None, :])])
    info = {"engine": "quadrature", "points": count, "grids": done + 1,
            "open_edge": open_side,
            "effective_points": float(1.0 / np.sum(w**2)),
            "box": [[float(a[0]), float(a[-1])] for a in axes],
            "hyper_mean": hyper_mean.tolist()}
    return GaussianMixturePredictive(np.concatenate(weights), np.concatenate(means),
                                     np.concatenate(variances), info)
