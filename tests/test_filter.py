"""Sequential inference: fb.filter, fb.Stream, component reduction and the reference filters."""

import equinox as eqx
import jax
import numpy as np
import pytest

import flashbayes as fb
from flashbayes._filter import reduce_components, validate_observations
from flashbayes.amortized import AmortizedPosterior, DistributionTransformer, DTConfig


def tiny_model(task_name="lti_tracking", seed=0, perturb=0.0):
    """An untrained network (its head starts at zero: the update returns the prior), or a
    randomly perturbed one (perturb > 0) whose updates are arbitrary."""
    task = fb.tasks.get(task_name)
    net = DistributionTransformer(DTConfig(theta_dim=task.theta_dim,
                                           data_dim=task.network_data_dim,
                                           d_model=16, n_layers=1, n_heads=2),
                                  key=jax.random.key(seed))
    if perturb:
        w = net.head.weight
        net = eqx.tree_at(lambda n: n.head.weight, net,
                          perturb * jax.random.normal(jax.random.key(seed + 1), w.shape))
    return AmortizedPosterior(net, task)


def track(task, seed=0, steps=30):
    prior = task.sample_problem(jax.random.key(seed), n=0).prior
    x0 = np.asarray(prior.sample(jax.random.key(seed + 100), 1))[0]
    xs, ys = task.simulate_trajectory(jax.random.key(seed + 200), x0, steps)
    return prior, np.asarray(xs, np.float64), np.asarray(ys, np.float64)


