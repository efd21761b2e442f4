"""The one-pass-per-layer sampler of masked autoregressive flows against flowjax's own inverse."""

import equinox as eqx
import flowjax.distributions as fd
import flowjax.flows as ff
import jax
import jax.numpy as jnp
import numpy as np
import paramax
import pytest
from flowjax.bijections import RationalQuadraticSpline

from flashbayes import sbi
from flashbayes.sbi._maf_sampling import maf_layout, sample_maf


def _maf(dim, cond_dim, width, depth, transformer=None, seed=0):
    return ff.masked_autoregressive_flow(
        jax.random.key(seed), base_dist=fd.Normal(jnp.zeros(dim)), cond_dim=cond_dim,
        transformer=transformer, flow_layers=3, nn_width=width, nn_depth=depth)


def _perturbed(flow, seed=1, scale=0.5):
    """Random non-zero weights and biases everywhere (masks still applied), so that every
    allowed connection matters."""
    params, static = eqx.partition(flow, eqx.is_inexact_array)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return eqx.combine(jax.tree_util.tree_unflatten(tree, leaves), static)


SLOW = pytest.mark.slow  # the default tier is kept under 15 minutes


@pytest.mark.parametrize("dim,cond_dim,width,depth,spline", [
    # the larger case in the slow tier (about 40 s): the default tier keeps one
    pytest.param(4, 3, 12, 2, False, marks=SLOW), (2, 1, 6, 2, False),
    # fewer hidden units than dimensions: some ranks have none
    pytest.param(5, 2, 3, 2, False, marks=SLOW), pytest.param(5, 2, 7, 1, False, marks=SLOW),
    pytest.param(3, 4, 9, 3, False, marks=SLOW), pytest.param(4, 3, 10, 2, True, marks=SLOW)])
def test_same_draws_as_flowjax(dim, cond_dim, width, depth, spline):
    transformer = RationalQuadraticSpline(knots=4, interval=4.0) if spline else None
    flow = _perturbed(_maf(dim, cond_dim, width, depth, transformer))
    layout = maf_layout(flow)
    assert layout is not None and layout.dim == dim and layout.depth == depth
    cond = jax.random.normal(jax.random.key(2), (cond_dim,))
    key = jax.random.key(3)
    ours = np.asarray(sample_maf(flow, layout, key, 500, cond))
    theirs = np.asarray(flow.sample(key, (500,), condition=cond))
    assert ours.shape == (500, dim)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # and the draws are not trivially equal: another condition moves them
    other = np.asarray(sample_maf(flow, layout, key, 500, cond + 1.0))
    assert np.max(np.abs(other - theirs)) > 1e-2


@pytest.mark.slow  # 15-20 s: the default tier is kept under 15 minutes
def test_layout_refuses_flows_it_does_not_understand():
    flow = _maf(4, 3, 12, 2)
    assert maf_layout(flow) is not None
    # a weight where the rank masks forbid one: the sampler would ignore it, so no layout
    def mlp_path(f):
        made = f.bijection.bijection.bijection.bijections[0]
        return made.masked_autoregressive_mlp.layers[1].weight

    unwrapped = paramax.unwrap(flow)
    weight = mlp_path(unwrapped)
    forbidden = np.argwhere(np.asarray(weight[0]) == 0)[0]
    broken = eqx.tree_at(mlp_path, unwrapped, weight.at[0, forbidden[0], forbidden[1]].set(0.3))
    assert maf_layout(broken) is None
    # a final activation the sampler would not apply
    tanh_out = eqx.tree_at(lambda f: f.bijection.bijection.bijection.bijections[0]
                           .masked_autoregressive_mlp.final_activation, flow, jnp.tanh)
    assert maf_layout(tanh_out) is None
    # other flows: a coupling flow, an unconditional MAF, one without hidden layers, one
    # dimension (no permutation), a MAF built for fast sampling already
    coupling = ff.coupling_flow(jax.random.key(0), base_dist=fd.Normal(jnp.zeros(4)), cond_dim=3)
    assert maf_layout(coupling) is None
    assert maf_layout(ff.masked_autoregressive_flow(
        jax.random.key(0), base_dist=fd.Normal(jnp.zeros(4)))) is None
    assert maf_layout(_maf(3, 2, 8, 0)) is None
    assert maf_layout(_maf(1, 2, 8, 2)) is None
    assert maf_layout(ff.masked_autoregressive_flow(
        jax.random.key(0), base_dist=fd.Normal(jnp.zeros(4)), cond_dim=3, invert=False)) is None


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_high_dimensions_scan_over_layers(monkeypatch):
    from flashbayes.sbi import _maf_sampling

    monkeypatch.setattr(_maf_sampling, "UNROLL_MAX_DIM", 3)
    flow = _perturbed(_maf(5, 2, 10, 2))
    cond, key = jnp.array([0.3, -1.0]), jax.random.key(7)
    ours = np.asarray(sample_maf(flow, maf_layout(flow), key, 300, cond))
    np.testing.assert_allclose(ours, np.asarray(flow.sample(key, (300,), condition=cond)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 20-30 s: the default tier is kept under 15 minutes
def test_npe_posterior_samples_with_it(tmp_path):
    task = sbi.tasks.get("gaussian_linear")
    # two MAFs: stacked members of one group
    est = sbi.train_npe(task.prior(), task.simulator, 300, key=jax.random.key(5),
                        head="maf", hidden=16, flow_layers=2, ensemble=2,
                        lr_reductions=0, max_epochs=2)
    assert est._maf_layout is not None
    assert sbi.load_npe(est.save(tmp_path / "est"))._maf_layout == est._maf_layout
    post = est.posterior(np.zeros(10))
    fast = np.asarray(post.sample(jax.random.key(6), 1000))
    est._maf_layout = None  # flowjax's own inverse
    slow = np.asarray(est.posterior(np.zeros(10)).sample(jax.random.key(6), 1000))
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_the_cli_keeps_the_compiled_sampler_on_disk(tmp_path):
    import os
    import subprocess
    import sys

    task = sbi.tasks.get("gaussian_linear")
    est = sbi.train_npe(task.prior(), task.simulator, 200, key=jax.random.key(8), head="maf",
                        ensemble=1, lr_reductions=0, max_epochs=1)
    est.save(tmp_path / "est")
    obs = tmp_path / "obs.csv"
    obs.write_text(",".join(f"data_{i + 1}" for i in range(10)) + "\n" + ",".join(["0.1"] * 10))
    cache = tmp_path / "cache"

    def sample(env_cache):
        env = {**os.environ, "FLASHBAYES_CACHE_DIR": env_cache}
        subprocess.run([sys.executable, "-m", "flashbayes", "sbi", "sample", str(tmp_path / "est"),
                        "--observation", str(obs), "--n", "100", "--out",
                        str(tmp_path / "s.csv")], env=env, check=True, capture_output=True)

    sample("off")
    assert not cache.exists()
    sample(str(cache))  # the sampler compiles in more than the cache's 0.5 s threshold
    assert any(cache.rglob("*"))
