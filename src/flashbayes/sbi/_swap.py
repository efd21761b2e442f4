"""Prior swap: a posterior learned under one prior, re-weighted to another prior.

For an observation x, q(theta | x) was trained under the prior p0. Under a new prior p1 the
posterior is proportional to q(theta | x) p1(theta) / p0(theta), so draws of q re-weighted by
p1 / p0 target it. The weights are Pareto-smoothed (PSIS) and their k-hat says whether the
re-weighting can be trusted: when p1 puts its mass where q has few draws, it cannot, and the swap
is refused rather than returning a confident wrong answer.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
from jaxtyping import Array

from flashbayes.diagnostics._psis import PSISResult, psis_khat


class PriorSwapError(ValueError):
    """The importance weights of a prior swap are unreliable (k-hat above its threshold)."""


def _log_density(prior: Any, theta: np.ndarray, what: str) -> np.ndarray:
    log_prob = getattr(prior, "log_prob", None)
    if not callable(log_prob):
        raise TypeError(f"{what}: expected a distribution with log_prob (a NumPyro distribution "
                        f"over theta or a fb.GMM); got {type(prior).__name__}")
    with warnings.catch_warnings():  # NumPyro warns outside the support; -inf is the answer
        warnings.filterwarnings("ignore", message="Out-of-support")
        out = np.asarray(log_prob(theta), np.float64)
    if out.shape != (theta.shape[0],):
        raise ValueError(f"{what}: expected log_prob of ({theta.shape[0]}, {theta.shape[1]}) "
                         f"draws to have shape ({theta.shape[0]},); got {out.shape} (use "
                         "`.to_event(1)` for a NumPyro distribution with batch shape)")
    return out


#: largest share of the new prior's mass allowed outside the old prior's support
MAX_OUTSIDE = 0.01


def _mass_outside(old_prior: Any, new_prior: Any, key: Array, n: int) -> float:
    """Share of n draws of the new prior where the old prior's density is zero (0.0 when the
    new prior cannot be sampled)."""
    from flashbayes.distributions import GMM

    try:
        if isinstance(new_prior, GMM):
            draws = new_prior.sample(key, n)
        else:
            draws = new_prior.sample(key, (n,))
    except (AttributeError, TypeError, NotImplementedError):
        return 0.0
    draws = np.asarray(draws, np.float64)
    if draws.ndim != 2:
        return 0.0
    return float(np.mean(~np.isfinite(_log_density(old_prior, draws, "old_prior"))))


class SwappedPosterior:
    """Weighted draws of a posterior re-weighted to a new prior.

    Attributes:
        draws: (S, d) draws of the original posterior.
        psis: the PSIS result of the weights (k-hat, threshold, effective sample size, smoothed
            normalised log weights).
        weights: (S,) the normalised, Pareto-smoothed importance weights.
    """

    def __init__(self, draws: np.ndarray, psis: PSISResult):
        self.draws = draws
        self.psis = psis
        w = np.exp(psis.log_weights - np.max(psis.log_weights))
        self.weights = w / w.sum()  # (S,) normalised, Pareto-smoothed importance weights

    def sample(self, key: Array, n: int) -> np.ndarray:
        """n draws (n, d), resampled with replacement in proportion to the weights."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected a positive integer; got {n!r}")
        idx = jax.random.choice(key, self.draws.shape[0], (int(n),), p=self.weights)
        return self.draws[np.asarray(idx)]

    def mean(self) -> np.ndarray:
        """The self-normalised importance-sampling mean (d,)."""
        return self.weights @ self.draws

    def cov(self) -> np.ndarray:
        """The self-normalised importance-sampling covariance (d, d)."""
        c = self.draws - self.mean()
        return (self.weights[:, None] * c).T @ c


