"""Simulation-based inference: simulation budgets kept on disk, run in parallel or on a cluster.

`simulate` draws theta from a prior and runs a simulator on each draw, in chunks, on the
backend asked for (vmapped JAX, worker processes, or Dask distributed), streaming every finished
chunk to disk so that an interrupted run continues where it stopped. `load_simulations` reads
the file back.

Example:
    >>> import numpy as np, numpyro.distributions as dist
    >>> from flashbayes import sbi
    >>> sims = sbi.simulate(dist.Uniform(0.0, 1.0), lambda th, rng: th + rng.normal(), 20,
    ...                     seed=0, workers=1)
    >>> sims.theta.shape, sims.x.shape, sims.failures["exception"]
    ((20, 1), (20, 1), 0)
"""

from flashbayes.sbi import tasks
from flashbayes.sbi._backends import ChunkFailed
from flashbayes.sbi._npe import NPEEstimator, NPEEvent, NPEPosterior, load_npe, train_npe
from flashbayes.sbi._simulate import SimulationEvent, Simulations, load_simulations, simulate
from flashbayes.sbi._swap import PriorSwapError, SwappedPosterior, prior_swap

__all__ = ["ChunkFailed", "NPEEstimator", "NPEEvent", "NPEPosterior", "PriorSwapError",
           "SimulationEvent", "Simulations", "SwappedPosterior", "load_npe", "load_simulations",
           "prior_swap", "simulate", "tasks", "train_npe"]
