"""What every reference engine returns: named draws in the posterior interface, and the registry."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from flashbayes._arviz import arviz


class ConvergenceWarning(UserWarning):
    """R-hat above 1.01, too few effective draws, or divergent transitions."""


def _entries(shape: tuple[int, ...], order: str) -> list[tuple[int, ...]]:
    if order not in ("C", "F"):
        raise ValueError(f"order: expected 'C' or 'F'; got {order!r}")
    return [tuple(int(i) for i in np.unravel_index(j, shape, order=order))
            for j in range(math.prod(shape))]


def _entry_name(name: str, idx: tuple[int, ...]) -> str:
    return f"{name}[{','.join(str(i + 1) for i in idx)}]" if idx else name


def flat_names(name: str, shape: tuple[int, ...], order: str = "C") -> list[str]:
    """Stan-style names of the entries of a site: `beta[1]`, `beta[2]`, ... (1-based).

    `order` "C" lists them row-major (last index fastest), "F" as Stan writes its output
    columns (first index fastest).

    Example:
        >>> flat_names("beta", (2,))
        ['beta[1]', 'beta[2]']
        >>> flat_names("sigma", ())
        ['sigma']
        >>> flat_names("a", (2, 2), order="F")
        ['a[1,1]', 'a[2,1]', 'a[1,2]', 'a[2,2]']
    """
    return [_entry_name(name, idx) for idx in _entries(tuple(shape), order)]


def flatten_sites(draws: Mapping[str, Any], lead: int = 2, order: str = "C"
                  ) -> dict[str, np.ndarray]:
    """Site arrays of shape (*lead dims, *site shape) -> one (*lead dims) array per Stan name,
    listed in `order` (see `flat_names`)."""
    out = {}
    for name, value in draws.items():
        value = np.asarray(value)
        if value.ndim < lead:
            raise ValueError(f"expected site {name!r} to have at least {lead} draw axes; "
                             f"got shape {value.shape}")
        for idx in _entries(value.shape[lead:], order):
            out[_entry_name(name, idx)] = value[(Ellipsis, *idx)]
    return out


def convergence_summary(draws: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Split R-hat and bulk / tail ESS (ArviZ) of every entry of every site.

    `draws` maps site names to arrays of shape (chains, draws, *site shape). Returns
    {stan name: {"rhat": ..., "ess_bulk": ..., "ess_tail": ...}}.
    """
    az = arviz()
    flat = flatten_sites(draws)
    ds = az.convert_to_dataset({k: np.asarray(v, np.float64) for k, v in flat.items()})
    rhat = az.rhat(ds)
    bulk = az.ess(ds, method="bulk")
    tail = az.ess(ds, method="tail")
    return {k: {"rhat": float(rhat[k]), "ess_bulk": float(bulk[k]), "ess_tail": float(tail[k])}
            for k in flat}


