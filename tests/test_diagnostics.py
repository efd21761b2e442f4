import jax
import numpy as np
import pytest

import flashbayes as fb
from flashbayes.diagnostics import c2st, kl_divergence, nll


def _gauss(mu, sd):
    return fb.GMM(weights=[1.0], means=[[mu]], scale_tril=[[[sd]]])


def test_kl_matches_closed_form_and_catches_a_wrong_answer():
    p = _gauss(0.0, 1.0)
    same, se0 = kl_divergence(jax.random.key(0), p, p, n=5000)
    assert same == pytest.approx(0.0, abs=1e-6)
    q = _gauss(0.3, 1.5)
    exact = np.log(1.5) + (1.0 + 0.3**2) / (2 * 1.5**2) - 0.5
    kl, se = kl_divergence(jax.random.key(1), p, q, n=50_000)
    assert abs(kl - exact) < 4 * se
    assert kl > 0.1  # a wrong posterior is not passed as right


def test_nll():
    assert nll(_gauss(0.0, 1.0), np.array([0.0])) == pytest.approx(0.5 * np.log(2 * np.pi),
                                                                   rel=1e-5)


def test_c2st_passes_same_distribution_and_fails_shifted_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 3)), rng.normal(size=(1000, 3))
    assert c2st(a, b) < 0.56
    assert c2st(a, b + np.array([0.0, 0.0, 1.0])) > 0.65
    with pytest.raises(ValueError, match="expected two arrays"):
        c2st(a, b[:, :2])


# -- the registry: every diagnostic passes a right answer and fails a wrong one ----------------


@pytest.mark.parametrize("name", fb.diagnostics.names())
def test_every_diagnostic_passes_right_and_fails_wrong(name):
    diag = fb.diagnostics.get(name)
    assert diag.description and diag.criterion and diag.reference
    key = jax.random.key(2024)
    _, right = diag.run_case(key, right=True)
    _, wrong = diag.run_case(key, right=False)
    assert right, f"{name} failed a right answer"
    assert not wrong, f"{name} passed a wrong answer"


def test_registry_lists_every_diagnostic():
    assert fb.diagnostics.names() == ["kl", "nll", "c2st", "mmd", "khat", "sbc", "coverage",
                                      "tarp"]
    with pytest.raises(ValueError, match="expected one of"):
        fb.diagnostics.get("nope")


# -- MMD -----------------------------------------------------------------------------------------


def test_mmd_estimate_is_unbiased_and_matches_closed_form():
    # 1-D N(0, 1) vs N(mu, 1), kernel width h: E k(x, x') = h / sqrt(h^2 + 2) exp(-mu^2 /
    # (2 (h^2 + 2))) for x ~ N(0, 1), x' ~ N(mu, 1); MMD^2 = 2 (E k(0) - E k(mu))
    rng = np.random.default_rng(0)
    h, mu = 1.0, 0.7
    exact = 2 * h / np.sqrt(h**2 + 2) * (1 - np.exp(-mu**2 / (2 * (h**2 + 2))))
    vals = [fb.diagnostics.mmd(jax.random.key(i), rng.normal(size=400),
                               rng.normal(size=300) + mu, bandwidth=h, n_permutations=1).value
            for i in range(20)]
    assert abs(np.mean(vals) - exact) < 4 * np.std(vals, ddof=1) / np.sqrt(len(vals))
    same = [fb.diagnostics.mmd(jax.random.key(i), rng.normal(size=200), rng.normal(size=200),
                               n_permutations=1).value for i in range(20)]
    assert abs(np.mean(same)) < 4 * np.std(same, ddof=1) / np.sqrt(len(same))


def test_mmd_subsamples_large_inputs_and_validates():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5000, 2)), rng.normal(size=(4000, 2))
    res = fb.diagnostics.mmd(jax.random.key(0), a, b, max_points=500, n_permutations=50)
    assert 0 < res.p_value <= 1 and res.bandwidth > 0 and res.n_permutations == 50
    with pytest.raises(ValueError, match="same dimension"):
        fb.diagnostics.mmd(jax.random.key(0), a, b[:, :1])
    with pytest.raises(ValueError, match="finite"):
        fb.diagnostics.mmd(jax.random.key(0), a, np.full((10, 2), np.nan))
    with pytest.raises(ValueError, match="n_permutations"):
        fb.diagnostics.mmd(jax.random.key(0), a, b, n_permutations=0)


# -- PSIS k-hat ----------------------------------------------------------------------------------


