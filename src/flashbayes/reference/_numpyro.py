"""The tasks as NumPyro models, and NumPyro's own NUTS called the way a user calls it."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC
from numpyro.infer import NUTS as NumPyroNUTS

from flashbayes.distributions import GMM
from flashbayes.reference._base import SampleSet


def numpyro_model(task, prior: GMM):
    """A NumPyro model of `task` with the given GMM prior, data passed as `data=`."""
    prior_dist = prior.to_numpyro()
    name = task.name

    def model(data):
        theta = numpyro.sample("theta", prior_dist)
        if name == "gmm_linear":
            loc = theta @ jnp.asarray(task.A, jnp.float32).T
            numpyro.sample("x", dist.Normal(loc, task.noise_sd).to_event(1), obs=data)
        elif name == "logistic_regression":
            logits = data[:, : task.p] @ theta[: task.p] + theta[task.p]
            numpyro.sample("y", dist.Bernoulli(logits=logits), obs=data[:, task.p])
        elif name == "gaussian_variance":
            numpyro.sample("x", dist.Normal(0.0, jnp.exp(0.5 * theta[0])), obs=data[:, 0])
        else:
            numpyro.factor("loglik", task.log_likelihood(theta, data))

    return model


def run_numpyro_nuts(key, task, prior: GMM, data, *, num_warmup: int = 1000,
                     num_samples: int = 1000, num_chains: int = 4) -> SampleSet:
    """NumPyro NUTS as a user first calls it: a fresh MCMC object, compilation included."""
    x = jnp.asarray(task.validate_data(data), jnp.float32)
    t0 = time.perf_counter()
    mcmc = MCMC(NumPyroNUTS(numpyro_model(task, prior)), num_warmup=num_warmup,
                num_samples=num_samples, num_chains=num_chains, chain_method="vectorized",
                progress_bar=False)
    mcmc.run(key, data=x)
    draws = np.asarray(jax.block_until_ready(mcmc.get_samples(group_by_chain=True)["theta"]))
    return SampleSet(draws=draws, info={"seconds": time.perf_counter() - t0})