def prior_swap(posterior: Any, old_prior: Any, new_prior: Any, *, key: Array,
               n: int = 20_000, check: bool = True) -> SwappedPosterior:
    """Re-weight a posterior obtained under `old_prior` to `new_prior`.

    Args:
        posterior: q(theta | x) under the old prior: anything with `sample(key, n)` giving
            (n, d) draws, e.g. `est.posterior(x_obs)` of an NPE estimator or a `fb.GMM`.
        old_prior: the prior q was trained under (NumPyro distribution over (d,) or `fb.GMM`).
        new_prior: the prior to swap to (same kinds); it may be zero where the old one is not.
        key: PRNG key for the draws.
        n: draws of q to weight, at least 100.
        check: refuse (raise `PriorSwapError`) when k-hat is above its threshold, or when
            more than 1 % of the new prior's mass lies where the old prior is zero (the old
            posterior has no draws there, and k-hat cannot see that). With `check=False` the
            result is returned anyway; its `psis.passed` is then False where k-hat failed.

    Returns:
        A `SwappedPosterior` (weighted draws; `sample`, `mean`, `cov`, `psis`).

    Raises:
        PriorSwapError: the weights are unreliable: the new prior puts its mass where the old
            posterior has few draws, or outside the old prior's support. Train under the
            new prior (or a broader one) instead, or, with a GMM prior, use the Distribution
            Transformer, whose prior is an input.

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> from flashbayes import sbi
        >>> old = fb.GMM(weights=[1.0], means=[[0.0]], scale_tril=[[[1.0]]])
        >>> new = fb.GMM(weights=[1.0], means=[[1.0]], scale_tril=[[[1.0]]])
        >>> post = fb.GMM(weights=[1.0], means=[[0.5]], scale_tril=[[[0.5 ** 0.5]]])
        >>> swapped = sbi.prior_swap(post, old, new, key=jax.random.key(0))
        >>> bool(abs(swapped.mean()[0] - 1.0) < 0.02), swapped.psis.passed  # exact: 1.0
        (True, True)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 100:
        raise ValueError(f"n: expected an integer >= 100; got {n!r}")
    sample = getattr(posterior, "sample", None)
    if not callable(sample):
        raise TypeError(f"posterior: expected an object with sample(key, n); got "
                        f"{type(posterior).__name__}")
    draws = np.asarray(sample(key, int(n)), np.float64)
    if draws.ndim != 2 or draws.shape[0] != n:
        raise ValueError(f"posterior.sample: expected ({n}, d) draws; got {draws.shape}")
    if not np.all(np.isfinite(draws)):
        raise ValueError("posterior.sample: expected finite draws; got NaN or inf")
    log_old = _log_density(old_prior, draws, "old_prior")
    log_new = _log_density(new_prior, draws, "new_prior")
    if np.any(~np.isfinite(log_old)):
        raise ValueError(f"old_prior: expected a positive density at every posterior draw; "
                         f"{int(np.sum(~np.isfinite(log_old)))} of {n} draws fall outside it "
                         "(is it the prior the posterior was trained under?)")
    log_ratio = log_new - log_old
    if np.any(np.isnan(log_ratio)) or np.any(log_ratio == np.inf):
        raise ValueError("new_prior: expected finite log densities or -inf; got NaN or +inf")
    if not np.any(np.isfinite(log_ratio)):
        raise PriorSwapError("new_prior: it is zero at every posterior draw; the posterior "
                             "under it cannot be reached by re-weighting")
    outside = _mass_outside(old_prior, new_prior, jax.random.fold_in(key, 1), int(n)) \
        if check else 0.0
    if outside > MAX_OUTSIDE:
        raise PriorSwapError(
            f"prior swap: the new prior puts {outside:.1%} of its mass where the old prior is "
            f"zero (at most {MAX_OUTSIDE:.0%} allowed). The posterior trained under the old "
            "prior has no draws there, so re-weighting would cut the new posterior off at the "
            "old prior's support, whatever k-hat says: train under a prior that covers the new "
            "one, or use the Distribution Transformer, whose prior is an input; pass "
            "check=False to get the weighted draws anyway")
    psis = psis_khat(log_ratio)
    if check and not psis.passed:
        raise PriorSwapError(
            f"prior swap: importance weights are unreliable (k-hat {psis.khat:.2f} above the "
            f"threshold {psis.threshold:.2f}; effective sample size {psis.ess:.0f} of {n}). The "
            "new prior puts its mass where the posterior has few draws: train under the new "
            "prior or a broader one, or use the Distribution Transformer, whose prior is an "
            "input; pass check=False to get the weighted draws anyway")
    return SwappedPosterior(draws, psis)
