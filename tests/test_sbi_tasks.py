"""The sbibm tasks: registry contract, simulator vs likelihood, likelihood vs reference posterior.

Checks against the shared data skip (with the loader's message) when the data are absent.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from flashbayes._shared import SharedDataMissing
from flashbayes.sbi import _tasks, tasks

NAMES = tasks.names()


def _shared_or_skip(fn, *args):
    try:
        return fn(*args)
    except SharedDataMissing as exc:
        pytest.skip(str(exc))


# -- generic registry contract ---------------------------------------------------------------------


def test_registry_names_and_refusal():
    assert NAMES == ["gaussian_linear", "gaussian_linear_uniform", "gaussian_mixture",
                     "bernoulli_glm", "slcp", "sir"]
    with pytest.raises(ValueError, match="expected one of"):
        tasks.get("two_moons")


@pytest.mark.parametrize("name", NAMES)
def test_task_contract(name):
    task = tasks.get(name)
    prior = task.prior()
    theta = prior.sample(jax.random.key(0), (64,))
    assert theta.shape == (64, task.dim_theta)
    assert bool(jnp.all(prior.support(theta)))
    assert bool(jnp.all(jnp.isfinite(prior.log_prob(theta))))
    keys = jax.random.split(jax.random.key(1), 64)
    x = jax.jit(jax.vmap(task.simulator))(keys, theta)
    assert x.shape == (64, task.dim_x)
    assert bool(jnp.all(jnp.isfinite(x)))
    # same key, same answer; one theta alone gives the row of the batch
    np.testing.assert_allclose(x[3], task.simulator(keys[3], theta[3]), rtol=1e-5, atol=1e-6)
    ll = jax.vmap(task.log_likelihood)(theta, x)
    assert ll.shape == (64,) and bool(jnp.all(jnp.isfinite(ll)))
    assert len(task.parameter_names) == task.dim_theta


def test_observation_index_is_checked():
    with pytest.raises(ValueError, match="expected an integer in 1..5"):
        tasks.load_observation("slcp", 6)


# -- the simulator draws from the likelihood -------------------------------------------------------


def _ratio_identity_z(task, simulator, theta, shift, m=4000, seed=0):
    """z-score of mean(p(x | theta + shift) / p(x | theta)) - 1 over x ~ simulator(theta).

    The mean is 1 when the simulator draws from the likelihood (the shifted density integrates
    to one); a simulator with another noise law gives another mean.
    """
    keys = jax.random.split(jax.random.key(seed), m)
    x = jax.jit(jax.vmap(simulator, (0, None)))(keys, jnp.asarray(theta, jnp.float32))
    ll = jax.jit(jax.vmap(task.log_likelihood, (None, 0)))
    r = np.exp(np.asarray(ll(jnp.asarray(theta + shift, jnp.float32), x), np.float64)
               - np.asarray(ll(jnp.asarray(theta, jnp.float32), x), np.float64))
    return (r.mean() - 1.0) / (r.std(ddof=1) / np.sqrt(m))


def _shift(name, k):
    """A step of half a reference-posterior sd per coordinate, alternating in sign."""
    ref = _shared_or_skip(tasks.load_reference_samples, name, k)
    sign = np.where(np.arange(ref.shape[1]) % 2 == 0, 1.0, -1.0)
    return 0.5 * sign * ref.std(0)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "slcp"])
def test_simulator_matches_likelihood(name):
    # (SLCP: the ratio has no finite variance near rho = +-1; see the whitening test below)
    task = tasks.get(name)
    for k in (1, 2):
        theta = _shared_or_skip(tasks.load_true_parameters, name, k)
        z = _ratio_identity_z(task, task.simulator, theta, _shift(name, k), seed=k)
        assert abs(z) < 4.5, (name, k, z)


def _slcp_whitened(simulator, k):
    theta = jnp.asarray(_shared_or_skip(tasks.load_true_parameters, "slcp", k), jnp.float32)
    keys = jax.random.split(jax.random.key(k), 20_000)
    z = np.asarray(jax.vmap(simulator, (0, None))(keys, theta), np.float64).reshape(-1, 2)
    mean, cov = (np.asarray(a, np.float64) for a in _tasks._slcp_mean_cov(theta))
    return np.linalg.solve(np.linalg.cholesky(cov), (z - mean).T).T


def test_slcp_simulator_draws_the_likelihood_gaussian():
    for k in range(1, 6):
        w = _slcp_whitened(tasks.get("slcp").simulator, k)
        n = len(w)
        assert np.max(np.abs(w.mean(0))) * np.sqrt(n) < 4.5
        assert np.max(np.abs(np.cov(w.T) - np.eye(2))) * np.sqrt(n / 2) < 4.5


def test_slcp_wrong_simulator_fails_the_whitening_check():
    def unsquared(key, theta):  # the standard deviations theta_3, theta_4 without the square
        return _tasks._slcp_simulator(key, theta.at[2:4].set(jnp.sqrt(jnp.abs(theta[2:4]))))

    w = _slcp_whitened(unsquared, 1)
    assert np.max(np.abs(np.cov(w.T) - np.eye(2))) * np.sqrt(len(w) / 2) > 10


def test_wrong_simulator_fails_the_likelihood_check():
    # the documented trap: noise sd 0.1 instead of variance 0.1
    task = tasks.get("gaussian_linear")
    theta = _shared_or_skip(tasks.load_true_parameters, "gaussian_linear", 1)

    def wrong(key, th):
        return th + 0.1 * jax.random.normal(key, th.shape)

    z = _ratio_identity_z(task, wrong, theta, _shift("gaussian_linear", 1))
    assert abs(z) > 10


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "sir" else n
                                  for n in NAMES])
def test_observations_are_typical_under_the_simulator(name):
    # log p(x_obs | theta_true) lies inside the spread of log p(x | theta_true), x ~ simulator
    task = tasks.get(name)
    ll = jax.jit(jax.vmap(task.log_likelihood, (None, 0)))
    for k in range(1, 6):
        theta = jnp.asarray(_shared_or_skip(tasks.load_true_parameters, name, k), jnp.float32)
        x_obs = jnp.asarray(tasks.load_observation(name, k), jnp.float32)
        keys = jax.random.split(jax.random.key(k), 4000)
        sims = jax.vmap(task.simulator, (0, None))(keys, theta)
        null = np.asarray(ll(theta, sims))
        p = np.mean(null <= float(task.log_likelihood(theta, x_obs)))
        assert 5e-4 < p, (name, k, p)


# -- the likelihood and prior give the reference posterior -----------------------------------------


def _snis_z(task, log_likelihood, k, n=40_000, seed=0):
    """z-scores of self-normalised importance-sampling posterior means against the reference.

    Proposal: a Gaussian mixture fitted to the reference draws, covariances inflated by 1.5.
    """
    from sklearn.mixture import GaussianMixture

    ref = _shared_or_skip(tasks.load_reference_samples, task.name, k)
    x_obs = jnp.asarray(tasks.load_observation(task.name, k), jnp.float32)
    gm = GaussianMixture(n_components=4, covariance_type="full", random_state=seed).fit(ref)
    gm.covariances_ = gm.covariances_ * 1.5
    gm.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(gm.covariances_))
    draws, _ = gm.sample(n)
    log_q = gm.score_samples(draws)
    th = jnp.asarray(draws, jnp.float32)
    with warnings.catch_warnings():  # proposal draws outside a box prior get log prior -inf
        warnings.simplefilter("ignore", UserWarning)
        log_prior = task.prior().log_prob(th)
    log_p = np.asarray(log_prior + jax.jit(jax.vmap(log_likelihood, (0, None)))(th, x_obs),
                       np.float64)
    log_w = log_p - log_q
    w = np.exp(log_w - log_w[np.isfinite(log_w)].max())
    w = np.where(np.isfinite(w), w, 0.0)
    w /= w.sum()
    ess = 1.0 / np.sum(w ** 2)
    mean = w @ draws
    sd = ref.std(0)
    return (mean - ref.mean(0)) / (sd * np.sqrt(1.0 / ess + 1.0 / len(ref))), ess


@pytest.mark.parametrize("name", NAMES)
def test_likelihood_gives_the_reference_posterior(name):
    task = tasks.get(name)
    for k in (1, 3):
        z, ess = _snis_z(task, task.log_likelihood, k)
        assert ess > 500, (name, k, ess)
        # the Bernoulli GLM reference is thinned MCMC: its effective size is below 10,000
        limit = 6.0 if name == "bernoulli_glm" else 4.5
        assert np.max(np.abs(z)) < limit, (name, k, z)


def test_wrong_likelihood_fails_the_reference_check():
    task = tasks.get("gaussian_linear")

    def wrong(theta, x):  # noise variance sqrt(0.1) instead of 0.1
        return jax.scipy.stats.norm.logpdf(x, theta, 0.1 ** 0.25).sum(-1)

    z, _ = _snis_z(dataclasses.replace(task, log_likelihood=wrong), wrong, 1)
    assert np.max(np.abs(z)) > 10


# -- closed forms and stored constants ----------------------------------------------------------


def _gl_closed_form_z(k, mean_of_x):
    ref = _shared_or_skip(tasks.load_reference_samples, "gaussian_linear", k)
    x = tasks.load_observation("gaussian_linear", k)
    n = len(ref)
    z_mean = (ref.mean(0) - mean_of_x(x)) / np.sqrt(0.05 / n)
    z_var = (ref.var(0, ddof=1) - 0.05) / (0.05 * np.sqrt(2.0 / (n - 1)))
    return np.concatenate([z_mean, z_var])


def test_gaussian_linear_closed_form_matches_reference():
    for k in range(1, 6):
        assert np.max(np.abs(_gl_closed_form_z(k, lambda x: x / 2))) < 4.5


def test_gaussian_linear_wrong_closed_form_fails():
    assert np.max(np.abs(_gl_closed_form_z(1, lambda x: x))) > 10


def test_gaussian_linear_uniform_truncated_normal_matches_reference():
    sd = np.sqrt(0.1)
    for k in range(1, 6):
        ref = _shared_or_skip(tasks.load_reference_samples, "gaussian_linear_uniform", k)
        x = tasks.load_observation("gaussian_linear_uniform", k)
        law = stats.truncnorm((-1 - x) / sd, (1 - x) / sd, loc=x, scale=sd)
        z = (ref.mean(0) - law.mean()) / (law.std() / np.sqrt(len(ref)))
        assert np.max(np.abs(z)) < 4.5, (k, z)


def _shared_file(name):
    from flashbayes._shared import shared_benchmarks_dir

    path = _shared_or_skip(shared_benchmarks_dir, "sbibm") / "bernoulli_glm" / "files" / name
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=1)


def test_bernoulli_glm_constants_equal_the_stored_ones():
    np.testing.assert_array_equal(_tasks.glm_stimulus().astype(np.float64),
                                  _shared_file("stimulus_I.csv"))
    np.testing.assert_array_equal(_tasks.glm_design_matrix(), _shared_file("design_matrix.csv"))
    np.testing.assert_allclose(_tasks.glm_prior_precision(),
                               _shared_file("prior_precision_matrix.csv"), rtol=0, atol=1e-12)
    variances = np.diag(np.linalg.inv(_tasks.glm_prior_precision()))
    np.testing.assert_allclose(variances, [2, 1, 2.81, 3.35, 2.41, 1.48, 1.21, 1.14, 0.96, 0.78],
                               atol=0.006)


def test_bernoulli_glm_observations_are_sufficient_statistics():
    # x = X^T y for a binary y: x_0 is a spike count and the rest follow from the stimulus
    for k in range(1, 6):
        x = _shared_or_skip(tasks.load_observation, "bernoulli_glm", k)
        assert x[0] == round(x[0]) and 0 <= x[0] <= 100


def test_sir_ode_matches_a_high_accuracy_solve():
    from scipy.integrate import solve_ivp

    for k in range(1, 6):
        beta, gamma = _shared_or_skip(tasks.load_true_parameters, "sir", k)

        def field(t, y, beta=beta, gamma=gamma):
            s, i, _ = y
            return [-beta * s * i, beta * s * i - gamma * i, gamma * i]

        y0 = [1 - 1e-6, 1e-6, 0.0]
        exact = solve_ivp(field, (0, 160), y0, method="DOP853", rtol=1e-12, atol=1e-15,
                          t_eval=_tasks.SIR_OBS_DAYS).y[1]
        ours = np.asarray(_tasks.sir_infected_fraction(jnp.array([beta, gamma], jnp.float32)))
        # expected counts out of 1,000 agree to 0.05 (binomial noise is ~ sqrt(1000 p))
        np.testing.assert_allclose(1000 * ours, 1000 * exact, atol=0.05, rtol=0)
        # the tolerance is tight: a contact rate 0.1 % off is caught
        slightly_off = _tasks.sir_infected_fraction(jnp.array([beta * 1.001, gamma], jnp.float32))
        assert np.max(np.abs(1000 * np.asarray(slightly_off) - 1000 * exact)) > 0.05


def test_c2st_tells_the_reference_from_a_wrong_posterior_only():
    # the benchmark's metric on the shared data: exact draws pass, a too-wide posterior fails
    # (early stopping keeps this test short; the benchmark runs the full protocol)
    from flashbayes.diagnostics import c2st

    ref = _shared_or_skip(tasks.load_reference_samples, "gaussian_linear", 1)[:1500]
    x = tasks.load_observation("gaussian_linear", 1)
    rng = np.random.default_rng(0)
    exact = x / 2 + np.sqrt(0.05) * rng.standard_normal((1500, 10))
    too_wide = x / 2 + np.sqrt(0.1) * rng.standard_normal((1500, 10))
    assert c2st(ref, exact, seed=1, early_stopping=True) < 0.56
    assert c2st(ref, too_wide, seed=1, early_stopping=True) > 0.6


EXACT = [n for n in NAMES if tasks.get(n).exact_posterior is not None]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_exact_posterior_matches_the_reference_and_a_wrong_one_does_not(name):
    # exact draws for any observation (used to score estimators on observations of our own):
    # on the shared observations they are indistinguishable from the reference draws, while the
    # exact posterior of a shifted observation is not
    from flashbayes.diagnostics import c2st

    assert set(EXACT) == {"gaussian_linear", "gaussian_linear_uniform", "gaussian_mixture"}
    task = tasks.get(name)
    for k in (1, 2):
        ref = _shared_or_skip(tasks.load_reference_samples, name, k)[:2000]
        x = np.asarray(tasks.load_observation(name, k))
        draws = task.exact_posterior(jax.random.key(k), x, 2000)
        assert draws.shape == (2000, task.dim_theta) and np.isfinite(draws).all()
        assert np.all(task.prior().log_prob(draws) > -np.inf)  # inside the support
        assert c2st(ref, draws, seed=1, early_stopping=True) < 0.56, (name, k)
    wrong = task.exact_posterior(jax.random.key(9), x + 0.3, 2000)
    assert c2st(ref, wrong, seed=1, early_stopping=True) > 0.6


SAMPLED = [n for n in NAMES if tasks.get(n).exact_posterior is None]


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLED)
def test_reference_posterior_matches_the_shared_draws_and_a_wrong_one_does_not(name):
    # the grid (sir) and NUTS (bernoulli_glm, slcp) references for observations of our own: on
    # a shared observation indistinguishable from the shared draws; for another observation not
    from flashbayes.diagnostics import c2st

    assert set(SAMPLED) == {"bernoulli_glm", "slcp", "sir"}
    task = tasks.get(name)
    ref = _shared_or_skip(tasks.load_reference_samples, name, 1)[:3000]
    x = np.asarray(tasks.load_observation(name, 1))
    draws = task.reference_posterior(jax.random.key(1), x, 3000)
    assert draws.shape == (3000, task.dim_theta) and np.isfinite(draws).all()
    assert np.all(task.prior().log_prob(draws) > -np.inf)  # inside the support
    assert c2st(ref, draws, seed=1, early_stopping=True) < 0.56
    other = task.reference_posterior(jax.random.key(2), tasks.load_observation(name, 2), 3000)
    assert c2st(ref, other, seed=1, early_stopping=True) > 0.6


@pytest.mark.slow
def test_slcp_reference_needs_its_stuck_chains_dropped_and_its_mirror_modes():
    # observation 1 of slcp: with key 1 one of the 16 NUTS chains is caught on a ridge millions
    # of nats below the posterior's mass; kept, its draws are in the reference; dropped, none is.
    # Chains confined to one of the four mirror-image modes fail the check the reference passes.
    from flashbayes.diagnostics import c2st
    from flashbayes.sbi._reference import _nuts_draws

    task = tasks.get("slcp")
    ref = _shared_or_skip(tasks.load_reference_samples, "slcp", 1)[:3000]
    x = jnp.asarray(tasks.load_observation("slcp", 1))
    loglik = jax.vmap(lambda th: task.log_likelihood(th, x))
    kept_all = _nuts_draws(task, jax.random.key(1), x, 3000, chain_tolerance=np.inf)
    assert float(loglik(jnp.asarray(kept_all)).min()) < -1e4
    one_mode = task.reference_posterior(jax.random.key(1), x, 3000)
    assert float(loglik(jnp.asarray(one_mode)).min()) > -100
    assert c2st(ref, one_mode, seed=1, early_stopping=True) < 0.56
    one_mode[:, 2:4] = np.abs(one_mode[:, 2:4])
    assert c2st(ref, one_mode, seed=1, early_stopping=True) > 0.6
    with pytest.raises(ValueError, match="expected 8 finite values; got 8 NaN"):
        task.reference_posterior(jax.random.key(0), np.full(8, np.nan), 10)
    with pytest.raises(ValueError, match=r"expected shape \(8,\) for slcp"):
        task.reference_posterior(jax.random.key(0), np.zeros(5), 10)
