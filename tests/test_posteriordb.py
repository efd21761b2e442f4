"""The posteriordb posteriors: models, data, reference draws, and the shared-data loader."""

import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from numpyro.infer.util import initialize_model, log_density, potential_energy
from scipy.integrate import solve_ivp

from flashbayes import _shared
from flashbayes._shared import SharedDataMissing, shared_benchmarks_dir
from flashbayes.benchmarks import posteriordb as pdb

NAMES = pdb.names()


@pytest.fixture(scope="module")
def shared():
    """The shared posteriordb folder; the tests that need it are skipped when it is missing."""
    try:
        return shared_benchmarks_dir("posteriordb")
    except SharedDataMissing as e:
        pytest.skip(f"shared posteriordb data not found, set FLASHBAYES_SHARED: {e}")


def _split(data):
    """Arrays (traced under jit, as an engine passes them) and static Python scalars."""
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in data.items() if k not in arrays}
    return arrays, static


def _draw(ref, chain, i):
    return {k: v[chain, i] for k, v in ref.items()}


def _f32(sites):
    return {k: jnp.asarray(v, jnp.float32) for k, v in sites.items()}


# ---------------------------------------------------------------------------- registry


def test_names():
    assert len(NAMES) == 13 and NAMES == sorted(set(NAMES))
    assert "eight_schools-eight_schools_noncentered" in NAMES


def test_get_unknown_name():
    with pytest.raises(ValueError, match="expected a posterior name in .*arK-arK.*got 'nope'"):
        pdb.get("nope")


def test_param_names_without_data():
    post = pdb.get("gp_pois_regr-gp_pois_regr")
    assert post.param_names == ("rho", "alpha", *(f"f[{i}]" for i in range(1, 12)))
    assert post.param_shapes == {"rho": (), "alpha": (), "f": (11,)}


@pytest.mark.parametrize("name", NAMES)
def test_reference_draws_match_param_names(shared, name):
    ref = pdb.get(name).reference_draws()
    assert tuple(ref) == pdb.get(name).param_names
    assert all(v.shape == (10, 1000) and v.dtype == np.float64 for v in ref.values())


def test_data_types(shared):
    data = pdb.get("kidiq-kidscore_momiq").data
    assert type(data["N"]) is int and data["N"] == 434
    assert data["kid_score"].dtype == np.int32 and data["mom_iq"].dtype == np.float64
    assert data["kid_score"].shape == (434,)
    with pytest.raises(ValueError):
        data["mom_iq"][0] = 0.0  # shared between calls, so read-only
    x = pdb.get("diamonds-diamonds").data["X"]
    assert x.shape == (5000, 25) and x.dtype == np.float64


# ---------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", NAMES)
def test_log_density_finite_at_a_reference_draw(shared, name):
    post = pdb.get(name)
    ref = post.reference_draws()
    draw = _draw(ref, 3, 17)
    params = _f32(post.sites_from_reference(draw))
    arrays, static = _split(post.data)

    @jax.jit
    def value_and_grad(params, arrays):
        return jax.value_and_grad(
            lambda p: log_density(post.model, (), {**static, **arrays}, p)[0])(params)

    value, grad = value_and_grad(params, arrays)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))

    # the sites, flattened, name the reference variables and give back the draw (in float64, so
    # that f of the Poisson GP goes through the same Cholesky as in Stan)
    @jax.jit
    def site_values(params, arrays):
        _, trace = log_density(post.model, (), {**static, **arrays}, params)
        return {k: s["value"] for k, s in trace.items()
                if s["type"] in ("sample", "deterministic") and not s.get("is_observed", False)}

    with jax.enable_x64(True):
        params64 = {k: jnp.asarray(v) for k, v in post.sites_from_reference(draw).items()}
        flat = pdb.flatten_draws(site_values(params64, arrays), batch_ndim=0)
    assert set(post.param_names) <= set(flat)
    got = np.array([flat[k] for k in post.param_names])
    want = np.array([draw[k] for k in post.param_names])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_garch_draws_map_back_with_their_own_bound(shared):
    """beta1's bound 1 - alpha1 moves with alpha1 when unconstrained values are mapped back."""
    post = pdb.get("garch-garch11")
    _, _, postprocess, _ = initialize_model(jax.random.key(0), post.model, model_kwargs=post.data)
    postprocess = jax.jit(postprocess)
    for u in (-2.0, 0.0, 3.0):
        z = {"mu": jnp.array(5.0), "alpha0": jnp.array(0.0), "alpha1": jnp.array(u),
             "beta1": jnp.array(0.5)}
        out = postprocess(z)
        alpha1 = 1 / (1 + math.exp(-u))
        assert float(out["alpha1"]) == pytest.approx(alpha1, rel=1e-5)
        assert float(out["beta1"]) == pytest.approx((1 - alpha1) / (1 + math.exp(-0.5)), rel=1e-5)


# ---------------------------------------------------------------------------- the maths


def _log_density_difference(post, a, b):
    data = post.data
    pa, pb = (_f32(post.sites_from_reference(d)) for d in (a, b))
    la, lb = (log_density(post.model, (), data, p)[0] for p in (pa, pb))
    return float(la - lb)


