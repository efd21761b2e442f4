"""NPE on the sbibm tasks: C2ST against the reference posteriors, beside the published results.

For each task and budget one estimator is trained (single round, amortized: one network serves
every observation) with `fb.sbi.train_npe` on the task's prior and simulator; for each
observation its draws are compared with the reference draws by C2ST (`fb.diagnostics.c2st`:
z-scored on the reference, MLP with two hidden layers of 10 d, 5-fold cross-validation). The
published columns are the means over the same observations of the paper's NPE and SNPE runs
(`main_paper.csv`; for gaussian_mixture the authors' rerun with the fixed simulator). Finished
(task, budget) pairs are appended to a journal, so an interrupted run continues where it stopped.

With `new` > 0 each estimator is also scored on observations of our own (theta from the prior, x
from the simulator, `new_observations`), against draws of `task.reference_posterior`, by the quick
classifier (early stopping): the targets must hold on observations nobody tuned to.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

SEED = 20261123
OBS_SEED = 31415  # new observations of task i come from key(OBS_SEED + i)
BUDGET_LABELS = {1000: "10³", 10_000: "10⁴", 100_000: "10⁵"}


def published(task: str, budget: int, observations: Sequence[int],
              algorithm: str = "NPE") -> float | None:
    """Mean published C2ST of `algorithm` over the given observations (None where absent)."""
    from flashbayes._shared import shared_benchmarks_dir

    label = BUDGET_LABELS.get(budget)
    if label is None:
        return None
    folder = shared_benchmarks_dir("sbibm") / "published_results"
    rerun = task == "gaussian_mixture" and algorithm == "NPE"
    fname = "gaussian_mixture_rerun.csv" if rerun else "main_paper.csv"
    with open(folder / fname, newline="") as fh:
        rows = [r for r in csv.DictReader(fh)
                if r["task"] == task and r["algorithm"] == algorithm
                and r["num_simulations"] == label and int(r["num_observation"]) in observations]
    return float(np.mean([float(r["C2ST"]) for r in rows])) if rows else None


def training_seed(task: str, budget: int, seed: int = SEED) -> int:
    """The training seed of a (task, budget) pair: seed + 100 i + round(log10 budget), i the
    task's place in the registry (so a run over a subset of tasks trains the same networks)."""
    from flashbayes.sbi import tasks as sbi_tasks

    return seed + 100 * sbi_tasks.names().index(task) + round(math.log10(budget))


def new_observations(task_name: str, n: int, obs_seed: int = OBS_SEED) -> list[np.ndarray]:
    """`n` observations of our own: theta from the task's prior, x from its simulator.

    Drawn from key(obs_seed + i), i the task's place in the registry, so every benchmark that
    asks for them scores the same observations; another `obs_seed` gives a fresh set.
    """
    from flashbayes.sbi import tasks as sbi_tasks

    task = sbi_tasks.get(task_name)
    index = sbi_tasks.names().index(task_name)
    k_theta, k_x = jax.random.split(jax.random.key(obs_seed + index))
    thetas = task.prior().sample(k_theta, (n,))
    return [np.asarray(task.simulator(k, th))
            for k, th in zip(jax.random.split(k_x, n), thetas, strict=True)]


def score_new(est, task_name: str, n: int, seed: int, draws: int = 10_000,
              protocol: bool = False, obs_seed: int = OBS_SEED) -> list[dict]:
    """Quick C2ST of `draws` of the estimator's draws against as many reference draws, on `n`
    new observations; with `protocol`, the same draws also under the published protocol
    (``"c2st"``: 5-fold, no early stopping)."""
    import flashbayes as fb

    task = fb.sbi.tasks.get(task_name)
    out = []
    for j, x in enumerate(new_observations(task_name, n, obs_seed)):
        k_ref, k_draw = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1001 + j))
        t0 = time.perf_counter()
        ref = np.asarray(task.reference_posterior(k_ref, x, draws))
        reference_s = time.perf_counter() - t0
        ours = np.asarray(est.posterior(x).sample(k_draw, draws))
        entry = {"observation": j + 1, "x": x.tolist(), "reference_s": reference_s,
                 "c2st_quick": fb.diagnostics.c2st(ref, ours, seed=1, early_stopping=True)}
        if protocol:
            entry["c2st"] = fb.diagnostics.c2st(ref, ours, seed=1, early_stopping=False)
        out.append(entry)
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def _mean_or_dash(values: Sequence[float | None]) -> str:
    """The formatted mean, or "—" where a value is missing."""
    return _fmt(None if None in values else float(np.mean(values)))


