"""`gmm_linear`: GMM prior, linear-Gaussian likelihood, closed-form GMM posterior."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes.distributions import GMM
from flashbayes.tasks._base import GMMFamilyPrior, Task, register


def gaussian_sum_update(prior: GMM, a_mat: np.ndarray, noise_cov: np.ndarray,
                        data: np.ndarray) -> GMM:
    """Exact posterior of a GMM prior under x_i = A theta + eps_i, eps_i ~ N(0, noise_cov).

    Each component gets the Gaussian (Kalman) update; the weights are multiplied by each
    component's marginal likelihood of the data. Float64 throughout.
    """
    w = np.asarray(prior.weights, np.float64)
    mu = np.asarray(prior.means, np.float64)
    ls = np.asarray(prior.scale_tril, np.float64)
    x = np.asarray(data, np.float64).reshape(-1, a_mat.shape[0])
    n = x.shape[0]
    if n == 0:
        return GMM(weights=w, means=mu, scale_tril=ls)
    r_inv = np.linalg.inv(noise_cov)
    lam = n * a_mat.T @ r_inv @ a_mat
    h_data = a_mat.T @ r_inv @ x.sum(0)
    new_mu, new_l, logz = [], [], []
    for k in range(w.shape[0]):
        cov_k = ls[k] @ ls[k].T
        p_k = np.linalg.inv(cov_k)
        p_post = p_k + lam
        cov_post = np.linalg.inv(p_post)
        cov_post = 0.5 * (cov_post + cov_post.T)
        m_post = cov_post @ (p_k @ mu[k] + h_data)
        # log of the integral of N(theta; mu_k, cov_k) exp(h^T theta - theta^T lam theta / 2)
        lz = (0.5 * m_post @ p_post @ m_post - 0.5 * mu[k] @ p_k @ mu[k]
              + 0.5 * np.linalg.slogdet(cov_post)[1] - 0.5 * np.linalg.slogdet(cov_k)[1])
        new_mu.append(m_post)
        new_l.append(np.linalg.cholesky(cov_post))
        logz.append(lz)
    logw = np.log(np.maximum(w, 1e-300)) + np.array(logz)
    logw -= logw.max()
    new_w = np.exp(logw)
    new_w /= new_w.sum()
    return GMM(weights=new_w, means=np.array(new_mu), scale_tril=np.array(new_l))


@register("gmm_linear")
class GMMLinear(GMMFamilyPrior, Task):
    """theta in R^d with a GMM prior; x_i = A theta + eps_i, eps_i ~ N(0, noise_sd^2 I).

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("gmm_linear")
        >>> p = task.sample_problem(jax.random.key(0), n=5)
        >>> post = task.exact_posterior(p.prior, p.data)
        >>> post.n_components == p.prior.n_components
        True
    """

    description = "GMM prior, linear-Gaussian likelihood x = A theta + noise (exact posterior)"
    has_exact = True

    def __init__(self, *, a_matrix: Any = ((1.0, 0.5), (-0.3, 0.8)), noise_sd: float = 0.5,
                 n_min: int = 0, n_max: int = 20, k_min: int = 1, k_max: int = 5,
                 mean_range: tuple[float, float] = (-3.0, 3.0),
                 scale_range: tuple[float, float] = (0.2, 1.5)):
        self.A = np.asarray(a_matrix, np.float64)
        if self.A.ndim != 2:
            raise ValueError(f"a_matrix: expected a 2-D matrix; got shape {self.A.shape}")
        self.theta_dim = self.A.shape[1]
        self.data_dim = self.A.shape[0]
        self.noise_sd = float(noise_sd)
        self.noise_cov = self.noise_sd**2 * np.eye(self.data_dim)
        self.n_min, self.n_max = int(n_min), int(n_max)
        self.k_min, self.k_max = int(k_min), int(k_max)
        self.mean_range = tuple(mean_range)
        self.scale_range = tuple(scale_range)
        self._a = jnp.asarray(self.A, jnp.float32)

    def _simulate(self, key, theta, n):
        eps = jax.random.normal(key, (n, self.data_dim)) * self.noise_sd
        return theta @ self._a.T + eps

    def log_likelihood(self, theta, data, mask=None):
        resid = data - theta @ self._a.T
        ll = (-0.5 * jnp.sum(resid**2, -1) / self.noise_sd**2
              - self.data_dim * (math.log(self.noise_sd) + 0.5 * math.log(2 * math.pi)))
        if mask is not None:
            ll = jnp.where(mask, ll, 0.0)
        return jnp.sum(ll)

    def exact_posterior(self, prior: GMM, data: Any) -> GMM:
        """Closed-form GMM posterior (same number of components as the prior)."""
        if not isinstance(prior, GMM):
            raise TypeError(f"prior: expected a GMM; got {type(prior).__name__}")
        if prior.dim != self.theta_dim:
            raise ValueError(f"prior: expected dimension {self.theta_dim}; got {prior.dim}")
        x = self.validate_data(data)
        return gaussian_sum_update(prior, self.A, self.noise_cov, x)
