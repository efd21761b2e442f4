"""flashbayes.sbi.simulate: the same simulations whatever runs them, bad output kept out, files
that survive crashes, and a Dask cluster that loses a worker mid-run."""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import flashbayes as fb
from flashbayes import sbi

TESTS = Path(__file__).resolve().parent
PRIOR = dist.Normal(jnp.zeros(3), 1.0).to_event(1)
CALLS: collections.Counter = collections.Counter()  # simulations run in this process, by name


# -- simulators (module level, so worker processes can import them) -------------------------------
def noisy(theta, rng):
    CALLS["noisy"] += 1
    return np.stack([theta[:2] * 2.0 + rng.normal(size=2), rng.gamma(2.0, size=2)])


def legacy(theta):
    """One argument: draws from NumPy's global state and from `random`."""
    return theta + np.random.normal(size=theta.shape) + random.random()


def flaky(theta, rng):
    u = rng.uniform()
    if u < 0.1:
        raise RuntimeError("simulator blew up")
    if u < 0.2:
        return np.array([np.nan, 1.0])
    if u < 0.25:
        return np.array([np.inf, 1.0])
    if u < 0.3:
        return np.zeros(3)
    if u < 0.35:
        return "not numbers"
    return theta[:2] + rng.normal(size=2)


def sleepy(theta, rng, delay=0.0):
    CALLS["sleepy"] += 1
    if delay:
        time.sleep(delay)
    return theta * rng.normal(size=theta.shape)


def dies_once(theta, rng, marker=""):
    """Kills its worker process the first time it runs (when the marker file is absent)."""
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return theta + rng.normal(size=theta.shape)


def always_dies(theta, rng):
    if theta[0] > 0:
        os._exit(1)
    return theta


def jax_model(key, theta):
    k1, k2 = jax.random.split(key)
    return jnp.stack([theta + jax.random.normal(k1, theta.shape),
                      jnp.exp(theta) * jax.random.uniform(k2, theta.shape)])


def jax_nan_model(key, theta):
    x = theta + jax.random.normal(key, theta.shape)
    return jnp.where(theta[0] > 1.0, jnp.nan, x)


def _same(a: sbi.Simulations, b: sbi.Simulations) -> None:
    assert a.theta.dtype == b.theta.dtype and a.x.dtype == b.x.dtype
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.status, b.status)


# -- equality across backends and chunkings -------------------------------------------------------
def test_python_simulator_same_across_backends_and_chunks():
    ref = sbi.simulate(PRIOR, noisy, 60, seed=5, workers=1)
    assert ref.theta.shape == (60, 3) and ref.x.shape == (60, 2, 2) and ref.num_ok == 60
    theta_ref = PRIOR.sample(jax.random.split(jax.random.key(5))[0], (60,))
    np.testing.assert_array_equal(ref.theta, np.asarray(theta_ref))
    # simulation i sees default_rng([seed, i]), whoever runs it
    i = 17
    want = noisy(ref.theta[i].astype(np.float64), np.random.default_rng([5, i]))
    np.testing.assert_array_equal(ref.x[i], want)
    _same(ref, sbi.simulate(PRIOR, noisy, 60, seed=5, workers=1, chunk_size=7))
    _same(ref, sbi.simulate(PRIOR, noisy, 60, seed=5, workers=2, chunk_size=13))
    other = sbi.simulate(PRIOR, noisy, 60, seed=6, workers=1)
    assert not np.array_equal(other.x, ref.x)


def test_one_argument_simulator_seeded_per_call_and_caller_state_restored():
    np.random.seed(123)
    random.seed(123)
    before = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    a = sbi.simulate(PRIOR, legacy, 30, seed=1, workers=1, chunk_size=4)
    assert (np.random.random(), random.random()) == before  # the caller's streams are untouched
    b = sbi.simulate(PRIOR, legacy, 30, seed=1, workers=1, chunk_size=30)
    _same(a, b)
    assert len(np.unique(a.x[:, 0])) == 30


