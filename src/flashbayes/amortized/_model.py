"""A trained amortized model bound to its task: the user-facing `posterior` calls."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from flashbayes import tasks as _tasks
from flashbayes._padding import pad_prior, pad_rows, size_bucket
from flashbayes.amortized._checkpoint import (
    CheckpointError,
    checkpoint_file,
    load_tree,
    read_header,
    save_checkpoint,
)
from flashbayes.amortized._dt import DistributionTransformer, DTConfig
from flashbayes.distributions import GMM

KIND = "distribution_transformer"
CHUNK = 256  # problems per compiled batched call (measured: larger chunks run slower here)


class OutOfRangeWarning(UserWarning):
    """The input lies outside what the model was trained on."""


def _batch_bucket(b: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(b, 1))))


class AmortizedPosterior:
    """A Distribution Transformer with its task: maps (prior GMM, data) to a posterior GMM.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> model = fb.load_pretrained("gmm_linear")
        >>> task = model.task
        >>> problem = task.sample_problem(jax.random.key(0), n=10)
        >>> post = model.posterior(problem.prior, problem.data)
        >>> post.n_components == problem.prior.n_components
        True
    """

    def __init__(self, network: DistributionTransformer, task: _tasks.Task, *,
                 meta: dict | None = None):
        self.network = network
        self.task = task
        self.meta = dict(meta or {})
        self.core = network_core(network, task)
        self._single = jax.jit(self.core)
        self._batched = jax.jit(jax.vmap(self.core))

    # -- properties ----------------------------------------------------------------------------
    @property
    def config(self) -> DTConfig:
        return self.network.config

    @property
    def theta_dim(self) -> int:
        return self.config.theta_dim

    @property
    def data_dim(self) -> int:
        """Values per data row, as the user gives them (the task's)."""
        return self.task.data_dim

    def __repr__(self) -> str:
        return (f"AmortizedPosterior(task={self.task.name!r}, theta_dim={self.theta_dim}, "
                f"data_dim={self.data_dim}, step={self.meta.get('step')})")

    # -- validation ----------------------------------------------------------------------------
    def _check_prior(self, prior: Any) -> GMM:
        if not isinstance(prior, GMM):
            raise TypeError(f"prior: expected a flashbayes GMM; got {type(prior).__name__}")
        if prior.dim != self.theta_dim:
            raise ValueError(f"prior: expected dimension {self.theta_dim} for task "
                             f"{self.task.name}; got {prior.dim}")
        return prior

    def in_training_range(self, prior: GMM, data: np.ndarray) -> tuple[bool, str]:
        """Whether (prior, data) lie inside what the model was trained on, and why not."""
        n = int(np.shape(data)[0])
        if n > self.task.n_max:
            return False, f"{n} data rows; the model was trained on at most {self.task.n_max}"
        if prior.n_components > self.task.k_max:
            return False, (f"{prior.n_components} prior components; the model was trained on at "
                           f"most {self.task.k_max}")
        why = self.task.data_out_of_range(np.asarray(data))
        if why:
            return False, why
        return True, ""

    # -- inference -------------------------------------------------------------------------------
    def posterior(self, prior: GMM, data: Any) -> GMM:
        """The amortized posterior for one prior and one data set of shape (n, data_dim)."""
        prior = self._check_prior(prior)
        x = self.task.validate_data(data)
        ok, why = self.in_training_range(prior, x)
        if not ok:
            warnings.warn(f"outside the training range: {why}", OutOfRangeWarning, stacklevel=2)
        k = prior.n_components
        # the prior is padded to the task's component count: one compiled function for every K
        out = self._single(*pad_prior(prior, max(k, self.task.k_max)),
                           *pad_rows(x, size_bucket(x.shape[0])))
        # NumPy views of the result: slicing on the host costs microseconds, not a dispatch
        w, m, s = (np.asarray(a)[:k] for a in out)
        if not _finite_rows(w[None], m[None], s[None])[0]:
            raise FloatingPointError("posterior: the network returned non-finite values for this "
                                     "input (prior or data far outside the training range?)")
        return GMM.unchecked(w, m, s)

    def posterior_batch(self, priors: Sequence[GMM], data: Sequence[Any]) -> list[GMM]:
        """Posteriors for many (prior, data) pairs in one compiled call.

        Priors may have different numbers of components and data sets different sizes: both
        are padded (with masks) to the largest in the call.
        """
        if len(priors) != len(data):
            raise ValueError(f"expected as many data sets as priors; got {len(data)} data sets "
                             f"for {len(priors)} priors")
        if not priors:
            return []
        priors = [self._check_prior(p) for p in priors]
        xs = [self.task.validate_data(x) for x in data]
        arrays = self._pad(priors, xs)
        w, m, s = self.posterior_arrays(*arrays)
        bad = ~_finite_rows(w, m, s)
        if bad.any():
            raise FloatingPointError(f"posterior_batch: non-finite output for {int(bad.sum())} "
                                     f"pair(s), first at index {int(np.argmax(bad))}")
        return [GMM.unchecked(w[i, :p.n_components], m[i, :p.n_components],
                              s[i, :p.n_components]) for i, p in enumerate(priors)]

    def posterior_arrays(self, weights, means, scale_tril, cmask, data, dmask, *,
                         chunk: int = CHUNK):
        """Batched core on padded arrays (B, K), (B, K, d), (B, K, d, d), (B, K), (B, N, p),
        (B, N); returns padded posterior (weights, means, scale_tril) as NumPy arrays.

        Rows are grouped by data-set size bucket (each group is cut to its bucket's width, so
        small data sets do not pay for the largest) and run in chunks of at most `chunk`
        problems, each padded to a power of two so that few shapes are compiled.
        """
        weights, means, scale_tril = (np.asarray(a, np.float32) for a in (weights, means,
                                                                           scale_tril))
        cmask, data, dmask = np.asarray(cmask, bool), np.asarray(data, np.float32), \
            np.asarray(dmask, bool)
        width = dmask.shape[1]
        counts = dmask.sum(1)
        if not np.array_equal(dmask, np.arange(width)[None, :] < counts[:, None]):
            # masks that are not prefixes: move the real rows to the front (order is irrelevant)
            order = np.argsort(~dmask, axis=1, kind="stable")
            data = np.take_along_axis(data, order[:, :, None], axis=1)
            dmask = np.arange(width)[None, :] < counts[:, None]
        sizes, inverse = np.unique(counts, return_inverse=True)
        per_row = np.array([size_bucket(int(c)) for c in sizes], int)[inverse]
        out_w = np.empty_like(weights)
        out_m = np.empty_like(means)
        out_s = np.empty_like(scale_tril)
        for nb in np.unique(per_row):
            rows = np.flatnonzero(per_row == nb)
            nb = int(nb)
            if width >= nb:
                x_b, m_b = data[rows, :nb], dmask[rows, :nb]
            else:
                x_b = np.zeros((rows.size, nb, data.shape[2]), np.float32)
                x_b[:, :width] = data[rows]
                m_b = np.zeros((rows.size, nb), bool)
                m_b[:, :width] = dmask[rows]
            for start in range(0, rows.size, chunk):
                sel = slice(start, start + chunk)
                res = self._run_chunk(weights[rows[sel]], means[rows[sel]],
                                      scale_tril[rows[sel]], cmask[rows[sel]], x_b[sel], m_b[sel])
                out_w[rows[sel]], out_m[rows[sel]], out_s[rows[sel]] = res
        return out_w, out_m, out_s

    def _run_chunk(self, weights, means, scale_tril, cmask, data, dmask):
        b = weights.shape[0]
        bb = _batch_bucket(b)
        if bb != b:
            def pad(a, fill=0):
                widths = [(0, bb - b)] + [(0, 0)] * (np.ndim(a) - 1)
                return np.pad(a, widths, constant_values=fill)

            eye = np.broadcast_to(np.eye(self.theta_dim, dtype=np.float32),
                                  (bb - b,) + scale_tril.shape[1:])
            weights = pad(weights, 1.0 / weights.shape[1])
            means, cmask, data, dmask = pad(means), pad(cmask, True), pad(data), pad(dmask)
            scale_tril = np.concatenate([scale_tril, eye], 0)
        w, m, s = self._batched(weights, means, scale_tril, cmask, data, dmask)
        return np.asarray(w)[:b], np.asarray(m)[:b], np.asarray(s)[:b]

    def _pad(self, priors: list[GMM], xs: list[np.ndarray]):
        kmax = max(max(p.n_components for p in priors), self.task.k_max)
        nb = size_bucket(max(x.shape[0] for x in xs))
        w, m, s, cm = (np.stack(a) for a in zip(*(pad_prior(p, kmax) for p in priors)))
        x, dm = (np.stack(a) for a in zip(*(pad_rows(xi, nb) for xi in xs)))
        return w, m, s, cm, x, dm

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights (no optimiser state) to a safetensors checkpoint."""
        header = checkpoint_header(
            self.task.name, self.meta.get("task_params", {}), self.config,
            self.meta.get("train_config"), self.meta.get("step", 0), self.meta.get("train_seconds"))
        return save_checkpoint(path, header, {"params": eqx.filter(self.network, eqx.is_array)})


def network_core(network: DistributionTransformer, task: _tasks.Task):
    """The unbatched map (padded prior, padded data) -> padded posterior that every inference
    path runs.

    - Translation-equivariant tasks (`task.translation_equivariant`): the prior is shifted to
      zero mean and the data by `task.data_offset` first, and the posterior shifted back; the
      network only ever sees centred priors, wherever the state is.
    - Tasks with a canonical frame (`task.uses_frame`): the prior is turned by the orthogonal
      map `task.network_frame` picks for it, the data are rewritten by `task.data_to_frame`,
      and the posterior is turned back (see `to_frame`); training sees the same frame
      (`frame_batch`).
    """
    into, back = _network_frame(task)

    def core(weights, means, scale_tril, cmask, data, dmask):
        m0, s0, x0, ctx = into(weights, means, scale_tril, cmask, data, dmask)
        return back(ctx, *network(weights, m0, s0, cmask, x0, dmask))

    return core


def grouped_core(network: DistributionTransformer, task: _tasks.Task, n_groups: int):
    """`network_core` for one prior and `n_groups` data sets packed into one array (row r in
    data set `group[r]`, -1: none): (weights, means, scale_tril, cmask, data, group) ->
    posteriors (G, K), (G, K, d), (G, K, d, d), each data set's answer as `network_core` gives
    it alone (to float rounding). See `DistributionTransformer.grouped`."""
    into, back = _network_frame(task)

    def core(weights, means, scale_tril, cmask, data, group):
        rows = (group >= 0) & (group < n_groups)  # rows of some data set
        m0, s0, x0, ctx = into(weights, means, scale_tril, cmask, data, rows)
        out = network.grouped(weights, m0, s0, cmask, x0, group, n_groups)
        return jax.vmap(back, in_axes=(None, 0, 0, 0))(ctx, *out)

    return core


def _network_frame(task: _tasks.Task):
    """(into, back): the problem as the network sees it, plus what `back` needs to map the
    network's posterior to the user's coordinates (see `network_core`)."""
    if getattr(task, "uses_frame", False):
        def into(weights, means, scale_tril, cmask, data, dmask):
            rot, m0, s0, x0 = to_frame(task, weights, means, scale_tril, cmask, data, dmask)
            return m0, s0, x0, rot

        def back(rot, pw, pm, ps):
            return pw, pm @ rot, _turn_tril(rot.T, ps)

        return into, back
    if getattr(task, "translation_equivariant", False):
        def into(weights, means, scale_tril, cmask, data, dmask):
            w = jnp.where(cmask, weights, 0.0)
            c = jnp.sum((w / jnp.sum(w))[:, None] * means, 0)
            m0 = jnp.where(cmask[:, None], means - c, 0.0)
            x0 = jnp.where(dmask[:, None], data - task.data_offset(c), 0.0)
            return m0, scale_tril, x0, c

        def back(c, pw, pm, ps):
            return pw, pm + c, ps

        return into, back
    return (lambda weights, means, scale_tril, cmask, data, dmask: (means, scale_tril, data, None),
            lambda ctx, pw, pm, ps: (pw, pm, ps))


def _turn_tril(rot, scale_tril):
    """Cholesky factors of rot L L^T rot^T for each L of a stack (K, d, d), from the QR
    decomposition of (rot L)^T: the covariance is never formed, so narrow components keep
    their precision."""
    _, r = jnp.linalg.qr(jnp.swapaxes(jnp.einsum("ij,kjl->kil", rot, scale_tril), -1, -2))
    sign = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
    return jnp.swapaxes(r, -1, -2) * sign[..., None, :]


def to_frame(task: _tasks.Task, weights, means, scale_tril, cmask, data, dmask):
    """One padded problem in the task's canonical frame: `(rot, means, scale_tril, data)` with
    rot = `task.network_frame(weights, means, scale_tril, cmask)` (orthogonal, d x d), each
    component turned by it (x -> rot x) and the data rewritten by `task.data_to_frame` (rows of
    `task.network_data_dim` values). A posterior in the frame goes back by x -> rot^T x.
    Padded components and rows stay as padding."""
    rot, aux = task.network_frame(weights, means, scale_tril, cmask)
    d = means.shape[-1]
    m0 = jnp.where(cmask[:, None], means @ rot.T, 0.0)
    s0 = jnp.where(cmask[:, None, None], _turn_tril(rot, scale_tril), jnp.eye(d))
    x0 = jnp.where(dmask[:, None], task.data_to_frame(data, aux), 0.0)
    return rot, m0, s0, x0


def frame_batch(task: _tasks.Task, batch: _tasks.Batch) -> _tasks.Batch:
    """A training batch in the canonical frame of `task` (unchanged for tasks without one):
    priors, data and theta as the network sees them in `network_core`. An orthogonal map keeps
    densities, so the loss is -log q(theta) in the user's coordinates."""
    if not getattr(task, "uses_frame", False):
        return batch

    def one(b):
        rot, m0, s0, x0 = to_frame(task, b.weights, b.means, b.scale_tril, b.cmask, b.data,
                                   b.dmask)
        return _tasks.Batch(b.weights, m0, s0, b.cmask, x0, b.dmask, rot @ b.theta)

    return jax.vmap(one)(batch)


def checkpoint_header(task: str, task_params: dict, model_config: DTConfig,
                      train_config: dict | None, step: int, train_seconds: float | None,
                      **extra) -> dict:
    """The JSON header of a model checkpoint (format version is added on writing)."""
    return {"kind": KIND, "task": task, "task_params": task_params,
            "model_config": model_config.to_dict(), "train_config": train_config, "step": step,
            "train_seconds": train_seconds, **extra}


def _finite_rows(w: np.ndarray, m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per problem of a batch: whether its posterior parameters are all finite."""
    return np.isfinite(w).all(1) & np.isfinite(m).all((1, 2)) & np.isfinite(s).all((1, 2, 3))


def network_from_header(header: dict) -> DistributionTransformer:
    try:
        config = DTConfig.from_dict(header["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: expected a valid model_config in the header ({exc})") \
            from exc
    return DistributionTransformer(config, key=jax.random.key(0))


def load(path: str | os.PathLike, *, task: str | None = None) -> AmortizedPosterior:
    """Load a model written by `train` or `AmortizedPosterior.save`.

    Args:
        path: a `.safetensors` checkpoint, or a training folder (its latest checkpoint).
        task: if given, the task the checkpoint must belong to.

    Raises:
        CheckpointError: missing or malformed file, other format version, other task.
    """
    path = checkpoint_file(path)
    header = read_header(path)
    if header.get("kind") != KIND:
        raise CheckpointError(f"checkpoint: expected kind {KIND!r}; got {header.get('kind')!r}")
    name = header.get("task")
    if task is not None and name != task:
        raise CheckpointError(f"checkpoint: expected a model for task {task!r}; got one for "
                              f"{name!r}")
    try:
        task_obj = _tasks.get(name, **header.get("task_params", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: unknown task {name!r} ({exc})") from exc
    skeleton = network_from_header(header)
    params, static = eqx.partition(skeleton, eqx.is_array)
    params = load_tree(path, "params", params)
    network = eqx.combine(params, static)
    if (network.config.theta_dim, network.config.data_dim) != (task_obj.theta_dim,
                                                               task_obj.network_data_dim):
        raise CheckpointError(f"checkpoint: model dimensions do not match task {name!r}")
    meta = {k: header.get(k) for k in ("step", "train_config", "task_params", "train_seconds")}
    meta["path"] = str(path)
    return AmortizedPosterior(network, task_obj, meta=meta)


# Distribution Transformers (prior and data in, posterior out), then GP predictive networks
# (context points and query inputs in, posterior predictive out)
DT_PRETRAINED = ("gmm_linear", "gaussian_variance", "logistic_regression", "lti_tracking",
                 "nonlinear_tracking", "qubit_rabi", "sbi_gaussian_linear")
GP_PRETRAINED = ("gp_hyperprior_pfn", "gp_hyperprior_dt")
PRETRAINED = DT_PRETRAINED + GP_PRETRAINED


def pretrained_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise ValueError(f"pretrained model: expected one of {', '.join(PRETRAINED)}; got "
                         f"{name!r}")
    return Path(__file__).resolve().parent.parent / "pretrained" / f"{name}.safetensors"


def load_pretrained(name: str):
    """A model shipped inside the package; docs/pretrained.md gives the command that made it.

    Distribution Transformers (prior and data in, posterior out) load as `AmortizedPosterior`;
    `gp_hyperprior_pfn` (context points and query inputs in, posterior predictive out) as a
    `PFNPredictor`.

    Example:
        >>> import flashbayes as fb
        >>> fb.load_pretrained("gmm_linear").task.name
        'gmm_linear'
        >>> fb.load_pretrained("gp_hyperprior_pfn").task.name
        'gp_hyperprior'
    """
    path = pretrained_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained model {name!r}: expected the file {path}; it is "
                                "missing from this installation")
    if name in GP_PRETRAINED:
        from flashbayes.amortized._pfn import load_predictor

        return load_predictor(path)
    return load(path, task=name)
