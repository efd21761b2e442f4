"""`flashbayes gp`: bands of a PFN checkpoint beside type-II ML and NUTS, real CLI invocations."""

import json

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import flashbayes as fb
from flashbayes.amortized._pfn import PFN, PFNConfig, pfn_loss, prior_borders
from flashbayes.cli import app


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("gp_pfn")
    task = fb.tasks.get_predictive("gp_hyperprior", n_max=12)
    borders = prior_borders(task, jax.random.key(0), 32, n_samples=4000)
    cfg = PFNConfig(x_dim=1, borders=tuple(borders), d_model=16, n_layers=1)
    header = {"kind": "pfn", "task": task.name, "task_params": fb.tasks.task_params(task),
              "model_config": cfg.to_dict()}
    tcfg = fb.TrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=4)
    fb.amortized.fit_network(PFN(cfg, key=jax.random.key(1)), pfn_loss,
                             lambda k, b: task.sample_batch(k, b, n_query=4), tcfg,
                             key=jax.random.key(2), out_dir=out, header=header)
    return out / "ckpt_00000004.safetensors"


def _data(tmp_path, x, y, name="points.csv"):
    path = tmp_path / name
    path.write_text("x,y\n" + "\n".join(f"{a},{b}" for a, b in zip(x, y)) + "\n")
    return path


def _run(*args):
    return CliRunner().invoke(app, ["gp", *map(str, args)])


def test_gp_bands_table_csv_and_plot(checkpoint, tmp_path):
    x = np.linspace(0.05, 0.95, 8)
    data = _data(tmp_path, x, np.sin(6 * x))
    res = _run(checkpoint, "--data", data, "--query", "0:1:21", "--plot", tmp_path / "gp.png",
               "--out", tmp_path / "bands.csv", "--nuts-warmup", "100", "--nuts-samples", "100")
    assert res.exit_code == 0, res.output
    for method in ("network", "type-II ML", "NUTS"):
        assert method in res.output
    assert (tmp_path / "gp.png").stat().st_size > 10_000
    bands = np.loadtxt(tmp_path / "bands.csv", delimiter=",", skiprows=1)
    assert bands.shape == (21, 1 + 3 * 3)
    lower, upper = bands[:, 2::3], bands[:, 3::3]
    assert np.all(lower < upper)  # every method's 5 % quantile below its 95 %
    # NUTS and type-II ML pass close to the data at a context input (noise sd about 0.1)
    row = np.argmin(np.abs(bands[:, 0] - x[3]))
    assert abs(bands[row, 4] - np.sin(6 * x[3])) < 0.5
    assert abs(bands[row, 7] - np.sin(6 * x[3])) < 0.5


def test_gp_maps_other_units_back(checkpoint, tmp_path):
    x = np.linspace(0.05, 0.95, 8)
    y = np.sin(6 * x)
    base = _run(checkpoint, "--data", _data(tmp_path, x, y), "--query", "0.05:0.95:5",
                "--no-nuts", "--json", "--standardize", "yes")
    assert base.exit_code == 0, base.output
    # the same data in years and in thousands: the answers are the same, in those units
    other = _run(checkpoint, "--data", _data(tmp_path, 1990 + 30 * x, 5000 + 1000 * y, "b.csv"),
                 "--query", "1991.5:2018.5:5", "--no-nuts", "--json")
    assert other.exit_code == 0, other.output
    a, b = json.loads(base.output), json.loads(other.output)
    for method in ("network", "type-II ML"):
        np.testing.assert_allclose(np.asarray(b[method]["mean"]),
                                   5000 + 1000 * np.asarray(a[method]["mean"]), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(b[method]["upper"]),
                                   5000 + 1000 * np.asarray(a[method]["upper"]), rtol=1e-4)


def test_gp_refuses_bad_input(checkpoint, tmp_path):
    good = _data(tmp_path, [0.1, 0.5], [0.0, 1.0])
    cases = [
        ((tmp_path / "missing.safetensors", "--data", good), "no such file"),
        ((checkpoint, "--data", _data(tmp_path, [0.1, np.nan], [0.0, 1.0], "nan.csv")),
         "finite"),
        ((checkpoint, "--data", good, "--query", "0:1:x"), "START:STOP:K"),
        ((checkpoint, "--data", good, "--standardize", "maybe"), "auto, yes or no"),
    ]
    for args, message in cases:
        res = _run(*args, "--no-nuts", "--no-type2-ml")
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    # more context points than the network was trained on: it says so, the references answer
    many = _data(tmp_path, np.linspace(0, 1, 20), np.zeros(20), "many.csv")
    res = _run(checkpoint, "--data", many, "--no-nuts", "--query", "0:1:3")
    assert res.exit_code == 0 and "trained on 1..12 context points; got 20" in res.output
    assert "type-II ML" in res.output


def test_gp_takes_the_shipped_model_by_name(tmp_path):
    x = np.linspace(0.05, 0.95, 8)
    data = _data(tmp_path, x, np.sin(6 * x))
    res = _run("gp_hyperprior_pfn", "--data", data, "--query", "0.1:0.9:5", "--no-nuts",
               "--no-type2-ml", "--json")
    assert res.exit_code == 0, res.output
    band = json.loads(res.output)["network"]
    # the trained network follows the data: at x = 0.1 (context points at 0.05 and 0.18) its
    # mean is near sin(0.6) and its band holds it
    assert abs(band["mean"][0] - np.sin(0.6)) < 0.3 and band["lower"][0] < np.sin(0.6) < \
        band["upper"][0]
    res = _run("gmm_linear", "--data", data, "--no-nuts", "--no-type2-ml")
    assert res.exit_code == 2 and "Distribution Transformer" in res.output, res.output


@pytest.mark.slow  # two training processes; the default tier is kept under 15 minutes
@pytest.mark.parametrize("head", ["bar", "gmm"])
def test_train_gp_script_with_the_expected_loss(tmp_path, head):
    """`benchmarks/train_gp.py --loss expected` (how the shipped PFN was made), run as a
    process: the checkpoint records the objective, loads as a predictor that answers, and
    the trained network is better than the untrained one on fresh data sets."""
    import subprocess
    import sys
    from pathlib import Path

    from flashbayes.amortized._pfn import load_predictor

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_gp.py"
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(script), "--out", str(out), "--steps", "40",
                          "--batch-size", "8", "--n-query", "8", "--lr", "3e-3", "--warmup", "5",
                          "--buckets", "32", "--d-model", "16", "--layers", "1", "--heads", "2",
                          "--head", head, "--components", "3", "--loss", "expected",
                          "--checkpoint-every", "40"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    model = load_predictor(out)
    assert model.meta["objective"] == "expected" and model.meta["step"] == 40
    pred = model.predictive([[0.1], [0.5]], [0.3, -0.2], [[0.2], [0.9]])
    assert np.all(np.isfinite(np.asarray(pred.log_prob(np.zeros(2)))))
    # on fresh data sets the trained network beats the untrained one (whose zero head gives
    # the prior predictive)
    from flashbayes.amortized._pfn import PFN, pfn_expected_loss

    batch = model.task.sample_batch_exact(jax.random.key(99), 64, n_query=8)
    untrained = PFN(model.network.config, key=jax.random.key(0))
    assert (float(pfn_expected_loss(model.network, batch))
            < float(pfn_expected_loss(untrained, batch)) - 0.02)
