"""Every CLI command run with tiny arguments, and each kind of bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from flashbayes.cli import app

runner = CliRunner()


def fb_load(path):
    import flashbayes as fb

    return fb.load(path)


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def inputs(tmp_path):
    prior = {"weights": [0.4, 0.6], "means": [[-1.0, 0.0], [1.5, 1.0]],
             "scale_tril": [[[0.8, 0.0], [0.1, 0.6]], [[0.5, 0.0], [0.0, 0.9]]]}
    (tmp_path / "prior.json").write_text(json.dumps(prior))
    (tmp_path / "data.csv").write_text("x1,x2\n0.5,0.2\n1.0,-0.1\n0.7,0.4\n")
    return tmp_path


def test_tasks_lists_every_task():
    res = _run("tasks")
    assert res.exit_code == 0, res.output
    for name in ("gmm_linear", "gaussian_variance", "logistic_regression"):
        assert name in res.output


def test_train_tiny(tmp_path):
    res = _run("train", "gmm_linear", "--out", tmp_path / "run", "--steps", 3, "--batch-size",
               4, "--d-model", 16, "--n-layers", 1, "--checkpoint-every", 2)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "ckpt_00000002.safetensors").is_file()


def test_train_init_fine_tunes_a_model_in_its_shape(tmp_path, tiny_model_path):
    # --init takes the network's shape from the model it starts from
    res = _run("train", "gmm_linear", "--out", tmp_path / "ft", "--steps", 2, "--batch-size", 4,
               "--init", tiny_model_path)
    assert res.exit_code == 0, res.output
    tuned = fb_load(tmp_path / "ft" / "model.safetensors")
    assert tuned.network.config == fb_load(tiny_model_path).network.config
    res = _run("train", "gmm_linear", "--out", tmp_path / "x", "--steps", 2, "--init",
               tmp_path / "nothing.safetensors")
    assert res.exit_code != 0 and "no such file" in res.output


@pytest.mark.slow
def test_train_resumes_and_reads_a_config_file(tmp_path):
    res = _run("train", "gmm_linear", "--out", tmp_path / "run", "--steps", 3, "--batch-size",
               4, "--d-model", 16, "--n-layers", 1, "--checkpoint-every", 2)
    assert res.exit_code == 0, res.output
    # an interrupted run (only the step-2 checkpoint survives) resumes to the same model
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(tmp_path / "run" / "ckpt_00000002.safetensors", cut)
    res = _run("train", "gmm_linear", "--out", cut, "--steps", 3, "--batch-size",
               4, "--d-model", 16, "--n-layers", 1, "--checkpoint-every", 2, "--resume")
    assert res.exit_code == 0, res.output
    from safetensors.numpy import load_file

    a = load_file(str(tmp_path / "run" / "model.safetensors"))
    b = load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # a --config file is honoured for fields not given on the command line
    (tmp_path / "cfg.json").write_text(json.dumps({"steps": 2, "batch_size": 4, "d_model": 16,
                                                   "n_layers": 1}))
    res = _run("train", "gmm_linear", "--out", tmp_path / "c", "--config", tmp_path / "cfg.json")
    assert res.exit_code == 0, res.output
    assert fb_load(tmp_path / "c" / "model.safetensors").meta["step"] == 2


def test_infer_writes_posterior_and_plot(tiny_model_path, inputs):
    out, png = inputs / "post.json", inputs / "post.png"
    res = _run("infer", tiny_model_path, "--prior", inputs / "prior.json", "--data",
               inputs / "data.csv", "--out", out, "--plot", png, "--task", "gmm_linear",
               "--method", "amortized")
    assert res.exit_code == 0, res.output
    assert "path: amortized" in res.output
    import flashbayes as fb

    post = fb.GMM.from_json(out.read_text())
    assert post.n_components == 2
    assert png.stat().st_size > 1000


def test_infer_auto_checks_and_falls_back(tiny_model_path, inputs):
    # the tiny model is barely trained (it returns about its prior): with 15 informative
    # rows its answer fails the k-hat check and NUTS answers
    out = inputs / "post.json"
    (inputs / "many.csv").write_text("x1,x2\n" + "3.0,-2.0\n2.8,-2.2\n3.2,-1.9\n" * 5)
    res = _run("infer", tiny_model_path, "--prior", inputs / "prior.json", "--data",
               inputs / "many.csv", "--out", out, "--seed", 3)
    assert res.exit_code == 0, res.output
    assert "path: nuts" in res.output and "k-hat" in res.output
    saved = json.loads(out.read_text())
    assert saved["type"] == "draws" and saved["names"] == ["theta[1]", "theta[2]"]
    assert np.asarray(saved["draws"]).shape == (4000, 2)
    res = _run("infer", tiny_model_path, "--prior", inputs / "prior.json", "--data",
               inputs / "data.csv", "--method", "exact")
    assert res.exit_code == 0 and "path: exact" in res.output, res.output
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", inputs / "prior.json",
                                "--data", inputs / "data.csv", "--method", "gibbs"),
                           "method", "gibbs")


def test_eval_json(tiny_model_path):
    res = _run("eval", tiny_model_path, "--n-priors", 3, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_priors"] == 3 and summary["kl_mean"] >= -0.05


def _assert_one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert text.startswith("error:"), res.output
    for f in fragments:
        assert f in text, text


def test_bad_inputs(tiny_model_path, inputs, tmp_path):
    prior, data = inputs / "prior.json", inputs / "data.csv"
    # missing files
    _assert_one_line_error(_run("infer", tmp_path / "nope.safetensors", "--prior", prior,
                                "--data", data), "no such file")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", tmp_path / "p.json",
                                "--data", data), "--prior", "no such file")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", prior, "--data",
                                tmp_path / "d.csv"), "--data", "no such file")
    # a GP predictive model is not a Distribution Transformer: pointed to `flashbayes gp`
    _assert_one_line_error(_run("infer", "gp_hyperprior_pfn", "--prior", prior, "--data", data),
                           "is a GP predictive model", "flashbayes gp gp_hyperprior_pfn")
    # malformed JSON
    bad = tmp_path / "bad.json"
    bad.write_text("{weights: [1]")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", bad, "--data", data),
                           "malformed JSON")
    # a prior that is not a valid GMM
    off = {"weights": [0.5, 0.7], "means": [[0, 0], [1, 1]],
           "scale_tril": [np.eye(2).tolist()] * 2}
    (tmp_path / "off.json").write_text(json.dumps(off))
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", tmp_path / "off.json",
                                "--data", data), "summing to 1")
    # wrong dimension: prior in 3-D, data with 3 columns
    (tmp_path / "p3.json").write_text(json.dumps({"weights": [1.0], "means": [[0, 0, 0]],
                                                  "scale_tril": [np.eye(3).tolist()]}))
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", tmp_path / "p3.json",
                                "--data", data), "dimension 2; got 3")
    (tmp_path / "d3.csv").write_text("1,2,3\n4,5,6\n")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", prior, "--data",
                                tmp_path / "d3.csv"), "expected 2 columns")
    # NaN in data
    (tmp_path / "nan.csv").write_text("1,2\nnan,5\n")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", prior, "--data",
                                tmp_path / "nan.csv"), "finite")
    (tmp_path / "first.csv").write_text("0.5,abc\n1,2\n")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", prior, "--data",
                                tmp_path / "first.csv"), "numbers on line 1")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", prior, "--data",
                                tmp_path / "bin.csv"), "text CSV")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", prior, "--data", data,
                                "--out", tmp_path / "no" / "dir" / "p.json"), "existing folder")
    (tmp_path / "txt.csv").write_text("1,2\nfoo,5\n")
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", prior, "--data",
                                tmp_path / "txt.csv"), "numbers on line 2")
    # a checkpoint of another task, or of another format version, or not a checkpoint
    _assert_one_line_error(_run("infer", tiny_model_path, "--prior", prior, "--data", data,
                                "--task", "logistic_regression"), "task 'logistic_regression'")
    _assert_one_line_error(_run("eval", tiny_model_path, "--n-priors", 2, "--task",
                                "gaussian_variance"), "task 'gaussian_variance'")
    from safetensors.numpy import save_file

    future = tmp_path / "future.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(future),
              metadata={"flashbayes": json.dumps({"format_version": 7})})
    _assert_one_line_error(_run("infer", future, "--prior", prior, "--data", data),
                           "format version 1; got 7")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    _assert_one_line_error(_run("eval", junk, "--n-priors", 2), "safetensors")
    # training: unknown task, malformed config, bad values
    _assert_one_line_error(_run("train", "nope", "--out", tmp_path / "r"), "expected one of")
    _assert_one_line_error(_run("train", "gmm_linear", "--out", tmp_path / "r", "--config", bad),
                           "malformed JSON")
    _assert_one_line_error(_run("train", "gmm_linear", "--out", tmp_path / "r", "--steps", 0),
                           "steps")
    _assert_one_line_error(_run("eval", tiny_model_path, "--n-priors", 0), "--n-priors")


def test_demo_runs_and_writes_picture(tmp_path):
    png = tmp_path / "demo.png"
    res = _run("demo", "--seed", 3, "--plot", png)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Distribution Transformer" in text and "NUTS" in text and "KL" in text
    assert png.stat().st_size > 10_000
    _assert_one_line_error(_run("demo", "--n", 50), "--n")


def test_console_script_entry_point(tmp_path):
    """The installed `flashbayes` command itself, in a subprocess, with an error path."""
    exe = shutil.which("flashbayes") or str(__import__("pathlib").Path(sys.executable).parent
                                           / "flashbayes")
    res = subprocess.run([exe, "tasks"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "gmm_linear" in res.stdout
    res = subprocess.run([exe, "infer", str(tmp_path / "x"), "--prior", "p.json", "--data",
                          "d.csv"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
