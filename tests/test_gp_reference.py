import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import flashbayes as fb
from flashbayes.reference import (
    GaussianMixturePredictive,
    gp_nuts,
    gp_oracle,
    gp_quadrature,
    gp_type2_ml,
)

TIGHT = 0.01


def _tight_task(h, **kw):
    return fb.tasks.get_predictive(
        "gp_hyperprior", lengthscale=(np.log(h[0]), TIGHT), outputscale=(np.log(h[1]), TIGHT),
        noise=(np.log(h[2]), TIGHT), mean=(h[3], TIGHT), **kw)


def test_oracle_two_points_by_hand():
    task = fb.tasks.get_predictive("gp_hyperprior")
    h = np.array([0.3, 1.5, 0.2, 0.25])
    x = np.array([[0.1], [0.5]])
    y = np.array([0.7, -0.4])
    xq = np.array([[0.3]])

    def k(a, b):
        return h[1] ** 2 * np.exp(-0.5 * (a - b) ** 2 / h[0] ** 2)

    noise = h[2] ** 2 + 1e-6 * h[1] ** 2
    kxx = np.array([[k(0.1, 0.1) + noise, k(0.1, 0.5)], [k(0.5, 0.1), k(0.5, 0.5) + noise]])
    kq = np.array([k(0.3, 0.1), k(0.3, 0.5)])
    mu = h[3] + kq @ np.linalg.solve(kxx, y - h[3])
    var = h[1] ** 2 + noise - kq @ np.linalg.solve(kxx, kq)
    pred = gp_oracle(task, h, x, y, xq)
    assert float(pred.mean()[0]) == pytest.approx(mu, abs=1e-5)
    assert float(pred.variance()[0]) == pytest.approx(var, abs=1e-5)
    assert float(pred.log_prob(jnp.array([0.1]))[0]) == pytest.approx(
        stats.norm(mu, np.sqrt(var)).logpdf(0.1), abs=1e-5)
    with pytest.raises(ValueError, match="positive"):
        gp_oracle(task, [0.3, -1.0, 0.2, 0.0], x, y, xq)
    with pytest.raises(ValueError, match="n_max"):
        gp_oracle(fb.tasks.get_predictive("gp_hyperprior", n_max=1), h, x, y, xq)


def test_mixture_predictive_quantiles_and_samples():
    rng = np.random.default_rng(0)
    p = GaussianMixturePredictive(jnp.array([0.3, 0.7]), jnp.asarray(rng.normal(size=(2, 3))),
                                  jnp.asarray(rng.uniform(0.1, 1.0, size=(2, 3))))
    for q in (0.05, 0.5, 0.95):
        np.testing.assert_allclose(np.asarray(p.cdf(p.quantile(q))), q, atol=1e-5)
    s = np.asarray(p.sample(jax.random.key(0), 40_000), np.float64)
    sd = np.sqrt(np.asarray(p.variance()))
    z = (s.mean(0) - np.asarray(p.mean())) / (sd / np.sqrt(40_000))
    assert np.all(np.abs(z) < 4)
    np.testing.assert_allclose(s.std(0), sd, rtol=0.03)


def test_mixture_predictive_with_weights_per_query_point():
    from scipy.special import logsumexp

    rng = np.random.default_rng(1)
    w = np.array([[0.9, 0.2], [0.1, 0.8]])  # query 0 mostly component 0, query 1 component 1
    mu, var = np.array([[-2.0, -2.0], [2.0, 2.0]]), np.full((2, 2), 0.25)
    p = GaussianMixturePredictive(w, mu, var)
    y = rng.normal(size=2)
    manual = logsumexp(np.log(w) + stats.norm.logpdf(y[None], mu, np.sqrt(var)), axis=0)
    np.testing.assert_allclose(np.asarray(p.log_prob(y)), manual, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p.mean()), [-1.6, 1.2], rtol=1e-5)
    s = np.asarray(p.sample(jax.random.key(0), 20_000))
    np.testing.assert_allclose((s > 0).mean(0), [0.1, 0.8], atol=0.01)
    # one query point's predictive as a 1-D fb.GMM: the same density
    g = p.gmm(1)
    assert isinstance(g, fb.GMM) and g.dim == 1
    np.testing.assert_allclose(float(g.log_prob(jnp.array([[y[1]]]))[0]), manual[1], rtol=1e-5)
    with pytest.raises(IndexError, match="below 2"):
        p.gmm(2)
    with pytest.raises(ValueError, match=r"weights \(S,\) or \(S, m\)"):
        GaussianMixturePredictive(np.ones(3), mu, var)


def _nlpd_gap(pred, ref, y):
    return float(np.mean(np.abs(np.asarray(pred.log_prob(y)) - np.asarray(ref.log_prob(y)))))


@pytest.mark.slow  # about 30 s: the default tier is kept under 15 minutes
def test_nuts_predictive_approaches_oracle_under_tight_hyperprior():
    h = np.array([0.25, 1.0, 0.15, 0.2])
    task = _tight_task(h)
    p = task.sample_problem(jax.random.key(0), n=8, n_query=10)
    oracle = gp_oracle(task, h, p.context_x, p.context_y, p.query_x)
    nuts = gp_nuts(jax.random.key(1), task, p.context_x, p.context_y, p.query_x,
                   num_warmup=300, num_samples=200, num_chains=2, num_mix=100, warn=False)
    y = jnp.asarray(p.query_y, jnp.float32)
    assert _nlpd_gap(nuts, oracle, y) < 0.02
    # the same check catches a mis-specified reference (noise twice too large)
    wrong = gp_oracle(task, h * np.array([1, 1, 2, 1]), p.context_x, p.context_y, p.query_x)
    assert _nlpd_gap(nuts, wrong, y) > 0.1


