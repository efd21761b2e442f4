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
