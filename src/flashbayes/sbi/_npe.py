"""Neural posterior estimation (NPE): one network q(theta | x), amortized over observations.

Training pairs (theta, x) come from the prior and the simulator (or a stored `Simulations`).
theta is mapped to an unbounded space by a bijection chosen from the prior's support (identity on
the real line, on a box a map that is linear but for the edges (`interval_map="flat"`, the
default) or the logit, log on the positive half-line), so that the posterior puts no mass outside
the support; then theta and x are z-scored with the training set's statistics.
The density head is a Gaussian mixture (``"gmm"``, a mixture density network whose output is a
`flashbayes.GMM`), a neural spline coupling flow (``"nsf"``) or a masked autoregressive flow
(``"maf"``), both from flowjax. Training minimises -log q(theta | x) with Adam, keeps a validation
split, stops early when the validation loss stops improving and keeps the best weights. By
default several networks of both flow kinds are trained and mixed, with weights chosen on the
validation split (stacking).

Example:
    >>> import jax, jax.numpy as jnp, numpyro.distributions as dist
    >>> from flashbayes import sbi
    >>> prior = dist.Uniform(jnp.zeros(2), jnp.ones(2)).to_event(1)
    >>> def simulator(key, theta):
    ...     return theta + 0.05 * jax.random.normal(key, (2,))
    >>> est = sbi.train_npe(prior, simulator, num_simulations=500, key=jax.random.key(0),
    ...                     ensemble=1, max_epochs=5)   # 1 spline + 1 autoregressive flow
    >>> draws = est.posterior(jnp.array([0.3, 0.6])).sample(jax.random.key(1), 1000)
    >>> draws.shape, bool(((draws > 0) & (draws < 1)).all())
    ((1000, 2), True)
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flashbayes.distributions import GMM
from flashbayes.sbi._embedding import EMBEDDINGS, make_embedding, set_features
from flashbayes.sbi._maf_sampling import MAFLayout, maf_layout, sample_maf

__all__ = ["NPEEstimator", "NPEEvent", "NPEPosterior", "load_npe", "train_npe"]

HEADS = ("gmm", "nsf", "maf")
MIN_MEMBER_WEIGHT = 1e-3  # ensemble members below this stacking weight are dropped
CHECKPOINT_NAME = "npe.safetensors"
_KIND = "npe"


# -- support bijection ----------------------------------------------------------------------------


def _support_spec(prior: Any, dim: int) -> dict:
    """A JSON description of the prior's support: real, interval (lower, upper) or greater_than."""
    from numpyro.distributions import constraints

    support = getattr(prior, "support", None)
    if support is None:
        raise TypeError(f"prior: expected a NumPyro distribution; got {type(prior).__name__}")
    base = support
    while isinstance(base, constraints.independent):
        base = base.base_constraint
    if base is constraints.real or base is constraints.real_vector:
        return {"kind": "real"}
    lower = getattr(base, "lower_bound", None)
    upper = getattr(base, "upper_bound", None)
    if lower is not None and upper is not None:
        return {"kind": "interval",
                "lower": np.broadcast_to(np.asarray(lower, np.float64), (dim,)).tolist(),
                "upper": np.broadcast_to(np.asarray(upper, np.float64), (dim,)).tolist()}
    if lower is not None:
        return {"kind": "greater_than",
                "lower": np.broadcast_to(np.asarray(lower, np.float64), (dim,)).tolist()}
    raise ValueError(f"prior: expected a support on the reals, a box or a lower bound; got "
                     f"{support}")


INTERVAL_MAPS = ("logit", "flat")


def _flat_interval_transform(lower, upper, width):
    """R^d onto the box (lower, upper), linear on most of it and bending only near the edges.

    Per coordinate, theta = lower + (upper - lower) g(u) with

        g(u) = (softplus(u + c) - softplus(u - c)) / (2 c),   c = width,

    so g is the straight line (u + c) / (2 c) on |u| < c less a few units, and logistic within
    a few units of +-c. A posterior that keeps off the edges is mapped affinely (a Gaussian stays
    a Gaussian), unlike under the logit, which bends the whole box.
    """
    from numpyro.distributions import constraints
    from numpyro.distributions.transforms import Transform

    c = float(width)
    log_scale = jnp.log(upper - lower) + (2 * c + math.log1p(-math.exp(-2 * c))) - math.log(2 * c)

    class _Flat(Transform):
        domain = constraints.real_vector
        codomain = constraints.independent(constraints.interval(lower, upper), 1)
        sign = 1

        def __call__(self, u):
            # (draws are kept strictly inside the box by `_Transform.__call__`)
            return lower + (upper - lower) * (jax.nn.softplus(u + c)
                                              - jax.nn.softplus(u - c)) / (2 * c)

        def _inverse(self, theta):
            fi = jnp.finfo(jnp.result_type(theta))
            # the open interval: a point next to an edge must not round onto it
            y = jnp.clip((theta - lower) / (upper - lower), fi.tiny, 1.0 - fi.eps / 2)
            return (c * (2 * y - 1) + jnp.log(-jnp.expm1(-2 * c * y))
                    - jnp.log(-jnp.expm1(-2 * c * (1 - y))))

        def log_abs_det_jacobian(self, u, theta, intermediates=None):
            # g'(u) = (sigmoid(u + c) - sigmoid(u - c)) / (2 c)
            #       = sigmoid(u - c) sigmoid(-u - c) (e^{2c} - 1) / (2 c)
            return jnp.sum(jax.nn.log_sigmoid(u - c) + jax.nn.log_sigmoid(-u - c) + log_scale,
                           -1)

    return _Flat()


