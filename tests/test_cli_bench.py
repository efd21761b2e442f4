"""`flashbayes bench posteriordb` run for real (a subprocess), small, then resumed."""

import json
import subprocess
import sys

import numpy as np
import pytest

from flashbayes._shared import SharedDataMissing, shared_benchmarks_dir


def _shared_or_skip(name: str) -> None:
    try:
        shared_benchmarks_dir(name)
    except SharedDataMissing as exc:
        pytest.skip(f"{name} reference data not found: {exc}")


@pytest.fixture(scope="module")
def shared():
    _shared_or_skip("posteriordb")


def _bench(out, *extra):
    cmd = [sys.executable, "-m", "flashbayes", "bench", "posteriordb", "--names", "sblrc-blr",
           "--out", str(out), "--num-warmup", "200", "--num-samples", "200", "--num-chains", "2",
           "--no-numpyro", "--no-c2st", "--no-repeated", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # about 30 s: the default tier is kept under 15 minutes
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


@pytest.fixture(scope="module")
def sbibm_data():
    _shared_or_skip("sbibm")


def _bench_sbibm(out, *extra):
    cmd = [sys.executable, "-m", "flashbayes", "bench", "sbibm", "--tasks", "gaussian_linear",
           "--budgets", "1000", "--observations", "1", "--max-epochs", "3", "--c2st-draws", "400",
           "--c2st-early-stopping", "--new", "2", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bench_sbibm_writes_table_beside_published_and_resumes(sbibm_data, tmp_path):
    res = _bench_sbibm(tmp_path)
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "sbibm.json").read_text())["rows"][0]
    assert row["task"] == "gaussian_linear" and row["budget"] == 1000
    assert 0.5 <= row["c2st_mean"] <= 1.0 and row["observations"][0]["finite"]
    # the paper's NPE and SNPE on observation 1 at 10^3 simulations (main_paper.csv)
    assert row["published_npe"] == pytest.approx(0.707, abs=0.001)
    assert row["published_snpe"] is not None and 0.5 < row["published_snpe"] < 1.0
    # two observations of our own, scored against the closed-form posterior
    assert [o["observation"] for o in row["new_observations"]] == [1, 2]
    assert 0.5 <= row["c2st_new_quick_mean"] <= 1.0
    assert "| gaussian_linear | 1000 |" in (tmp_path / "sbibm.md").read_text()
    assert "new, quick C2ST" in (tmp_path / "sbibm.md").read_text()
    res = _bench_sbibm(tmp_path)  # the journal holds the pair: nothing is trained again
    assert res.returncode == 0 and "running gaussian_linear" not in res.stderr, res.stderr


def test_bench_sbibm_refuses_bad_options(tmp_path):
    res = _bench_sbibm(tmp_path, "--tasks", "two_moons")
    assert res.returncode != 0 and "tasks: expected names from" in res.stderr + res.stdout
    res = _bench_sbibm(tmp_path, "--new", "-1")
    assert res.returncode != 0 and "new: expected 0..100" in res.stderr + res.stdout
    res = _bench_sbibm(tmp_path, "--budgets", "1e3")
    assert res.returncode != 0 and "--budgets: expected comma-separated integers" in (
        res.stderr + res.stdout)


class _Exact:
    """An 'estimator' whose posterior is gaussian_linear's closed form, moved by `shift`."""

    def __init__(self, shift: float):
        self.shift = shift

    def posterior(self, x):
        import flashbayes as fb

        task, shift = fb.sbi.tasks.get("gaussian_linear"), self.shift

        class _Post:
            def sample(self, key, n):
                return task.reference_posterior(key, x, n) + shift

        return _Post()


