"""`flashbayes bench posteriordb`: NUTS, full-rank VI and NumPyro's NUTS against the references.

For every posterior: our BlackJAX NUTS (first call with compilation, then a warm call with a
new key), NumPyro's NUTS as a user runs it (a fresh `MCMC`, compilation included) and full-rank
VI. Each is compared with the reference draws per parameter (|mean - ref mean| / ref sd and
sd / ref sd) and, for our NUTS, by C2ST on all parameters. A second table reruns three models
on new data sets of the same shape, where our program is reused and NumPyro compiles again.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes.reference._base import convergence_summary, flatten_sites

# NUTS settings per posterior, chosen as posteriordb's own runs did (adapt_delta), because the
# posterior is a strongly correlated linear model (dense mass matrix), or because the log density
# runs an adaptive-step ODE solve (Lotka-Volterra). There, the solve's step count differs from
# chain to chain (vmapped, every chain would wait for the slowest one in each solve), so the chains
# run one after another; and a chain started at an extreme point of Stan's [-2, 2] rule can stay
# there with a step size near 1e-7 and 1,023-step trajectories (seed 0 does: theta = (0.71, 3.05,
# 3.77, 0.25), log density -41,597), so each chain starts at the best of 16 such points (STARTS).
# SETTINGS holds `nuts` keyword arguments only; the results record both.
SETTINGS: dict[str, dict[str, Any]] = {
    "eight_schools-eight_schools_centered": {"target_accept": 0.95},
    "eight_schools-eight_schools_noncentered": {"target_accept": 0.95},
    "gp_pois_regr-gp_pois_regr": {"target_accept": 0.99},
    "hudson_lynx_hare-lotka_volterra": {"target_accept": 0.95, "chain_method": "sequential"},
    "diamonds-diamonds": {"dense_mass": True},
    "kilpisjarvi_mod-kilpisjarvi": {"dense_mass": True},
    "sblrc-blr": {"dense_mass": True},
}
# how chains start, where not by the engine's own rule (see `_initial_positions`)
STARTS: dict[str, str] = {"hudson_lynx_hare-lotka_volterra": "best_of_16"}
C2ST_DRAWS = 4000
REPEAT_MODELS = ("kidiq-kidscore_momiq", "arK-arK", "eight_schools-eight_schools_noncentered")


def moment_errors(flat: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per reference parameter: |mean - ref mean| / ref sd and sd / ref sd."""
    out = {}
    for name, r in ref.items():
        r = np.asarray(r, np.float64).reshape(-1)
        x = np.asarray(flat[name], np.float64).reshape(-1)
        sd = r.std(ddof=1)
        out[name] = {"mean_err": float(abs(x.mean() - r.mean()) / sd),
                     "sd_ratio": float(x.std(ddof=1) / sd)}
    return out


def _worst(errors: dict[str, dict]) -> dict[str, float]:
    m = [e["mean_err"] for e in errors.values()]
    s = [e["sd_ratio"] for e in errors.values()]
    return {"max_mean_err": float(np.max(m)), "min_sd_ratio": float(np.min(s)),
            "max_sd_ratio": float(np.max(s))}


def _ess(summary: dict[str, dict], names) -> float:
    return float(min(min(summary[n]["ess_bulk"], summary[n]["ess_tail"]) for n in names))


def _initial_positions(key, target, num_chains: int, how: str | None):
    """Unconstrained starting points, or None for the engine's own (Stan's uniform [-2, 2]).

    "best_of_16": per chain, the highest-density point of 16 drawn by Stan's rule.
    """
    if how is None:
        return None
    if how != "best_of_16":
        raise ValueError(f"init: expected None or 'best_of_16'; got {how!r}")
    cand = jax.random.uniform(key, (num_chains, 16, target.dim), minval=-2.0, maxval=2.0)
    ld = jax.vmap(jax.vmap(lambda z: target.log_density(z, target.data)))(cand)
    ld = jnp.where(jnp.isfinite(ld), ld, -jnp.inf)
    return cand[jnp.arange(num_chains), jnp.argmax(ld, axis=1)]