def test_scan_and_step_paths_agree():
    model = tiny_model(perturb=0.05)
    prior, _, ys = track(model.task)
    a = fb.filter(model, prior, ys, key=jax.random.key(0))
    b = fb.filter(model, prior, ys, key=jax.random.key(0), method="step")
    stream = fb.Stream(model, prior)
    c = [stream.update(y) for y in ys]
    assert len(a) == len(b) == len(c) == len(ys)
    for t in (0, 10, len(ys) - 1):
        for other in (b[t], c[t]):
            np.testing.assert_allclose(a[t].means, other.means, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(a[t].weights, other.weights, rtol=1e-5, atol=1e-6)
    assert stream.step == len(ys)
    # the perturbed network really updates: its answer is not the prediction alone
    pred = fb.filter(tiny_model(), prior, ys, key=jax.random.key(0))
    assert np.abs(a.means[-1] - pred.means[-1]).max() > 1e-3


def test_untrained_model_applies_only_the_transition():
    """A zero head returns its prior, so the filter equals the Kalman prediction alone."""
    model = tiny_model()
    task = model.task
    prior, _, ys = track(task, seed=3, steps=12)
    res = fb.filter(model, prior, ys, key=jax.random.key(0))
    missing = np.full_like(ys, np.nan)  # every observation missing: transition only
    ref = fb.filter("kalman", prior, missing, key=jax.random.key(0), task=task)
    for t in range(len(ys)):
        np.testing.assert_allclose(res[t].mean(), ref[t].mean(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(res[t].cov(), ref[t].cov(), rtol=1e-3, atol=1e-4)


def test_kalman_matches_textbook_single_component():
    task = fb.tasks.get("lti_tracking")
    prior = fb.GMM([1.0], [[0.5, -1.0, 1.0, 0.3]], [np.diag([0.8, 0.6, 0.5, 0.4])])
    _, _, ys = track(task, seed=1, steps=15)
    res = fb.filter("kalman", prior, ys, key=jax.random.key(0), task=task)
    m, P = np.asarray(prior.means[0]), np.asarray(prior.cov())
    for t, y in enumerate(ys):
        m, P = task.F @ m, task.F @ P @ task.F.T + task.Q
        S = task.H @ P @ task.H.T + task.R
        K = P @ task.H.T @ np.linalg.inv(S)
        m, P = m + K @ (y - task.H @ m), (np.eye(4) - K @ task.H) @ P
        np.testing.assert_allclose(res[t].mean(), m, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res[t].cov(), P, rtol=1e-5, atol=1e-6)


def test_nll_check_separates_right_and_wrong_filters():
    """The benchmark's check (NLL of the true state against the exact filter) fails on a filter
    with the wrong observation noise."""
    task = fb.tasks.get("lti_tracking")
    wrong = fb.tasks.get("lti_tracking", noise_sd=2.0)
    gaps = []
    for seed in range(5):
        prior, xs, ys = track(task, seed=seed, steps=40)
        right = fb.filter("kalman", prior, ys, key=jax.random.key(0), task=task)
        bad = fb.filter("kalman", prior, ys, key=jax.random.key(0), task=wrong)
        gaps.append(np.mean(-bad.log_prob(xs) + right.log_prob(xs)))
    assert np.mean(gaps) > 0.2


def test_reduce_components_keeps_moments_and_merges_closest():
    g = fb.GMM([0.3, 0.3, 0.4], [[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]],
               np.stack([np.eye(2), np.eye(2), 0.5 * np.eye(2)]))
    r = reduce_components(g, 2)
    assert r.n_components == 2
    np.testing.assert_allclose(r.mean(), g.mean(), atol=1e-12)
    np.testing.assert_allclose(r.cov(), g.cov(), atol=1e-12)
    # the two near components merged; the far one is untouched
    assert np.any(np.all(np.isclose(r.means, [5.0, 5.0]), 1))
    assert np.any(np.isclose(r.weights, 0.6))
    assert reduce_components(g, 1).n_components == 1
    with pytest.raises(ValueError, match="positive integer"):
        reduce_components(g, 0)


def test_prior_with_many_components_is_merged_to_the_model_bound():
    model = tiny_model()
    task = model.task
    k = task.k_max + 3
    rng = np.random.default_rng(0)
    prior = fb.GMM(np.full(k, 1 / k), rng.uniform(-3, 3, (k, 4)), np.stack([np.eye(4)] * k))
    res = fb.filter(model, prior, np.zeros((3, 2)), key=jax.random.key(0))
    assert all(p.n_components <= task.k_max for p in res)


def test_observations_are_validated():
    y, obs = validate_observations([[1.0, 2.0], [np.nan, np.nan]], 2)
    assert obs.tolist() == [True, False] and np.isfinite(y).all()
    with pytest.raises(ValueError, match=r"expected shape \(T, 2\)"):
        validate_observations(np.zeros((3, 3)), 2)
    with pytest.raises(ValueError, match="at least one step"):
        validate_observations(np.zeros((0, 2)), 2)
    with pytest.raises(ValueError, match="missing observation"):
        validate_observations([[1.0, np.nan]], 2)
    with pytest.raises(ValueError, match="missing observation"):
        validate_observations([[1.0, np.inf]], 2)


def test_filter_arguments_are_validated():
    model = tiny_model()
    prior, _, ys = track(model.task, steps=3)
    with pytest.raises(TypeError, match="PRNG key"):
        fb.filter(model, prior, ys, key=0)
    with pytest.raises(ValueError, match="'scan', 'parallel' or 'step'"):
        fb.filter(model, prior, ys, key=jax.random.key(0), method="fast")
    with pytest.raises(ValueError, match="moves its state"):  # a moving state needs each step
        fb.filter(model, prior, ys, key=jax.random.key(0), method="parallel")
    with pytest.raises(ValueError, match="task"):
        fb.filter("kalman", prior, ys, key=jax.random.key(0))
    with pytest.raises(ValueError, match="filter: expected one of"):
        fb.filter("nope", prior, ys, key=jax.random.key(0), task="lti_tracking")
    with pytest.raises(TypeError, match="amortized model or a reference filter"):
        fb.filter(object(), prior, ys, key=jax.random.key(0))
    with pytest.raises(ValueError, match="dimension 4"):
        fb.filter(model, fb.GMM([1.0], [[0.0]], [[[1.0]]]), ys, key=jax.random.key(0))
    with pytest.raises(ValueError, match="static task"):
        fb.filter("grid", prior, ys, key=jax.random.key(0), task="lti_tracking")


def test_translation_equivariance_of_the_lti_model():
    """Shifting the prior by c and the data by H c shifts the posterior by c."""
    model = tiny_model(perturb=0.05)
    task = model.task
    p = task.sample_problem(jax.random.key(4), n=1)
    c = np.array([40.0, -25.0, 1.0, 2.0])
    shifted = fb.GMM(p.prior.weights, np.asarray(p.prior.means) + c, p.prior.scale_tril)
    a = model.posterior(p.prior, p.data)
    b = model.posterior(shifted, p.data + task.H @ c)
    np.testing.assert_allclose(np.asarray(b.means) - c, a.means, atol=2e-4)
    np.testing.assert_allclose(b.weights, a.weights, atol=1e-5)


def _turned(prior, data, angle, reflect):
    """A nonlinear_tracking problem turned about the sensor by `angle` (after a reflection
    through the x-axis if `reflect`): the orthogonal map of the state and the moved problem."""
    c, s = np.cos(angle), np.sin(angle)
    plane = np.array([[c, -s], [s, c]]) @ np.diag([1.0, -1.0 if reflect else 1.0])
    A = np.kron(np.eye(2), plane)
    L = np.asarray(prior.scale_tril, np.float64)
    cov = np.einsum("ij,kjl,ml->kim", A, L @ np.swapaxes(L, -1, -2), A)
    moved = fb.GMM(prior.weights, np.asarray(prior.means) @ A.T, np.linalg.cholesky(cov))
    y = np.asarray(data, np.float64).copy()
    y[:, 1] = np.pi - np.mod(np.pi - ((-1.0 if reflect else 1.0) * y[:, 1] + angle), 2 * np.pi)
    return A, moved, y


@pytest.mark.parametrize("reflect", [False, True])
def test_nonlinear_model_is_equivariant_about_the_sensor_and_not_without_its_frame(reflect):
    """Turning (and reflecting) a problem about the sensor turns the posterior with it, exactly
    when the network works in the task's canonical frame; the same network without the frame
    is not equivariant, so the check can fail."""
    framed = tiny_model("nonlinear_tracking", perturb=0.05)
    raw = AmortizedPosterior(framed.network, fb.tasks.get("nonlinear_tracking",
                                                          canonical=False))
    p = framed.task.sample_problem(jax.random.key(6), n=1)
    A, moved, y = _turned(p.prior, p.data, 2.3, reflect)
    errors = {}
    for name, model in (("framed", framed), ("raw", raw)):
        a, b = model.posterior(p.prior, p.data), model.posterior(moved, y)
        errors[name] = max(np.abs(np.asarray(a.means) @ A.T - np.asarray(b.means)).max(),
                           np.abs(np.asarray(a.weights) - np.asarray(b.weights)).max())
    assert errors["framed"] < 1e-3
    assert errors["raw"] > 1e-2


@pytest.mark.slow  # 20-30 s: the default tier is kept under 15 minutes
def test_frame_of_the_nonlinear_task_trains_on_what_inference_answers():
    """The training loss in the canonical frame equals -log q(theta) of the posterior that the
    inference path returns in the user's coordinates; bearings across the +-pi cut land on
    nearby points of the frame."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    from flashbayes.amortized._model import frame_batch
    from flashbayes.amortized._train import batch_loss

    model = tiny_model("nonlinear_tracking", perturb=0.05)
    task = model.task
    b = task.sample_batch(jax.random.key(2), 16)
    w, m, s = model.posterior_arrays(b.weights, b.means, b.scale_tril, b.cmask, b.data, b.dmask)
    theta = np.asarray(b.theta, np.float64)
    lq = np.array([logsumexp([np.log(w[i, k]) + multivariate_normal(
        m[i, k], s[i, k] @ s[i, k].T).logpdf(theta[i]) for k in range(w.shape[1]) if w[i, k] > 0])
        for i in range(16)])
    framed = frame_batch(task, b)
    lp = np.asarray(jax.vmap(model.network.log_prob)(
        framed.theta, framed.weights, framed.means, framed.scale_tril, framed.cmask,
        framed.data, framed.dmask))
    # the untrained network gives some components a weight that underflows to 0 in float32;
    # the loss keeps it in log space, so compare where every real component kept its weight
    kept = np.all((w > 0) | ~np.asarray(b.cmask), 1)
    assert kept.sum() >= 8
    np.testing.assert_allclose(lp[kept], lq[kept], rtol=1e-4, atol=1e-3)
    assert abs(float(batch_loss(model.network, framed)) + lp.mean()) < 1e-4
    frame = task.network_frame(np.ones(1), np.array([[-4.0, 0.01, 0.0, 1.0]]),
                               np.eye(4)[None], np.ones(1, bool))
    ab = np.asarray(task.data_to_frame(np.array([[4.0, 3.14], [4.0, -3.14]]), frame[1]))
    assert np.linalg.norm(ab[0] - ab[1]) < 0.02
    assert np.abs(ab).max() < 0.1  # the observation is where the prior's mean is


def test_grid_filter_matches_importance_sampling():
    """The grid posterior's mean agrees with self-normalised importance sampling from the prior
    (z-test on the importance-sampling error); with a wrong likelihood it does not."""
    task = fb.tasks.get("qubit_rabi")
    p = task.sample_problem(jax.random.key(7), n=1)
    ys = np.asarray(task._simulate(jax.random.key(8), jax.numpy.asarray(p.theta, "float32"),
                                   20), np.float64)
    res = fb.filter("grid", p.prior, ys, key=jax.random.key(0), task=task, size=200)
    draws = np.asarray(p.prior.sample(jax.random.key(9), 200_000), np.float64)

    def is_mean(data):
        lw = task.grid_log_likelihood(draws, data)
        w = np.exp(lw - lw.max())
        w /= w.sum()
        mean = w @ draws
        se = np.sqrt(np.sum(w[:, None] ** 2 * (draws - mean) ** 2, 0))
        return mean, se

    mean, se = is_mean(ys)
    z = np.abs(res[-1].mean() - mean) / np.sqrt(se**2 + (res[-1].steps / 4) ** 2)
    assert np.all(z < 4), z
    flipped = ys.copy()
    flipped[:, 1] = 1 - flipped[:, 1]
    m_wrong, se_wrong = is_mean(flipped)
    z_wrong = np.abs(res[-1].mean() - m_wrong) / np.sqrt(se_wrong**2 + se**2)
    assert np.any(z_wrong > 4), z_wrong


def test_cli_filter_runs_with_plot_json_and_missing_rows(tmp_path):
    from typer.testing import CliRunner

    from flashbayes.cli import app

    model = tiny_model(perturb=0.05)
    ckpt = model.save(tmp_path / "m.safetensors")
    runner = CliRunner()
    res = runner.invoke(app, ["filter", str(ckpt), "--steps", "8", "--plot",
                              str(tmp_path / "run.png"), "--out", str(tmp_path / "run.json")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run.png").stat().st_size > 10_000
    out = __import__("json").loads((tmp_path / "run.json").read_text())
    assert set(out["filters"]) == {"model", "kalman"} and out["steps"] == 8
    assert np.isfinite(out["filters"]["model"]["nll_per_step"])
    # observations from a CSV, with a missing row, and a prior from JSON
    prior, _, ys = track(model.task, steps=5)
    (tmp_path / "prior.json").write_text(prior.to_json())
    lines = ["x,y"] + [f"{a},{b}" for a, b in ys]
    lines[3] = ","
    (tmp_path / "obs.csv").write_text("\n".join(lines))
    res = runner.invoke(app, ["filter", str(ckpt), "--observations", str(tmp_path / "obs.csv"),
                              "--prior", str(tmp_path / "prior.json")])
    assert res.exit_code == 0, res.output
    assert "5 steps" in res.output
    # bad input: one line, exit code 2
    (tmp_path / "bad.csv").write_text("1,2\n3,nan\n")
    res = runner.invoke(app, ["filter", str(ckpt), "--observations", str(tmp_path / "bad.csv"),
                              "--prior", str(tmp_path / "prior.json")])
    assert res.exit_code == 2 and "partly filled row" in res.output
    res = runner.invoke(app, ["filter", str(ckpt), "--baseline", "nope"])
    assert res.exit_code == 2 and "--baseline" in res.output


def _gaps_to_reference(name, reference, seeds):
    """Per track of 100 steps: the mean NLL of the true state under the shipped model `name`,
    and under a blind filter (the untrained network), minus that under the reference filter."""
    model = fb.load_pretrained(name)
    task = model.task
    blind = tiny_model(name)
    gaps, gaps_blind = [], []
    for seed in seeds:
        prior, xs, ys = track(task, seed=seed, steps=100)
        ref = -fb.filter(reference, prior, ys, key=jax.random.key(0), task=task).log_prob(xs)
        for filt, out in ((model, gaps), (blind, gaps_blind)):
            out.append(np.mean(-fb.filter(filt, prior, ys, key=jax.random.key(0)).log_prob(xs)
                               - ref))
    return gaps, gaps_blind


@pytest.mark.slow
def test_shipped_lti_model_tracks_like_the_exact_filter_and_wrong_filter_fails():
    """Over 10 held-out tracks of 100 steps the shipped model's NLL of the true state is within
    0.1 nats/step of the exact filter (the benchmark's target is 0.05 over 200 tracks); the
    same check fails for a filter that ignores the observations (the untrained network)."""
    gaps, gaps_blind = _gaps_to_reference("lti_tracking", "kalman", range(1000, 1010))
    assert abs(np.mean(gaps)) < 0.1, gaps
    assert np.mean(gaps_blind) > 0.1, gaps_blind


@pytest.mark.slow
def test_shipped_nonlinear_model_tracks_like_the_unscented_filter_and_a_blind_one_fails():
    """Over 8 held-out tracks of 100 steps the shipped range-and-bearing model's NLL of the true
    state is within 0.25 nats/step of the Gaussian-sum UKF's (the benchmark measures it against
    a 10^4-particle filter on 80 tracks); the same check fails for a filter that ignores the
    observations (the untrained network: the transition alone)."""
    gaps, gaps_blind = _gaps_to_reference("nonlinear_tracking", "ukf", range(2000, 2008))
    assert np.mean(gaps) < 0.25, gaps
    assert np.mean(gaps_blind) > 0.25, gaps_blind


@pytest.mark.slow  # 20-30 s: the default tier is kept under 15 minutes
def test_static_task_window_paths_agree_and_roll_over():
    """A static task conditions its anchor prior on all outcomes so far; past the window the
    posterior becomes the new anchor. The parallel path (the default here: each window's steps
    side by side), the scan and the step path agree on 120 outcomes (> 2 windows), and an
    untrained network returns the prior throughout."""
    model = tiny_model("qubit_rabi", perturb=0.05)
    task = model.task
    p = task.sample_problem(jax.random.key(5), n=1)
    ys = np.asarray(task._simulate(jax.random.key(6), jax.numpy.asarray(p.theta, "float32"),
                                   120), np.float64)
    ys[7] = np.nan  # a missing outcome
    a = fb.filter(model, p.prior, ys, key=jax.random.key(0))
    assert a.info["method"] == "parallel"
    b = fb.filter(model, p.prior, ys, key=jax.random.key(0), method="step")
    c = fb.filter(model, p.prior, ys, key=jax.random.key(0), method="scan")
    for t in (0, 7, 15, 16, 49, 50, 51, 99, 100, 119):
        for other in (b[t], c[t]):
            np.testing.assert_allclose(a[t].means, other.means, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(a[t].weights, other.weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[7].means, a[6].means, atol=1e-6)  # nothing new at step 8
    assert np.abs(a[119].means - a[0].means).max() > 1e-3
    blind = fb.filter(tiny_model("qubit_rabi"), p.prior, ys, key=jax.random.key(0))
    np.testing.assert_allclose(blind[119].means, p.prior.means, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_parallel_path_with_fewer_components_than_the_model_holds(k):
    """The parallel path runs only the anchor's real components and packs the steps' data sets
    two to a sequence; with 1, 2 and 5 (all) of the model's 5 components it gives the scan's
    posteriors, padding included, over 60 outcomes (two windows, missing outcomes among them)."""
    from flashbayes._filter import _filter_of

    model = tiny_model("qubit_rabi", perturb=0.05)
    task = model.task
    p = task.sample_problem(jax.random.key(8), n=1)
    q = p.prior
    reps = -(-k // q.n_components)
    prior = fb.GMM(np.tile(q.weights, reps)[:k] / np.tile(q.weights, reps)[:k].sum(),
                   (np.tile(q.means, (reps, 1))[:k] + 0.05 * np.arange(k)[:, None]),
                   np.tile(q.scale_tril, (reps, 1, 1))[:k])
    ys = np.asarray(task._simulate(jax.random.key(9), jax.numpy.asarray(p.theta, "float32"),
                                   60), np.float32)
    observed = np.random.default_rng(k).random(60) > 0.15
    flt = _filter_of(model)
    state = flt.initial_state(prior)
    assert int(np.sum(state[3])) == k
    a = flt.run_parallel(state, ys, observed)
    b = [np.asarray(x) for x in flt.run(state, ys, observed)]
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert np.abs(a[1][-1] - a[1][0]).max() > 1e-3  # the posterior moved


@pytest.mark.slow  # 15-20 s: the default tier is kept under 15 minutes
def test_qubit_outcomes_reach_the_network_as_features_that_keep_them(tmp_path):
    """Each outcome (t, y) reaches the network as features at the prior's mean: t and y come
    back exactly, and the signed decay-times-phase feature is the outcome's probability at the
    prior mean (a wrong frequency fails the comparison). A model of such a task saves, loads
    and answers in the user's data format."""
    from flashbayes._padding import pad_prior

    task = fb.tasks.get("qubit_rabi")
    p = task.sample_problem(jax.random.key(3), n=30)
    w, m, s, cm = (np.asarray(a) for a in pad_prior(p.prior, task.k_max))
    _, aux = task.network_frame(w, m, s, cm)
    f = np.asarray(task.data_to_frame(np.asarray(p.data, np.float32), aux))
    assert f.shape == (30, task.network_data_dim)
    np.testing.assert_allclose(f[:, 1] * task.t_max, p.data[:, 0], rtol=1e-6)
    np.testing.assert_array_equal((f[:, 0] + 1) / 2, p.data[:, 1])
    mean = np.asarray(p.prior.mean(), np.float32)
    lik = [float(np.exp(task.log_likelihood(mean, p.data[i:i + 1]))) for i in range(30)]
    np.testing.assert_allclose((1 - f[:, 5]) / 2, lik, atol=1e-4)
    wrong = np.asarray(task.data_to_frame(np.asarray(p.data, np.float32),
                                          ((aux[0][0] * 1.1, aux[0][1]), aux[1])))
    assert np.abs((1 - wrong[:, 5]) / 2 - np.array(lik)).max() > 0.05

    small = fb.tasks.get("qubit_rabi", n_max=4)
    cfg = fb.TrainConfig(steps=2, batch_size=8, d_model=16, n_layers=1)
    model = fb.train(small, cfg, key=jax.random.key(0))
    assert (model.data_dim, model.network.config.data_dim) == (2, small.network_data_dim)
    back = fb.load(model.save(tmp_path / "q.safetensors"))
    a, b = model.posterior(p.prior, p.data[:4]), back.posterior(p.prior, p.data[:4])
    np.testing.assert_allclose(a.means, b.means, atol=1e-6)