def test_new_observations_are_fixed_and_scored_against_the_reference():
    """The observations of our own are the same in every run, and their score tells a right
    posterior (C2ST near 0.5) from one moved by one posterior sd (near 1)."""
    from flashbayes.benchmarks import _sbibm_bench as bench

    a = bench.new_observations("gaussian_linear", 2)
    b = bench.new_observations("gaussian_linear", 2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True)) and a[0].shape == (10,)
    assert not np.array_equal(a[0], a[1])
    fresh = bench.new_observations("gaussian_linear", 2, obs_seed=bench.OBS_SEED + 7)
    assert not any(np.array_equal(u, v) for u, v in zip(a, fresh, strict=True))
    right = bench.score_new(_Exact(0.0), "gaussian_linear", 1, seed=3, draws=2000)
    wrong = bench.score_new(_Exact(0.22), "gaussian_linear", 1, seed=3, draws=2000)  # sd 0.22
    assert right[0]["c2st_quick"] < 0.56, right
    assert wrong[0]["c2st_quick"] > 0.75, wrong
    assert "c2st" not in right[0]  # the protocol's score only when asked for


@pytest.mark.slow
def test_new_observations_scored_under_the_protocol_tell_right_from_wrong():
    from flashbayes.benchmarks import _sbibm_bench as bench

    right = bench.score_new(_Exact(0.0), "gaussian_linear", 1, seed=3, draws=2000,
                            protocol=True)
    wrong = bench.score_new(_Exact(0.22), "gaussian_linear", 1, seed=3, draws=2000,
                            protocol=True)
    assert right[0]["c2st"] < 0.56 and right[0]["c2st_quick"] < 0.56, right
    assert wrong[0]["c2st"] > 0.75, wrong


def test_journal_rows_reuse_only_rows_with_the_same_options_and_data_options(tmp_path):
    """A journal row is reused only if its run options match and it was trained with the
    task's current `npe_options` and head (slcp's set embedding and spline-only head came
    later: its older rows are stale)."""
    from flashbayes.benchmarks import _sbibm_bench as bench

    opts = {"head": None, "ensemble": 5, "seed": 1}  # None: each task's own head
    slcp_now = {"embedding": "set", "set_points": 4, "head": "nsf"}
    lines = [
        {"options": opts, "row": {"task": "gaussian_linear", "budget": 1000, "c2st_mean": 0.6,
                                  "head": "nsf+maf"}},
        {"options": opts, "row": {"task": "slcp", "budget": 1000, "c2st_mean": 0.9,
                                  "head": "nsf+maf"}},
        {"options": opts, "row": {"task": "slcp", "budget": 10000, "c2st_mean": 0.8,
                                  "head": "nsf+maf",
                                  "npe_options": {"embedding": "set", "set_points": 4}}},
        {"options": opts, "row": {"task": "slcp", "budget": 100000, "c2st_mean": 0.7,
                                  "head": "nsf", "npe_options": slcp_now}},
        {"options": {**opts, "ensemble": 1},
         "row": {"task": "gaussian_mixture", "budget": 1000, "c2st_mean": 0.7,
                 "head": "nsf+maf"}},
    ]
    journal = tmp_path / "j.jsonl"
    journal.write_text("\n".join(json.dumps(e) for e in lines) + '\n{"options": {"he')
    done = bench.journal_rows(journal, opts)
    assert sorted(done) == [("gaussian_linear", 1000), ("slcp", 100000)]
    assert bench.journal_rows(tmp_path / "absent.jsonl", opts) == {}
    # a row whose head is not the one asked for is not reused either
    maf = {**opts, "head": "maf"}
    journal.write_text(json.dumps({"options": maf, "row": {**lines[0]["row"]}}) + "\n")
    assert bench.journal_rows(journal, maf) == {}


