"""Data-parallel training gives the answers of one device: 4 simulated CPU devices in one
process, and 2 real processes joined by jax.distributed over localhost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import flashbayes as fb
from flashbayes.amortized import (
    DistributedError,
    data_mesh,
    fit_network,
    initialize_distributed,
)
from flashbayes.amortized._checkpoint import read_header
from flashbayes.cli import app

HERE = Path(__file__).parent
# float32 Adam: the reduction order differs between device counts, and where a gradient entry is
# near zero that moves m / sqrt(v), so a single weight may differ by ~1e-4 after a few steps.
# Weights are therefore compared as one vector: |p - p_ref| / |p_ref| (Euclidean norms).
PARAM_TOL = 1e-4
LOSS_TOL = 1e-5


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(OPENBLAS_NUM_THREADS="1", JAX_PLATFORMS="cpu", **extra)
    return env


def _weights_agree(p, r) -> bool:
    p, r = np.asarray(p), np.asarray(r)
    return bool(np.linalg.norm(p - r) <= PARAM_TOL * np.linalg.norm(r))


def _agrees(run: dict, ref: dict) -> bool:
    n = len(run["loss"])
    loss_ok = np.allclose(run["loss"], ref["loss"][-n:], rtol=LOSS_TOL, atol=0)
    return bool(loss_ok and _weights_agree(run["params"], ref["params"]))


@pytest.fixture(scope="module")
def four_devices() -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "_parallel_worker.py"), "4"], capture_output=True,
        text=True, timeout=600,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_four_simulated_devices_equal_one(four_devices):
    assert four_devices["n_devices"] == 4
    ref = four_devices["1"]
    assert len(ref["loss"]) == 4
    for n in ("2", "4"):
        assert _agrees(four_devices[n], ref), n


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_resume_on_another_device_count_equals_uninterrupted(four_devices):
    assert four_devices["resumed_from"] == "ckpt_00000002.safetensors"
    assert len(four_devices["resumed"]["loss"]) == 2  # steps 3 and 4 only
    assert _agrees(four_devices["resumed"], four_devices["1"])


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_the_equality_check_fails_when_devices_draw_the_same_slice(four_devices):
    bad, ref = four_devices["duplicated_slices"], four_devices["1"]
    assert not _agrees(bad, ref)
    assert not _weights_agree(bad["params"], ref["params"])  # the weights alone show it too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLI_ARGS = ["train", "gmm_linear", "--steps", "4", "--batch-size", "16", "--d-model", "16",
            "--n-layers", "1", "--checkpoint-every", "2", "--seed", "5"]


def _two_processes(out: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "flashbayes", *CLI_ARGS, "--out", str(out), *extra,
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for i in range(2)]
    done = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


def _flat(model) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(eqx.filter(model.network, eqx.is_array))
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    result = CliRunner().invoke(app, [*CLI_ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _check_same(run: Path, ref: Path) -> None:
    a, b = fb.load(run / "model.safetensors"), fb.load(ref / "model.safetensors")
    assert _weights_agree(_flat(a), _flat(b))
    for name in ("ckpt_00000002.safetensors", "ckpt_00000004.safetensors"):
        ha, hb = read_header(run / name), read_header(ref / name)
        assert np.isclose(ha["loss"], hb["loss"], rtol=LOSS_TOL, atol=0), name
    assert read_header(run / "ckpt_00000004.safetensors")["processes"] == 2


@pytest.mark.slow  # about 30 s: the default tier is kept under 15 minutes
def test_two_processes_over_localhost_equal_one_device(tmp_path, one_device):
    done = _two_processes(tmp_path)
    _check_same(tmp_path, one_device)
    # process 0 alone writes: the files are its, and process 1 says nothing of a model
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt_00000002.safetensors", "ckpt_00000004.safetensors", "model.safetensors"]
    assert "model written" in done[0].stdout and "model written" not in done[1].stdout


@pytest.mark.slow
def test_two_processes_resume_from_the_shared_checkpoint(tmp_path, one_device):
    _two_processes(tmp_path)
    for name in ("ckpt_00000004.safetensors", "model.safetensors"):
        (tmp_path / name).unlink()
    _two_processes(tmp_path, "--resume")
    _check_same(tmp_path, one_device)
    # and the check fails when the two runs are not the same: another seed
    other = tmp_path / "other"
    result = CliRunner().invoke(app, [*CLI_ARGS[:-1], "6", "--out", str(other)])
    assert result.exit_code == 0, result.output
    with pytest.raises(AssertionError):
        _check_same(other, one_device)


def test_bad_distributed_settings_are_refused(monkeypatch):
    for var in ("FLASHBAYES_COORDINATOR", "FLASHBAYES_NUM_PROCESSES", "FLASHBAYES_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedError, match="expected all of"):
        initialize_distributed("127.0.0.1:1234")
    with pytest.raises(DistributedError, match="HOST:PORT"):
        initialize_distributed("nohost", 2, 0)
    with pytest.raises(DistributedError, match="process_id: expected 0..1; got 2"):
        initialize_distributed("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv("FLASHBAYES_NUM_PROCESSES", "two")
    with pytest.raises(DistributedError, match="expected an integer; got 'two'"):
        initialize_distributed()
    monkeypatch.delenv("FLASHBAYES_NUM_PROCESSES")
    assert initialize_distributed().num_processes == 1


def test_more_devices_than_present_and_uneven_batches_are_refused():
    n = len(jax.devices())
    with pytest.raises(DistributedError, match=f"at most the {n} device"):
        data_mesh(n + 1)
    with pytest.raises(ValueError, match="positive integer"):
        data_mesh(0)
    net = eqx.nn.Linear(1, 1, key=jax.random.key(0))
    cfg = fb.TrainConfig(steps=1, batch_size=3)
    with pytest.raises(ValueError, match="batch_size: expected a multiple"):
        fit_network(net, lambda n, b: 0.0, lambda k, b: None, cfg, key=jax.random.key(0),
                    devices=[jax.devices()[0]] * 2)


def test_cli_refuses_half_given_process_settings(tmp_path):
    result = CliRunner().invoke(app, [*CLI_ARGS, "--out", str(tmp_path), "--num-processes",
                                      "2"])
    assert result.exit_code == 2
    assert "expected all of coordinator" in result.output
