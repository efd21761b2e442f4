"""The prior-swap route of SBI: sbibm simulators under a family of GMM priors (`sbi_<task>`),
their exact posteriors where there is one, and `flashbayes sbi sample --prior` for a model that
takes the prior as an input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import flashbayes as fb
from flashbayes.cli import app
from flashbayes.tasks._simulator import SIMULATOR_TASKS

runner = CliRunner()


@pytest.mark.parametrize("sbi_name", SIMULATOR_TASKS)
def test_simulations_are_the_sbibm_simulator_at_theta(sbi_name):
    task = fb.tasks.get(f"sbi_{sbi_name}")
    sbi_task = fb.sbi.tasks.get(sbi_name)
    assert (task.theta_dim, task.data_dim) == (sbi_task.dim_theta, sbi_task.dim_x)
    theta = jnp.asarray(sbi_task.prior().sample(jax.random.key(0)))
    key = jax.random.key(1)
    got = np.asarray(task._simulate(key, theta, 3))
    want = np.stack([np.asarray(sbi_task.simulator(k, theta))
                     for k in jax.random.split(key, 3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the likelihood of rows adds up
    ll = float(task.log_likelihood(theta, got))
    np.testing.assert_allclose(ll, sum(float(sbi_task.log_likelihood(theta, jnp.asarray(r)))
                                       for r in got), rtol=1e-5)


def test_prior_family_is_laid_over_the_sbibm_prior_scale():
    task = fb.tasks.get("sbi_bernoulli_glm")  # unequal prior sds per axis
    keys = jax.random.split(jax.random.key(3), 200)
    _, means, tril, cm, _ = jax.jit(jax.vmap(lambda k: task._sample_prior(k, None)))(keys)
    cm = np.asarray(cm)
    means, tril = np.asarray(means)[cm], np.asarray(tril)[cm]
    z = (means - task.loc) / task.sd
    assert z.min() >= -1.5 - 1e-5 and z.max() <= 1.5 + 1e-5
    assert z.min() < -1.3 and z.max() > 1.3
    # in units of the prior's sd, each component's principal sds lie in scale_range
    unit = tril / task.sd[None, :, None]
    sds = np.sqrt(np.linalg.eigvalsh(unit @ np.swapaxes(unit, -1, -2)))
    assert sds.min() >= 0.1 * (1 - 1e-3) and sds.max() <= 2.0 * (1 + 1e-3)
    # about 5 % of problems hold no simulation, the others one
    n = np.asarray(jax.vmap(task._sample_n)(keys))
    assert set(np.unique(n)) <= {0, 1} and 0 < np.mean(n == 0) < 0.15


def test_bad_family_settings_are_refused():
    with pytest.raises(ValueError, match="scale_range"):
        fb.tasks.get("sbi_slcp", scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="mean_range"):
        fb.tasks.get("sbi_slcp", mean_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="n_max"):
        fb.tasks.get("sbi_slcp", n_max=0)
    with pytest.raises(NotImplementedError, match="no closed-form"):
        fb.tasks.get("sbi_slcp").exact_posterior(None, np.zeros((1, 8)))


def test_exact_posterior_is_sbibm_closed_form_under_its_own_prior():
    task = fb.tasks.get("sbi_gaussian_linear")
    x = fb.sbi.tasks.get("gaussian_linear").simulator(jax.random.key(0), jnp.full(10, 0.2))
    prior = fb.GMM(weights=[1.0], means=[np.zeros(10)], scale_tril=[np.sqrt(0.1) * np.eye(10)])
    post = task.exact_posterior(prior, np.asarray(x)[None])
    np.testing.assert_allclose(post.means[0], np.asarray(x) / 2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(post.cov()), 0.05 * np.eye(10), atol=1e-8)


def _importance_moments(task, prior, data, key, n=200_000):
    z = prior.sample(key, n)
    lw = np.asarray(jax.vmap(lambda t: task.log_likelihood(t, jnp.asarray(data)))(z), np.float64)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    z = np.asarray(z, np.float64)
    return w @ z, np.sqrt(w @ (z - w @ z) ** 2)


@pytest.mark.parametrize("wrong", [False, True])
def test_exact_posterior_matches_importance_sampling_and_a_wrong_one_does_not(wrong):
    task = fb.tasks.get("sbi_gaussian_linear_uniform")
    p = task.sample_problem(jax.random.key(5), n=1)
    while p.prior.n_components < 3:  # a multimodal prior
        p = task.sample_problem(jax.random.fold_in(jax.random.key(5), p.prior.n_components), n=1)
    post = task.exact_posterior(p.prior, p.data)
    if wrong:  # the update with the simulator's noise variance taken as 0.2
        post = fb.tasks.gaussian_sum_update(p.prior, np.eye(10), 0.2 * np.eye(10), p.data)
    mean, sd = _importance_moments(task, p.prior, p.data, jax.random.key(6))
    err = np.max(np.abs(np.asarray(post.mean()) - mean) / sd)
    sd_err = np.max(np.abs(np.sqrt(np.diag(np.asarray(post.cov()))) / sd - 1))
    if wrong:
        assert err > 0.1 or sd_err > 0.1
    else:
        assert err < 0.05 and sd_err < 0.05, (err, sd_err)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # an untrained network: these tests are about the command, not the answer
    task = fb.tasks.get("sbi_gaussian_linear")
    cfg = fb.TrainConfig(d_model=16, n_layers=1, data_layers=1).model_config(task)
    path = tmp_path_factory.mktemp("swap_model") / "model.safetensors"
    fb.AmortizedPosterior(fb.DistributionTransformer(cfg, key=jax.random.key(0)), task).save(path)
    return path


def _write(path, text):
    path.write_text(text)
    return path


def test_sbi_sample_takes_the_prior_of_a_swap_model(tiny_model, tmp_path):
    obs = _write(tmp_path / "obs.csv", ",".join(f"parameter_{i + 1}" for i in range(10)) + "\n"
                 + ",".join(["0.1"] * 10) + "\n")
    prior = fb.GMM(weights=[0.3, 0.7], means=[np.zeros(10), np.ones(10)],
                   scale_tril=[0.3 * np.eye(10), 0.2 * np.eye(10)])
    prior_file = _write(tmp_path / "prior.json", prior.to_json())
    out = tmp_path / "samples.csv"
    res = runner.invoke(app, ["sbi", "sample", str(tiny_model), "--observation", str(obs),
                              "--prior", str(prior_file), "--n", "500", "--out", str(out)])
    assert res.exit_code == 0, res.output
    header = out.read_text().splitlines()[0]
    assert header == ",".join(f"parameter_{i + 1}" for i in range(10))
    draws = np.loadtxt(out, delimiter=",", skiprows=1)
    assert draws.shape == (500, 10) and np.all(np.isfinite(draws))
    # the same draws as the model's posterior in Python
    model = fb.load(tiny_model)
    want = np.asarray(model.posterior(prior, np.full((1, 10), 0.1)).sample(jax.random.key(0), 500))
    np.testing.assert_allclose(draws, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case, message", [
    ("no_prior", "takes the prior as an input"),
    ("wrong_dim", "expected a prior of dimension 10"),
    ("bad_json", "--prior"),
    ("short_obs", "expected 10 values"),
])
def test_sbi_sample_of_a_swap_model_refuses_bad_input(tiny_model, tmp_path, case, message):
    obs = _write(tmp_path / "obs.csv", ",".join(["0.1"] * (9 if case == "short_obs" else 10)))
    prior = fb.GMM(weights=[1.0], means=[np.zeros(2 if case == "wrong_dim" else 10)],
                   scale_tril=[np.eye(2 if case == "wrong_dim" else 10)])
    prior_file = _write(tmp_path / "prior.json", "{not json" if case == "bad_json"
                        else prior.to_json())
    args = ["sbi", "sample", str(tiny_model), "--observation", str(obs), "--out",
            str(tmp_path / "s.csv")]
    if case != "no_prior":
        args += ["--prior", str(prior_file)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not (tmp_path / "s.csv").exists()


def test_linear_swap_model_is_translation_equivariant(tiny_model):
    """Moving prior and x by c moves the posterior by c (the model centres its input)."""
    model = fb.load(tiny_model)
    assert model.task.translation_equivariant
    assert not fb.tasks.get("sbi_slcp").translation_equivariant
    p = model.task.sample_problem(jax.random.key(4), n=1)
    c = np.linspace(-0.5, 0.5, 10)
    moved = fb.GMM(weights=p.prior.weights, means=np.asarray(p.prior.means) + c,
                   scale_tril=p.prior.scale_tril)
    a = model.posterior(p.prior, p.data)
    b = model.posterior(moved, p.data + c)
    np.testing.assert_allclose(np.asarray(b.means), np.asarray(a.means) + c, atol=1e-4)
    np.testing.assert_allclose(np.asarray(b.scale_tril), np.asarray(a.scale_tril), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.weights), np.asarray(a.weights), atol=1e-5)


def test_sbi_sample_runs_the_shipped_swap_model_by_name(tmp_path):
    obs = _write(tmp_path / "obs.csv", ",".join(["0.1"] * 10))
    prior = fb.GMM(weights=[1.0], means=[np.full(10, 0.3)], scale_tril=[0.2 * np.eye(10)])
    prior_file = _write(tmp_path / "prior.json", prior.to_json())
    out = tmp_path / "s.csv"
    res = runner.invoke(app, ["sbi", "sample", "sbi_gaussian_linear", "--observation", str(obs),
                              "--prior", str(prior_file), "--n", "4000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    draws = np.loadtxt(out, delimiter=",", skiprows=1)
    # near the exact posterior mean (x / 0.1 + m / 0.04) / (1 / 0.1 + 1 / 0.04) = 0.243
    assert np.abs(draws.mean(0) - (0.1 / 0.1 + 0.3 / 0.04) / (1 / 0.1 + 1 / 0.04)).max() < 0.05
    res = runner.invoke(app, ["sbi", "sample", "sbi_slcp", "--observation", str(obs),
                              "--prior", str(prior_file), "--out", str(out)])
    assert res.exit_code == 2 and "no shipped model" in res.output


def _grid_moments(task, prior, x, half_width=12.0, m=600):
    """Grid posterior (probabilities, points), its mean and sd, from the task's likelihood."""
    g = np.linspace(-half_width, half_width, m)
    pts = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    lp = np.asarray(prior.log_prob(pts), np.float64) + np.asarray(
        jax.vmap(lambda t: task.log_likelihood(t, jnp.asarray(x)))(jnp.asarray(pts)), np.float64)
    p = np.exp(lp - lp.max())
    p /= p.sum()
    mean = p @ pts
    return p, pts, mean, np.sqrt(p @ (pts - mean) ** 2)


