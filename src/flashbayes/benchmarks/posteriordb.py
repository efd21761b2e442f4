"""Thirteen posteriordb posteriors as NumPyro models, with their data and reference draws.

Each model reproduces its Stan program: the same priors (improper flat priors included), the same
constraints, and NumPyro sample sites named like the Stan parameters. Variables that the reference
draws hold but that are not Stan parameters are ``numpyro.deterministic`` sites (``theta`` of the
non-centred eight schools, ``f`` of the Poisson GP). A model is called as ``model(**post.data)``.
Arrays in the data are traced by JAX (models use only ``jax.numpy`` and ``jax.lax`` on them);
Python ints in the data (sizes, flags) are static.

The data and the reference draws are read from the shared data folder
(``<shared>/benchmarks/posteriordb``, see `flashbayes._shared.shared_benchmarks_dir`); the models
and the list of names live in the package.

Example:
    >>> from flashbayes.benchmarks import posteriordb
    >>> post = posteriordb.get("kidiq-kidscore_momiq")
    >>> post.param_names
    ('beta[1]', 'beta[2]', 'sigma')
    >>> sorted(posteriordb.flatten_draws({"beta": np.zeros((4, 2)), "sigma": np.ones(4)}))
    ['beta[1]', 'beta[2]', 'sigma']
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

from flashbayes._shared import SharedDataMissing, shared_benchmarks_dir
from flashbayes.reference._base import flat_names, flatten_sites

__all__ = ["Posterior", "SharedDataMissing", "flatten_draws", "get", "names"]


# --------------------------------------------------------------------------------------------
# helpers used by the models


def _real(x):
    """Data as a JAX array of the default float type (float32 unless x64 is enabled)."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _flat(event_shape: tuple[int, ...] = (), support=constraints.real):
    """Stan's implicit prior for a parameter with no prior statement: flat on its support."""
    if event_shape and support is constraints.real:
        support = constraints.real_vector
    return dist.ImproperUniform(support, (), event_shape)


def _iid(d: dist.Distribution, n: int) -> dist.Distribution:
    """`n` independent copies of a scalar distribution as one vector-valued site."""
    return d.expand([n]).to_event(1)


# --------------------------------------------------------------------------------------------
# the models


def ark(K, T, y, **unused):
    """AR(K) time series (``arK-arK``)."""
    y = _real(y)
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", _iid(dist.Normal(0.0, 10.0), K))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    if K:
        lags = jnp.stack([y[K - k : T - k] for k in range(1, K + 1)], axis=-1)  # (T - K, K)
        mu = alpha + lags @ beta
    else:
        mu = alpha
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y[K:])


def diamonds(N, Y, K, X, prior_only, **unused):
    """brms log-log regression with centred predictors (``diamonds-diamonds``)."""
    Y, X = _real(Y), _real(X)
    Xc = X[:, 1:] - jnp.mean(X[:, 1:], axis=0)  # brms: columns 2..K centred, no intercept column
    b = numpyro.sample("b", _iid(dist.Normal(0.0, 1.0), K - 1))
    intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
    # student_t_lpdf(sigma | 3, 0, 10) - student_t_lccdf(0 | 3, 0, 10), on sigma > 0
    sigma = numpyro.sample("sigma", dist.TruncatedDistribution(dist.StudentT(3.0, 0.0, 10.0),
                                                               low=0.0))
    if not prior_only:
        numpyro.sample("Y", dist.Normal(intercept + Xc @ b, sigma), obs=Y)