def _bijection(spec: dict):
    """The NumPyro transform from R^d onto the support described by `spec`."""
    from numpyro.distributions import constraints
    from numpyro.distributions.transforms import biject_to

    if spec["kind"] == "real":
        return biject_to(constraints.real_vector)
    lower = jnp.asarray(spec["lower"], jnp.float32)
    if spec["kind"] == "interval" and spec.get("map", "logit") == "flat":
        return _flat_interval_transform(lower, jnp.asarray(spec["upper"], jnp.float32),
                                        spec["width"])
    if spec["kind"] == "interval":
        base = constraints.interval(lower, jnp.asarray(spec["upper"], jnp.float32))
    else:
        base = constraints.greater_than(lower)
    return biject_to(constraints.independent(base, 1))


def _in_support(spec: dict, theta):
    if spec["kind"] == "real":
        return jnp.ones(theta.shape[:-1], bool)
    ok = theta > jnp.asarray(spec["lower"], theta.dtype)
    if spec["kind"] == "interval":
        ok = ok & (theta < jnp.asarray(spec["upper"], theta.dtype))
    return jnp.all(ok, axis=-1)


# -- density heads --------------------------------------------------------------------------------


class MixtureHead(eqx.Module):
    """A mixture density network: context -> Gaussian mixture (weights, means, Cholesky factors)."""

    mlp: eqx.nn.MLP
    n_components: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, context_dim: int, dim: int, n_components: int, width: int, *, key):
        self.n_components, self.dim = n_components, dim
        n_out = n_components * (1 + dim + dim * (dim + 1) // 2)
        self.mlp = eqx.nn.MLP(context_dim, n_out, width, 2, activation=jax.nn.gelu, key=key)

    def __call__(self, context) -> GMM:
        k, d = self.n_components, self.dim
        out = self.mlp(context)
        logits, out = out[:k], out[k:]
        means, out = out[: k * d].reshape(k, d), out[k * d:]
        rows, cols = jnp.tril_indices(d)
        raw = jnp.zeros((k, d, d)).at[:, rows, cols].set(out.reshape(k, -1))
        diag = jax.nn.softplus(jnp.diagonal(raw, axis1=-2, axis2=-1) + 0.5) + 1e-3
        tril = jnp.tril(raw, -1) + jax.vmap(jnp.diag)(diag)
        return GMM.unchecked(jax.nn.softmax(logits), means, tril)


class _Net(eqx.Module):
    embedding: eqx.Module
    head: eqx.Module
    kind: str = eqx.field(static=True)

    def log_prob(self, z, xz):
        context = self.embedding(xz)
        if self.kind == "gmm":
            return self.head(context).log_prob(z)
        return self.head.log_prob(z, condition=context)

    def sample(self, key, n: int, xz, layout: MAFLayout | None = None):
        context = self.embedding(xz)
        if self.kind == "gmm":
            return self.head(context).sample(key, n)
        if self.kind == "maf" and layout is not None:
            return sample_maf(self.head, layout, key, n, context)
        return self.head.sample(key, (n,), condition=context)


def _like(net: _Net, template: _Net) -> _Net:
    """`net`'s arrays with `template`'s non-array parts (same architecture).

    Networks built from one config differ only in arrays, except for closures flowjax makes
    per network (they compute the same function); sharing them lets members of one head share
    compiled code and be stacked.
    """
    return eqx.combine(eqx.filter(net, eqx.is_array),
                       eqx.filter(template, eqx.is_array, inverse=True))


def _stack(nets: list[_Net]) -> _Net:
    arrays = [eqx.filter(_like(net, nets[0]), eqx.is_array) for net in nets]
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *arrays)
    return eqx.combine(stacked, eqx.filter(nets[0], eqx.is_array, inverse=True))


