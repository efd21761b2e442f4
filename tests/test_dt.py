import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashbayes as fb
from flashbayes.amortized import AmortizedPosterior, DistributionTransformer, DTConfig, size_bucket


def _perturbed_net(task, seed=0, scale=0.1):
    """A network whose zero head is replaced by random weights, so outputs depend on inputs."""
    net = DistributionTransformer(DTConfig(task.theta_dim, task.data_dim, d_model=32,
                                           n_layers=2), key=jax.random.key(seed))
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    head = net.head
    import equinox as eqx

    return eqx.tree_at(lambda n: (n.head.weight, n.head.bias), net,
                       (scale * jax.random.normal(k1, head.weight.shape),
                        scale * jax.random.normal(k2, head.bias.shape)))


@pytest.mark.parametrize("name", ["gmm_linear", "logistic_regression", "gaussian_variance"])
def test_untrained_model_returns_prior(name):
    task = fb.tasks.get(name)
    net = DistributionTransformer(DTConfig(task.theta_dim, task.data_dim), key=jax.random.key(0))
    model = AmortizedPosterior(net, task)
    prob = task.sample_problem(jax.random.key(1), n=7)
    post = model.posterior(prob.prior, prob.data)
    np.testing.assert_allclose(np.asarray(post.weights), np.asarray(prob.prior.weights),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(post.means), np.asarray(prob.prior.means), atol=1e-4)
    np.testing.assert_allclose(np.asarray(post.scale_tril), np.asarray(prob.prior.scale_tril),
                               atol=1e-4)


def test_output_is_valid_gmm_and_differs_from_prior_when_head_nonzero():
    task = fb.tasks.get("gmm_linear")
    model = AmortizedPosterior(_perturbed_net(task), task)
    prob = task.sample_problem(jax.random.key(2), n=9)
    post = model.posterior(prob.prior, prob.data)
    # passes the full validation of a user-built GMM
    fb.GMM(weights=np.asarray(post.weights, np.float64), means=post.means,
           scale_tril=post.scale_tril)
    assert np.abs(np.asarray(post.means) - np.asarray(prob.prior.means)).max() > 1e-3


