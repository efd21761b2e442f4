"""Calibration of amortized posteriors over a task's prior predictive: simulation-based
calibration (SBC), expected coverage of highest-posterior-density regions, and TARP."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from flashbayes.distributions import GMM
from flashbayes.distributions._gmm import gmm_moments

PosteriorArrays = Callable[..., tuple[Any, Any, Any]]
_CHUNK = 256  # simulations per compiled call of the simulator and of the posterior sampler


# -- posterior models ---------------------------------------------------------------------------


class PosteriorModel:
    """Any batched posterior of a task, in the form the calibration diagnostics take.

    An `AmortizedPosterior` already has this form (`.task` and `.posterior_arrays`); this class
    wraps any other function, e.g. an exact posterior (`PosteriorModel.exact`) or a deliberately
    wrong one (`scale_covariance`).

    Args:
        task: the task whose prior family and simulator generate the problems.
        posterior_arrays: function (weights (B, K), means (B, K, d), scale_tril (B, K, d, d),
            cmask (B, K), data (B, N, p), dmask (B, N)) -> posterior (weights, means,
            scale_tril) with the same K component slots as the prior (slots where `cmask` is
            False are ignored): the padded arrays of `Task.sample_batch`.
        name: a label for reports.

    Example:
        >>> import flashbayes as fb
        >>> model = fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))
        >>> model.name
        'exact gmm_linear'
    """

    def __init__(self, task: Any, posterior_arrays: PosteriorArrays, *, name: str = "posterior"):
        if not callable(posterior_arrays):
            raise TypeError(f"posterior_arrays: expected a function; got "
                            f"{type(posterior_arrays).__name__}")
        self.task = task
        self.posterior_arrays = posterior_arrays
        self.name = name

    def __repr__(self) -> str:
        return f"PosteriorModel({self.name!r}, task={getattr(self.task, 'name', '?')!r})"

    @classmethod
    def exact(cls, task: Any) -> PosteriorModel:
        """The task's closed-form posterior, for tasks whose exact posterior of a GMM prior is a
        GMM with the same number of components (e.g. `gmm_linear`). Float64, one problem at a
        time (about a millisecond each)."""
        if not getattr(task, "has_exact", False):
            raise ValueError(f"task: expected a task with a closed-form posterior; got "
                             f"{getattr(task, 'name', task)!r}")

        def posterior_arrays(weights, means, scale_tril, cmask, data, dmask):
            weights, means, scale_tril = (np.array(a, np.float64)
                                          for a in (weights, means, scale_tril))
            cmask, data, dmask = np.asarray(cmask, bool), np.asarray(data), np.asarray(dmask, bool)
            for i in range(weights.shape[0]):
                cm = cmask[i]
                w = weights[i, cm]
                prior = GMM(weights=w / w.sum(), means=means[i, cm], scale_tril=scale_tril[i, cm])
                post = task.exact_posterior(prior, data[i, dmask[i]])
                if not isinstance(post, GMM) or post.n_components != int(cm.sum()):
                    raise ValueError(f"task {task.name!r}: expected an exact posterior that is a "
                                     f"GMM with the prior's components; got {post!r}")
                weights[i, cm] = np.asarray(post.weights)
                means[i, cm] = np.asarray(post.means)
                scale_tril[i, cm] = np.asarray(post.scale_tril)
            return weights, means, scale_tril

        return cls(task, posterior_arrays, name=f"exact {task.name}")


def scale_covariance(model: Any, factor: float) -> PosteriorModel:
    """A model whose posteriors are `model`'s, contracted (factor < 1) or widened (factor > 1)
    about their mean so that each posterior covariance is multiplied by `factor`.

    Each mixture is mapped through theta -> mean + sqrt(factor) (theta - mean): the shape is
    kept and the mixture covariance scales exactly. With factor 0.5 it is the over-confident
    posterior that the calibration tests must reject.

    Example:
        >>> import flashbayes as fb
        >>> exact = fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))
        >>> fb.diagnostics.scale_covariance(exact, 0.5).name
        'exact gmm_linear, covariance x 0.5'
    """
    _check_model(model)
    if not (np.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: expected a positive number; got {factor}")
    c = float(np.sqrt(factor))

    def posterior_arrays(weights, means, scale_tril, cmask, data, dmask):
        w, m, s = _clean(*model.posterior_arrays(weights, means, scale_tril, cmask, data, dmask),
                         np.asarray(cmask, bool))
        mu = np.einsum("bk,bkd->bd", w, m)[:, None, :]
        return w, mu + c * (m - mu), s * c

    name = getattr(model, "name", None) or getattr(model.task, "name", "model")
    return PosteriorModel(model.task, posterior_arrays, name=f"{name}, covariance x {factor:g}")


def _check_model(model: Any) -> None:
    if not (hasattr(model, "task") and callable(getattr(model, "posterior_arrays", None))):
        raise TypeError(f"model: expected an AmortizedPosterior, a PosteriorModel or "
                        f"CalibrationDraws; got {type(model).__name__}")


def _clean(w, m, s, cmask):
    """Posterior arrays with padded slots neutralised (weight 0, mean 0, identity factor) and
    the weights renormalised over the real components."""
    w, m, s = (np.asarray(a, np.float64) for a in (w, m, s))
    b, k = cmask.shape
    d = m.shape[-1] if m.ndim == 3 else -1
    if w.shape != (b, k) or m.shape != (b, k, d) or s.shape != (b, k, d, d):
        raise ValueError(f"posterior_arrays: expected shapes ({b}, {k}), ({b}, {k}, d), "
                         f"({b}, {k}, d, d); got {w.shape}, {m.shape}, {s.shape}")
    w = np.where(cmask, w, 0.0)
    m = np.where(cmask[..., None], m, 0.0)
    s = np.where(cmask[..., None, None], s, np.eye(d))
    bad = ~(np.isfinite(w).all(1) & np.isfinite(m).all((1, 2)) & np.isfinite(s).all((1, 2, 3)))
    if bad.any():
        raise FloatingPointError(f"posterior: non-finite output for {int(bad.sum())} of {b} "
                                 f"problems, first at index {int(np.argmax(bad))}")
    return w / w.sum(1, keepdims=True), m, s


# -- simulations --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationDraws:
    """Simulations shared by `sbc`, `expected_coverage` and `tarp`.

    For each of `n_sims` problems (prior from the task's family, theta from the prior, data
    from the likelihood): the true theta, `n_draws` posterior draws, the posterior log density
    at theta and at the draws, and the prior (for TARP's reference points).
    """

    model_name: str
    task_name: str
    theta: np.ndarray  # (n_sims, d)
    draws: np.ndarray  # (n_sims, n_draws, d)
    log_q_theta: np.ndarray  # (n_sims,)
    log_q_draws: np.ndarray  # (n_sims, n_draws)
    prior_weights: np.ndarray  # (n_sims, K), 0 on padded slots
    prior_means: np.ndarray  # (n_sims, K, d)
    prior_scale_tril: np.ndarray  # (n_sims, K, d, d)

    @property
    def n_sims(self) -> int:
        return self.theta.shape[0]

    @property
    def n_draws(self) -> int:
        return self.draws.shape[1]

    @property
    def dim(self) -> int:
        return self.theta.shape[1]


@functools.partial(jax.jit, static_argnums=(5,))
def _posterior_draws(key, weights, means, scale_tril, theta, n_draws):
    def one(k, w, m, s, th):
        q = GMM.unchecked(w, m, s)
        x = q.sample(k, n_draws)
        return x, q.log_prob(x), q.log_prob(th)

    keys = jax.random.split(key, weights.shape[0])
    return jax.vmap(one)(keys, weights, means, scale_tril, theta)


def _check_counts(n_sims: int, n_draws: int) -> None:
    if not (isinstance(n_sims, int) and n_sims >= 2):
        raise ValueError(f"n_sims: expected an integer >= 2; got {n_sims!r}")
    if not (isinstance(n_draws, int) and n_draws >= 1):
        raise ValueError(f"n_draws: expected a positive integer; got {n_draws!r}")


def calibration_draws(key: Array, model: Any, *, n_sims: int = 1000, n_draws: int = 99,
                      task_state: Any = None) -> CalibrationDraws:
    """Simulate `n_sims` problems from the task of `model` and draw from its posteriors.

    Priors come from the task's prior family, theta from the prior and data from the
    likelihood (`Task.sample_batch`, after `Task.prepare`); the posteriors of all problems are
    computed in one batched call of `model.posterior_arrays`.

    Args:
        key: PRNG key.
        model: an `AmortizedPosterior` or a `PosteriorModel`.
        n_sims: simulated problems.
        n_draws: posterior draws per problem (L; ranks take the L + 1 values 0..L).
        task_state: the result of `model.task.prepare(...)` to reuse (for tasks whose
            preparation is costly, e.g. the bank of fitted priors of `gaussian_variance`);
            prepared from `key` when None.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> exact = fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))
        >>> sims = fb.diagnostics.calibration_draws(jax.random.key(0), exact, n_sims=20,
        ...                                         n_draws=9)
        >>> sims.draws.shape
        (20, 9, 2)
    """
    _check_model(model)
    _check_counts(n_sims, n_draws)
    task = model.task
    k_state, k_batch, k_draw = jax.random.split(key, 3)
    state = task.prepare(k_state) if task_state is None else task_state
    # fixed-size chunks: the simulator and the sampler compile once per process, whatever n_sims
    n_chunks = -(-n_sims // _CHUNK)
    parts = [task.sample_batch(jax.random.fold_in(k_batch, i), _CHUNK, state)
             for i in range(n_chunks)]
    batch = jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:n_sims], *parts)
    cmask = np.asarray(batch.cmask, bool)
    w, m, s = _clean(*model.posterior_arrays(batch.weights, batch.means, batch.scale_tril,
                                             batch.cmask, batch.data, batch.dmask), cmask)
    theta = np.asarray(batch.theta, np.float32)
    pad = n_chunks * _CHUNK - n_sims
    w, m, s, th = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]).astype(np.float32)
                   for a in (w, m, s, theta))
    out = [_posterior_draws(jax.random.fold_in(k_draw, i), w[sl], m[sl], s[sl], th[sl],
                            int(n_draws))
           for i, sl in enumerate(slice(j, j + _CHUNK) for j in range(0, n_sims, _CHUNK))]
    draws, lq_draws, lq_theta = (np.concatenate([np.asarray(o[k]) for o in out])[:n_sims]
                                 for k in range(3))
    pw = np.where(cmask, np.asarray(batch.weights, np.float64), 0.0)
    d = theta.shape[1]
    return CalibrationDraws(
        model_name=str(getattr(model, "name", None) or f"amortized {task.name}"),
        task_name=str(task.name), theta=theta.astype(np.float64),
        draws=np.asarray(draws, np.float64), log_q_theta=np.asarray(lq_theta, np.float64),
        log_q_draws=np.asarray(lq_draws, np.float64),
        prior_weights=pw / pw.sum(1, keepdims=True),
        prior_means=np.where(cmask[..., None], np.asarray(batch.means, np.float64), 0.0),
        prior_scale_tril=np.where(cmask[..., None, None],
                                  np.asarray(batch.scale_tril, np.float64), np.eye(d)))


def _draws_of(key: Array, model: Any, n_sims: int, n_draws: int) -> CalibrationDraws:
    if isinstance(model, CalibrationDraws):
        return model
    return calibration_draws(key, model, n_sims=n_sims, n_draws=n_draws)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level: expected a value in (0, 1); got {level}")


# -- SBC ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SBCResult:
    """Outcome of `sbc`.

    Attributes:
        statistics: names of the ranked statistics: "theta[j]" per dimension, then "log q".
        ranks: (n_sims, len(statistics)) ranks in 0..n_draws.
        p_values: chi-square p-value of uniformity per statistic.
        n_draws: posterior draws per simulation (L).
        n_bins: bins of the chi-square test (contiguous groups of the L + 1 rank values).
        level: family-wise level; each statistic is tested at level / len(statistics).
        passed: every p-value above level / len(statistics) (Bonferroni).
    """

    statistics: tuple[str, ...]
    ranks: np.ndarray
    p_values: np.ndarray
    n_draws: int
    n_bins: int
    level: float
    passed: bool

    @property
    def n_sims(self) -> int:
        return self.ranks.shape[0]

    def bin_edges(self) -> np.ndarray:
        """(n_bins + 1,) rank boundaries: bin b holds ranks edges[b] <= r < edges[b + 1]."""
        return _bin_edges(self.n_draws, self.n_bins)

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts (n_bins, len(statistics)) per bin and their expectation (n_bins,) under
        uniform ranks."""
        return _histogram(self.ranks, self.n_draws, self.n_bins)


