"""Pareto k-hat of importance weights (PSIS, through ArviZ)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from jaxtyping import Array

from flashbayes._arviz import arviz

# log ratios whose spread is below this are treated as constant (weights equal to 1e-5)
_CONSTANT_SPREAD = 1e-5


@dataclasses.dataclass(frozen=True)
class PSISResult:
    """Outcome of `psis_khat` and `importance_khat`.

    Attributes:
        khat: estimated shape of the generalised Pareto tail of the importance ratios
            (`-inf` when the ratios are constant: the approximation equals the target up to
            normalisation).
        threshold: the sample-size dependent bound min(1 - 1 / log10(S), 0.7) of Vehtari et al.
            (2024); above it the importance-sampling estimates are unreliable.
        ess: effective sample size 1 / sum(w^2) of the smoothed normalised weights.
        log_weights: (S,) Pareto-smoothed, normalised log weights.
        passed: `khat < threshold`.
    """

    khat: float
    threshold: float
    ess: float
    log_weights: np.ndarray
    passed: bool


def khat_threshold(n: int) -> float:
    """min(1 - 1 / log10(n), 0.7): the k-hat above which PSIS with n draws is unreliable."""
    return min(1.0 - 1.0 / math.log10(n), 0.7)


def psis_khat(log_ratios: Any) -> PSISResult:
    """Pareto-smoothed importance sampling diagnostic of log importance ratios.

    `log_ratios[s] = log p(theta_s) - log q(theta_s)` for draws theta_s from an approximation q
    of a target p (p may be unnormalised). ArviZ's `psislw` fits a generalised Pareto
    distribution to the largest ratios; its shape k-hat says how heavy the tail of the weights
    is. k-hat above `khat_threshold(S)` (0.7 for S >= 2,154 draws) means the weights, and so any
    importance-sampling correction of q towards p, are unreliable (Vehtari et al. 2024).

    Args:
        log_ratios: (S,) log importance ratios, S >= 100; -inf allowed (target density zero).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=4000) * 2.0         # q = N(0, 2^2), target p = N(0, 1)
        >>> res = psis_khat(-0.5 * x**2 + 0.5 * (x / 2.0) ** 2)
        >>> res.passed, res.khat < 0.5
        (True, True)
    """
    lr = np.asarray(log_ratios, np.float64)
    if lr.ndim != 1 or lr.shape[0] < 100:
        raise ValueError(f"log_ratios: expected a 1-D array of at least 100 values; got shape "
                         f"{lr.shape}")
    if np.any(np.isnan(lr)) or np.any(lr == np.inf):
        raise ValueError("log_ratios: expected finite values or -inf; got NaN or +inf")
    if not np.any(np.isfinite(lr)):
        raise ValueError("log_ratios: expected at least one finite value; got all -inf")
    n = lr.shape[0]
    threshold = khat_threshold(n)
    finite = lr[np.isfinite(lr)]
    if finite.size == n and np.ptp(finite) < _CONSTANT_SPREAD:
        lw = np.full(n, -math.log(n))
        return PSISResult(khat=-math.inf, threshold=threshold, ess=float(n), log_weights=lw,
                          passed=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about high k-hat; we report it instead
        lw, k = arviz().psislw(lr.copy(), reff=1.0)  # psislw works in place
    lw = np.asarray(lw, np.float64)
    khat = float(k)
    ess = float(1.0 / np.sum(np.exp(2.0 * lw)))
    return PSISResult(khat=khat, threshold=threshold, ess=ess, log_weights=lw,
                      passed=bool(khat < threshold))


def importance_khat(key: Array, approx: Any, log_density: Callable[[Any], Any], *,
                    n: int = 4000) -> PSISResult:
    """k-hat of the importance weights target / approximation, from n draws of the approximation.

    Args:
        key: PRNG key for the draws.
        approx: the approximation q (needs `sample(key, n)` and `log_prob`), e.g. an amortized
            posterior.
        log_density: log density of the target p, possibly unnormalised (e.g. log prior + log
            likelihood); called on the (n, d) array of draws, returns (n,) values (wrap a
            per-point function with `jax.vmap`).
        n: draws, at least 100.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> p = fb.GMM(weights=[1.0], means=[[0.0]], scale_tril=[[[1.0]]])
        >>> too_narrow = fb.GMM(weights=[1.0], means=[[0.0]], scale_tril=[[[0.4]]])
        >>> importance_khat(jax.random.key(0), too_narrow, p.log_prob).passed
        False
    """
    if not (isinstance(n, int) and n >= 100):
        raise ValueError(f"n: expected an integer >= 100; got {n!r}")
    draws = approx.sample(key, n)
    log_q = np.asarray(approx.log_prob(draws), np.float64)
    log_p = np.asarray(log_density(draws), np.float64)
    if log_p.shape != (n,):
        raise ValueError(f"log_density: expected ({n},) values for ({n}, d) draws; got shape "
                         f"{log_p.shape}")
    return psis_khat(log_p - log_q)