class _Ensemble(eqx.Module):
    """A mixture of networks q(z | x) = sum_m w_m q_m(z | x), the weights fixed after training.

    Members of one head are stacked (``groups``, one per head, arrays with a leading member axis);
    ``log_prob`` evaluates them with one vectorised call. ``sample`` draws the members' counts by
    systematic resampling (each within one of n w_m, their expectation exactly n w_m), lets each
    member draw its own share and returns the draws in random order, so every draw is marginally
    a draw of the mixture.
    """

    groups: tuple
    sizes: tuple = eqx.field(static=True)
    weights: tuple = eqx.field(static=True)

    def log_prob(self, z, xz):
        lps = jnp.concatenate([eqx.filter_vmap(lambda net: net.log_prob(z, xz))(g)
                               for g in self.groups])
        return jax.scipy.special.logsumexp(lps + jnp.log(jnp.asarray(self.weights)))

    def sample(self, key, n: int, xz, layout: MAFLayout | None = None):
        w = np.asarray(self.weights, np.float64)
        k_u, k_perm, *keys = jax.random.split(key, 2 + len(self.groups))
        cum = n * np.cumsum(w)
        cum[-1] = n
        edges = jnp.floor(jnp.concatenate([jnp.zeros(1), jnp.asarray(cum, jnp.float32)])
                          + jax.random.uniform(k_u))
        counts = edges[1:] - edges[:-1]
        draws, keep, start = [], [], 0
        for g, size, k in zip(self.groups, self.sizes, keys, strict=True):
            caps = [min(n, int(np.floor(n * w[start + m])) + 1) for m in range(size)]
            counts_g = counts[start:start + size]
            member_keys = jax.random.split(k, size)
            # each member draws its own share (measured: 26-38 ms for 10,000 draws where one
            # vectorised call at the largest share took 43-52 ms, one core)
            for m in range(size):
                net = jax.tree_util.tree_map(lambda a, m=m: a[m] if eqx.is_array(a) else a, g)
                draws.append(net.sample(member_keys[m], caps[m], xz, layout))
                keep.append(jnp.arange(caps[m]) < counts_g[m])
            start += size
        draws, keep = jnp.concatenate(draws), jnp.concatenate(keep)
        chosen = draws[jnp.argsort(~keep, stable=True)[:n]]
        return chosen[jax.random.permutation(k_perm, n)]

    def gmm(self, xz) -> GMM:
        """For ``"gmm"`` members: all their components in one mixture."""
        parts = [eqx.filter_vmap(lambda net: net.head(net.embedding(xz)))(g) for g in self.groups]
        weights = jnp.concatenate([g.weights for g in parts])
        weights = weights * jnp.asarray(self.weights)[:, None]
        d = parts[0].means.shape[-1]
        return GMM.unchecked(weights.reshape(-1),
                             jnp.concatenate([g.means for g in parts]).reshape(-1, d),
                             jnp.concatenate([g.scale_tril for g in parts]).reshape(-1, d, d))


def _ensemble(nets: list[_Net], heads: list[str], weights) -> _Ensemble:
    """Group `nets` by head (their order in `heads` must already be grouped)."""
    order = list(dict.fromkeys(heads))
    if heads != [h for h in order for _ in range(heads.count(h))]:
        raise ValueError(f"ensemble: expected members grouped by head; got {heads}")
    groups, sizes = [], []
    for h in order:
        members = [net for net, hh in zip(nets, heads, strict=True) if hh == h]
        groups.append(_stack(members))
        sizes.append(len(members))
    return _Ensemble(tuple(groups), tuple(sizes), tuple(float(v) for v in weights))


def _stacking_weights(log_probs: np.ndarray, iterations: int = 1000) -> np.ndarray:
    """Mixture weights maximising the mean held-out log density (EM on the weights alone).

    log_probs: (members, points) held-out log densities of each member.
    """
    from scipy.special import logsumexp

    lp = np.where(np.isfinite(log_probs), log_probs, -1e30).astype(np.float64)
    w = np.full(len(lp), 1.0 / len(lp))
    for _ in range(iterations):
        r = np.log(np.maximum(w, 1e-300))[:, None] + lp
        w_new = np.exp(r - logsumexp(r, axis=0)).mean(axis=1)
        if np.max(np.abs(w_new - w)) < 1e-7:
            return w_new
        w = w_new
    return w


def _mixture_loss(log_probs: np.ndarray, weights: np.ndarray) -> float:
    """-mean log sum_m w_m q_m from the members' pointwise log densities (members, points)."""
    from scipy.special import logsumexp

    return float(-np.mean(logsumexp(np.log(weights)[:, None] + log_probs, axis=0)))


def _build_model(config: dict, *, key) -> _Net | _Ensemble:
    """The network of a checkpoint's config: one `_Net`, or an `_Ensemble` of them."""
    members = config.get("members")
    if not members:
        return _build_net(config, key=key)
    keys = jax.random.split(key, len(members))
    nets = [_build_net({**config, "head": h}, key=k) for h, k in zip(members, keys, strict=True)]
    return _ensemble(nets, list(members), config["weights"])


