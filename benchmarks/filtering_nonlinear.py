"""nonlinear_tracking: the amortized filter against Gaussian-sum EKF and UKF and a bootstrap
particle filter (range and bearing from a sensor at the origin; docs/nonlinear_tracking.md).

`--tracks` held-out tracks of `--steps` steps from family priors (seed not used in training):
mean NLL per step of the true state for the model, the EKF, the UKF and the particle filter
with 10^4 particles, by window (steps 1-10, 11-50, 51-100), with standard errors over tracks of
the per-track gaps. On the first `--big-tracks` tracks also a 10^5-particle filter, which shows
how far the 10^4-particle filter's density is from its limit. After the first observation, where
the exact density is known up to a constant, KL(exact || method) on `--first-tracks` tracks.
The particle filter on lti_tracking against the exact Kalman filter (`--lti-tracks` tracks).
Per-update latency of the model
and of the particle filter, measured side by side (interleaved) in this process: one update
(model: `fb.Stream.update`; particle filter: one compiled step, 10^4 particles, without the
bookkeeping of its density) and a whole run divided by its steps (model: `fb.filter` scan;
particle filter: its compiled scan).

    python benchmarks/filtering_nonlinear.py [--model PATH] [--tracks 60] [--big-tracks 10]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import flashbayes as fb
from flashbayes._runtime import limit_blas_threads
from flashbayes.reference._nonlinear_filters import ParticleFilter

SEED = 20261123 + 2  # held-out seed (training uses seed 0 and its own folds)
WINDOWS = (("all", 0, None), ("1-10", 0, 10), ("11-50", 10, 50), ("51-100", 50, 100))


def _load(path):
    return fb.load(path) if path else fb.load_pretrained("nonlinear_tracking")


def accuracy(model, n_tracks: int, steps: int, n_big: int, particles: int) -> dict:
    task = model.task
    sim = jax.jit(task.simulate_trajectory, static_argnums=2)
    key = jax.random.key(SEED)
    nll = {m: [] for m in ("model", "ekf", "ukf", "pf")}
    nll_big, nll_pf_small = [], []
    ess_min = []
    for i in range(n_tracks):
        kp, kx, kt, kf = jax.random.split(jax.random.fold_in(key, i), 4)
        prior = task.sample_problem(kp, n=0).prior
        x0 = np.asarray(prior.sample(kx, 1))[0]
        xs, ys = (np.asarray(a, np.float64) for a in sim(kt, x0, steps))
        nll["model"].append(-fb.filter(model, prior, ys, key=kf).log_prob(xs))
        for name in ("ekf", "ukf"):
            nll[name].append(-fb.filter(name, prior, ys, key=kf, task=task).log_prob(xs))
        pf = fb.filter("particle", prior, ys, key=kf, task=task, num_particles=particles)
        nll["pf"].append(-pf.log_prob(xs))
        ess_min.append(min(p.ess for p in pf))
        if i < n_big:
            big = fb.filter("particle", prior, ys, key=jax.random.fold_in(kf, 1), task=task,
                            num_particles=10 * particles)
            nll_big.append(-big.log_prob(xs))
            nll_pf_small.append(nll["pf"][-1])
    a = {m: np.array(v) for m, v in nll.items()}  # (tracks, steps)

    def window(x, lo, hi):
        per_track = x[:, lo:hi].mean(1)
        return {"mean": float(per_track.mean()),
                "se": float(per_track.std(ddof=1) / np.sqrt(len(per_track)))}

    res = {"tracks": n_tracks, "steps": steps, "particles": particles,
           "pf_min_ess_median": float(np.median(ess_min))}
    for lab, lo, hi in WINDOWS:
        res[lab] = {
            "nll": {m: float(v[:, lo:hi].mean()) for m, v in a.items()},
            "model_minus_pf": window(a["model"] - a["pf"], lo, hi),
            "model_minus_ekf": window(a["model"] - a["ekf"], lo, hi),
            "model_minus_ukf": window(a["model"] - a["ukf"], lo, hi),
            "ekf_minus_pf": window(a["ekf"] - a["pf"], lo, hi),
        }
    res["tracks_model_better_than_ekf"] = float(np.mean(a["model"].mean(1) < a["ekf"].mean(1)))
    if n_big:
        big, small = np.array(nll_big), np.array(nll_pf_small)
        res["big"] = {"tracks": n_big, "particles": 10 * particles,
                      "pf_minus_big": window(small - big, 0, None),
                      "model_minus_big": window(a["model"][:n_big] - big, 0, None),
                      "nll_big": float(big.mean())}
    return res


def first_step(model, n_tracks: int, particles: int) -> dict:
    """KL(exact || method) after the first observation, where the exact filtering density is
    known up to a constant (likelihood times the predicted GMM prior): normaliser from 10^6
    draws of the predicted prior, 2,000 exact draws by weighted resampling of them."""
    task = model.task
    loglik = jax.jit(jax.vmap(lambda x, y: task.log_likelihood(x, y[None]), in_axes=(0, None)))
    sim = jax.jit(task.simulate_trajectory, static_argnums=2)
    key = jax.random.key(SEED)
    kl = {m: [] for m in ("model", "ekf", "ukf", "pf")}
    for i in range(n_tracks):
        kp, kx, kt, kf = jax.random.split(jax.random.fold_in(key, i), 4)
        prior = task.sample_problem(kp, n=0).prior
        x0 = np.asarray(prior.sample(kx, 1))[0]
        _, ys = sim(kt, x0, 1)
        ys = np.asarray(ys, np.float64)
        pred = task.transition(prior)
        z = pred.sample(jax.random.fold_in(kf, 2), 1_000_000)
        lw = np.asarray(loglik(z, jax.numpy.asarray(ys[0], "float32")), np.float64)
        log_z = np.logaddexp.reduce(lw) - np.log(len(lw))
        w = np.exp(lw - lw.max())
        draws = np.asarray(z)[np.random.default_rng(i).choice(len(w), 2000, p=w / w.sum())]
        log_p = (np.asarray(loglik(jax.numpy.asarray(draws), jax.numpy.asarray(ys[0], "float32")),
                            np.float64) + np.asarray(pred.log_prob(draws), np.float64) - log_z)
        posts = {"model": fb.filter(model, prior, ys, key=kf)[0],
                 "ekf": fb.filter("ekf", prior, ys, key=kf, task=task)[0],
                 "ukf": fb.filter("ukf", prior, ys, key=kf, task=task)[0],
                 "pf": fb.filter("particle", prior, ys, key=kf, task=task,
                                 num_particles=particles)[0]}
        for m, post in posts.items():
            kl[m].append(float(np.mean(log_p - np.asarray(post.log_prob(draws), np.float64))))
    return {"tracks": n_tracks,
            **{m: {"mean": float(np.mean(v)), "median": float(np.median(v)),
                   "max": float(np.max(v))} for m, v in kl.items()}}


def lti_check(n_tracks: int, steps: int, particles: int) -> dict:
    """The particle filter on lti_tracking against the exact Gaussian-sum Kalman filter: NLL of
    the true state per step, and KL(exact || particle density) at the last step from 2,000
    exact draws (what the particle density's own error is where the answer is known)."""
    task = fb.tasks.get("lti_tracking")
    sim = jax.jit(task.simulate_trajectory, static_argnums=2)
    key = jax.random.key(SEED + 3)
    gaps, kls = [], []
    for i in range(n_tracks):
        kp, kx, kt, kf = jax.random.split(jax.random.fold_in(key, i), 4)
        prior = task.sample_problem(kp, n=0).prior
        x0 = np.asarray(prior.sample(kx, 1))[0]
        xs, ys = (np.asarray(a, np.float64) for a in sim(kt, x0, steps))
        ref = fb.filter("kalman", prior, ys, key=kf, task=task)
        pf = fb.filter("particle", prior, ys, key=kf, task=task, num_particles=particles)
        gaps.append(np.mean(ref.log_prob(xs) - pf.log_prob(xs)))
        pts = np.asarray(ref[-1].sample(kf, 2000), np.float64)
        kls.append(float(np.mean(np.asarray(ref[-1].log_prob(pts), np.float64)
                                 - pf[-1].log_prob(pts))))
    g = np.array(gaps)
    return {"tracks": n_tracks, "steps": steps, "particles": particles,
            "nll_gap": float(g.mean()), "nll_gap_se": float(g.std(ddof=1) / np.sqrt(len(g))),
            "kl_last_mean": float(np.mean(kls)), "kl_last_max": float(np.max(kls))}


def latency(model, steps: int, particles: int, reps: int) -> dict:
    """Model and particle filter timed alternately on the same track (both warm)."""
    task = model.task
    prior = task.sample_problem(jax.random.key(SEED + 1), n=0).prior
    _, ys = task.simulate_trajectory(jax.random.key(SEED + 2), np.asarray(prior.mean()), steps)
    ys = np.asarray(ys, np.float64)
    obs = np.ones(steps, bool)
    pf = ParticleFilter.get(task, particles, density=False)  # the plain bootstrap filter
    state0 = pf.init(jax.random.key(0), prior)
    # warm every program once
    stream = fb.Stream(model, prior)
    stream.update(ys[0])
    jax.block_until_ready(pf.step(jax.random.key(1), state0, ys[0], True))
    fb.filter(model, prior, ys, key=jax.random.key(0))
    jax.block_until_ready(pf.run(jax.random.key(2), state0, ys, obs))
    t_dt, t_pf, t_dt_run, t_pf_run = [], [], [], []
    state = state0
    for r in range(reps):
        y = ys[1 + r % (steps - 1)]
        t0 = time.perf_counter()
        stream.update(y)
        t_dt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state, _ = jax.block_until_ready(pf.step(jax.random.key(r), state, y, True))
        t_pf.append(time.perf_counter() - t0)
    for r in range(max(3, reps // 50)):
        t0 = time.perf_counter()
        fb.filter(model, prior, ys, key=jax.random.key(r))
        t_dt_run.append((time.perf_counter() - t0) / steps)
        t0 = time.perf_counter()
        jax.block_until_ready(pf.run(jax.random.key(r), state0, ys, obs))
        t_pf_run.append((time.perf_counter() - t0) / steps)
    med = {k: 1e3 * float(np.median(v)) for k, v in (("model_update_ms", t_dt),
                                                       ("pf_update_ms", t_pf),
                                                       ("model_run_ms_per_step", t_dt_run),
                                                       ("pf_run_ms_per_step", t_pf_run))}
    med["ratio_update"] = med["pf_update_ms"] / med["model_update_ms"]
    med["ratio_run"] = med["pf_run_ms_per_step"] / med["model_run_ms_per_step"]
    med["reps"] = reps
    return med


def markdown(res: dict) -> str:
    acc, lat, first, lti = res["accuracy"], res["latency"], res["first_step"], res["lti_check"]
    out = ["## nonlinear_tracking (`python benchmarks/filtering_nonlinear.py`)", "",
           f"{acc['tracks']} held-out tracks of {acc['steps']} steps from family priors; mean NLL "
           "of the true state per step (nats; lower is better). Gaps are per-track means "
           "± their standard error over tracks.", "",
           "| steps | model | EKF | UKF | PF 10^4 | model − PF | model − EKF | EKF − PF |",
           "|---|---|---|---|---|---|---|---|"]
    for lab, _, _ in WINDOWS:
        r = acc[lab]
        n = r["nll"]
        out.append(f"| {lab} | {n['model']:.3f} | {n['ekf']:.3f} | {n['ukf']:.3f} | "
                   f"{n['pf']:.3f} | {r['model_minus_pf']['mean']:+.3f} ± "
                   f"{r['model_minus_pf']['se']:.3f} | {r['model_minus_ekf']['mean']:+.3f} ± "
                   f"{r['model_minus_ekf']['se']:.3f} | {r['ekf_minus_pf']['mean']:+.3f} ± "
                   f"{r['ekf_minus_pf']['se']:.3f} |")
    out += ["", f"The model's mean NLL is lower than the EKF's on "
            f"{100 * acc['tracks_model_better_than_ekf']:.0f} % of the tracks. Particle filter: "
            f"median over tracks of its smallest effective sample size "
            f"{acc['pf_min_ess_median']:.0f}."]
    if "big" in acc:
        b = acc["big"]
        out += ["", f"On the first {b['tracks']} tracks, against a {b['particles']:,}-particle "
                f"filter (NLL {b['nll_big']:.3f}): PF 10^4 minus it "
                f"{b['pf_minus_big']['mean']:+.3f} ± {b['pf_minus_big']['se']:.3f}, model minus "
                f"it {b['model_minus_big']['mean']:+.3f} ± {b['model_minus_big']['se']:.3f} "
                "nats/step."]
    out += ["", f"After the first observation, where the exact density is known (likelihood × "
            f"predicted GMM prior; {first['tracks']} tracks): KL(exact ‖ method), mean (median, "
            "max):", "", "| model | EKF | UKF | PF 10^4 |", "|---|---|---|---|",
            "| " + " | ".join(f"{first[m]['mean']:.3f} ({first[m]['median']:.3f}, "
                             f"{first[m]['max']:.2f})" for m in ("model", "ekf", "ukf", "pf"))
            + " |"]
    out += ["", f"The particle filter where the answer is exact (lti_tracking, {lti['tracks']} "
            f"tracks of {lti['steps']} steps, {lti['particles']:,} particles): NLL of the true "
            f"state {lti['nll_gap']:+.3f} ± {lti['nll_gap_se']:.3f} nats/step above the exact "
            "Kalman filter; KL(exact ‖ particle density) at the last step "
            f"{lti['kl_last_mean']:.3f} on average (max {lti['kl_last_max']:.3f})."]
    out += ["", "Per-update latency, measured side by side (median of "
            f"{lat['reps']} interleaved updates; whole 100-step runs divided by 100):", "",
            "| path | model (ms) | PF 10^4 (ms) | PF / model |", "|---|---|---|---|",
            f"| one update | {lat['model_update_ms']:.3f} | {lat['pf_update_ms']:.3f} | "
            f"{lat['ratio_update']:.0f}× |",
            f"| whole run, per step | {lat['model_run_ms_per_step']:.3f} | "
            f"{lat['pf_run_ms_per_step']:.3f} | {lat['ratio_run']:.0f}× |", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--tracks", type=int, default=60)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--big-tracks", type=int, default=10)
    ap.add_argument("--particles", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--first-tracks", type=int, default=20)
    ap.add_argument("--lti-tracks", type=int, default=20)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    limit_blas_threads()
    model = _load(args.model)
    res = {"accuracy": accuracy(model, args.tracks, args.steps, args.big_tracks,
                                args.particles),
           "first_step": first_step(model, args.first_tracks, args.particles),
           "lti_check": lti_check(args.lti_tracks, args.steps, args.particles),
           "latency": latency(model, args.steps, args.particles, args.reps),
           "model": args.model or "shipped nonlinear_tracking"}
    md = markdown(res)
    print(md)
    if not args.no_save:
        from _docs import save

        save("filtering_nonlinear", res, md)


if __name__ == "__main__":
    main()