def _bin_edges(n_draws: int, n_bins: int) -> np.ndarray:
    return np.array([g[0] for g in np.array_split(np.arange(n_draws + 1), n_bins)]
                    + [n_draws + 1])


def _histogram(ranks, n_draws, n_bins):
    edges = _bin_edges(n_draws, n_bins)
    idx = np.searchsorted(edges, ranks, side="right") - 1
    counts = np.stack([np.bincount(idx[:, j], minlength=n_bins) for j in range(ranks.shape[1])],
                      1)
    expected = ranks.shape[0] * np.diff(edges) / (n_draws + 1)
    return counts, expected


def sbc(key: Array, model: Any, *, n_sims: int = 1000, n_draws: int = 99, n_bins: int = 20,
        level: float = 0.05) -> SBCResult:
    """Simulation-based calibration (Talts et al. 2018) of a posterior model over its task.

    For each simulation theta ~ prior, data ~ likelihood, L = `n_draws` posterior draws; the
    rank of theta among the draws (number of draws below it) is computed for each dimension's
    marginal, and the rank of log q(theta) among log q(draws) as one joint statistic (it catches
    over- and under-dispersion of the joint posterior, not only of the marginals). If the
    posterior is the true one, every rank is uniform on 0..L. Uniformity is tested per
    statistic by a chi-square test on `n_bins` contiguous bins of the L + 1 rank values (the
    default L = 99, 20 bins: 5 rank values a bin), with a Bonferroni correction over the d + 1
    statistics.

    Args:
        key: PRNG key.
        model: an `AmortizedPosterior`, a `PosteriorModel`, or the `CalibrationDraws` of one
            (to share one set of simulations; n_sims and n_draws are then taken from it).
        n_sims: simulations.
        n_draws: posterior draws per simulation.
        n_bins: chi-square bins; at most n_draws + 1 and n_sims / 5 (expected count >= 5).
        level: family-wise level of the test.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> exact = fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))
        >>> res = fb.diagnostics.sbc(jax.random.key(0), exact, n_sims=200, n_bins=10)
        >>> res.statistics, res.passed
        (('theta[0]', 'theta[1]', 'log q'), True)
        >>> bad = fb.diagnostics.scale_covariance(exact, 0.5)
        >>> fb.diagnostics.sbc(jax.random.key(0), bad, n_sims=200, n_bins=10).passed
        False
    """
    from scipy import stats

    _check_level(level)
    draws = _draws_of(key, model, n_sims, n_draws)
    n, L = draws.n_sims, draws.n_draws
    if not (isinstance(n_bins, int) and 2 <= n_bins <= L + 1 and 5 * n_bins <= n):
        raise ValueError(f"n_bins: expected an integer in 2..min(n_draws + 1, n_sims / 5) = "
                         f"2..{min(L + 1, n // 5)}; got {n_bins!r}")
    marg = np.sum(draws.draws < draws.theta[:, None, :], axis=1)  # (n, d)
    joint = np.sum(draws.log_q_draws < draws.log_q_theta[:, None], axis=1)  # (n,)
    ranks = np.concatenate([marg, joint[:, None]], 1).astype(np.int64)
    counts, expected = _histogram(ranks, L, n_bins)
    p_values = np.array([stats.chisquare(counts[:, j], expected).pvalue
                         for j in range(ranks.shape[1])])
    names = tuple(f"theta[{j}]" for j in range(draws.dim)) + ("log q",)
    return SBCResult(statistics=names, ranks=ranks, p_values=p_values, n_draws=L, n_bins=n_bins,
                     level=float(level), passed=bool(np.all(p_values > level / len(names))))


