"""Maximum mean discrepancy (MMD) two-sample test with a Gaussian kernel."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jaxtyping import Array


@dataclasses.dataclass(frozen=True)
class MMDResult:
    """Outcome of `mmd`.

    Attributes:
        value: unbiased estimate of the squared MMD (can be slightly negative when the two
            distributions are equal).
        p_value: permutation-test p-value of the hypothesis that both samples come from the
            same distribution.
        bandwidth: the Gaussian kernel's length scale.
        n_permutations: permutations used for the p-value.
        level: the test's level.
        passed: `p_value > level` (no detectable difference).
    """

    value: float
    p_value: float
    bandwidth: float
    n_permutations: int
    level: float
    passed: bool


def _as_points(name: str, a: Any) -> np.ndarray:
    try:
        arr = np.asarray(a, np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected an array of numbers; got {type(a).__name__}") from exc
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name}: expected an array (n, d) with n >= 2; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values; got NaN or inf")
    return arr


def mmd(key: Array, x: Any, y: Any, *, bandwidth: float | None = None,
        n_permutations: int = 200, max_points: int = 1000, level: float = 0.05) -> MMDResult:
    """Squared maximum mean discrepancy between two samples, with a permutation test.

    The kernel is k(a, b) = exp(-|a - b|^2 / (2 h^2)); by default h is the median distance
    between distinct points of the pooled sample (median heuristic). The estimate is the
    unbiased U-statistic of Gretton et al. (2012). The p-value is (1 + #{permuted >= observed})
    / (1 + n_permutations), over random relabellings of the pooled points. Samples larger than
    `max_points` are subsampled at random to `max_points` (the pooled kernel matrix has
    (2 max_points)^2 entries: 32 MB at the default).

    Args:
        key: PRNG key (subsampling and permutations).
        x: first sample, shape (n, d) (or (n,) for d = 1).
        y: second sample, shape (m, d).
        bandwidth: kernel length scale h; median heuristic if None.
        n_permutations: relabellings for the p-value.
        max_points: largest sample size used from each of x and y.
        level: level of the test; `passed` is `p_value > level`.

    Example:
        >>> import jax, numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(300, 2)), rng.normal(size=(300, 2))
        >>> mmd(jax.random.key(0), a, b).passed
        True
        >>> mmd(jax.random.key(0), a, b + 0.5).passed
        False
    """
    x, y = _as_points("x", x), _as_points("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd: expected samples of the same dimension; got {x.shape[1]} and "
                         f"{y.shape[1]}")
    if not (isinstance(n_permutations, int) and n_permutations >= 1):
        raise ValueError(f"n_permutations: expected a positive integer; got {n_permutations!r}")
    if not (isinstance(max_points, int) and max_points >= 2):
        raise ValueError(f"max_points: expected an integer >= 2; got {max_points!r}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a value in (0, 1); got {level}")
    if bandwidth is not None and not (np.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth: expected a positive number; got {bandwidth}")
    kx, ky, kp = jax.random.split(key, 3)
    if len(x) > max_points:
        x = x[np.asarray(jax.random.permutation(kx, len(x)))[:max_points]]
    if len(y) > max_points:
        y = y[np.asarray(jax.random.permutation(ky, len(y)))[:max_points]]
    n, m = len(x), len(y)
    z = np.concatenate([x, y])
    sq = np.sum(z**2, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    if bandwidth is None:
        dist = np.sqrt(d2[np.triu_indices(len(z), 1)])
        dist = dist[dist > 0]
        bandwidth = float(np.median(dist)) if dist.size else 1.0
    kern = np.exp(-d2 / (2.0 * bandwidth**2))
    np.fill_diagonal(kern, 0.0)  # the U-statistic leaves out i = j
    total = kern.sum()
    row = kern.sum(1)

    def statistic(ind: np.ndarray) -> np.ndarray:
        # ind: (N, P) indicators of the first group; sums of the within / between blocks
        s_xx = np.sum(ind * (kern @ ind), 0)
        s_x_all = row @ ind
        s_xy = s_x_all - s_xx
        s_yy = total - 2.0 * s_x_all + s_xx
        return s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)

    observed = statistic(np.r_[np.ones(n), np.zeros(m)][:, None])[0]
    perms = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, n + m))(
        jax.random.split(kp, n_permutations)))
    ind = np.zeros((n + m, n_permutations))
    np.put_along_axis(ind, perms[:, :n].T, 1.0, axis=0)
    null = statistic(ind)
    p_value = float((1 + np.sum(null >= observed)) / (1 + n_permutations))
    return MMDResult(value=float(observed), p_value=p_value, bandwidth=float(bandwidth),
                     n_permutations=n_permutations, level=float(level),
                     passed=bool(p_value > level))