def test_psis_khat_recovers_the_pareto_shape():
    # weights with a Pareto tail of index 1/k: k-hat estimates k
    rng = np.random.default_rng(0)
    for k in (0.3, 0.9):
        log_w = k * rng.exponential(size=8000)  # log of Pareto(1/k) draws
        res = fb.diagnostics.psis_khat(log_w)
        assert abs(res.khat - k) < 0.15
        assert res.passed == (k < 0.7)
        assert np.exp(res.log_weights).sum() == pytest.approx(1.0)
        assert 1 <= res.ess <= 8000


def test_psis_khat_constant_ratios_and_input_untouched():
    res = fb.diagnostics.psis_khat(np.full(500, 3.0))
    assert res.khat == -np.inf and res.passed and res.ess == pytest.approx(500)
    lr = np.random.default_rng(0).normal(size=1000)
    copy = lr.copy()
    fb.diagnostics.psis_khat(lr)
    np.testing.assert_array_equal(lr, copy)  # ArviZ's psislw works in place: not on ours
    with pytest.raises(ValueError, match="at least 100"):
        fb.diagnostics.psis_khat(np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        fb.diagnostics.psis_khat(np.r_[np.zeros(200), np.nan])
    assert fb.diagnostics.khat_threshold(4000) == 0.7
    assert fb.diagnostics.khat_threshold(100) == pytest.approx(0.5)


# -- SBC, expected coverage, TARP -----------------------------------------------------------


@pytest.fixture(scope="module")
def exact_linear():
    return fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))


@pytest.fixture(scope="module")
def exact_draws(exact_linear):
    return fb.diagnostics.calibration_draws(jax.random.key(6), exact_linear, n_sims=400,
                                            n_draws=49)


def test_calibration_draws_shapes_and_sharing(exact_linear, exact_draws):
    d = exact_draws
    assert (d.n_sims, d.n_draws, d.dim) == (400, 49, 2)
    assert d.log_q_draws.shape == (400, 49) and d.log_q_theta.shape == (400,)
    np.testing.assert_allclose(d.prior_weights.sum(1), 1.0, rtol=1e-6)
    res = fb.diagnostics.sbc(jax.random.key(0), d, n_bins=10)
    assert res.ranks.shape == (400, 3) and res.ranks.min() >= 0 and res.ranks.max() <= 49
    assert res.n_sims == 400 and res.passed
    counts, expected = res.histogram()
    assert counts.shape == (10, 3) and np.all(counts.sum(0) == 400)
    np.testing.assert_allclose(expected, 40.0)  # 50 rank values in 10 bins of 5
    # same key, same simulations: sbc on the model equals sbc on its draws
    direct = fb.diagnostics.sbc(jax.random.key(6), exact_linear, n_sims=400, n_draws=49,
                                n_bins=10)
    np.testing.assert_array_equal(direct.ranks, res.ranks)


def test_sbc_bins_and_bonferroni():
    ranks_model = fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))
    with pytest.raises(ValueError, match="n_bins"):
        fb.diagnostics.sbc(jax.random.key(0), ranks_model, n_sims=50, n_bins=20)
    # uneven bins: 13 rank values in 4 bins get expected counts proportional to 4, 3, 3, 3
    res = fb.diagnostics.sbc(jax.random.key(0), ranks_model, n_sims=100, n_draws=12,
                             n_bins=4)
    np.testing.assert_allclose(res.histogram()[1], 100 * np.array([4, 3, 3, 3]) / 13)
    assert res.passed == bool(np.all(res.p_values > 0.05 / 3))


def test_under_and_over_dispersion_are_caught_with_the_right_sign(exact_linear):
    for factor in (0.5, 2.0):
        bad = fb.diagnostics.scale_covariance(exact_linear, factor)
        sims = fb.diagnostics.calibration_draws(jax.random.key(1), bad, n_sims=400, n_draws=49)
        assert not fb.diagnostics.sbc(jax.random.key(0), sims, n_bins=10).passed
        cov = fb.diagnostics.expected_coverage(jax.random.key(0), sims)
        assert not cov.passed
        assert (cov.signed_area < 0) == (factor < 1)  # narrow: over-confident
        assert cov.max_deviation > cov.bound


def test_a_biased_posterior_is_caught_by_sbc(exact_linear):
    # (TARP with references from the prior sees a bias only at second order: the reference
    # lies on either side of the posterior, so the effects of the shift cancel to first order)
    def shifted(*arrays):
        w, m, s = exact_linear.posterior_arrays(*arrays)
        return w, m + 0.5 * np.sqrt(np.diagonal(s @ np.swapaxes(s, -1, -2), axis1=-2,
                                                axis2=-1)), s

    bad = fb.diagnostics.PosteriorModel(exact_linear.task, shifted, name="shifted")
    sims = fb.diagnostics.calibration_draws(jax.random.key(2), bad, n_sims=400, n_draws=49)
    res = fb.diagnostics.sbc(jax.random.key(0), sims, n_bins=10)
    assert not res.passed
    assert res.ranks[:, 0].mean() < 0.4 * 49  # draws sit above theta: ranks pile up low


