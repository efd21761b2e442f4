import jax
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

import flashbayes as fb


def _random_gmm(seed, k=3, d=2):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(k))
    m = rng.normal(size=(k, d)) * 2
    a = rng.normal(size=(k, d, d))
    cov = a @ np.swapaxes(a, -1, -2) + 0.3 * np.eye(d)
    return fb.GMM(weights=w, means=m, scale_tril=np.linalg.cholesky(cov)), (w, m, cov)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_log_prob_matches_scipy(d):
    g, (w, m, cov) = _random_gmm(d, k=3, d=d)
    x = np.random.default_rng(9).normal(size=(50, d)) * 2
    ref = np.log(sum(w[k] * stats.multivariate_normal(m[k], cov[k]).pdf(x) for k in range(3)))
    np.testing.assert_allclose(np.asarray(g.log_prob(x)), ref, rtol=1e-4, atol=1e-4)
    assert np.asarray(g.log_prob(x[0])).shape == ()


def test_sample_moments_and_key_determinism():
    g, _ = _random_gmm(1)
    s = np.asarray(g.sample(jax.random.key(0), 200_000))
    assert s.shape == (200_000, 2)
    se = np.sqrt(np.diagonal(np.asarray(g.cov())) / s.shape[0])
    assert np.all(np.abs(s.mean(0) - np.asarray(g.mean())) < 5 * se)
    np.testing.assert_allclose(np.cov(s, rowvar=False), np.asarray(g.cov()), rtol=0.03, atol=0.03)
    np.testing.assert_array_equal(np.asarray(g.sample(jax.random.key(3), 5)),
                                  np.asarray(g.sample(jax.random.key(3), 5)))


def test_marginal_and_condition_match_scipy():
    g, (w, m, cov) = _random_gmm(2, k=2, d=3)
    marg = g.marginal([0, 2])
    x = np.random.default_rng(0).normal(size=(10, 2))
    ref = np.log(sum(w[k] * stats.multivariate_normal(m[k][[0, 2]], cov[k][np.ix_([0, 2],
                                                                                  [0, 2])]).pdf(x)
                     for k in range(2)))
    np.testing.assert_allclose(np.asarray(marg.log_prob(x)), ref, rtol=1e-4, atol=1e-4)
    assert len(g.marginals()) == 3
    # conditional density = joint / marginal
    cond = g.condition([1], [0.3])
    pt = np.array([0.1, -0.2])
    full = np.array([pt[0], 0.3, pt[1]])
    lhs = float(cond.log_prob(pt))
    rhs = float(g.log_prob(full)) - float(g.marginal([1]).log_prob(np.array([0.3])))
    assert abs(lhs - rhs) < 1e-3


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights=[0.5, 0.6], means=[[0.0], [1.0]], scale_tril=[[[1.0]], [[1.0]]]), "summing"),
    (dict(weights=[-0.5, 1.5], means=[[0.0], [1.0]], scale_tril=[[[1.0]], [[1.0]]]), "non-neg"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], scale_tril=[[[1.0, 0.5], [0.0, 1.0]]]), "lower"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], scale_tril=[[[-1.0, 0.0], [0.0, 1.0]]]),
     "positive diagonal"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], scale_tril=[[[1.0]]]), "scale_tril"),
    (dict(weights=[1.0], means=[0.0], scale_tril=[[[1.0]]]), "means"),
    (dict(weights=[1.0], means=[[np.nan]], scale_tril=[[[1.0]]]), "finite"),
    (dict(weights=[], means=np.zeros((0, 1)), scale_tril=np.zeros((0, 1, 1))), "at least one"),
])
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fb.GMM(**kwargs)