# -- expected coverage and TARP -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoverageResult:
    """Outcome of `expected_coverage` and `tarp`.

    Attributes:
        kind: "hpd" (expected coverage of highest-posterior-density regions) or "tarp".
        alphas: credibility levels of the curve.
        ecp: empirical coverage probability at each level (calibrated: ecp = alpha).
        max_deviation: sup over alpha of |ECP(alpha) - alpha| (the Kolmogorov-Smirnov distance
            of the per-simulation levels from the uniform).
        bound: the largest `max_deviation` passed: the 1 - level quantile of the
            Kolmogorov-Smirnov distribution for n_sims simulations (about 1.36 / sqrt(n_sims)).
        p_value: Kolmogorov-Smirnov p-value of calibration.
        area: integral of |ECP(alpha) - alpha| over [0, 1] (TARP's area statistic).
        signed_area: integral of ECP(alpha) - alpha; negative means over-confident (regions
            too small), positive under-confident.
        level: the test's level.
        passed: `max_deviation <= bound` (equivalently p_value > level).
    """

    kind: str
    alphas: np.ndarray
    ecp: np.ndarray
    max_deviation: float
    bound: float
    p_value: float
    area: float
    signed_area: float
    level: float
    passed: bool


def _default_alphas(alphas):
    a = np.linspace(0.0, 1.0, 21) if alphas is None else np.asarray(alphas, np.float64)
    if a.ndim != 1 or a.size == 0 or np.any((a < 0) | (a > 1)):
        raise ValueError(f"alphas: expected a 1-D array of levels in [0, 1]; got {a!r}")
    return a


