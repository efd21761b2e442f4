"""Reference filters for nonlinear observations (EKF, UKF, particle) and the nonlinear_tracking
task: exact on the linear task, consistent on the nonlinear one, and a check that fails when the
filter is given the wrong observation noise."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashbayes as fb
from flashbayes.tasks._nonlinear import RangeBearing, ukf_components, wrap_angle


@pytest.fixture(scope="module")
def lti():
    return fb.tasks.get("lti_tracking")


@pytest.fixture(scope="module")
def nl():
    return fb.tasks.get("nonlinear_tracking")


def _prior(seed, k=3):
    """A GMM prior over x_0 like the task family's (means in [-3, 3]^4, scales 0.2..1.5)."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(k))
    means = rng.uniform(-3, 3, (k, 4))
    tril = np.stack([np.tril(rng.normal(0, 0.2, (4, 4)), -1) + np.diag(rng.uniform(0.2, 1.5, 4))
                     for _ in range(k)])
    return fb.GMM(w, means, tril)


_SIMULATORS = {}


def _track(task, seed, steps, prior=None):
    """A prior, the true states x_1..x_T and the observations y_1..y_T (float64)."""
    if prior is None:
        prior = _prior(seed)
    sim = _SIMULATORS.setdefault(id(task), jax.jit(task.simulate_trajectory,
                                                   static_argnums=2))
    x0 = prior.sample(jax.random.key(1000 + seed), 1)[0]
    xs, ys = sim(jax.random.key(2000 + seed), x0, steps)
    return prior, np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def _nees(res, xs):
    """(T,) normalised squared error of the true state under each posterior's mean and cov:
    its expectation is d for any posterior with the right first two moments."""
    out = []
    for post, x in zip(res, xs):
        e = x - np.asarray(post.mean(), np.float64)
        out.append(float(e @ np.linalg.solve(np.asarray(post.cov(), np.float64), e)))
    return np.array(out)


# -- measurement maths ---------------------------------------------------------------------------


def test_wrap_angle_range_and_cut():
    a = np.array([-np.pi, np.pi, 3 * np.pi / 2, -3 * np.pi / 2, 0.1, 7.0])
    w = wrap_angle(a, np)
    assert np.all(w > -np.pi) and np.all(w <= np.pi)
    np.testing.assert_allclose(w, [np.pi, np.pi, -np.pi / 2, np.pi / 2, 0.1, 7.0 - 2 * np.pi],
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(wrap_angle(jnp.asarray(a, jnp.float32))), w, atol=1e-5)


def test_range_bearing_jacobian_matches_finite_differences():
    h = RangeBearing(0.3, 0.05)
    x = np.array([-1.3, 0.7, 0.4, -0.2])
    eps = 1e-6
    fd = np.stack([(h.mean(x + eps * e, np) - h.mean(x - eps * e, np)) / (2 * eps)
                   for e in np.eye(4)], 1)
    np.testing.assert_allclose(h.jacobian(x, np), fd, atol=1e-6)


def test_simulator_matches_likelihood(nl):
    """Standardised residuals of simulated observations are N(0, 1), including bearings
    simulated next to the cut at +-pi; the likelihood is the density of those residuals."""
    theta = jnp.array([-4.0, 0.01, 0.0, 0.0])  # bearing 0.0025 rad below pi
    y = np.asarray(nl._simulate(jax.random.key(0), theta, 20_000), np.float64)
    assert np.all(np.abs(y[:, 1]) <= np.pi)
    res = np.asarray(nl.measurement.residual(y, np.asarray(nl.measurement.mean(theta)), np))
    z = res / np.array([nl.range_sd, nl.bearing_sd])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=4 / math.sqrt(len(z)))
    np.testing.assert_allclose(z.std(0), 1.0, atol=4 / math.sqrt(2 * len(z)))
    # y just across the cut: the likelihood sees a small residual, not one of 2 pi
    lp_cut = float(nl.log_likelihood(theta, jnp.array([[4.0, -np.pi + 0.0075]])))
    lp_same = float(nl.log_likelihood(theta, jnp.array([[4.0, np.pi - 0.0025 - 0.01]])))
    assert lp_cut == pytest.approx(lp_same, abs=1e-3)


