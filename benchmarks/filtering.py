"""Sequential inference with the shipped filtering models, against their exact references.

lti_tracking: `--tracks` simulated tracks of 100 steps from family priors (seed not used in
training); mean NLL per step of the true state for the amortized filter and the exact
Gaussian-sum Kalman filter, by window (steps 1-10, 10-20, 90-100), and per-update latency.

qubit_rabi: `--sequences` sequences of 50 single-shot outcomes; KL(grid || model) after each
outcome; full-rank VI on the final data for comparison; the time of the whole amortized
sequence (one call per outcome, one scan, and the default parallel path) against NUTS rerun
after every outcome (warm, same process), on `--nuts-sequences` sequences.

    python benchmarks/filtering.py [--lti PATH] [--qubit PATH] [--only lti|qubit]

With `--only qubit` the results go to results/filtering_qubit.* (the lti results stay).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import flashbayes as fb
from flashbayes._runtime import limit_blas_threads

SEED = 20261123  # held-out seed (training uses seed 0 and its own folds)
REPEATS = 10  # timed calls of each amortized path per sequence (median kept)


def _load(path, name):
    return fb.load(path) if path else fb.load_pretrained(name)


def lti(model, n_tracks: int, steps: int = 100) -> dict:
    task = model.task
    key = jax.random.key(SEED)
    gaps, nll_dt, nll_kf = [], [], []
    for i in range(n_tracks):
        kp, kx, kt = jax.random.split(jax.random.fold_in(key, i), 3)
        prior = task.sample_problem(kp, n=0).prior
        x0 = np.asarray(prior.sample(kx, 1))[0]
        xs, ys = (np.asarray(a, np.float64) for a in task.simulate_trajectory(kt, x0, steps))
        res = fb.filter(model, prior, ys, key=kt)
        ref = fb.filter("kalman", prior, ys, key=kt, task=task)
        a, b = -res.log_prob(xs), -ref.log_prob(xs)
        nll_dt.append(a)
        nll_kf.append(b)
        gaps.append(a - b)
    g, a, b = np.array(gaps), np.array(nll_dt), np.array(nll_kf)

    def window(lo, hi):
        per_track = g[:, lo:hi].mean(1)
        return {"gap": float(per_track.mean()),
                "se": float(per_track.std(ddof=1) / np.sqrt(len(per_track)))}

    # latency: one update (stream path, warm) and the whole 100-step scan
    prior = task.sample_problem(jax.random.key(1), n=0).prior
    _, ys = task.simulate_trajectory(jax.random.key(2), np.asarray(prior.mean()), steps)
    ys = np.asarray(ys, np.float64)
    stream = fb.Stream(model, prior)
    stream.update(ys[0])
    t_step = []
    for y in ys[1:]:
        t0 = time.perf_counter()
        stream.update(y)
        t_step.append(time.perf_counter() - t0)
    fb.filter(model, prior, ys, key=jax.random.key(0))
    t_scan = []
    for _ in range(20):
        t0 = time.perf_counter()
        fb.filter(model, prior, ys, key=jax.random.key(0))
        t_scan.append(time.perf_counter() - t0)
    t_kf = []
    for _ in range(3):
        t0 = time.perf_counter()
        fb.filter("kalman", prior, ys, key=jax.random.key(0), task=task)
        t_kf.append(time.perf_counter() - t0)
    return {
        "tracks": n_tracks, "steps": steps,
        "nll_model": float(a.mean()), "nll_exact": float(b.mean()),
        "gap_all": window(0, steps), "gap_1_10": window(0, 10), "gap_10_20": window(10, 20),
        "gap_90_100": window(90, 100),
        "drift": float(g[:, 90:100].mean() - g[:, 10:20].mean()),
        "stream_update_ms_median": 1e3 * float(np.median(t_step)),
        "scan_ms_per_step": 1e3 * float(np.median(t_scan)) / steps,
        "kalman_ms_per_step": 1e3 * float(np.median(t_kf)) / steps,
    }


def qubit(model, n_seq: int, n_nuts: int, outcomes: int = 50) -> dict:
    task = model.task
    key = jax.random.key(SEED + 1)
    kls, kls_vi, kl_prior = [], [], []
    for i in range(n_seq):
        kp, kt, kd = jax.random.split(jax.random.fold_in(key, i), 3)
        p = task.sample_problem(kp, n=1)
        ys = np.asarray(task._simulate(kd, jax.numpy.asarray(p.theta, "float32"), outcomes),
                        np.float64)
        res = fb.filter(model, p.prior, ys, key=kt)
        ref = fb.filter("grid", p.prior, ys, key=kt, task=task)
        kls.append([ref[t].kl_to(res[t]) for t in range(outcomes)])
        kl_prior.append(ref[-1].kl_to(p.prior))
        try:
            q = fb.reference.vi(kt, fb.reference.TaskTarget(task, p.prior, ys),
                                family="fullrank")
            kls_vi.append(ref[-1].kl_to(q))
        except FloatingPointError:
            kls_vi.append(float("inf"))
    kls = np.array(kls)
    # time: the whole amortized sequence vs NUTS rerun after each outcome (warm programs)
    runner = fb.reference.TaskNUTS(task, num_warmup=500, num_samples=1000, num_chains=2)
    t_dt, t_scan, t_par, t_nuts = [], [], [], []
    for i in range(n_nuts):
        kp, kd = jax.random.split(jax.random.fold_in(key, 10_000 + i))
        p = task.sample_problem(kp, n=1)
        ys = np.asarray(task._simulate(kd, jax.numpy.asarray(p.theta, "float32"), outcomes),
                        np.float64)
        for method, times in (("step", t_dt), ("scan", t_scan), ("parallel", t_par)):
            fb.filter(model, p.prior, ys, key=kd, method=method)  # warm
            reps = []  # seconds; the median of a few calls is kept
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                fb.filter(model, p.prior, ys, key=kd, method=method)
                reps.append(time.perf_counter() - t0)
            times.append(float(np.median(reps)))
        if i == 0:  # compile every data-size bucket once, outside the timing
            for t in range(outcomes):
                runner.run(jax.random.fold_in(kd, t), p.prior, ys[:t + 1], warn=False)
        t0 = time.perf_counter()
        for t in range(outcomes):
            runner.run(jax.random.fold_in(kd, t), p.prior, ys[:t + 1], warn=False)
        t_nuts.append(time.perf_counter() - t0)
    return {
        "sequences": n_seq, "outcomes": outcomes,
        "kl_final_mean": float(kls[:, -1].mean()), "kl_final_median": float(np.median(kls[:, -1])),
        "kl_final_p90": float(np.quantile(kls[:, -1], 0.9)),
        "kl_step_10_mean": float(kls[:, 9].mean()), "kl_step_25_mean": float(kls[:, 24].mean()),
        "kl_prior_final_mean": float(np.mean(kl_prior)),
        "kl_vi_final_mean": float(np.mean(kls_vi)),
        "kl_vi_final_median": float(np.median(kls_vi)),
        "sequence_seconds_model": float(np.median(t_dt)),
        "sequence_seconds_model_scan": float(np.median(t_scan)),
        "sequence_seconds_model_parallel": float(np.median(t_par)),
        "sequence_seconds_nuts_rerun": float(np.median(t_nuts)),
        "speedup": float(np.median(t_nuts) / np.median(t_dt)),
        "speedup_parallel": float(np.median(t_nuts) / np.median(t_par)),
        "nuts_sequences": n_nuts,
    }


def markdown(res: dict) -> str:
    out = ["## Filtering (`python benchmarks/filtering.py`)", ""]
    if "lti" in res:
        r = res["lti"]
        out += [f"**lti_tracking**: {r['tracks']} held-out tracks of {r['steps']} steps; NLL of "
                "the true state per step, model minus the exact Gaussian-sum Kalman filter "
                "(target: within 0.05, no drift).", "",
                "| window | NLL gap (nats/step) | ± se |", "|---|---|---|"]
        for k, lab in (("gap_all", "all steps"), ("gap_1_10", "1-10"), ("gap_10_20", "10-20"),
                       ("gap_90_100", "90-100")):
            out.append(f"| {lab} | {r[k]['gap']:.4f} | {r[k]['se']:.4f} |")
        out += ["", f"Mean NLL: model {r['nll_model']:.3f}, exact {r['nll_exact']:.3f}. Drift "
                f"(gap at 90-100 minus gap at 10-20): {r['drift']:+.4f}. One stream update "
                f"{r['stream_update_ms_median']:.3f} ms (median); scan "
                f"{r['scan_ms_per_step']:.3f} ms/step; exact float64 Kalman "
                f"{r['kalman_ms_per_step']:.3f} ms/step.", ""]
    if "qubit" in res:
        r = res["qubit"]
        out += [f"**qubit_rabi**: {r['sequences']} held-out sequences of {r['outcomes']} "
                "outcomes; KL(grid ‖ model) (target after 50: ≤ 0.1).", "",
                "| after | KL mean |", "|---|---|",
                f"| 10 outcomes | {r['kl_step_10_mean']:.4f} |",
                f"| 25 outcomes | {r['kl_step_25_mean']:.4f} |",
                f"| 50 outcomes | {r['kl_final_mean']:.4f} (median {r['kl_final_median']:.4f},"
                f" p90 {r['kl_final_p90']:.4f}) |", "",
                f"For scale: KL(grid ‖ prior) after 50 outcomes {r['kl_prior_final_mean']:.3f}; "
                f"full-rank VI on the 50 outcomes {r['kl_vi_final_mean']:.4f} (median "
                f"{r['kl_vi_final_median']:.4f}). Whole sequence against NUTS (2 chains × "
                f"1,000, warm) rerun after each outcome, "
                f"{r['sequence_seconds_nuts_rerun']:.2f} s (median of {r['nuts_sequences']} "
                f"sequences; each model path: the median of {REPEATS} calls per sequence):",
                "", "| model path | ms per sequence | × faster than NUTS rerun |", "|---|---|---|",
                f"| one call per outcome (stream) | {1e3 * r['sequence_seconds_model']:.1f} | "
                f"{r['speedup']:.0f} |",
                f"| one scan | {1e3 * r['sequence_seconds_model_scan']:.1f} | "
                f"{r['sequence_seconds_nuts_rerun'] / r['sequence_seconds_model_scan']:.0f} |",
                f"| parallel over the window's steps (default) | "
                f"{1e3 * r['sequence_seconds_model_parallel']:.1f} | "
                f"**{r['speedup_parallel']:.0f}** |", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lti", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--qubit", default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--tracks", type=int, default=200)
    ap.add_argument("--sequences", type=int, default=100)
    ap.add_argument("--nuts-sequences", type=int, default=3)
    ap.add_argument("--only", choices=["lti", "qubit"], default=None)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    limit_blas_threads()
    res = {}
    if args.only in (None, "lti"):
        res["lti"] = lti(_load(args.lti, "lti_tracking"), args.tracks)
    from flashbayes.amortized import PRETRAINED

    # the qubit part needs a trained model: a checkpoint, or the shipped one once it exists
    if args.only == "qubit" or (args.only is None and (args.qubit or "qubit_rabi" in PRETRAINED)):
        res["qubit"] = qubit(_load(args.qubit, "qubit_rabi"), args.sequences,
                             args.nuts_sequences)
    md = markdown(res)
    print(md)
    if not args.no_save:
        from _docs import save

        # the qubit part alone goes to its own file, so the lti results stay as they are
        save("filtering_qubit" if args.only == "qubit" else "filtering", res, md)


if __name__ == "__main__":
    main()