def test_jax_simulator_independent_of_chunking():
    ref = sbi.simulate(PRIOR, jax_model, 50, seed=2)  # "auto": first parameter named key
    assert ref.meta["kind"] == "jax" and ref.x.shape == (50, 2, 3) and ref.x.dtype == np.float32
    for chunk in (7, 16, 50):
        _same(ref, sbi.simulate(PRIOR, jax_model, 50, seed=2, chunk_size=chunk, backend="jax"))
    key_theta, key_sim = jax.random.split(jax.random.key(2))
    i = 33
    want = jax_model(jax.random.fold_in(key_sim, i), jnp.asarray(ref.theta[i]))
    np.testing.assert_allclose(ref.x[i], np.asarray(want), rtol=1e-6, atol=1e-6)


def test_gmm_prior():
    prior = fb.GMM(weights=[0.5, 0.5], means=[[-2.0, 0.0], [2.0, 0.0]],
                   scale_tril=np.stack([np.eye(2), np.eye(2)]))
    sims = sbi.simulate(prior, noisy, 20, seed=0, workers=1)
    np.testing.assert_array_equal(
        sims.theta, np.asarray(prior.sample(jax.random.split(jax.random.key(0))[0], 20)))


# -- bad output -----------------------------------------------------------------------------------
def test_bad_output_counted_reported_and_excluded(tmp_path):
    sims = sbi.simulate(PRIOR, flaky, 200, seed=0, workers=1, chunk_size=16,
                        out=tmp_path / "s.npz")
    f = sims.failures
    u = np.array([np.random.default_rng([0, i]).uniform() for i in range(200)])
    assert f == {"exception": int(np.sum(u < 0.1)),
                 "nonfinite": int(np.sum((u >= 0.1) & (u < 0.25))),
                 "shape": int(np.sum((u >= 0.25) & (u < 0.35)))}
    assert min(f.values()) > 0 and sims.num_ok == 200 - sum(f.values())
    np.testing.assert_array_equal(sims.ok, u >= 0.35)
    assert np.all(np.isnan(sims.x[~sims.ok])) and np.all(np.isfinite(sims.x[sims.ok]))
    theta, x = sims.valid()
    assert theta.shape == (sims.num_ok, 3) and x.shape == (sims.num_ok, 2)
    kinds = {e[1] for e in sims.errors}
    assert kinds <= {"exception", "nonfinite", "shape"} and len(sims.errors) == 10
    assert any("simulator blew up" in e[2] for e in sims.errors if e[1] == "exception")
    back = sbi.load_simulations(tmp_path / "s.npz")
    assert back.failures == f and back.errors == sims.errors
    assert "failed: exception=" in repr(sims)


def test_jax_nonfinite_output_counted():
    sims = sbi.simulate(PRIOR, jax_nan_model, 100, seed=0, chunk_size=32)
    expected = sims.theta[:, 0] > 1.0
    assert sims.failures == {"exception": 0, "nonfinite": int(expected.sum()), "shape": 0}
    np.testing.assert_array_equal(sims.ok, ~expected)


def test_output_shape_learned_from_first_simulation_that_returns_numbers():
    sims = sbi.simulate(PRIOR, flaky, 40, seed=0, workers=1)
    assert sims.x.shape == (40, 2)
    with pytest.raises(ValueError, match="could not learn the output shape"):
        sbi.simulate(PRIOR, lambda th, rng: 1 / 0, 5, seed=0, workers=1)
    sims = sbi.simulate(PRIOR, lambda th, rng: 1 / 0, 5, seed=0, workers=1, x_shape=(2,))
    assert sims.failures["exception"] == 5


# -- the file: resume, refusal, validation --------------------------------------------------------
class Stop(KeyboardInterrupt):
    pass


