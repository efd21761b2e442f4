import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from flashbayes.distributions._bar import BarDistribution, bar_borders


def _random_bar(seed=0, k=50, batch=(3,)):
    rng = np.random.default_rng(seed)
    borders = bar_borders(rng.standard_t(5, size=20_000), k)
    logits = rng.normal(size=(*batch, k)) * 2.0
    return BarDistribution(jnp.asarray(borders, jnp.float32), jnp.asarray(logits, jnp.float32))


def _integral(bar):
    b = np.asarray(bar.borders, np.float64)
    w = np.diff(b)
    grid = np.linspace(b[1] - 12 * w[0], b[-2] + 12 * w[-1], 400_001)
    dens = np.exp(np.asarray(bar.log_prob(jnp.asarray(grid[:, None], jnp.float32)),
                             np.float64))
    return np.trapezoid(dens, grid, axis=0)


def test_integrates_to_one():
    bar = _random_bar()
    np.testing.assert_allclose(_integral(bar), 1.0, atol=2e-3)


class _ForgetsTailFactor(BarDistribution):
    """A wrong density: the half-normal tails lose their factor 2."""

    def log_prob(self, y):
        lp = super().log_prob(y)
        idx = self._bucket(self._broadcast(y)[0])
        tail = (idx == 0) | (idx == self.n_buckets - 1)
        return jnp.where(tail, lp - jnp.log(2.0), lp)


def test_integration_check_fails_on_wrong_tails():
    good = _random_bar(1, k=5)
    logits = jnp.array([[2.0, 0.0, 0.0, 0.0, 2.0]])
    np.testing.assert_allclose(_integral(BarDistribution(good.borders, logits)), 1.0, atol=2e-3)
    wrong = _ForgetsTailFactor(good.borders, logits)
    assert abs(_integral(wrong)[0] - 1.0) > 0.2


def test_log_prob_by_hand():
    borders = jnp.array([0.0, 1.0, 2.0, 4.0])  # tails: scale 1 on the left, 2 on the right
    p = np.array([0.2, 0.5, 0.3])
    bar = BarDistribution(borders, jnp.log(jnp.asarray(p)))
    y = jnp.array([1.5, 0.0, 3.0, 1.0, 2.0])
    want = [np.log(0.5 / 1.0),
            np.log(0.2 * 2 * stats.norm.pdf(1.0)),        # 1 scale below b_1
            np.log(0.3 * 2 * stats.norm.pdf(0.5) / 2.0),  # half a scale above b_2
            np.log(0.5), np.log(0.3 * 2 * stats.norm.pdf(0.0) / 2.0)]
    got = [float(bar.log_prob(v)) for v in y]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(bar.cdf(1.0)) == pytest.approx(0.2, abs=1e-6)
    assert float(bar.cdf(1.5)) == pytest.approx(0.45, abs=1e-6)
    assert float(bar.cdf(0.0)) == pytest.approx(0.2 * 2 * stats.norm.cdf(-1.0), abs=1e-6)
    mean = (0.2 * (1 - np.sqrt(2 / np.pi)) + 0.5 * 1.5 + 0.3 * (2 + 2 * np.sqrt(2 / np.pi)))
    assert float(bar.mean()) == pytest.approx(mean, rel=1e-5)


def test_quantile_inverts_cdf():
    bar = _random_bar(2)
    q = jnp.linspace(0.001, 0.999, 999)[:, None]
    qq = jnp.broadcast_to(q, (999, 3))
    y = jax.vmap(BarDistribution.quantile, in_axes=(None, 0))(bar, qq)
    back = jax.vmap(BarDistribution.cdf, in_axes=(None, 0))(bar, y)
    np.testing.assert_allclose(np.asarray(back), np.asarray(qq), atol=2e-5)
    ys = jnp.broadcast_to(jnp.linspace(-6, 6, 101)[:, None], (101, 3))
    c = jax.vmap(BarDistribution.cdf, in_axes=(None, 0))(bar, ys)
    ok = (c > 1e-4) & (c < 1 - 1e-4)
    again = jax.vmap(BarDistribution.quantile, in_axes=(None, 0))(bar, c)
    np.testing.assert_allclose(np.asarray(again)[ok], np.asarray(ys)[ok], atol=2e-3)
    # a wrong quantile (the other tail's scale) does not pass the same check
    wrong = BarDistribution(bar.borders.at[0].set(2 * bar.borders[0] - bar.borders[1]),
                            bar.logits)
    yw = jax.vmap(BarDistribution.quantile, in_axes=(None, 0))(wrong, qq)
    backw = jax.vmap(BarDistribution.cdf, in_axes=(None, 0))(bar, yw)
    assert np.max(np.abs(np.asarray(backw) - np.asarray(qq))) > 1e-3


