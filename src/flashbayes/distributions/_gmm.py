"""Gaussian mixture distribution: the prior and posterior form of the Distribution Transformer."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jaxtyping import Array, ArrayLike, Float

_TOL_SIMPLEX = 1e-4


def _as_float_array(name: str, value: Any, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected an array of numbers; got "
                        f"{type(value).__name__}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected an array with {ndim} dimensions; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values; got NaN or inf")
    return arr


def validate_gmm_arrays(weights: Any, means: Any, scale_tril: Any) -> tuple[np.ndarray, ...]:
    """Check GMM parameters and return them as float64 NumPy arrays.

    Raises:
        ValueError: if shapes disagree, weights are off the simplex or a factor is not a
            lower-triangular matrix with a positive diagonal.
    """
    w = _as_float_array("weights", weights, 1)
    m = _as_float_array("means", means, 2)
    s = _as_float_array("scale_tril", scale_tril, 3)
    k = w.shape[0]
    if k == 0:
        raise ValueError("weights: expected at least one component; got 0")
    if m.shape[0] != k:
        raise ValueError(f"means: expected shape ({k}, d) to match weights; got {m.shape}")
    d = m.shape[1]
    if d == 0:
        raise ValueError("means: expected dimension d >= 1; got 0")
    if s.shape != (k, d, d):
        raise ValueError(f"scale_tril: expected shape ({k}, {d}, {d}); got {s.shape}")
    if np.any(w < 0):
        raise ValueError(f"weights: expected non-negative values on the simplex; got min {w.min()}")
    if abs(w.sum() - 1.0) > _TOL_SIMPLEX:
        raise ValueError(f"weights: expected values summing to 1; got sum {w.sum():.6g}")
    upper = np.triu(s, k=1)
    if np.any(upper != 0):
        raise ValueError("scale_tril: expected lower-triangular factors; got non-zero entries "
                         "above the diagonal")
    diag = np.diagonal(s, axis1=-2, axis2=-1)
    if np.any(diag <= 0):
        raise ValueError(f"scale_tril: expected a positive diagonal; got min {diag.min():.6g}")
    for name, arr in (("means", m), ("scale_tril", s)):
        with np.errstate(over="ignore"):
            overflow = np.any(~np.isfinite(arr.astype(np.float32)))
        if overflow:
            raise ValueError(f"{name}: expected values within float32 range (|x| < 3.4e38); "
                             "got values that overflow")
    if np.any(diag.astype(np.float32) <= 0):
        raise ValueError("scale_tril: expected a diagonal representable in float32 (> 1e-38); "
                         "got values that underflow to 0")
    return w / w.sum(), m, s


@jax.tree_util.register_pytree_node_class
class GMM:
    """A mixture of K full-covariance Gaussians in d dimensions.

    Args:
        weights: (K,) mixture weights on the simplex.
        means: (K, d) component means.
        scale_tril: (K, d, d) lower-triangular Cholesky factors with a positive diagonal.

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> g = fb.GMM(weights=[0.3, 0.7], means=[[0.0, 0.0], [2.0, 1.0]],
        ...            scale_tril=np.stack([np.eye(2), 0.5 * np.eye(2)]))
        >>> g.sample(jax.random.key(0), 5).shape
        (5, 2)
        >>> round(float(g.mean()[0]), 3)
        1.4
    """

    def __init__(self, weights: ArrayLike, means: ArrayLike, scale_tril: ArrayLike,
                 *, validate: bool = True):
        if validate:
            weights, means, scale_tril = validate_gmm_arrays(weights, means, scale_tril)
        self.weights = jnp.asarray(weights, dtype=jnp.float32)
        self.means = jnp.asarray(means, dtype=jnp.float32)
        self.scale_tril = jnp.asarray(scale_tril, dtype=jnp.float32)

    # -- pytree -------------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.weights, self.means, self.scale_tril), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.weights, obj.means, obj.scale_tril = children
        return obj

    @classmethod
    def unchecked(cls, weights: Array, means: Array, scale_tril: Array) -> GMM:
        """Build without validation (for trusted internal outputs)."""
        obj = object.__new__(cls)
        obj.weights, obj.means, obj.scale_tril = weights, means, scale_tril
        return obj

    # -- shape --------------------------------------------------------------------------------
    @property
    def n_components(self) -> int:
        return self.means.shape[-2]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def __repr__(self) -> str:
        return f"GMM(n_components={self.n_components}, dim={self.dim})"

    # -- densities ------------------------------------------------------------------------------
    def component_log_prob(self, theta: Float[Array, "... d"]) -> Float[Array, "... K"]:
        """Log density of each component at theta (without the weights)."""
        return _component_log_prob(self.means, self.scale_tril, jnp.asarray(theta))

    def log_prob(self, theta: ArrayLike) -> Float[Array, ...]:
        """Log density at theta of shape (..., d)."""
        theta = jnp.asarray(theta)
        if theta.shape[-1:] != (self.dim,):
            raise ValueError(f"theta: expected shape (..., {self.dim}); got {theta.shape}")
        return _log_prob(self.weights, self.means, self.scale_tril, theta)

    def sample(self, key: Array, n: int) -> Float[Array, "n d"]:
        """Draw n samples; shape (n, d)."""
        return _sample(key, self.weights, self.means, self.scale_tril, int(n))

    # -- moments ------------------------------------------------------------------------------
    def mean(self) -> Float[Array, " d"]:
        return _mixture_moments(self.weights, self.means, self.scale_tril)[0]

    def cov(self) -> Float[Array, "d d"]:
        return _mixture_moments(self.weights, self.means, self.scale_tril)[1]

    def marginal(self, dims: int | list[int] | tuple[int, ...]) -> GMM:
        """Marginal mixture over the listed dimensions (exact for a Gaussian mixture)."""
        idx = [dims] if isinstance(dims, int) else list(dims)
        if not idx or any(not 0 <= i < self.dim for i in idx):
            raise ValueError(f"dims: expected indices in [0, {self.dim}); got {dims}")
        covs = self.scale_tril @ jnp.swapaxes(self.scale_tril, -1, -2)
        sub = covs[:, idx][:, :, idx]
        return GMM.unchecked(self.weights, self.means[:, idx], jnp.linalg.cholesky(sub))

    def marginals(self) -> list[GMM]:
        """The d one-dimensional marginals."""
        return [self.marginal(i) for i in range(self.dim)]

    def condition(self, dims: list[int], values: ArrayLike) -> GMM:
        """Conditional mixture of the remaining dimensions given theta[dims] = values."""
        idx = list(dims)
        rest = [i for i in range(self.dim) if i not in idx]
        if not rest:
            raise ValueError("dims: expected to leave at least one dimension free")
        v = jnp.asarray(values, dtype=jnp.float32)
        covs = self.scale_tril @ jnp.swapaxes(self.scale_tril, -1, -2)
        s_aa = covs[:, idx][:, :, idx]
        s_ba = covs[:, rest][:, :, idx]
        s_bb = covs[:, rest][:, :, rest]
        diff = v - self.means[:, idx]
        gain = jnp.linalg.solve(s_aa, jnp.swapaxes(s_ba, -1, -2))  # (K, a, b)
        means = self.means[:, rest] + jnp.einsum("kab,ka->kb", gain, diff)
        cov = s_bb - s_ba @ gain
        marg = GMM.unchecked(self.weights, self.means[:, idx], jnp.linalg.cholesky(s_aa))
        logw = jnp.log(self.weights) + marg.component_log_prob(v)
        w = jax.nn.softmax(logw)
        return GMM.unchecked(w, means, jnp.linalg.cholesky(cov))

    def to_inference_data(self, key: Array | None = None, n: int = 4000):
        """n draws as an ArviZ InferenceData with one variable `theta` of shape (1, n, d).

        `key` defaults to `jax.random.key(0)`, so the same call gives the same draws.
        """
        from flashbayes._arviz import arviz

        key = jax.random.key(0) if key is None else key
        draws = np.asarray(self.sample(key, n))
        return arviz().from_dict(posterior={"theta": draws[None]})

    # -- conversion -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "gmm",
            "weights": np.asarray(self.weights, dtype=np.float64).tolist(),
            "means": np.asarray(self.means, dtype=np.float64).tolist(),
            "scale_tril": np.asarray(self.scale_tril, dtype=np.float64).tolist(),
        }

    def to_json(self) -> str:
        """JSON text; `GMM.from_json` reads it back."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, obj: Any) -> GMM:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object with weights, means, scale_tril; got "
                             f"{type(obj).__name__}")
        missing = [k for k in ("weights", "means") if k not in obj]
        if missing:
            raise ValueError(f"expected keys weights, means, scale_tril (or cov); missing "
                             f"{', '.join(missing)}")
        if "scale_tril" in obj:
            tril = obj["scale_tril"]
        elif "cov" in obj:
            cov = _as_float_array("cov", obj["cov"], 3)
            try:
                tril = np.linalg.cholesky(cov)
            except np.linalg.LinAlgError as exc:
                raise ValueError("cov: expected positive-definite matrices") from exc
        else:
            raise ValueError("expected key scale_tril or cov; got neither")
        return cls(weights=obj["weights"], means=obj["means"], scale_tril=tril)

    @classmethod
    def from_json(cls, text: str) -> GMM:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expected JSON text; got malformed JSON ({exc.msg} at line "
                             f"{exc.lineno})") from exc
        return cls.from_dict(obj)

    def to_numpyro(self):
        """The same mixture as a NumPyro distribution."""
        import numpyro.distributions as dist

        mix = dist.Categorical(probs=self.weights)
        comp = dist.MultivariateNormal(loc=self.means, scale_tril=self.scale_tril)
        return dist.MixtureSameFamily(mix, comp)

    @classmethod
    def from_numpyro(cls, key: Array, distribution: Any, n_components: int, *,
                     n_samples: int = 10_000) -> GMM:
        """Turn a NumPyro distribution into a GMM.

        Gaussians and mixtures of Gaussians convert exactly; anything else is fitted by EM to
        `n_samples` draws.
        """
        import numpyro.distributions as dist

        if isinstance(distribution, dist.MultivariateNormal):
            return cls(weights=np.ones(1), means=np.asarray(distribution.loc)[None],
                       scale_tril=np.asarray(distribution.scale_tril)[None])
        if isinstance(distribution, dist.Normal) and distribution.batch_shape == ():
            return cls(weights=np.ones(1), means=[[float(distribution.loc)]],
                       scale_tril=[[[float(distribution.scale)]]])
        if isinstance(distribution, dist.MixtureSameFamily) and isinstance(
                distribution.component_distribution, dist.MultivariateNormal):
            comp = distribution.component_distribution
            return cls(weights=np.asarray(distribution.mixing_distribution.probs),
                       means=np.asarray(comp.loc), scale_tril=np.asarray(comp.scale_tril))
        from flashbayes.distributions._fit import fit_gmm

        k1, k2 = jax.random.split(key)
        draws = distribution.sample(k1, (n_samples,))
        draws = draws.reshape(n_samples, -1)
        return fit_gmm(k2, draws, n_components)


