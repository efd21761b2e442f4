"""A prior-data fitted network (PFN): (context points, query inputs) -> predictive density of y*
at every query, in one forward pass, as a bar (Riemann) distribution or, with the "gmm" head (the
Distribution Transformer variant), as a Gaussian mixture per query point.

Context tokens embed (x, y); query tokens embed x only. In every layer all tokens attend to the
context tokens (plus one learned null token) and to nothing else, so context points are an
unordered set and query points are answered independently of each other. Unbatched core; batch
with `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from flashbayes._padding import size_bucket
from flashbayes.amortized._checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_tree,
    read_header,
)
from flashbayes.amortized._dt import _MLP, ConfigDict
from flashbayes.distributions._bar import BarDistribution, bar_borders
from flashbayes.distributions._mixture import GaussianMixturePredictive

HEADS = ("bar", "gmm")
_SOFTPLUS_ONE = 0.5413248546129181  # softplus(x) = 1
_GH_NODES = 24  # Gauss-Hermite nodes of the gmm head's expected log density


@dataclasses.dataclass(frozen=True)
class PFNConfig(ConfigDict):
    """Architecture of a PFN.

    Attributes:
        x_dim: D, dimension of the inputs.
        borders: the K + 1 bucket borders of the output bar distribution (a tuple of floats).
        d_model: token width.
        n_layers: attention + MLP blocks.
        n_heads: attention heads.
        mlp_ratio: hidden width of the MLPs as a multiple of d_model.
        x_low, x_high: the input box the network is trained on; inputs are mapped to [-1, 1].
        head: "bar" (a Riemann distribution over the buckets of `borders`) or "gmm" (a Gaussian
            mixture of `n_components` per query point: the Distribution Transformer variant,
            whose answer feeds the rest of the library as `fb.GMM`s). With "gmm" the borders
            only set the location and scale of y.
        n_components: mixture components of the "gmm" head.
        y_standardize: read y in a frame of each data set's own (the "context frame"): the
            context values are shifted and scaled by their mean and standard deviation, each
            shrunk toward the prior predictive's (`y_prior_mean`, `y_prior_sd`) by one
            pseudo-point; the head answers in that frame (the borders are in its units) and
            the predictive is mapped back exactly. The frame's location and log scale are
            also fed to the network. False: one fixed frame from the borders.
        y_prior_mean, y_prior_sd: mean and standard deviation of the prior predictive of y
            (the pseudo-point of `y_standardize`).
        distance_bias: add to each attention head's logits -w_h |x - x'|^2, the squared
            distance between a token's input and a context point's (in the network's [-1, 1]
            units; 0 for the null token), with a learned width w_h per head and block. The
            heads start at lengthscales spread from 0.02 to 0.4 of the input box, so a head can
            read the context near a point the way a kernel smoother does. False: attention by
            content only.
    """

    x_dim: int
    borders: tuple[float, ...]
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 2
    x_low: float = 0.0
    x_high: float = 1.0
    head: str = "bar"
    n_components: int = 10
    y_standardize: bool = False
    y_prior_mean: float = 0.0
    y_prior_sd: float = 1.0
    distance_bias: bool = False

    _what = "PFN config"

    def __post_init__(self):
        object.__setattr__(self, "borders", tuple(float(b) for b in self.borders))
        b = np.asarray(self.borders)
        if b.ndim != 1 or b.size < 4 or not np.all(np.diff(b) > 0):
            raise ValueError(f"borders: expected at least 4 increasing values; got {b.size} "
                             f"values")
        if self.head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}; got {self.head!r}")
        for name in ("x_dim", "d_model", "n_layers", "n_heads", "mlp_ratio", "n_components"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer; got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={self.n_heads}; got "
                             f"{self.d_model}")
        for name in ("y_standardize", "distance_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false; got "
                                 f"{getattr(self, name)!r}")
        if not (np.isfinite(self.y_prior_mean) and np.isfinite(self.y_prior_sd)
                and self.y_prior_sd > 0):
            raise ValueError(f"y_prior_mean, y_prior_sd: expected finite values and a positive "
                             f"sd; got {self.y_prior_mean}, {self.y_prior_sd}")
        if not self.x_high > self.x_low:
            raise ValueError(f"x_low, x_high: expected x_low < x_high; got {self.x_low}, "
                             f"{self.x_high}")

    @property
    def n_buckets(self) -> int:
        return len(self.borders) - 1

    @property
    def n_outputs(self) -> int:
        """Width of the head's output per query point."""
        return self.n_buckets if self.head == "bar" else 3 * self.n_components

    def y_location_scale(self) -> tuple[float, float]:
        """Median and a robust standard deviation of y implied by the borders (which are prior
        quantiles; in the context frame's units with `y_standardize`): used to standardise the
        context values fed to the network."""
        b = np.asarray(self.borders)
        k = self.n_buckets
        return float(b[k // 2]), float((b[(3 * k) // 4] - b[k // 4]) / 1.349)


def context_frame(config: PFNConfig, context_y: Array, cmask: Array) -> tuple[Array, Array]:
    """The location and scale of a data set's own frame for y (`PFNConfig.y_standardize`):
    mean and standard deviation of the context values with one pseudo-point at the prior
    predictive's mean and variance, loc = (sum y + m0) / (n + 1) and
    scale^2 = (sum (y - loc)^2 + (m0 - loc)^2 + s0^2) / (n + 1). Without `y_standardize`:
    (0, 1).

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> cfg = PFNConfig(x_dim=1, borders=tuple(np.linspace(-3, 3, 11)), y_standardize=True,
        ...                 y_prior_mean=0.0, y_prior_sd=1.0)
        >>> loc, scale = context_frame(cfg, jnp.array([2.0, 4.0, 9.0]),
        ...                            jnp.array([True, True, False]))
        >>> round(float(loc), 4), round(float(scale), 4)
        (2.0, 1.7321)
    """
    if not config.y_standardize:
        return jnp.zeros((), context_y.dtype), jnp.ones((), context_y.dtype)
    w = cmask.astype(context_y.dtype)
    n = jnp.sum(w)
    loc = (jnp.sum(w * context_y) + config.y_prior_mean) / (n + 1.0)
    ss = (jnp.sum(w * (context_y - loc) ** 2) + (config.y_prior_mean - loc) ** 2
          + config.y_prior_sd ** 2)
    return loc, jnp.sqrt(ss / (n + 1.0))


class _Block(eqx.Module):
    ln_q: eqx.nn.LayerNorm
    ln_kv: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln_mlp: eqx.nn.LayerNorm
    mlp: _MLP
    log_width: Array | None

    def __init__(self, d: int, heads: int, ratio: int, *, key: Array,
                 distance_bias: bool = False):
        k1, k2 = jax.random.split(key)
        self.ln_q = eqx.nn.LayerNorm(d)
        self.ln_kv = eqx.nn.LayerNorm(d)
        self.attn = eqx.nn.MultiheadAttention(heads, d, key=k1)
        self.ln_mlp = eqx.nn.LayerNorm(d)
        self.mlp = _MLP([d, ratio * d, d], key=k2)
        # widths w = 1 / (2 (2 l)^2) for lengthscales l from 0.02 to 0.4 of the input box (the
        # network's units span 2 boxes' widths)
        self.log_width = (-jnp.log(8.0 * jnp.geomspace(0.02, 0.4, heads) ** 2)
                          if distance_bias else None)

    def _biased_attention(self, q, kv, mask, d2):
        """Multi-head attention of rows `q` over `kv` with -w_h d2 added to head h's logits
        (the projections are the `attn` module's)."""
        a = self.attn
        heads = a.num_heads
        qh = jax.vmap(a.query_proj)(q).reshape(q.shape[0], heads, -1)
        kh = jax.vmap(a.key_proj)(kv).reshape(kv.shape[0], heads, -1)
        vh = jax.vmap(a.value_proj)(kv).reshape(kv.shape[0], heads, -1)
        logits = (jnp.einsum("rhd,chd->hrc", qh, kh) / np.sqrt(qh.shape[-1])
                  - jnp.exp(self.log_width)[:, None, None] * d2[None])
        logits = jnp.where(mask[None], logits, jnp.finfo(logits.dtype).min)
        w = jax.nn.softmax(logits, -1)
        out = jnp.einsum("hrc,chd->rhd", w, vh).reshape(q.shape[0], -1)
        return jax.vmap(a.output_proj)(out)

    def __call__(self, tok, n_ctx, kv_mask, first_row: int = 0, d2=None):
        """tok: (1 + N + M, d): null token, context tokens, query tokens. Keys and values are
        the null and context tokens only. Returns the updated rows from `first_row` on (the
        last block updates the query tokens only: nothing reads the context tokens after
        it). d2: (1 + N + M, 1 + N) squared distances of the rows' inputs to the keys'
        (`distance_bias` only)."""
        kv = jax.vmap(self.ln_kv)(tok[:n_ctx])
        tok = tok[first_row:]
        q = jax.vmap(self.ln_q)(tok)
        mask = jnp.broadcast_to(kv_mask[None, :], (tok.shape[0], n_ctx))
        if self.log_width is None:
            tok = tok + self.attn(q, kv, kv, mask=mask)
        else:
            tok = tok + self._biased_attention(q, kv, mask, d2[first_row:])
        return tok + jax.vmap(self.mlp)(jax.vmap(self.ln_mlp)(tok))


class PFN(eqx.Module):
    """The network. `__call__` returns the head's raw (M, n_outputs) output: K bucket logits
    (bar head) or 3 K mixture parameters (gmm head); `predictive` the distribution.

    The output layer's weights start at zero. Bar head: an untrained network gives every bucket
    the same probability, which (the borders being prior quantiles) is the prior predictive of
    y. Gmm head: equal weights and unit-scale components spread over +-1.5 prior standard
    deviations, distinct so that training can separate them.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> cfg = PFNConfig(x_dim=1, borders=tuple(np.linspace(-3, 3, 11)), d_model=16,
        ...                 n_layers=1)
        >>> net = PFN(cfg, key=jax.random.key(0))
        >>> cx, cy = jnp.array([[0.2], [0.7]]), jnp.array([0.1, -0.3])
        >>> bar = net.predictive(cx, cy, jnp.ones(2, bool), jnp.array([[0.5], [0.9], [0.1]]))
        >>> bar.log_prob(jnp.zeros(3)).shape
        (3,)
    """

    config: PFNConfig = eqx.field(static=True)
    x_embed: _MLP
    y_embed: eqx.nn.Linear
    query_token: Array
    null_token: Array
    blocks: list
    ln_out: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    frame_embed: eqx.nn.Linear | None

    def __init__(self, config: PFNConfig, *, key: Array):
        dm = config.d_model
        keys = jax.random.split(key, 5 + config.n_layers)
        self.config = config
        self.x_embed = _MLP([config.x_dim, dm, dm], key=keys[0])
        self.y_embed = eqx.nn.Linear(1, dm, key=keys[1])
        self.frame_embed = None
        if config.y_standardize:  # starts at zero: the frame is an input the network may learn
            frame = eqx.nn.Linear(2, dm, key=jax.random.fold_in(keys[1], 1))
            self.frame_embed = eqx.tree_at(lambda f: (f.weight, f.bias), frame,
                                           (jnp.zeros_like(frame.weight),
                                            jnp.zeros_like(frame.bias)))
        self.query_token = 0.02 * jax.random.normal(keys[2], (dm,))
        self.null_token = 0.02 * jax.random.normal(keys[3], (dm,))
        self.blocks = [_Block(dm, config.n_heads, config.mlp_ratio, key=k,
                              distance_bias=config.distance_bias)
                       for k in keys[5:]]
        self.ln_out = eqx.nn.LayerNorm(dm)
        head = eqx.nn.Linear(dm, config.n_outputs, key=keys[4])
        bias = jnp.zeros_like(head.bias)
        if config.head == "gmm":  # equal weights, unit scales, means spread over +-1.5 sd
            k = config.n_components
            bias = bias.at[k:2 * k].set(jnp.linspace(-1.5, 1.5, k))
        self.head = eqx.tree_at(lambda h: (h.weight, h.bias), head,
                                (jnp.zeros_like(head.weight), bias))

    def __call__(self, context_x: Float[Array, "N D"], context_y: Float[Array, " N"],
                 cmask: Bool[Array, " N"], query_x: Float[Array, "M D"]) -> Float[Array, "M K"]:
        cfg = self.config
        y_loc, y_scale = cfg.y_location_scale()

        def unit(x):
            return 2.0 * (x - cfg.x_low) / (cfg.x_high - cfg.x_low) - 1.0

        f_loc, f_scale = context_frame(cfg, context_y, cmask)
        cy = jnp.where(cmask, ((context_y - f_loc) / f_scale - y_loc) / y_scale, 0.0)
        ctx = (jax.vmap(self.x_embed)(unit(context_x))
               + jax.vmap(self.y_embed)(cy[:, None]))
        qry = jax.vmap(self.x_embed)(unit(query_x)) + self.query_token
        tok = jnp.concatenate([self.null_token[None], ctx, qry], 0)
        if self.frame_embed is not None:
            tok = tok + self.frame_embed(jnp.stack([
                (f_loc - cfg.y_prior_mean) / cfg.y_prior_sd, jnp.log(f_scale / cfg.y_prior_sd)]))
        n_ctx = 1 + context_x.shape[0]
        kv_mask = jnp.concatenate([jnp.ones((1,), bool), cmask])
        d2 = None
        if cfg.distance_bias:  # the null token (row and column 0) is at distance 0 from all
            rows = jnp.concatenate([jnp.zeros((1, cfg.x_dim)), unit(context_x),
                                    unit(query_x)], 0)
            d2 = jnp.sum((rows[:, None, :] - rows[None, :n_ctx, :]) ** 2, -1)
            d2 = d2.at[0].set(0.0).at[:, 0].set(0.0)
        for block in self.blocks[:-1]:
            tok = block(tok, n_ctx, kv_mask, d2=d2)
        tok = self.blocks[-1](tok, n_ctx, kv_mask, first_row=n_ctx, d2=d2)
        return jax.vmap(lambda t: self.head(self.ln_out(t)))(tok)

    def predictive(self, context_x, context_y, cmask, query_x):
        """The predictive of y* at each of the M query points: a bar distribution (batch shape
        (M,)) or, for the "gmm" head, a `GaussianMixturePredictive` over M points."""
        return self.distribution(self(context_x, context_y, cmask, query_x),
                                 *context_frame(self.config, context_y, cmask))

    def _gmm_parts(self, out, y_shift=0.0, y_scale=1.0):
        """(log weights, means, standard deviations), each (M, K), from the gmm head, mapped to
        other units by y = y_shift + y_scale * y (a data set's `context_frame`, users' units)."""
        k = self.config.n_components
        loc, scale = self.config.y_location_scale()
        logw = jax.nn.log_softmax(out[..., :k], -1)
        mu = y_shift + y_scale * (loc + scale * out[..., k:2 * k])
        sd = y_scale * scale * (jax.nn.softplus(out[..., 2 * k:] + _SOFTPLUS_ONE) + 1e-3)
        return logw, mu, sd

    def distribution(self, out, y_shift=0.0, y_scale=1.0):
        """The predictive from the head's output `out` (M, n_outputs), mapped to other units by
        y = y_shift + y_scale * y (exactly: bar borders, or mixture means and scales); with
        `y_standardize`, pass the data set's `context_frame` (or compose it with the user's
        units)."""
        if self.config.head == "bar":
            if isinstance(y_shift, float) and isinstance(y_scale, float):
                borders = np.asarray(self.config.borders, np.float64) * y_scale + y_shift
                return BarDistribution(jnp.asarray(borders, out.dtype), out)
            borders = jnp.asarray(self.config.borders, out.dtype) * y_scale + y_shift
            return BarDistribution(borders, out)
        logw, mu, sd = self._gmm_parts(out, y_shift, y_scale)
        return GaussianMixturePredictive(jnp.exp(logw).T, mu.T, (sd**2).T)

    def log_density(self, context_x, context_y, cmask, query_x, query_y) -> Array:
        """(M,) log predictive density of the query values (the training objective's terms;
        the "gmm" head's in log space throughout)."""
        out = self(context_x, context_y, cmask, query_x)
        loc, scale = context_frame(self.config, context_y, cmask)
        if self.config.head == "bar":  # in the frame's units: fixed borders, a cheaper program
            return self.distribution(out).log_prob((query_y - loc) / scale) - jnp.log(scale)
        return self._gmm_log_density(out, query_y, (loc, scale))

    def _gmm_log_density(self, out, y, frame):
        """Log density of the gmm head's mixtures at y (M, ...): query point j's mixture at
        every value of y[j], in log space throughout; `frame` is the data set's
        `context_frame`."""
        logw, mu, sd = self._gmm_parts(out, *frame)
        expand = (slice(None),) + (None,) * (y.ndim - 1)
        logw, mu, sd = logw[expand], mu[expand], sd[expand]
        z = (y[..., None] - mu) / sd
        return jax.scipy.special.logsumexp(
            logw - 0.5 * z**2 - jnp.log(sd) - 0.5 * np.log(2 * np.pi), -1)

    def expected_log_density(self, context_x, context_y, cmask, query_x, mean, var) -> Array:
        """(M,) E[log q(Y)] for Y ~ N(mean, var) at each query point, where q is the network's
        predictive: in closed form for the bar head (`BarDistribution.expected_log_prob`), by
        Gauss-Hermite quadrature with 24 nodes for the gmm head (its log density is smooth)."""
        out = self(context_x, context_y, cmask, query_x)
        frame = context_frame(self.config, context_y, cmask)
        if self.config.head == "bar":  # in the frame's units, as in `log_density`
            loc, scale = frame
            return (self.distribution(out).expected_log_prob((mean - loc) / scale, var / scale**2)
                    - jnp.log(scale))
        nodes, weights = np.polynomial.hermite.hermgauss(_GH_NODES)
        y = mean[:, None] + np.sqrt(2.0) * jnp.sqrt(var)[:, None] * nodes  # (M, nodes)
        return self._gmm_log_density(out, y, frame) @ (weights / np.sqrt(np.pi))


def pfn_loss(network: PFN, batch) -> Array:
    """Mean negative log predictive density of the query values of a `PredictiveBatch`
    (the PFN training objective)."""

    def one(cx, cy, cm, qx, qy):
        return -jnp.mean(network.log_density(cx, cy, cm, qx, qy))

    return jnp.mean(jax.vmap(one)(batch.context_x, batch.context_y, batch.cmask,
                                  batch.query_x, batch.query_y))


def pfn_expected_loss(network: PFN, batch) -> Array:
    """The training objective of `pfn_loss` with the query values integrated out: the mean
    over query points of -E[log q(y*)] under the exact predictive of y* given the data set's
    true hyperparameters. `batch` is `(PredictiveBatch, mean, var)` as
    `GPHyperprior.sample_batch_exact` gives it. Its expectation over data sets, and so its
    minimiser, is that of `pfn_loss`; it has no noise from the draw of y*
    (Rao-Blackwellisation).

    Example:
        >>> import equinox as eqx, jax, numpy as np
        >>> import flashbayes as fb
        >>> task = fb.tasks.get_predictive("gp_hyperprior", n_max=6)
        >>> cfg = PFNConfig(x_dim=1, borders=tuple(np.linspace(-3, 3, 11)), d_model=16,
        ...                 n_layers=1)
        >>> batch = jax.jit(lambda k: task.sample_batch_exact(k, 2, n_query=3))(
        ...     jax.random.key(0))
        >>> loss = eqx.filter_jit(pfn_expected_loss)(PFN(cfg, key=jax.random.key(1)), batch)
        >>> float(loss) > 0
        True
    """
    data, mean, var = batch

    def one(cx, cy, cm, qx, mu, v):
        return -jnp.mean(network.expected_log_density(cx, cy, cm, qx, mu, v))

    return jnp.mean(jax.vmap(one)(data.context_x, data.context_y, data.cmask, data.query_x,
                                  jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)))


def prior_borders(task, key: Array, n_buckets: int, *, n_samples: int = 200_000) -> np.ndarray:
    """Bar borders from the prior predictive of a predictive task: quantiles of `n_samples`
    query values drawn from the task (see `bar_borders`).

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get_predictive("gp_hyperprior", n_max=4)
        >>> prior_borders(task, jax.random.key(0), 10, n_samples=2000).shape
        (11,)
    """
    n_query = 50
    batch = max(1, -(-int(n_samples) // n_query))
    draws = jax.jit(lambda k: task.sample_batch(k, batch, n_query=n_query).query_y)(key)
    return bar_borders(np.asarray(draws, np.float64), n_buckets)


def frame_borders(task, key: Array, n_buckets: int, *,
                  n_samples: int = 200_000) -> tuple[np.ndarray, float, float]:
    """Bar borders for a PFN with `y_standardize`: (borders, y_prior_mean, y_prior_sd), where
    the mean and standard deviation are those of the prior predictive of y and the borders are
    quantiles of query values in their data set's `context_frame` (the units the network
    answers in), from `n_samples` values drawn from the task.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get_predictive("gp_hyperprior", n_max=4)
        >>> b, m0, s0 = frame_borders(task, jax.random.key(0), 10, n_samples=2000)
        >>> b.shape, s0 > 0
        ((11,), True)
    """
    n_query = 50
    batch = max(1, -(-int(n_samples) // n_query))
    data = jax.jit(lambda k: task.sample_batch(k, batch, n_query=n_query))(key)
    qy = np.asarray(data.query_y, np.float64)
    m0, s0 = float(qy.mean()), float(qy.std())
    cfg = PFNConfig(x_dim=task.x_dim, borders=(0.0, 1.0, 2.0, 3.0), y_standardize=True,
                    y_prior_mean=m0, y_prior_sd=s0)
    loc, scale = jax.vmap(lambda cy, cm: context_frame(cfg, cy, cm))(data.context_y, data.cmask)
    z = (qy - np.asarray(loc, np.float64)[:, None]) / np.asarray(scale, np.float64)[:, None]
    return bar_borders(z, n_buckets), m0, s0


def load_pfn(path: str | os.PathLike) -> tuple[PFN, dict]:
    """A PFN and its header from a checkpoint written by `fit_network` (trees "params"); a
    training folder means its latest checkpoint."""
    path = checkpoint_file(path)
    header = read_header(path)
    if header.get("kind") != "pfn" or "model_config" not in header:
        raise CheckpointError(f"{path}: expected a PFN checkpoint (header kind 'pfn'); got kind "
                              f"{header.get('kind')!r}")
    cfg = PFNConfig.from_dict(header["model_config"])
    net = PFN(cfg, key=jax.random.key(0))
    params, static = eqx.partition(net, eqx.is_array)
    params = load_tree(path, "params", params)
    return eqx.combine(params, static), header


def standardize_problem(context_x: np.ndarray, context_y: np.ndarray, query_x: np.ndarray, *,
                        low: float = 0.0, high: float = 1.0):
    """A GP regression problem in standard units: inputs mapped affinely, per dimension, so that
    the smallest and largest of the context and query inputs go to `low` and `high`; outputs to
    zero mean and unit standard deviation over the context (scale 1 with fewer than 2 distinct
    values). Returns (context_x, context_y, query_x, y_shift, y_scale): a predictive in standard
    units maps back to the user's by y = y_shift + y_scale * y_standard.

    Example:
        >>> import numpy as np
        >>> cx, cy, qx, shift, scale = standardize_problem(
        ...     np.array([[10.0], [30.0]]), np.array([5.0, 7.0]), np.array([[20.0]]))
        >>> cx.ravel().tolist(), cy.tolist(), qx.ravel().tolist(), shift, scale
        ([0.0, 1.0], [-1.0, 1.0], [0.5], 6.0, 1.0)
    """
    cx, cy, qx = (np.asarray(a) for a in (context_x, context_y, query_x))
    both = np.concatenate([cx, qx]).astype(np.float64)
    lo, hi = both.min(0), both.max(0)
    spread = hi > lo
    span = np.where(spread, hi - lo, 1.0)

    def to_box(x):
        u = np.where(spread, (x - lo) / span, 0.5)  # a dimension with one value: the middle
        return np.clip(low + u * (high - low), low, high).astype(x.dtype)

    y_shift = float(np.mean(cy))
    y_scale = float(np.std(cy)) if cy.shape[0] >= 2 and np.std(cy) > 0 else 1.0
    return (to_box(cx), ((cy - y_shift) / y_scale).astype(cy.dtype), to_box(qx), y_shift,
            y_scale)


class PFNPredictor:
    """A trained PFN with its task: `predictive(context_x, context_y, query_x)` for users.

    Inputs are validated (shapes (n, D), (n,), (m, D), finite values); a context larger than the
    training range, or inputs outside the training box, raise a ValueError that says so (use the
    NUTS reference `flashbayes.reference.gp_nuts` there). The context and the queries are padded
    to size buckets (the context at most to the task's `n_max`), so few programs are compiled.

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> task = fb.tasks.get_predictive("gp_hyperprior", n_max=8)
        >>> cfg = PFNConfig(x_dim=1, borders=tuple(np.linspace(-3, 3, 11)), d_model=16,
        ...                 n_layers=1)
        >>> model = PFNPredictor(PFN(cfg, key=jax.random.key(0)), task)
        >>> pred = model.predictive([[0.1], [0.5]], [0.3, -0.2], [[0.2], [0.9], [0.4]])
        >>> pred.log_prob(np.zeros(3)).shape, pred.sample(jax.random.key(1), 4).shape
        ((3,), (4, 3))
    """

    def __init__(self, network: PFN, task, meta: dict | None = None):
        if network.config.x_dim != task.x_dim:
            raise ValueError(f"network: expected x_dim {task.x_dim} for the task; got "
                             f"{network.config.x_dim}")
        self.network, self.task = network, task
        self.meta = dict(meta or {})
        # the weights split from the structure and flattened once, and a plain jax.jit that
        # also forms the predictive's arrays: per call, this saves partitioning (~1 ms) and
        # flattening (~0.3 ms) the network and the eager ops of the head
        params, static = eqx.partition(network, eqx.is_array)
        self._leaves, treedef = jax.tree_util.tree_flatten(params)
        bar = network.config.head == "bar"

        framed = network.config.y_standardize

        def run(leaves, cx, cy, cm, qx):
            net = eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static)
            out = net(cx, cy, cm, qx)
            loc, scale = context_frame(net.config, cy, cm)
            if bar:  # the borders in y's units when the data set sets the frame
                return (out, net.distribution(out, loc, scale).borders) if framed else (out,)
            logw, mu, sd = net._gmm_parts(out, loc, scale)
            return jnp.exp(logw).T, mu.T, sd.T, (sd**2).T

        self._run = jax.jit(run)
        self._borders = (jnp.asarray(np.asarray(network.config.borders, np.float32))
                         if bar else None)

    def save(self, path: str | os.PathLike):
        """Write the weights (no optimiser state) and the header (task, configuration, training
        step and time) atomically to a safetensors file; `load_predictor` reads it back."""
        from flashbayes import tasks
        from flashbayes.amortized._checkpoint import save_checkpoint

        header = {"kind": "pfn", "task": self.task.name,
                  "task_params": tasks.task_params(self.task),
                  "model_config": self.network.config.to_dict(),
                  **{k: self.meta[k] for k in ("step", "train_config", "train_seconds",
                                               "n_query", "init", "objective") if k in self.meta}}
        return save_checkpoint(path, header, {"params": eqx.filter(self.network, eqx.is_array)})

    def reference_task(self, n_context: int):
        """The task the exact references use for `n_context` points: this model's task, with
        `n_max` raised when the context is larger than the network was trained on (the
        references take any context size)."""
        if n_context <= self.task.n_max:
            return self.task
        from flashbayes.tasks import get_predictive, task_params

        return get_predictive(self.task.name, **{**task_params(self.task), "n_max": n_context})

    def out_of_range(self, context_x: np.ndarray, query_x: np.ndarray) -> str:
        """Why a validated problem lies outside what the network was trained on ("" if not)."""
        t, cfg = self.task, self.network.config
        n = context_x.shape[0]
        if not t.n_min <= n <= t.n_max:
            return (f"context: the model was trained on {t.n_min}..{t.n_max} context points; "
                    f"got {n}")
        for name, x in (("context_x", context_x), ("query_x", query_x)):
            if x.size and (x.min() < cfg.x_low or x.max() > cfg.x_high):
                return (f"{name}: the model was trained on inputs in [{cfg.x_low}, {cfg.x_high}]"
                        f"^{cfg.x_dim}; got values in [{x.min():.3g}, {x.max():.3g}]")
        return ""

    def in_standard_units(self, context_x: np.ndarray, context_y: np.ndarray,
                          query_x: np.ndarray, standardize: bool | str = "auto"):
        """A validated problem in the network's units, by the rule of `predictive`'s
        `standardize`: (context_x, context_y, query_x, y_shift, y_scale), where an answer in
        those units maps back by y = y_shift + y_scale * y_standard (0 and 1 when unchanged)."""
        if standardize not in (True, False, "auto"):
            raise ValueError(f"standardize: expected True, False or 'auto'; got {standardize!r}")
        cfg = self.network.config
        if standardize == "auto":
            both = np.concatenate([context_x, query_x])
            standardize = bool(both.size) and bool(both.min() < cfg.x_low or
                                                   both.max() > cfg.x_high)
        if not standardize:
            return context_x, context_y, query_x, 0.0, 1.0
        return standardize_problem(context_x, context_y, query_x, low=cfg.x_low, high=cfg.x_high)

    def predictive(self, context_x, context_y, query_x, *,
                   standardize: bool | str = "auto"):
        """The posterior predictive of y* at each query point: a bar distribution with batch
        shape (m,), or for the "gmm" head a `GaussianMixturePredictive` over m points (whose
        `gmm(j)` is query point j's `fb.GMM`); both have `log_prob(y) -> (m,)`,
        `sample(key, k) -> (k, m)`, `mean()` and `quantile(q)`.

        Args:
            context_x, context_y, query_x: (n, D), (n,) and (m, D) arrays.
            standardize: map the inputs affinely onto the training box (per dimension, the
                smallest and largest of context and query inputs go to its ends) and the
                outputs to zero mean and unit standard deviation over the context, then map the
                predictive back to the user's units (exactly: the bar distribution's borders
                are scaled). True always; False never (inputs outside the box are refused);
                "auto" (default) only when some input lies outside the training box.
        """
        cx, cy, qx = self.task.validate(context_x, context_y, query_x)
        return self.answer_standard(*self.in_standard_units(cx, cy, qx, standardize))

    def answer_standard(self, cx, cy, qx, y_shift: float = 0.0, y_scale: float = 1.0):
        """The network's predictive for a validated problem already in its units (as
        `in_standard_units` returns it), mapped to the user's by y = y_shift + y_scale * y."""
        why = self.out_of_range(cx, qx)
        if why:
            raise ValueError(f"{why}: outside the training range of this model; use the NUTS "
                             f"reference (flashbayes.reference.gp_nuts) instead")
        n, m, d = cx.shape[0], qx.shape[0], self.task.x_dim
        # the context padded to a few sizes (masked rows change nothing; fewer rows make a
        # faster pass); up to 128 queries are run as they are (one program per count, and no
        # slicing of the answer afterwards, ~0.1 ms), more are padded to the size buckets
        # (queries do not see each other)
        width = min(_pad_size(n), self.task.n_max)
        mq = m if m <= _PAD_STEP_LIMIT else _pad_size(m)
        xp = np.zeros((width, d), np.float32)
        yp = np.zeros(width, np.float32)
        xp[:n], yp[:n] = cx, cy
        qp = np.zeros((mq, d), np.float32)
        qp[:m] = qx
        out = self._run(self._leaves, xp, yp, np.arange(width) < n, qp)
        standard = y_shift == 0.0 and y_scale == 1.0
        if self.network.config.head == "bar":
            logits = out[0] if m == mq else out[0][:m]
            if len(out) == 1:  # the fixed frame: borders mapped in float64 on the host
                return (BarDistribution(self._borders, logits) if standard else
                        self.network.distribution(logits, y_shift, y_scale))
            if standard:
                return BarDistribution(out[1], logits)
            borders = y_shift + y_scale * np.asarray(out[1], np.float64)
            return BarDistribution(borders.astype(logits.dtype), logits)
        w, mu, sd, var = (a if m == mq else np.asarray(a)[:, :m] for a in out)
        if standard:
            return GaussianMixturePredictive(w, mu, var)
        return GaussianMixturePredictive(w, y_shift + y_scale * jnp.asarray(mu),
                                         (y_scale * jnp.asarray(sd)) ** 2)


_PAD_STEP_LIMIT = 128


def _pad_size(n: int) -> int:
    """Rows a context or query set is padded to: a multiple of 8 up to 128, then the
    geometric size buckets (a few compiled shapes, little padding)."""
    return max(8, -(-n // 8) * 8) if n <= _PAD_STEP_LIMIT else size_bucket(n)


def load_predictor(path: str | os.PathLike) -> PFNPredictor:
    """A `PFNPredictor` from a PFN checkpoint file or training folder (its latest checkpoint).

    Raises:
        CheckpointError: missing or malformed file, not a PFN, unknown task.
    """
    from flashbayes import tasks

    path = checkpoint_file(path)
    net, header = load_pfn(path)
    try:
        task = tasks.get_predictive(header["task"], **header.get("task_params", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: unknown predictive task {header.get('task')!r} "
                              f"({exc})") from exc
    meta = {k: header[k] for k in ("step", "train_config", "train_seconds", "n_query", "init",
                                   "objective") if k in header}
    meta["path"] = str(path)
    return PFNPredictor(net, task, meta)
