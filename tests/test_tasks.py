import jax
import numpy as np
import pytest
from scipy import integrate, stats

import flashbayes as fb
from flashbayes.tasks import LogInverseGamma

SMALL_BANK = {"lti_tracking": {"bank_size": 512}}


@pytest.mark.parametrize("name", fb.tasks.names())
def test_every_task_generic(name):
    """Generic checks run on every registry entry."""
    # tasks that build a bank of priors in `prepare` take a small one here
    task = fb.tasks.get(name, **SMALL_BANK.get(name, {}))
    state = task.prepare(jax.random.key(0)) if name != "gaussian_variance" else \
        task._bank(jax.random.key(0), 4)
    batch = task.sample_batch(jax.random.key(1), 16, state)
    assert batch.weights.shape == (16, task.k_max)
    assert batch.means.shape == (16, task.k_max, task.theta_dim)
    assert batch.data.shape == (16, task.n_max, task.data_dim)
    w = np.asarray(batch.weights)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)
    assert np.all(w[~np.asarray(batch.cmask)] == 0)
    n = np.asarray(batch.dmask).sum(1)
    assert n.min() >= task.n_min and n.max() <= task.n_max
    assert np.all(np.isfinite(np.asarray(batch.data))) and np.all(np.isfinite(batch.theta))
    # one problem, as a user holds it; same key, same problem
    p1 = task.sample_problem(jax.random.key(2), n=task.n_min + 1)
    p2 = task.sample_problem(jax.random.key(2), n=task.n_min + 1)
    np.testing.assert_array_equal(p1.data, p2.data)
    assert p1.data.shape == (task.n_min + 1, task.data_dim)
    assert isinstance(p1.prior, fb.GMM) and p1.prior.dim == task.theta_dim
    ll = task.log_likelihood(p1.theta, p1.data)
    assert np.isfinite(float(ll))
    with pytest.raises(ValueError, match="expected shape"):
        task.validate_data(np.zeros((3, task.data_dim + 1)))
    with pytest.raises(ValueError, match="finite"):
        task.validate_data(np.full((3, task.data_dim), np.nan))


def test_unknown_task():
    with pytest.raises(ValueError, match="expected one of") as info:
        fb.tasks.get("nope")
    assert "get_predictive" not in str(info.value)
    # tasks of the other registries are named with the call that builds them
    with pytest.raises(ValueError, match=r"fb\.tasks\.get_predictive\('gp_hyperprior'\)"):
        fb.tasks.get("gp_hyperprior")
    with pytest.raises(ValueError, match=r"fb\.sbi\.tasks\.get\('slcp'\)"):
        fb.tasks.get("slcp")


def _grid_posterior_2d(task, prior, data, lo, hi, m=400):
    g = np.linspace(lo, hi, m)
    gx, gy = np.meshgrid(g[:, 0], g[:, 1], indexing="ij")
    pts = np.stack([gx.ravel(), gy.ravel()], -1)
    lp = np.asarray(prior.log_prob(pts), np.float64)
    resid = data[None, :, :] - (pts @ task.A.T)[:, None, :]
    lp += -0.5 * np.sum(resid**2, axis=(1, 2)) / task.noise_sd**2
    p = np.exp(lp - lp.max())
    cell = (g[1, 0] - g[0, 0]) * (g[1, 1] - g[0, 1])
    p /= p.sum() * cell
    return pts, p, cell


