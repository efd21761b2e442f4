"""The Distribution Transformer: (GMM prior, data set) -> GMM posterior in one forward pass.

Unbatched core; batch with `jax.vmap`. See docs/architecture.md for the maths of the output head.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Bool, Float

from flashbayes.distributions import gmm_moments


class ConfigDict:
    """Dict round trip for frozen config dataclasses, refusing unknown keys."""

    _what = "config"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: dict):
        if not isinstance(obj, dict):
            raise ValueError(f"{cls._what}: expected a JSON object; got {type(obj).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise ValueError(f"{cls._what}: expected keys among {sorted(names)}; got unknown "
                             f"{sorted(unknown)}")
        return cls(**obj)


@dataclasses.dataclass(frozen=True)
class DTConfig(ConfigDict):
    """Architecture of a Distribution Transformer.

    Attributes:
        theta_dim: d, dimension of the parameter.
        data_dim: p, length of one data row.
        d_model: token width.
        n_layers: number of (self-attention, cross-attention, MLP) blocks.
        n_heads: attention heads.
        mlp_ratio: hidden width of the MLPs as a multiple of d_model.
        data_layers: hidden layers of the per-row data encoder.
        n_scale: typical data-set size, used to scale the count features.
    """

    theta_dim: int
    data_dim: int
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    mlp_ratio: int = 2
    data_layers: int = 2
    n_scale: float = 20.0

    _what = "model config"


def _n_tril(d: int) -> int:
    return d * (d + 1) // 2


def _tril_features(L: Float[Array, "d d"]) -> Float[Array, " t"]:
    """log of the diagonal, then the strictly lower entries."""
    d = L.shape[-1]
    rows, cols = jnp.tril_indices(d, -1)
    return jnp.concatenate([jnp.log(jnp.diagonal(L)), L[rows, cols]])


def _tril_from_params(v: Float[Array, " t"], d: int) -> Float[Array, "d d"]:
    """Lower-triangular matrix with diagonal exp(v[:d]) and strictly lower entries v[d:]."""
    rows, cols = jnp.tril_indices(d, -1)
    # a soft clip keeps exp() finite (scale changes up to e^8 either way); identity at v = 0
    T = jnp.diag(jnp.exp(8.0 * jnp.tanh(v[:d] / 8.0)))
    return T.at[rows, cols].set(v[d:])


class _MLP(eqx.Module):
    layers: list

    def __init__(self, sizes: list[int], *, key: Array):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [eqx.nn.Linear(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jax.nn.gelu(layer(x))
        return self.layers[-1](x)


class _Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    self_attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    cross_attn: eqx.nn.MultiheadAttention
    ln3: eqx.nn.LayerNorm
    mlp: _MLP

    def __init__(self, d: int, heads: int, ratio: int, *, key: Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln1 = eqx.nn.LayerNorm(d)
        self.self_attn = eqx.nn.MultiheadAttention(heads, d, key=k1)
        self.ln2 = eqx.nn.LayerNorm(d)
        self.cross_attn = eqx.nn.MultiheadAttention(heads, d, key=k2)
        self.ln3 = eqx.nn.LayerNorm(d)
        self.mlp = _MLP([d, ratio * d, d], key=k3)

    def __call__(self, tok, self_mask, data, cross_mask):
        """Masks are 2-D: `self_mask` (tokens, tokens), `cross_mask` (tokens, data rows)."""
        h = jax.vmap(self.ln1)(tok)
        tok = tok + self.self_attn(h, h, h, mask=self_mask)
        h = jax.vmap(self.ln2)(tok)
        tok = tok + self.cross_attn(h, data, data, mask=cross_mask)
        h = jax.vmap(self.ln3)(tok)
        return tok + jax.vmap(self.mlp)(h)


class DistributionTransformer(eqx.Module):
    """Prior components are tokens; they attend to each other and to the embedded data rows.

    The head returns, per component, a Gaussian pseudo-likelihood "site" (a lower-triangular
    factor T that maps the component's Cholesky factor to the posterior's, and a site location u)
    and a free log-weight correction. The posterior component is the product of the prior
    component and the site; its weight is the prior weight times the integral of that product
    (the exact Gaussian algebra) times exp(correction). The head starts at zero, so an untrained
    model returns its prior exactly. All of this happens in coordinates standardised by the
    prior's overall mean and covariance.
    """

    config: DTConfig = eqx.field(static=True)
    comp_embed: eqx.nn.Linear
    glob_embed: eqx.nn.Linear
    data_embed: _MLP
    null_token: Array
    glob_token: Array
    blocks: list
    ln_out: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, config: DTConfig, *, key: Array):
        d, p, dm = config.theta_dim, config.data_dim, config.d_model
        keys = jax.random.split(key, 6 + config.n_layers)
        self.config = config
        comp_in = 1 + d + _n_tril(d)
        glob_in = d + _n_tril(d) + 3
        self.comp_embed = eqx.nn.Linear(comp_in, dm, key=keys[0])
        self.glob_embed = eqx.nn.Linear(glob_in, dm, key=keys[1])
        self.data_embed = _MLP([p + glob_in] + [2 * dm] * config.data_layers + [dm], key=keys[2])
        self.null_token = 0.02 * jax.random.normal(keys[3], (dm,))
        self.glob_token = 0.02 * jax.random.normal(keys[4], (dm,))
        self.blocks = [_Block(dm, config.n_heads, config.mlp_ratio, key=k)
                       for k in keys[6:]]
        self.ln_out = eqx.nn.LayerNorm(dm)
        head = eqx.nn.Linear(dm, 1 + _n_tril(d) + 2 * d, key=keys[5])
        # zero output layer: an untrained model maps the prior to itself
        self.head = eqx.tree_at(lambda h: (h.weight, h.bias), head,
                                (jnp.zeros_like(head.weight), jnp.zeros_like(head.bias)))

    def __call__(self, weights: Float[Array, " K"], means: Float[Array, "K d"],
                 scale_tril: Float[Array, "K d d"], cmask: Bool[Array, " K"],
                 data: Float[Array, "N p"], dmask: Bool[Array, " N"]):
        """Posterior GMM parameters (weights, means, scale_tril) for one (prior, data) pair."""
        post_w, post_m, post_l, _ = self._forward(weights, means, scale_tril, cmask, data, dmask)
        return post_w, post_m, post_l

    def log_prob(self, theta: Float[Array, " d"], weights, means, scale_tril, cmask, data,
                 dmask) -> Float[Array, ""]:
        """log q(theta | prior, data): the training objective's integrand."""
        logw, zm, zl, (m_g, l_g) = self._forward(weights, means, scale_tril, cmask, data, dmask,
                                                 return_standardised=True)
        z = jsl.solve_triangular(l_g, theta - m_g, lower=True)
        diff = z[None, :] - zm
        sol = jax.vmap(lambda L, v: jsl.solve_triangular(L, v, lower=True))(zl, diff)
        logdet = jnp.sum(jnp.log(jnp.diagonal(zl, axis1=-2, axis2=-1)), -1)
        d = theta.shape[-1]
        comp = -0.5 * jnp.sum(sol**2, -1) - logdet - 0.5 * d * math.log(2 * math.pi)
        lp = jax.scipy.special.logsumexp(jnp.where(cmask, comp + logw, -jnp.inf))
        return lp - jnp.sum(jnp.log(jnp.diagonal(l_g)))

    def grouped(self, weights: Float[Array, " K"], means: Float[Array, "K d"],
                scale_tril: Float[Array, "K d d"], cmask: Bool[Array, " K"],
                data: Float[Array, "N p"], group: Array, n_groups: int):
        """Posteriors of one prior given `n_groups` data sets packed into one array: row r
        belongs to data set `group[r]` (-1: to none). Returns (G, K), (G, K, d), (G, K, d, d),
        the answers `__call__` gives for each data set alone (to float rounding), in one pass:
        each data set's tokens attend to its own rows only."""
        prior = self._prior_part(weights, means, scale_tril, cmask)
        ids = jnp.arange(n_groups)
        member = group[None, :] == ids[:, None]  # (G, N)
        out = self._trunk(prior, cmask, data, member)
        logw, zm, zl = jax.vmap(lambda o: self._posterior(o, prior, cmask))(out)
        return jax.vmap(lambda lw, m, L: self._user_frame(lw, m, L, prior))(logw, zm, zl)

    def _prior_part(self, weights, means, scale_tril, cmask):
        """The prior standardised by its overall mean and covariance (m_g, l_g)."""
        d = self.config.theta_dim
        w = jnp.where(cmask, weights, 0.0)
        w = w / jnp.sum(w)
        m_g, cov_g = gmm_moments(w, means, scale_tril)
        cov_g = 0.5 * (cov_g + cov_g.T) + 1e-6 * jnp.trace(cov_g) / d * jnp.eye(d)
        l_g = jnp.linalg.cholesky(cov_g)
        zm = jax.vmap(lambda m: jsl.solve_triangular(l_g, m - m_g, lower=True))(means)
        zl = jax.vmap(lambda L: jsl.solve_triangular(l_g, L, lower=True))(scale_tril)
        zl = jnp.where(cmask[:, None, None], zl, jnp.eye(d))
        zm = jnp.where(cmask[:, None], zm, 0.0)
        # zero-weight components stay at zero weight; their feature is floored to stay finite
        logw_prior = jnp.where(cmask, jnp.log(jnp.where(cmask, w, 1.0)), 0.0)
        return {"m_g": m_g, "l_g": l_g, "zm": zm, "zl": zl, "logw": logw_prior}

    def _trunk(self, prior, cmask, data, member):
        """Head outputs (G, K, 1 + t + d) for G data sets; `member` (G, N) says which rows
        each one holds. The data sets share the component features but not their tokens."""
        cfg = self.config
        n_groups, n_rows = member.shape
        k = cmask.shape[0]
        n = jnp.sum(member, 1).astype(jnp.float32)  # (G,)
        prior_feat = jnp.concatenate([prior["m_g"], _tril_features(prior["l_g"])])
        glob_feat = jax.vmap(lambda c: jnp.concatenate([
            prior_feat, jnp.stack([c / cfg.n_scale, jnp.log1p(c),
                                   jnp.log(jnp.sum(cmask).astype(jnp.float32))])]))(n)
        logw_feat = jnp.maximum(prior["logw"], -20.0)
        comp_feat = jax.vmap(lambda lw, m, L: jnp.concatenate([lw[None], m, _tril_features(L)]))(
            logw_feat, prior["zm"], prior["zl"])
        glob_e = jax.vmap(self.glob_embed)(glob_feat)  # (G, dm)
        comp_tok = jax.vmap(self.comp_embed)(comp_feat)[None] + glob_e[:, None]  # (G, K, dm)
        # each row is embedded with its own data set's global features
        row_glob = (jnp.broadcast_to(glob_feat[0], (n_rows, glob_feat.shape[1])) if n_groups == 1
                    else glob_feat[jnp.argmax(member, 0)])
        data_in = jnp.concatenate([data, row_glob], 1)
        data_tok = jax.vmap(self.data_embed)(data_in)
        # a summed data summary (mean embedding times the count) joins the global token
        pooled = jnp.where(member[:, :, None], data_tok[None], 0.0).sum(1) / cfg.n_scale
        glob_tok = self.glob_token + glob_e + pooled  # (G, dm)
        tok = jnp.concatenate([comp_tok, glob_tok[:, None]], 1).reshape(n_groups * (k + 1), -1)
        tok_group = jnp.repeat(jnp.arange(n_groups), k + 1)
        tok_real = jnp.tile(jnp.concatenate([cmask, jnp.ones((1,), bool)]), n_groups)
        # every token sees the real tokens of its own data set, the null row and its own rows
        self_mask = (tok_group[:, None] == tok_group[None, :]) & tok_real[None, :]
        cross_mask = jnp.concatenate([jnp.ones((tok.shape[0], 1), bool), member[tok_group]], 1)
        data_tok = jnp.concatenate([self.null_token[None], data_tok], 0)
        for block in self.blocks:
            tok = block(tok, self_mask, data_tok, cross_mask)
        tok = tok.reshape(n_groups, k + 1, -1)[:, :-1]
        return jax.vmap(jax.vmap(lambda t: self.head(self.ln_out(t))))(tok)

    def _posterior(self, out, prior, cmask):
        """Posterior components in standardised coordinates: prior component x Gaussian site."""
        d = self.config.theta_dim
        dlogit = out[:, 0]
        t_par = out[:, 1:1 + _n_tril(d)]
        u = out[:, 1 + _n_tril(d):1 + _n_tril(d) + d]
        shift = out[:, 1 + _n_tril(d) + d:]

        def update(m, L, tp, uk, sk):
            T = _tril_from_params(tp, d)
            L_post = L @ T
            prec_prior = jsl.cho_solve((L, True), jnp.eye(d))
            prec_post = jsl.cho_solve((L_post, True), jnp.eye(d))
            lam = prec_post - prec_prior  # implied site precision
            rhs = prec_prior @ m + lam @ uk
            m_post = L_post @ (L_post.T @ rhs)
            logz = (0.5 * m_post @ prec_post @ m_post - 0.5 * m @ prec_prior @ m
                    - 0.5 * uk @ lam @ uk
                    + jnp.sum(jnp.log(jnp.diagonal(L_post))) - jnp.sum(jnp.log(jnp.diagonal(L))))
            # a free shift in units of the posterior's own scale (zero-initialised)
            return m_post + L_post @ sk, L_post, logz

        zm_post, zl_post, logz = jax.vmap(update)(prior["zm"], prior["zl"], t_par, u, shift)
        logits = jnp.where(cmask, prior["logw"] + logz + dlogit, -jnp.inf)
        return jax.nn.log_softmax(logits), zm_post, zl_post

    @staticmethod
    def _user_frame(logw, zm, zl, prior):
        l_g = prior["l_g"]
        return (jnp.exp(logw), prior["m_g"] + zm @ l_g.T,
                jnp.einsum("ij,kjl->kil", l_g, zl))

    def _forward(self, weights, means, scale_tril, cmask, data, dmask, *,
                 return_standardised=False):
        prior = self._prior_part(weights, means, scale_tril, cmask)
        out = self._trunk(prior, cmask, data, dmask[None, :])[0]
        logw_post, zm_post, zl_post = self._posterior(out, prior, cmask)
        if return_standardised:
            return logw_post, zm_post, zl_post, (prior["m_g"], prior["l_g"])
        return (*self._user_frame(logw_post, zm_post, zl_post, prior), None)