def _build_net(config: dict, *, key) -> _Net:
    import flowjax.distributions as fd
    import flowjax.flows as ff
    from flowjax.bijections import RationalQuadraticSpline

    k_emb, k_head = jax.random.split(key)
    embedding = make_embedding(config["embedding"], tuple(config["x_shape"]), key=k_emb,
                               dim=config["embedding_dim"], points=config.get("set_points"))
    dim, head, width = config["dim_theta"], config["head"], config["hidden"]
    if head == "gmm":
        net_head = MixtureHead(embedding.out_dim, dim, config["n_components"], width, key=k_head)
    elif head == "nsf":
        net_head = ff.coupling_flow(
            k_head, base_dist=fd.Normal(jnp.zeros(dim)), cond_dim=embedding.out_dim,
            transformer=RationalQuadraticSpline(knots=config["knots"], interval=5.0),
            flow_layers=config["flow_layers"], nn_width=width, nn_depth=2,
            invert=False)  # measured: sampling twice as fast, log_prob no slower
    else:
        net_head = ff.masked_autoregressive_flow(
            k_head, base_dist=fd.Normal(jnp.zeros(dim)), cond_dim=embedding.out_dim,
            flow_layers=config["flow_layers"], nn_width=width, nn_depth=2)
    return _Net(embedding, net_head, head)


def _maf_layout_of(net: _Net | _Ensemble) -> MAFLayout | None:
    """The layout shared by the masked autoregressive flows in `net` (None: sample them with
    flowjax's own one-pass-per-dimension inverse)."""
    mafs = [g.head for g in getattr(net, "groups", (net,)) if g.kind == "maf"]
    layouts = {maf_layout(m) for m in mafs}
    return layouts.pop() if len(layouts) == 1 else None


# -- the posterior --------------------------------------------------------------------------------


@eqx.filter_jit
def _sample_theta(net, stats, transform, key, xz, n, layout):
    z = net.sample(key, n, xz, layout)
    return transform(stats["theta_mean"] + stats["theta_std"] * z)


class NPEPosterior:
    """q(theta | x_obs) for one observation: ``sample(key, n)`` and ``log_prob(theta)``.

    Attributes:
        x_obs: the observation conditioned on.
    """

    def __init__(self, estimator: NPEEstimator, x_obs: jax.Array):
        self._est = estimator
        self.x_obs = x_obs
        self._xz = (x_obs - estimator.stats["x_mean"]) / estimator.stats["x_std"]

    @property
    def dim(self) -> int:
        return self._est.dim_theta

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """n draws (n, dim theta), all inside the prior's support, in one compiled call."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected a positive integer; got {n!r}")
        from flashbayes.reference._cache import ensure_disk_cache

        # compiled samplers are kept on disk between processes (the reference engines' cache,
        # `flashbayes.reference.set_compilation_cache`): compiling the default ten-network
        # sampler takes 20-35 s in 10-D, loading it a fraction of that
        ensure_disk_cache()
        est = self._est
        return _sample_theta(est.net, est.stats, est._transform, key, self._xz, int(n),
                             est._maf_layout)

    def log_prob(self, theta: Any) -> jax.Array:
        """log q(theta | x_obs) for theta (..., dim theta); -inf outside the prior's support."""
        theta = jnp.asarray(theta, jnp.float32)
        if theta.shape[-1:] != (self.dim,):
            raise ValueError(f"theta: expected shape (..., {self.dim}); got {theta.shape}")
        flat = theta.reshape(-1, self.dim)
        out = _log_prob_theta(self._est.net, self._est.stats, self._est._transform, self._xz,
                              flat, self._est.support["kind"] != "real")
        return out.reshape(theta.shape[:-1])

    def mean(self, key: jax.Array | None = None, n: int = 10_000) -> jax.Array:
        """Monte Carlo mean from n draws (key defaults to ``jax.random.key(0)``)."""
        return self.sample(jax.random.key(0) if key is None else key, n).mean(0)

    def cov(self, key: jax.Array | None = None, n: int = 10_000) -> jax.Array:
        """Monte Carlo covariance from n draws (key defaults to ``jax.random.key(0)``)."""
        return jnp.cov(self.sample(jax.random.key(0) if key is None else key, n).T)

    def unbounded_gmm(self) -> GMM:
        """For the ``"gmm"`` head: the mixture over the unbounded parameters u (theta = T(u))."""
        est = self._est
        if est.config["head"] != "gmm":
            raise ValueError(f"unbounded_gmm: expected an estimator with head 'gmm'; got "
                             f"{est.config['head']!r}")
        net = est.net
        g = net.gmm(self._xz) if isinstance(net, _Ensemble) else net.head(net.embedding(self._xz))
        s, m = est.stats["theta_std"], est.stats["theta_mean"]
        return GMM.unchecked(g.weights, m + s * g.means, s[:, None] * g.scale_tril)


@eqx.filter_jit
def _log_prob_theta(net, stats, transform, xz, theta, bounded):
    inside = _in_support(transform.spec, theta) if bounded else jnp.ones(theta.shape[0], bool)
    safe = jnp.where(inside[:, None], theta, transform.safe_point)
    u = transform.inverse(safe)
    z = (u - stats["theta_mean"]) / stats["theta_std"]
    lp = jax.vmap(net.log_prob, (0, None))(z, xz) - jnp.sum(jnp.log(stats["theta_std"]))
    lp = lp - transform.log_det(u)
    return jnp.where(inside, lp, -jnp.inf)


