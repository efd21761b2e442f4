"""The shipped models: they load, answer validly (fast tier) and meet loose accuracy targets on
fresh held-out draws, while a deliberately wrong posterior fails the same checks (slow tier)."""

import jax
import numpy as np
import pytest

import flashbayes as fb
from flashbayes.amortized import PRETRAINED
from flashbayes.diagnostics import c2st, kl_divergence
from flashbayes.distributions import GMM

FRESH_SEED = 987_654  # not used in training nor in the benchmarks


GP_MODELS = ("gp_hyperprior_pfn", "gp_hyperprior_dt")
DT_MODELS = tuple(n for n in PRETRAINED if n not in GP_MODELS)


@pytest.mark.parametrize("name", DT_MODELS)
def test_shipped_model_loads_and_answers(name):
    model = fb.load_pretrained(name)
    assert model.task.name == name
    prob = model.task.sample_problem(jax.random.key(0), n=min(model.task.n_min + 3,
                                                             model.task.n_max))
    post = model.posterior(prob.prior, prob.data)
    GMM(weights=np.asarray(post.weights, np.float64), means=post.means,
        scale_tril=post.scale_tril)  # passes full validation
    assert model.meta["step"] > 1000


def test_unknown_pretrained_name():
    with pytest.raises(ValueError, match="expected one of"):
        fb.load_pretrained("nope")


class _Shifted:
    """A deliberately wrong posterior: the model's answer moved by one posterior sd."""

    def __init__(self, model):
        self.model = model
        self.task = model.task

    def posterior(self, prior, data):
        q = self.model.posterior(prior, data)
        sd = np.sqrt(np.diagonal(np.asarray(q.cov())))
        return GMM.unchecked(q.weights, q.means + sd, q.scale_tril)


def _mean_kl(model, name, n_problems):
    task = fb.tasks.get(name)
    kls = []
    key = jax.random.key(FRESH_SEED)
    for i in range(n_problems):
        prob = task.sample_problem(jax.random.fold_in(key, i))
        ref_prior = prob.user_prior if prob.user_prior is not None else prob.prior
        exact = task.exact_posterior(ref_prior, prob.data)
        q = model.posterior(prob.prior, prob.data)
        kls.append(kl_divergence(jax.random.fold_in(key, 10_000 + i), exact, q, n=2000)[0])
    return float(np.mean(kls))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gmm_linear", "gaussian_variance"])
def test_shipped_model_meets_loose_kl_target_and_wrong_answer_fails(name):
    model = fb.load_pretrained(name)
    good = _mean_kl(model, name, 150)
    assert good <= 0.1, f"{name}: mean KL {good:.4f} > 0.1"
    bad = _mean_kl(_Shifted(model), name, 150)
    assert bad > 0.1, f"a posterior shifted by one sd passed the check (KL {bad:.4f})"


@pytest.mark.slow
def test_logistic_model_c2st_against_nuts_and_wrong_answer_fails():
    from flashbayes.reference import TaskNUTS

    model = fb.load_pretrained("logistic_regression")
    task = model.task
    sampler = TaskNUTS(task, num_warmup=500, num_samples=500, num_chains=4)
    good, bad = [], []
    key = jax.random.key(FRESH_SEED)
    for i in range(6):
        prob = task.sample_problem(jax.random.fold_in(key, i))
        ref = sampler.run(jax.random.fold_in(key, 100 + i), prob.prior, prob.data, warn=False)
        n = ref.flat.shape[0]
        q = model.posterior(prob.prior, prob.data)
        good.append(c2st(ref.flat, np.asarray(q.sample(jax.random.fold_in(key, 200 + i), n))))
        wrong = _Shifted(model).posterior(prob.prior, prob.data)
        bad.append(c2st(ref.flat, np.asarray(wrong.sample(jax.random.fold_in(key, 300 + i), n))))
    assert np.mean(good) <= 0.7, good
    assert np.mean(bad) > 0.7, bad