def eight_schools_centered(J, y, sigma, **unused):
    """Hierarchical normal, centred (``eight_schools-eight_schools_centered``)."""
    y, sigma = _real(y), _real(sigma)
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta = numpyro.sample("theta", _iid(dist.Normal(mu, tau), J))
    numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def eight_schools_noncentered(J, y, sigma, **unused):
    """Hierarchical normal, non-centred (``eight_schools-eight_schools_noncentered``)."""
    y, sigma = _real(y), _real(sigma)
    theta_trans = numpyro.sample("theta_trans", _iid(dist.Normal(0.0, 1.0), J))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta = numpyro.deterministic("theta", theta_trans * tau + mu)
    numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def garch11(T, y, sigma1, **unused):
    """GARCH(1,1) with the bound beta1 < 1 - alpha1 (``garch-garch11``)."""
    y = _real(y)
    sigma1 = _real(sigma1)
    mu = numpyro.sample("mu", _flat())
    alpha0 = numpyro.sample("alpha0", _flat((), constraints.positive))
    alpha1 = numpyro.sample("alpha1", dist.Uniform(0.0, 1.0))  # flat on (0, 1): density 1
    # Stan: flat on (0, 1 - alpha1), without the 1 / (1 - alpha1) of a uniform density. A Uniform
    # site plus a factor that cancels its normalisation, rather than ImproperUniform: NumPyro sees
    # that a Uniform's support depends on alpha1 and then maps draws back with the right bound
    # (through ImproperUniform's wrapped support it would reuse the bound of the initial point).
    beta1 = numpyro.sample("beta1", dist.Uniform(0.0, 1.0 - alpha1))
    numpyro.factor("beta1_flat", jnp.log1p(-alpha1))

    def step(var, y_prev):
        var = alpha0 + alpha1 * jnp.square(y_prev - mu) + beta1 * var
        return var, var

    _, var = jax.lax.scan(step, jnp.square(sigma1), y[:-1])
    sigma = jnp.concatenate([sigma1[None], jnp.sqrt(var)])
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


_GP_JITTER = 1e-10  # Stan: gp_exp_quad_cov(x, alpha, rho) + diag_matrix(rep_vector(1e-10, N))


def _exp_quad_cov_np(x, alpha, rho):
    """Covariance, squared distances and correlations in float64 (batched over leading axes)."""
    x = np.asarray(x, np.float64)
    alpha = np.asarray(alpha, np.float64)[..., None, None]
    rho = np.asarray(rho, np.float64)[..., None, None]
    sq = np.square(x[..., :, None] - x[..., None, :])
    corr = np.exp(-0.5 * sq / np.square(rho))
    n = x.shape[-1]
    return np.square(alpha) * corr + _GP_JITTER * np.eye(n), sq, corr


def _safe_cholesky(a):
    """Batched Cholesky factor; NaN for matrices that are not positive definite."""
    if not np.isfinite(a).all():
        if a.ndim == 2:
            return np.full_like(a, np.nan)
        return np.stack([_safe_cholesky(m) for m in a])
    try:
        return np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        if a.ndim == 2:
            return np.full_like(a, np.nan)
        return np.stack([_safe_cholesky(m) for m in a])


def _exp_quad_cholesky_np(x, alpha, rho, dtype):
    with np.errstate(all="ignore"):
        cov, _, _ = _exp_quad_cov_np(x, alpha, rho)
        return _safe_cholesky(cov).astype(dtype)


def _exp_quad_cholesky_jvp_np(x, alpha, rho, dtype):
    """L and its derivatives in alpha and rho: dL = L Phi(L^-1 dK L^-T), Phi = lower half."""
    with np.errstate(all="ignore"):
        cov, sq, corr = _exp_quad_cov_np(x, alpha, rho)
        chol = _safe_cholesky(cov)
        alpha = np.asarray(alpha, np.float64)[..., None, None]
        rho = np.asarray(rho, np.float64)[..., None, None]
        dcov = np.stack([2.0 * alpha * corr, np.square(alpha) * corr * sq / rho**3], axis=-3)
        finite = np.isfinite(chol).all(axis=(-2, -1), keepdims=True)
        inv = np.linalg.inv(np.where(finite, chol, np.eye(cov.shape[-1])))[..., None, :, :]
        inner = inv @ dcov @ np.swapaxes(inv, -1, -2)  # (..., 2, n, n)
        phi = np.tril(inner) - 0.5 * np.eye(cov.shape[-1]) * inner
        dchol = chol[..., None, :, :] @ phi
    return (chol.astype(dtype), dchol[..., 0, :, :].astype(dtype),
            dchol[..., 1, :, :].astype(dtype))


@jax.custom_jvp
def _exp_quad_cholesky_f64(x, alpha, rho):
    shape = jax.ShapeDtypeStruct((x.shape[-1], x.shape[-1]), x.dtype)
    return jax.pure_callback(functools.partial(_exp_quad_cholesky_np, dtype=x.dtype), shape,
                             x, alpha, rho, vmap_method="broadcast_all")


