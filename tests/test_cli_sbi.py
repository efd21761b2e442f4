"""`flashbayes sbi simulate | train | sample` with tiny budgets, and each kind of bad input."""

import numpy as np
import pytest
from typer.testing import CliRunner

from flashbayes.cli import app
from flashbayes.sbi import load_npe, load_simulations

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("npe")
    res = runner.invoke(app, ["sbi", "train", "gaussian_mixture", "--simulations", "300",
                              "--out", str(out), "--head", "gmm", "--ensemble", "2",
                              "--max-epochs", "3"])
    assert res.exit_code == 0, res.output
    return out


def test_simulate_writes_a_simulation_file(tmp_path):
    out = tmp_path / "sims.npz"
    res = runner.invoke(app, ["sbi", "simulate", "slcp", "--n", "50", "--out", str(out)])
    assert res.exit_code == 0, res.output
    sims = load_simulations(out)
    assert sims.theta.shape == (50, 5) and sims.x.shape == (50, 8) and sims.num_ok == 50


def test_train_from_a_simulation_file(tmp_path):
    sims = tmp_path / "sims.npz"
    assert runner.invoke(app, ["sbi", "simulate", "gaussian_mixture", "--n", "200", "--out",
                               str(sims)]).exit_code == 0
    out = tmp_path / "est"
    res = runner.invoke(app, ["sbi", "train", "gaussian_mixture", "--simulations", "150",
                              "--sims-file", str(sims), "--out", str(out), "--head", "gmm",
                              "--ensemble", "1", "--max-epochs", "2", "--interval-map", "logit"])
    assert res.exit_code == 0, res.output
    est = load_npe(out)
    assert est.config["num_simulations"] == 150 and "map" not in est.support  # the logit


def test_train_then_sample_writes_named_columns(trained, tmp_path):
    assert load_npe(trained).parameter_names == ["parameter_1", "parameter_2"]
    assert load_npe(trained).support["map"] == "flat"  # the default on a box prior
    obs = tmp_path / "obs.csv"
    obs.write_text("data_1,data_2\n-9.47,-1.49\n")
    out = tmp_path / "samples.csv"
    res = runner.invoke(app, ["sbi", "sample", str(trained), "--observation", str(obs), "--n",
                              "10000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = out.read_text().splitlines()
    assert lines[0] == "parameter_1,parameter_2" and len(lines) == 10_001
    draws = np.loadtxt(out, delimiter=",", skiprows=1)
    assert draws.shape == (10_000, 2) and np.all(np.abs(draws) < 10)
    # an observation without a header gives the same draws
    bare = tmp_path / "bare.csv"
    bare.write_text("-9.47,-1.49\n")
    out2 = tmp_path / "samples2.csv"
    assert runner.invoke(app, ["sbi", "sample", str(trained), "--observation", str(bare),
                               "--n", "10000", "--out", str(out2)]).exit_code == 0
    assert out2.read_text() == out.read_text()


@pytest.mark.parametrize("args, message", [
    (["sbi", "simulate", "two_moons", "--n", "5", "--out", "x.npz"], "expected one of"),
    (["sbi", "simulate", "slcp", "--n", "0", "--out", "x.npz"], "--n: expected a positive"),
    (["sbi", "train", "slcp", "--simulations", "100", "--out", "d", "--head", "flow"],
     "head: expected one of"),
    (["sbi", "train", "slcp", "--simulations", "100", "--out", "d", "--interval-map", "tanh"],
     "interval_map: expected one of"),
    (["sbi", "train", "slcp", "--simulations", "100", "--out", "d", "--sims-file", "none.npz"],
     "--sims-file: expected"),
    (["sbi", "sample", "no_such_dir", "--observation", "o.csv", "--out", "s.csv"],
     "no such path"),
])
def test_bad_arguments_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


@pytest.mark.parametrize("text, message", [
    ("data_1,data_2\n1.0\n", "expected 2 values; got 1"),
    ("data_1,data_2\n1.0,2.0\n3.0,4.0\n", "expected one row"),
    ("data_1,data_2\n1.0,nan\n", "expected finite values"),
    ("data_1,data_2\n1.0,abc\n", "expected numbers"),
])
def test_bad_observation_exit_2(trained, tmp_path, text, message):
    obs = tmp_path / "obs.csv"
    obs.write_text(text)
    res = runner.invoke(app, ["sbi", "sample", str(trained), "--observation", str(obs), "--out",
                              str(tmp_path / "s.csv")])
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())
    assert not (tmp_path / "s.csv").exists()


def test_prior_option_is_refused_for_an_npe_estimator(trained, tmp_path):
    """An NPE estimator keeps its training prior: `--prior` names the routes that do swap."""
    import flashbayes as fb

    obs = tmp_path / "obs.csv"
    obs.write_text("-9.47,-1.49\n")
    prior = tmp_path / "prior.json"
    prior.write_text(fb.GMM(weights=[1.0], means=[[0.0, 0.0]], scale_tril=[np.eye(2)]).to_json())
    res = runner.invoke(app, ["sbi", "sample", str(trained), "--observation", str(obs),
                              "--prior", str(prior), "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "fb.sbi.prior_swap" in text and "flashbayes train sbi_TASK" in text
    assert not (tmp_path / "s.csv").exists()