@pytest.mark.parametrize("wrong", [False, True])
def test_gaussian_mixture_exact_posterior_matches_a_grid_and_a_wrong_one_does_not(wrong):
    """Two simulations: each prior component splits in two per simulation."""
    task = fb.tasks.get("sbi_gaussian_mixture", n_max=2)
    prior = fb.GMM(weights=[0.4, 0.6], means=[[-2.0, 1.0], [2.5, -1.0]],
                   scale_tril=[[[1.5, 0.0], [0.4, 1.0]], [[2.0, 0.0], [0.0, 1.2]]])
    x = np.array([[1.8, -0.7], [2.4, -1.3]])
    post = task.exact_posterior(prior, x)
    assert post.n_components == 8
    if wrong:  # one noise scale only: the N(0, I) half of the mixture
        post = fb.tasks.gaussian_sum_update(prior, np.eye(2), np.eye(2), x)
    p, pts, mean, sd = _grid_moments(task, prior, x)
    q = np.exp(np.asarray(post.log_prob(pts), np.float64))
    tv = 0.5 * np.abs(q / q.sum() - p).sum()  # total variation on the grid
    if wrong:
        assert tv > 0.1, tv
    else:
        assert tv < 0.01, tv
        assert np.max(np.abs(np.asarray(post.mean()) - mean) / sd) < 0.01