def test_json_round_trip_and_errors():
    g, _ = _random_gmm(3)
    g2 = fb.GMM.from_json(g.to_json())
    for a, b in zip((g.weights, g.means, g.scale_tril), (g2.weights, g2.means, g2.scale_tril)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    with pytest.raises(ValueError, match="malformed JSON"):
        fb.GMM.from_json("{not json")
    with pytest.raises(ValueError, match="missing"):
        fb.GMM.from_json('{"weights": [1.0]}')
    g3 = fb.GMM.from_dict({"weights": [1.0], "means": [[0.0]], "cov": [[[4.0]]]})
    assert float(g3.scale_tril[0, 0, 0]) == pytest.approx(2.0)


def test_numpyro_round_trip():
    g, _ = _random_gmm(4)
    nd = g.to_numpyro()
    x = np.random.default_rng(1).normal(size=(7, 2))
    np.testing.assert_allclose(np.asarray(nd.log_prob(x)), np.asarray(g.log_prob(x)), rtol=1e-5,
                               atol=1e-5)
    back = fb.GMM.from_numpyro(jax.random.key(0), nd, 3)
    np.testing.assert_allclose(np.asarray(back.log_prob(x)), np.asarray(g.log_prob(x)),
                               rtol=1e-5, atol=1e-5)
    # a non-Gaussian NumPyro distribution is fitted by EM
    gamma = dist.Gamma(3.0, 2.0)
    fit = fb.GMM.from_numpyro(jax.random.key(1), gamma, 3, n_samples=20_000)
    held = gamma.sample(jax.random.key(2), (20_000,))
    kl = float(np.mean(np.asarray(gamma.log_prob(held)) - np.asarray(fit.log_prob(held[:, None]))))
    assert 0 <= kl < 0.02


def test_fit_gmm_recovers_known_mixture():
    true, (w, m, cov) = _random_gmm(5, k=2, d=2)
    true = fb.GMM(weights=[0.3, 0.7], means=[[-3.0, 0.0], [2.0, 1.0]],
                  scale_tril=np.linalg.cholesky(cov))
    x = true.sample(jax.random.key(0), 20_000)
    fit = fb.fit_gmm(jax.random.key(1), x, 2)
    order = np.argsort(np.asarray(fit.means[:, 0]))
    np.testing.assert_allclose(np.asarray(fit.weights)[order], [0.3, 0.7], atol=0.02)
    np.testing.assert_allclose(np.asarray(fit.means)[order], np.asarray(true.means), atol=0.1)
    fcov = np.asarray(fit.scale_tril @ np.swapaxes(fit.scale_tril, -1, -2))[order]
    np.testing.assert_allclose(fcov, cov, rtol=0.1, atol=0.1)
    # the fit's likelihood is close to the truth's on held-out data
    held = true.sample(jax.random.key(2), 5000)
    assert float(fit.log_prob(held).mean()) > float(true.log_prob(held).mean()) - 0.01


def test_fit_gmm_covariance_floor_and_errors():
    x = np.zeros((100, 1))
    x[50:] = 1.0  # two point masses: EM would collapse without the floor
    fit = fb.fit_gmm(jax.random.key(0), x, 2, cov_floor=1e-3)
    assert np.all(np.isfinite(np.asarray(fit.scale_tril)))
    assert np.all(np.asarray(fit.scale_tril) > 0)
    with pytest.raises(ValueError, match="at least"):
        fb.fit_gmm(jax.random.key(0), np.zeros((1, 2)), 3)
    with pytest.raises(ValueError, match="finite"):
        fb.fit_gmm(jax.random.key(0), np.full((10, 1), np.nan), 2)
    with pytest.raises(ValueError, match="constant dimension"):
        fb.fit_gmm(jax.random.key(0), np.ones((50, 1)), 2)


def test_float32_overflow_is_refused():
    with pytest.raises(ValueError, match="float32"):
        fb.GMM(weights=[1.0], means=[[1e39]], scale_tril=[[[1.0]]])
    with pytest.raises(ValueError, match="float32"):
        fb.GMM(weights=[1.0], means=[[0.0]], scale_tril=[[[1e-50]]])


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 4), d=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_any_valid_gmm_round_trips_json_and_has_finite_density(k, d, seed):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(k))
    tril = np.tril(rng.normal(size=(k, d, d)))
    idx = np.arange(d)
    tril[:, idx, idx] = np.exp(rng.normal(size=(k, d)))
    g = fb.GMM(weights=w, means=rng.normal(size=(k, d)) * 3, scale_tril=tril)
    g2 = fb.GMM.from_json(g.to_json())
    x = rng.normal(size=(5, d))
    np.testing.assert_allclose(np.asarray(g2.log_prob(x)), np.asarray(g.log_prob(x)), rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.isfinite(np.asarray(g.log_prob(x))))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(0, 3), st.integers(0, 3)),
              elements=st.floats(allow_nan=True, allow_infinity=True)))
def test_arbitrary_arrays_never_crash_validation(a):
    """Whatever array comes as means, the constructor either accepts or raises a clear error."""
    try:
        fb.GMM(weights=np.ones(max(a.shape[0], 1)) / max(a.shape[0], 1), means=a,
               scale_tril=np.broadcast_to(np.eye(max(a.shape[1], 1)),
                                          (max(a.shape[0], 1), max(a.shape[1], 1),
                                           max(a.shape[1], 1))))
    except ValueError as exc:
        assert "expected" in str(exc)
