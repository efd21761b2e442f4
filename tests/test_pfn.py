import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashbayes as fb
from flashbayes.amortized._pfn import (
    PFN,
    PFNConfig,
    load_pfn,
    pfn_expected_loss,
    pfn_loss,
    prior_borders,
)


def _net(seed=0, layers=2, head="bar", framed=False, distance=False):
    cfg = PFNConfig(x_dim=2, borders=tuple(np.linspace(-3, 3, 21)), d_model=32, n_layers=layers,
                    head=head, n_components=3, y_standardize=framed, y_prior_mean=0.3,
                    y_prior_sd=1.4, distance_bias=distance)
    net = PFN(cfg, key=jax.random.key(seed))
    # a trained-like head: random output weights, so the checks below are not trivially met
    w = 0.3 * jax.random.normal(jax.random.key(seed + 1), net.head.weight.shape)
    net = eqx.tree_at(lambda n: n.head.weight, net, w)
    if framed:  # the frame's features in use too
        w = jax.random.normal(jax.random.key(seed + 2), net.frame_embed.weight.shape)
        net = eqx.tree_at(lambda n: n.frame_embed.weight, net, w)
    if distance:  # widths moved off their initial values, as training does
        k = jax.random.key(seed + 3)
        net = _with_widths(net, [b.log_width + 0.5 * jax.random.normal(jax.random.fold_in(k, i),
                                                                       b.log_width.shape)
                                 for i, b in enumerate(net.blocks)])
    return net


def _with_widths(net, widths):
    """`net` with its blocks' distance-bias log widths replaced (None: no bias)."""
    return eqx.tree_at(lambda n: [b.log_width for b in n.blocks], net, widths,
                       is_leaf=lambda v: v is None)


_VARIANTS = [("bar", False), ("gmm", False), ("bar", True), ("gmm", True)]


def _data(seed=0, n=7, m=5):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.uniform(size=(n, 2)), jnp.float32),
            jnp.asarray(rng.normal(size=n), jnp.float32), jnp.ones(n, bool),
            jnp.asarray(rng.uniform(size=(m, 2)), jnp.float32))


def test_untrained_head_gives_uniform_buckets():
    cfg = PFNConfig(x_dim=2, borders=tuple(np.linspace(-3, 3, 21)), d_model=32, n_layers=1)
    net = PFN(cfg, key=jax.random.key(0))
    logits = net(*_data())
    np.testing.assert_array_equal(np.asarray(logits), 0.0)


