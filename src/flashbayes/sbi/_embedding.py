"""Embedding networks for NPE: a summary vector of one (z-scored) observation.

* ``"identity"``: the observation flattened (vector data; the default).
* ``"mlp"``: a multilayer perceptron on the flattened observation.
* ``"set"``: an i.i.d. set of points (m, p) summarised by a DeepSets network (a network per
  point, a mean over points, a network on the mean): invariant to the order of the points. A
  flat observation (m p,) holding the points one after another is read as (m, p) when `points`
  = m is given.
* ``"series"``: a time series (T,) or (T, c) summarised by 1-D convolutions and a mean over time.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flashbayes.sbi._embedding import make_embedding
    >>> emb = make_embedding("set", (7, 3), key=jax.random.key(0), dim=8)
    >>> x = jax.random.normal(jax.random.key(1), (7, 3))
    >>> emb(x).shape, bool(jnp.allclose(emb(x), emb(x[::-1]), atol=1e-6))
    ((8,), True)
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

EMBEDDINGS = ("identity", "mlp", "set", "series")


class IdentityEmbedding(eqx.Module):
    """The observation flattened."""

    out_dim: int = eqx.field(static=True)

    def __call__(self, x):
        return x.reshape(-1)


class MLPEmbedding(eqx.Module):
    """An MLP on the flattened observation."""

    mlp: eqx.nn.MLP
    out_dim: int = eqx.field(static=True)

    def __call__(self, x):
        return self.mlp(x.reshape(-1))


class SetEmbedding(eqx.Module):
    """DeepSets: rho(mean_i phi(x_i)) for a set of points x (m, p), or (m p,) read as (m, p)."""

    phi: eqx.nn.MLP
    rho: eqx.nn.MLP
    out_dim: int = eqx.field(static=True)
    points: int | None = eqx.field(static=True, default=None)

    def __call__(self, x):
        if self.points is not None:
            x = x.reshape(self.points, -1)
        return self.rho(jnp.mean(jax.vmap(self.phi)(x), axis=0))


class SeriesEmbedding(eqx.Module):
    """Two 1-D convolutions (kernel 5, stride 2), a mean over time and a linear map."""

    convs: tuple[eqx.nn.Conv1d, ...]
    out: eqx.nn.Linear
    out_dim: int = eqx.field(static=True)

    def __call__(self, x):
        h = x[None, :] if x.ndim == 1 else x.T  # (channels, time)
        for conv in self.convs:
            h = jax.nn.gelu(conv(h))
        return self.out(jnp.mean(h, axis=-1))


def set_features(x_shape: tuple[int, ...], points: int | None) -> int:
    """Coordinates per point of a set observation: (m, p), or flat (m p,) with `points` = m.

    Raises:
        ValueError: the shape does not hold whole points.
    """
    if points is not None:
        if (isinstance(points, bool) or not isinstance(points, int) or points < 1
                or len(x_shape) != 1 or x_shape[0] % points):
            raise ValueError(f"embedding 'set' with points={points!r}: expected flat "
                             f"observations whose length is a multiple of the number of "
                             f"points; got shape {x_shape}")
        return x_shape[0] // points
    if len(x_shape) != 2:
        raise ValueError(f"embedding 'set': expected observations of shape (points, "
                         f"features), or flat ones with `points` given; got shape {x_shape}")
    return x_shape[1]


def make_embedding(kind: str, x_shape: tuple[int, ...], *, key: jax.Array, dim: int = 32,
                   width: int = 64, points: int | None = None) -> eqx.Module:
    """Build the embedding `kind` for observations of shape `x_shape`.

    Args:
        kind: one of ``"identity"``, ``"mlp"``, ``"set"``, ``"series"``.
        x_shape: the shape of one observation.
        key: PRNG key for the initial weights.
        dim: the summary size (not used by ``"identity"``).
        width: hidden width.
        points: ``"set"`` only: the number of points in a flat observation (m p,).
    """
    x_shape = tuple(int(s) for s in x_shape)
    flat = math.prod(x_shape)
    if points is not None and kind != "set":
        raise ValueError(f"points: only the 'set' embedding reads a flat observation as points; "
                         f"got embedding {kind!r}")
    if kind == "identity":
        return IdentityEmbedding(out_dim=flat)
    if kind == "mlp":
        return MLPEmbedding(eqx.nn.MLP(flat, dim, width, 2, activation=jax.nn.gelu, key=key),
                            out_dim=dim)
    if kind == "set":
        features = set_features(x_shape, points)
        k1, k2 = jax.random.split(key)
        return SetEmbedding(eqx.nn.MLP(features, width, width, 2, activation=jax.nn.gelu, key=k1),
                            eqx.nn.MLP(width, dim, width, 1, activation=jax.nn.gelu, key=k2),
                            out_dim=dim, points=points)
    if kind == "series":
        if len(x_shape) not in (1, 2):
            raise ValueError(f"embedding 'series': expected observations of shape (time,) or "
                             f"(time, channels); got shape {x_shape}")
        channels = 1 if len(x_shape) == 1 else x_shape[1]
        k1, k2, k3 = jax.random.split(key, 3)
        convs = (eqx.nn.Conv1d(channels, width, 5, stride=2, padding=2, key=k1),
                 eqx.nn.Conv1d(width, width, 5, stride=2, padding=2, key=k2))
        return SeriesEmbedding(convs, eqx.nn.Linear(width, dim, key=k3), out_dim=dim)
    raise ValueError(f"embedding: expected one of {list(EMBEDDINGS)}; got {kind!r}")