def test_kidiq_log_density_matches_scipy(shared):
    post = pdb.get("kidiq-kidscore_momiq")
    data, ref = post.data, post.reference_draws()

    def by_hand(d):
        # flat prior on beta; half-Cauchy(0, 2.5) on sigma
        mu = d["beta[1]"] + d["beta[2]"] * data["mom_iq"]
        return (st.norm.logpdf(data["kid_score"], mu, d["sigma"]).sum()
                + st.halfcauchy.logpdf(d["sigma"], scale=2.5))

    a, b = _draw(ref, 0, 0), _draw(ref, 5, 500)
    assert _log_density_difference(post, a, b) == pytest.approx(by_hand(a) - by_hand(b), abs=2e-2)


def test_blr_log_density_matches_scipy(shared):
    post = pdb.get("sblrc-blr")
    data, ref = post.data, post.reference_draws()

    def by_hand(d):
        beta = np.array([d[f"beta[{i}]"] for i in range(1, 6)])
        return (st.norm.logpdf(beta, 0, 10).sum() + st.halfnorm.logpdf(d["sigma"], scale=10)
                + st.norm.logpdf(data["y"], data["X"] @ beta, d["sigma"]).sum())

    a, b = _draw(ref, 1, 10), _draw(ref, 7, 900)
    assert _log_density_difference(post, a, b) == pytest.approx(by_hand(a) - by_hand(b), abs=2e-2)


def test_garch_bound_is_flat_not_normalised(shared):
    """beta1 is flat on (0, 1 - alpha1): on the unconstrained scale only the Jacobian remains."""
    post = pdb.get("garch-garch11")
    data, ref = post.data, post.reference_draws()
    y = data["y"]

    def by_hand(d):
        mu, a0, a1, b1 = d["mu"], d["alpha0"], d["alpha1"], d["beta1"]
        var = np.empty_like(y)
        var[0] = data["sigma1"] ** 2
        for t in range(1, len(y)):
            var[t] = a0 + a1 * (y[t - 1] - mu) ** 2 + b1 * var[t - 1]
        loglik = st.norm.logpdf(y, mu, np.sqrt(var)).sum()
        # log-Jacobians: alpha0 = exp(u), alpha1 = logistic(u), beta1 = (1 - alpha1) logistic(u)
        s = b1 / (1 - a1)
        return (loglik + math.log(a0) + math.log(a1 * (1 - a1))
                + math.log(1 - a1) + math.log(s * (1 - s)))

    def unconstrained(d):
        s = d["beta1"] / (1 - d["alpha1"])
        return {"mu": d["mu"], "alpha0": math.log(d["alpha0"]),
                "alpha1": math.log(d["alpha1"] / (1 - d["alpha1"])), "beta1": math.log(s / (1 - s))}

    a, b = _draw(ref, 2, 3), _draw(ref, 8, 333)
    energy = [float(potential_energy(post.model, (), data, _f32(unconstrained(d)))) for d in (a, b)]
    assert energy[1] - energy[0] == pytest.approx(by_hand(a) - by_hand(b), abs=2e-2)


def test_hmm_forward_algorithm_matches_enumeration(shared):
    """On the first five observations, summing over all 2^5 state paths gives the same density."""
    post = pdb.get("hmm_example-hmm_example")
    ref = post.reference_draws()
    y = post.data["y"][:5]
    d = _draw(ref, 4, 44)
    sites = post.sites_from_reference(d)
    trans = np.stack([sites["theta1"], sites["theta2"]])
    mu = sites["mu"]
    paths = []
    for z in itertools.product(range(2), repeat=5):
        lp = st.norm.logpdf(y[0], mu[z[0]], 1)
        for t in range(1, 5):
            lp += math.log(trans[z[t - 1], z[t]]) + st.norm.logpdf(y[t], mu[z[t]], 1)
        paths.append(lp)
    # priors: flat simplexes (Dirichlet(1, 1) has density 1), normal(3, 1) and normal(10, 1) on mu
    want = (np.logaddexp.reduce(paths) + st.norm.logpdf(mu[0], 3, 1)
            + st.norm.logpdf(mu[1], 10, 1))
    got = log_density(post.model, (), {"N": 5, "K": 2, "y": y}, _f32(sites))[0]
    assert float(got) == pytest.approx(want, abs=1e-3)


def test_lotka_volterra_solution_matches_float64_solver(shared):
    post = pdb.get("hudson_lynx_hare-lotka_volterra")
    sites = post.sites_from_reference(_draw(post.reference_draws(), 6, 600))
    th, z0 = sites["theta"], sites["z_init"]
    ts = np.arange(1.0, 21.0)
    exact = solve_ivp(lambda t, z: [(th[0] - th[1] * z[1]) * z[0], (-th[2] + th[3] * z[0]) * z[1]],
                      (0.0, 20.0), z0, t_eval=ts, rtol=1e-11, atol=1e-11, method="DOP853").y.T
    got = np.asarray(jax.jit(pdb.solve_lotka_volterra)(jnp.asarray(th, jnp.float32),
                                                       jnp.asarray(z0, jnp.float32), ts))
    np.testing.assert_allclose(got, exact, rtol=2e-4)


