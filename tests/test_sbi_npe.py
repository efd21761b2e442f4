"""NPE: accuracy on a closed form, support, early stopping, checkpoints, refusals, failures."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import flashbayes as fb
from flashbayes import sbi
from flashbayes.amortized import CheckpointError
from flashbayes.sbi._embedding import make_embedding

TINY = {"hidden": 16, "flow_layers": 2, "knots": 4, "n_components": 2, "ensemble": 1,
        "lr_reductions": 0}


def _linear_task():
    task = sbi.tasks.get("gaussian_linear")
    return task.prior(), task.simulator


def _near_closed_form(draws, x_obs):
    """Loose check of the gaussian_linear posterior N(x/2, 0.05 I) from draws."""
    draws = np.asarray(draws)
    mean_err = np.max(np.abs(draws.mean(0) - x_obs / 2))
    sd = draws.std(0)
    return mean_err < 0.15 and np.all((sd > 0.15) & (sd < 0.32))


@pytest.fixture(scope="module")
def linear_estimator():
    prior, simulator = _linear_task()
    return sbi.train_npe(prior, simulator, 2000, key=jax.random.key(0), head="maf", ensemble=1,
                         lr_reductions=0,
                         max_epochs=200)


def test_posterior_approaches_the_closed_form(linear_estimator):
    x_obs = np.array([0.3, -0.2, 0.5, 0.0, 0.1, -0.4, 0.2, 0.6, -0.1, 0.05])
    draws = linear_estimator.posterior(x_obs).sample(jax.random.key(1), 5000)
    assert draws.shape == (5000, 10)
    assert _near_closed_form(draws, x_obs)
    # the check is not vacuous: the posterior of another observation fails it
    other = linear_estimator.posterior(x_obs + 0.6).sample(jax.random.key(1), 5000)
    assert not _near_closed_form(other, x_obs)


def test_log_prob_is_consistent_with_samples(linear_estimator):
    post = linear_estimator.posterior(np.zeros(10))
    draws = post.sample(jax.random.key(2), 2000)
    lp = post.log_prob(draws)
    assert lp.shape == (2000,) and bool(jnp.all(jnp.isfinite(lp)))
    # draws are typical: their mean log density beats that of points far from the posterior
    assert float(lp.mean()) > float(post.log_prob(draws + 1.0).mean()) + 5.0
    assert post.log_prob(draws[0]).shape == ()


@pytest.mark.parametrize("head,interval_map", [("gmm", "logit"), ("nsf", "logit"),
                                                ("maf", "logit"), ("nsf", "flat")])
def test_bounded_support_gets_all_the_mass(head, interval_map):
    # gaussian_mixture: a box prior and an observation at the edge of the box
    task = sbi.tasks.get("gaussian_mixture")
    est = sbi.train_npe(task.prior(), task.simulator, 600, key=jax.random.key(3), head=head,
                        interval_map=interval_map, max_epochs=3, **TINY)
    assert est.support.get("map", "logit") == interval_map
    post = est.posterior(np.array([-9.8, 9.9]))
    draws = np.asarray(post.sample(jax.random.key(4), 20_000))
    assert np.all((draws > -10) & (draws < 10))
    outside = post.log_prob(jnp.array([[-10.5, 0.0], [0.0, 11.0], [0.0, 0.0]]))
    assert np.isneginf(outside[:2]).all() and np.isfinite(outside[2])


@pytest.mark.slow  # 15-20 s: the default tier is kept under 15 minutes
def test_log_prob_integrates_to_one_on_a_box():
    # the change of variables is right: the density over theta integrates to one on the box
    prior = dist.Uniform(jnp.zeros(2), jnp.ones(2)).to_event(1)

    def simulator(key, theta):
        return theta + 0.2 * jax.random.normal(key, (2,))

    for head, interval_map in (("gmm", "logit"), ("nsf", "logit"), ("nsf", "flat")):
        est = sbi.train_npe(prior, simulator, 400, key=jax.random.key(5), head=head,
                            interval_map=interval_map, max_epochs=3, **TINY)
        grid = (np.arange(400) + 0.5) / 400
        pts = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
        mass = float(jnp.exp(est.posterior(np.array([0.4, 0.5])).log_prob(pts)).mean())
        assert abs(mass - 1.0) < 0.02, (head, mass)


def test_flat_interval_map_is_affine_inside_and_its_jacobian_is_right():
    from flashbayes.sbi._npe import _Transform

    box = {"kind": "interval", "lower": [-1.0, 0.0], "upper": [1.0, 5.0]}
    flat, logit = _Transform({**box, "map": "flat", "width": 8.0}), _Transform(box)
    u = jnp.array([[-12.0, -3.0], [0.0, 2.0], [4.0, 7.0], [9.0, -9.5]])
    for t in (flat, logit):
        theta = t(u)
        assert np.allclose(t.inverse(theta), u, atol=2e-3)
        jac = jax.vmap(jax.jacfwd(t))(u)
        assert np.allclose(jnp.linalg.slogdet(jac)[1], jax.vmap(t.log_det)(u), atol=1e-3)

    def bend(t):  # the largest relative change of dtheta/du over the middle 60 % of the box
        mid = t.inverse(jnp.linspace(-0.6, 0.6, 61)[:, None] * jnp.array([1.0, 0.0])
                        + jnp.array([0.0, 2.5]))
        slope = jax.vmap(jax.jacfwd(t))(mid)[:, 0, 0]
        return float(slope.max() / slope.min() - 1)

    assert bend(flat) < 0.05 and bend(logit) > 0.5  # the logit bends the whole box
    for t in (flat, logit):  # far tails round onto the edge in float32: still strictly inside
        edge = t(jnp.array([[-200.0, 200.0], [200.0, -200.0]]))
        assert bool(jnp.all((edge > jnp.array([-1.0, 0.0])) & (edge < jnp.array([1.0, 5.0]))))
    # and a point next to an edge has a finite preimage and log-Jacobian
    near = jnp.array([[jnp.nextafter(-1.0, 0.0), jnp.nextafter(5.0, 0.0)]], jnp.float32)
    u_near = flat.inverse(near)
    assert bool(jnp.all(jnp.isfinite(u_near))) and bool(jnp.isfinite(flat.log_det(u_near[0])))
    half_line = _Transform({"kind": "greater_than", "lower": [0.0]})
    assert float(half_line(jnp.array([-200.0]))[0]) > 0.0  # not flushed onto the bound
    with pytest.raises(ValueError, match="interval_map"):
        sbi.train_npe(dist.Uniform(jnp.zeros(2), jnp.ones(2)).to_event(1),
                      (np.full((20, 2), 0.5), np.zeros((20, 2))), key=jax.random.key(0),
                      interval_map="tanh", **TINY)


def test_early_stopping_stops_and_keeps_the_best_weights():
    prior, simulator = _linear_task()
    events = []
    est = sbi.train_npe(prior, simulator, 300, key=jax.random.key(6), head="gmm",
                        max_epochs=2000, patience=3, learning_rate=3e-3, callback=events.append,
                        **TINY)
    val = np.array([v for _, v in est.history])
    assert len(est.history) < 2000
    assert len(val) == int(np.argmin(val)) + 1 + 3  # stopped `patience` epochs after the best
    assert events[-1].done and events[-1].epochs_without_improvement == 3
    assert est.config["best_val_loss"] == pytest.approx(val.min())


@pytest.mark.parametrize("head", ["gmm", pytest.param("nsf", marks=pytest.mark.slow),
                                  pytest.param("maf", marks=pytest.mark.slow)])
def test_save_load_round_trip(tmp_path, head):
    prior, simulator = _linear_task()
    est = sbi.train_npe(prior, simulator, 200, key=jax.random.key(7), head=head, max_epochs=2,
                        out_dir=tmp_path, parameter_names=[f"p{i}" for i in range(10)], **TINY)
    assert (tmp_path / "npe.safetensors").is_file()
    back = sbi.load_npe(tmp_path)
    x = np.linspace(-0.5, 0.5, 10)
    a, b = est.posterior(x), back.posterior(x)
    k = jax.random.key(8)
    np.testing.assert_array_equal(a.sample(k, 100), b.sample(k, 100))
    theta = np.asarray(a.sample(jax.random.key(9), 10))
    np.testing.assert_allclose(a.log_prob(theta), b.log_prob(theta), rtol=1e-6)
    assert back.parameter_names == [f"p{i}" for i in range(10)]
    assert back.config == est.config


def test_load_refuses_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="expected a file"):
        sbi.load_npe(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        sbi.load_npe(tmp_path / "junk.safetensors")


def test_bad_input_is_refused(linear_estimator):
    with pytest.raises(ValueError, match="expected finite values"):
        linear_estimator.posterior(np.full(10, np.nan))
    with pytest.raises(ValueError, match=r"expected shape \(10,\); got \(3,\)"):
        linear_estimator.posterior(np.zeros(3))
    post = linear_estimator.posterior(np.zeros(10))
    with pytest.raises(ValueError, match="expected a positive integer"):
        post.sample(jax.random.key(0), 0)
    with pytest.raises(ValueError, match=r"expected shape \(..., 10\)"):
        post.log_prob(np.zeros((4, 3)))
    prior, simulator = _linear_task()
    with pytest.raises(ValueError, match="head: expected one of"):
        sbi.train_npe(prior, simulator, 100, key=jax.random.key(0), head="flow")
    with pytest.raises(ValueError, match="num_simulations: expected a positive integer"):
        sbi.train_npe(prior, simulator, key=jax.random.key(0))
    with pytest.raises(TypeError, match="expected a simulator"):
        sbi.train_npe(prior, "sims.npz", key=jax.random.key(0))
    with pytest.raises(ValueError, match="embedding: expected one of"):
        sbi.train_npe(prior, simulator, 100, key=jax.random.key(0), embedding="cnn")


def test_only_successful_simulations_are_used():
    prior = dist.Normal(jnp.zeros(2), 1.0).to_event(1)

    def flaky(key, theta):  # fails (NaN) for a third of the prior mass
        x = theta + 0.1 * jax.random.normal(key, (2,))
        return jnp.where(theta[0] > 0.43, jnp.nan, x)

    sims = sbi.simulate(prior, flaky, 300, seed=0)
    assert 0 < sims.failures["nonfinite"] < 300
    est = sbi.train_npe(prior, sims, key=jax.random.key(1), max_epochs=2, head="nsf", **TINY)
    assert est.config["num_simulations"] == sims.num_ok
    theta, x = np.asarray(sims.theta), np.asarray(sims.x)
    est2 = sbi.train_npe(prior, (theta, x), key=jax.random.key(1), max_epochs=2, head="nsf",
                         **TINY)
    assert est2.config["num_simulations"] == sims.num_ok
    assert bool(jnp.all(jnp.isfinite(est2.stats["x_mean"])))


@pytest.mark.slow  # 15-20 s: the default tier is kept under 15 minutes
def test_set_and_series_embeddings():
    key = jax.random.key(0)
    emb = make_embedding("set", (6, 2), key=key, dim=4)
    pts = jax.random.normal(key, (6, 2))
    np.testing.assert_allclose(emb(pts), emb(pts[jnp.array([3, 1, 0, 5, 2, 4])]), atol=1e-5)
    series = make_embedding("series", (40,), key=key, dim=4)
    assert series(jnp.ones(40)).shape == (4,)
    with pytest.raises(ValueError, match="expected observations of shape"):
        make_embedding("set", (6,), key=key)
    # a set-valued simulator trains end to end
    prior = dist.Normal(jnp.zeros(1), 1.0).to_event(1)

    def iid(k, theta):
        return theta + jax.random.normal(k, (8, 1))

    est = sbi.train_npe(prior, iid, 200, key=key, embedding="set", embedding_dim=4, max_epochs=2,
                        head="nsf", **TINY)
    assert est.posterior(np.zeros((8, 1))).sample(key, 5).shape == (5, 1)


@pytest.mark.slow  # 15-20 s: the default tier is kept under 15 minutes
def test_flat_observations_read_as_a_set_of_points(tmp_path):
    """`set_points`: a flat x holding i.i.d. points one after another (sbibm's slcp) is z-scored
    with shared statistics and summarised in any order of the points; it survives a round trip
    through the checkpoint, and bad combinations are refused."""
    key = jax.random.key(0)
    prior = dist.Normal(jnp.zeros(2), 1.0).to_event(1)

    def flat_iid(k, theta):  # four 2-D points, point-major, as slcp's x
        return (theta + jax.random.normal(k, (4, 2)) * jnp.array([1.0, 5.0])).reshape(-1)

    est = sbi.train_npe(prior, flat_iid, 300, key=key, embedding="set", set_points=4,
                        embedding_dim=4, max_epochs=2, head="maf", out_dir=tmp_path, **TINY)
    assert est.x_shape == (8,) and est.config["set_points"] == 4
    mean, std = np.asarray(est.stats["x_mean"]), np.asarray(est.stats["x_std"])
    np.testing.assert_array_equal(mean, np.tile(mean[:2], 4))  # one statistic per feature
    assert std[1] > 3 * std[0]  # ... and the features keep their own scales
    x = np.asarray(flat_iid(jax.random.key(1), jnp.array([0.3, -0.2])))
    shuffled = x.reshape(4, 2)[[2, 0, 3, 1]].reshape(-1)
    theta = np.asarray(est.posterior(x).sample(jax.random.key(2), 20))
    np.testing.assert_allclose(est.posterior(x).log_prob(theta),
                               est.posterior(shuffled).log_prob(theta), rtol=1e-5, atol=1e-5)
    # moving one point is not a symmetry: the same comparison then fails
    moved = x.copy()
    moved[:2] += np.array([3.0, 15.0])
    assert not np.allclose(est.posterior(x).log_prob(theta),
                           est.posterior(moved).log_prob(theta), rtol=1e-5, atol=1e-5)
    back = sbi.load_npe(tmp_path)
    np.testing.assert_allclose(back.posterior(shuffled).log_prob(theta),
                               est.posterior(x).log_prob(theta), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="set_points: only with embedding='set'"):
        sbi.train_npe(prior, flat_iid, 100, key=key, set_points=4, **TINY)
    with pytest.raises(ValueError, match="length is a multiple of the number of points"):
        sbi.train_npe(prior, flat_iid, 100, key=key, embedding="set", set_points=3, **TINY)
    with pytest.raises(ValueError, match="only the 'set' embedding"):
        make_embedding("mlp", (8,), key=key, points=4)


def test_new_observations_do_not_recompile(linear_estimator):
    from flashbayes.sbi import _npe

    post = linear_estimator.posterior(np.zeros(10))
    post.sample(jax.random.key(0), 1000)
    post.log_prob(np.zeros((7, 10)))
    sample_before = _npe._sample_theta._cached._cache_size()
    lp_before = _npe._log_prob_theta._cached._cache_size()
    for i in range(3):
        other = linear_estimator.posterior(np.full(10, 0.1 * (i + 1)))
        other.sample(jax.random.key(i), 1000)
        other.log_prob(np.ones((7, 10)))
    assert _npe._sample_theta._cached._cache_size() == sample_before
    assert _npe._log_prob_theta._cached._cache_size() == lp_before


def test_positive_support_and_theta_outside_the_support():
    # a log-normal prior: draws stay positive, the density is -inf at or below zero
    prior = dist.LogNormal(jnp.zeros(2), 0.5).to_event(1)

    def simulator(key, theta):
        return jnp.log(theta) + 0.3 * jax.random.normal(key, (2,))

    est = sbi.train_npe(prior, simulator, 300, key=jax.random.key(11), max_epochs=2, head="nsf",
                        **TINY)
    assert est.support["kind"] == "greater_than"
    post = est.posterior(np.zeros(2))
    assert bool(jnp.all(post.sample(jax.random.key(12), 5000) > 0))
    lp = post.log_prob(jnp.array([[-1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]))
    assert np.isneginf(lp[:2]).all() and np.isfinite(lp[2])
    theta = np.abs(np.random.default_rng(0).normal(size=(50, 2)))
    theta[3, 1] = -0.5
    with pytest.raises(ValueError, match="1 rows outside"):
        sbi.train_npe(prior, (theta, np.log(np.abs(theta))), key=jax.random.key(0), **TINY)


# ---- prior swap --------------------------------------------------------------------------------

def _gauss(mean, var):
    mean = np.atleast_1d(np.asarray(mean, float))
    return fb.GMM(weights=[1.0], means=[mean],
                  scale_tril=[np.sqrt(var) * np.eye(mean.shape[0])])


def test_prior_swap_recovers_the_conjugate_posterior_and_fails_with_the_wrong_old_prior():
    # theta ~ N(0, 1), one x ~ N(theta, 1) with x = 1: posterior N(0.5, 0.5).
    # Under the new prior N(1.5, 1) the posterior is N(1.25, 0.5).
    post, old, new = _gauss(0.5, 0.5), _gauss(0.0, 1.0), _gauss(1.5, 1.0)

    def near_exact(swapped):
        return (abs(swapped.mean()[0] - 1.25) < 0.03
                and abs(swapped.cov()[0, 0] - 0.5) < 0.03)

    swapped = sbi.prior_swap(post, old, new, key=jax.random.key(0))
    assert swapped.psis.passed and near_exact(swapped)
    draws = swapped.sample(jax.random.key(1), 20_000)
    assert draws.shape == (20_000, 1) and abs(draws.mean() - 1.25) < 0.03
    # naming the wrong prior the posterior was trained under gives a wrong answer: the check
    # above catches it
    wrong = sbi.prior_swap(post, _gauss(0.0, 4.0), new, key=jax.random.key(0))
    assert not near_exact(wrong)


def test_prior_swap_refuses_a_prior_far_from_the_posterior():
    post, old = _gauss([0.5, 0.5], 0.5), _gauss([0.0, 0.0], 1.0)
    far = _gauss([6.0, -6.0], 0.3)
    with pytest.raises(sbi.PriorSwapError, match="k-hat"):
        sbi.prior_swap(post, old, far, key=jax.random.key(0))
    kept = sbi.prior_swap(post, old, far, key=jax.random.key(0), check=False)
    assert not kept.psis.passed and kept.psis.khat > kept.psis.threshold


def test_prior_swap_refuses_a_prior_reaching_outside_the_old_support():
    """Old prior U[-1, 1]^2, posterior inside it: a new prior centred on the box's edge has a
    good k-hat on the draws it can see, but half its mass is where no draw can be."""
    box = dist.Uniform(-jnp.ones(2), jnp.ones(2)).to_event(1)
    post = _gauss([0.7, 0.0], 0.001)
    edge = _gauss([1.0, 0.0], 0.3)
    with pytest.raises(sbi.PriorSwapError, match="where the old prior is zero"):
        sbi.prior_swap(post, box, edge, key=jax.random.key(0))
    kept = sbi.prior_swap(post, box, edge, key=jax.random.key(0), check=False)
    assert kept.psis.passed  # k-hat alone would have let it through
    # a new prior inside the box passes both checks
    inside = sbi.prior_swap(post, box, _gauss([0.4, 0.0], 0.02), key=jax.random.key(0))
    assert inside.psis.passed


def test_prior_swap_refuses_bad_input():
    post, old = _gauss([0.0, 0.0], 1.0), _gauss([0.0, 0.0], 1.0)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="n: expected an integer >= 100"):
        sbi.prior_swap(post, old, old, key=key, n=10)
    with pytest.raises(ValueError, match="batch shape"):  # a NumPyro prior without to_event
        sbi.prior_swap(post, old, dist.Normal(jnp.zeros(2), 1.0), key=key)
    with pytest.raises(ValueError, match="outside it"):  # the old prior misses the draws
        sbi.prior_swap(post, dist.Uniform(jnp.zeros(2), 0.1).to_event(1), old, key=key)
    with pytest.raises(TypeError, match="log_prob"):
        sbi.prior_swap(post, old, "N(0, 1)", key=key)
    with pytest.raises(sbi.PriorSwapError, match="zero at every"):
        sbi.prior_swap(post, old, dist.Uniform(jnp.full(2, 50.0), 51.0).to_event(1), key=key)


def test_prior_swap_of_an_npe_posterior_matches_the_closed_form(linear_estimator):
    # gaussian_linear: prior N(0, 0.1 I), x ~ N(theta, 0.1 I). Under the prior N(mu, 0.1 I)
    # the posterior is N((x + mu) / 2, 0.05 I).
    x_obs = np.array([0.3, -0.2, 0.5, 0.0, 0.1, -0.4, 0.2, 0.6, -0.1, 0.05])
    mu = np.zeros(10)
    mu[:2] = [0.5, -0.5]
    new = dist.Normal(jnp.asarray(mu, jnp.float32), np.sqrt(0.1)).to_event(1)
    old, _ = _linear_task()
    post = linear_estimator.posterior(x_obs)
    swapped = sbi.prior_swap(post, old, new, key=jax.random.key(4))
    assert swapped.psis.passed
    target = (x_obs + mu) / 2

    def near(mean):
        return np.max(np.abs(np.asarray(mean) - target)) < 0.1

    assert near(swapped.mean())
    assert near(swapped.sample(jax.random.key(5), 10_000).mean(0))
    # not vacuous: the posterior before the swap fails the same check
    assert not near(post.sample(jax.random.key(5), 10_000).mean(0))


def _members(est):
    """The ensemble's members as single estimators (same statistics and support)."""
    from flashbayes.sbi._npe import NPEEstimator

    cfg = {k: v for k, v in est.config.items() if k not in ("members", "weights")}
    out = []
    for group, size in zip(est.net.groups, est.net.sizes, strict=True):
        for m in range(size):
            net = jax.tree_util.tree_map(lambda a, m=m: a[m] if isinstance(a, jax.Array) else a,
                                         group)
            out.append(NPEEstimator(net, est.stats, cfg))
    return out


@pytest.mark.slow  # 15-20 s: the default tier is kept under 15 minutes
def test_ensemble_is_the_weighted_mixture_of_its_members(tmp_path):
    prior = dist.Uniform(jnp.zeros(2), jnp.ones(2)).to_event(1)

    def simulator(key, theta):
        return theta + 0.2 * jax.random.normal(key, (2,))

    est = sbi.train_npe(prior, simulator, 400, key=jax.random.key(12), head="gmm",
                        max_epochs=4, out_dir=tmp_path, **{**TINY, "ensemble": 3})
    assert len(est.config["member_val_loss"]) == 3
    w = np.asarray(est.config["weights"])
    assert len(w) == len(est.config["members"]) >= 2 and w.sum() == pytest.approx(1.0)
    x = np.array([0.3, 0.7])
    post = est.posterior(x)
    theta = np.asarray(post.sample(jax.random.key(13), 50))
    member_lp = np.stack([np.asarray(m.posterior(x).log_prob(theta)) for m in _members(est)])
    mix = np.logaddexp.reduce(member_lp + np.log(w)[:, None], axis=0)
    np.testing.assert_allclose(post.log_prob(theta), mix, rtol=1e-5, atol=1e-5)
    assert np.abs(member_lp - mix).max() > 1e-3  # the members differ: the check can fail
    # the unbounded mixture holds all members' components, weights summing to one
    g = post.unbounded_gmm()
    assert g.weights.shape == (len(w) * TINY["n_components"],)
    assert float(g.weights.sum()) == pytest.approx(1.0, abs=1e-5)
    # draws follow the mixture: their mean matches the mixture's mean (in unbounded space)
    u = est._transform.inverse(post.sample(jax.random.key(14), 30_000))
    np.testing.assert_allclose(np.asarray(u).mean(0), np.asarray(g.mean()), atol=0.05)
    assert post.sample(jax.random.key(15), 1).shape == (1, 2)
    back = sbi.load_npe(tmp_path)
    np.testing.assert_allclose(back.posterior(x).log_prob(theta), post.log_prob(theta),
                               rtol=1e-6)


@pytest.mark.slow
def test_ensemble_draws_follow_the_weights_across_heads():
    # draws of a two-head mixture: their mean is the weighted mean of the members' means, which
    # would fail if sample() drew from one member or one head alone
    prior, simulator = _linear_task()
    est = sbi.train_npe(prior, simulator, 300, key=jax.random.key(16), head="nsf+maf",
                        max_epochs=2, **{**TINY, "ensemble": 2})
    w = np.asarray(est.config["weights"])
    assert set(est.config["members"]) == {"nsf", "maf"}, est.config["members"]
    x = np.zeros(10)
    means = np.stack([np.asarray(m.posterior(x).sample(jax.random.key(17), 40_000)).mean(0)
                      for m in _members(est)])
    mixed = np.asarray(est.posterior(x).sample(jax.random.key(18), 40_000)).mean(0)
    np.testing.assert_allclose(mixed, w @ means, atol=0.02)
    assert np.abs(means - w @ means).max() > 0.05


@pytest.mark.slow
def test_learning_rate_cuts_go_on_from_the_best_weights():
    prior, simulator = _linear_task()
    est = sbi.train_npe(prior, simulator, 300, key=jax.random.key(19), head="gmm",
                        max_epochs=2000, patience=3, learning_rate=3e-3,
                        **{**TINY, "lr_reductions": 2})
    plain = sbi.train_npe(prior, simulator, 300, key=jax.random.key(19), head="gmm",
                          max_epochs=2000, patience=3, learning_rate=3e-3, **TINY)
    assert len(est.history) > len(plain.history)
    assert est.config["best_val_loss"] <= plain.config["best_val_loss"]
    with pytest.raises(ValueError, match="lr_reductions: expected a non-negative integer"):
        sbi.train_npe(prior, simulator, 100, key=jax.random.key(0), lr_reductions=-1)
    with pytest.raises(ValueError, match="ensemble: expected a positive integer"):
        sbi.train_npe(prior, simulator, 100, key=jax.random.key(0), ensemble=0)
