"""The task interface: a prior family, a likelihood / simulator and, where one exists, the exact
posterior. Every task is one registry entry."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from flashbayes.distributions import GMM

_REGISTRY: dict[str, Callable[..., Task]] = {}


def recording_registry(registry: dict, what: str):
    """A class decorator factory adding classes to `registry`; each instance remembers the
    keyword arguments it was built with (see `task_params`)."""

    def register(name: str):
        def deco(cls):
            if name in registry:
                raise ValueError(f"{what} {name!r} is already registered")
            init = cls.__init__

            @functools.wraps(init)
            def recording_init(self, **params):
                init(self, **params)
                if not hasattr(self, "_params"):  # the outermost constructor records them
                    self._params = params

            cls.__init__ = recording_init
            registry[name] = cls
            cls.name = name
            return cls

        return deco

    return register


register = recording_registry(_REGISTRY, "task")
register.__doc__ = "Class decorator adding a task factory to the registry under `name`."


def get(name: str, **params: Any) -> Task:
    """The task registered as `name`, built with optional parameters.

    Example:
        >>> import flashbayes as fb
        >>> fb.tasks.get("gmm_linear").theta_dim
        2
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"task: expected one of {', '.join(sorted(_REGISTRY))}; got {name!r}"
                         f"{_elsewhere(name)}")
    return _REGISTRY[name](**params)


def _elsewhere(name: Any) -> str:
    """A hint when `name` is a task of another registry."""
    from flashbayes.sbi import tasks as sbi_tasks
    from flashbayes.tasks._predictive import predictive_names

    if name in predictive_names():
        return f" ({name!r} is a predictive task: fb.tasks.get_predictive({name!r}))"
    if name in sbi_tasks.names():
        return f" ({name!r} is a simulation-based task: fb.sbi.tasks.get({name!r}))"
    return ""


def task_params(task: Task) -> dict:
    """Every constructor parameter of a task, defaults included, as JSON-ready values.

    Checkpoint headers store these, so a model keeps meaning the task it was trained on even if
    a default changes later.

    Example:
        >>> import flashbayes as fb
        >>> params = task_params(fb.tasks.get("gmm_linear", n_max=10))
        >>> params["n_max"], params["noise_sd"]
        (10, 0.5)
    """

    def plain(v):
        if isinstance(v, np.ndarray | jax.Array):
            return np.asarray(v).tolist()
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    given = dict(getattr(task, "_params", {}))
    try:
        bound = inspect.signature(type(task).__init__).bind(task, **given)
    except TypeError:  # a constructor that takes other arguments: record what was given
        return {k: plain(v) for k, v in given.items()}
    bound.apply_defaults()
    resolved = {k: v for k, v in bound.arguments.items() if k != "self"}
    return {k: plain(v) for k, v in resolved.items()}


def names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Batch:
    """A padded batch of synthetic problems (JAX arrays).

    Priors are padded to `k_max` components (`cmask` marks real ones, padded weights are 0) and
    data sets to `n_max` rows (`dmask` marks real rows).
    """

    weights: Float[Array, "B K"]
    means: Float[Array, "B K d"]
    scale_tril: Float[Array, "B K d d"]
    cmask: Array
    data: Float[Array, "B N p"]
    dmask: Array
    theta: Float[Array, "B d"]


jax.tree_util.register_dataclass(
    Batch, data_fields=["weights", "means", "scale_tril", "cmask", "data", "dmask", "theta"],
    meta_fields=[])


@dataclasses.dataclass
class Problem:
    """One (prior, theta, data) draw, as a user would hold it."""

    prior: GMM
    theta: np.ndarray
    data: np.ndarray
    user_prior: Any = None


