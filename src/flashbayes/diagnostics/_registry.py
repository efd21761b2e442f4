"""Registry of the diagnostics: each entry has its function, what it computes, its pass
criterion, its reference paper, and a case builder that makes a right and a wrong answer for
one generic test."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jaxtyping import Array

from flashbayes.diagnostics._basic import c2st, kl_divergence, nll
from flashbayes.diagnostics._calibration import (
    PosteriorModel,
    expected_coverage,
    sbc,
    scale_covariance,
    tarp,
)
from flashbayes.diagnostics._mmd import mmd
from flashbayes.diagnostics._psis import importance_khat
from flashbayes.distributions import GMM

KL_TOLERANCE = 0.05  # nats: the project's accuracy target for mean KL(exact || DT)


@dataclasses.dataclass(frozen=True)
class Case:
    """Inputs of one run of a diagnostic on a problem whose answer is known.

    Attributes:
        args, kwargs: the diagnostic function's arguments.
        context: what the verdict needs besides the result (e.g. a reference value).
        right: whether the inputs are a right answer (the diagnostic must pass them).
    """

    args: tuple
    kwargs: dict
    context: dict
    right: bool


@dataclasses.dataclass(frozen=True)
class Diagnostic:
    """One registry entry.

    Attributes:
        name: registry name.
        function: the public diagnostic function.
        description: what it computes.
        criterion: when a result counts as passed.
        reference: the paper it follows.
        case: (key, right) -> `Case`: a right (True) or wrong (False) answer to check.
        verdict: (result, context) -> whether the result passes `criterion`.
    """

    name: str
    function: Callable[..., Any]
    description: str
    criterion: str
    reference: str
    case: Callable[[Array, bool], Case]
    verdict: Callable[[Any, dict], bool]

    def run_case(self, key: Array, *, right: bool) -> tuple[Any, bool]:
        """Build a right or wrong case, run the diagnostic on it, return (result, passed)."""
        c = self.case(key, right)
        result = self.function(*c.args, **c.kwargs)
        return result, bool(self.verdict(result, c.context))


# -- cases ----------------------------------------------------------------------------------------


def _target() -> GMM:
    """A two-component, correlated 2-D mixture: the 'true posterior' of the two-sample cases."""
    return GMM(weights=[0.4, 0.6], means=[[-1.0, 0.0], [1.5, 1.0]],
               scale_tril=[[[0.8, 0.0], [0.3, 0.6]], [[0.5, 0.0], [0.0, 0.9]]])


def _distorted(p: GMM, *, shift: float = 0.0, cov_factor: float = 1.0) -> GMM:
    """p moved by `shift` along the first axis, each component's covariance times cov_factor."""
    c = float(np.sqrt(cov_factor))
    return GMM(weights=np.asarray(p.weights), means=np.asarray(p.means) + np.array([shift, 0.0]),
               scale_tril=c * np.asarray(p.scale_tril))


def _wrong(p: GMM) -> GMM:
    return _distorted(p, shift=0.5, cov_factor=0.5)


def _kl_case(key, right):
    p = _target()
    return Case((key, p, p if right else _wrong(p)), {"n": 4000}, {}, right)


def _nll_case(key, right):
    p = _target()
    theta = np.asarray(p.sample(key, 2000))
    return Case((p if right else _wrong(p), theta), {}, {"reference": nll(p, theta)}, right)


def _c2st_case(key, right):
    p = _target()
    k1, k2 = jax.random.split(key)
    q = p if right else _wrong(p)
    return Case((np.asarray(p.sample(k1, 500)), np.asarray(q.sample(k2, 500))), {},
                {"n": 500}, right)


def _mmd_case(key, right):
    p = _target()
    k1, k2, k3 = jax.random.split(key, 3)
    q = p if right else _wrong(p)
    return Case((k3, np.asarray(p.sample(k1, 500)), np.asarray(q.sample(k2, 500))), {}, {},
                right)


def _khat_case(key, right):
    p = _target()
    approx = _distorted(p, cov_factor=1.5 if right else 0.1)
    return Case((key, approx, p.log_prob), {"n": 4000}, {}, right)


def _calibration_case(key, right):
    import flashbayes as fb

    exact = PosteriorModel.exact(fb.tasks.get("gmm_linear"))
    return Case((key, exact if right else scale_covariance(exact, 0.5)), {"n_sims": 500}, {},
                right)


def _c2st_bound(n: int) -> float:
    """Accuracy 3 binomial standard errors above chance for 2n test points."""
    return 0.5 + 3.0 * 0.5 / np.sqrt(2 * n)


