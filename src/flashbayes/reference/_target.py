"""Targets: an unnormalised posterior on an unconstrained vector space, for the reference engines.

A target separates what fixes the compiled program (`cache_key`: the model, static data, array
shapes) from the arrays passed to it at run time (`data`), so an engine compiles once per model
and data shape and reuses the program for new data of the same shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array

from flashbayes._padding import pad_prior, pad_rows, size_bucket


def _shape_key(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (str(treedef), tuple((tuple(np.shape(x)), str(jnp.asarray(x).dtype)) for x in leaves))


class Target:
    """Base class. Subclasses set `dim`, `data`, `latent`, `cache_key`, `identity`.

    `log_density(z, data)` is the unnormalised log posterior of the unconstrained vector z
    (Jacobian included); `log_prior` + `log_likelihood` add up to it. `constrain(z, data)`
    returns the named sites on the constrained scale.
    """

    dim: int
    data: Any = ()
    latent: tuple[str, ...] = ("theta",)
    cache_key: Any = None
    identity: bool = True

    def log_density(self, z: Array, data: Any) -> Array:
        raise NotImplementedError

    def log_prior(self, z: Array, data: Any) -> Array:
        raise NotImplementedError(f"{type(self).__name__} does not split prior and likelihood")

    def log_likelihood(self, z: Array, data: Any) -> Array:
        return self.log_density(z, data) - self.log_prior(z, data)

    def sample_prior(self, key: Array, n: int, data: Any) -> Array:
        raise NotImplementedError(f"{type(self).__name__} has no prior sampler")

    def constrain(self, z: Array, data: Any) -> dict[str, Array]:
        return {"theta": z}

    def unconstrain(self, theta: Array, data: Any) -> Array:
        """Flat constrained theta (as `SampleSet.flat` orders it) -> unconstrained z."""
        if self.identity:
            return theta
        raise NotImplementedError(f"{type(self).__name__} cannot map theta back")

    def initial_positions(self, key: Array, n: int, data: Any) -> Array:
        """n starting points with a finite log density: uniform in [-2, 2] (Stan's rule)."""
        cand = jax.random.uniform(key, (n, 16, self.dim), minval=-2.0, maxval=2.0)
        ld = jax.vmap(jax.vmap(lambda z: self.log_density(z, data)))(cand)
        first = jnp.argmax(jnp.isfinite(ld), axis=1)
        return cand[jnp.arange(n), first]


class LogDensityTarget(Target):
    """A plain log-density function `fn(theta, *args)` on R^d.

    Example:
        >>> import jax.numpy as jnp
        >>> t = LogDensityTarget(lambda th, mu: -0.5 * jnp.sum((th - mu) ** 2), dim=2,
        ...                      args=(jnp.ones(2),))
        >>> float(t.log_density(jnp.ones(2), t.data))
        -0.0
    """

    def __init__(self, fn: Callable[..., Array], *, dim: int, args: tuple = ()):
        if not callable(fn):
            raise TypeError(f"fn: expected a log-density function; got {type(fn).__name__}")
        if int(dim) < 1:
            raise ValueError(f"dim: expected a positive integer; got {dim}")
        self.fn, self.dim = fn, int(dim)
        self.data = tuple(jnp.asarray(a) for a in args)
        self.cache_key = ("logdensity", fn, self.dim, _shape_key(self.data))

    def log_density(self, z, data):
        return self.fn(z, *data)


class TaskTarget(Target):
    """GMM prior x a task's likelihood: the exact unnormalised posterior of an amortized problem.

    The prior is padded to the task's component count and the data to a size bucket, so problems
    of one bucket share one compiled program.
    """

    def __init__(self, task, prior, data: Any):
        from flashbayes.distributions import GMM

        if not isinstance(prior, GMM):
            raise TypeError(f"prior: expected a flashbayes.GMM; got {type(prior).__name__}")
        if prior.dim != task.theta_dim:
            raise ValueError(f"prior: expected dimension {task.theta_dim} for task "
                             f"{task.name!r}; got {prior.dim}")
        x = task.validate_data(data)
        self.task, self.prior, self.x = task, prior, x
        self.dim = task.theta_dim
        w, m, s, _ = pad_prior(prior, max(task.k_max, prior.n_components))
        xp, dmask = pad_rows(x, size_bucket(x.shape[0]))
        self.data = tuple(jnp.asarray(a) for a in (w, m, s, xp, dmask))
        from flashbayes.tasks import task_params

        self.cache_key = ("task", task.name, json.dumps(task_params(task), sort_keys=True),
                          _shape_key(self.data))

    def log_prior(self, z, data):
        from flashbayes.distributions._gmm import _component_log_prob

        w, m, s, _, _ = data
        # z may be one point (d,) or many (n, d): the batched form solves once per component
        return jax.scipy.special.logsumexp(_component_log_prob(m, s, z) + jnp.log(w), axis=-1)

    def log_likelihood(self, z, data):
        return self.task.log_likelihood(z, data[3], data[4])

    def log_density(self, z, data):
        return self.log_prior(z, data) + self.log_likelihood(z, data)

    def sample_prior(self, key, n, data):
        from flashbayes.distributions._gmm import _sample

        w, m, s, _, _ = data
        return _sample(key, w, m, s, n)

    def initial_positions(self, key, n, data):
        return self.sample_prior(key, n, data)


def _split_data(data: Mapping[str, Any]) -> tuple[dict, dict]:
    """Python ints, bools and strings are static (they fix shapes); the rest become arrays."""
    if not isinstance(data, Mapping):
        raise TypeError(f"data: expected a dict of the model's keyword arguments; got "
                        f"{type(data).__name__}")
    static, dynamic = {}, {}
    for k, v in data.items():
        if isinstance(v, (bool, int, str, np.integer)) and not isinstance(v, float):
            static[k] = v.item() if isinstance(v, np.integer) else v
        elif v is None:
            static[k] = None
        else:
            arr = np.asarray(v)
            if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                           or arr.dtype == bool):
                raise TypeError(f"data[{k!r}]: expected numbers or arrays of numbers; got "
                                f"{type(v).__name__}")
            if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
                raise ValueError(f"data[{k!r}]: expected finite values; got NaN or inf")
            dtype = jnp.int32 if np.issubdtype(arr.dtype, np.integer) else None
            dynamic[k] = jnp.asarray(arr, dtype)
    return static, dynamic


