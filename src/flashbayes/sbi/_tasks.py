"""The sbibm benchmark tasks (Lueckmann et al. 2021) as a registry of prior + simulator pairs.

Each task has a NumPyro prior over the flat parameter vector theta (d,), a JAX simulator
``simulator(key, theta) -> x`` of one theta, the parameter names of the sbibm sample files, and
a log-likelihood ``log_likelihood(theta, x)`` (for the Bernoulli GLM up to a term that does not
depend on theta, which cancels in likelihood ratios and posteriors). The models follow the
specifications in ``shared/benchmarks/sbibm/TASKS.md``; nothing here needs the shared data,
which `load_observation` and `load_reference_samples` read when it is present.

Example:
    >>> import jax
    >>> from flashbayes.sbi import tasks
    >>> task = tasks.get("slcp")
    >>> theta = task.prior().sample(jax.random.key(0))
    >>> task.simulator(jax.random.key(1), theta).shape
    (8,)
"""

from __future__ import annotations

import bz2
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SBITask", "get", "load_observation", "load_reference_samples", "load_true_parameters",
           "names"]

N_OBSERVATIONS = 5  # observations 1..5 are in the shared folder; 6..10 are held out


@dataclass(frozen=True)
class SBITask:
    """One benchmark task.

    Attributes:
        name: registry name (the sbibm folder name).
        dim_theta, dim_x: sizes of theta and of one simulation.
        parameter_names: column names of theta in the sbibm sample files.
        prior: builds the NumPyro prior over theta (d,) (a function, so nothing is built at import).
        simulator: ``simulator(key, theta) -> x`` for one theta; jit- and vmap-able.
        log_likelihood: ``log_likelihood(theta, x) -> scalar`` (up to a theta-free constant).
        budgets: the simulation budgets of the sbibm paper.
        exact_posterior: ``exact_posterior(key, x, n) -> (n, d)`` exact posterior draws for
            any observation, where the posterior has a closed form (else None), so that
            estimators can be checked on observations of our own.
        symmetry: ``symmetry(key, draws) -> draws`` maps draws to a random image under a
            symmetry of the posterior (for slcp the sign flips of theta_3 and theta_4), or None.
        npe_options: keyword arguments of `flashbayes.sbi.train_npe` that fit the structure of
            the task's data, as (name, value) pairs; the benchmarks and ``flashbayes sbi
            train`` pass them. slcp's x is four i.i.d. 2-D points, so it goes through the
            permutation-invariant set embedding (``embedding="set", set_points=4``), and it
            trains spline flows only (``head="nsf"``): in the default ``"nsf+maf"`` mixture its
            autoregressive flows got under 1 % of the stacking weight on the validation split at
            10^4 simulations, yet took more than half the training epochs.
    """

    name: str
    dim_theta: int
    dim_x: int
    parameter_names: tuple[str, ...]
    prior: Callable[[], Any]
    simulator: Callable[[jax.Array, jax.Array], jax.Array]
    log_likelihood: Callable[[jax.Array, jax.Array], jax.Array]
    budgets: tuple[int, ...]
    exact_posterior: Callable[[jax.Array, Any, int], np.ndarray] | None = None
    symmetry: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    npe_options: tuple[tuple[str, Any], ...] = ()

    @property
    def npe_kwargs(self) -> dict[str, Any]:
        """`npe_options` as a dict, for ``train_npe(..., **task.npe_kwargs)``."""
        return dict(self.npe_options)

    def npe_settings(self, head: str | None = None) -> dict[str, Any]:
        """`npe_kwargs` with the head spelled out: `head` where one is given, else the task's
        own (``"nsf+maf"`` unless its `npe_options` name another).

        Example:
            >>> from flashbayes.sbi import tasks
            >>> tasks.get("slcp").npe_settings()["head"], tasks.get("sir").npe_settings()["head"]
            ('nsf', 'nsf+maf')
            >>> tasks.get("slcp").npe_settings("maf")["head"]
            'maf'
        """
        settings = {"head": "nsf+maf", **self.npe_kwargs}
        if head is not None:
            settings["head"] = head
        return settings

    def reference_posterior(self, key: jax.Array, x: Any, n: int) -> np.ndarray:
        """n draws (n, d) from p(theta | x) for any observation x: the closed form where there
        is one, else a 2-D grid (sir) or NUTS (see `flashbayes.sbi._reference`)."""
        from flashbayes.sbi._reference import reference_posterior

        return reference_posterior(self, key, x, n)

    def log_joint(self, theta: jax.Array, x: jax.Array) -> jax.Array:
        """log prior(theta) + log_likelihood(theta, x) (-inf outside the prior's support)."""
        return self.prior().log_prob(theta) + self.log_likelihood(theta, x)