def _coverage_result(kind: str, u: np.ndarray, alphas: np.ndarray, level: float):
    """u: per-simulation credibility level needed to cover theta, Uniform(0, 1) if calibrated."""
    from scipy import stats

    n = u.shape[0]
    ks = stats.kstest(u, "uniform")
    grid = np.linspace(0.0, 1.0, 1001)
    dev = np.searchsorted(np.sort(u), grid, side="right") / n - grid
    bound = float(stats.kstwo.ppf(1.0 - level, n))
    ecp = np.searchsorted(np.sort(u), alphas, side="right") / n
    return CoverageResult(kind=kind, alphas=alphas, ecp=ecp, max_deviation=float(ks.statistic),
                          bound=bound, p_value=float(ks.pvalue),
                          area=float(np.trapezoid(np.abs(dev), grid)),
                          signed_area=float(np.trapezoid(dev, grid)), level=float(level),
                          passed=bool(ks.statistic <= bound))


def expected_coverage(key: Array, model: Any, *, n_sims: int = 1000, n_draws: int = 99,
                      alphas: Any = None, level: float = 0.05) -> CoverageResult:
    """Expected coverage of the posterior's highest-density regions over the task.

    For each simulation the level needed for the alpha-HPD region to contain the true theta is
    the posterior mass of {log q > log q(theta)}, estimated by the fraction of the L draws with
    a higher log density (randomised between neighbouring values so that it is exactly uniform
    under calibration). ECP(alpha) is the fraction of simulations with that level <= alpha; a
    calibrated posterior has ECP(alpha) = alpha for all alpha. Passed when the largest
    deviation is below the Kolmogorov-Smirnov bound at `level` for n_sims simulations.

    Args:
        key: PRNG key (simulations and randomisation).
        model: an `AmortizedPosterior`, a `PosteriorModel`, or `CalibrationDraws`.
        n_sims, n_draws: as in `sbc`.
        alphas: levels at which the curve is reported (default 0, 0.05, ..., 1); the test uses
            every level.
        level: the test's level.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> exact = fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))
        >>> res = fb.diagnostics.expected_coverage(jax.random.key(0), exact, n_sims=200)
        >>> res.passed, res.ecp.shape
        (True, (21,))
    """
    _check_level(level)
    alphas = _default_alphas(alphas)
    k_sim, k_u = jax.random.split(key)
    draws = _draws_of(k_sim, model, n_sims, n_draws)
    below = np.sum(draws.log_q_draws < draws.log_q_theta[:, None], axis=1)
    jitter = np.asarray(jax.random.uniform(k_u, (draws.n_sims,)), np.float64)
    u = 1.0 - (below + jitter) / (draws.n_draws + 1)  # HPD mass above theta
    return _coverage_result("hpd", u, alphas, level)