def test_markdown_shows_new_observations_under_the_protocol_beside_the_quick_score():
    from flashbayes.benchmarks import _sbibm_bench as bench

    def row(task, proto, quick):
        return {"task": task, "budget": 10000, "c2st_mean": 0.6, "c2st_quick_mean": 0.62,
                "c2st_new_mean": proto, "c2st_new_se": 0.01, "c2st_new_quick_mean": quick,
                "c2st_new_quick_se": 0.02, "published_npe": 0.7, "published_snpe": 0.65,
                "train_s": 100.0, "members": ["nsf"], "observations": [{"sample_10k_s": 0.02}]}

    opts = {"head": None, "ensemble": 5, "observations": [1], "c2st_draws": 10000,
            "early_stopping": False, "new": 5, "new_protocol": True}
    table = bench.markdown({"options": opts, "rows": [row("sir", 0.61, 0.64),
                                                      row("slcp", 0.71, 0.74)]})
    assert "| new, C2ST | new, quick C2ST |" in table and "Each task's head" in table
    assert "| sir | 10000 | 0.600 | 0.620 | 0.610 ± 0.010 | 0.640 ± 0.020 |" in table
    assert "| **mean of 2** | 10000 | 0.600 | 0.620 | 0.660 | 0.690 |" in table
    header, rule = table.splitlines()[4:6]
    assert header.count("|") == rule.count("|")  # every column has its rule
    quick_only = bench.markdown({"options": {**opts, "new_protocol": False},
                                 "rows": [row("sir", None, 0.64)]})
    assert "new, C2ST" not in quick_only and "| 0.640 ± 0.020 |" in quick_only
    # the table names the seed its observations of our own were drawn with
    assert f"seed {bench.OBS_SEED} + task index" in table
    fresh = bench.markdown({"options": {**opts, "obs_seed": 27182}, "rows": [row("sir", 0.6, 0.6)]})
    assert "seed 27182 + task index" in fresh


def _pool_run(obs_seed, scores, *, val_loss=-1.0, seed=1, tasks=("sir", "slcp")):
    """A benchmark result whose tasks scored new observations x = [obs_seed, j] with `scores`."""
    opts = {"head": None, "ensemble": 5, "seed": seed, "max_epochs": 1000, "c2st_draws": 10000,
            "new": len(scores), "new_protocol": True, "obs_seed": obs_seed}
    rows = [{"task": t, "budget": 10000, "best_val_loss": val_loss, "published_npe": 0.7,
             "published_snpe": 0.6,
             "new_observations": [{"x": [obs_seed, j], "c2st": s, "c2st_quick": s + 0.01}
                                  for j, s in enumerate(scores)]} for t in tasks]
    return {"options": opts, "rows": rows}


def test_pool_new_counts_every_observation_once_and_only_for_the_same_estimators():
    from flashbayes.benchmarks import _sbibm_bench as bench

    pooled = bench.pool_new([_pool_run(1, [0.5, 0.7]), _pool_run(2, [0.6, 0.6, 0.9])])
    sir = next(r for r in pooled["rows"] if r["task"] == "sir")
    assert sir["n_observations"] == 5 and sir["runs"] == 2 and sir["same_network"]
    assert sir["c2st_new_mean"] == pytest.approx(0.66)
    assert sir["c2st_new_se"] == pytest.approx(np.std([0.5, 0.7, 0.6, 0.6, 0.9], ddof=1) / 5**0.5)
    assert sir["c2st_new_quick_mean"] == pytest.approx(0.67)
    mean = pooled["mean"]["10000"]
    assert mean["c2st_new_mean"] == pytest.approx(0.66) and mean["tasks"] == 2
    assert mean["c2st_new_se"] == pytest.approx(sir["c2st_new_se"] / 2**0.5)
    table = bench.pooled_markdown(pooled, ["a", "b"])
    assert "| sir | 10000 | 5 | 0.660 ± " in table and "| **mean of 2** | 10000 | 10 |" in table
    # a network trained again to another validation loss is flagged
    other = bench.pool_new([_pool_run(1, [0.5]), _pool_run(2, [0.6], val_loss=-1.1)])
    assert not other["rows"][0]["same_network"]
    with pytest.raises(ValueError, match="appears in two runs"):
        bench.pool_new([_pool_run(1, [0.5, 0.7]), _pool_run(1, [0.6])])
    with pytest.raises(ValueError, match="same"):
        bench.pool_new([_pool_run(1, [0.5]), _pool_run(2, [0.6], seed=2)])
    quick_only = _pool_run(3, [0.5])
    quick_only["options"]["new_protocol"] = False
    with pytest.raises(ValueError, match="under the protocol"):
        bench.pool_new([quick_only])
