"""NUTS reference engine: BlackJAX window adaptation + NUTS, chains vmapped in one compiled call."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import blackjax
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

from flashbayes._padding import pad_prior, pad_rows, size_bucket


class ConvergenceWarning(UserWarning):
    """R-hat above 1.01, too few effective draws, or divergent transitions."""


@dataclasses.dataclass
class SampleSet:
    """Posterior given by draws; implements the posterior interface (no density).

    Attributes:
        draws: (chains, n, d) draws.
        rhat, ess: per-dimension split R-hat and effective sample size.
        divergences: number of divergent transitions after warm-up.
        seconds: wall time of the run that made the draws.
    """

    draws: np.ndarray
    rhat: np.ndarray | None = None
    ess: np.ndarray | None = None
    divergences: int = 0
    seconds: float = float("nan")

    @property
    def flat(self) -> np.ndarray:
        return self.draws.reshape(-1, self.draws.shape[-1])

    @property
    def dim(self) -> int:
        return self.draws.shape[-1]

    def sample(self, key: Array, n: int) -> Array:
        """n draws resampled uniformly (with replacement) from the chains."""
        idx = jax.random.randint(key, (int(n),), 0, self.flat.shape[0])
        return jnp.asarray(self.flat)[idx]

    def log_prob(self, theta: Any):
        raise NotImplementedError("a sample-based posterior has no density; use sample()")

    def mean(self) -> Array:
        return jnp.asarray(self.flat.mean(0))

    def cov(self) -> Array:
        return jnp.asarray(np.cov(self.flat, rowvar=False).reshape(self.dim, self.dim))

    def to_inference_data(self):
        import arviz as az

        return az.from_dict(posterior={"theta": self.draws})


class NUTS:
    """NUTS over a log density `log_density(theta, *args)`, compiled once per argument shape.

    Window adaptation (step size and a diagonal mass matrix) runs per chain; all chains run
    vmapped inside one jitted function, so new data of the same shape reuse the compiled code.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> nuts = NUTS(lambda th, mu: -0.5 * jnp.sum((th - mu) ** 2), num_warmup=200,
        ...             num_samples=200, num_chains=2)
        >>> res = nuts.run(jax.random.key(0), jnp.zeros((2, 2)), jnp.ones(2))
        >>> res.draws.shape
        (2, 200, 2)
    """

    def __init__(self, log_density: Callable[..., Array], *, num_warmup: int = 1000,
                 num_samples: int = 1000, num_chains: int = 4, target_accept: float = 0.8):
        self.log_density = log_density
        self.num_warmup, self.num_samples = int(num_warmup), int(num_samples)
        self.num_chains = int(num_chains)
        self.target_accept = float(target_accept)
        self._compiled = jax.jit(self._run)

    def _run(self, key, init, *args):
        def logdensity(theta):
            return self.log_density(theta, *args)

        def one_chain(key, x0):
            k_adapt, k_sample = jax.random.split(key)
            adapt = blackjax.window_adaptation(blackjax.nuts, logdensity,
                                               target_acceptance_rate=self.target_accept)
            (state, params), _ = adapt.run(k_adapt, x0, num_steps=self.num_warmup)
            kernel = blackjax.nuts(logdensity, **params).step

            def body(st, k):
                st, info = kernel(k, st)
                return st, (st.position, info.is_divergent)

            _, (pos, div) = jax.lax.scan(body, state, jax.random.split(k_sample,
                                                                        self.num_samples))
            return pos, jnp.sum(div)

        keys = jax.random.split(key, init.shape[0])
        return jax.vmap(one_chain)(keys, init)

    def cache_size(self) -> int:
        """Number of compiled variants (for tests that count compilations)."""
        return self._compiled._cache_size()

    def run(self, key: Array, init: Array, *args: Any, warn: bool = True) -> SampleSet:
        """Run all chains from `init` of shape (chains, d); returns the draws and diagnostics."""
        import time

        init = jnp.asarray(init, jnp.float32)
        if init.ndim != 2:
            raise ValueError(f"init: expected shape (chains, d); got {init.shape}")
        t0 = time.perf_counter()
        draws, div = self._compiled(key, init, *args)
        draws = np.asarray(jax.block_until_ready(draws))
        seconds = time.perf_counter() - t0
        rhat = np.asarray(split_gelman_rubin(draws)) if draws.shape[0] > 1 else None
        ess = np.asarray(effective_sample_size(draws)) if draws.shape[0] > 1 else None
        res = SampleSet(draws=draws, rhat=rhat, ess=ess, divergences=int(np.sum(div)),
                        seconds=seconds)
        if warn:
            problems = []
            if rhat is not None and np.any(rhat > 1.01):
                problems.append(f"R-hat up to {np.max(rhat):.3f} (> 1.01)")
            if ess is not None and np.any(ess < 100 * draws.shape[0]):
                problems.append(f"ESS as low as {np.min(ess):.0f}")
            if res.divergences:
                problems.append(f"{res.divergences} divergent transitions")
            if problems:
                warnings.warn("NUTS: " + "; ".join(problems), ConvergenceWarning, stacklevel=2)
        return res


def gmm_task_log_density(task) -> Callable[..., Array]:
    """log prior (GMM, padded with a component mask) + task log likelihood (padded rows)."""
    from flashbayes.distributions._gmm import _component_log_prob

    def fn(theta, weights, means, scale_tril, data, dmask):
        comp = _component_log_prob(means, scale_tril, theta)
        lp = jax.scipy.special.logsumexp(comp + jnp.log(weights))
        return lp + task.log_likelihood(theta, data, dmask)

    return fn


class TaskNUTS:
    """NUTS on the exact unnormalised posterior (GMM prior x task likelihood) of a task.

    Data sets are padded to size buckets and priors to the task's component count, so problems
    of one bucket share one compiled function.
    """

    def __init__(self, task, *, num_warmup: int = 1000, num_samples: int = 1000,
                 num_chains: int = 4):
        self.task = task
        self.sampler = NUTS(gmm_task_log_density(task), num_warmup=num_warmup,
                            num_samples=num_samples, num_chains=num_chains)

    def run(self, key: Array, prior, data, *, init: Array | None = None,
            warn: bool = True) -> SampleSet:
        x = self.task.validate_data(data)
        w, m, s, _ = pad_prior(prior, max(self.task.k_max, prior.n_components))
        xp, dmask = pad_rows(x, size_bucket(x.shape[0]))
        k_init, k_run = jax.random.split(key)
        if init is None:
            init = prior.sample(k_init, self.sampler.num_chains)
        return self.sampler.run(k_run, init, w, m, s, xp, dmask, warn=warn)