@_exp_quad_cholesky_f64.defjvp
def _exp_quad_cholesky_f64_jvp(primals, tangents):
    x, alpha, rho = primals
    _, dalpha, drho = tangents  # x is data: no derivative in x
    shape = jax.ShapeDtypeStruct((x.shape[-1], x.shape[-1]), x.dtype)
    chol, dchol_dalpha, dchol_drho = jax.pure_callback(
        functools.partial(_exp_quad_cholesky_jvp_np, dtype=x.dtype), (shape, shape, shape),
        x, alpha, rho, vmap_method="broadcast_all")
    return chol, dchol_dalpha * dalpha + dchol_drho * drho


def _exp_quad_cholesky(x, alpha, rho):
    """Cholesky factor of ``gp_exp_quad_cov(x, alpha, rho) + 1e-10 I``, as Stan computes it.

    The matrix's condition number reaches 1e11 at the posterior, beyond float32: there the
    Cholesky breaks down, or with a larger jitter is so rough in rho that NUTS sticks. So unless
    x64 is enabled, the factor and its derivatives in alpha and rho are computed in float64 on
    the host (``jax.pure_callback``; first derivatives only) and rounded to float32.
    """
    alpha = jnp.asarray(alpha, x.dtype)
    rho = jnp.asarray(rho, x.dtype)
    if x.dtype == jnp.float64:
        sq = jnp.square(x[:, None] - x[None, :])
        cov = jnp.square(alpha) * jnp.exp(-0.5 * sq / jnp.square(rho))
        return jnp.linalg.cholesky(cov + _GP_JITTER * jnp.eye(x.shape[0], dtype=x.dtype))
    return _exp_quad_cholesky_f64(x, alpha, rho)


def gp_pois_regr(N, x, k, **unused):
    """Poisson regression with a latent exp-quad GP (``gp_pois_regr-gp_pois_regr``)."""
    x = _real(x)
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = numpyro.sample("f_tilde", _iid(dist.Normal(0.0, 1.0), N))
    f = numpyro.deterministic("f", _exp_quad_cholesky(x, alpha, rho) @ f_tilde)
    numpyro.sample("k", dist.Poisson(jnp.exp(f)), obs=k)


def hmm_example(N, K, y, **unused):
    """Two-state Gaussian HMM, states summed out by the forward algorithm
    (``hmm_example-hmm_example``)."""
    if K != 2:
        raise ValueError(f"expected K == 2 (the program defines two transition rows); got {K}")
    y = _real(y)
    theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(K)))  # flat on the simplex
    theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(K)))
    mu = numpyro.sample("mu", _flat((K,), constraints.positive_ordered_vector))
    numpyro.factor("mu_prior", dist.Normal(jnp.array([3.0, 10.0]), 1.0).log_prob(mu).sum())
    log_theta = jnp.log(jnp.stack([theta1, theta2]))  # [from j, to k]
    emission = dist.Normal(mu, 1.0).log_prob(y[:, None])  # (N, K)

    def forward(gamma, emit):
        gamma = jax.nn.logsumexp(gamma[:, None] + log_theta, axis=0) + emit
        return gamma, None

    gamma, _ = jax.lax.scan(forward, emission[0], emission[1:])
    numpyro.factor("y", jax.nn.logsumexp(gamma))


def _lotka_volterra_rhs(t, z, theta):
    u, v = z[0], z[1]
    alpha, beta, gamma, delta = theta[0], theta[1], theta[2], theta[3]
    return jnp.stack([(alpha - beta * v) * u, (-gamma + delta * u) * v])