def _names(d: int) -> tuple[str, ...]:
    return tuple(f"parameter_{i + 1}" for i in range(d))


# -- Gaussian linear / Gaussian linear uniform ----------------------------------------------------

_GL_VAR = 0.1  # prior and noise covariance scalar (a variance, see TASKS.md)


def _gl_prior():
    import numpyro.distributions as dist

    return dist.Normal(jnp.zeros(10), jnp.sqrt(_GL_VAR)).to_event(1)


def _glu_prior():
    import numpyro.distributions as dist

    return dist.Uniform(-jnp.ones(10), jnp.ones(10)).to_event(1)


def _gl_simulator(key, theta):
    return theta + jnp.sqrt(_GL_VAR) * jax.random.normal(key, theta.shape)


def _gl_log_likelihood(theta, x):
    return jax.scipy.stats.norm.logpdf(x, theta, jnp.sqrt(_GL_VAR)).sum(-1)


def _gl_exact(key, x, n):
    """N(x / 2, 0.05 I): prior and noise both N(., 0.1 I)."""
    x = jnp.asarray(x, jnp.float32)
    return np.asarray(x / 2 + jnp.sqrt(_GL_VAR / 2) * jax.random.normal(key, (n, x.shape[-1])))


def _glu_exact(key, x, n):
    """Independent normals N(x_i, 0.1) truncated to [-1, 1]."""
    x = jnp.asarray(x, jnp.float32)
    sd = jnp.sqrt(_GL_VAR)
    z = jax.random.truncated_normal(key, (-1 - x) / sd, (1 - x) / sd, (n, x.shape[-1]))
    return np.asarray(x + sd * z)


def _gm_exact(key, x, n):
    """0.5 N(x, I) + 0.5 N(x, 0.01 I) truncated to the box [-10, 10]^2 (by rejection)."""
    x = np.asarray(x, np.float64)
    out, got = [], 0
    while got < n:
        key, k_c, k_z = jax.random.split(key, 3)
        m = 2 * (n - got) + 100
        scale = np.where(np.asarray(jax.random.bernoulli(k_c, 0.5, (m,))), *_GM_SCALES)
        draw = x + scale[:, None] * np.asarray(jax.random.normal(k_z, (m, 2)), np.float64)
        draw = draw[np.all(np.abs(draw) < 10.0, axis=1)]
        out.append(draw)
        got += len(draw)
    return np.concatenate(out)[:n].astype(np.float32)


# -- Gaussian mixture -----------------------------------------------------------------------------

_GM_SCALES = (1.0, 0.1)


def _gm_prior():
    import numpyro.distributions as dist

    return dist.Uniform(jnp.full(2, -10.0), jnp.full(2, 10.0)).to_event(1)


def _gm_simulator(key, theta):
    k_c, k_z = jax.random.split(key)
    scale = jnp.where(jax.random.bernoulli(k_c, 0.5), _GM_SCALES[0], _GM_SCALES[1])
    return theta + scale * jax.random.normal(k_z, theta.shape)


def _gm_log_likelihood(theta, x):
    comps = jnp.stack([jax.scipy.stats.norm.logpdf(x, theta, s).sum(-1) for s in _GM_SCALES], -1)
    return jax.scipy.special.logsumexp(comps, axis=-1) + jnp.log(0.5)


# -- Bernoulli GLM --------------------------------------------------------------------------------

_GLM_T = 100
_GLM_LAGS = 9


@functools.cache
def glm_stimulus() -> np.ndarray:
    """The fixed white-noise stimulus I_t, t = 0..99 (float32, as in sbibm)."""
    return np.random.RandomState(42).randn(_GLM_T).astype(np.float32)


@functools.cache
def glm_design_matrix() -> np.ndarray:
    """X (100, 10): a column of ones, then the stimulus delayed by 0..8 steps (zeros before t=0)."""
    stim = glm_stimulus().astype(np.float64)
    design = np.zeros((_GLM_T, 1 + _GLM_LAGS))
    design[:, 0] = 1.0
    for j in range(_GLM_LAGS):
        design[j:, 1 + j] = stim[: _GLM_T - j]
    return design


