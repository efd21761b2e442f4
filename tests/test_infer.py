"""fb.infer: the amortized path, the k-hat check and the fallback to NUTS."""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import flashbayes as fb
from flashbayes._infer import amortized_khat
from flashbayes.reference import SampleSet, TaskTarget


def _regression(x, y):
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([2]))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5.0))
    numpyro.sample("y", dist.Normal(beta[0] + beta[1] * x, sigma), obs=y)


@pytest.fixture(scope="module")
def regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    return {"x": x, "y": 1.0 + 2.0 * x + 0.5 * rng.normal(size=40)}


@pytest.fixture(scope="module")
def logistic():
    return fb.load_pretrained("logistic_regression")


def test_infer_numpyro_model_with_nuts(regression_data):
    post = fb.infer(_regression, data=regression_data, method="nuts", key=jax.random.key(0),
                    num_warmup=300, num_samples=500, num_chains=2, warn=False)
    assert isinstance(post, SampleSet)
    assert post.info["path"] == "nuts" and "nuts" in post.info["seconds"]
    idata = post.to_inference_data()
    assert set(idata.posterior.data_vars) == {"beta", "sigma"}
    assert post.names == ["beta[1]", "beta[2]", "sigma"]
    assert abs(float(post.mean()[1]) - 2.0) < 0.3


def test_infer_numpyro_model_with_vi(regression_data):
    post = fb.infer(_regression, data=regression_data, method="vi", key=jax.random.key(0))
    assert post.info["path"] == "vi" and np.isfinite(post.info["khat"])
    assert abs(float(post.mean()[1]) - 2.0) < 0.3


def test_infer_rejects_bad_calls(regression_data, logistic):
    with pytest.raises(ValueError, match="method"):
        fb.infer(_regression, data=regression_data, method="mcmc", key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        fb.infer(_regression, data=regression_data, method="nuts")
    with pytest.raises(ValueError, match="amortized model"):
        fb.infer(_regression, data=regression_data, method="amortized", key=jax.random.key(0))
    with pytest.raises(ValueError, match="prior"):
        fb.infer(logistic, data=np.zeros((3, 3)), key=jax.random.key(0))
    with pytest.raises(TypeError, match="model"):
        fb.infer("logistic_regression", data=np.zeros((3, 3)), key=jax.random.key(0))
    with pytest.raises(TypeError, match="dict"):
        fb.infer(_regression, data=[1, 2], key=jax.random.key(0))


def test_khat_separates_right_from_wrong_approximations():
    task = fb.tasks.get("gmm_linear")
    prob = task.sample_problem(jax.random.key(5), n=8)
    exact = task.exact_posterior(prob.prior, prob.data)
    target = TaskTarget(task, prob.prior, prob.data)
    assert amortized_khat(jax.random.key(0), target, exact) < 0.5
    shrunk = fb.GMM(exact.weights, exact.means, 0.5 * np.asarray(exact.scale_tril))
    assert amortized_khat(jax.random.key(0), target, shrunk) > 0.7


def test_auto_returns_the_amortized_posterior_in_distribution(logistic):
    task = logistic.task
    prob = task.sample_problem(jax.random.key(3), n=20)
    post = fb.infer(logistic, data=prob.data, prior=prob.prior, key=jax.random.key(0))
    assert post.info["khat"] is not None
    if post.info["khat"] <= 0.7:
        assert isinstance(post, fb.GMM) and post.info["path"] == "amortized"
        assert set(post.info["seconds"]) == {"amortized", "khat"}
    else:  # the check did its job: NUTS answered
        assert post.info["path"] == "nuts"


def test_auto_falls_back_to_nuts_far_outside_the_training_range(logistic):
    prob = logistic.task.sample_problem(jax.random.key(3), n=20)
    x = np.array(prob.data)
    x[:, :2] *= 20.0
    post = fb.infer(logistic, data=x, prior=prob.prior, key=jax.random.key(0),
                    num_warmup=300, num_samples=300, num_chains=2, warn=False)
    assert isinstance(post, SampleSet) and post.info["path"] == "nuts"
    assert "training range" in post.info["reason"]
    assert set(post.info["seconds"]) == {"nuts"}


def test_auto_falls_back_when_khat_is_high(logistic):
    # a k-hat threshold below any attainable value forces the fallback; NUTS starts from the
    # amortized draws and the k-hat that triggered it is reported
    prob = logistic.task.sample_problem(jax.random.key(4), n=10)
    post = fb.infer(logistic, data=prob.data, prior=prob.prior, key=jax.random.key(0),
                    khat_threshold=-10.0, num_warmup=200, num_samples=200, num_chains=2,
                    warn=False)
    assert post.info["path"] == "nuts" and "k-hat" in post.info["reason"]
    assert set(post.info["seconds"]) == {"amortized", "khat", "nuts"}


def test_method_names_an_engine_for_amortized_models():
    model = fb.load_pretrained("gmm_linear")
    prob = model.task.sample_problem(jax.random.key(0), n=4)
    post = fb.infer(model, prob.data, prior=prob.prior, method="exact")
    assert post.info["path"] == "exact"
    amort = fb.infer(model, prob.data, prior=prob.prior, method="amortized")
    assert amort.info["path"] == "amortized" and amort.info["khat"] is None