@pytest.mark.parametrize("distance", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_permutation_invariance_over_context(distance):
    net = _net(distance=distance)
    cx, cy, cm, qx = _data()
    perm = np.random.default_rng(1).permutation(7)
    a = net(cx, cy, cm, qx)
    b = net(cx[perm], cy[perm], cm[perm], qx)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # the check is not vacuous: changing one context value changes the answer
    c = net(cx, cy.at[0].add(1.0), cm, qx)
    assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-3


@pytest.mark.parametrize("distance", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_no_cross_talk_between_queries(distance):
    net = _net(distance=distance)
    cx, cy, cm, qx = _data()
    a = np.asarray(net(cx, cy, cm, qx))
    moved = qx.at[2].set(jnp.array([0.95, 0.05]))
    b = np.asarray(net(cx, cy, cm, moved))
    keep = np.arange(5) != 2
    np.testing.assert_allclose(a[keep], b[keep], atol=1e-5)
    assert np.max(np.abs(a[2] - b[2])) > 1e-3
    # one query alone gets the same answer as inside a set of queries
    single = np.asarray(net(cx, cy, cm, qx[3:4]))
    np.testing.assert_allclose(single[0], a[3], atol=1e-5)


@pytest.mark.parametrize("distance", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_padding_mask_invariance(distance):
    net = _net(distance=distance)
    cx, cy, cm, qx = _data()
    a = np.asarray(net(cx, cy, cm, qx))
    pad_x = jnp.concatenate([cx, jnp.full((4, 2), 0.3)])
    pad_y = jnp.concatenate([cy, jnp.full(4, 9.0)])
    pad_m = jnp.concatenate([cm, jnp.zeros(4, bool)])
    b = np.asarray(net(pad_x, pad_y, pad_m, qx))
    np.testing.assert_allclose(a, b, atol=1e-5)
    # unmasked, the same rows do change the answer
    c = np.asarray(net(pad_x, pad_y, jnp.ones(11, bool), qx))
    assert np.max(np.abs(a - c)) > 1e-3


@pytest.mark.slow  # an option not shipped; the default tier is kept under 15 minutes
def test_distance_bias_reads_the_context_near_each_point():
    """With the distance bias, head h adds -w_h |x - x'|^2 to its logits. Zero widths give the
    content attention back exactly; very large widths leave each token only the null token and
    the context points at its own input, so in one block a query far from every context point
    no longer hears the context values while one on a context point does. (From two blocks
    on, the null token, at distance 0 from all, carries what it read of the whole context.)"""
    net = _net(distance=True)
    cx, cy, cm, qx = _data()
    a = np.asarray(net(cx, cy, cm, qx))

    def widths(n, value):
        return _with_widths(n, [jnp.full_like(b.log_width, value) for b in n.blocks])

    plain = _with_widths(net, [None] * len(net.blocks))
    np.testing.assert_allclose(np.asarray(widths(net, -jnp.inf)(cx, cy, cm, qx)),
                               np.asarray(plain(cx, cy, cm, qx)), atol=1e-5)
    assert np.max(np.abs(a - np.asarray(plain(cx, cy, cm, qx)))) > 1e-3  # the bias is used
    sharp = widths(_net(layers=1, distance=True), jnp.log(1e6))
    qx2 = jnp.stack([cx[0], jnp.array([0.97, 0.02])])  # on point 0; far from all (>= 0.1 away)
    assert float(jnp.min(jnp.sum((cx - qx2[1]) ** 2, -1))) > 0.01
    before = np.asarray(sharp(cx, cy, cm, qx2))
    after = np.asarray(sharp(cx, cy.at[:].add(1.5), cm, qx2))
    np.testing.assert_allclose(after[1], before[1], atol=1e-5)
    assert np.max(np.abs(after[0] - before[0])) > 1e-3


def test_context_frame_is_the_shrunk_mean_and_sd_of_the_context():
    """loc = (sum y + m0) / (n + 1), scale^2 = (sum (y - loc)^2 + (m0 - loc)^2 + s0^2) / (n + 1)
    over the unmasked rows; without y_standardize the frame is (0, 1)."""
    from flashbayes.amortized._pfn import context_frame

    cfg = _net(framed=True).config
    y = np.array([4.0, 4.5, 3.5, 4.2, 100.0])
    mask = np.array([True, True, True, True, False])
    loc, scale = (float(v) for v in context_frame(cfg, jnp.asarray(y), jnp.asarray(mask)))
    both = np.concatenate([y[mask], [cfg.y_prior_mean]])
    want_loc = both.mean()
    want_var = (np.sum((both - want_loc) ** 2) + cfg.y_prior_sd**2) / both.size
    assert loc == pytest.approx(want_loc, rel=1e-6)
    assert scale == pytest.approx(np.sqrt(want_var), rel=1e-6)
    # the plain mean and sd of the context are not it (the pseudo-point counts)
    assert abs(loc - y[mask].mean()) > 0.5 and abs(scale - y[mask].std()) > 1.0
    # an empty context is the prior predictive's frame; an unframed config is (0, 1)
    empty = context_frame(cfg, jnp.asarray(y), jnp.zeros(5, bool))
    np.testing.assert_allclose(np.asarray(empty), [cfg.y_prior_mean, cfg.y_prior_sd], rtol=1e-6)
    assert [float(v) for v in context_frame(_net().config, jnp.asarray(y),
                                            jnp.asarray(mask))] == [0.0, 1.0]


def test_framed_predictive_is_a_density_in_the_users_units():
    """With the context frame, the predictive's borders move with the data set: the density
    integrates to one over y, its log density is the network's `log_density` (computed in the
    frame's units), and its middle sits near the context's location."""
    net = _net(framed=True)
    cx, cy, cm, qx = _data()
    cy = 100.0 + 20.0 * cy
    pred = net.predictive(cx, cy, cm, qx)
    grid = np.linspace(-400.0, 600.0, 400_001)[:, None]
    dens = np.exp(np.asarray(pred.log_prob(jnp.asarray(grid, jnp.float32)), np.float64))
    np.testing.assert_allclose(np.trapezoid(dens, grid[:, 0], axis=0), 1.0, atol=2e-3)
    qy = jnp.array([90.0, 100.0, 130.0, 60.0, 101.0])
    np.testing.assert_allclose(np.asarray(net.log_density(cx, cy, cm, qx, qy)),
                               np.asarray(pred.log_prob(qy)), rtol=1e-5, atol=1e-5)
    median = np.asarray(pred.quantile(jnp.full(5, 0.5)))
    assert np.all(np.abs(median - 100.0) < 60.0)
    # the head's answer not mapped back (its borders read in y's units): another density
    from flashbayes.distributions import BarDistribution

    unmapped = BarDistribution(jnp.asarray(net.config.borders, jnp.float32), net(cx, cy, cm, qx))
    assert np.max(np.abs(np.asarray(unmapped.log_prob(qy)) - np.asarray(pred.log_prob(qy)))) > 1


def test_frame_borders_are_in_the_frames_units():
    """`frame_borders`: the prior predictive's mean and sd (for the shipped hyperprior,
    0 and sqrt(E s^2 + E sigma^2 + 0.5^2) = sqrt(e^0.5 (1 + 0.01) + 0.25) = 1.384), and
    borders of query values in their data set's frame: centred, unit-scale quantiles."""
    from flashbayes.amortized._pfn import frame_borders

    task = fb.tasks.get_predictive("gp_hyperprior")
    b, m0, s0 = frame_borders(task, jax.random.key(0), 20, n_samples=100_000)
    assert abs(m0) < 0.07
    assert s0 == pytest.approx(np.sqrt(np.exp(0.5) * 1.01 + 0.25), rel=0.05)
    assert b.shape == (21,) and np.all(np.diff(b) > 0)
    assert abs(b[10]) < 0.1 and 0.6 < (b[15] - b[5]) / 1.349 < 1.4
    raw = prior_borders(task, jax.random.key(0), 20, n_samples=100_000)
    assert np.max(np.abs(b - raw)) > 0.2  # not the raw prior quantiles


def test_loss_on_a_task_batch_and_gradient():
    task = fb.tasks.get_predictive("gp_hyperprior", x_dim=2, n_max=12)
    # compiled: the same values as op-by-op, without dispatching every op of the backward pass
    batch = jax.jit(lambda k: task.sample_batch(k, 4, n_query=3))(jax.random.key(0))
    net = _net()
    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(pfn_loss))(net, batch)
    assert np.isfinite(float(loss))
    assert np.isfinite(float(jnp.sum(grads.head.bias)))


@pytest.mark.parametrize(("head", "framed"), [
    *_VARIANTS[:3], pytest.param(*_VARIANTS[3], marks=pytest.mark.slow)])
def test_expected_log_density_against_quadrature(head, framed):
    """E[log q(Y)] under a Gaussian per query (the Rao-Blackwellised loss's terms): the bar
    head's closed form and the gmm head's Gauss-Hermite rule against a fine grid, with a
    non-trivial head; a Gaussian moved and spread misses by far more than the tolerance. With
    the context frame, the loss is computed in the frame's units and the grid's density in
    y's units (the borders moved and scaled), so the check also ties the two together."""
    from flashbayes.amortized._pfn import context_frame

    net = _net(layers=2, head=head, framed=framed)
    cx, cy, cm, qx = _data(m=4)
    if framed:
        cy = 1.5 + 2.0 * cy  # a context whose frame is far from (0, 1)
    mean, var = jnp.array([0.2, -1.0, 2.5, 0.0]), jnp.array([0.5, 0.05, 1.0, 3.0])
    got = np.asarray(net.expected_log_density(cx, cy, cm, qx, mean, var), np.float64)
    sd = np.sqrt(np.asarray(var, np.float64))
    grid = np.asarray(mean, np.float64) + sd * np.linspace(-12, 12, 100_001)[:, None]
    out = net(cx, cy, cm, qx)  # the network once; its predictive on the whole grid
    frame = context_frame(net.config, cy, cm)
    if head == "bar":
        lq = net.distribution(out, *frame).log_prob(jnp.asarray(grid, jnp.float32))
    else:
        lq = net._gmm_log_density(out, jnp.asarray(grid.T, jnp.float32), frame).T
    lq = np.asarray(lq, np.float64)
    dens = np.exp(-0.5 * ((grid - np.asarray(mean)) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
    want = np.trapezoid(dens * lq, grid, axis=0)
    np.testing.assert_allclose(got, want, atol=2e-3)
    other = np.asarray(net.expected_log_density(cx, cy, cm, qx, mean + 1.0, 1.5 * var))
    assert np.max(np.abs(other - want)) > 2e-2


@pytest.mark.slow  # 15-20 s: the default tier is kept under 15 minutes
def test_expected_loss_is_the_mean_of_the_sampled_loss():
    """Averaged over redraws of y* from the exact predictive, the usual loss is the
    Rao-Blackwellised one (same objective, less noise), and its gradient is finite."""
    task = fb.tasks.get_predictive("gp_hyperprior", x_dim=2, n_max=12)
    batch, mean, var = jax.jit(lambda k: task.sample_batch_exact(k, 4, n_query=3))(
        jax.random.key(0))
    net = _net()
    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(pfn_expected_loss))(
        net, (batch, mean, var))
    assert np.isfinite(float(jnp.sum(grads.head.weight)))
    eps = jax.random.normal(jax.random.key(1), (4000, *mean.shape))

    def sampled(e):
        return pfn_loss(net, dataclasses.replace(batch, query_y=mean + jnp.sqrt(var) * e))

    draws = np.asarray(jax.lax.map(sampled, eps, batch_size=500), np.float64)
    assert abs(float(loss) - draws.mean()) < 4 * draws.std() / np.sqrt(draws.size) + 1e-4
    # the query values the data set drew give another (noisy) value
    assert abs(float(pfn_loss(net, batch)) - float(loss)) > 1e-3


def test_config_validation_and_round_trip():
    cfg = PFNConfig(x_dim=1, borders=tuple(np.linspace(-1, 1, 5)))
    assert PFNConfig.from_dict(cfg.to_dict()) == cfg
    framed = dataclasses.replace(cfg, y_standardize=True, y_prior_mean=0.2, y_prior_sd=1.3)
    assert PFNConfig.from_dict(framed.to_dict()) == framed
    # a configuration written before the frame existed reads as one without it
    biased = dataclasses.replace(cfg, distance_bias=True)
    assert PFNConfig.from_dict(biased.to_dict()) == biased
    # a configuration written before the frame and the distance bias existed reads as one
    # without them
    old = {k: v for k, v in cfg.to_dict().items()
           if not k.startswith("y_") and k != "distance_bias"}
    assert not PFNConfig.from_dict(old).y_standardize
    assert not PFNConfig.from_dict(old).distance_bias
    with pytest.raises(ValueError, match="y_prior_sd"):
        dataclasses.replace(cfg, y_prior_sd=0.0)
    with pytest.raises(ValueError, match="y_standardize: expected true or false"):
        dataclasses.replace(cfg, y_standardize="yes")
    with pytest.raises(ValueError, match="distance_bias: expected true or false"):
        dataclasses.replace(cfg, distance_bias=1)
    with pytest.raises(ValueError, match="increasing"):
        PFNConfig(x_dim=1, borders=(0.0, 1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        PFNConfig(x_dim=1, borders=tuple(np.linspace(-1, 1, 5)), d_model=30, n_heads=4)


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_checkpoint_round_trip_through_fit_network(tmp_path):
    task = fb.tasks.get_predictive("gp_hyperprior", n_max=6)
    borders = prior_borders(task, jax.random.key(0), 8, n_samples=2000)
    cfg = PFNConfig(x_dim=1, borders=tuple(borders), d_model=16, n_layers=1)
    net = PFN(cfg, key=jax.random.key(1))
    tcfg = fb.TrainConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=3)
    fitted, _ = fb.amortized.fit_network(
        net, pfn_loss, lambda k, b: task.sample_batch(k, b, n_query=3), tcfg,
        key=jax.random.key(2), out_dir=tmp_path, header={"kind": "pfn", "model_config":
                                                         cfg.to_dict()})
    loaded, header = load_pfn(tmp_path / "ckpt_00000003.safetensors")
    assert header["step"] == 3 and loaded.config == cfg
    cx, cy, cm, qx = (jnp.array([[0.2], [0.6]]), jnp.array([0.3, -0.1]), jnp.ones(2, bool),
                      jnp.array([[0.4]]))
    np.testing.assert_array_equal(np.asarray(loaded(cx, cy, cm, qx)),
                                  np.asarray(fitted(cx, cy, cm, qx)))
    # the trained head is no longer the zero head
    assert np.any(np.asarray(loaded.head.bias) != 0)


def test_predictor_pads_validates_and_refuses_out_of_range():
    from flashbayes.amortized._pfn import PFNPredictor

    task = fb.tasks.get_predictive("gp_hyperprior", x_dim=2, n_max=10)
    net = _net()
    model = PFNPredictor(net, task)
    cx, cy, cm, qx = _data(n=7, m=5)
    pred = model.predictive(np.asarray(cx), np.asarray(cy), np.asarray(qx))
    np.testing.assert_allclose(np.asarray(pred.logits), np.asarray(net(cx, cy, cm, qx)),
                               atol=1e-5)
    with pytest.raises(ValueError, match="trained on 1..10 context points; got 11"):
        model.predictive(np.full((11, 2), 0.5), np.zeros(11), np.asarray(qx))
    with pytest.raises(ValueError, match=r"inputs in \[0.0, 1.0\]"):
        model.predictive(np.asarray(cx), np.asarray(cy), np.full((1, 2), 1.5),
                         standardize=False)
    with pytest.raises(ValueError, match="expected shape"):
        model.predictive(np.zeros((3, 3)), np.zeros(3), np.zeros((1, 3)))


@pytest.mark.parametrize(("head", "framed", "distance"), [  # options not shipped: slow tier
    *((*v, False) for v in _VARIANTS[:2]),
    *(pytest.param(*v, False, marks=pytest.mark.slow) for v in _VARIANTS[2:]),
    pytest.param("bar", False, True, marks=pytest.mark.slow)])
def test_predictor_answers_every_query_count_as_the_network_does(head, framed, distance):
    """The predictor pads context and queries to a few sizes (multiples of 8 up to 128, then
    geometric buckets) and forms the predictive inside its compiled call; for 8 queries (no
    padding), 13 and 130 its densities are the network's own on the unpadded problem (with the
    context frame: padded rows leave the frame alone)."""
    from flashbayes.amortized._pfn import PFNPredictor, _pad_size

    assert [_pad_size(n) for n in (1, 8, 9, 100, 128, 129)] == [8, 8, 16, 104, 128, 192]
    net = _net(layers=1, head=head, framed=framed, distance=distance)
    model = PFNPredictor(net, fb.tasks.get_predictive("gp_hyperprior", x_dim=2, n_max=10))
    for m in (8, 13, 130):
        cx, cy, cm, qx = _data(n=7, m=m)
        cy = 1.5 + 2.0 * cy
        qy = jnp.linspace(-2.0, 2.0, m)
        pred = model.predictive(np.asarray(cx), np.asarray(cy), np.asarray(qx))
        got = np.asarray(pred.log_prob(qy))
        assert got.shape == (m,)
        np.testing.assert_allclose(got, np.asarray(net.log_density(cx, cy, cm, qx, qy)),
                                   rtol=1e-5, atol=1e-5)


def test_user_units_are_standardised_and_mapped_back_exactly():
    from flashbayes.amortized._pfn import PFNPredictor

    model = PFNPredictor(_net(), fb.tasks.get_predictive("gp_hyperprior", x_dim=2, n_max=10))
    rng = np.random.default_rng(3)
    cx, qx = rng.uniform(size=(7, 2)), rng.uniform(size=(5, 2))
    cy, qy = rng.normal(size=7), rng.normal(size=5)
    base = model.predictive(cx, cy, qx, standardize=True)
    # the same problem in other units: x in years around 2000, y in thousands around 50,000
    a, b, c, d = np.array([30.0, 0.01]), np.array([2000.0, -4.0]), 1000.0, 50_000.0
    pred = model.predictive(a * cx + b, c * cy + d, a * qx + b)  # "auto": outside the box
    np.testing.assert_allclose(np.asarray(pred.log_prob(c * qy + d)),
                               np.asarray(base.log_prob(qy)) - np.log(c), atol=1e-4)
    np.testing.assert_allclose(np.asarray(pred.mean()), c * np.asarray(base.mean()) + d,
                               rtol=1e-5)
    # without standardisation the answer differs (the check above can fail), and inputs
    # inside the box are left alone by "auto"
    raw = model.predictive(cx, cy, qx, standardize=False)
    assert np.max(np.abs(np.asarray(raw.log_prob(qy)) - np.asarray(base.log_prob(qy)))) > 1e-2
    np.testing.assert_array_equal(np.asarray(model.predictive(cx, cy, qx).logits),
                                  np.asarray(raw.logits))
    with pytest.raises(ValueError, match="standardize: expected"):
        model.predictive(cx, cy, qx, standardize="yes")


def test_load_pfn_refuses_other_checkpoints(tmp_path):
    from flashbayes.amortized._checkpoint import CheckpointError, save_checkpoint

    path = save_checkpoint(tmp_path / "other.safetensors", {"kind": "dt"},
                           {"params": {"w": jnp.zeros(2)}})
    with pytest.raises(CheckpointError, match="expected a PFN checkpoint"):
        load_pfn(path)


@pytest.mark.parametrize(("framed", "distance"), [  # the distance bias (not shipped): slow tier
    (False, False), (True, False), pytest.param(False, True, marks=pytest.mark.slow)])
def test_predictor_save_and_load_round_trip(tmp_path, framed, distance):
    from flashbayes.amortized._checkpoint import CheckpointError
    from flashbayes.amortized._pfn import PFNPredictor, load_predictor

    task = fb.tasks.get_predictive("gp_hyperprior", x_dim=2, n_max=10)
    model = PFNPredictor(_net(framed=framed, distance=distance), task, {"step": 7})
    path = model.save(tmp_path / "m.safetensors")
    loaded = load_predictor(path)
    assert loaded.task.n_max == 10 and loaded.task.x_dim == 2 and loaded.meta["step"] == 7
    assert loaded.network.config == model.network.config
    cx, cy, _, qx = (np.asarray(a) for a in _data())
    a, b = loaded.predictive(cx, cy, qx), model.predictive(cx, cy, qx)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    np.testing.assert_array_equal(np.asarray(a.borders), np.asarray(b.borders))
    if distance:  # the widths came back (not the initial ones: they were moved before saving)
        for got, want in zip(loaded.network.blocks, model.network.blocks, strict=True):
            np.testing.assert_array_equal(np.asarray(got.log_width), np.asarray(want.log_width))
    if framed or distance:  # the folder rules below are the same for all
        return
    # a training folder means its latest checkpoint; an empty one is refused
    model.save(tmp_path / "run" / "ckpt_00000007.safetensors")
    assert load_predictor(tmp_path / "run").meta["path"].endswith("ckpt_00000007.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="expected a checkpoint file"):
        load_predictor(tmp_path / "empty")


@pytest.mark.slow  # about 15 s (two NUTS runs): the default tier is kept under 15 minutes
def test_infer_answers_with_the_network_inside_and_nuts_outside_the_range():
    from flashbayes.amortized._pfn import PFNPredictor

    task = fb.tasks.get_predictive("gp_hyperprior", n_max=6)
    cfg = PFNConfig(x_dim=1, borders=tuple(np.linspace(-4, 4, 41)), d_model=16, n_layers=1)
    model = PFNPredictor(PFN(cfg, key=jax.random.key(0)), task)
    rng = np.random.default_rng(0)
    cx, qx = rng.uniform(size=(5, 1)), rng.uniform(size=(3, 1))
    cy = np.sin(6 * cx[:, 0])
    inside = fb.infer(model, (cx, cy, qx), key=jax.random.key(1))
    assert inside.info["path"] == "amortized"
    np.testing.assert_array_equal(np.asarray(inside.logits),
                                  np.asarray(model.predictive(cx, cy, qx).logits))
    # 8 context points, in other units, against a network trained on at most 6: NUTS answers,
    # in the user's units (the same as NUTS on the standardised problem, mapped back)
    cx8 = np.linspace(0.0, 1.0, 8)[:, None]
    cy8 = np.sin(6 * cx8[:, 0])
    opts = dict(num_warmup=150, num_samples=100, num_chains=2, num_mix=40)
    std = fb.infer(model, {"context_x": cx8, "context_y": cy8, "query_x": qx}, method="nuts",
                   key=jax.random.key(2), standardize=True, **opts)
    out = fb.infer(model, (10 * cx8 + 3, 100 * cy8 - 50, 10 * qx + 3), key=jax.random.key(2),
                   **opts)
    assert out.info["path"] == "nuts" and "trained on 1..6 context points; got 8" in \
        out.info["reason"]
    np.testing.assert_allclose(np.asarray(out.mean()), 100 * np.asarray(std.mean()) - 50,
                               rtol=1e-3, atol=1e-2)
    lp = np.asarray(out.log_prob(100 * np.sin(6 * qx[:, 0]) - 50))
    np.testing.assert_allclose(lp, np.asarray(std.log_prob(np.sin(6 * qx[:, 0]))) - np.log(100),
                               atol=1e-3)
    with pytest.raises(ValueError, match="outside the training range"):
        fb.infer(model, (cx8, cy8, qx), method="amortized")
    with pytest.raises(ValueError, match="method: expected one of"):
        fb.infer(model, (cx, cy, qx), method="smc", key=jax.random.key(0))
    with pytest.raises(ValueError, match="context_x, context_y, query_x"):
        fb.infer(model, (cx, cy), key=jax.random.key(0))


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_gmm_head_gives_a_mixture_per_query_point():
    from flashbayes.amortized._pfn import PFNPredictor
    from flashbayes.distributions import GaussianMixturePredictive

    cfg = PFNConfig(x_dim=2, borders=tuple(np.linspace(-3, 3, 21)), d_model=32, n_layers=1,
                    head="gmm", n_components=4)
    net = PFN(cfg, key=jax.random.key(0))
    cx, cy, cm, qx = _data(m=5)
    pred = net.predictive(cx, cy, cm, qx)
    assert isinstance(pred, GaussianMixturePredictive) and pred.means.shape == (4, 5)
    # untrained: equal weights, distinct means (no two components alike, so they can separate)
    np.testing.assert_allclose(np.asarray(pred.weights), 0.25, rtol=1e-6)
    assert len(np.unique(np.round(np.asarray(pred.means[:, 0]), 4))) == 4
    # a trained-like head: the log-space training density equals the mixture's log_prob
    w = 0.3 * jax.random.normal(jax.random.key(3), net.head.weight.shape)
    net = eqx.tree_at(lambda n: n.head.weight, net, w)
    qy = jnp.linspace(-1.0, 1.0, 5)
    np.testing.assert_allclose(np.asarray(net.log_density(cx, cy, cm, qx, qy)),
                               np.asarray(net.predictive(cx, cy, cm, qx).log_prob(qy)),
                               rtol=1e-5, atol=1e-5)
    # both against the stated parametrisation, from the raw head output, with scipy: weights
    # softmax(a), means loc + scale b, sds scale (softplus(c + log(e - 1)) + 1e-3)
    from scipy import stats
    from scipy.special import logsumexp, softmax

    raw = np.asarray(net(cx, cy, cm, qx), np.float64)
    loc, scale = cfg.y_location_scale()
    a, b, c = raw[:, :4], raw[:, 4:8], raw[:, 8:]
    sd = scale * (np.logaddexp(0.0, c + np.log(np.e - 1)) + 1e-3)
    want = logsumexp(np.log(softmax(a, -1)) + stats.norm.logpdf(
        np.asarray(qy)[:, None], loc + scale * b, sd), axis=-1)
    np.testing.assert_allclose(np.asarray(net.log_density(cx, cy, cm, qx, qy)), want, rtol=1e-4,
                               atol=1e-4)
    task = fb.tasks.get_predictive("gp_hyperprior", x_dim=2, n_max=10)
    grads = eqx.filter_grad(pfn_loss)(net, task.sample_batch(jax.random.key(1), 3, n_query=4))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert np.any(np.asarray(grads.head.weight) != 0)
    # through the predictor: other units map back exactly; query point j is an fb.GMM
    model = PFNPredictor(net, task)
    a, c, d = 30.0, 1000.0, 50_000.0
    base = model.predictive(np.asarray(cx), np.asarray(cy), np.asarray(qx), standardize=True)
    other = model.predictive(a * np.asarray(cx), c * np.asarray(cy) + d, a * np.asarray(qx))
    np.testing.assert_allclose(np.asarray(other.log_prob(c * qy + d)),
                               np.asarray(base.log_prob(qy)) - np.log(c), atol=1e-4)
    g = other.gmm(2)
    assert isinstance(g, fb.GMM) and g.dim == 1
    np.testing.assert_allclose(float(g.log_prob(jnp.array([[c * qy[2] + d]]))[0]),
                               float(other.log_prob(c * qy + d)[2]), rtol=1e-4)
    with pytest.raises(ValueError, match="head: expected one of"):
        PFNConfig(x_dim=1, borders=tuple(np.linspace(-1, 1, 5)), head="flow")


def test_gmm_head_round_trips_through_a_checkpoint(tmp_path):
    from flashbayes.amortized._pfn import PFNPredictor, load_predictor

    cfg = PFNConfig(x_dim=1, borders=tuple(np.linspace(-3, 3, 21)), d_model=16, n_layers=1,
                    head="gmm", n_components=3)
    task = fb.tasks.get_predictive("gp_hyperprior", n_max=6)
    model = PFNPredictor(PFN(cfg, key=jax.random.key(0)), task)
    loaded = load_predictor(model.save(tmp_path / "g.safetensors"))
    assert loaded.network.config == cfg
    x, y, q = np.array([[0.1], [0.4]]), np.array([0.2, -0.3]), np.array([[0.5]])
    np.testing.assert_array_equal(np.asarray(loaded.predictive(x, y, q).means),
                                  np.asarray(model.predictive(x, y, q).means))
