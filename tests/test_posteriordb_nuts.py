"""NUTS against posteriordb reference draws (slow tier), and the comparison catching wrong draws."""

import jax
import numpy as np
import pytest

from flashbayes._shared import SharedDataMissing
from flashbayes.benchmarks import posteriordb
from flashbayes.benchmarks._posteriordb_bench import SETTINGS, moment_errors
from flashbayes.reference import NumPyroTarget, nuts


@pytest.fixture(scope="module")
def shared():
    try:
        posteriordb.get("kidiq-kidscore_momiq").reference_draws()
    except SharedDataMissing as exc:
        pytest.skip(f"posteriordb reference data not found: {exc}")


def _tolerances(ess):
    # Monte Carlo standard errors of a mean (sd / sqrt(ESS)) and of an sd (about
    # sd / sqrt(2 ESS)), with the reference's own 10,000 near-independent draws added
    mean_se = np.sqrt(1.0 / ess + 1.0 / 10_000)
    sd_se = np.sqrt(1.0 / (2 * ess) + 1.0 / 20_000)
    return 4.5 * mean_se, 4.5 * sd_se


def test_moment_errors_flag_wrong_draws(shared):
    ref = {k: np.asarray(v).reshape(-1)
           for k, v in posteriordb.get("kidiq-kidscore_momiq").reference_draws().items()}
    same = moment_errors(ref, ref)
    assert all(e["mean_err"] == 0 and e["sd_ratio"] == 1 for e in same.values())
    shifted = {k: v + 0.3 * v.std() for k, v in ref.items()}
    assert all(abs(e["mean_err"] - 0.3) < 1e-3 for e in moment_errors(shifted, ref).values())
    shrunk = {k: v.mean() + 0.8 * (v - v.mean()) for k, v in ref.items()}
    assert all(abs(e["sd_ratio"] - 0.8) < 1e-9 for e in moment_errors(shrunk, ref).values())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kidiq-kidscore_momiq", "eight_schools-eight_schools_noncentered",
                                  "garch-garch11", "hmm_example-hmm_example"])
def test_nuts_matches_the_reference(shared, name):
    entry = posteriordb.get(name)
    ref = {k: np.asarray(v).reshape(-1) for k, v in entry.reference_draws().items()}
    post = nuts(jax.random.key(0), NumPyroTarget(entry.model, entry.data), num_warmup=1000,
                num_samples=1000, num_chains=4, **SETTINGS.get(name, {}))
    errs = moment_errors(post.flat_draws(), ref)
    for pname, e in errs.items():
        ess = post.info["summary"][pname]["ess_bulk"]
        tol_mean, tol_sd = _tolerances(ess)
        assert e["mean_err"] < tol_mean, (pname, e, ess)
        assert abs(e["sd_ratio"] - 1) < tol_sd, (pname, e, ess)
    assert post.divergences == 0