@pytest.mark.slow  # about 30 s: the default tier is kept under 15 minutes
def test_type2_ml_recovers_hyperparameters_on_a_large_data_set():
    h = np.array([0.15, 1.2, 0.1, 0.3])
    task = fb.tasks.get_predictive("gp_hyperprior", n_max=300)
    tight = _tight_task(h, n_min=300, n_max=300)
    p = tight.sample_problem(jax.random.key(3), n=300, n_query=2)
    fit = gp_type2_ml(jax.random.key(4), task, p.context_x, p.context_y, p.query_x)
    got = np.asarray(fit.info["hyper"])
    assert got[0] == pytest.approx(h[0], rel=0.2)
    assert got[2] == pytest.approx(h[2], rel=0.15)
    assert got[1] == pytest.approx(h[1], rel=0.5)
    # and the recovered noise is far from a wrong value
    assert abs(got[2] - 2 * h[2]) > 0.5 * h[2]


@pytest.mark.slow
def test_nuts_beats_type2_ml_at_small_n():
    """Averaged over data sets of 3 points, mixing over the hyperparameter posterior predicts
    better than plugging in the marginal-likelihood maximiser (measured; tolerant)."""
    task = fb.tasks.get_predictive("gp_hyperprior")
    gaps = []
    for seed in range(8):
        p = task.sample_problem(jax.random.key(100 + seed), n=3, n_query=20)
        y = jnp.asarray(p.query_y, jnp.float32)
        t2 = gp_type2_ml(jax.random.key(seed), task, p.context_x, p.context_y, p.query_x)
        nu = gp_nuts(jax.random.key(seed), task, p.context_x, p.context_y, p.query_x,
                     num_warmup=300, num_samples=250, num_chains=2, num_mix=200, warn=False)
        gaps.append(float(np.mean(np.asarray(nu.log_prob(y)) - np.asarray(t2.log_prob(y)))))
    assert np.mean(gaps) > 0.0, gaps


def _importance_predictive(task, p, y, draws=40_000, seed=0):
    """log p(y* | context) by importance sampling from the hyperprior (all four hyperparameters
    drawn, the mean included), through the task's Cholesky-based marginal and predictive."""
    from scipy.special import logsumexp

    x, cy, qx = (jnp.asarray(a, jnp.float32) for a in (p.context_x, p.context_y, p.query_x))
    hyper = jax.vmap(task.sample_hyper)(jax.random.split(jax.random.key(seed), draws))
    lml = np.asarray(jax.vmap(lambda h: task.log_marginal(h, x, cy))(hyper), np.float64)
    mu, var = (np.asarray(a, np.float64)
               for a in jax.vmap(lambda h: task.predict(h, x, cy, qx))(hyper))
    logw = lml - logsumexp(lml)
    return logsumexp(logw[:, None] + stats.norm.logpdf(y[None], mu, np.sqrt(var)), axis=0)


def test_quadrature_matches_importance_sampling_and_a_wrong_hyperprior_fails():
    task = fb.tasks.get_predictive("gp_hyperprior")
    p = task.sample_problem(jax.random.key(7), n=4, n_query=6)
    y = np.asarray(p.query_y)
    want = _importance_predictive(task, p, y)
    got = np.asarray(gp_quadrature(task, p.context_x, p.context_y, p.query_x).log_prob(y))
    np.testing.assert_allclose(got, want, atol=0.02)
    # the same check fails for the quadrature of another hyperprior (noise 3x larger)
    wrong_task = fb.tasks.get_predictive("gp_hyperprior", noise=(np.log(0.3), 0.5))
    wrong = np.asarray(gp_quadrature(wrong_task, p.context_x, p.context_y, p.query_x)
                       .log_prob(y))
    assert np.max(np.abs(wrong - want)) > 0.1


def test_quadrature_approaches_oracle_under_tight_hyperprior_and_converges_in_the_grid():
    h = np.array([0.25, 1.0, 0.15, 0.2])
    task = _tight_task(h)
    p = task.sample_problem(jax.random.key(0), n=8, n_query=10)
    y = jnp.asarray(p.query_y, jnp.float32)
    oracle = gp_oracle(task, h, p.context_x, p.context_y, p.query_x)
    quad = gp_quadrature(task, p.context_x, p.context_y, p.query_x)
    assert _nlpd_gap(quad, oracle, y) < 0.01
    wrong = gp_oracle(task, h * np.array([1, 1, 2, 1]), p.context_x, p.context_y, p.query_x)
    assert _nlpd_gap(quad, wrong, y) > 0.1
    # on the shipped hyperprior with 60 points, a finer grid changes nothing that matters
    task = fb.tasks.get_predictive("gp_hyperprior")
    p = task.sample_problem(jax.random.key(1), n=60, n_query=10)
    y = jnp.asarray(p.query_y, jnp.float32)
    base = gp_quadrature(task, p.context_x, p.context_y, p.query_x)
    fine = gp_quadrature(task, p.context_x, p.context_y, p.query_x, grid=36, rounds=4)
    assert _nlpd_gap(base, fine, y) < 1e-3
    # a first grid of +-0.5 prior sd misses most of the posterior: the grids move out to it
    narrow = gp_quadrature(task, p.context_x, p.context_y, p.query_x, width=0.5)
    assert narrow.info["grids"] > 4 and not narrow.info["open_edge"]
    assert _nlpd_gap(base, narrow, y) < 1e-3
    assert base.info["effective_points"] > 20  # the posterior is spread over many grid points
    for bad in ({"grid": 1}, {"rounds": -1}, {"eps": 0.0}, {"width": float("nan")}):
        with pytest.raises(ValueError, match="expected"):
            gp_quadrature(task, p.context_x, p.context_y, p.query_x, **bad)
