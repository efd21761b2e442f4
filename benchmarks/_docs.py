"""docs/results.md is composed from the markdown tables the benchmark scripts write."""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parent.parent / "docs"

# (file in benchmarks/results, section title, text above the table); missing files are skipped
SECTIONS = [
    ("foundation.md", "The shipped Distribution Transformers",
     "From `python benchmarks/foundation.py` (`benchmarks/results/foundation.json`). Held-out "
     "problems use seed 20261123, never used in training. KL(exact || DT) is a Monte Carlo "
     "estimate with 4,000 draws from the exact posterior per problem. C2ST: sbibm protocol "
     "(MLP, 5-fold, standardised on the reference), DT draws against 4 x 1,000 NUTS draws "
     "(BlackJAX, 1,000 adaptation steps)."),
    ("train_speed.md", "Training time (2 CPU cores)",
     "From `python benchmarks/train_speed.py` (each configuration alone; "
     "`benchmarks/results/train_speed.json`):"),
    ("infer.md", "fb.infer: fast by default, exact when flagged",
     "From `python benchmarks/infer.py` (`benchmarks/results/infer.json`); the shipped models on "
     "held-out problems (seed 20261123), k-hat from 1,000 amortized draws."),
    ("sbc.md", "Calibration of the shipped models (SBC)",
     "From `python benchmarks/sbc.py` (`benchmarks/results/sbc.json`)."),
    ("filtering.md", "Sequential inference",
     "From `python benchmarks/filtering.py` (`benchmarks/results/filtering.json`); see "
     "docs/filtering.md for the models and the references."),
    ("filtering_qubit.md", "Qubit parameter inference",
     "From `python benchmarks/filtering.py --only qubit --qubit CHECKPOINT` "
     "(`benchmarks/results/filtering_qubit.json`); see docs/filtering.md."),
    ("filtering_nonlinear.md", "Nonlinear tracking",
     "From `python benchmarks/filtering_nonlinear.py --model CHECKPOINT` "
     "(`benchmarks/results/filtering_nonlinear.json`); see docs/nonlinear_tracking.md."),
    ("serve_load.md", "The posterior service under load",
     "From `python benchmarks/serve_load.py` (`benchmarks/results/serve_load.json`); see "
     "docs/service.md."),
    ("scaling.md", "Data-parallel training",
     "From `python benchmarks/scaling.py` (`benchmarks/results/scaling.json`); see "
     "docs/scaling.md."),
    ("simulation_scaling.md", "Simulations on 1 and 2 workers",
     "From `python benchmarks/simulation_scaling.py` "
     "(`benchmarks/results/simulation_scaling.json`); see docs/scaling.md."),
    ("sbibm_1e3_flat.md", "NPE on sbibm at 10^3 simulations (quick C2ST)",
     "From `python benchmarks/sbibm.py --budgets 1000 --c2st-early-stopping --name "
     "sbibm_1e3_flat` (`benchmarks/results/sbibm_1e3_flat.json`): the default mixture of five "
     "spline and five autoregressive flows weighted by stacking, box priors under the flat "
     "map; the C2ST classifier stops early on a validation split, so this is a quick check, "
     "not the published protocol; see docs/sbi.md (the logit map: "
     "`benchmarks/results/sbibm_1e3_mix.md`; one MAF per task: "
     "`benchmarks/results/sbibm_1e3_maf_es.md`)."),
    ("sbibm_1e4_full.md", "NPE on sbibm at 10^4 simulations: shared and new observations, "
     "published C2ST protocol",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c N python benchmarks/sbibm.py --tasks ... --budgets "
     "10000 --new 5 --name ...` (`benchmarks/results/sbibm_1e4_full.json`; two processes of "
     "three tasks, one per core, their journals joined and the table composed over all six): "
     "the default estimator (slcp: spline flows only), observations 1-5 and five observations "
     "of our own per task, every set of draws scored by the published protocol and by the "
     "quick classifier; see docs/sbi.md."),
    ("sbibm_1e4_fresh.md", "NPE on sbibm at 10^4 simulations: ten fresh observations of our "
     "own per task, published C2ST protocol",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c N python benchmarks/sbibm.py --tasks ... --budgets "
     "10000 --observations 1 --new 10 --obs-seed 27182 --name ...` "
     "(`benchmarks/results/sbibm_1e4_fresh.json`; two processes, one per core, their journals "
     "joined and the table composed over all six): the estimators of the run above (same "
     "training seeds) on ten observations drawn with another seed; see docs/sbi.md."),
    ("sbibm_1e4_new.md", "NPE on sbibm at 10^4 simulations: all observations of our own, "
     "pooled",
     "From `python benchmarks/sbibm_pool.py --runs sbibm_1e4_full sbibm_1e4_fresh --name "
     "sbibm_1e4_new` (`benchmarks/results/sbibm_1e4_new.json`): the five and the ten new "
     "observations per task of the two runs above, under the published protocol."),
    ("sbibm_1e4_flat_full.md", "NPE on sbibm at 10^4 simulations (published C2ST protocol, "
     "slcp with both heads)",
     "From `python benchmarks/sbibm.py --budgets 10000 --name sbibm_1e4_flat_full` "
     "(`benchmarks/results/sbibm_1e4_flat_full.json`): the default estimator as above, each "
     "observation's draws scored by the published protocol (classifier trained to "
     "convergence, 5 folds) and by the quick classifier; run on one core beside other jobs; "
     "see docs/sbi.md."),
    ("sbibm_1e3_flat_full.md", "NPE on sbibm at 10^3 simulations (published C2ST protocol)",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c 1 python benchmarks/sbibm.py --budgets 1000 --name "
     "sbibm_1e3_flat_full` (`benchmarks/results/sbibm_1e3_flat_full.json`): as at 10^4; run on "
     "one core beside other jobs, before each network drew its own share (the sampling times "
     "are from then); see docs/sbi.md."),
    ("sbibm_1e5_full.md", "NPE on sbibm at 10^5 simulations (published C2ST protocol)",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/sbibm.py --budgets 100000 "
     "--ensemble 1 --new 5 --name sbibm_1e5_full` (`benchmarks/results/sbibm_1e5_full.json`; "
     "run as two processes of three tasks, one per core, then once more over all six to "
     "compose the table from the journal): one spline and one autoregressive flow per task, "
     "stacked, box priors under the flat map; the shared observations scored by the published "
     "protocol and the quick classifier, five observations of our own by the quick one; see "
     "docs/sbi.md."),
    ("sbibm_1e3_slcp_nsf.md", "NPE on sbibm: slcp at 10^3 with spline flows only",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/sbibm.py --tasks slcp "
     "--budgets 1000 --name sbibm_1e3_slcp_nsf` (`benchmarks/results/sbibm_1e3_slcp_nsf.json`): "
     "slcp's estimator as it is now (set embedding, five spline flows), published protocol, "
     "against 0.925 with both heads above; see docs/sbi.md."),
    ("sbibm_1e5_slcp_nsf.md", "NPE on sbibm: slcp at 10^5 with a spline flow only",
     "From `OPENBLAS_NUM_THREADS=1 python benchmarks/sbibm.py --tasks slcp --budgets 100000 "
     "--ensemble 1 --new 5 --name sbibm_1e5_slcp_nsf` "
     "(`benchmarks/results/sbibm_1e5_slcp_nsf.json`): against 0.678 with both heads above; "
     "the process was paused for an hour to give its core to another run, so its training "
     "time is not a measurement; see docs/sbi.md."),
    ("npe_sampling.md", "NPE: drawing 10,000 samples",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/npe_sampling.py --tasks "
     "gaussian_linear gaussian_linear_uniform gaussian_mixture bernoulli_glm slcp sir` "
     "(`benchmarks/results/npe_sampling.json`); see docs/sbi.md."),
    ("sbi_prior_swap.md", "SBI prior swap: the Distribution Transformer against importance "
     "re-weighting",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/sbi_prior_swap.py --model "
     "runs/sbi_gl_eq/model.safetensors --npe EST --problems 100 --c2st-problems 30` "
     "(`benchmarks/results/sbi_prior_swap.json`): the shipped `sbi_gaussian_linear` model "
     "against the default NPE estimator at 10^4 re-weighted by `fb.sbi.prior_swap`, both "
     "against the exact posterior; one core, with a training run on the other; see "
     "docs/sbi.md."),
    ("sbi_prior_swap_gm.md", "SBI prior swap on gaussian_mixture (model not shipped)",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/sbi_prior_swap.py --model "
     "runs/sbi_gm/model.safetensors --problems 100 --c2st-problems 30 --name "
     "sbi_prior_swap_gm` after `flashbayes train sbi_gaussian_mixture --steps 8000 --out "
     "runs/sbi_gm --seed 0` (`benchmarks/results/sbi_prior_swap_gm.json`); the NPE estimator "
     "is the default one at 10^4, trained in the run; see docs/sbi.md."),
    ("sbibm_1e4_mix.md", "NPE on sbibm at 10^4 simulations (quick C2ST, before the flat map)",
     "From `python benchmarks/sbibm.py --budgets 10000 --c2st-early-stopping --name "
     "sbibm_1e4_mix` (`benchmarks/results/sbibm_1e4_mix.json`), box priors under the logit "
     "map (the default until the flat map); as above (one MAF per task: "
     "`benchmarks/results/sbibm_1e4_maf_es.md`). Training and sampling times were measured "
     "with two benchmark processes sharing the 2 cores."),
    ("sbibm_1e5_mix1.md", "NPE on sbibm at 10^5 simulations (quick C2ST, logit map)",
     "From `python benchmarks/sbibm.py --budgets 100000 --ensemble 1 --c2st-early-stopping "
     "--name sbibm_1e5_mix1` (`benchmarks/results/sbibm_1e5_mix1.json`): one spline and one "
     "autoregressive flow per task, stacked; times measured with two benchmark processes "
     "sharing the 2 cores; see docs/sbi.md."),
    ("sbibm_unseen_1e4_flat.md", "NPE on observations of our own (10^4 simulations)",
     "From `python benchmarks/sbibm_unseen.py --name sbibm_unseen_1e4_flat` "
     "(`benchmarks/results/sbibm_unseen_1e4_flat.json`): "
     "the same estimators scored on the shared observations and on new ones, against "
     "`task.reference_posterior`; see docs/sbi.md."),
    ("sbibm_unseen_1e3_flat.md", "NPE on observations of our own (10^3 simulations)",
     "From `OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/sbibm_unseen.py --budget 1000 "
     "--name sbibm_unseen_1e3_flat` (`benchmarks/results/sbibm_unseen_1e3_flat.json`): as at "
     "10^4, with the estimators of the 10^3 runs; see docs/sbi.md."),
    ("gp_eval_1000.md", "GP posterior predictives: 1,000 held-out data sets",
     "From `python benchmarks/gp_eval.py --methods oracle type2_ml quadrature pfn dt "
     "--tasks-per-n 100` (`benchmarks/results/gp_eval_1000.json`): the shipped PFN and DT "
     "variant against the Bayes-optimal predictive by quadrature over the hyperparameters, "
     "type-II ML and the oracle GP (true hyperparameters); NLPD in nats per query point; see "
     "docs/gp.md."),
    ("gp_eval_nuts60.md", "GP posterior predictives against NUTS (60 of those data sets)",
     "From `python benchmarks/gp_eval.py --tasks-per-n 6` "
     "(`benchmarks/results/gp_eval_nuts60.json`): the first 6 data sets per n of the 1,000, "
     "with NUTS over the hyperparameters (the Bayes-optimal predictive), the same by "
     "quadrature, and type-II ML; see docs/gp.md."),
    ("posteriordb.md", "Reference engines on posteriordb",
     "From `flashbayes bench posteriordb --out benchmarks/results` "
     "(`benchmarks/results/posteriordb.json`); see docs/reference.md for the settings and the "
     "discussion of each row."),
]

HEADER = """# Results

Every table below is written by a benchmark script run side by side in one process (these
machines are noisy, so ratios are measured within one run); the raw numbers are in
`benchmarks/results/*.json`. Regenerate this page with `python benchmarks/_docs.py` after any of
them.
"""


def write_results_doc() -> Path:
    parts = [HEADER]
    for fname, title, text in SECTIONS:
        path = RESULTS / fname
        if not path.exists():
            continue
        body = path.read_text()
        if body.startswith("# "):  # a table file with its own title: nest it under ours
            body = body.split("\n", 1)[1].replace("\n## ", "\n### ")
        parts.append(f"\n## {title}\n\n{text}\n\n{body.strip()}\n")
    out = DOCS / "results.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, out)
    return out


def save(name: str, result: dict, markdown: str) -> None:
    """Write results/NAME.json and NAME.md, then recompose docs/results.md."""
    import json

    RESULTS.mkdir(exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown)):
        path = RESULTS / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    write_results_doc()


if __name__ == "__main__":
    print(write_results_doc())
