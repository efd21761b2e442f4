"""`logistic_regression`: GMM prior over (w1, w2, b); Bernoulli-logit data; reference is NUTS."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes.tasks._base import GMMFamilyPrior, Task, register


@register("logistic_regression")
class LogisticRegression(GMMFamilyPrior, Task):
    """theta = (w_1..w_p, b); rows (x_1..x_p, y) with x ~ N(0, I), y ~ Bernoulli(sigmoid(w.x + b)).

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> task = fb.tasks.get("logistic_regression")
        >>> task.sample_problem(jax.random.key(0), n=7).data.shape
        (7, 3)
    """

    description = "GMM prior over logistic-regression weights and bias (reference: NUTS)"
    has_exact = False

    def __init__(self, *, n_covariates: int = 2, n_min: int = 1, n_max: int = 50, k_min: int = 1,
                 k_max: int = 5, mean_range: tuple[float, float] = (-3.0, 3.0),
                 scale_range: tuple[float, float] = (0.2, 1.5)):
        self.p = int(n_covariates)
        self.theta_dim = self.p + 1
        self.data_dim = self.p + 1
        self.n_min, self.n_max = int(n_min), int(n_max)
        self.k_min, self.k_max = int(k_min), int(k_max)
        self.mean_range, self.scale_range = tuple(mean_range), tuple(scale_range)

    def _simulate(self, key, theta, n):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (n, self.p))
        logits = x @ theta[: self.p] + theta[self.p]
        y = jax.random.bernoulli(ky, jax.nn.sigmoid(logits)).astype(x.dtype)
        return jnp.concatenate([x, y[:, None]], axis=1)

    def log_likelihood(self, theta, data, mask=None):
        x, y = data[..., : self.p], data[..., self.p]
        logits = x @ theta[: self.p] + theta[self.p]
        ll = y * jax.nn.log_sigmoid(logits) + (1 - y) * jax.nn.log_sigmoid(-logits)
        if mask is not None:
            ll = jnp.where(mask, ll, 0.0)
        return jnp.sum(ll)

    def data_out_of_range(self, data):
        # training covariates are standard normal: |x| > 6 has probability 2e-9 per entry
        big = float(np.max(np.abs(data[:, : self.p]), initial=0.0))
        if big > 6.0:
            return (f"covariates up to |x| = {big:.3g}; the model was trained on standard-normal "
                    "covariates (|x| <= 6)")
        return ""

    def validate_data(self, data):
        x = super().validate_data(data)
        y = x[:, self.p]
        if x.shape[0] and not (set(map(float, y)) <= {0.0, 1.0}):
            raise ValueError("data: expected the last column y to be 0 or 1; got other values")
        return x
