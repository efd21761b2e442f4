"""NUTS reference engine: BlackJAX window adaptation + NUTS, all chains in one compiled call.

Chains run vmapped (the default) or one after another with `jax.lax.map`; either way the whole
run is one compiled program.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from flashbayes.reference._base import (
    ConvergenceWarning,
    SampleSet,
    convergence_summary,
    register_engine,
)
from flashbayes.reference._cache import ensure_compilation_cache
from flashbayes.reference._target import Target, TaskTarget

# compiled programs, one per (target structure, settings); jax.jit adds one entry per shape
_PROGRAMS: dict[Any, Any] = {}
CHAIN_METHODS = ("vectorized", "sequential")


def _check_chain_method(chain_method: Any) -> str:
    if chain_method not in CHAIN_METHODS:
        raise ValueError(f"chain_method: expected one of {CHAIN_METHODS}; got {chain_method!r}")
    return chain_method


def _build(target: Target, num_warmup: int, num_samples: int, target_accept: float,
           dense_mass: bool, max_treedepth: int, chain_method: str):
    def run(key, init, data):
        def logdensity(z):
            return target.log_density(z, data)

        def one_chain(key, z0):
            k_adapt, k_sample = jax.random.split(key)
            adapt = blackjax.window_adaptation(
                blackjax.nuts, logdensity, is_mass_matrix_diagonal=not dense_mass,
                target_acceptance_rate=target_accept, max_num_doublings=max_treedepth)
            (state, params), ainfo = adapt.run(k_adapt, z0, num_steps=num_warmup)
            kernel = blackjax.nuts(logdensity, **params).step

            def body(st, k):
                st, info = kernel(k, st)
                return st, (st.position, info.is_divergent, info.num_integration_steps,
                            info.acceptance_rate)

            _, (pos, div, steps, acc) = jax.lax.scan(body, state,
                                                     jax.random.split(k_sample, num_samples))
            warm_steps = jnp.sum(ainfo.info.num_integration_steps)
            return pos, div, steps, acc, warm_steps, params["step_size"]

        keys = jax.random.split(key, init.shape[0])  # the same per-chain keys for both methods
        if chain_method == "vectorized":
            pos, div, steps, acc, warm, eps = jax.vmap(one_chain)(keys, init)
        else:  # one chain after another: each while-loop stops at its own chain's count
            pos, div, steps, acc, warm, eps = jax.lax.map(lambda a: one_chain(*a), (keys, init))
        sites = jax.vmap(jax.vmap(lambda z: target.constrain(z, data)))(pos)
        return sites, div, steps, acc, warm, eps

    return jax.jit(run)


def nuts_program(target: Target, *, num_warmup: int = 1000, num_samples: int = 1000,
                 target_accept: float = 0.8, dense_mass: bool = False, max_treedepth: int = 10,
                 chain_method: str = "vectorized"):
    """The compiled NUTS program for this target's structure (shared by same-shaped data)."""
    chain_method = _check_chain_method(chain_method)
    key = (target.cache_key, int(num_warmup), int(num_samples), float(target_accept),
           bool(dense_mass), int(max_treedepth), chain_method)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = _build(target, int(num_warmup), int(num_samples), float(target_accept),
                                bool(dense_mass), int(max_treedepth), chain_method)
    return _PROGRAMS[key]


def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if int(value) != value or int(value) < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}; got {value!r}")
    return int(value)