def _numpyro_nuts(key, model, data, settings, num_warmup, num_samples, num_chains, init=None,
                  target=None):
    """NumPyro's NUTS as a user runs it; `init` (unconstrained, from `target`) if given."""
    from numpyro.infer import MCMC, NUTS

    kernel = NUTS(model, target_accept_prob=settings.get("target_accept", 0.8),
                  dense_mass=settings.get("dense_mass", False))
    mcmc = MCMC(kernel, num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                chain_method="sequential", progress_bar=False)
    init_params = None if init is None else jax.vmap(target._unravel)(init)
    t0 = time.perf_counter()
    mcmc.run(key, **data, extra_fields=("num_steps", "diverging"), init_params=init_params)
    samples = jax.block_until_ready(mcmc.get_samples(group_by_chain=True))
    seconds = time.perf_counter() - t0
    extra = mcmc.get_extra_fields()
    return ({k: np.asarray(v) for k, v in samples.items()}, seconds,
            int(np.sum(extra["num_steps"])), int(np.sum(extra["diverging"])))


def run_posterior(name: str, *, seed: int = 0, num_warmup: int = 1000, num_samples: int = 2500,
                  num_chains: int = 4, with_c2st: bool = True, with_numpyro: bool = True,
                  with_vi: bool = True) -> dict[str, Any]:
    """Benchmark one posteriordb posterior; returns a JSON-ready dict."""
    from flashbayes.benchmarks import posteriordb
    from flashbayes.diagnostics import c2st
    from flashbayes.reference import NumPyroTarget, diagnose, nuts

    entry = posteriordb.get(name)
    ref = {k: np.asarray(v).reshape(-1) for k, v in entry.reference_draws().items()}
    names = list(entry.param_names)
    settings = SETTINGS.get(name, {})
    key = jax.random.key(seed)
    k1, k3, k4 = jax.random.split(key, 3)
    start = STARTS.get(name)
    out: dict[str, Any] = {"name": name, "n_params": len(names),
                           "settings": {**settings, **({"init": start} if start else {})}}

    opts = {"num_warmup": num_warmup, "num_samples": num_samples, "num_chains": num_chains,
            "warn": False, **settings}
    # the first call, compilation included, as a user meets it (warm runs: `run_repeated`)
    t0 = time.perf_counter()
    target = NumPyroTarget(entry.model, entry.data)
    init = _initial_positions(jax.random.fold_in(k1, 1), target, num_chains, start)
    post = nuts(k1, target, init=init, **opts)
    first = time.perf_counter() - t0
    flat = post.flat_draws()
    summary = post.info["summary"]
    errs = moment_errors(flat, ref)
    ess = _ess(summary, names)
    res = {"seconds_first_call": first, "seconds_sampling": post.info["seconds"],
           "divergences": post.divergences,
           "max_rhat": float(max(summary[n]["rhat"] for n in names)),
           "min_ess": ess, "ess_per_second_first_call": ess / first,
           "gradient_evaluations": post.info["gradient_evaluations"],
           "ess_per_gradient": ess / post.info["gradient_evaluations"],
           "problems": diagnose(post), **_worst(errs), "per_param": errs}
    if with_c2st:
        # C2ST on C2ST_DRAWS random draws of each set, the MLP fit with early stopping: the
        # full 10,000 + 10,000 protocol costs many minutes per posterior on 2 cores
        rng = np.random.default_rng(seed)
        x = np.stack([ref[n] for n in names], axis=1)
        y = np.stack([flat[n] for n in names], axis=1)
        x = x[rng.permutation(len(x))[:C2ST_DRAWS]]
        y = y[rng.permutation(len(y))[:C2ST_DRAWS]]
        res["c2st"] = c2st(x, y, early_stopping=True)
        res["c2st_draws"] = len(x)
    out["nuts"] = res

    if with_numpyro:
        samples, seconds, steps, div = _numpyro_nuts(
            k3, entry.model, entry.data, settings, num_warmup, num_samples, num_chains,
            init=init, target=target)
        nflat = {k: v.reshape(-1) for k, v in flatten_sites(samples).items()}
        nsum = convergence_summary(samples)
        nerrs = moment_errors(nflat, ref)
        ness = _ess(nsum, names)
        out["numpyro"] = {"seconds_first_call": seconds, "divergences": div, "min_ess": ness,
                          "ess_per_second_first_call": ness / seconds,
                          "sampling_gradient_evaluations": steps,
                          **_worst(nerrs)}
    if with_vi:
        out["vi"] = run_vi(entry, ref, k4, start)
    return out