@functools.cache
def glm_prior_precision() -> np.ndarray:
    """B (10, 10): 0.5 for the offset; F^T F for the filter, F = D D + diag(sqrt(i / 9))."""
    d = np.eye(_GLM_LAGS) - np.eye(_GLM_LAGS, k=-1)
    f = d @ d + np.diag(np.sqrt(np.arange(_GLM_LAGS) / _GLM_LAGS))
    prec = np.zeros((1 + _GLM_LAGS, 1 + _GLM_LAGS))
    prec[0, 0] = 0.5
    prec[1:, 1:] = f.T @ f
    return prec


def _glm_prior():
    import numpyro.distributions as dist

    return dist.MultivariateNormal(jnp.zeros(10),
                                   precision_matrix=jnp.asarray(glm_prior_precision(), jnp.float32))


def _glm_simulator(key, theta):
    design = jnp.asarray(glm_design_matrix(), jnp.float32)
    spikes = jax.random.bernoulli(key, jax.nn.sigmoid(design @ theta)).astype(jnp.float32)
    return design.T @ spikes


def _glm_log_likelihood(theta, x):
    design = jnp.asarray(glm_design_matrix(), jnp.float32)
    return theta @ x - jnp.sum(jax.nn.softplus(design @ theta), axis=-1)


# -- SLCP -----------------------------------------------------------------------------------------


def _slcp_prior():
    import numpyro.distributions as dist

    return dist.Uniform(jnp.full(5, -3.0), jnp.full(5, 3.0)).to_event(1)


def _slcp_mean_cov(theta):
    s1, s2 = theta[2] ** 2, theta[3] ** 2
    rho = jnp.tanh(theta[4])
    cov = jnp.array([[s1 ** 2 + 1e-6, rho * s1 * s2], [rho * s1 * s2, s2 ** 2 + 1e-6]])
    return theta[:2], cov


def _slcp_simulator(key, theta):
    mean, cov = _slcp_mean_cov(theta)
    z = jax.random.multivariate_normal(key, mean, cov, shape=(4,), method="svd")
    return z.reshape(8)


def _slcp_flip_signs(key, draws):
    """The likelihood depends on theta_3 and theta_4 through their squares and the prior box is
    symmetric, so flipping their signs maps the posterior onto itself: flip each at random."""
    signs = jnp.where(jax.random.bernoulli(key, 0.5, (draws.shape[0], 2)), -1.0, 1.0)
    return draws.at[:, 2:4].multiply(signs.astype(draws.dtype))


def _slcp_log_likelihood(theta, x):
    mean, cov = _slcp_mean_cov(theta)
    return jax.scipy.stats.multivariate_normal.logpdf(x.reshape(4, 2), mean, cov).sum()


# -- SIR ------------------------------------------------------------------------------------------

SIR_POPULATION = 1_000_000
SIR_DAYS = 160.0
SIR_OBS_DAYS = tuple(17.0 * k for k in range(10))
SIR_TRIALS = 1000


def _sir_prior():
    import numpyro.distributions as dist

    return dist.LogNormal(jnp.log(jnp.array([0.4, 0.125])), jnp.array([0.5, 0.2])).to_event(1)


def sir_infected_fraction(theta: jax.Array) -> jax.Array:
    """I(t_k) / N at the ten observation days, by an adaptive Tsit5 solve (NaN if it fails).

    The ODE is solved for the fractions (S, I, R) / N, which is the same system with N = 1.
    """
    import diffrax

    beta, gamma = theta[0], theta[1]

    def field(t, y, args):
        s, i, _ = y
        infect = beta * s * i
        return jnp.stack([-infect, infect - gamma * i, gamma * i])

    y0 = jnp.array([1.0 - 1.0 / SIR_POPULATION, 1.0 / SIR_POPULATION, 0.0])
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field), diffrax.Tsit5(), t0=0.0, t1=SIR_DAYS, dt0=0.1, y0=y0,
        saveat=diffrax.SaveAt(ts=jnp.asarray(SIR_OBS_DAYS)),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-9),
        max_steps=20_000, throw=False)
    ok = sol.result == diffrax.RESULTS.successful
    return jnp.where(ok, sol.ys[:, 1], jnp.nan)


