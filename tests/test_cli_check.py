"""`flashbayes check`: exit 0 for a calibrated model, 1 for a miscalibrated one, 2 for bad input;
the table, the two plots and the JSON report."""

import json

import pytest
from typer.testing import CliRunner

import flashbayes as fb
from flashbayes import cli
from flashbayes.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def exact():
    return fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))


@pytest.mark.slow  # the default tier is kept under 15 minutes
def test_check_checkpoint_file_writes_report(tmp_path, tiny_model_path):
    # a barely trained model: its posterior is close to the prior, which SBC cannot tell from
    # calibrated; the test is about the command, so either verdict is accepted
    out = tmp_path / "report"
    res = _run("check", tiny_model_path, "--sims", 100, "--out", out, "--seed", 3)
    assert res.exit_code in (0, 1), res.output
    _check_report(res, out, calibrated=res.exit_code == 0)


@pytest.mark.slow
def test_check_shipped_model_is_calibrated(tmp_path):
    res = _run("check", "gmm_linear", "--sims", 1000, "--out", tmp_path, "--seed", 3)
    assert res.exit_code == 0, res.output
    _check_report(res, tmp_path, calibrated=True, n_sims=1000)


def _check_report(res, out, *, calibrated, n_sims=100):
    assert "SBC rank" in res.output and "TARP" in res.output and "calibrated" in res.output
    assert (out / "sbc_ranks.png").stat().st_size > 1000
    assert (out / "coverage.png").stat().st_size > 1000
    report = json.loads((out / "check.json").read_text())
    assert report["task"] == "gmm_linear" and report["n_sims"] == n_sims and report["seed"] == 3
    assert report["calibrated"] is calibrated
    assert report["sbc"]["statistics"] == ["theta[0]", "theta[1]", "log q"]
    assert len(report["sbc"]["p_values"]) == 3 and report["sbc"]["n_bins"] == 20
    assert sum(report["sbc"]["counts"]["log q"]) == n_sims
    assert len(report["coverage"]["ecp"]) == len(report["coverage"]["alphas"]) == 101
    assert 0 < report["tarp"]["bound"] < 1


@pytest.mark.parametrize(("factor", "code"), [(1.0, 0), (0.5, 1)])
def test_check_exit_code_follows_calibration(tmp_path, monkeypatch, exact, factor, code):
    # the command on an exact posterior (calibrated) and on one with half its covariance
    model = exact if factor == 1.0 else fb.diagnostics.scale_covariance(exact, factor)
    monkeypatch.setattr(cli, "_load_model", lambda checkpoint, task=None: model)
    res = _run("check", "anything", "--sims", 300, "--out", tmp_path)
    assert res.exit_code == code, res.output
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["calibrated"] is (code == 0)
    assert ("not calibrated" in res.output) is (code == 1)
    if code == 1:
        assert "FAIL" in res.output and report["coverage"]["signed_area"] < 0


def test_check_bad_input(tmp_path):
    res = _run("check", "gmm_linear", "--sims", 10, "--out", tmp_path)
    assert res.exit_code == 2 and "--sims" in res.output
    res = _run("check", tmp_path / "missing.safetensors", "--out", tmp_path)
    assert res.exit_code == 2 and "no such file" in res.output
    res = _run("check", "gmm_linear", "--out", tmp_path / "no" / "such" / "dir")
    assert res.exit_code == 2 and "existing folder" in res.output
    (tmp_path / "afile").write_text("x")
    res = _run("check", "gmm_linear", "--sims", 100, "--out", tmp_path / "afile")
    assert res.exit_code == 2