def solve_lotka_volterra(theta, z_init, ts, *, rtol: float = 1e-6, atol: float = 1e-6):
    """Populations (prey, predator) at times `ts`, from `z_init` at time 0: shape (len(ts), 2).

    Dopri5 with an adaptive PID step-size controller; differentiable. A failed solve (too many
    steps) gives NaN, so a sampler rejects the point. In float32, the relative error at the
    reference draws is below 4e-5 (against a float64 solve at tolerance 1e-12).

    Args:
        theta: (alpha, beta, gamma, delta), shape (4,).
        z_init: populations at time 0, shape (2,).
        ts: increasing output times > 0, shape (N,).
        rtol: relative tolerance of the step-size controller.
        atol: absolute tolerance of the step-size controller.
    """
    import diffrax

    ts = _real(ts)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_lotka_volterra_rhs), diffrax.Dopri5(), t0=0.0, t1=ts[-1], dt0=0.05,
        y0=_real(z_init), args=theta, saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=0.3, icoeff=0.4),
        max_steps=16384, throw=False,
    )
    return jnp.where(sol.result == diffrax.RESULTS.successful, sol.ys, jnp.nan)


def lotka_volterra(N, ts, y_init, y, **unused):
    """Lotka-Volterra ODE with log-normal errors (``hudson_lynx_hare-lotka_volterra``)."""
    y_init, y = _real(y_init), _real(y)
    # normal priors on theta > 0, not renormalised (a constant, as in Stan)
    theta = numpyro.sample("theta", dist.TruncatedNormal(
        jnp.array([1.0, 0.05, 1.0, 0.05]), jnp.array([0.5, 0.05, 0.5, 0.05]), low=0.0
    ).to_event(1))
    z_init = numpyro.sample("z_init", _iid(dist.LogNormal(math.log(10.0), 1.0), 2))
    sigma = numpyro.sample("sigma", _iid(dist.LogNormal(-1.0, 1.0), 2))
    z = solve_lotka_volterra(theta, z_init, ts)
    numpyro.sample("y_init", dist.LogNormal(jnp.log(z_init), sigma).to_event(1), obs=y_init)
    numpyro.sample("y", dist.LogNormal(jnp.log(z), sigma).to_event(2), obs=y)


def kidscore_momiq(N, kid_score, mom_iq, **unused):
    """Linear regression with a flat prior on beta (``kidiq-kidscore_momiq``)."""
    kid_score, mom_iq = _real(kid_score), _real(mom_iq)
    beta = numpyro.sample("beta", _flat((2,)))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    numpyro.sample("kid_score", dist.Normal(beta[0] + beta[1] * mom_iq, sigma), obs=kid_score)


def kilpisjarvi(N, x, y, pmualpha, psalpha, pmubeta, psbeta, **unused):
    """Linear regression on years, priors from the data (``kilpisjarvi_mod-kilpisjarvi``)."""
    x, y = _real(x), _real(y)
    alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = numpyro.sample("sigma", _flat((), constraints.positive))
    numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def low_dim_gauss_mix(N, y, **unused):
    """Two-component 1-D normal mixture, ordered means (``low_dim_gauss_mix-low_dim_gauss_mix``)."""
    y = _real(y)
    mu = numpyro.sample("mu", _flat((2,), constraints.ordered_vector))
    numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
    sigma = numpyro.sample("sigma", _iid(dist.HalfNormal(2.0), 2))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    lp1 = jnp.log(theta) + dist.Normal(mu[0], sigma[0]).log_prob(y)
    lp2 = jnp.log1p(-theta) + dist.Normal(mu[1], sigma[1]).log_prob(y)
    numpyro.factor("y", jnp.logaddexp(lp1, lp2).sum())


def nes(N, partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete, **unused):
    """Linear regression with age as a factor, flat priors (``nes1992-nes``)."""
    age = jnp.asarray(age_discrete)
    columns = [jnp.ones(partyid7.shape[0]), real_ideo, race_adj, age == 2, age == 3, age == 4,
               educ1, gender, income]
    design = jnp.stack([_real(c) for c in columns], axis=-1)  # (N, 9)
    beta = numpyro.sample("beta", _flat((9,)))
    sigma = numpyro.sample("sigma", _flat((), constraints.positive))
    numpyro.sample("partyid7", dist.Normal(design @ beta, sigma), obs=_real(partyid7))


def blr(N, D, X, y, **unused):
    """Bayesian linear regression, vague priors (``sblrc-blr``)."""
    X, y = _real(X), _real(y)
    beta = numpyro.sample("beta", _iid(dist.Normal(0.0, 10.0), D))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))  # normal_lpdf on sigma > 0
    numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


