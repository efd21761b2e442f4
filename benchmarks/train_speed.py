"""Training speed of each shipped configuration on this machine, measured alone.

Usage:
    python benchmarks/train_speed.py [--steps 300]

Trains each task for a few hundred steps with the shipped settings (the first 50 steps, which
include compilation, are left out of the rate) and projects the time of the shipped run from the
measured steps/s. Writes benchmarks/results/train_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax

import flashbayes as fb

SHIPPED_STEPS = {"gmm_linear": 22_000, "gaussian_variance": 8_000, "logistic_regression": 14_000}
RESULTS = Path(__file__).resolve().parent / "results"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    rows = {}
    for name, shipped in SHIPPED_STEPS.items():
        stamps = {}

        def cb(ev, stamps=stamps):
            stamps[ev.step] = time.perf_counter()

        cfg = fb.TrainConfig(steps=args.steps, log_every=50)
        t0 = time.perf_counter()
        fb.train(name, cfg, key=jax.random.key(1), callback=cb)
        total = time.perf_counter() - t0
        rate = (args.steps - 50) / (stamps[args.steps] - stamps[50])
        shipped_meta = fb.load_pretrained(name).meta
        rows[name] = {"steps_per_second": rate, "setup_and_compile_s": stamps[50] - t0 - 50 / rate,
                      "measured_run_s": total, "shipped_steps": shipped,
                      "projected_shipped_minutes": shipped / rate / 60,
                      "shipped_recorded_minutes": (shipped_meta.get("train_seconds") or 0) / 60}
    out = {"machine": f"{os.cpu_count()} CPUs", "jax": jax.__version__, "tasks": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(out, indent=2))
    lines = ["| task | steps/s alone | shipped steps | projected time alone | recorded time "
             "(runs shared the machine) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['steps_per_second']:.1f} | {r['shipped_steps']} | "
                     f"{r['projected_shipped_minutes']:.1f} min | "
                     f"{r['shipped_recorded_minutes']:.1f} min |")
    md = "\n".join(lines) + "\n"
    (RESULTS / "train_speed.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
