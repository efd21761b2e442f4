"""Reference engines: one generic test over the registry, then each engine's own maths."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import flashbayes as fb
from flashbayes.reference import (
    ConvergenceWarning,
    LogDensityTarget,
    NumPyroTarget,
    TaskTarget,
    nuts,
    smc,
    vi,
)
from flashbayes.reference._nuts import nuts_program

# cheap settings per engine; a new engine must add its entry here
FAST = {
    "exact": {},
    "nuts": {"num_warmup": 300, "num_samples": 500, "num_chains": 2, "warn": False},
    "smc": {"num_particles": 1000},
    "vi": {"family": "fullrank", "max_steps": 3000},
}


@pytest.fixture(scope="module")
def linear_problem():
    task = fb.tasks.get("gmm_linear")
    prob = task.sample_problem(jax.random.key(11), n=6)
    return task, prob, task.exact_posterior(prob.prior, prob.data)


def test_every_engine_has_fast_settings():
    assert sorted(FAST) == fb.reference.engines()


@pytest.mark.parametrize("name", sorted(FAST))
def test_engine_posterior_interface_and_accuracy(name, linear_problem):
    task, prob, exact = linear_problem
    post = fb.reference.get_engine(name)(jax.random.key(1), TaskTarget(task, prob.prior,
                                                                       prob.data), **FAST[name])
    draws = np.asarray(post.sample(jax.random.key(2), 3000))
    assert draws.shape == (3000, 2) and np.all(np.isfinite(draws))
    assert post.mean().shape == (2,) and post.cov().shape == (2, 2)
    try:
        lp = np.asarray(post.log_prob(draws[:5]))
        assert lp.shape == (5,) and np.all(np.isfinite(lp))
    except NotImplementedError:
        pass
    idata = post.to_inference_data()
    assert "theta" in idata.posterior
    assert post.info["engine"] == name and post.info["seconds"] >= 0
    # accuracy against the closed form: means within 5 Monte Carlo standard errors
    sd = np.sqrt(np.diag(np.asarray(exact.cov())))
    z = (np.asarray(post.mean()) - np.asarray(exact.mean())) / (sd / np.sqrt(300))
    assert np.all(np.abs(z) < 5), z
    ratio = np.sqrt(np.diag(np.asarray(post.cov()))) / sd
    assert np.all((ratio > 0.85) & (ratio < 1.15)), ratio


def test_engine_registry_rejects_unknown():
    with pytest.raises(ValueError, match="expected one of"):
        fb.reference.get_engine("gibbs")


def test_exact_engine_refuses_tasks_without_closed_form():
    task = fb.tasks.get("logistic_regression")
    prob = task.sample_problem(jax.random.key(0), n=5)
    with pytest.raises(ValueError, match="closed-form"):
        fb.reference.exact(jax.random.key(0), TaskTarget(task, prob.prior, prob.data))


def _schools(J, y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfCauchy(5))
    z = numpyro.sample("theta_trans", dist.Normal(0, 1).expand([J]))
    theta = numpyro.deterministic("theta", mu + tau * z)
    numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


SCHOOLS = {"J": 8, "y": [28.0, 8, -3, 7, -1, 1, 18, 12], "sigma": [15.0, 10, 16, 11, 9, 11, 10, 18]}


def test_nuts_compiles_once_per_shape():
    cfg = {"num_warmup": 100, "num_samples": 100, "num_chains": 2, "warn": False}
    t1 = NumPyroTarget(_schools, SCHOOLS)
    prog = nuts_program(t1, num_warmup=100, num_samples=100)
    nuts(jax.random.key(0), t1, **cfg)
    assert prog._cache_size() == 1
    other = dict(SCHOOLS, y=[1.0, 2, 3, 4, 5, 6, 7, 8])  # new data, same shape
    t2 = NumPyroTarget(_schools, other)
    assert nuts_program(t2, num_warmup=100, num_samples=100) is prog
    nuts(jax.random.key(1), t2, **cfg)
    assert prog._cache_size() == 1
    # a different shape is a different program
    t3 = NumPyroTarget(_schools, {"J": 4, "y": [1.0, 2, 3, 4], "sigma": [1.0, 1, 1, 1]})
    assert nuts_program(t3, num_warmup=100, num_samples=100) is not prog


def test_nuts_numpyro_model_names_sites_and_diagnostics():
    post = nuts(jax.random.key(3), NumPyroTarget(_schools, SCHOOLS), num_warmup=500,
                num_samples=500, num_chains=2, target_accept=0.9, warn=False)
    assert post.names[:2] == ["mu", "tau"] and post.names[2] == "theta_trans[1]"
    assert post.draws["theta"].shape == (2, 500, 8)  # the deterministic site is kept
    assert np.all(post.draws["tau"] > 0)  # constrained scale
    summary = post.info["summary"]
    assert {"rhat", "ess_bulk", "ess_tail"} <= set(summary["theta[1]"])
    assert post.info["gradient_evaluations"] > 1000
    idata = post.to_inference_data()
    assert set(idata.posterior.data_vars) == {"mu", "tau", "theta_trans", "theta"}
    assert "diverging" in idata.sample_stats
    # the non-centred schools posterior: mu about 4.4 +- 3.3 (posteriordb reference)
    assert abs(float(np.mean(post.draws["mu"])) - 4.4) < 1.0


def test_nuts_warns_when_chains_disagree():
    # two far-apart modes, one chain started in each: R-hat must flag it
    def logp(th):
        return jnp.logaddexp(-0.5 * jnp.sum((th - 8.0) ** 2), -0.5 * jnp.sum((th + 8.0) ** 2))

    t = LogDensityTarget(logp, dim=1)
    with pytest.warns(ConvergenceWarning, match="R-hat"):
        post = nuts(jax.random.key(0), t, num_warmup=200, num_samples=300, num_chains=2,
                    init=jnp.array([[8.0], [-8.0]]))
    assert fb.reference.diagnose(post)


def test_nuts_does_not_warn_on_a_gaussian():
    t = LogDensityTarget(lambda th: -0.5 * jnp.sum(th ** 2), dim=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        post = nuts(jax.random.key(0), t, num_warmup=300, num_samples=1000, num_chains=2)
    assert not fb.reference.diagnose(post)


def test_nuts_sequential_chains_give_the_vectorized_draws():
    # the same per-chain keys; batched and unbatched arithmetic differ in the last bits, and
    # NUTS amplifies that over many transitions (an accept/reject can flip), so the check is a
    # short run in float64 (differences here are at most ~1e-9)
    t = LogDensityTarget(lambda th: -0.5 * jnp.sum((th - jnp.array([1.0, -2.0, 0.5])) ** 2
                                                   / jnp.array([1.0, 4.0, 0.25])), dim=3)
    cfg = {"num_warmup": 30, "num_samples": 50, "num_chains": 3, "warn": False}
    with jax.enable_x64(True):
        vec = nuts(jax.random.key(5), t, **cfg)
        seq = nuts(jax.random.key(5), t, chain_method="sequential", **cfg)
        prog = nuts_program(t, num_warmup=30, num_samples=50, chain_method="sequential")
    assert prog is not nuts_program(t, num_warmup=30, num_samples=50)
    assert prog._cache_size() == 1  # one compiled program for all chains
    assert seq.info["chain_method"] == "sequential" and vec.info["chain_method"] == "vectorized"
    assert seq.draws["theta"].shape == (3, 50, 3)
    np.testing.assert_allclose(seq.draws["theta"], vec.draws["theta"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(seq.info["step_size"], vec.info["step_size"], rtol=1e-6)
    assert seq.info["gradient_evaluations"] == vec.info["gradient_evaluations"]


def test_nuts_rejects_unknown_chain_method():
    t = LogDensityTarget(lambda th: -0.5 * jnp.sum(th ** 2), dim=2)
    with pytest.raises(ValueError, match="chain_method: expected one of"):
        nuts(jax.random.key(0), t, chain_method="parallel")
    with pytest.raises(ValueError, match="chain_method"):
        nuts_program(t, chain_method="Sequential")


def test_nuts_rejects_bad_settings():
    t = LogDensityTarget(lambda th: -0.5 * jnp.sum(th ** 2), dim=2)
    with pytest.raises(ValueError, match="num_samples"):
        nuts(jax.random.key(0), t, num_samples=0)
    with pytest.raises(ValueError, match="num_warmup: expected an integer >= 1; got 0"):
        nuts(jax.random.key(0), t, num_warmup=0)
    with pytest.raises(ValueError, match="init"):
        nuts(jax.random.key(0), t, num_chains=2, init=jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="target_accept"):
        nuts(jax.random.key(0), t, target_accept=1.5)


def test_numpyro_target_rejects_bad_data():
    with pytest.raises(ValueError, match="finite"):
        NumPyroTarget(_schools, dict(SCHOOLS, y=[np.nan] * 8))
    with pytest.raises(TypeError, match="dict"):
        NumPyroTarget(_schools, [1, 2, 3])
    with pytest.raises(TypeError, match="numbers"):
        NumPyroTarget(_schools, dict(SCHOOLS, y=["a"] * 8))


def test_smc_log_evidence_matches_closed_form():
    # theta ~ N(0, I_2), x_i ~ N(theta, s^2 I): p(x) is Gaussian with covariance I + s^2 ...
    task = fb.tasks.get("gmm_linear")
    A = np.asarray(task.A, np.float64)
    noise = np.asarray(task.noise_cov, np.float64)
    prior = fb.GMM([1.0], [[0.5, -0.5]], [np.eye(2)])
    x = np.array([[0.3, 0.1], [1.0, -0.4], [0.2, 0.7]], np.float32)
    n = x.shape[0]
    big_a = np.concatenate([A] * n)
    cov = big_a @ big_a.T + np.kron(np.eye(n), noise)
    mean = big_a @ np.array([0.5, -0.5])
    from scipy.stats import multivariate_normal

    exact = multivariate_normal(mean, cov).logpdf(x.reshape(-1))
    post = smc(jax.random.key(0), TaskTarget(task, prior, x), num_particles=2000)
    assert abs(post.info["log_evidence"] - exact) < 0.15, (post.info["log_evidence"], exact)
    assert post.weights is not None and abs(post.weights.sum() - 1) < 1e-9


def test_smc_finds_both_modes():
    # a bimodal posterior: symmetric prior, likelihood of |theta| only
    prior_std = 3.0

    def model():
        th = numpyro.sample("th", dist.Normal(0.0, prior_std))
        numpyro.sample("obs", dist.Normal(jnp.abs(th), 0.3), obs=2.0)

    post = smc(jax.random.key(0), NumPyroTarget(model, {}), num_particles=2000)
    th = np.asarray(post.sample(jax.random.key(1), 4000))[:, 0]
    frac = np.mean(th > 0)
    assert 0.4 < frac < 0.6, frac
    assert abs(np.mean(np.abs(th)) - 2.0) < 0.1


def test_smc_needs_a_proper_prior():
    def model(y):
        b = numpyro.sample("b", dist.ImproperUniform(dist.constraints.real, (), ()))
        numpyro.sample("y", dist.Normal(b, 1.0), obs=y)

    with pytest.raises(ValueError, match="proper prior"):
        smc(jax.random.key(0), NumPyroTarget(model, {"y": np.zeros(3)}), num_particles=100)


def _correlated(rho):
    cov = np.array([[1.0, rho], [rho, 1.0]])
    prec = jnp.asarray(np.linalg.inv(cov))
    return LogDensityTarget(lambda th: -0.5 * th @ prec @ th, dim=2), cov


def test_vi_fullrank_recovers_correlation_meanfield_does_not_and_khat_says_so():
    t, cov = _correlated(0.95)
    full = vi(jax.random.key(0), t, family="fullrank", max_steps=4000)
    assert np.allclose(np.asarray(full.cov()), cov, atol=0.1)
    assert full.info["khat"] < 0.5
    mf = vi(jax.random.key(0), t, family="meanfield", max_steps=4000)
    # mean-field underestimates the marginal variance (1 - rho^2 = 0.0975) and k-hat flags it
    assert np.all(np.diag(np.asarray(mf.cov())) < 0.3)
    assert mf.info["khat"] > 0.7


def test_vi_mixture_and_iwae_cover_two_modes():
    def logp(th):
        return jnp.logaddexp(-0.5 * jnp.sum((th - 3.0) ** 2), -0.5 * jnp.sum((th + 3.0) ** 2))

    t = LogDensityTarget(logp, dim=1)
    mix = vi(jax.random.key(0), t, family="mixture", n_components=2, max_steps=4000,
             init=jnp.array([[-1.0], [1.0]]))
    w = np.sort(np.asarray(mix.approximation.weights))
    assert np.allclose(w, 0.5, atol=0.1)
    assert np.allclose(np.sort(np.asarray(mix.approximation.means)[:, 0]), [-3, 3], atol=0.2)
    iw = vi(jax.random.key(0), t, family="fullrank", objective="iwae", num_particles=32,
            max_steps=3000, init=jnp.array([0.5]))
    # the importance-weighted bound makes a single Gaussian cover both modes (variance ~ 10)
    assert float(iw.cov()[0, 0]) > 4.0


def test_vi_on_a_constrained_model_samples_the_constrained_scale():
    post = vi(jax.random.key(0), NumPyroTarget(_schools, SCHOOLS), family="fullrank",
              max_steps=3000)
    draws = np.asarray(post.sample(jax.random.key(1), 500))
    assert draws.shape == (500, 10) and np.all(draws[:, 1] > 0)  # tau > 0
    with pytest.raises(NotImplementedError):
        post.log_prob(draws)
    assert np.isfinite(post.info["khat"])


def test_vi_rejects_unknown_family():
    t, _ = _correlated(0.0)
    with pytest.raises(ValueError, match="family"):
        vi(jax.random.key(0), t, family="flow")


def test_persistent_compilation_cache_writes_to_the_chosen_folder(tmp_path):
    before = fb.reference.compilation_cache_dir()
    try:
        fb.reference.set_compilation_cache(tmp_path)
        t = LogDensityTarget(lambda th, c: -0.5 * jnp.sum((th - c) ** 2), dim=2,
                             args=(jnp.full(2, 0.25),))
        nuts(jax.random.key(0), t, num_warmup=50, num_samples=50, num_chains=2, warn=False)
        assert any(tmp_path.iterdir())
    finally:
        fb.reference.set_compilation_cache(before)