# --------------------------------------------------------------------------------------------
# reference variables -> model sites, where the two differ


def _noncentered_sites(v: dict[str, np.ndarray], data: Mapping) -> dict[str, np.ndarray]:
    theta = v.pop("theta")
    v["theta_trans"] = (theta - v["mu"][..., None]) / v["tau"][..., None]
    return v


def _gp_sites(v: dict[str, np.ndarray], data: Mapping) -> dict[str, np.ndarray]:
    x = np.asarray(data["x"], np.float64)
    f = v.pop("f")
    alpha, rho = v["alpha"][..., None, None], v["rho"][..., None, None]
    cov = alpha**2 * np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / rho**2)
    chol = np.linalg.cholesky(cov + _GP_JITTER * np.eye(x.shape[0]))
    v["f_tilde"] = np.linalg.solve(chol, f[..., None])[..., 0]
    return v


# --------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class _Entry:
    model: Callable
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # reference variables, in draw order
    to_sites: Callable | None = None


_REGISTRY: dict[str, _Entry] = {
    "arK-arK": _Entry(ark, (("alpha", ()), ("beta", (5,)), ("sigma", ()))),
    "diamonds-diamonds": _Entry(diamonds, (("b", (24,)), ("Intercept", ()), ("sigma", ()))),
    "eight_schools-eight_schools_centered": _Entry(
        eight_schools_centered, (("theta", (8,)), ("mu", ()), ("tau", ()))),
    "eight_schools-eight_schools_noncentered": _Entry(
        eight_schools_noncentered, (("theta", (8,)), ("mu", ()), ("tau", ())),
        _noncentered_sites),
    "garch-garch11": _Entry(garch11, (("mu", ()), ("alpha0", ()), ("alpha1", ()),
                                      ("beta1", ()))),
    "gp_pois_regr-gp_pois_regr": _Entry(
        gp_pois_regr, (("rho", ()), ("alpha", ()), ("f", (11,))), _gp_sites),
    "hmm_example-hmm_example": _Entry(hmm_example, (("theta1", (2,)), ("theta2", (2,)),
                                                    ("mu", (2,)))),
    "hudson_lynx_hare-lotka_volterra": _Entry(
        lotka_volterra, (("theta", (4,)), ("z_init", (2,)), ("sigma", (2,)))),
    "kidiq-kidscore_momiq": _Entry(kidscore_momiq, (("beta", (2,)), ("sigma", ()))),
    "kilpisjarvi_mod-kilpisjarvi": _Entry(kilpisjarvi, (("alpha", ()), ("beta", ()),
                                                        ("sigma", ()))),
    "low_dim_gauss_mix-low_dim_gauss_mix": _Entry(
        low_dim_gauss_mix, (("mu", (2,)), ("sigma", (2,)), ("theta", ()))),
    "nes1992-nes": _Entry(nes, (("beta", (9,)), ("sigma", ()))),
    "sblrc-blr": _Entry(blr, (("beta", (5,)), ("sigma", ()))),
}


def names() -> list[str]:
    """The names of the posteriors, sorted (no data needed).

    Example:
        >>> names()[:2]
        ['arK-arK', 'diamonds-diamonds']
    """
    return sorted(_REGISTRY)


def _element_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """Stan's names for the elements of an array: 1-based, first index fastest."""
    return flat_names(name, shape, order="F")


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _to_array(values: list) -> np.ndarray:
    a = np.asarray(values)
    if a.dtype.kind in "iub":
        return _read_only(a.astype(np.int32))
    if a.dtype.kind == "f":
        return _read_only(a.astype(np.float64))
    raise ValueError(f"expected numbers in the data arrays; got dtype {a.dtype}")


@functools.lru_cache(maxsize=4)
def _load_data(path: Path) -> Mapping:
    with open(path) as f:
        raw = json.load(f)
    return MappingProxyType({k: _to_array(v) if isinstance(v, list) else v for k, v in raw.items()})


@functools.lru_cache(maxsize=2)
def _load_draws(path: Path) -> Mapping:
    with open(path) as f:
        chains = json.load(f)
    keys = list(chains[0])
    return MappingProxyType({k: _read_only(np.array([c[k] for c in chains], dtype=np.float64))
                             for k in keys})