def test_resume_after_interrupt_continues_and_matches(tmp_path):
    out = tmp_path / "sims.npz"
    ref = sbi.simulate(PRIOR, noisy, 50, seed=9, workers=1, chunk_size=5)
    events: list[sbi.SimulationEvent] = []

    def stop_after_three(ev):
        events.append(ev)
        if ev.done >= 15:
            raise Stop

    with pytest.raises(Stop):
        sbi.simulate(PRIOR, noisy, 50, seed=9, workers=1, chunk_size=5, out=out,
                     progress=stop_after_three)
    parts = out.with_name("sims.npz.parts")
    assert not out.exists()
    assert sorted(p.name for p in parts.glob("chunk-*.npz")) == [
        "chunk-000000.npz", "chunk-000001.npz", "chunk-000002.npz"]
    assert json.loads((parts / "manifest.json").read_text())["seed"] == 9
    CALLS.clear()
    events.clear()
    sims = sbi.simulate(PRIOR, noisy, 50, seed=9, workers=1, chunk_size=5, out=out,
                        progress=events.append)
    assert CALLS["noisy"] == 35  # only the missing chunks ran
    assert events[0] == sbi.SimulationEvent(done=15, total=50, failed=0, resumed=15)
    assert events[-1].done == 50
    _same(ref, sims)
    _same(ref, sbi.load_simulations(out))
    assert not parts.exists()
    CALLS.clear()
    _same(ref, sbi.simulate(PRIOR, noisy, 50, seed=9, workers=1, chunk_size=5, out=out))
    assert CALLS["noisy"] == 0  # a finished file is loaded, not recomputed


def test_interrupt_inside_a_chunk_loses_only_that_chunk(tmp_path):
    out = tmp_path / "sims.npz"
    state = {"n": 0}

    def stops_on_23rd(theta, rng):
        state["n"] += 1
        if state["n"] == 23:
            raise KeyboardInterrupt
        return theta + rng.normal(size=3)

    with pytest.raises(KeyboardInterrupt):
        sbi.simulate(PRIOR, stops_on_23rd, 40, seed=0, workers=1, chunk_size=10, out=out,
                     x_shape=(3,))
    assert len(list(out.with_name("sims.npz.parts").glob("chunk-*.npz"))) == 2
    sims = sbi.simulate(PRIOR, stops_on_23rd, 40, seed=0, workers=1, chunk_size=10, out=out)
    assert state["n"] == 23 + 20
    state["n"] = 1000
    _same(sims, sbi.simulate(PRIOR, stops_on_23rd, 40, seed=0, workers=1, chunk_size=10))


_KILLED_RUN = """
import functools, sys
sys.path.insert(0, {tests!r})
import numpy as np
from test_sbi_simulate import PRIOR, sleepy
from flashbayes import sbi

def report(ev):
    print(ev.done, flush=True)

sbi.simulate(PRIOR, functools.partial(sleepy, delay=0.02), 400, seed=4, workers=1,
             chunk_size=10, out={out!r}, progress=report)
"""


def test_resume_after_sigkill_of_the_process(tmp_path):
    out = tmp_path / "sims.npz"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_KILLED_RUN.format(tests=str(TESTS), out=str(out))))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    reported = 0
    try:
        for line in proc.stdout:
            reported = int(line)
            if reported >= 50:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    on_disk = len(list(out.with_name("sims.npz.parts").glob("chunk-*.npz"))) * 10
    assert 50 <= reported <= on_disk < 400  # every reported chunk was on disk
    CALLS.clear()
    sims = sbi.simulate(PRIOR, functools.partial(sleepy, delay=0.0), 400, seed=4, workers=1,
                        chunk_size=10, out=out)
    assert CALLS["sleepy"] == 400 - on_disk
    _same(sims, sbi.simulate(PRIOR, sleepy, 400, seed=4, workers=1, chunk_size=10))


