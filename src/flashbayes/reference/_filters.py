"""Reference filters for sequential tasks, in one registry.

Every filter has the signature `fn(key, task, prior, ys, observed, **options)` with `prior` a
`GMM` over x_0, `ys` (T, p) float64 observations and `observed` (T,) the mask of the steps that
have an observation (the others only apply the transition). It returns T posteriors over the
current state, each with `mean`, `cov`, `log_prob` and `sample`. Users call
`fb.filter(name, prior, observations, key=..., task=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from flashbayes.distributions import GMM
from flashbayes.tasks import gaussian_sum_update

_FILTERS: dict[str, Callable[..., list]] = {}


def register_filter(name: str):
    """Add a reference filter `fn(key, task, prior, ys, observed, **options)` to the registry."""

    def deco(fn):
        if name in _FILTERS:
            raise ValueError(f"filter {name!r} is already registered")
        _FILTERS[name] = fn
        return fn

    return deco


def filters() -> list[str]:
    """Names of the registered reference filters.

    Example:
        >>> import flashbayes as fb
        >>> "kalman" in fb.reference.filters()
        True
    """
    return sorted(_FILTERS)


def get_filter(name: str) -> Callable[..., list]:
    """The reference filter registered under `name`."""
    if name not in _FILTERS:
        raise ValueError(f"filter: expected one of {filters()}; got {name!r}")
    return _FILTERS[name]


def _move(task: Any, post: GMM) -> GMM:
    return task.transition(post) if getattr(task, "dynamic", False) else post


@register_filter("kalman")
def kalman(key: Any, task: Any, prior: GMM, ys: np.ndarray, observed: np.ndarray,
           **options: Any) -> list[GMM]:
    """Exact Gaussian-sum Kalman filter (one Kalman filter per component, weights by their
    evidence) for tasks with a linear-Gaussian observation (`task.H`, `task.R`). Float64."""
    if options:
        raise TypeError(f"kalman: unexpected options {sorted(options)}")
    if not (hasattr(task, "H") and hasattr(task, "R")):
        raise ValueError(f"kalman: expected a task with a linear-Gaussian observation (H, R); "
                         f"got {task.name!r}")
    post, out = prior, []
    for y, obs in zip(ys, observed):
        post = _move(task, post)
        if obs:
            post = gaussian_sum_update(post, task.H, task.R, y[None])
        out.append(post)
    return out
