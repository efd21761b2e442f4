"""`flashbayes bench posteriordb` run for real (a subprocess), small, then resumed."""

import json
import subprocess
import sys

import pytest

from flashbayes._shared import SharedDataMissing, shared_benchmarks_dir


@pytest.fixture(scope="module")
def shared():
    try:
        shared_benchmarks_dir("posteriordb")
    except SharedDataMissing as exc:
        pytest.skip(f"posteriordb reference data not found: {exc}")


def _bench(out, *extra):
    cmd = [sys.executable, "-m", "flashbayes", "bench", "posteriordb", "--names", "sblrc-blr",
           "--out", str(out), "--num-warmup", "200", "--num-samples", "200", "--num-chains", "2",
           "--no-numpyro", "--no-c2st", "--no-repeated", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_bench_posteriordb_writes_tables_and_resumes(shared, tmp_path):
    res = _bench(tmp_path)
    assert res.returncode == 0, res.stderr
    result = json.loads((tmp_path / "posteriordb.json").read_text())
    row = result["posteriors"][0]
    assert row["name"] == "sblrc-blr" and row["n_params"] == 6
    assert set(row["nuts"]["per_param"]) == {f"beta[{i}]" for i in range(1, 6)} | {"sigma"}
    assert row["nuts"]["max_mean_err"] < 0.5 and "khat" in row["vi"]
    assert "| sblrc-blr | 6 |" in (tmp_path / "posteriordb.md").read_text()
    journal = tmp_path / "posteriordb.journal.jsonl"
    assert len(journal.read_text().splitlines()) == 1
    # a second run with the same options takes the row from the journal instead of rerunning
    res = _bench(tmp_path)
    assert res.returncode == 0 and "running sblrc-blr" not in res.stderr, res.stderr
    assert len(journal.read_text().splitlines()) == 1


def test_bench_posteriordb_rejects_unknown_names(shared, tmp_path):
    cmd = [sys.executable, "-m", "flashbayes", "bench", "posteriordb", "--names", "nope",
           "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "nope" in res.stderr and "Traceback" not in res.stderr