def test_rerun_with_other_arguments_refused(tmp_path):
    out = tmp_path / "sims.npz"
    with pytest.raises(KeyboardInterrupt):
        sbi.simulate(PRIOR, noisy, 30, seed=1, workers=1, chunk_size=5, out=out,
                     progress=lambda ev: (_ for _ in ()).throw(KeyboardInterrupt))
    assert out.with_name("sims.npz.parts").is_dir()
    for kwargs, what in [({"seed": 2}, "seed"), ({"n": 31}, "num_simulations"),
                         ({"chunk_size": 6}, "chunk_size"), ({"sim": sleepy}, "simulator name"),
                         ({"prior": dist.Normal(jnp.ones(3), 1.0).to_event(1)}, "another prior"),
                         ({"x_shape": (3,)}, "x_shape")]:
        args = {"seed": 1, "n": 30, "chunk_size": 5, "sim": noisy, "prior": PRIOR} | kwargs
        with pytest.raises(ValueError, match=what):
            sbi.simulate(args["prior"], args["sim"], args["n"], seed=args["seed"], workers=1,
                         chunk_size=args["chunk_size"], out=out, x_shape=kwargs.get("x_shape"))
    sims = sbi.simulate(PRIOR, noisy, 30, seed=1, workers=1, chunk_size=5, out=out)
    with pytest.raises(ValueError, match="holds simulations of another run.*seed"):
        sbi.simulate(PRIOR, noisy, 30, seed=3, workers=1, chunk_size=5, out=out)
    _same(sims, sbi.load_simulations(out))