def test_permuting_components_permutes_output_and_data_changes_nothing():
    task = fb.tasks.get("gmm_linear")
    model = AmortizedPosterior(_perturbed_net(task), task)
    prob = task.sample_problem(jax.random.key(5), n=11)
    while prob.prior.n_components < 3:
        prob = task.sample_problem(jax.random.fold_in(jax.random.key(5), prob.prior.n_components
                                                      + 10), n=11)
    post = model.posterior(prob.prior, prob.data)
    perm = np.random.default_rng(0).permutation(prob.prior.n_components)
    pp = prob.prior
    permuted = fb.GMM(weights=np.asarray(pp.weights, np.float64)[perm],
                      means=np.asarray(pp.means)[perm], scale_tril=np.asarray(pp.scale_tril)[perm])
    post_p = model.posterior(permuted, prob.data)
    np.testing.assert_allclose(np.asarray(post_p.means), np.asarray(post.means)[perm], atol=1e-4)
    np.testing.assert_allclose(np.asarray(post_p.weights), np.asarray(post.weights)[perm],
                               atol=1e-5)
    dperm = np.random.default_rng(1).permutation(prob.data.shape[0])
    post_d = model.posterior(prob.prior, prob.data[dperm])
    np.testing.assert_allclose(np.asarray(post_d.means), np.asarray(post.means), atol=1e-4)
    np.testing.assert_allclose(np.asarray(post_d.weights), np.asarray(post.weights), atol=1e-5)
    np.testing.assert_allclose(np.asarray(post_d.scale_tril), np.asarray(post.scale_tril),
                               atol=1e-4)


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_padding_does_not_change_the_answer():
    task = fb.tasks.get("gmm_linear")
    net = _perturbed_net(task)
    prob = task.sample_problem(jax.random.key(7), n=5)
    k, n = prob.prior.n_components, 5
    args = (prob.prior.weights, prob.prior.means, prob.prior.scale_tril, jnp.ones(k, bool),
            jnp.asarray(prob.data, jnp.float32), jnp.ones(n, bool))
    ref = net(*args)
    # pad data rows with garbage and components with junk, masked out
    x_pad = jnp.concatenate([args[4], 99.0 * jnp.ones((7, 2))])
    w = jnp.concatenate([args[0], jnp.zeros(2)])
    mu = jnp.concatenate([args[1], 50.0 * jnp.ones((2, 2))])
    s = jnp.concatenate([args[2], 3.0 * jnp.broadcast_to(jnp.eye(2), (2, 2, 2))])
    out = net(w, mu, s, jnp.arange(k + 2) < k, x_pad, jnp.arange(n + 7) < n)
    for a, b in zip(ref, out):
        np.testing.assert_allclose(np.asarray(b)[:k], np.asarray(a), atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_batched_call_equals_single_calls():
    task = fb.tasks.get("gmm_linear")
    model = AmortizedPosterior(_perturbed_net(task), task)
    probs = [task.sample_problem(jax.random.key(20 + i), n=i * 3) for i in range(6)]
    batch = model.posterior_batch([p.prior for p in probs], [p.data for p in probs])
    for p, b in zip(probs, batch):
        single = model.posterior(p.prior, p.data)
        assert b.n_components == p.prior.n_components
        np.testing.assert_allclose(np.asarray(b.means), np.asarray(single.means), atol=1e-4)
        np.testing.assert_allclose(np.asarray(b.weights), np.asarray(single.weights), atol=1e-5)
        np.testing.assert_allclose(np.asarray(b.scale_tril), np.asarray(single.scale_tril),
                                   atol=1e-5)


def test_no_recompilation_within_a_size_bucket():
    """Data sets of one size bucket and priors with any number of components (up to the task's
    maximum) share one compiled function; another bucket compiles exactly once more."""
    task = fb.tasks.get("gmm_linear")
    model = AmortizedPosterior(_perturbed_net(task), task)
    prob = task.sample_problem(jax.random.key(0), n=13)
    model.posterior(prob.prior, prob.data[:13])
    before = model._single._cache_size()
    ks = set()
    for n in (13, 14, 15, 16):  # all in the bucket of 16
        assert size_bucket(n) == 16
        for i in range(4):
            p = task.sample_problem(jax.random.key(100 + 10 * n + i), n=n)
            ks.add(p.prior.n_components)
            model.posterior(p.prior, p.data)
    assert len(ks) > 1
    assert model._single._cache_size() == before
    model.posterior(prob.prior, prob.data[:3])  # another bucket compiles once more
    assert model._single._cache_size() == before + 1


def test_bad_inputs():
    task = fb.tasks.get("gmm_linear")
    model = AmortizedPosterior(_perturbed_net(task), task)
    prob = task.sample_problem(jax.random.key(0), n=3)
    with pytest.raises(ValueError, match=r"expected shape \(n, 2\)"):
        model.posterior(prob.prior, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        model.posterior(prob.prior, np.array([[np.nan, 0.0]]))
    with pytest.raises(TypeError, match="GMM"):
        model.posterior({"weights": [1]}, prob.data)
    one_d = fb.GMM(weights=[1.0], means=[[0.0]], scale_tril=[[[1.0]]])
    with pytest.raises(ValueError, match="dimension 2"):
        model.posterior(one_d, prob.data)
    post = model.posterior(prob.prior, np.zeros((0, 2)))  # n = 0 is allowed
    assert post.n_components == prob.prior.n_components
    with pytest.warns(fb.amortized.OutOfRangeWarning, match="trained on at most 20"):
        model.posterior(prob.prior, np.zeros((25, 2)))


@pytest.mark.slow  # 15-20 s: the default tier is kept under 15 minutes
def test_zero_weight_component_stays_finite_and_zero():
    task = fb.tasks.get("gmm_linear")
    model = AmortizedPosterior(_perturbed_net(task), task)
    prior = fb.GMM(weights=[0.0, 1.0], means=[[0.0, 0.0], [1.0, 1.0]],
                   scale_tril=np.stack([np.eye(2), 0.5 * np.eye(2)]))
    post = model.posterior(prior, np.ones((4, 2)))
    assert np.all(np.isfinite(np.asarray(post.means)))
    assert float(post.weights[0]) == 0.0 and float(post.weights[1]) == pytest.approx(1.0)
    theta = jnp.zeros(2)
    lp = model.network.log_prob(theta, prior.weights, prior.means, prior.scale_tril,
                                jnp.ones(2, bool), jnp.ones((4, 2)), jnp.ones(4, bool))
    assert np.isfinite(float(lp))


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_posterior_arrays_grouping_chunking_and_scattered_masks():
    """Rows are regrouped by size bucket and run in chunks; results come back in input order,
    and masks whose real rows are not at the front give the same answer."""
    task = fb.tasks.get("gmm_linear")
    model = AmortizedPosterior(_perturbed_net(task), task)
    batch = task.sample_batch(jax.random.key(8), 9)
    args = [np.asarray(a) for a in (batch.weights, batch.means, batch.scale_tril, batch.cmask,
                                    batch.data, batch.dmask)]
    ref = model.posterior_arrays(*args, chunk=1024)
    out = model.posterior_arrays(*args, chunk=2)
    for a, b in zip(ref, out):
        np.testing.assert_allclose(a, b, atol=1e-5)
    rev = [a.copy() for a in args]
    rev[4], rev[5] = args[4][:, ::-1], args[5][:, ::-1]  # real rows at the end
    for a, b in zip(ref, model.posterior_arrays(*rev)):  # rows summed in another order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for i in range(9):
        k = int(args[3][i].sum())
        n = int(args[5][i].sum())
        prior = fb.GMM(weights=args[0][i, :k].astype(np.float64) / args[0][i, :k].sum(),
                       means=args[1][i, :k], scale_tril=args[2][i, :k])
        single = model.posterior(prior, args[4][i, :n])
        np.testing.assert_allclose(np.asarray(single.means), ref[1][i, :k], atol=1e-4)


@pytest.mark.parametrize("name", ["gmm_linear", "qubit_rabi", "lti_tracking"])
def test_grouped_pass_answers_each_data_set_as_alone(name):
    """Data sets packed into one array (row r in set group[r], -1: none) get the answers they
    get alone, through the task's frame and centring; moving one row to the other set changes
    both answers, so the sets do not see each other's rows."""
    from flashbayes._padding import pad_prior
    from flashbayes.amortized._model import grouped_core

    task = fb.tasks.get(name)
    net = DistributionTransformer(DTConfig(task.theta_dim, task.network_data_dim, d_model=32,
                                           n_layers=2), key=jax.random.key(0))
    k1, k2 = jax.random.split(jax.random.key(1))
    import equinox as eqx

    net = eqx.tree_at(lambda n: (n.head.weight, n.head.bias), net,
                      (0.1 * jax.random.normal(k1, net.head.weight.shape),
                       0.1 * jax.random.normal(k2, net.head.bias.shape)))
    model = AmortizedPosterior(net, task)
    prob = task.sample_problem(jax.random.key(3), n=1)
    rows = np.asarray(jax.vmap(lambda k: task._simulate(k, jnp.asarray(prob.theta), 1)[0])(
        jax.random.split(jax.random.key(4), 9)), np.float32)
    padded = [jnp.asarray(a) for a in pad_prior(prob.prior, task.k_max)]
    sets = [np.arange(0, 6), np.arange(6, 9), np.arange(0)]  # the third is empty
    group = np.full(12, -1, np.int32)
    group[:9] = np.repeat([0, 1], [6, 3])
    data = np.zeros((12, task.data_dim), np.float32)
    data[:9] = rows
    data[9:] = 1e3  # rows of no set: never read
    core = jax.jit(grouped_core(net, task, 3))
    out = [np.asarray(a) for a in core(*padded, jnp.asarray(data), jnp.asarray(group))]
    for g, idx in enumerate(sets):
        alone = np.zeros((8, task.data_dim), np.float32)
        alone[:len(idx)] = rows[idx]
        ref = model.core(*padded, jnp.asarray(alone), jnp.asarray(np.arange(8) < len(idx)))
        for a, b in zip(out, ref):
            np.testing.assert_allclose(a[g], np.asarray(b), rtol=1e-4, atol=1e-5)
    moved = group.copy()
    moved[5] = 1  # row 5 now belongs to the second set
    other = np.asarray(core(*padded, jnp.asarray(data), jnp.asarray(moved))[1])
    assert np.abs(other[0] - out[1][0]).max() > 1e-4
    assert np.abs(other[1] - out[1][1]).max() > 1e-4