def test_gp_cholesky_in_float32_matches_float64():
    """The float32 path (float64 on the host) agrees with JAX's own float64 Cholesky, gradients
    included, also under vmap."""
    x = np.arange(-10.0, 11.0, 2.0)
    f_tilde = np.random.default_rng(0).normal(size=11)
    alpha, rho = np.array([2.9, 1.5]), np.array([5.7, 8.0])  # condition numbers up to 1e11

    def f_sum(x, f_tilde):
        return lambda a, r: (pdb._exp_quad_cholesky(x, a, r) @ f_tilde).sum()

    grad32 = jax.jit(jax.vmap(jax.value_and_grad(
        f_sum(jnp.asarray(x, jnp.float32), jnp.asarray(f_tilde, jnp.float32)), (0, 1))))
    got = grad32(jnp.asarray(alpha, jnp.float32), jnp.asarray(rho, jnp.float32))
    with jax.enable_x64(True):
        grad64 = jax.vmap(jax.value_and_grad(f_sum(jnp.asarray(x), jnp.asarray(f_tilde)), (0, 1)))
        want = grad64(jnp.asarray(alpha), jnp.asarray(rho))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4)


# ---------------------------------------------------------------------------- flatten_draws


def test_flatten_draws_names_and_order():
    out = pdb.flatten_draws({"tau": np.arange(3.0), "z": np.arange(18.0).reshape(3, 3, 2)})
    assert list(out) == ["tau", "z[1,1]", "z[2,1]", "z[3,1]", "z[1,2]", "z[2,2]", "z[3,2]"]
    np.testing.assert_array_equal(out["z[2,1]"], [2.0, 8.0, 14.0])
    chains = pdb.flatten_draws({"beta": np.zeros((2, 5, 3))}, batch_ndim=2)
    assert list(chains) == ["beta[1]", "beta[2]", "beta[3]"] and chains["beta[1]"].shape == (2, 5)
    with pytest.raises(ValueError, match="expected site 'beta' to have at least 2 draw axes"):
        pdb.flatten_draws({"beta": np.zeros(3)}, batch_ndim=2)


def test_sites_from_reference_inverts_flatten_draws(shared):
    post = pdb.get("hmm_example-hmm_example")
    ref = post.reference_draws()
    sites = post.sites_from_reference(ref)
    assert sites["mu"].shape == (10, 1000, 2)
    back = pdb.flatten_draws(sites, batch_ndim=2)
    for k in post.param_names:
        np.testing.assert_array_equal(back[k], ref[k])


# ---------------------------------------------------------------------------- _shared


def _make_tree(root, kind="posteriordb"):
    path = root / "shared" / "benchmarks" / kind
    path.mkdir(parents=True)
    return path


def test_env_var_pointing_to_empty_folder_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHBAYES_SHARED", str(tmp_path))
    with pytest.raises(SharedDataMissing, match="FLASHBAYES_SHARED") as info:
        shared_benchmarks_dir("posteriordb")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(SharedDataMissing):
        pdb.get("sblrc-blr").data  # noqa: B018


def test_env_var_is_used_first(tmp_path, monkeypatch):
    here = _make_tree(tmp_path / "near")
    there = _make_tree(tmp_path / "far", "sbibm")
    env = {"FLASHBAYES_SHARED": str(tmp_path / "far" / "shared")}
    assert _shared._find("sbibm", environ=env, starts=[here]) == there
    with pytest.raises(SharedDataMissing):  # set but wrong: no fallback to the search
        _shared._find("posteriordb", environ=env, starts=[here.parent])
    monkeypatch.setenv("FLASHBAYES_SHARED", str(tmp_path / "far" / "shared"))
    assert shared_benchmarks_dir("sbibm") == there


def test_search_walks_up_nearest_first_and_in_start_order(tmp_path):
    outer = _make_tree(tmp_path)
    inner = _make_tree(tmp_path / "a")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert _shared._find("posteriordb", environ={}, starts=[deep]) == inner
    assert _shared._find("posteriordb", environ={}, starts=[tmp_path / "x", deep]) == outer
    with pytest.raises(SharedDataMissing, match="FLASHBAYES_SHARED"):
        _shared._find("sbibm", environ={}, starts=[deep])


def test_search_starts_at_the_module_then_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    starts = _shared._search_starts()
    assert starts[0] == Path(_shared.__file__).resolve().parent
    assert starts[1] == tmp_path.resolve()
    monkeypatch.delenv("FLASHBAYES_SHARED", raising=False)
    monkeypatch.setattr(_shared, "_search_starts", lambda: [tmp_path])
    with pytest.raises(SharedDataMissing):
        shared_benchmarks_dir("posteriordb")
    _make_tree(tmp_path)
    want = tmp_path / "shared" / "benchmarks" / "posteriordb"
    assert shared_benchmarks_dir("posteriordb") == want


def test_unknown_kind():
    with pytest.raises(ValueError, match="expected kind to be one of"):
        shared_benchmarks_dir("nope")