def test_malformed_files_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        sbi.load_simulations(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="expected a flashbayes simulation file"):
        sbi.load_simulations(junk)
    sims = sbi.simulate(PRIOR, flaky, 40, seed=0, workers=1)
    good = sims.save(tmp_path / "good.npz")
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}

    def broken(name, **change):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{k: v for k, v in (arrays | change).items() if v is not None})
        return path

    meta = json.loads(str(arrays["meta"]))
    cases = {
        "no_x": ({"x": None}, "without x"),
        "short_theta": ({"theta": arrays["theta"][:-1]}, "theta of shape"),
        "ok_flipped": ({"ok": ~arrays["ok"]}, "ok mask that disagrees"),
        "nan_ok": ({"x": np.full_like(arrays["x"], np.nan)}, "NaN or inf in simulations marked"),
        "bad_meta": ({"meta": np.array("{not json")}, "not JSON"),
        "other_format": ({"meta": np.array(json.dumps(meta | {"format": "x"}))}, "format 'x'"),
        "counts": ({"meta": np.array(json.dumps(meta | {"failures": {}}))}, "failure counts"),
        "seed": ({"seed": np.int64(7)}, "seed 7"),
        "pickled": ({"x": np.array([object()], dtype=object)}, "unreadable arrays"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            sbi.load_simulations(broken(name, **change))
    # the same checks guard a rerun that finds a broken file at its out path
    with pytest.raises(ValueError, match="ok mask"):
        sbi.simulate(PRIOR, flaky, 40, seed=0, workers=1, out=tmp_path / "ok_flipped.npz")


def test_arguments_validated():
    cases = [
        (dict(num_simulations=0), ValueError, "num_simulations: expected an integer in"),
        (dict(num_simulations=2.5), TypeError, "num_simulations: expected an integer"),
        (dict(seed=-1), ValueError, "seed: expected an integer in"),
        (dict(seed=None), TypeError, "seed: expected an integer; got NoneType"),
        (dict(backend="threads"), ValueError, "backend: expected one of"),
        (dict(out="sims.txt"), ValueError, "expected a path ending in .npz"),
        (dict(prior=np.zeros(3)), TypeError, "prior: expected a NumPyro distribution"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(workers=0), ValueError, "workers"),
        (dict(retries=-1), ValueError, "retries"),
        (dict(scheduler="tcp://127.0.0.1:1", backend="processes"), ValueError, "scheduler"),
        (dict(scheduler=object(), backend="dask"), TypeError, "scheduler: expected an address"),
        (dict(simulator=lambda a, b, c: a), TypeError, r"simulator: expected a Python function"),
        (dict(simulator=lambda th, rng: th, workers=2), TypeError, "expected a picklable"),
        (dict(simulator=jax_model, x_shape=(3,)), ValueError, r"x_shape: expected .*\(2, 3\)"),
        (dict(simulator=noisy, backend="jax"), TypeError, "expected a JAX function"),
        (dict(progress=3), TypeError, "progress"),
    ]
    for change, exc, message in cases:
        args = {"prior": PRIOR, "simulator": noisy, "num_simulations": 10, "seed": 0} | change
        prior, simulator, n = args.pop("prior"), args.pop("simulator"), args.pop("num_simulations")
        with pytest.raises(exc, match=message):
            sbi.simulate(prior, simulator, n, **args)


# -- worker processes: a dying process costs a retry, not the run ---------------------------------
def test_processes_retry_a_chunk_whose_process_died(tmp_path):
    sim = functools.partial(dies_once, marker=str(tmp_path / "died"))
    ref = sbi.simulate(PRIOR, functools.partial(dies_once, marker=""), 24, seed=0, workers=1,
                       chunk_size=4)
    sims = sbi.simulate(PRIOR, sim, 24, seed=0, workers=2, chunk_size=4, x_shape=(3,))
    assert (tmp_path / "died").exists()
    _same(ref, sims)


def test_processes_give_up_after_retries_and_keep_finished_chunks(tmp_path):
    out = tmp_path / "sims.npz"
    with pytest.raises(sbi.ChunkFailed, match="failed on 2 attempt"):
        sbi.simulate(PRIOR, always_dies, 40, seed=0, workers=2, chunk_size=1, retries=1,
                     out=out, x_shape=(3,))
    assert not out.exists() and out.with_name("sims.npz.parts").is_dir()


# -- Dask -----------------------------------------------------------------------------------------
def test_missing_dask_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[distributed\]"'):
        sbi.simulate(PRIOR, noisy, 10, seed=0, backend="dask")


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as client:
            yield client


def test_dask_same_as_one_process(dask_client, tmp_path):
    ref = sbi.simulate(PRIOR, noisy, 60, seed=5, workers=1)
    sims = sbi.simulate(PRIOR, noisy, 60, seed=5, scheduler=dask_client, chunk_size=7)
    _same(ref, sims)
    # an address, as for a real cluster; the one-argument form and bad output too
    address = dask_client.scheduler.address
    out = tmp_path / "flaky.npz"
    _same(sbi.simulate(PRIOR, flaky, 50, seed=1, workers=1),
          sbi.simulate(PRIOR, flaky, 50, seed=1, scheduler=address, chunk_size=6, out=out))
    _same(sbi.simulate(PRIOR, legacy, 20, seed=1, workers=1),
          sbi.simulate(PRIOR, legacy, 20, seed=1, backend="dask", scheduler=address))
    assert sbi.load_simulations(out).failures == sbi.simulate(PRIOR, flaky, 50, seed=1,
                                                             workers=1).failures


def test_dask_worker_killed_mid_run_gives_the_one_process_result(dask_client, tmp_path):
    """A real local cluster of 2 worker processes; one is SIGKILLed while chunks are running."""
    n, chunk = 240, 4  # 60 chunks of 4 x 25 ms: about 3 s on 2 workers
    ref = sbi.simulate(PRIOR, functools.partial(sleepy, delay=0.0), n, seed=11, workers=1,
                       chunk_size=chunk)
    pids = dask_client.run(os.getpid)
    assert len(pids) == 2
    victim = sorted(pids.values())[0]
    killed_at = []

    def kill_one(ev):
        if not killed_at and ev.done >= 40:
            os.kill(victim, signal.SIGKILL)
            killed_at.append(ev.done)

    out = tmp_path / "sims.npz"
    sims = sbi.simulate(PRIOR, functools.partial(sleepy, delay=0.025), n, seed=11,
                        scheduler=dask_client, chunk_size=chunk, retries=3, out=out,
                        progress=kill_one)
    assert killed_at and killed_at[0] < n / 2  # killed with most of the budget still to run
    _same(ref, sims)
    _same(ref, sbi.load_simulations(out))
    dask_client.wait_for_workers(2, timeout=60)  # the nanny restarts it
    assert victim not in dask_client.run(os.getpid).values()


@pytest.mark.slow
def test_dask_starts_and_closes_its_own_local_cluster():
    ref = sbi.simulate(PRIOR, noisy, 30, seed=2, workers=1)
    _same(ref, sbi.simulate(PRIOR, noisy, 30, seed=2, backend="dask", workers=2, chunk_size=4))