@pytest.mark.slow
def test_shipped_sbi_swap_model_follows_its_prior_and_wrong_answers_fail():
    """The prior-swap model of gaussian_linear on fresh priors: near the exact posterior under
    the prior it was given; the exact posterior under sbibm's prior (not swapped) and the
    model's answer moved by one sd both fail the same bound."""
    model = fb.load_pretrained("sbi_gaussian_linear")
    task = model.task
    sbibm_prior = GMM(weights=[1.0], means=[np.zeros(10)],
                      scale_tril=[np.sqrt(0.1) * np.eye(10)])
    good, unswapped, shifted = [], [], []
    key = jax.random.key(FRESH_SEED)
    for i in range(40):
        prob = task.sample_problem(jax.random.fold_in(key, i), n=1)
        exact = task.exact_posterior(prob.prior, prob.data)
        k = jax.random.fold_in(key, 10_000 + i)
        good.append(kl_divergence(k, exact, model.posterior(prob.prior, prob.data), n=2000)[0])
        unswapped.append(kl_divergence(k, exact, task.exact_posterior(sbibm_prior, prob.data),
                                       n=2000)[0])
        wrong = _Shifted(model).posterior(prob.prior, prob.data)
        shifted.append(kl_divergence(k, exact, wrong, n=2000)[0])
    bound = 1.0  # measured 0.51 (benchmarks/sbi_prior_swap.py: docs/sbi.md)
    assert np.mean(good) <= bound, np.mean(good)
    assert np.mean(unswapped) > bound, np.mean(unswapped)
    assert np.mean(shifted) > bound, np.mean(shifted)


@pytest.mark.parametrize("name", GP_MODELS)
def test_shipped_gp_model_loads_and_answers(name):
    from flashbayes.amortized._pfn import PFNPredictor

    assert set(GP_MODELS) == set(fb.amortized.GP_PRETRAINED)
    model = fb.load_pretrained(name)
    assert isinstance(model, PFNPredictor) and model.task.name == "gp_hyperprior"
    assert model.network.config.head == ("gmm" if name.endswith("_dt") else "bar")
    assert model.meta["step"] > 1000 and model.task.n_max == 100
    p = model.task.sample_problem(jax.random.key(0), n=10, n_query=7)
    pred = model.predictive(p.context_x, p.context_y, p.query_x)
    lp = np.asarray(pred.log_prob(p.query_y))
    assert lp.shape == (7,) and np.all(np.isfinite(lp))
    assert pred.sample(jax.random.key(1), 5).shape == (5, 7)


def _gp_nlpd_gaps(model, n_problems, wrong=False):
    """Per data set (fresh seed, n from 2 to 100), the PFN's NLPD minus the oracle GP's (the
    exact predictive under the true hyperparameters); with `wrong`, a mis-specified exact GP
    (the noise standard deviation halved) stands in for the PFN."""
    import jax.numpy as jnp

    from flashbayes.reference import gp_oracle

    task = model.task
    key = jax.random.key(FRESH_SEED)
    gaps = []
    for i in range(n_problems):
        n = (2, 5, 10, 20, 50, 100)[i % 6]
        p = task.sample_problem(jax.random.fold_in(key, i), n=n, n_query=20)
        y = jnp.asarray(p.query_y)
        oracle = -float(np.mean(np.asarray(
            gp_oracle(task, p.hyper, p.context_x, p.context_y, p.query_x).log_prob(y))))
        if wrong:
            hyper = jnp.asarray(p.hyper) * jnp.array([1.0, 1.0, 0.5, 1.0])
            q = gp_oracle(task, hyper, p.context_x, p.context_y, p.query_x)
        else:
            q = model.predictive(p.context_x, p.context_y, p.query_x)
        gaps.append(-float(np.mean(np.asarray(q.log_prob(y)))) - oracle)
    return np.asarray(gaps)


@pytest.mark.slow
@pytest.mark.parametrize("name", GP_MODELS)
def test_shipped_gp_model_is_near_the_exact_predictive_and_a_wrong_one_is_not(name):
    # NUTS over the hyperparameters sits about 0.12 nats per point above the oracle and the
    # shipped PFN about 0.19 (docs/gp.md, 1,000 data sets); an exact GP whose noise is halved
    # sits 0.42 above it on these data sets and fails the same bound
    model = fb.load_pretrained(name)
    pfn = _gp_nlpd_gaps(model, 60)
    assert np.mean(pfn) < 0.3, np.mean(pfn)
    wrong = _gp_nlpd_gaps(model, 60, wrong=True)
    assert np.mean(wrong) > 0.3, np.mean(wrong)