@register_engine("nuts")
def nuts(key: Array, target: Target, *, num_warmup: int = 1000, num_samples: int = 1000,
         num_chains: int = 4, target_accept: float = 0.8, dense_mass: bool = False,
         max_treedepth: int = 10, init: Array | None = None, warn: bool = True,
         chain_method: str = "vectorized") -> SampleSet:
    """NUTS with window adaptation (BlackJAX), `num_chains` chains in one compiled program.

    The program is compiled once per target structure and data shape: new data of the same
    shape reuse it. Reports split R-hat, bulk and tail ESS (ArviZ), divergences, gradient
    evaluations and wall time in `info`, and warns (ConvergenceWarning) when R-hat > 1.01,
    bulk ESS < 100 per chain, or any transition diverged.

    Args:
        key: PRNG key.
        target: what to sample (`NumPyroTarget`, `TaskTarget`, `LogDensityTarget`).
        num_warmup, num_samples, num_chains: per chain.
        target_accept: dual-averaging target acceptance rate.
        dense_mass: adapt a dense mass matrix (for strongly correlated posteriors).
        max_treedepth: maximum number of trajectory doublings.
        init: (num_chains, d) unconstrained starting points; default: uniform in [-2, 2]
            (the prior for task targets).
        warn: issue ConvergenceWarning when a diagnostic fails.
        chain_method: "vectorized" (default) runs the chains side by side with `jax.vmap`;
            "sequential" runs them one after another with `jax.lax.map`, in the same single
            compiled program. Under vmap every while-loop (NUTS tree building, and any loop
            inside the log density) runs all chains until the slowest one stops, so use
            "sequential" for models with inner adaptive loops such as adaptive-step ODE solves,
            where the per-chain step counts differ widely. The same key gives the same draws
            with either method up to float round-off (which NUTS amplifies over long runs: the
            chains then differ in detail, not in distribution).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flashbayes.reference import LogDensityTarget, nuts
        >>> t = LogDensityTarget(lambda th: -0.5 * jnp.sum(th ** 2), dim=2)
        >>> post = nuts(jax.random.key(0), t, num_warmup=200, num_samples=200, num_chains=2,
        ...             warn=False)
        >>> post.draws["theta"].shape
        (2, 200, 2)
    """
    ensure_compilation_cache()
    num_warmup = _check_positive("num_warmup", num_warmup)  # window adaptation needs >= 1 step
    num_samples = _check_positive("num_samples", num_samples)
    num_chains = _check_positive("num_chains", num_chains)
    chain_method = _check_chain_method(chain_method)
    if not 0.0 < float(target_accept) < 1.0:
        raise ValueError(f"target_accept: expected a value in (0, 1); got {target_accept}")
    program = nuts_program(target, num_warmup=num_warmup, num_samples=num_samples,
                           target_accept=target_accept, dense_mass=dense_mass,
                           max_treedepth=max_treedepth, chain_method=chain_method)
    k_init, k_run = jax.random.split(key)
    if init is None:
        init = target.initial_positions(k_init, num_chains, target.data)
    init = jnp.asarray(init, float)  # float32, or float64 with jax_enable_x64
    if init.shape != (num_chains, target.dim):
        raise ValueError(f"init: expected shape ({num_chains}, {target.dim}); got {init.shape}")
    t0 = time.perf_counter()
    sites, div, steps, acc, warm, eps = jax.block_until_ready(program(k_run, init, target.data))
    seconds = time.perf_counter() - t0
    sites = {k: np.asarray(v) for k, v in sites.items()}
    info: dict[str, Any] = {
        "engine": "nuts", "seconds": seconds, "num_chains": num_chains,
        "chain_method": chain_method,
        "divergences": int(np.sum(div)),
        "gradient_evaluations": int(np.sum(steps) + np.sum(warm)),
        "step_size": np.asarray(eps).tolist(),
        "mean_accept": float(np.mean(acc)),
        "sample_stats": {"diverging": np.asarray(div),
                         "n_steps": np.asarray(steps)},
    }
    if num_chains > 1 or num_samples >= 4:
        info["summary"] = convergence_summary(sites)
    post = SampleSet(sites, latent=tuple(getattr(target, "latent", ("theta",))), info=info)
    if warn:
        problems = diagnose(post)
        if problems:
            warnings.warn("NUTS: " + "; ".join(problems), ConvergenceWarning, stacklevel=2)
    return post


def diagnose(post: SampleSet) -> list[str]:
    """The failed convergence checks of an MCMC result, in words (empty when all pass)."""
    problems = []
    summary = post.info.get("summary") or {}
    if summary:
        rhat = max(s["rhat"] for s in summary.values())
        ess = min(min(s["ess_bulk"], s["ess_tail"]) for s in summary.values())
        if post.n_chains > 1 and not rhat <= 1.01:
            problems.append(f"R-hat up to {rhat:.3f} (> 1.01)")
        if not ess >= 100 * post.n_chains:
            problems.append(f"ESS as low as {ess:.0f} (< 100 per chain)")
    if post.divergences:
        problems.append(f"{post.divergences} divergent transitions")
    return problems


class TaskNUTS:
    """NUTS on the exact unnormalised posterior (GMM prior x task likelihood) of a task.

    Data sets are padded to size buckets and priors to the task's component count, so problems
    of one bucket share one compiled program.
    """

    def __init__(self, task, *, num_warmup: int = 1000, num_samples: int = 1000,
                 num_chains: int = 4):
        self.task = task
        self.options = {"num_warmup": num_warmup, "num_samples": num_samples,
                        "num_chains": num_chains}

    def run(self, key: Array, prior, data, *, init: Array | None = None,
            warn: bool = True) -> SampleSet:
        return nuts(key, TaskTarget(self.task, prior, data), init=init, warn=warn,
                    **self.options)