class _Transform(eqx.Module):
    """The support bijection with the pieces the compiled functions need."""

    spec: dict = eqx.field(static=False)
    safe_point: jax.Array

    def __init__(self, spec: dict):
        self.spec = {k: (jnp.asarray(v, jnp.float32) if isinstance(v, list) else v)
                     for k, v in spec.items()}
        if spec["kind"] == "interval":
            self.safe_point = 0.5 * (self.spec["lower"] + self.spec["upper"])
        elif spec["kind"] == "greater_than":
            self.safe_point = self.spec["lower"] + 1.0
        else:
            self.safe_point = jnp.zeros(())

    def _t(self):
        return _bijection({k: v for k, v in self.spec.items()})

    def __call__(self, u):
        theta = self._t()(u)
        # far in the tails the map rounds onto the boundary in float32: keep draws strictly inside
        if self.spec["kind"] != "real":
            lower = self.spec["lower"].astype(theta.dtype)
            # (next to 0 is a denormal, which XLA on CPU flushes to 0: the smallest normal)
            above = jnp.where(lower == 0, jnp.finfo(theta.dtype).tiny,
                              jnp.nextafter(lower, jnp.inf))
            theta = jnp.maximum(theta, above)
        if self.spec["kind"] == "interval":
            upper = self.spec["upper"].astype(theta.dtype)
            theta = jnp.minimum(theta, jnp.nextafter(upper, -jnp.inf))
        return theta

    def inverse(self, theta):
        return self._t().inv(theta)

    def log_det(self, u):
        t = self._t()
        return t.log_abs_det_jacobian(u, t(u))


# -- the estimator --------------------------------------------------------------------------------


@dataclass(frozen=True)
class NPEEvent:
    """What the progress callback receives after each epoch."""

    epoch: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    epochs_without_improvement: int
    done: bool
    member: int = 0