def test_samples_follow_cdf_and_moments():
    bar = _random_bar(3, batch=(2,))
    s = np.asarray(bar.sample(jax.random.key(0), 20_000), np.float64)
    assert s.shape == (20_000, 2)
    for j in range(2):
        one = BarDistribution(bar.borders, bar.logits[j])
        res = stats.kstest(s[:, j], lambda v, one=one: np.asarray(one.cdf(jnp.asarray(
            v, jnp.float32)), np.float64))
        assert res.pvalue > 1e-3
    sd = np.sqrt(np.asarray(bar.variance()))
    z = (s.mean(0) - np.asarray(bar.mean())) / (sd / np.sqrt(2e4))
    assert np.all(np.abs(z) < 4), z
    np.testing.assert_allclose(s.std(0), sd, rtol=0.05)


def test_borders_and_validation():
    x = np.random.default_rng(0).normal(size=50_000)
    b = bar_borders(x, 100)
    np.testing.assert_allclose(b[1:-1], stats.norm.ppf(np.arange(1, 100) / 100), atol=0.03)
    tied = bar_borders(np.round(x), 20)  # many ties: still strictly increasing
    assert np.all(np.diff(tied) > 0)
    with pytest.raises(ValueError, match="n_buckets"):
        bar_borders(x, 2)
    with pytest.raises(ValueError, match="finite"):
        bar_borders(np.array([np.nan] * 10), 3)
    with pytest.raises(ValueError, match="one per bucket"):
        BarDistribution(jnp.arange(5.0), jnp.zeros(3))


def _expected_by_quadrature(bar, mean, var):
    """E[log p(Y)], Y ~ N(mean, var), by the trapezoid rule on a fine grid (float64)."""
    sd = np.sqrt(var)
    grid = np.linspace(mean - 12 * sd, mean + 12 * sd, 200_001)  # (G, batch)
    lp = np.asarray(bar.log_prob(jnp.asarray(grid, jnp.float32)), np.float64)
    dens = stats.norm.pdf(grid, mean, sd)
    return np.trapezoid(dens * lp, grid, axis=0)


@pytest.mark.parametrize("where", ["middle", "left tail", "right tail", "narrow"])
def test_expected_log_prob_against_quadrature(where):
    """The closed form of E[log p(Y)] under a Gaussian (the PFN's Rao-Blackwellised loss),
    Gaussians in the middle, deep in either half-normal tail and narrower than a bucket."""
    bar = _random_bar(3, k=40)
    b = np.asarray(bar.borders, np.float64)
    mean, var = {"middle": ([0.1, -0.4, 0.8], [1.0, 0.3, 2.5]),
                 "left tail": ([b[1] - 2.0, b[1], b[1] + 0.3], [0.5, 1.0, 0.2]),
                 "right tail": ([b[-2] + 3.0, b[-2], b[-2] - 0.2], [1.5, 0.4, 0.1]),
                 "narrow": ([0.01, 0.5, -1.0], [1e-4, 1e-5, 1e-3])}[where]
    mean, var = np.array(mean), np.array(var)
    got = np.asarray(bar.expected_log_prob(jnp.asarray(mean, jnp.float32),
                                           jnp.asarray(var, jnp.float32)), np.float64)
    want = _expected_by_quadrature(bar, mean, var)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)


def test_expected_log_prob_check_fails_on_a_wrong_gaussian():
    """The quadrature check tells a Gaussian of another spread apart (so it can fail)."""
    bar = _random_bar(3, k=40)
    mean, var = np.array([0.1, -0.4, 0.8]), np.array([1.0, 0.3, 2.5])
    got = np.asarray(bar.expected_log_prob(jnp.asarray(mean, jnp.float32),
                                           jnp.asarray(1.3 * var, jnp.float32)))
    want = _expected_by_quadrature(bar, mean, var)
    assert np.max(np.abs(got - want)) > 2e-2