def _sir_simulator(key, theta):
    p = jnp.clip(sir_infected_fraction(theta), 0.0, 1.0)  # NaN stays NaN: a failed solve
    return jax.random.binomial(key, SIR_TRIALS, p).astype(jnp.float32)


def _sir_log_likelihood(theta, x):
    p = jnp.clip(sir_infected_fraction(theta), 1e-12, 1.0 - 1e-12)
    return jnp.sum(jax.scipy.stats.binom.logpmf(x, SIR_TRIALS, p))


# -- registry -------------------------------------------------------------------------------------

_REGISTRY: dict[str, SBITask] = {
    t.name: t for t in (
        SBITask("gaussian_linear", 10, 10, _names(10), _gl_prior, _gl_simulator,
                _gl_log_likelihood, (100, 1000, 10_000, 100_000, 1_000_000), _gl_exact),
        SBITask("gaussian_linear_uniform", 10, 10, _names(10), _glu_prior, _gl_simulator,
                _gl_log_likelihood, (100, 1000, 10_000, 100_000, 1_000_000), _glu_exact),
        SBITask("gaussian_mixture", 2, 2, _names(2), _gm_prior, _gm_simulator,
                _gm_log_likelihood, (100, 1000, 10_000, 100_000, 1_000_000), _gm_exact),
        SBITask("bernoulli_glm", 10, 10, _names(10), _glm_prior, _glm_simulator,
                _glm_log_likelihood, (1000, 10_000, 100_000, 1_000_000)),
        SBITask("slcp", 5, 8, _names(5), _slcp_prior, _slcp_simulator, _slcp_log_likelihood,
                (1000, 10_000, 100_000, 1_000_000), symmetry=_slcp_flip_signs,
                npe_options=(("embedding", "set"), ("set_points", 4), ("head", "nsf"))),
        SBITask("sir", 2, 10, ("$\\beta$", "$\\gamma$"), _sir_prior, _sir_simulator,
                _sir_log_likelihood, (100, 1000, 10_000, 100_000, 1_000_000)),
    )
}


def names() -> list[str]:
    """The registered task names.

    Example:
        >>> from flashbayes.sbi import tasks
        >>> tasks.names()[:2]
        ['gaussian_linear', 'gaussian_linear_uniform']
    """
    return list(_REGISTRY)


def get(name: str) -> SBITask:
    """The task called `name`.

    Raises:
        ValueError: no such task.

    Example:
        >>> from flashbayes.sbi import tasks
        >>> tasks.get("sir").parameter_names
        ('$\\\\beta$', '$\\\\gamma$')
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"task: expected one of {names()}; got {name!r}")
    return _REGISTRY[name]


# -- shared reference data ------------------------------------------------------------------------


def _observation_dir(name: str, k: int):
    from flashbayes._shared import shared_benchmarks_dir

    get(name)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= N_OBSERVATIONS:
        raise ValueError(f"observation: expected an integer in 1..{N_OBSERVATIONS}; got {k!r}")
    return shared_benchmarks_dir("sbibm") / name / f"num_observation_{int(k)}"


def _read_row(path) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)[0]


def load_observation(name: str, k: int) -> np.ndarray:
    """Observation k (1..5) of task `name` from the shared sbibm data, shape (dim_x,).

    Raises:
        SharedDataMissing: the shared data folder was not found.
    """
    return _read_row(_observation_dir(name, k) / "observation.csv")


def load_true_parameters(name: str, k: int) -> np.ndarray:
    """The theta (dim_theta,) that generated observation k."""
    return _read_row(_observation_dir(name, k) / "true_parameters.csv")


def load_reference_samples(name: str, k: int) -> np.ndarray:
    """The 10,000 reference posterior draws (10000, dim_theta) for observation k.

    The header must name the task's parameters, in order.
    """
    path = _observation_dir(name, k) / "reference_posterior_samples.csv.bz2"
    with bz2.open(path, "rt") as fh:
        header = tuple(fh.readline().strip().split(","))
        expected = get(name).parameter_names
        if header != expected:
            raise ValueError(f"{path}: expected columns {list(expected)}; got {list(header)}")
        return np.loadtxt(fh, delimiter=",", ndmin=2, dtype=np.float64)
