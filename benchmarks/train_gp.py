"""Train the PFN for the `gp_hyperprior` task (the shipped hyperprior by default).

    OPENBLAS_NUM_THREADS=1 python benchmarks/train_gp.py --out /work/scratch/runs/gp_pfn \
        --steps 4000 --batch-size 32

Writes checkpoints `ckpt_XXXXXXXX.safetensors` (header: task, task parameters, PFN config,
train config) into --out, and progress lines (JSON) into --out/progress.jsonl. --resume continues
from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from flashbayes import tasks
from flashbayes.amortized import TrainConfig, fit_network, request_cpu_devices
from flashbayes.amortized._pfn import (
    PFN,
    PFNConfig,
    frame_borders,
    load_pfn,
    pfn_expected_loss,
    pfn_loss,
    prior_borders,
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-query", type=int, default=50)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--buckets", type=int, default=1000)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp-ratio", type=int, default=2)
    ap.add_argument("--head", choices=["bar", "gmm"], default="bar",
                    help="bar (the PFN) or gmm (the Distribution Transformer variant)")
    ap.add_argument("--components", type=int, default=10, help="mixture components (gmm)")
    ap.add_argument("--kernel", default="rbf")
    ap.add_argument("--x-dim", type=int, default=1)
    ap.add_argument("--loss", choices=["sample", "expected"], default="sample",
                    help="sample: -log q(y*) of the drawn query values; expected: -E[log q(y*)] "
                         "under the exact predictive given the true hyperparameters (the same "
                         "minimiser, no noise from y*)")
    ap.add_argument("--y-standardize", action="store_true",
                    help="read y in each data set's own frame (context mean and sd shrunk to "
                         "the prior predictive's by one pseudo-point; PFNConfig.y_standardize)")
    ap.add_argument("--distance-bias", action="store_true",
                    help="attention logits biased by -w |x - x'|^2 per head (learned widths; "
                         "PFNConfig.distance_bias)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=250)
    ap.add_argument("--devices", type=int, default=1, help="data-parallel CPU devices")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from the weights (and borders) of this PFN checkpoint")
    args = ap.parse_args(argv)
    if args.devices > 1:
        request_cpu_devices(args.devices)

    task = tasks.get_predictive("gp_hyperprior", kernel=args.kernel, x_dim=args.x_dim)
    key = jax.random.key(args.seed)
    k_borders, k_net, k_train = jax.random.split(key, 3)
    if args.init is not None:
        net, init_header = load_pfn(args.init)
        cfg = net.config
    else:
        frame = {}
        if args.y_standardize:
            borders, m0, s0 = frame_borders(task, k_borders, args.buckets)
            frame = {"y_standardize": True, "y_prior_mean": m0, "y_prior_sd": s0}
        else:
            borders = prior_borders(task, k_borders, args.buckets)
        cfg = PFNConfig(x_dim=task.x_dim, borders=tuple(borders.tolist()), d_model=args.d_model,
                        n_layers=args.layers, n_heads=args.heads, mlp_ratio=args.mlp_ratio,
                        head=args.head, n_components=args.components,
                        distance_bias=args.distance_bias, **frame)
        net = PFN(cfg, key=k_net)
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                       warmup_steps=args.warmup, checkpoint_every=args.checkpoint_every,
                       log_every=25, weight_decay=0.0)
    header = {"kind": "pfn", "task": task.name, "task_params": tasks.task_params(task),
              "model_config": cfg.to_dict(), "n_query": args.n_query, "objective": args.loss,
              "init": None if args.init is None else {
                  "path": str(args.init), "step": init_header["step"],
                  "train_config": init_header["train_config"]}}
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "progress.jsonl", "a")
    t0 = time.time()

    def callback(ev):
        log.write(json.dumps({"step": ev.step, "loss": ev.loss, "steps_per_s": ev.steps_per_second,
                              "bad": ev.bad_steps, "wall": time.time() - t0,
                              "message": ev.message}) + "\n")
        log.flush()

    def sample(k, b):
        if args.loss == "expected":
            return task.sample_batch_exact(k, b, n_query=args.n_query)
        return task.sample_batch(k, b, n_query=args.n_query)

    loss = pfn_expected_loss if args.loss == "expected" else pfn_loss
    _, meta = fit_network(net, loss, sample, tcfg, key=k_train, out_dir=args.out,
                          resume=args.resume, callback=callback, header=header,
                          devices=args.devices)
    log.write(json.dumps({"done": True, **{k: v for k, v in meta.items()
                                            if k != "train_config"}}) + "\n")
    log.close()
    return np.asarray(0)


if __name__ == "__main__":
    main()