def _component_log_prob(means, scale_tril, theta):
    d = means.shape[-1]
    diff = theta[..., None, :] - means  # (..., K, d)
    diff = jnp.moveaxis(diff, -2, 0)  # (K, ..., d)
    flat = diff.reshape(diff.shape[0], -1, d)  # (K, M, d)
    z = jax.vmap(lambda L, x: jsl.solve_triangular(L, x.T, lower=True).T)(scale_tril, flat)
    maha = jnp.sum(z**2, axis=-1)  # (K, M)
    logdet = jnp.sum(jnp.log(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)), axis=-1)  # (K,)
    lp = -0.5 * maha - logdet[:, None] - 0.5 * d * math.log(2 * math.pi)
    lp = lp.T.reshape(theta.shape[:-1] + (means.shape[0],))
    return lp


@jax.jit
def _log_prob(weights, means, scale_tril, theta):
    comp = _component_log_prob(means, scale_tril, theta)
    return jax.scipy.special.logsumexp(comp + jnp.log(weights), axis=-1)


def _sample(key, weights, means, scale_tril, n):
    return _sample_jit(key, weights, means, scale_tril, n)


@functools.partial(jax.jit, static_argnums=(4,))
def _sample_jit(key, weights, means, scale_tril, n):
    k1, k2 = jax.random.split(key)
    idx = jax.random.categorical(k1, jnp.log(weights), shape=(n,))
    eps = jax.random.normal(k2, (n, means.shape[-1]), dtype=means.dtype)
    return means[idx] + jnp.einsum("nij,nj->ni", scale_tril[idx], eps)


@jax.jit
def _mixture_moments(weights, means, scale_tril):
    mean = weights @ means
    covs = scale_tril @ jnp.swapaxes(scale_tril, -1, -2)
    diff = means - mean
    cov = jnp.einsum("k,kij->ij", weights, covs) + jnp.einsum("k,ki,kj->ij", weights, diff, diff)
    return mean, cov


def gmm_moments(weights, means, scale_tril):
    """Mixture mean and covariance (jit-able, batch with vmap)."""
    return _mixture_moments(weights, means, scale_tril)