def run_vi(entry, ref, key, start: str | None = None) -> dict[str, Any]:
    """Full-rank VI on one posterior, compared with the reference draws (`run_posterior`'s VI
    column). `start` as in STARTS: VI then starts from the same kind of point as NUTS."""
    from flashbayes.reference import NumPyroTarget, vi

    target = NumPyroTarget(entry.model, entry.data)
    init = _initial_positions(jax.random.fold_in(key, 1), target, 1, start)
    init = None if init is None else init[0]
    vi_start = "laplace" + (f" from {start}" if start else "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                q = vi(key, target, family="fullrank", num_draws=10000, init=init)
            except TypeError as exc:
                # the Laplace start takes a Hessian by forward-over-reverse autodiff, which an
                # ODE solve differentiated in reverse mode only (diffrax) does not allow:
                # start from VI's default point instead
                if "forward-mode" not in str(exc):
                    raise
                vi_start = ((start or "default") + " point, no Laplace fit (no forward-mode "
                            "derivative)")
                q = vi(key, target, family="fullrank", num_draws=10000, init=init,
                       laplace_init=False)
    except FloatingPointError as exc:
        return {"error": str(exc), "khat": float("inf"), "start": vi_start}
    verrs = moment_errors(q.flat_draws(), ref)
    return {"seconds": q.info["seconds"], "khat": q.info["khat"], "steps": q.info["steps"],
            "start": vi_start, **_worst(verrs), "per_param": verrs}


def _jitter(key, data: dict) -> dict:
    """New data of the same shape: every real-valued array times (1 + 0.01 N(0, 1))."""
    new = {}
    for k, v in data.items():
        if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating):
            key, sub = jax.random.split(key)
            new[k] = v * (1.0 + 0.01 * np.asarray(jax.random.normal(sub, v.shape)))
        else:
            new[k] = v
    return new


def run_repeated(name: str, *, repeats: int = 3, seed: int = 0, num_warmup: int = 1000,
                 num_samples: int = 1000, num_chains: int = 4) -> dict[str, Any]:
    """Our NUTS vs NumPyro's on `repeats` new data sets of one shape (ESS per second)."""
    from flashbayes.benchmarks import posteriordb
    from flashbayes.reference import NumPyroTarget, nuts

    entry = posteriordb.get(name)
    names = list(entry.param_names)
    settings = SETTINGS.get(name, {})
    opts = {"num_warmup": num_warmup, "num_samples": num_samples, "num_chains": num_chains,
            "warn": False, **settings}
    start = STARTS.get(name)
    key = jax.random.key(seed)
    target = NumPyroTarget(entry.model, entry.data)
    init = _initial_positions(jax.random.fold_in(key, 1), target, num_chains, start)
    nuts(key, target, init=init, **opts)  # compile once, not timed
    ours, theirs = [], []
    for _ in range(repeats):
        key, kd, ka, kb = jax.random.split(key, 4)
        data = _jitter(kd, entry.data)
        target = NumPyroTarget(entry.model, data)
        init = _initial_positions(jax.random.fold_in(ka, 1), target, num_chains, start)
        post = nuts(ka, target, init=init, **opts)
        ours.append((post.info["seconds"], _ess(post.info["summary"], names)))
        samples, seconds, _, _ = _numpyro_nuts(kb, entry.model, data, settings, num_warmup,
                                               num_samples, num_chains, init=init,
                                               target=target)
        theirs.append((seconds, _ess(convergence_summary(samples), names)))
    ours_rate = float(np.mean([e / s for s, e in ours]))
    theirs_rate = float(np.mean([e / s for s, e in theirs]))
    return {"name": name, "repeats": repeats,
            "blackjax_seconds": [s for s, _ in ours], "blackjax_min_ess": [e for _, e in ours],
            "numpyro_seconds": [s for s, _ in theirs], "numpyro_min_ess": [e for _, e in theirs],
            "blackjax_ess_per_second": ours_rate, "numpyro_ess_per_second": theirs_rate,
            "ratio": ours_rate / theirs_rate}