def mean_se(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (None for a single value)."""
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None
    return float(np.mean(values)), se


def run_one(task_name: str, budget: int, *, head: str | None, ensemble: int,
            observations: Sequence[int],
            max_epochs: int, c2st_draws: int, seed: int, early_stopping: bool,
            new: int = 0, obs_seed: int = OBS_SEED) -> dict:
    """Train on `budget` simulations of one task and score every observation (`head` None:
    the task's own, see `SBITask.npe_settings`) and `new` observations of our own drawn with
    `obs_seed`."""
    import flashbayes as fb

    task = fb.sbi.tasks.get(task_name)
    settings = task.npe_settings(head)
    t0 = time.perf_counter()
    est = fb.sbi.train_npe(task.prior(), task.simulator, budget, key=jax.random.key(seed),
                           ensemble=ensemble, max_epochs=max_epochs,
                           parameter_names=list(task.parameter_names), **settings)
    train_s = time.perf_counter() - t0
    per_obs = []
    for k in observations:
        x_obs = fb.sbi.tasks.load_observation(task_name, k)
        ref = np.asarray(fb.sbi.tasks.load_reference_samples(task_name, k))
        post = est.posterior(x_obs)
        post.sample(jax.random.key(0), 10_000).block_until_ready()  # compile
        t1 = time.perf_counter()
        draws = np.asarray(post.sample(jax.random.key(seed + k), 10_000).block_until_ready())
        sample_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        score = fb.diagnostics.c2st(ref[:c2st_draws], draws[:c2st_draws], seed=1,
                                    early_stopping=early_stopping)
        entry = {"observation": int(k), "c2st": float(score), "sample_10k_s": sample_s,
                 "c2st_s": time.perf_counter() - t2, "finite": bool(np.isfinite(draws).all())}
        if not early_stopping:  # the quick score beside the protocol's, on the same draws
            entry["c2st_quick"] = fb.diagnostics.c2st(ref[:c2st_draws], draws[:c2st_draws],
                                                      seed=1, early_stopping=True)
        per_obs.append(entry)
    extra = {}
    if new:
        scored = score_new(est, task_name, new, seed, draws=c2st_draws,
                           protocol=not early_stopping, obs_seed=obs_seed)
        for tag, field in (("_quick", "c2st_quick"), ("", "c2st")):
            if field in scored[0]:
                extra[f"c2st_new{tag}_mean"], extra[f"c2st_new{tag}_se"] = mean_se(
                    [o[field] for o in scored])
        extra["new_observations"] = scored
    return {"task": task_name, "budget": int(budget), "head": settings["head"],
            "ensemble": ensemble,
            "npe_options": task.npe_kwargs,
            "train_s": train_s, "epochs": est.config["epochs"],
            "members": est.config.get("members", [settings["head"]]),
            "weights": est.config.get("weights", [1.0]),
            "best_val_loss": est.config["best_val_loss"],
            "num_simulations_ok": est.config["num_simulations"],
            "c2st_mean": float(np.mean([r["c2st"] for r in per_obs])),
            "c2st_quick_mean": (float(np.mean([r["c2st_quick"] for r in per_obs]))
                                if not early_stopping else None),
            "published_npe": published(task_name, budget, observations, "NPE"),
            "published_snpe": published(task_name, budget, observations, "SNPE"),
            "observations": per_obs, **extra}


def journal_rows(journal: Path, options: dict) -> dict[tuple[str, int], dict]:
    """The finished (task, budget) rows of a journal that a run with `options` can reuse.

    A row counts only if it was written with the same options and trained with the task's
    current `npe_options` (so a task whose data options changed is trained again); of several,
    the last one wins. Lines cut short by a crash are skipped.
    """
    from flashbayes.sbi import tasks as sbi_tasks

    done: dict[tuple[str, int], dict] = {}
    if not journal.exists():
        return done
    for line in journal.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        row = entry.get("row", {}) if isinstance(entry, dict) else {}
        if (entry.get("options") == options and row.get("task") in sbi_tasks.names()
                and row.get("npe_options", {}) == sbi_tasks.get(row["task"]).npe_kwargs
                and row.get("head") == sbi_tasks.get(row["task"]).npe_settings(
                    options.get("head"))["head"]):
            done[(row["task"], row["budget"])] = row
    return done


def run(tasks: Sequence[str], budgets: Sequence[int], *, head: str | None = None,
        ensemble: int = 5,
        observations: Sequence[int] = (1, 2, 3, 4, 5), max_epochs: int = 1000,
        c2st_draws: int = 10_000, early_stopping: bool = False, seed: int = SEED,
        new: int = 0, obs_seed: int = OBS_SEED, journal: Path | None = None,
        progress: Callable[[str], None] | None = None) -> dict:
    """Every (task, budget) pair; rows already in `journal` with the same options are reused.

    The training seed of a pair is `training_seed(task, budget, seed)`, so a rerun (or a run over
    a subset of tasks) gives the same networks. `head` None trains each task's own head
    (`SBITask.npe_settings`). `new` > 0 also scores that many observations of our own per task
    (`score_new`; under the protocol too unless `early_stopping`), drawn with `obs_seed`.
    """
    from flashbayes.sbi import tasks as sbi_tasks

    unknown = [t for t in tasks if t not in sbi_tasks.names()]
    if unknown or not tasks:
        raise ValueError(f"tasks: expected names from {sbi_tasks.names()}; got {list(tasks)}")
    if not budgets or any(int(b) < 100 for b in budgets):
        raise ValueError(f"budgets: expected simulation budgets >= 100; got {list(budgets)}")
    bad_obs = [k for k in observations if not 1 <= int(k) <= 10]
    if bad_obs or not observations:
        raise ValueError(f"observations: expected numbers in 1..10; got {list(observations)}")
    if not 0 <= int(new) <= 100:
        raise ValueError(f"new: expected 0..100 observations of our own per task; got {new}")
    options = {"head": head, "ensemble": int(ensemble),
               "observations": [int(k) for k in observations],
               "max_epochs": int(max_epochs), "c2st_draws": int(c2st_draws),
               "early_stopping": bool(early_stopping), "seed": int(seed)}
    if new:  # only then, so journals written before the option still match
        options["new"] = int(new)
        if not early_stopping:
            options["new_protocol"] = True
        if int(obs_seed) != OBS_SEED:
            options["obs_seed"] = int(obs_seed)
    done = journal_rows(journal, options) if journal is not None else {}
    rows = []
    for name in tasks:
        for budget in budgets:
            if (name, int(budget)) in done:
                rows.append(done[(name, int(budget))])
                continue
            if progress is not None:
                progress(f"{name} at {budget} simulations")
            row = run_one(name, int(budget), head=head, ensemble=int(ensemble),
                          observations=options["observations"],
                          max_epochs=max_epochs, c2st_draws=c2st_draws,
                          seed=training_seed(name, int(budget), seed),
                          early_stopping=early_stopping, new=int(new),
                          obs_seed=int(obs_seed))
            rows.append(row)
            if journal is not None:
                with open(journal, "a") as fh:
                    fh.write(json.dumps({"options": options, "row": row}) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
    return {"options": options, "machine": platform.platform(), "cpus": os.cpu_count(),
            "rows": rows}


def _kept(row: dict) -> str:
    """The networks in the final mixture, e.g. '3 nsf + 2 maf'."""
    members = row["members"] if "members" in row else [row["head"]]
    return " + ".join(f"{members.count(h)} {h}" for h in dict.fromkeys(members))


def markdown(result: dict) -> str:
    """The table of a `run` result, with the mean over tasks per budget."""
    opt = result["options"]
    quick = not opt["early_stopping"]  # a quick-score column beside the protocol's
    new = int(opt.get("new", 0))  # a column for the observations of our own
    new_protocol = bool(opt.get("new_protocol"))  # and one scored under the protocol
    head = (f"Head `{opt['head']}`" if opt["head"] is not None else
            "Each task's head (`nsf+maf` unless its `npe_options` say otherwise; see the "
            "networks kept)")
    lines = ["# NPE on sbibm", "",
             f"{head} ({opt.get('ensemble', 1)} per head), observations "
             f"{opt['observations']}, C2ST on "
             f"{opt['c2st_draws']} draws of each set"
             f"{' (classifier with early stopping)' if opt['early_stopping'] else ''}. "
             "Published: the paper's NPE and SNPE on the same observations."
             + (" Quick: the same draws scored by the classifier with early stopping."
                if quick else "")
             + (f" New: {'C2ST under the protocol and ' if new_protocol else ''}quick C2ST "
                f"on {new} observations of our own per task (theta from the "
                f"prior, x simulated, seed {opt.get('obs_seed', OBS_SEED)} + task index) "
                "against draws of "
                "`task.reference_posterior`, mean ± standard error." if new else ""), "",
             "| task | simulations | C2ST (ours) | " + ("quick C2ST | " if quick else "")
             + ("new, C2ST | " if new_protocol else "") + ("new, quick C2ST | " if new else "")
             + "published NPE | published SNPE | train s | networks kept | 10k draws ms |",
             "|---|---|---|---|---|---|---|---|" + ("---|" if quick else "")
             + ("---|" if new_protocol else "") + ("---|" if new else "")]

    def fmt_new(r, tag="_quick"):
        if r.get(f"c2st_new{tag}_mean") is None:
            return "—"
        se = r.get(f"c2st_new{tag}_se")
        return f"{r[f'c2st_new{tag}_mean']:.3f}" + ("" if se is None else f" ± {se:.3f}")

    for r in result["rows"]:
        ms = 1000 * np.median([o["sample_10k_s"] for o in r["observations"]])
        lines.append(f"| {r['task']} | {r['budget']} | {r['c2st_mean']:.3f} | "
                     + (f"{_fmt(r.get('c2st_quick_mean'))} | " if quick else "")
                     + (f"{fmt_new(r, '')} | " if new_protocol else "")
                     + (f"{fmt_new(r)} | " if new else "")
                     + f"{_fmt(r['published_npe'])} | {_fmt(r.get('published_snpe'))} | "
                     f"{r['train_s']:.1f} | {_kept(r)} | {ms:.1f} |")
    budgets = sorted({r["budget"] for r in result["rows"]})
    tasks = {r["task"] for r in result["rows"]}
    if len(tasks) > 1:
        for b in budgets:
            rs = [r for r in result["rows"] if r["budget"] == b]

            def avg(key, rs=rs):  # "—" where a row lacks the figure
                return _mean_or_dash([r.get(key) for r in rs])

            lines.append(f"| **mean of {len(rs)}** | {b} | {avg('c2st_mean')} | "
                         + (f"{avg('c2st_quick_mean')} | " if quick else "")
                         + (f"{avg('c2st_new_mean')} | " if new_protocol else "")
                         + (f"{avg('c2st_new_quick_mean')} | " if new else "")
                         + f"{avg('published_npe')} | {avg('published_snpe')} | | | |")
    return "\n".join(lines) + "\n"


def pool_new(results: Sequence[dict]) -> dict:
    """The observations of our own of several runs, pooled per (task, budget).

    Each run must have trained the same estimators (the same training seed, ensemble size and
    head options) and scored its new observations under the protocol; an observation that
    appears in two runs (the same x) is refused, so nothing is counted twice. Returns
    ``{"rows": [...], "mean": ...}``: per pair the number of observations, the protocol's and
    the quick score's mean and standard error, and whether every run's estimator had the same
    best validation loss (the same network, trained again); per budget the mean over tasks,
    each task weighted equally, with the standard error of that mean from the per-task ones.
    """
    same = ("seed", "ensemble", "head", "max_epochs", "c2st_draws")
    if not results:
        raise ValueError("results: expected at least one benchmark result; got none")
    first = results[0]["options"]
    for res in results:
        opt = res["options"]
        if not opt.get("new_protocol") or any(opt.get(k) != first.get(k) for k in same):
            raise ValueError(f"results: expected runs with the same {list(same)} that scored "
                             f"new observations under the protocol; got options {opt}")
    pooled: dict[tuple[str, int], dict] = {}
    for res in results:
        for row in res["rows"]:
            entry = pooled.setdefault((row["task"], row["budget"]), {
                "task": row["task"], "budget": row["budget"], "xs": [], "c2st": [],
                "c2st_quick": [], "val_losses": [],
                "published_npe": row.get("published_npe"),
                "published_snpe": row.get("published_snpe")})
            for obs in row.get("new_observations", []):
                if obs["x"] in entry["xs"]:
                    raise ValueError(f"{row['task']}: observation x = {obs['x']} appears in two "
                                     f"runs; expected distinct observations")
                entry["xs"].append(obs["x"])
                entry["c2st"].append(obs["c2st"])
                entry["c2st_quick"].append(obs["c2st_quick"])
            entry["val_losses"].append(row["best_val_loss"])
    rows = []
    for entry in pooled.values():
        mean, se = mean_se(entry["c2st"])
        quick, quick_se = mean_se(entry["c2st_quick"])
        rows.append({"task": entry["task"], "budget": entry["budget"],
                     "n_observations": len(entry["c2st"]),
                     "runs": len(entry["val_losses"]),
                     "c2st_new_mean": mean, "c2st_new_se": se,
                     "c2st_new_quick_mean": quick, "c2st_new_quick_se": quick_se,
                     "same_network": len(set(entry["val_losses"])) == 1,
                     "published_npe": entry["published_npe"],
                     "published_snpe": entry["published_snpe"]})
    means = {}
    for b in sorted({r["budget"] for r in rows}):
        rs = [r for r in rows if r["budget"] == b]
        ses = [r["c2st_new_se"] or 0.0 for r in rs]
        means[str(b)] = {"tasks": len(rs),
                         "c2st_new_mean": float(np.mean([r["c2st_new_mean"] for r in rs])),
                         "c2st_new_se": float(np.sqrt(np.sum(np.square(ses))) / len(rs)),
                         "c2st_new_quick_mean": float(np.mean(
                             [r["c2st_new_quick_mean"] for r in rs]))}
    return {"rows": rows, "mean": means}


def pooled_markdown(pooled: dict, sources: Sequence[str]) -> str:
    """The table of `pool_new`."""
    lines = ["# NPE on sbibm: observations of our own, pooled", "",
             f"New observations of the runs {', '.join(sources)} pooled per task; C2ST under "
             "the published protocol and the quick classifier, mean ± standard error over the "
             "observations. Published: the paper's NPE and SNPE on its shared observations.", "",
             "| task | simulations | observations | new, C2ST | new, quick C2ST | same network "
             "in every run | published NPE | published SNPE |",
             "|---|---|---|---|---|---|---|---|"]
    for r in pooled["rows"]:
        se = "" if r["c2st_new_se"] is None else f" ± {r['c2st_new_se']:.3f}"
        qse = "" if r["c2st_new_quick_se"] is None else f" ± {r['c2st_new_quick_se']:.3f}"
        lines.append(f"| {r['task']} | {r['budget']} | {r['n_observations']} | "
                     f"{r['c2st_new_mean']:.3f}{se} | {r['c2st_new_quick_mean']:.3f}{qse} | "
                     f"{'yes' if r['same_network'] else 'no'} | {_fmt(r['published_npe'])} | "
                     f"{_fmt(r['published_snpe'])} |")
    for b, m in pooled["mean"].items():
        rs = [r for r in pooled["rows"] if str(r["budget"]) == b]
        lines.append(f"| **mean of {m['tasks']}** | {b} | "
                     f"{sum(r['n_observations'] for r in rs)} | "
                     f"**{m['c2st_new_mean']:.3f}** ± {m['c2st_new_se']:.3f} | "
                     f"{m['c2st_new_quick_mean']:.3f} | | "
                     f"{_mean_or_dash([r['published_npe'] for r in rs])} | "
                     f"{_mean_or_dash([r['published_snpe'] for r in rs])} |")
    return "\n".join(lines) + "\n"