@dataclasses.dataclass
class SampleSet:
    """A posterior given by (possibly weighted) draws; implements the posterior interface.

    Attributes:
        draws: site name -> array (chains, n, *site shape), on the constrained scale. Sites that
            are functions of the parameters (NumPyro `deterministic` sites) are included.
        latent: the sites whose entries, flattened and concatenated, make the parameter vector
            `theta` that `sample`, `mean` and `cov` work with.
        weights: optional normalised importance weights over the chains * n draws (SMC).
        info: what the engine reports: seconds, diagnostics, path taken, ...

    Example:
        >>> import jax, numpy as np
        >>> s = SampleSet({"mu": np.zeros((2, 50)), "beta": np.ones((2, 50, 3))},
        ...               latent=("mu", "beta"))
        >>> s.names
        ['mu', 'beta[1]', 'beta[2]', 'beta[3]']
        >>> s.sample(jax.random.key(0), 4).shape
        (4, 4)
    """

    draws: Mapping[str, Any]
    latent: tuple[str, ...] = ("theta",)
    weights: np.ndarray | None = None
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.draws, Mapping):
            arr = np.asarray(self.draws)
            if arr.ndim != 3:
                raise ValueError(f"draws: expected a dict of sites or an array (chains, n, d); "
                                 f"got shape {arr.shape}")
            self.draws = {"theta": arr}
            self.latent = ("theta",)
        self.draws = {k: np.asarray(v) for k, v in self.draws.items()}
        missing = [k for k in self.latent if k not in self.draws]
        if missing:
            raise ValueError(f"latent sites {missing} not among the draws {list(self.draws)}")
        if self.weights is not None:
            w = np.asarray(self.weights, np.float64).reshape(-1)
            if w.shape[0] != self.n_draws or not np.all(np.isfinite(w)) or np.any(w < 0):
                raise ValueError(f"weights: expected {self.n_draws} finite non-negative values; "
                                 f"got shape {w.shape}")
            self.weights = w / w.sum()

    # -- shapes -------------------------------------------------------------------------------
    @property
    def n_chains(self) -> int:
        return next(iter(self.draws.values())).shape[0]

    @property
    def n_draws(self) -> int:
        first = next(iter(self.draws.values()))
        return first.shape[0] * first.shape[1]

    @property
    def names(self) -> list[str]:
        """Stan-style names of the entries of theta."""
        return [n for site in self.latent for n in flat_names(site, self.draws[site].shape[2:])]

    @functools.cached_property
    def flat(self) -> np.ndarray:
        """(chains * n, d) matrix of theta draws (unweighted), built once."""
        cols = [self.draws[s].reshape(self.n_draws, -1) for s in self.latent]
        return np.concatenate(cols, axis=1).astype(np.float64)

    @property
    def dim(self) -> int:
        return len(self.names)

    # -- legacy accessors used by benchmarks ----------------------------------------------------
    @property
    def seconds(self) -> float:
        return float(self.info.get("seconds", float("nan")))

    @property
    def divergences(self) -> int:
        return int(self.info.get("divergences", 0))

    @property
    def rhat(self) -> np.ndarray | None:
        s = self.info.get("summary")
        return None if s is None else np.array([s[n]["rhat"] for n in self.names])

    @property
    def ess(self) -> np.ndarray | None:
        s = self.info.get("summary")
        return None if s is None else np.array([s[n]["ess_bulk"] for n in self.names])

    # -- posterior interface --------------------------------------------------------------------
    def sample(self, key: Array, n: int) -> Array:
        """n draws of theta, resampled (with replacement, by weight if weighted)."""
        n = int(n)
        if n < 1:
            raise ValueError(f"n: expected a positive integer; got {n}")
        if self.weights is None:
            idx = jax.random.randint(key, (n,), 0, self.n_draws)
        else:
            idx = jax.random.choice(key, self.n_draws, (n,), p=jnp.asarray(self.weights))
        return jnp.asarray(self.flat, jnp.float32)[idx]

    def log_prob(self, theta: Any):
        raise NotImplementedError("a sample-based posterior has no density; use sample()")

    def mean(self) -> Array:
        return jnp.asarray(np.average(self.flat, axis=0, weights=self.weights), jnp.float32)

    def cov(self) -> Array:
        c = np.cov(self.flat, rowvar=False, aweights=self.weights)
        return jnp.asarray(np.atleast_2d(c), jnp.float32)

    def to_inference_data(self, key: Array | None = None):
        """All sites as an ArviZ InferenceData (weighted draws are resampled to equal weight)."""
        az = arviz()
        draws = self.draws
        if self.weights is not None:
            key = jax.random.key(0) if key is None else key
            idx = np.asarray(jax.random.choice(key, self.n_draws, (self.n_draws,),
                                               p=jnp.asarray(self.weights)))
            draws = {k: v.reshape(self.n_draws, *v.shape[2:])[idx][None]
                     for k, v in draws.items()}
        stats = self.info.get("sample_stats")
        return az.from_dict(posterior=dict(draws), sample_stats=stats)

    def flat_draws(self) -> dict[str, np.ndarray]:
        """Every entry of every site (deterministic ones too) by Stan name, (chains * n,) each."""
        return {k: v.reshape(-1) for k, v in flatten_sites(self.draws).items()}


# -- the registry of engines --------------------------------------------------------------------
_ENGINES: dict[str, Callable[..., Any]] = {}


def register_engine(name: str):
    """Add an engine `fn(key, target, **options) -> posterior` to the registry."""

    def deco(fn):
        _ENGINES[name] = fn
        return fn

    return deco


def engines() -> list[str]:
    """Names of the registered reference engines.

    Example:
        >>> import flashbayes as fb
        >>> fb.reference.engines()
        ['exact', 'nuts', 'smc', 'vi']
    """
    return sorted(_ENGINES)


def get_engine(name: str) -> Callable[..., Any]:
    """The engine registered under `name`."""
    if name not in _ENGINES:
        raise ValueError(f"engine: expected one of {engines()}; got {name!r}")
    return _ENGINES[name]