@dataclasses.dataclass(frozen=True)
class Posterior:
    """One posteriordb posterior: its NumPyro model, data and reference draws.

    Attributes:
        name: the posteriordb name, e.g. ``"eight_schools-eight_schools_noncentered"``.
        model: the NumPyro model, called as ``model(**data)``.
    """

    name: str
    model: Callable

    @property
    def _entry(self) -> _Entry:
        return _REGISTRY[self.name]

    @property
    def folder(self) -> Path:
        """The posterior's folder in the shared data (raises `SharedDataMissing`)."""
        return shared_benchmarks_dir("posteriordb") / self.name

    @property
    def param_names(self) -> tuple[str, ...]:
        """The reference draws' variable names, Stan style (``theta[3]``), in draw order."""
        return tuple(n for name, shape in self._entry.shapes for n in _element_names(name, shape))

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one draw of each reference variable, e.g. ``{"beta": (2,), ...}``."""
        return dict(self._entry.shapes)

    @property
    def data(self) -> dict:
        """The model's keyword arguments, read from ``data.json``.

        Python ints and floats stay Python scalars; lists become read-only NumPy arrays, int32
        for integers and float64 for reals.
        """
        return dict(_load_data(self.folder / "data.json"))

    def reference_draws(self) -> dict[str, np.ndarray]:
        """Reference draws: Stan-style name -> read-only array of shape (chains, draws)."""
        return dict(_load_draws(self.folder / "reference_draws.json"))

    def sites_from_reference(self, draws: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model sample-site values from reference variables (the inverse of `flatten_draws`).

        Elements are gathered into vector sites, and variables that are deterministic in the
        model are mapped back to the latent sites (``theta`` -> ``theta_trans`` for the
        non-centred eight schools, ``f`` -> ``f_tilde`` for the Poisson GP, in float64).

        Args:
            draws: Stan-style name -> array; all arrays share one batch shape (e.g. (10, 1000) or
                ()).

        Returns:
            Site name -> float64 array of shape ``batch + site shape``.
        """
        values = {}
        for name, shape in self._entry.shapes:
            elements = _element_names(name, shape)
            first = np.asarray(draws[elements[0]], np.float64)
            value = np.empty(first.shape + shape)
            for flat_index, element in enumerate(elements):
                idx = np.unravel_index(flat_index, shape, order="F")
                value[(Ellipsis, *idx)] = draws[element]
            values[name] = value
        if self._entry.to_sites is not None:
            values = self._entry.to_sites(values, self.data)
        return values


def get(name: str) -> Posterior:
    """The posterior called `name` (see `names`).

    Raises:
        ValueError: `name` is not one of `names()`.

    Example:
        >>> get("sblrc-blr").model.__name__
        'blr'
    """
    if name not in _REGISTRY:
        raise ValueError(f"expected a posterior name in {names()}; got {name!r}")
    return Posterior(name=name, model=_REGISTRY[name].model)


def flatten_draws(samples: Mapping[str, np.ndarray], *, batch_ndim: int = 1
                  ) -> dict[str, np.ndarray]:
    """Split array-valued sites into Stan-style element names (``beta[1]``, ``beta[2]``, ...).

    Args:
        samples: site name -> array whose first `batch_ndim` axes index draws (as from
            ``MCMC.get_samples()``; use ``batch_ndim=2`` with ``group_by_chain=True``).
        batch_ndim: number of leading draw axes.

    Returns:
        Element name -> NumPy array of the batch shape. Scalar sites keep their name; indices are
        1-based and the first index runs fastest, as in Stan's output.

    Example:
        >>> out = flatten_draws({"mu": np.zeros(3), "theta": np.arange(6.0).reshape(3, 2)})
        >>> list(out), out["theta[2]"].tolist()
        (['mu', 'theta[1]', 'theta[2]'], [1.0, 3.0, 5.0])
    """
    if not isinstance(batch_ndim, int) or batch_ndim < 0:
        raise ValueError(f"expected batch_ndim to be an int >= 0; got {batch_ndim!r}")
    return flatten_sites(samples, lead=batch_ndim, order="F")