@pytest.mark.parametrize("seed,n", [(0, 3), (1, 12), (2, 0)])
def test_gmm_linear_exact_matches_grid(seed, n):
    task = fb.tasks.get("gmm_linear")
    prob = task.sample_problem(jax.random.key(seed), n=n)
    exact = task.exact_posterior(prob.prior, prob.data)
    assert exact.n_components == prob.prior.n_components
    mean = np.asarray(exact.mean())
    sd = np.sqrt(np.diagonal(np.asarray(exact.cov())))
    pts, p, cell = _grid_posterior_2d(task, prob.prior, prob.data, mean - 8 * sd, mean + 8 * sd)
    grid_mean = (pts * p[:, None]).sum(0) * cell
    np.testing.assert_allclose(grid_mean, mean, atol=0.02 * sd.max() + 1e-3)
    dens = np.exp(np.asarray(exact.log_prob(pts), np.float64))
    # total variation distance between grid and closed form
    assert 0.5 * np.sum(np.abs(dens - p)) * cell < 0.01
    if n == 0:
        np.testing.assert_allclose(np.asarray(exact.weights), np.asarray(prob.prior.weights),
                                   rtol=1e-5)
        np.testing.assert_allclose(np.asarray(exact.means), np.asarray(prob.prior.means))


def test_gmm_linear_grid_check_fails_on_wrong_posterior():
    """The same grid comparison catches a wrong answer (here: the prior as 'posterior')."""
    task = fb.tasks.get("gmm_linear")
    prob = task.sample_problem(jax.random.key(1), n=12)
    exact = task.exact_posterior(prob.prior, prob.data)
    mean = np.asarray(exact.mean())
    sd = np.sqrt(np.diagonal(np.asarray(exact.cov())))
    pts, p, cell = _grid_posterior_2d(task, prob.prior, prob.data, mean - 8 * sd, mean + 8 * sd)
    wrong = np.exp(np.asarray(prob.prior.log_prob(pts), np.float64))
    assert 0.5 * np.sum(np.abs(wrong - p)) * cell > 0.1


def test_gaussian_variance_exact_matches_quadrature():
    task = fb.tasks.get("gaussian_variance")
    prob = task.sample_problem(jax.random.key(3), n=15)
    prior = prob.user_prior
    post = task.exact_posterior(prior, prob.data)
    x = prob.data[:, 0]

    def unnorm(t):
        return np.exp(float(prior.log_prob(np.array([[t]]))[0])
                      + np.sum(stats.norm(0, np.exp(t / 2)).logpdf(x)) + 30)

    z, _ = integrate.quad(unnorm, -15, 15, limit=200)
    m1, _ = integrate.quad(lambda t: t * unnorm(t), -15, 15, limit=200)
    assert m1 / z == pytest.approx(float(post.mean()[0]), abs=1e-4)
    for t in (-1.0, 0.0, 1.0):
        assert np.log(unnorm(t) / z) == pytest.approx(float(post.log_prob(np.array([[t]]))[0]),
                                                      abs=1e-4)
    # the log-inverse-gamma density integrates to one and its draws have the stated moments
    d = LogInverseGamma(3.0, 2.0)
    tot, _ = integrate.quad(lambda t: np.exp(float(d.log_prob(np.array([[t]]))[0])), -15, 15)
    assert tot == pytest.approx(1.0, abs=1e-6)
    s = np.asarray(d.sample(jax.random.key(0), 100_000))
    assert s.mean() == pytest.approx(float(d.mean()[0]), abs=4 * np.sqrt(float(d.cov()[0, 0])
                                                                       / 1e5))


def test_gaussian_variance_gmm_prior_is_fit_of_user_prior():
    task = fb.tasks.get("gaussian_variance")
    prob = task.sample_problem(jax.random.key(4), n=0)
    assert prob.prior.n_components == 4
    grid = np.linspace(-3, 3, 50)[:, None]
    p_true = np.exp(np.asarray(prob.user_prior.log_prob(grid)))
    p_fit = np.exp(np.asarray(prob.prior.log_prob(grid)))
    assert np.max(np.abs(p_true - p_fit)) < 0.05 * p_true.max()


def test_logistic_data_rows():
    task = fb.tasks.get("logistic_regression")
    prob = task.sample_problem(jax.random.key(0), n=40)
    assert set(np.unique(prob.data[:, 2])) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="0 or 1"):
        task.validate_data(np.array([[0.1, 0.2, 0.5]]))