def tarp(key: Array, model: Any, *, n_sims: int = 1000, n_draws: int = 99, alphas: Any = None,
         level: float = 0.05) -> CoverageResult:
    """Tests of Accuracy with Random Points (TARP, Lemos et al. 2023).

    For each simulation a reference point r is drawn from that simulation's prior
    (independently of theta); distances are measured after scaling each coordinate by the
    prior's standard deviation. The level needed for the ball around r through theta to be
    covered is the fraction of posterior draws closer to r than theta is (randomised between
    neighbouring values). ECP(alpha) is the fraction of simulations with level <= alpha; a
    calibrated posterior gives the diagonal, and the curve is a necessary and sufficient check
    over random reference points. Reported with its area statistic, the integral of
    |ECP - alpha|; passed on the same Kolmogorov-Smirnov bound as `expected_coverage`.

    Args:
        key: PRNG key (simulations, reference points, randomisation).
        model: an `AmortizedPosterior`, a `PosteriorModel`, or `CalibrationDraws`.
        n_sims, n_draws, alphas, level: as in `expected_coverage`.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> exact = fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))
        >>> fb.diagnostics.tarp(jax.random.key(0), exact, n_sims=200).passed
        True
    """
    _check_level(level)
    alphas = _default_alphas(alphas)
    k_sim, k_u, k_ref = jax.random.split(key, 3)
    draws = _draws_of(k_sim, model, n_sims, n_draws)
    w, m, s = (jnp.asarray(a, jnp.float32) for a in (draws.prior_weights, draws.prior_means,
                                                      draws.prior_scale_tril))
    refs = jax.vmap(lambda k, w_, m_, s_: GMM.unchecked(w_, m_, s_).sample(k, 1)[0])(
        jax.random.split(k_ref, draws.n_sims), w, m, s)
    _, cov = jax.vmap(gmm_moments)(w, m, s)
    scale = np.sqrt(np.diagonal(np.asarray(cov, np.float64), axis1=1, axis2=2))  # (n, d)
    refs = np.asarray(refs, np.float64)
    dist_theta = np.linalg.norm((draws.theta - refs) / scale, axis=-1)  # (n,)
    dist_draws = np.linalg.norm((draws.draws - refs[:, None]) / scale[:, None], axis=-1)
    closer = np.sum(dist_draws < dist_theta[:, None], axis=1)
    jitter = np.asarray(jax.random.uniform(k_u, (draws.n_sims,)), np.float64)
    u = (closer + jitter) / (draws.n_draws + 1)
    return _coverage_result("tarp", u, alphas, level)
