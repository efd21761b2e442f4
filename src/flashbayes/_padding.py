"""Padding of priors and data sets to fixed shapes, so that compiled functions are reused."""

from __future__ import annotations

import numpy as np


def size_bucket(n: int) -> int:
    """Padded length for a data set of n rows: 4, 6, 8, 12, 16, 24, 32, 48, ..."""
    b = 4
    while b < n:
        b = b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
    return b


def pad_prior(prior, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A GMM's (weights, means, scale_tril, component mask) padded to k >= K components
    (padding: weight 0, mean 0, identity factor, mask False)."""
    kp, d = prior.n_components, prior.dim
    w = np.zeros(k, np.float32)
    m = np.zeros((k, d), np.float32)
    s = np.empty((k, d, d), np.float32)
    s[kp:] = np.eye(d, dtype=np.float32)
    w[:kp] = np.asarray(prior.weights)
    m[:kp] = np.asarray(prior.means)
    s[:kp] = np.asarray(prior.scale_tril)
    return w, m, s, np.arange(k) < kp


def pad_rows(x: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Data rows (n, p) padded with zeros to (width, p), and the mask of the real rows."""
    n = x.shape[0]
    xp = np.zeros((width, x.shape[1]), np.float32)
    xp[:n] = x
    return xp, np.arange(width) < n