def run(names: list[str] | None = None, *, seed: int = 0, repeated: bool = True,
        progress: Callable[[str], None] | None = None, journal: Path | None = None,
        **options: Any) -> dict[str, Any]:
    """The whole benchmark: one row per posterior, then the repeated-runs comparison.

    With `journal`, each finished row is appended to that JSON-lines file as soon as it is done,
    and rows already there (same seed and options) are reused: an interrupted run continues
    where it stopped.
    """
    from flashbayes.benchmarks import posteriordb

    names = names or posteriordb.names()
    stamp = json.dumps({"seed": seed, **options}, sort_keys=True)
    done: dict[str, dict] = {}
    if journal is not None and journal.exists():
        for line in journal.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if row.get("stamp") == stamp:
                done[row["key"]] = row["result"]

    def step(key: str, fn: Callable[[], dict]) -> dict:
        if key in done:
            return done[key]
        if progress:
            progress(key)
        result = fn()
        if journal is not None:
            with journal.open("a") as f:
                f.write(json.dumps({"stamp": stamp, "key": key, "result": result}) + "\n")
        return result

    rows = [step(name, lambda n=name: run_posterior(n, seed=seed, **options)) for name in names]
    out: dict[str, Any] = {"posteriors": rows, "seed": seed}
    if repeated:
        out["repeated"] = [step(f"repeated: {name}", lambda n=name: run_repeated(n, seed=seed))
                           for name in REPEAT_MODELS if name in names]
    return out


def markdown(result: dict[str, Any]) -> str:
    """The tables of a `run` result as markdown."""
    lines = ["| posterior | params | NUTS max mean err / sd | NUTS sd ratio | C2ST | R-hat max | "
             "div. | ESS/s (first call) | ESS/grad | NUTS s (first call / in program) | "
             "NumPyro s | "
             "NumPyro max err | VI k-hat | VI max mean err / sd | VI sd ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["posteriors"]:
        n, p, v = r["nuts"], r.get("numpyro", {}), r.get("vi", {})
        if "error" in v:
            v = {}
        c2 = f"{n['c2st']:.3f}" if "c2st" in n else "-"
        lines.append(
            f"| {r['name']} | {r['n_params']} | {n['max_mean_err']:.3f} | "
            f"{n['min_sd_ratio']:.2f}-{n['max_sd_ratio']:.2f} | {c2} | {n['max_rhat']:.3f} | "
            f"{n['divergences']} | {n['ess_per_second_first_call']:.0f} | "
            f"{n['ess_per_gradient']:.4f} | {n['seconds_first_call']:.1f} / "
            f"{n['seconds_sampling']:.1f} | "
            + (f"{p['seconds_first_call']:.1f} | {p['max_mean_err']:.3f} | " if p else "- | - | ")
            + (f"{v['khat']:.2f} | {v['max_mean_err']:.3f} | {v['min_sd_ratio']:.2f}-"
               f"{v['max_sd_ratio']:.2f} |" if v else "- | - | - |"))
    if result.get("repeated"):
        lines += ["", "| posterior (new data, same shape) | BlackJAX ESS/s | NumPyro ESS/s | "
                      "ratio |", "|---|---|---|---|"]
        for r in result["repeated"]:
            lines.append(f"| {r['name']} | {r['blackjax_ess_per_second']:.0f} | "
                         f"{r['numpyro_ess_per_second']:.0f} | {r['ratio']:.1f}x |")
    return "\n".join(lines) + "\n"