class NumPyroTarget(Target):
    """A NumPyro model with its data: sampled on the unconstrained scale NumPyro defines.

    Data entries that are Python ints (sizes, flags) are static; arrays and floats are passed
    to the compiled program, so new data of the same shape reuse it.

    Example:
        >>> import jax.numpy as jnp, numpyro, numpyro.distributions as dist
        >>> def model(y):
        ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        ...     numpyro.sample("y", dist.Normal(0.0, sigma), obs=y)
        >>> t = NumPyroTarget(model, {"y": [0.3, -0.2]})
        >>> t.dim, t.names
        (1, ['sigma'])
    """

    def __init__(self, model: Callable, data: Mapping[str, Any] | None = None):
        from numpyro import handlers
        from numpyro.distributions.transforms import IdentityTransform, biject_to
        from numpyro.infer.initialization import init_to_uniform

        if not callable(model):
            raise TypeError(f"model: expected a NumPyro model function; got "
                            f"{type(model).__name__}")
        self.model = model
        self.static, self.data = _split_data(data or {})
        # the model's structure, traced abstractly (no numbers are computed, so a starting
        # point where e.g. an ODE solve fails cannot trip the distributions' argument checks);
        # init_to_uniform gives every latent site a value, improper priors included
        found: dict[str, Any] = {}

        def probe(data):
            tr = handlers.trace(handlers.substitute(handlers.seed(self._bound(data), 0),
                                                   substitute_fn=init_to_uniform)).get_trace()
            latent = [n for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]]
            found["latent"] = tuple(latent)
            found["deterministic"] = tuple(n for n, s in tr.items()
                                           if s["type"] == "deterministic")
            found["shapes"] = {n: tuple(np.shape(tr[n]["value"])) for n in latent}
            found["identity"] = all(isinstance(biject_to(tr[n]["fn"].support),
                                               IdentityTransform) for n in latent)
            if not latent:
                return jnp.zeros(0)
            flat, found["unravel"] = ravel_pytree(
                self._unconstrain_dict({n: tr[n]["value"] for n in latent}, data))
            return flat

        flat = jax.eval_shape(probe, self.data)
        if not found["latent"]:
            raise ValueError("model: expected at least one latent sample site; got none")
        self.latent = found["latent"]
        self.deterministic = found["deterministic"]
        self.site_shapes = found["shapes"]
        self._unravel = found["unravel"]
        self.dim = int(flat.shape[0])
        self.identity = found["identity"]
        self.cache_key = ("numpyro", model, tuple(sorted(self.static.items(), key=str)),
                          _shape_key(self.data))

    @property
    def names(self) -> list[str]:
        from flashbayes.reference._base import flat_names

        return [f for n in self.latent for f in flat_names(n, self.site_shapes[n])]

    def _bound(self, data):
        model, static = self.model, self.static

        def bound():
            return model(**static, **data)

        return bound

    def _unconstrain_dict(self, values, data):
        from numpyro.infer.util import unconstrain_fn

        return unconstrain_fn(self._bound(data), (), {}, values)

    def log_density(self, z, data):
        from numpyro.infer.util import potential_energy

        return -potential_energy(self._bound(data), (), {}, self._unravel(z))

    def log_likelihood(self, z, data):
        from numpyro.infer.util import log_density

        values = self.constrain(z, data)
        _, tr = log_density(self._bound(data), (), {}, {n: values[n] for n in self.latent})
        total = 0.0
        for site in tr.values():
            if site["type"] == "sample" and site["is_observed"]:
                lp = site["fn"].log_prob(site["value"])
                if site.get("scale") is not None:
                    lp = site["scale"] * lp
                total = total + jnp.sum(lp)
        return total

    def log_prior(self, z, data):
        return self.log_density(z, data) - self.log_likelihood(z, data)

    def constrain(self, z, data):
        from numpyro.infer.util import constrain_fn

        return constrain_fn(self._bound(data), (), {}, self._unravel(z),
                            return_deterministic=True)

    def unconstrain(self, theta, data):
        values, i = {}, 0
        for n in self.latent:
            size = int(np.prod(self.site_shapes[n], dtype=int))
            values[n] = jnp.reshape(theta[i:i + size], self.site_shapes[n])
            i += size
        return ravel_pytree(self._unconstrain_dict(values, data))[0]

    def sample_prior(self, key, n, data):
        from numpyro import handlers

        bound = self._bound(data)

        def one(k):
            tr = handlers.trace(handlers.seed(bound, k)).get_trace()
            return ravel_pytree(self._unconstrain_dict(
                {s: tr[s]["value"] for s in self.latent}, data))[0]

        try:
            return jax.vmap(one)(jax.random.split(key, n))
        except NotImplementedError as err:
            raise ValueError("this engine needs a proper prior to sample from; the model has an "
                             f"improper one ({err})") from err
