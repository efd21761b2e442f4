"""Drawing from a flowjax masked autoregressive flow with one network pass per layer.

A masked autoregressive layer (MADE network, Germain et al. 2015) is fast in the density
direction and slow in the sampling direction: flowjax inverts it with one full pass of the
network per dimension, so a D-dimensional draw costs D passes per layer. Each hidden unit of the
network has a rank r and depends only on the inputs of rank <= r; the outputs of rank i depend
only on hidden units of rank < i. So once coordinates 0..i-1 are known, every unit of rank < i is
final. Computing each unit once, when its inputs become known, gives the same numbers for the
cost of about one pass per layer.

The units are sorted by rank, so that "every unit of rank < i" is a prefix of the hidden layer,
and the conditioning input's share of the first layer is computed once for all draws.

`maf_layout` checks, on the concrete arrays, that a flow has the structure and the masks this
relies on; `sample_maf` uses it inside a compiled function.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

UNROLL_MAX_DIM = 16  # above: a scan over the layers instead of unrolling them


class MAFLayout(NamedTuple):
    """Static shape of the masked networks of a flow (one per layer, all alike)."""

    dim: int
    cond_dim: int
    width: int
    depth: int
    params_per_dim: int


def _hidden_ranks(dim: int, width: int) -> np.ndarray:
    # the ranks of hidden units in a conditional masked network: -1 .. dim - 2
    return np.arange(width) % dim - 1


def _layers(flow):
    """The stacked layers (a Chain with a leading layer axis) of ``Invert(Scan(...))``, or None."""
    from flowjax.bijections import Chain, Invert, Scan

    bij = getattr(flow, "bijection", None)
    if not isinstance(bij, Invert) or not isinstance(bij.bijection, Scan):
        return None
    layers = bij.bijection.bijection
    return layers if isinstance(layers, Chain) else None


def maf_layout(flow: Any) -> MAFLayout | None:
    """The layout of a conditional MAF built by ``flowjax.flows.masked_autoregressive_flow``.

    Returns None (use flowjax's own sampler) unless the flow is ``Invert(Scan(Chain(masked
    autoregressive layer, permutation)))`` with a conditioning input only in the masked layer,
    the masked network is a plain MLP (see `_plain_mlp`) and every weight is zero wherever the
    rank masks assumed here forbid a connection. Arrays may carry leading stacking axes
    (members of an ensemble).
    """
    import paramax
    from flowjax.bijections import MaskedAutoregressive

    flow = paramax.unwrap(flow)
    layers = _layers(flow)
    if layers is None or getattr(flow.base_dist, "cond_shape", None) is not None:
        return None
    mades = [b for b in layers.bijections if isinstance(b, MaskedAutoregressive)]
    others = [b for b in layers.bijections if not isinstance(b, MaskedAutoregressive)]
    if (len(mades) != 1 or mades[0].cond_shape is None
            or any(b.cond_shape is not None for b in others)):
        return None
    made = mades[0]
    mlp = made.masked_autoregressive_mlp
    dim, cond_dim = made.shape[0], made.cond_shape[0]
    linears = mlp.layers
    if not _plain_mlp(mlp):
        return None
    width = linears[0].weight.shape[-2]
    n_out = linears[-1].weight.shape[-2]
    if n_out % dim or any(lin.bias is None for lin in linears):
        return None
    layout = MAFLayout(dim, cond_dim, width, len(linears) - 1, n_out // dim)
    in_ranks = np.concatenate([np.arange(dim), -np.ones(cond_dim, int)])
    hidden = _hidden_ranks(dim, width)
    out_ranks = np.repeat(np.arange(dim), layout.params_per_dim)
    ranks = [in_ranks, *[hidden] * layout.depth, out_ranks]
    for k, lin in enumerate(linears):
        out_r, in_r = ranks[k + 1][:, None], ranks[k]
        allowed = (out_r > in_r) if k == len(linears) - 1 else (out_r >= in_r)
        if np.asarray(lin.weight).shape[-2:] != allowed.shape:
            return None
        if np.any(np.asarray(lin.weight)[..., ~allowed] != 0):
            return None
    return layout


def _plain_mlp(mlp) -> bool:
    """At least one hidden layer, one Linear per layer (not scanned), an activation without
    parameters applied elementwise and no final activation: what `_made_inverse` computes."""
    linears = mlp.layers
    if getattr(mlp, "scan", False) or len(linears) < 2 or mlp.depth != len(linears) - 1:
        return False
    if jax.tree_util.tree_leaves(eqx.filter((mlp.activation, mlp.final_activation),
                                            eqx.is_array)):
        return False
    probe = jnp.linspace(-3.0, 3.0, 7)
    if not np.allclose(np.asarray(mlp.final_activation(probe)), np.asarray(probe)):
        return False
    # elementwise: the activation of a block is the block of activations
    one_by_one = jnp.stack([mlp.activation(v) for v in probe])
    return bool(np.allclose(np.asarray(mlp.activation(probe)), np.asarray(one_by_one)))


def _made_inverse(made, layout: MAFLayout, y_t, condition):
    """x with made(x) = y, for y_t (dim, n) = y transposed: each hidden unit computed once."""
    dim = layout.dim
    hidden = _hidden_ranks(dim, layout.width)
    order = np.argsort(hidden, kind="stable")
    # known[i]: the number of units of rank < i (a prefix once sorted), i = 0..dim
    known = np.searchsorted(hidden[order], np.arange(dim + 1) - 1, side="right")
    linears = made.masked_autoregressive_mlp.layers
    act = made.masked_autoregressive_mlp.activation
    w_in = linears[0].weight[order]
    first_cond = w_in[:, dim:] @ condition + linears[0].bias[order]  # the same for all draws
    w_hidden = [(lin.weight[order][:, order], lin.bias[order]) for lin in linears[1:-1]]
    w_out, b_out = linears[-1].weight[:, order], linears[-1].bias
    p, n = layout.params_per_dim, y_t.shape[1]
    # features x draws (measured: several times faster than draws x features for these thin
    # products); hidden units and coordinates not yet known stay zero and their weights are
    # masked to zero, so whole-column products equal the prefix products
    hs = [jnp.zeros((layout.width, n), y_t.dtype) for _ in range(layout.depth)]
    x = jnp.zeros_like(y_t)
    for i in range(dim):
        lo, hi = known[i - 1] if i else 0, known[i]
        if hi > lo:  # the units of rank i - 1 become known
            pre = first_cond[lo:hi, None] + (w_in[lo:hi, :dim] @ x if i else 0.0)
            hs[0] = hs[0].at[lo:hi].set(act(jnp.broadcast_to(pre, (hi - lo, n))))
            for k, (w, b) in enumerate(w_hidden, start=1):
                hs[k] = hs[k].at[lo:hi].set(act(w[lo:hi] @ hs[k - 1] + b[lo:hi, None]))
        rows = slice(i * p, (i + 1) * p)
        params = w_out[rows] @ hs[-1] + b_out[rows, None]
        transformers = eqx.filter_vmap(made.transformer_constructor, in_axes=1)(params)
        x = x.at[i].set(eqx.filter_vmap(lambda t, v: t.inverse(v))(transformers, y_t[i]))
    return x


def sample_maf(flow: Any, layout: MAFLayout, key: jax.Array, n: int, condition) -> jax.Array:
    """n draws (n, dim) of ``flow`` given one ``condition`` (cond_dim,).

    The same draws as ``flow.sample(key, (n,), condition=condition)`` up to rounding; needs the
    layout `maf_layout` returned for this flow.
    """
    import paramax
    from flowjax.bijections import MaskedAutoregressive

    flow = paramax.unwrap(flow)
    y_t = flow.base_dist.sample(key, (n,)).T  # features x draws throughout
    layers = _layers(flow)

    def layer_inverse(chain, y_t):
        for bij in reversed(chain.bijections):
            if isinstance(bij, MaskedAutoregressive):
                y_t = _made_inverse(bij, layout, y_t, condition)
            else:
                y_t = jax.vmap(bij.inverse, in_axes=1, out_axes=1)(y_t)
        return y_t

    if layout.dim > UNROLL_MAX_DIM:
        # compiling grows with dim x layers when unrolled (measured: 23 s for one 40-D flow
        # of five layers); a scan over the layers compiles one layer
        params, static = eqx.partition(layers, eqx.is_array)
        y_t, _ = jax.lax.scan(lambda y, p: (layer_inverse(eqx.combine(p, static), y), None),
                              y_t, params, reverse=True)
        return y_t.T
    # unrolled (measured: twice as fast as a scan over the stacked layers)
    n_layers = jax.tree_util.tree_leaves(eqx.filter(layers, eqx.is_array))[0].shape[0]
    for index in reversed(range(n_layers)):
        y_t = layer_inverse(
            jax.tree_util.tree_map(lambda a, i=index: a[i] if eqx.is_array(a) else a, layers), y_t)
    return y_t.T
