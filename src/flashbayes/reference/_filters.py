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


class GridPosterior:
    """A posterior on a regular 2-D (or d-D) grid: normalised cell masses over cell centres.

    `log_prob` is the density of the cell holding the point (-inf outside the grid); `sample`
    draws a cell by its mass and a uniform point inside it.
    """

    def __init__(self, axes: list[np.ndarray], log_mass: np.ndarray):
        self.axes = [np.asarray(a, np.float64) for a in axes]
        self.steps = np.array([a[1] - a[0] for a in self.axes])
        self.points = np.stack(np.meshgrid(*self.axes, indexing="ij"), -1).reshape(
            -1, len(self.axes))
        lm = np.asarray(log_mass, np.float64)
        lm = lm - lm.max()
        self.mass = np.exp(lm) / np.exp(lm).sum()
        self.log_density = np.log(np.maximum(self.mass, 1e-300)) - np.log(np.prod(self.steps))

    def mean(self) -> np.ndarray:
        return self.mass @ self.points

    def cov(self) -> np.ndarray:
        c = self.points - self.mean()
        return (self.mass[:, None] * c).T @ c + np.diag(self.steps**2 / 12)

    def log_prob(self, theta) -> np.ndarray:
        x = np.atleast_2d(np.asarray(theta, np.float64))
        idx = [np.rint((x[:, i] - a[0]) / s).astype(int)
               for i, (a, s) in enumerate(zip(self.axes, self.steps))]
        inside = np.all([(j >= 0) & (j < a.size) for j, a in zip(idx, self.axes)], 0)
        flat = np.ravel_multi_index([np.clip(j, 0, a.size - 1) for j, a in zip(idx, self.axes)],
                                    [a.size for a in self.axes])
        out = np.where(inside, self.log_density[flat], -np.inf)
        return out if np.ndim(theta) > 1 else out[0]

    def sample(self, key, n: int) -> np.ndarray:
        import jax

        k1, k2 = jax.random.split(key)
        cells = np.asarray(jax.random.choice(k1, self.mass.size, (n,), p=self.mass))
        jitter = np.asarray(jax.random.uniform(k2, (n, self.points.shape[1]), minval=-0.5,
                                               maxval=0.5))
        return self.points[cells] + jitter * self.steps

    def kl_to(self, q) -> float:
        """KL(self || q) for a posterior q with `log_prob`, by quadrature on the grid."""
        keep = self.mass > 0
        lq = np.asarray(q.log_prob(self.points[keep]), np.float64)
        return float(np.sum(self.mass[keep] * (self.log_density[keep] - lq)))


@register_filter("grid")
def grid(key: Any, task: Any, prior: GMM, ys: np.ndarray, observed: np.ndarray, *,
         size: int = 400, span: float = 6.0, **options: Any) -> list[GridPosterior]:
    """Exact sequential posterior on a regular grid (static 2-D tasks with `grid_log_likelihood`).

    The grid spans the prior's mean +- `span` prior sds per axis with `size` points per axis,
    so it is exact up to the discretisation and the (negligible) prior mass outside it.
    """
    if options:
        raise TypeError(f"grid: unexpected options {sorted(options)}")
    if getattr(task, "dynamic", False) or not hasattr(task, "grid_log_likelihood"):
        raise ValueError(f"grid: expected a static task with a grid likelihood; got {task.name!r}")
    mean = np.asarray(prior.mean(), np.float64)
    sd = np.sqrt(np.diag(np.asarray(prior.cov(), np.float64)))
    axes = [np.linspace(m - span * s, m + span * s, size) for m, s in zip(mean, sd)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, mean.size)
    log_post = np.asarray(prior.log_prob(points), np.float64)
    out = []
    for y, obs in zip(ys, observed):
        if obs:
            log_post = log_post + task.grid_log_likelihood(points, y[None])
        out.append(GridPosterior(axes, log_post))
    return out