class Task:
    """Base class. Subclasses set the sizes and implement `_sample_prior`, `_sample_theta`,
    `_simulate` and `log_likelihood`."""

    name: str = ""
    description: str = ""
    theta_dim: int
    data_dim: int
    n_min: int
    n_max: int
    k_max: int
    has_exact: bool = False
    # a task may have the network work in a canonical frame of each problem: it then sets
    # `uses_frame` and implements `network_frame` and `data_to_frame` (see
    # `flashbayes.amortized._model.to_frame`)
    uses_frame: bool = False

    @property
    def network_data_dim(self) -> int:
        """Values per data row as the network reads them (`data_to_frame` may rewrite rows)."""
        return self.data_dim

    # -- to implement ------------------------------------------------------------------------
    def prepare(self, key: Array) -> Any:
        """Pre-computation shared by all batches (e.g. a bank of fitted priors)."""
        return None

    def _sample_prior(self, key: Array, state: Any) -> tuple[Array, Array, Array, Array, Any]:
        """One padded prior: (weights (K,), means (K, d), scale_tril (K, d, d), cmask, aux)."""
        raise NotImplementedError

    def _sample_theta(self, key: Array, weights, means, scale_tril, aux) -> Array:
        k1, k2 = jax.random.split(key)
        idx = jax.random.categorical(k1, jnp.log(weights))
        eps = jax.random.normal(k2, (self.theta_dim,))
        return means[idx] + scale_tril[idx] @ eps

    def problem_state(self, key: Array) -> Any:
        """The state `sample_problem` draws a user's problem with when none is given."""
        return self.prepare(jax.random.fold_in(key, 7))

    def _sample_n(self, key: Array) -> Array:
        """Data-set size of one training problem (uniform on n_min..n_max)."""
        return jax.random.randint(key, (), self.n_min, self.n_max + 1)

    def _simulate(self, key: Array, theta: Array, n: int) -> Array:
        """n data rows for one theta."""
        raise NotImplementedError

    def log_likelihood(self, theta: Array, data: Array, mask: Array | None = None) -> Array:
        """Log likelihood of the data rows given theta (rows with mask False are ignored)."""
        raise NotImplementedError

    def data_out_of_range(self, data: np.ndarray) -> str:
        """Why `data` lie outside what the task's training simulations produce ("" if not)."""
        return ""

    def exact_posterior(self, prior: Any, data: Any):
        raise NotImplementedError(f"task {self.name!r} has no closed-form posterior")

    # -- generic -------------------------------------------------------------------------------
    def _one(self, key: Array, state: Any):
        kp, kt, kn, kx = jax.random.split(key, 4)
        w, m, s, cmask, aux = self._sample_prior(kp, state)
        theta = self._sample_theta(kt, w, m, s, aux)
        n = self._sample_n(kn)
        x = self._simulate(kx, theta, self.n_max)
        dmask = jnp.arange(self.n_max) < n
        x = jnp.where(dmask[:, None], x, 0.0)
        return Batch(w, m, s, cmask, x, dmask, theta), aux

    def sample_batch(self, key: Array, batch_size: int, state: Any = None) -> Batch:
        """A batch of synthetic (prior, theta, data) triples; jit-able."""
        batch, _ = jax.vmap(lambda k: self._one(k, state))(jax.random.split(key, batch_size))
        return batch

    def sample_problem(self, key: Array, *, n: int | None = None, state: Any = None) -> Problem:
        """One problem with the padding removed, as NumPy arrays and a validated GMM."""
        if state is None:
            state = self.problem_state(key)
        batch, aux = self._one(key, state)
        cm = np.asarray(batch.cmask)
        count = int(np.asarray(batch.dmask).sum()) if n is None else int(n)
        if n is not None:
            if not self.n_min <= n <= self.n_max:
                raise ValueError(f"n: expected {self.n_min}..{self.n_max}; got {n}")
            kx = jax.random.fold_in(key, 11)
            x = np.asarray(self._simulate(kx, batch.theta, max(n, 1)))[:n]
        else:
            x = np.asarray(batch.data)[:count]
        w = np.asarray(batch.weights, np.float64)[cm]
        prior = GMM(weights=w / w.sum(), means=np.asarray(batch.means)[cm],
                    scale_tril=np.asarray(batch.scale_tril)[cm])
        return Problem(prior=prior, theta=np.asarray(batch.theta, np.float64),
                       data=x.astype(np.float64), user_prior=self._user_prior(aux))

    def _user_prior(self, aux: Any) -> Any:
        return None

    def log_joint(self, prior: GMM) -> Callable[[Array, Array], Array]:
        """Unnormalised log posterior theta -> log prior + log likelihood, for MCMC."""

        def fn(theta, data):
            return prior.log_prob(theta) + self.log_likelihood(theta, data)

        return fn

    def validate_data(self, data: Any) -> np.ndarray:
        """Check a data set: shape (n, data_dim), finite, n within what the task allows."""
        try:
            x = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"data: expected an array of numbers; got {type(data).__name__}") \
                from exc
        if x.ndim == 1 and self.data_dim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"data: expected shape (n, {self.data_dim}) for task {self.name}; "
                             f"got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("data: expected finite values; got NaN or inf")
        return x


# -- shared prior family ------------------------------------------------------------------------


class GMMFamilyPrior:
    """Mixin: priors from `sample_gmm_family` with the task's k/mean/scale ranges."""

    def _sample_prior(self, key, state):
        w, m, s, cmask = sample_gmm_family(
            key, d=self.theta_dim, k_min=self.k_min, k_max=self.k_max,
            mean_low=self.mean_range[0], mean_high=self.mean_range[1],
            scale_low=self.scale_range[0], scale_high=self.scale_range[1])
        return w, m, s, cmask, None


def random_rotation(key: Array, d: int) -> Array:
    """A uniformly random rotation (Haar measure via QR with sign fix)."""
    g = jax.random.normal(key, (d, d))
    q, r = jnp.linalg.qr(g)
    q = q * jnp.sign(jnp.diagonal(r))[None, :]
    return q


def sample_gmm_family(key: Array, *, d: int, k_min: int, k_max: int, mean_low: float,
                      mean_high: float, scale_low: float, scale_high: float):
    """The shared GMM prior family: K ~ U{k_min..k_max}, weights ~ Dirichlet(1), means
    ~ U[mean_low, mean_high]^d, covariances R diag(s^2) R^T with R a random rotation and
    s ~ LogUniform[scale_low, scale_high]. Padded to k_max components."""
    kk, kw, km, kr, ks = jax.random.split(key, 5)
    k = jax.random.randint(kk, (), k_min, k_max + 1)
    cmask = jnp.arange(k_max) < k
    g = jnp.maximum(jax.random.exponential(kw, (k_max,)), 1e-6) * cmask
    w = g / jnp.sum(g)
    means = jax.random.uniform(km, (k_max, d), minval=mean_low, maxval=mean_high)
    rots = jax.vmap(lambda kk_: random_rotation(kk_, d))(jax.random.split(kr, k_max))
    s = jnp.exp(jax.random.uniform(ks, (k_max, d), minval=math.log(scale_low),
                                   maxval=math.log(scale_high)))
    cov = jnp.einsum("kij,kj,klj->kil", rots, s**2, rots)
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    tril = jnp.linalg.cholesky(cov)
    tril = jnp.where(cmask[:, None, None], tril, jnp.eye(d))
    means = jnp.where(cmask[:, None], means, 0.0)
    return w, means, tril, cmask