def test_coverage_curves(exact_draws):
    cov = fb.diagnostics.expected_coverage(jax.random.key(0), exact_draws,
                                           alphas=[0.0, 0.5, 1.0])
    assert cov.kind == "hpd" and cov.passed
    assert cov.ecp[0] == 0.0 and cov.ecp[-1] == 1.0 and abs(cov.ecp[1] - 0.5) < cov.bound
    assert cov.bound == pytest.approx(1.36 / np.sqrt(400), rel=0.05)
    t = fb.diagnostics.tarp(jax.random.key(0), exact_draws)
    assert t.kind == "tarp" and t.passed and 0 <= t.area < 0.05
    with pytest.raises(ValueError, match="alphas"):
        fb.diagnostics.tarp(jax.random.key(0), exact_draws, alphas=[1.5])
    with pytest.raises(ValueError, match="level"):
        fb.diagnostics.tarp(jax.random.key(0), exact_draws, level=0.0)


def test_posterior_model_validation(exact_linear):
    with pytest.raises(TypeError, match="expected an AmortizedPosterior"):
        fb.diagnostics.sbc(jax.random.key(0), object())
    with pytest.raises(ValueError, match="closed-form"):
        fb.diagnostics.PosteriorModel.exact(fb.tasks.get("logistic_regression"))
    with pytest.raises(ValueError, match="factor"):
        fb.diagnostics.scale_covariance(exact_linear, -1.0)

    def wrong_shape(w, m, s, *rest):
        return w, m[:, :, :1], s

    def not_finite(w, m, s, *rest):
        return w, np.full(np.shape(m), np.nan), s

    for fn, err in ((wrong_shape, ValueError), (not_finite, FloatingPointError)):
        model = fb.diagnostics.PosteriorModel(exact_linear.task, fn)
        with pytest.raises(err):
            fb.diagnostics.calibration_draws(jax.random.key(0), model, n_sims=10)
    with pytest.raises(ValueError, match="n_sims"):
        fb.diagnostics.calibration_draws(jax.random.key(0), exact_linear, n_sims=1)


# -- the shipped models (slow tier) ----------------------------------------------------------


def _prepared_state(task):
    """The task's preparation; gaussian_variance's bank of fitted priors is cut to 256 priors
    (its preparation fits a GMM to 10,000 draws per prior: 1,024 take minutes on 2 cores)."""
    if task.name == "gaussian_variance":
        return fb.tasks.get("gaussian_variance", bank_size=256).prepare(jax.random.key(1))
    return task.prepare(jax.random.key(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gmm_linear", "gaussian_variance", "logistic_regression"])
def test_shipped_model_is_calibrated_and_a_shrunk_posterior_is_not(name):
    """SBC over 1,000 simulations of each shipped model (99 draws, 20 bins, Bonferroni over the
    d + 1 rank statistics at level 0.05), expected coverage and TARP on the same draws; the same
    tests on the model's posterior with its covariance halved must fail."""
    model = fb.load_pretrained(name)
    key = jax.random.key(2026)
    state = _prepared_state(model.task)
    sims = fb.diagnostics.calibration_draws(key, model, n_sims=1000, task_state=state)
    res = fb.diagnostics.sbc(key, sims)
    cov = fb.diagnostics.expected_coverage(key, sims)
    tarp = fb.diagnostics.tarp(key, sims)
    assert res.passed, f"{name}: SBC p-values {res.p_values}"
    assert cov.passed, f"{name}: HPD coverage max deviation {cov.max_deviation}"
    assert tarp.passed, f"{name}: TARP max deviation {tarp.max_deviation}"
    shrunk = fb.diagnostics.scale_covariance(model, 0.5)
    bad_sims = fb.diagnostics.calibration_draws(key, shrunk, n_sims=1000, task_state=state)
    bad = fb.diagnostics.sbc(key, bad_sims)
    assert not bad.passed, f"{name}: SBC passed a halved covariance ({bad.p_values})"
    assert bad.p_values[-1] < 1e-6  # the joint log q statistic sees it plainly
    bad_cov = fb.diagnostics.expected_coverage(key, bad_sims)
    assert not bad_cov.passed and bad_cov.signed_area < 0