class NPEEstimator:
    """A trained NPE network with the bijection and z-scoring around it.

    Use `posterior` to condition on an observation, `save` / `load_npe` to keep it.

    Attributes:
        config: the JSON description (head, embedding, sizes, support, training summary).
        history: per-epoch (train loss, validation loss).
    """

    def __init__(self, net: _Net | _Ensemble, stats: dict, config: dict,
                 history: list | None = None):
        self.net = net
        self.stats = {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}
        self.config = config
        self.history = history or []
        self._transform = _Transform(config["support"])

    @functools.cached_property
    def _maf_layout(self) -> MAFLayout | None:
        # on the first draw, not per estimator: training builds one for every checkpoint
        return _maf_layout_of(self.net)

    @property
    def dim_theta(self) -> int:
        return int(self.config["dim_theta"])

    @property
    def x_shape(self) -> tuple[int, ...]:
        return tuple(self.config["x_shape"])

    @property
    def support(self) -> dict:
        return self.config["support"]

    @property
    def parameter_names(self) -> list[str]:
        return list(self.config["parameter_names"])

    def posterior(self, x_obs: Any) -> NPEPosterior:
        """The posterior for one observation of shape `x_shape`.

        Raises:
            ValueError: x_obs has the wrong shape or is not finite.
        """
        x = np.asarray(x_obs, dtype=np.float64)
        if x.shape != self.x_shape:
            raise ValueError(f"x_obs: expected shape {self.x_shape}; got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("x_obs: expected finite values; got NaN or inf")
        return NPEPosterior(self, jnp.asarray(x, jnp.float32))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the estimator atomically (safetensors + JSON header)."""
        from flashbayes.amortized._checkpoint import save_checkpoint

        header = {"kind": _KIND, "config": self.config, "history": self.history}
        return save_checkpoint(path, header, {"net": eqx.filter(self.net, eqx.is_array),
                                              "stats": self.stats})


def load_npe(path: str | os.PathLike) -> NPEEstimator:
    """Read an estimator written by `NPEEstimator.save` (or a ``train_npe`` checkpoint folder).

    Raises:
        CheckpointError: the file is missing, malformed or not an NPE checkpoint.
    """
    from flashbayes.amortized._checkpoint import CheckpointError, load_tree, read_header

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    header = read_header(path)
    if header.get("kind") != _KIND:
        raise CheckpointError(f"checkpoint: expected an NPE checkpoint (kind 'npe'); got kind "
                              f"{header.get('kind')!r} in {path}")
    config = header["config"]
    skeleton = _build_model(config, key=jax.random.key(0))
    arrays, static = eqx.partition(skeleton, eqx.is_array)
    net = eqx.combine(load_tree(path, "net", arrays), static)
    like = {k: np.zeros(config["stats_shapes"][k], np.float32) for k in config["stats_shapes"]}
    stats = load_tree(path, "stats", like)
    return NPEEstimator(net, stats, config, header.get("history"))


# -- training -------------------------------------------------------------------------------------


def _training_pairs(prior, source, num_simulations, key):
    """(theta, x) float32 arrays of the successful simulations, and the x shape."""
    from flashbayes.sbi._simulate import Simulations, simulate

    if isinstance(source, Simulations):
        theta, x = source.valid()
    elif isinstance(source, tuple) and len(source) == 2:
        theta, x = (np.asarray(a) for a in source)
        if theta.ndim != 2 or len(theta) != len(x):
            raise ValueError(f"simulations: expected (theta (n, d), x (n, ...)); got shapes "
                             f"{theta.shape} and {x.shape}")
        ok = np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)
        theta, x = theta[ok], x[ok]
    elif callable(source):
        if num_simulations is None:
            raise ValueError("num_simulations: expected a positive integer with a simulator; got "
                             "None")
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        theta, x = simulate(prior, source, int(num_simulations), seed=seed,
                            backend="jax").valid()
    else:
        raise TypeError(f"simulator_or_simulations: expected a simulator(key, theta), a "
                        f"Simulations or a (theta, x) pair; got {type(source).__name__}")
    if num_simulations is not None and not callable(source):
        if num_simulations > len(theta):
            raise ValueError(f"num_simulations: expected at most the {len(theta)} successful "
                             f"simulations given; got {num_simulations}")
        theta, x = theta[:num_simulations], x[:num_simulations]
    theta = np.asarray(theta, np.float32).reshape(len(theta), -1)
    x = np.asarray(x, np.float32)
    if x.ndim == 1:
        x = x[:, None]
    return theta, x


def _z_stats(values: np.ndarray, axes: tuple[int, ...]):
    mean = values.mean(axis=axes, keepdims=True)[0]
    std = values.std(axis=axes, keepdims=True)[0]
    return mean, np.where(std < 1e-8, 1.0, std)


def train_npe(prior: Any, simulator_or_simulations: Any, num_simulations: int | None = None, *,
              key: jax.Array, head: str = "nsf+maf",
              embedding: str = "identity", embedding_dim: int = 32,
              set_points: int | None = None, n_components: int = 10, hidden: int = 50,
              flow_layers: int = 5, knots: int = 10,
              validation_fraction: float = 0.1, max_epochs: int = 1000, patience: int = 20,
              batch_size: int = 200, learning_rate: float = 5e-4, lr_reductions: int = 2,
              ensemble: int = 5, interval_map: str = "flat", interval_width: float = 8.0,
              parameter_names: list[str] | None = None,
              out_dir: str | os.PathLike | None = None,
              callback: Callable[[NPEEvent], Any] | None = None) -> NPEEstimator:
    """Train q(theta | x) on simulations from `prior` and a simulator.

    Args:
        prior: a NumPyro distribution over theta (d,) (its support selects the bijection).
        simulator_or_simulations: a JAX ``simulator(key, theta) -> x`` of one theta (then
            `num_simulations` are run), a `Simulations` (only its successful rows are used) or a
            pair of arrays (theta (n, d), x (n, ...); rows with non-finite x are dropped).
        num_simulations: the budget (required with a simulator; with stored simulations, the
            first this many successful ones).
        key: PRNG key (simulations, split, initial weights, batches).
        head: ``"nsf"`` (neural spline coupling flow), ``"maf"`` (masked autoregressive flow),
            ``"gmm"`` (mixture density network giving a `GMM` in the unbounded space; less
            accurate than the flows at small budgets), or several joined by ``"+"``. The default
            ``"nsf+maf"`` trains `ensemble` networks of each and mixes them (see `ensemble`).
        embedding: ``"identity"``, ``"mlp"``, ``"set"`` or ``"series"`` (see `make_embedding`).
        set_points: with ``embedding="set"`` and flat observations (m p,) that hold m i.i.d.
            points one after another (as sbibm's slcp does), m: the points are z-scored with
            shared statistics and summarised in any order.
        embedding_dim, n_components, hidden, flow_layers, knots: network sizes.
        validation_fraction: share of the simulations held out for early stopping.
        max_epochs, patience: stop after `max_epochs`, or after `patience` epochs without a
            better validation loss; the best weights are kept.
        lr_reductions: before stopping, this many times go back to the best weights and go on
            with the learning rate cut by 5 (a fresh Adam state); stop at the last one.
        ensemble: networks trained per head (different initial weights and batch orders, the
            same simulations and split). With more than one network in all, the posterior is
            their mixture, weighted to maximise the validation split's log density (stacking,
            by EM on the weights); networks with weight below 1e-3 are dropped.
        batch_size, learning_rate: Adam on minibatches (gradient norm clipped at 5).
        interval_map: for a prior on a box, the bijection from R^d onto it: ``"logit"``
            (logistic per coordinate) or ``"flat"`` (linear on the box but for its edges, where
            it bends like a logistic; `interval_width` c sets how far: the linear part spans
            about u in (-c + 3, c - 3) before z-scoring). Ignored for other supports.
        parameter_names: names of the theta coordinates (kept in the checkpoint).
        out_dir: if given, the best estimator so far is written to ``out_dir/npe.safetensors``
            (atomically) whenever the validation loss improves.
        callback: receives an `NPEEvent` after every epoch.

    Returns:
        the trained `NPEEstimator`.
    """
    heads = head.split("+") if isinstance(head, str) else []
    if not heads or any(h not in HEADS for h in heads) or len(set(heads)) != len(heads):
        raise ValueError(f"head: expected one of {list(HEADS)} or several joined by '+' (e.g. "
                         f"'nsf+maf'); got {head!r}")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding: expected one of {list(EMBEDDINGS)}; got {embedding!r}")
    if set_points is not None and embedding != "set":
        raise ValueError(f"set_points: only with embedding='set'; got embedding {embedding!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction: expected a number in (0, 1); got "
                         f"{validation_fraction!r}")
    for name, value in (("max_epochs", max_epochs), ("patience", patience),
                        ("batch_size", batch_size), ("ensemble", ensemble)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer; got {value!r}")
    if isinstance(lr_reductions, bool) or not isinstance(lr_reductions, int) or lr_reductions < 0:
        raise ValueError(f"lr_reductions: expected a non-negative integer; got {lr_reductions!r}")
    if interval_map not in INTERVAL_MAPS:
        raise ValueError(f"interval_map: expected one of {list(INTERVAL_MAPS)}; got "
                         f"{interval_map!r}")
    if (isinstance(interval_width, bool) or not isinstance(interval_width, numbers.Real)
            or not 2.0 <= float(interval_width) <= 40.0):
        raise ValueError(f"interval_width: expected a number in [2, 40]; got {interval_width!r}")
    k_sim, k_split, k_init, k_train = jax.random.split(key, 4)
    theta, x = _training_pairs(prior, simulator_or_simulations, num_simulations, k_sim)
    n, dim = theta.shape
    n_val = max(1, int(round(validation_fraction * n)))
    if n - n_val < 2:
        raise ValueError(f"simulations: expected at least {n_val + 2} successful simulations; "
                         f"got {n}")
    support = _support_spec(prior, dim)
    if support["kind"] == "interval" and interval_map == "flat":
        support = {**support, "map": "flat", "width": float(interval_width)}
    transform = _Transform(support)
    inside = np.asarray(_in_support(support, jnp.asarray(theta))) if support["kind"] != "real" \
        else np.ones(n, bool)
    if not inside.all():
        raise ValueError(f"simulations: expected theta inside the prior's support; got "
                         f"{int((~inside).sum())} rows outside")
    u = np.asarray(transform.inverse(jnp.asarray(theta)), np.float32)
    perm = np.asarray(jax.random.permutation(k_split, n))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    theta_mean, theta_std = _z_stats(u[train_idx], (0,))
    if set_points is not None:  # z-score the points with shared statistics, kept flat
        set_features(tuple(x.shape[1:]), set_points)  # refuses shapes without whole points
        pts = x[train_idx].reshape(len(train_idx), set_points, -1)
        x_mean, x_std = (np.tile(v.reshape(-1), set_points) for v in _z_stats(pts, (0, 1)))
    else:
        x_axes = (0, 1) if embedding == "set" else (0,)
        x_mean, x_std = _z_stats(x[train_idx], x_axes)
    stats = {"theta_mean": theta_mean, "theta_std": theta_std, "x_mean": x_mean, "x_std": x_std}
    z_all = (u - theta_mean) / theta_std
    xz_all = (x - x_mean) / x_std
    names = list(parameter_names) if parameter_names is not None else \
        [f"theta_{i + 1}" for i in range(dim)]
    if len(names) != dim:
        raise ValueError(f"parameter_names: expected {dim} names; got {len(names)}")
    config = {"head": head, "embedding": embedding, "embedding_dim": embedding_dim,
              **({"set_points": int(set_points)} if set_points is not None else {}),
              "n_components": n_components, "hidden": hidden, "flow_layers": flow_layers,
              "knots": knots, "dim_theta": dim, "x_shape": list(x.shape[1:]),
              "support": support, "parameter_names": names,
              "stats_shapes": {k: list(np.shape(v)) for k, v in stats.items()},
              "num_simulations": int(n), "num_validation": int(n_val)}
    train = (jnp.asarray(z_all[train_idx]), jnp.asarray(xz_all[train_idx]))
    val = (jnp.asarray(z_all[val_idx]), jnp.asarray(xz_all[val_idx]))
    out_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    fit = _Fit(train, val, batch_size=batch_size, learning_rate=learning_rate,
               lr_reductions=lr_reductions, patience=patience, max_epochs=max_epochs)
    plan = [h for h in heads for _ in range(ensemble)]
    nets, histories, bests, val_lps = [], [], [], []
    for m, h in enumerate(plan):
        def save_best(net, history, epoch):
            if out_path is not None and len(plan) == 1:
                NPEEstimator(net, stats, {**config, "epochs": epoch}, history).save(out_path)

        net = _build_net({**config, "head": h}, key=jax.random.fold_in(k_init, m))
        first = plan.index(h)
        if first < m:
            net = _like(net, nets[first])  # shares the compiled training step
        net, history, best = fit(net, jax.random.fold_in(k_train, m), member=m,
                                 callback=callback, on_best=save_best)
        nets.append(net)
        histories.append(history)
        bests.append(best)
        if len(plan) > 1:  # for the stacking weights
            val_lps.append(np.asarray(_pointwise_log_prob(net, *val)))
        if len(plan) > 1 and (out_path is not None or m == len(plan) - 1):
            # the members finished so far, weighted by stacking on the validation split
            w = _stacking_weights(np.stack(val_lps))
            keep = [i for i in range(len(w)) if w[i] >= MIN_MEMBER_WEIGHT]
            w_keep = w[keep] / w[keep].sum()
            model = _ensemble([nets[i] for i in keep], [plan[i] for i in keep], w_keep)
            mix = _mixture_loss(np.stack([val_lps[i] for i in keep]), w_keep)
            est = NPEEstimator(model, stats, {
                **config, "members": [plan[i] for i in keep], "weights": w_keep.tolist(),
                "trained_members": plan[: m + 1], "stacking_weights": w.tolist(),
                "epochs": [len(hh) for hh in histories], "member_val_loss": bests,
                "best_val_loss": mix}, histories)
            if out_path is not None and m < len(plan) - 1:
                est.save(out_path)
    if len(plan) == 1:
        est = NPEEstimator(nets[0], stats, {**config, "epochs": len(histories[0]),
                                            "best_val_loss": bests[0]}, histories[0])
    if out_path is not None:
        est.save(out_path)
    return est


@eqx.filter_jit
def _pointwise_log_prob(net, z, xz):
    return jax.vmap(net.log_prob)(z, xz)


def _batch_loss(p, rest, zb, xb):
    model = eqx.combine(p, rest)
    return -jnp.mean(jax.vmap(model.log_prob)(zb, xb))


@eqx.filter_jit
def _epoch(p, rest, state, k, tz, tx, lr, optimiser, n_batches: int, bs: int):
    """One pass over the training set in minibatches (compiled once per architecture)."""
    order = jax.random.permutation(k, tz.shape[0])[: n_batches * bs]

    def step(carry, idx):
        p, state = carry
        loss, grads = jax.value_and_grad(_batch_loss)(p, rest, tz[idx], tx[idx])
        updates, state = optimiser.update(grads, state, p)
        updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
        return (optax.apply_updates(p, updates), state), loss

    (p, state), losses = jax.lax.scan(step, (p, state), order.reshape(n_batches, bs))
    return p, state, jnp.mean(losses)


@eqx.filter_jit
def _validation_loss(p, rest, vz, vx):
    chunks = max(1, math.ceil(vz.shape[0] / 4096))
    return jnp.sum(jnp.stack([
        _batch_loss(p, rest, vz[i::chunks], vx[i::chunks]) * vz[i::chunks].shape[0]
        for i in range(chunks)])) / vz.shape[0]


class _Fit:
    """Adam on minibatches with early stopping (and optional learning-rate cuts) for one net."""

    def __init__(self, train, val, *, batch_size, learning_rate, lr_reductions, patience,
                 max_epochs):
        self.train, self.val = train, val
        self.lr, self.reductions, self.patience = learning_rate, lr_reductions, patience
        self.max_epochs = max_epochs
        self.bs = min(batch_size, train[0].shape[0])
        self.optimiser = optax.chain(optax.clip_by_global_norm(5.0), optax.scale_by_adam())

    def __call__(self, net, key, *, member, callback, on_best):
        import paramax

        params, rest = eqx.partition(
            net, eqx.is_inexact_array, is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable))
        optimiser = self.optimiser
        n_batches = self.train[0].shape[0] // self.bs

        def epoch(p, state, k, tz, tx, lr):
            return _epoch(p, rest, state, k, tz, tx, lr, optimiser, n_batches, self.bs)

        def validation_loss(p, vz, vx):
            return _validation_loss(p, rest, vz, vx)

        opt_state = optimiser.init(params)
        best, best_params, stale, history = float(validation_loss(params, *self.val)), params, 0, []
        lr, reductions_left = float(self.lr), self.reductions
        for ep in range(1, self.max_epochs + 1):
            params, opt_state, train_loss = epoch(params, opt_state, jax.random.fold_in(key, ep),
                                                  *self.train, jnp.float32(lr))
            val = float(validation_loss(params, *self.val))
            history.append([float(train_loss), val])
            if np.isfinite(val) and val < best:
                best, best_params, stale = val, params, 0
                on_best(eqx.combine(best_params, rest), history, ep)
            else:
                stale += 1
            if stale >= self.patience and reductions_left > 0 and ep < self.max_epochs:
                params, opt_state, stale = best_params, optimiser.init(best_params), 0
                lr, reductions_left = lr / 5.0, reductions_left - 1
            done = stale >= self.patience or ep == self.max_epochs
            if callback is not None:
                callback(NPEEvent(ep, float(train_loss), val, best, stale, done, member))
            if done:
                break
        return eqx.combine(best_params, rest), history, best