def test_ukf_update_jax_float32_matches_numpy_float64(nl):
    """The bank of training priors runs the UKF in JAX float32: the same update as the float64
    reference."""
    prior = _prior(3)
    w, m, s = (np.asarray(a, np.float64) for a in (prior.weights, prior.means, prior.scale_tril))
    y = np.array([2.0, 2.9])
    w64, m64, s64 = ukf_components(w, m, s, y, nl.measurement, np)
    update = jax.jit(lambda *a: ukf_components(*a, nl.measurement, jnp))
    w32, m32, s32 = update(*(jnp.asarray(a, jnp.float32) for a in (w, m, s, y)))
    np.testing.assert_allclose(np.asarray(w32), w64, atol=1e-4)
    np.testing.assert_allclose(np.asarray(m32), m64, atol=1e-3)
    np.testing.assert_allclose(np.asarray(s32), s64, atol=1e-3)


# -- the linear case: EKF and UKF are Kalman filters; the particle filter comes close ----------


@pytest.mark.parametrize("name", ["ekf", "ukf"])
def test_ekf_ukf_equal_kalman_on_lti(lti, name):
    for seed in range(2):
        prior, _, ys = _track(lti, seed, 30)
        ys[7] = np.nan  # a missing observation: prediction only
        ref = fb.filter("kalman", prior, ys, key=jax.random.key(0), task=lti)
        res = fb.filter(name, prior, ys, key=jax.random.key(0), task=lti)
        for a, b in zip(res, ref):
            # the Kalman reference returns float32 arrays (a validated GMM)
            np.testing.assert_allclose(np.asarray(a.weights), np.asarray(b.weights), rtol=1e-5,
                                       atol=1e-7)
            np.testing.assert_allclose(np.asarray(a.means), np.asarray(b.means), rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(np.asarray(a.scale_tril), np.asarray(b.scale_tril),
                                       rtol=1e-5, atol=1e-5)


def test_particle_close_to_kalman_on_lti(lti):
    """Mean: eight independent runs of 10^4 particles; their average is within 5 standard
    errors (per step and coordinate, from the spread of the runs: a t statistic with 7 degrees
    of freedom, beyond 5 with probability 0.0016) of the exact mean, allowing 2 % of the 160
    comparisons to exceed it. Density: KL(exact || particle density) under 0.12 (plus 3 MC
    standard errors), the kernel density's own bias at 10^4 particles in 4-D (measured at
    0.02-0.08 on well-mixed particles; docs/nonlinear_tracking.md), at the first step and at
    steps 20 and 40. (Steps 5-10 of this track are bimodal and the filter's own Monte Carlo
    error there is large: run-to-run spread of the mean 0.2-0.4 posterior sd, which the mean
    check allows for.)"""
    prior, _, ys = _track(lti, 5, 40)
    ref = fb.filter("kalman", prior, ys, key=jax.random.key(0), task=lti)
    runs = [fb.filter("particle", prior, ys, key=jax.random.key(10 + r), task=lti)
            for r in range(8)]
    means = np.stack([r.means for r in runs])  # (R, T, d)
    se = means.std(0, ddof=1) / math.sqrt(len(runs))
    sd_ref = np.sqrt(np.stack([np.diagonal(np.asarray(p.cov(), np.float64)) for p in ref]))
    z = (means.mean(0) - ref.means) / np.maximum(se, 1e-3 * sd_ref)
    assert np.mean(np.abs(z) > 5) <= 0.02, np.sort(np.abs(z).ravel())[-5:]
    # the density: KL(exact || particle) from 2,000 exact draws, at the first step and once
    # the posterior is unimodal and the particles well mixed again (steps 20 and 40)
    for t in (0, 19, 39):
        pts = np.asarray(ref[t].sample(jax.random.key(t), 2000), np.float64)
        d = np.asarray(ref[t].log_prob(pts), np.float64) - runs[0][t].log_prob(pts)
        assert d.mean() < 0.12 + 3 * d.std() / math.sqrt(len(d)), (t, d.mean())


def test_particle_density_is_normalised(lti):
    """The particle posterior's density integrates to one (importance sampling from a wide
    Gaussian; 4 MC standard errors)."""
    prior, _, ys = _track(lti, 6, 5)
    post = fb.filter("particle", prior, ys, key=jax.random.key(1), task=lti,
                     num_particles=2000)[-1]
    mu, cov = post.mean(), post.cov() * 4.0
    L = np.linalg.cholesky(cov)
    z = np.asarray(jax.random.normal(jax.random.key(2), (20_000, 4)), np.float64)
    pts = mu + z @ L.T
    log_prop = (-0.5 * np.sum(z**2, 1) - np.sum(np.log(np.diag(L))) - 2 * math.log(2 * math.pi))
    ratio = np.exp(post.log_prob(pts) - log_prop)
    assert abs(ratio.mean() - 1.0) < 4 * ratio.std() / math.sqrt(len(ratio)) + 0.02


# -- the nonlinear task ----------------------------------------------------------------------------


def test_particle_close_to_exact_and_ekf_not_at_the_first_step(nl):
    """At step 1 the exact filtering density is known up to a constant: the likelihood times
    the predicted prior (a GMM). With 10^6 draws of the predicted prior (the normaliser, and
    2,000 exact posterior draws by weighted resampling), KL(exact || filter) is estimated on
    6 family-like priors. The particle filter's is small (its kernel density's bias, under 0.2
    on each prior); the EKF's is larger on average (it linearises over a wide prior near the
    sensor)."""
    loglik = jax.jit(jax.vmap(lambda x, y: nl.log_likelihood(x, y[None]), in_axes=(0, None)))
    kl_pf, kl_ekf = [], []
    for seed in range(6):
        prior, _, ys = _track(nl, seed, 1)
        pred = nl.transition(prior)
        z = pred.sample(jax.random.key(seed), 1_000_000)
        lw = np.asarray(loglik(z, jnp.asarray(ys[0], jnp.float32)), np.float64)
        log_z = np.logaddexp.reduce(lw) - math.log(len(lw))
        w = np.exp(lw - lw.max())
        draws = np.asarray(z)[np.random.default_rng(seed).choice(len(w), 2000, p=w / w.sum())]
        log_p = (np.asarray(loglik(jnp.asarray(draws), jnp.asarray(ys[0], jnp.float32)),
                            np.float64) + np.asarray(pred.log_prob(draws), np.float64) - log_z)
        pf = fb.filter("particle", prior, ys, key=jax.random.key(seed), task=nl)[0]
        ekf = fb.filter("ekf", prior, ys, key=jax.random.key(seed), task=nl)[0]
        kl_pf.append(np.mean(log_p - pf.log_prob(draws)))
        kl_ekf.append(np.mean(log_p - np.asarray(ekf.log_prob(draws), np.float64)))
    kl_pf, kl_ekf = np.array(kl_pf), np.array(kl_ekf)
    assert np.all(np.abs(kl_pf) < 0.2), kl_pf
    assert kl_ekf.mean() > kl_pf.mean() + 0.2, (kl_ekf, kl_pf)


def _consistency(nl, filt, name, tracks=5, steps=40, burn=10, **options):
    """Mean NEES of the true state over steps burn..steps of `tracks` tracks (from priors
    away from the sensor, where every filter should be consistent), and its standard error
    from the spread of the per-track means."""
    per_track = []
    for seed in range(tracks):
        ang = 2 * math.pi * seed / tracks
        prior = fb.GMM([1.0], [[6 * math.cos(ang), 6 * math.sin(ang), 0.5, -0.5]],
                       [0.5 * np.eye(4)])
        _, xs, ys = _track(nl, 50 + seed, steps, prior)
        res = fb.filter(name, prior, ys, key=jax.random.key(seed), task=filt, **options)
        per_track.append(_nees(res, xs)[burn:].mean())
    per_track = np.array(per_track)
    return per_track.mean(), per_track.std(ddof=1) / math.sqrt(tracks)


@pytest.mark.parametrize("name,options", [("ekf", {}), ("ukf", {}),
                                          ("particle", {"num_particles": 2000})])
def test_filters_consistent_and_the_check_fails_on_wrong_noise(nl, name, options):
    """NEES check: the mean normalised squared error over 5 tracks x 30 steps is d = 4 within
    1.5 (for Gaussian posteriors each term is chi^2_4, sd 2.8; the terms of one track are
    correlated, so about 30 independent terms: 3 standard errors is 1.5). A filter that assumes
    a 3x smaller observation noise (range and bearing) is overconfident and fails it."""
    nees, _ = _consistency(nl, nl, name, **options)
    assert abs(nees - 4.0) < 1.5, nees
    wrong = fb.tasks.get("nonlinear_tracking", range_sd=nl.range_sd / 3,
                         bearing_sd=nl.bearing_sd / 3)
    nees_w, _ = _consistency(nl, wrong, name, **options)
    assert not abs(nees_w - 4.0) < 1.5, nees_w


def test_bearing_wrap_around_no_jump(nl):
    """A target crossing the negative x-axis (bearing +pi -> -pi): every filter's estimate moves
    smoothly and stays on the track."""
    x0 = np.array([-4.0, 0.5, 0.0, -1.0])  # moving down through y = 0 at x = -4
    _, xs, ys = _track(nl, 4, 40, fb.GMM([1.0], [x0], [0.1 * np.eye(4)]))
    prior = fb.GMM([1.0], [x0], [0.3 * np.eye(4)])
    assert xs[0, 1] > 0.2 and xs[-1, 1] < -0.2 and np.all(xs[:, 0] < -2)  # it crosses the cut
    assert ys[:, 1].max() > 3.0 and ys[:, 1].min() < -3.0
    for name in ("ekf", "ukf", "particle"):
        res = fb.filter(name, prior, ys, key=jax.random.key(0), task=nl, num_particles=2000) \
            if name == "particle" else fb.filter(name, prior, ys, key=jax.random.key(0), task=nl)
        m = res.means
        jumps = np.linalg.norm(np.diff(m[:, :2], axis=0), axis=1)
        assert jumps.max() < 0.5, (name, jumps)
        err = np.linalg.norm(m[:, :2] - xs[:, :2], axis=1)
        assert err.max() < 1.0, (name, err)


def test_filter_option_validation(nl, lti):
    prior, _, ys = _track(nl, 0, 3)
    with pytest.raises(TypeError, match="unexpected options"):
        fb.filter("ekf", prior, ys, key=jax.random.key(0), task=nl, num_particles=10)
    with pytest.raises(ValueError, match="num_particles: expected"):
        fb.filter("particle", prior, ys, key=jax.random.key(0), task=nl, num_particles=1)
    with pytest.raises(ValueError, match="resampling: expected"):
        fb.filter("particle", prior, ys, key=jax.random.key(0), task=nl, resampling="x")
    with pytest.raises(ValueError, match="alpha, kappa: expected"):
        fb.filter("ukf", prior, ys, key=jax.random.key(0), task=nl, alpha=0.0)
    static = fb.tasks.get("gmm_linear")
    g = static.sample_problem(jax.random.key(0), n=0).prior
    with pytest.raises(ValueError, match="measurement model"):
        fb.filter("ekf", g, np.zeros((2, 2)), key=jax.random.key(0), task=static)
    with pytest.raises(ValueError, match="state moves"):
        fb.filter("particle", g, np.zeros((2, 2)), key=jax.random.key(0), task=static)


def test_task_reports_out_of_range_data(nl):
    assert nl.data_out_of_range(np.array([[3.0, 0.5]])) == ""
    assert "bearings" in nl.data_out_of_range(np.array([[3.0, 4.0]]))
    assert "max_range" in nl.data_out_of_range(np.array([[300.0, 0.5]]))
    with pytest.raises(ValueError, match="range_sd, bearing_sd: expected"):
        fb.tasks.get("nonlinear_tracking", range_sd=0.0)