_ENTRIES = [
    Diagnostic(
        name="kl", function=kl_divergence,
        description="Monte Carlo KL(p || q) = E_p[log p - log q] between a reference p and an "
                    "approximation q, with its standard error",
        criterion=f"KL < {KL_TOLERANCE} nats (the project's accuracy target)",
        reference="Kullback and Leibler (1951)",
        case=_kl_case, verdict=lambda r, ctx: r[0] < KL_TOLERANCE),
    Diagnostic(
        name="nll", function=nll,
        description="negative log density of the true parameter(s) under a posterior (mean over "
                    "a batch of thetas)",
        criterion=f"mean NLL minus the reference posterior's mean NLL on the same thetas < "
                  f"{KL_TOLERANCE} nats (an estimate of KL(reference || q))",
        reference="Lueckmann et al. (2021), Benchmarking simulation-based inference",
        case=_nll_case, verdict=lambda r, ctx: r - ctx["reference"] < KL_TOLERANCE),
    Diagnostic(
        name="c2st", function=c2st,
        description="classifier two-sample test: cross-validated accuracy of an MLP telling "
                    "reference draws from approximate draws",
        criterion="accuracy < 0.5 + 3 binomial standard errors (0.547 for 2 x 500 draws)",
        reference="Lopez-Paz and Oquab (2017); protocol of Lueckmann et al. (2021)",
        case=_c2st_case, verdict=lambda r, ctx: r < _c2st_bound(ctx["n"])),
    Diagnostic(
        name="mmd", function=mmd,
        description="unbiased squared maximum mean discrepancy with a Gaussian kernel (median "
                    "heuristic) and a permutation-test p-value",
        criterion="permutation p-value > 0.05",
        reference="Gretton et al. (2012), A kernel two-sample test",
        case=_mmd_case, verdict=lambda r, ctx: r.passed),
    Diagnostic(
        name="khat", function=importance_khat,
        description="Pareto k-hat of the importance ratios target / approximation over draws of "
                    "the approximation (PSIS, ArviZ)",
        criterion="k-hat < min(1 - 1/log10(S), 0.7) for S draws",
        reference="Vehtari et al. (2024), Pareto smoothed importance sampling; Yao et al. "
                  "(2018), Yes, but did it work?",
        case=_khat_case, verdict=lambda r, ctx: r.passed),
    Diagnostic(
        name="sbc", function=sbc,
        description="simulation-based calibration: ranks of the true theta among posterior "
                    "draws per dimension and of log q(theta) among log q(draws), over the task's "
                    "prior predictive",
        criterion="chi-square uniformity p-value of every rank statistic > 0.05 / (d + 1) "
                  "(Bonferroni)",
        reference="Talts et al. (2018), Validating Bayesian inference algorithms with "
                  "simulation-based calibration",
        case=_calibration_case, verdict=lambda r, ctx: r.passed),
    Diagnostic(
        name="coverage", function=expected_coverage,
        description="expected coverage of highest-posterior-density regions at every "
                    "credibility level, over the task's prior predictive",
        criterion="max |ECP(alpha) - alpha| below the 95% Kolmogorov-Smirnov bound for n_sims "
                  "simulations",
        reference="Hermans et al. (2022), A trust crisis in simulation-based inference?",
        case=_calibration_case, verdict=lambda r, ctx: r.passed),
    Diagnostic(
        name="tarp", function=tarp,
        description="tests of accuracy with random points: coverage of balls around random "
                    "reference points, with the area statistic",
        criterion="max |ECP(alpha) - alpha| below the 95% Kolmogorov-Smirnov bound for n_sims "
                  "simulations",
        reference="Lemos et al. (2023), Sampling-based accuracy testing of posterior estimators "
                  "for general inference",
        case=_calibration_case, verdict=lambda r, ctx: r.passed),
]
_REGISTRY = {d.name: d for d in _ENTRIES}


def names() -> list[str]:
    """Registered diagnostic names, in the order of the documentation.

    Example:
        >>> import flashbayes as fb
        >>> fb.diagnostics.names()
        ['kl', 'nll', 'c2st', 'mmd', 'khat', 'sbc', 'coverage', 'tarp']
    """
    return list(_REGISTRY)


def get(name: str) -> Diagnostic:
    """The diagnostic registered as `name`.

    Example:
        >>> import flashbayes as fb
        >>> fb.diagnostics.get("sbc").function is fb.diagnostics.sbc
        True
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"diagnostic: expected one of {', '.join(_REGISTRY)}; got {name!r}")
    return _REGISTRY[name]
