"""Predictive tasks: a prior over functions, from which data sets of (x, y) context points and
query points are drawn. A network trained on them answers p(y* | x*, context) directly.

These tasks have no parameter vector with a GMM prior, so they sit in their own registry
(`predictive_names`, `get_predictive`) beside the posterior tasks of `names` / `get`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jaxtyping import Array, Bool, Float

from flashbayes.tasks._base import recording_registry

_PREDICTIVE: dict[str, Callable[..., PredictiveTask]] = {}


register_predictive = recording_registry(_PREDICTIVE, "predictive task")
register_predictive.__doc__ = "Class decorator adding a predictive task to its registry."


def get_predictive(name: str, **params: Any) -> PredictiveTask:
    """The predictive task registered as `name`, built with optional parameters.

    Example:
        >>> import flashbayes as fb
        >>> fb.tasks.get_predictive("gp_hyperprior").x_dim
        1
    """
    if not isinstance(name, str) or name not in _PREDICTIVE:
        raise ValueError(f"predictive task: expected one of {', '.join(sorted(_PREDICTIVE))}; "
                         f"got {name!r}")
    return _PREDICTIVE[name](**params)


def predictive_names() -> list[str]:
    """Registered predictive task names, sorted."""
    return sorted(_PREDICTIVE)


@dataclasses.dataclass(frozen=True)
class PredictiveBatch:
    """A padded batch of data sets: context points (padded to `n_max`, `cmask` marks the real
    ones), query points with their observed values, and the hyperparameters they came from."""

    context_x: Float[Array, "B N D"]
    context_y: Float[Array, "B N"]
    cmask: Bool[Array, "B N"]
    query_x: Float[Array, "B M D"]
    query_y: Float[Array, "B M"]
    hyper: Float[Array, "B H"]


jax.tree_util.register_dataclass(
    PredictiveBatch,
    data_fields=["context_x", "context_y", "cmask", "query_x", "query_y", "hyper"],
    meta_fields=[])


@dataclasses.dataclass
class PredictiveProblem:
    """One data set as a user holds it (NumPy arrays, no padding)."""

    context_x: np.ndarray
    context_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    hyper: np.ndarray


class PredictiveTask:
    """Base class. Subclasses set `x_dim`, `n_min`, `n_max`, `hyper_names` and implement
    `sample_batch`, `sample_problem` and `validate`."""

    name: str = ""
    description: str = ""
    x_dim: int
    n_min: int
    n_max: int
    hyper_names: tuple[str, ...] = ()

    def sample_batch(self, key: Array, batch_size: int, *, n_query: int) -> PredictiveBatch:
        raise NotImplementedError

    def sample_problem(self, key: Array, *, n: int, n_query: int) -> PredictiveProblem:
        raise NotImplementedError

    def validate(self, context_x: Any, context_y: Any, query_x: Any
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError
