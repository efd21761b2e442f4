import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import flashbayes as fb
from flashbayes.tasks._gp import gp_log_marginal, gp_predict, kernel_matrix


@pytest.mark.parametrize("name", fb.tasks.predictive_names())
def test_every_predictive_task_generic(name):
    """Generic checks run on every predictive registry entry."""
    task = fb.tasks.get_predictive(name)
    b = jax.jit(lambda k: task.sample_batch(k, 16, n_query=7))(jax.random.key(0))
    assert b.context_x.shape == (16, task.n_max, task.x_dim)
    assert b.context_y.shape == (16, task.n_max) and b.cmask.shape == (16, task.n_max)
    assert b.query_x.shape == (16, 7, task.x_dim) and b.query_y.shape == (16, 7)
    assert b.hyper.shape == (16, len(task.hyper_names))
    n = np.asarray(b.cmask).sum(1)
    assert n.min() >= task.n_min and n.max() <= task.n_max
    # real rows first, padding zeroed
    cm = np.asarray(b.cmask)
    assert np.all(cm == (np.arange(task.n_max)[None] < n[:, None]))
    assert np.all(np.asarray(b.context_y)[~cm] == 0)
    for leaf in jax.tree_util.tree_leaves(b):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
    p1 = task.sample_problem(jax.random.key(3), n=task.n_min, n_query=2)
    p2 = task.sample_problem(jax.random.key(3), n=task.n_min, n_query=2)
    np.testing.assert_array_equal(p1.context_y, p2.context_y)
    assert p1.context_x.shape == (task.n_min, task.x_dim) and p1.query_y.shape == (2,)
    # every row of a user's problem is a real draw (no padding left in)
    full = task.sample_problem(jax.random.key(4), n=task.n_max, n_query=2)
    assert np.all(np.any(full.context_x != 0, axis=1)) and np.all(full.context_y != 0)
    cx, cy, qx = task.validate(p1.context_x, p1.context_y, p1.query_x)
    assert cx.shape == p1.context_x.shape
    with pytest.raises(ValueError, match="expected shape"):
        task.validate(np.zeros((3, task.x_dim + 1)), np.zeros(3), np.zeros((1, task.x_dim)))
    with pytest.raises(ValueError, match="finite"):
        task.validate(np.zeros((3, task.x_dim)), np.full(3, np.nan), np.zeros((1, task.x_dim)))
    with pytest.raises(ValueError, match="one per context_x row"):
        task.validate(np.zeros((3, task.x_dim)), np.zeros(2), np.zeros((1, task.x_dim)))
    with pytest.raises(ValueError, match="expected an integer"):
        task.sample_problem(jax.random.key(0), n=task.n_max + 1)


def test_unknown_predictive_task_and_bad_parameters():
    with pytest.raises(ValueError, match="expected one of"):
        fb.tasks.get_predictive("nope")
    with pytest.raises(ValueError, match="kernel"):
        fb.tasks.get_predictive("gp_hyperprior", kernel="cosine")
    with pytest.raises(ValueError, match="x_dim"):
        fb.tasks.get_predictive("gp_hyperprior", x_dim=4)
    with pytest.raises(ValueError, match="tau > 0"):
        fb.tasks.get_predictive("gp_hyperprior", noise=(0.0, -1.0))


def test_kernels_by_hand():
    x1, x2 = jnp.array([[0.0]]), jnp.array([[0.3]])
    l, s = 0.2, 1.5
    d = 0.3 / l
    rbf = s**2 * np.exp(-0.5 * d**2)
    mat = s**2 * (1 + np.sqrt(5) * d + 5 * d**2 / 3) * np.exp(-np.sqrt(5) * d)
    assert float(kernel_matrix("rbf", x1, x2, l, s)[0, 0]) == pytest.approx(rbf, rel=1e-5)
    assert float(kernel_matrix("matern52", x1, x2, l, s)[0, 0]) == pytest.approx(mat, rel=1e-5)
    # the Matern gradient at zero distance is finite
    g = jax.grad(lambda ll: kernel_matrix("matern52", x1, x1, ll, s)[0, 0])(0.2)
    assert np.isfinite(float(g))


@pytest.mark.parametrize("kernel", ["rbf", "matern52"])
def test_marginal_likelihood_and_predictive_against_scipy(kernel):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(6, 2))
    y = rng.normal(size=6)
    h = np.array([0.3, 1.2, 0.2, 0.4])
    k = np.asarray(kernel_matrix(kernel, x, x, h[0], h[1]), np.float64)
    cov = k + (h[2] ** 2 + 1e-6 * h[1] ** 2) * np.eye(6)
    want = stats.multivariate_normal(np.full(6, h[3]), cov).logpdf(y)
    got = float(gp_log_marginal(kernel, jnp.asarray(h), x, y))
    assert got == pytest.approx(want, abs=1e-4)
    # padded rows are ignored
    xp = np.concatenate([x, np.zeros((3, 2))])
    yp = np.concatenate([y, np.full(3, 7.0)])
    mask = np.arange(9) < 6
    assert float(gp_log_marginal(kernel, jnp.asarray(h), xp, yp, mask)) == pytest.approx(
        want, abs=1e-4)
    # the predictive is the Gaussian conditional of the joint
    xq = rng.uniform(size=(2, 2))
    allx = np.concatenate([x, xq])
    kall = np.asarray(kernel_matrix(kernel, allx, allx, h[0], h[1]), np.float64)
    kall += (h[2] ** 2 + 1e-6 * h[1] ** 2) * np.eye(8)
    a = np.linalg.solve(kall[:6, :6], kall[:6, 6:])
    mu_want = h[3] + a.T @ (y - h[3])
    var_want = np.diag(kall[6:, 6:] - kall[6:, :6] @ a)
    mu, var = gp_predict(kernel, jnp.asarray(h), xp, yp, xq, mask)
    np.testing.assert_allclose(np.asarray(mu), mu_want, atol=1e-4)
    np.testing.assert_allclose(np.asarray(var), var_want, atol=1e-4)


def _whitened_chi2_z(batch, kernel, hyper):
    """z-score of sum ||L^-1 (y - m)||^2 over the data sets (chi^2 with n per set), L the
    Cholesky factor of the covariance implied by `kernel` at `hyper`."""
    total, dof = 0.0, 0
    for cx, cy in zip(np.asarray(batch.context_x, np.float64),
                      np.asarray(batch.context_y, np.float64)):
        k = np.asarray(kernel_matrix(kernel, cx, cx, hyper[0], hyper[1]), np.float64)
        chol = np.linalg.cholesky(k + hyper[2] ** 2 * np.eye(len(cy)))
        a = np.linalg.solve(chol, cy - hyper[3])
        total += np.sum(a**2)
        dof += len(cy)
    return (total - dof) / np.sqrt(2 * dof)


def test_sampler_draws_from_the_stated_gp():
    """With a (nearly) point-mass hyperprior, whitened draws are iid N(0, 1) under the task's
    kernel; the same check fails when the other kernel is used as the reference."""
    h = np.array([0.2, 1.0, 0.1, 0.3])
    tight = 1e-4
    task = fb.tasks.get_predictive(
        "gp_hyperprior", n_min=20, n_max=20, lengthscale=(np.log(h[0]), tight),
        outputscale=(np.log(h[1]), tight), noise=(np.log(h[2]), tight), mean=(h[3], tight))
    b = task.sample_batch(jax.random.key(5), 300, n_query=1)
    assert abs(_whitened_chi2_z(b, "rbf", h)) < 4
    assert abs(_whitened_chi2_z(b, "matern52", h)) > 8


def test_sampler_hyperprior():
    task = fb.tasks.get_predictive("gp_hyperprior", n_max=10)
    b = task.sample_batch(jax.random.key(1), 4000, n_query=2)
    z = np.log(np.asarray(b.hyper[:, :3], np.float64))
    # log lengthscale, log outputscale, log noise ~ N(mu, tau^2): MCSE-scaled mean checks
    for j in range(3):
        zs = (z[:, j].mean() - task.prior_loc[j]) / (task.prior_scale[j] / np.sqrt(4000))
        assert abs(zs) < 4, (j, zs)
        assert np.std(z[:, j]) == pytest.approx(task.prior_scale[j], rel=0.06)
    assert abs(np.asarray(b.hyper[:, 3]).mean()) < 4 * 0.5 / np.sqrt(4000)


def test_sampler_marginal_variance():
    """Var(y) over the prior: E[s^2] + E[sigma^2] + tau_m^2 (LogNormal moments)."""
    task = fb.tasks.get_predictive("gp_hyperprior", x_dim=2, n_max=5)
    b = task.sample_batch(jax.random.key(2), 20000, n_query=1)
    y = np.asarray(b.query_y[:, 0], np.float64)
    want = np.exp(2 * 0.0 + 2 * 0.25) + np.exp(2 * np.log(0.1) + 2 * 0.25) + 0.25
    se = np.std((y - y.mean()) ** 2) / np.sqrt(y.size)
    assert abs(np.var(y) - want) < 4 * se


def test_exact_predictive_of_the_sampler_equals_the_gp_predictive():
    """`sample_batch_exact` reads each query's predictive off the joint draw's Cholesky factor:
    it equals `predict` given the real context points, and the draws are `sample_batch`'s."""
    task = fb.tasks.get_predictive("gp_hyperprior", n_max=30)
    key = jax.random.key(4)
    batch, mean, var = jax.jit(lambda k: task.sample_batch_exact(k, 12, n_query=7))(key)
    plain = jax.jit(lambda k: task.sample_batch(k, 12, n_query=7))(key)
    np.testing.assert_array_equal(np.asarray(batch.query_y), np.asarray(plain.query_y))
    want_m, want_v = jax.vmap(task.predict)(batch.hyper, batch.context_x, batch.context_y,
                                            batch.query_x, batch.cmask)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(want_m), atol=2e-4)
    np.testing.assert_allclose(np.asarray(var), np.asarray(want_v), rtol=2e-3)
    # conditioning on every padded context row as well is another (wrong) predictive
    full_m, _ = jax.vmap(task.predict)(batch.hyper, batch.context_x, batch.context_y,
                                       batch.query_x, jnp.ones_like(batch.cmask))
    assert np.max(np.abs(np.asarray(mean) - np.asarray(full_m))) > 1e-2
