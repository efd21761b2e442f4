"""Data-parallel training throughput on 1, 2 and 4 simulated CPU devices and on 2 processes.

Usage:
    python benchmarks/scaling.py [--steps 80] [--batch-size 256]

Each setting trains the shipped Distribution Transformer configuration (gmm_linear, d_model 64,
3 blocks, batch 256) in its own fresh interpreter, one after another on the same machine:
1, 2 and 4 devices of one process (XLA_FLAGS=--xla_force_host_platform_device_count=4), and 2
processes on localhost joined by jax.distributed (one CPU device each, gloo collectives). The
first 20 steps (compilation) are left out of the rate. The communication cost is the time of one
all-reduce of a gradient-sized buffer over the same mesh, timed alone (median of 50). The FLOPs
of one training step (forward and backward of the loss) come from XLA's cost analysis.

On this machine all devices share 2 cores, so the ideal for N devices is min(N, 2) times the
one-device throughput, not N times it: the table reports the ratio to that.
Writes benchmarks/results/scaling.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

SKIP = 20
BENCH = Path(__file__).resolve()
# the GP PFN's training configuration (benchmarks/train_gp.py defaults)
GP = {"d_model": 128, "n_layers": 4, "n_heads": 4, "buckets": 1000, "batch_size": 32,
      "n_query": 50}
# assumptions of the 8-GPU paper estimate: an A100-class GPU in float32 with TF32 matmuls,
# NVLink-class links, an on-demand cloud price; a PFN-scale training set
GPU = {"n": 8, "peak_flops_s": 156e12, "utilisation": 0.15, "link_bytes_s": 150e9,
       "latency_s": 20e-6, "usd_per_gpu_hour": 2.5, "samples": 2e8, "global_batch": 2048}


def _worker(args) -> dict:
    import equinox as eqx
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    import flashbayes as fb
    from flashbayes.amortized import data_mesh, initialize_distributed
    from flashbayes.amortized._train import batch_loss

    group = initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    devices = None if group.num_processes > 1 else args.devices
    mesh = data_mesh(devices)
    cfg = fb.TrainConfig(steps=args.steps, batch_size=args.batch_size, log_every=1)
    stamps: dict[int, float] = {}
    t0 = time.perf_counter()
    model = fb.train("gmm_linear", cfg, key=jax.random.key(0), devices=devices,
                     callback=lambda ev: stamps.__setitem__(ev.step, time.perf_counter()))
    total = time.perf_counter() - t0
    # progress reaches process 0 only; the others just take part in the collectives
    step_s = ((stamps[args.steps] - stamps[SKIP]) / (args.steps - SKIP) if stamps
              else float("nan"))

    params = eqx.filter(model.network, eqx.is_array)
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
    n = mesh.size
    # one gradient-sized buffer per device, summed over the mesh into a replicated result
    host = np.ones((n, n_params), np.float32)
    shards = jax.make_array_from_callback(host.shape, NamedSharding(mesh, PartitionSpec("data")),
                                          lambda index: host[index])
    allreduce = jax.jit(lambda g: g.sum(0), out_shardings=NamedSharding(mesh, PartitionSpec()))
    allreduce(shards).block_until_ready()
    times = []
    for _ in range(50):
        t = time.perf_counter()
        allreduce(shards).block_until_ready()
        times.append(time.perf_counter() - t)

    out = {"devices": n, "processes": group.num_processes, "step_s": step_s,
           "samples_per_s": args.batch_size / step_s, "allreduce_s": float(np.median(times)),
           "n_params": n_params, "run_s": total}
    if n == 1:
        task = fb.tasks.get("gmm_linear")
        batch = task.sample_batch(jax.random.key(1), args.batch_size,
                                  task.prepare(jax.random.key(2)))
        p, static = eqx.partition(model.network, eqx.is_array)
        grad = jax.jit(jax.value_and_grad(lambda q: batch_loss(eqx.combine(q, static), batch)))
        cost = grad.lower(p).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out["flops_per_step"] = float(cost.get("flops", float("nan")))
    return out


def _gp_worker(args) -> dict:
    """Step time and FLOPs of the GP PFN at its training configuration, on one device."""
    import equinox as eqx
    import jax

    from flashbayes import tasks
    from flashbayes.amortized import TrainConfig, fit_network
    from flashbayes.amortized._pfn import PFN, PFNConfig, pfn_loss, prior_borders

    task = tasks.get_predictive("gp_hyperprior")
    borders = prior_borders(task, jax.random.key(0), GP["buckets"], n_samples=20_000)
    cfg = PFNConfig(x_dim=task.x_dim, borders=tuple(borders.tolist()), d_model=GP["d_model"],
                    n_layers=GP["n_layers"], n_heads=GP["n_heads"])
    net = PFN(cfg, key=jax.random.key(1))

    def sample(k, b):
        return task.sample_batch(k, b, n_query=GP["n_query"])

    stamps: dict[int, float] = {}
    tcfg = TrainConfig(steps=args.steps, batch_size=GP["batch_size"], log_every=1)
    fit_network(net, pfn_loss, sample, tcfg, key=jax.random.key(2),
                callback=lambda ev: stamps.__setitem__(ev.step, time.perf_counter()))
    step_s = (stamps[args.steps] - stamps[SKIP]) / (args.steps - SKIP)
    batch = sample(jax.random.key(3), GP["batch_size"])
    p, static = eqx.partition(net, eqx.is_array)
    grad = jax.jit(jax.value_and_grad(lambda q: pfn_loss(eqx.combine(q, static), batch)))
    cost = grad.lower(p).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(p))
    return {"step_s": step_s, "flops_per_step": float(cost.get("flops", float("nan"))),
            "n_params": n_params, **GP}


def _gp_estimate(gp: dict) -> tuple[dict, list[str]]:
    """Paper estimate of a full GP-PFN training run on 8 GPUs (assumptions stated inline)."""
    flops_per_sample = gp["flops_per_step"] / gp["batch_size"]
    samples = GPU["samples"]
    total_flops = flops_per_sample * samples
    cpu_flops_s = gp["flops_per_step"] / gp["step_s"]
    cpu_hours = samples / gp["batch_size"] * gp["step_s"] / 3600
    grad_bytes = 4 * gp["n_params"]
    steps = samples / GPU["global_batch"]
    # ring all-reduce: each GPU sends and receives 2 (N - 1) / N of the gradient per step
    comm_s = 2 * (GPU["n"] - 1) / GPU["n"] * grad_bytes / GPU["link_bytes_s"] + GPU["latency_s"]
    compute_s = total_flops / (GPU["n"] * GPU["peak_flops_s"] * GPU["utilisation"])
    wall_s = compute_s + steps * comm_s
    cost = wall_s / 3600 * GPU["n"] * GPU["usd_per_gpu_hour"]
    est = {"flops_per_sample": flops_per_sample, "total_flops": total_flops,
           "cpu_flops_per_s": cpu_flops_s, "cpu_hours_one_device": cpu_hours,
           "steps": steps, "comm_s_per_step": comm_s, "compute_s": compute_s, "wall_s": wall_s,
           "usd": cost, "assumptions": GPU}
    lines = [
        "", "### Paper estimate: the GP PFN on 8 GPUs", "",
        f"Measured here on one CPU device: {gp['flops_per_step'] / 1e9:.2f} GFLOP per training "
        f"step (batch {gp['batch_size']}, {gp['n_query']} queries, up to 100 context points, "
        f"{gp['n_params']:,} parameters), {gp['step_s'] * 1e3:.0f} ms per step, so "
        f"{cpu_flops_s / 1e9:.1f} GFLOP/s achieved.", "",
        "| quantity | value |", "|---|---|",
        f"| training set | {samples:.2e} sampled data sets (global batch "
        f"{GPU['global_batch']}, {steps:,.0f} steps) |",
        f"| FLOPs | {flops_per_sample / 1e6:.1f} MFLOP per data set, "
        f"{total_flops:.2e} in all |",
        f"| on this CPU (one device) | {cpu_hours:,.0f} hours |",
        f"| 8 GPUs at {GPU['peak_flops_s'] / 1e12:.0f} TFLOP/s peak, "
        f"{GPU['utilisation']:.0%} utilisation | {compute_s / 60:.1f} min of compute |",
        f"| gradient all-reduce | {grad_bytes / 1e6:.1f} MB per step, "
        f"{comm_s * 1e3:.2f} ms per step over {GPU['link_bytes_s'] / 1e9:.0f} GB/s links, "
        f"{steps * comm_s / 60:.1f} min in all |",
        f"| wall clock | {wall_s / 60:.1f} min |",
        f"| cost at ${GPU['usd_per_gpu_hour']:.2f} per GPU-hour | ${cost:,.2f} |",
    ]
    return est, lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _run(argv: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, str(BENCH), "--worker", *argv], capture_output=True,
                         text=True, env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _two_processes(common: list[str]) -> dict:
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(BENCH), "--worker", *common, "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_env()) for i in range(2)]
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            raise RuntimeError(err[-3000:])
    return json.loads(outs[0][0].strip().splitlines()[-1])


def _render(result: dict) -> str:
    """The markdown table (and fills in the derived columns of `result`)."""
    rows, cores = result["rows"], result["cores"]
    base = rows["1 device"]["samples_per_s"]
    for r in rows.values():
        # one device's program runs mostly on one core, so N devices can use min(N, cores)
        r["ideal_samples_per_s"] = base * min(r["devices"], cores)
        r["ratio_to_ideal"] = r["samples_per_s"] / r["ideal_samples_per_s"]
        r["comm_fraction"] = r["allreduce_s"] / r["step_s"]
    lines = [f"Training step of the shipped DT configuration ({result['n_params']:,} parameters, "
             f"batch {result['batch_size']}, {result['flops_per_step'] / 1e9:.2f} GFLOP per "
             f"step), best of {result['rounds']} interleaved rounds of {result['steps']} steps. "
             f"All devices share {cores} CPU cores, so the ideal for N devices is min(N, {cores}) "
             "times the one-device throughput.", "",
             "| setting | samples/s | step | ideal samples/s | ratio to ideal | all-reduce of "
             "the gradient | share of the step |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['samples_per_s']:,.0f} | {r['step_s'] * 1e3:.1f} ms | "
                     f"{r['ideal_samples_per_s']:,.0f} | {r['ratio_to_ideal']:.2f} | "
                     f"{r['allreduce_s'] * 1e3:.3f} ms | {r['comm_fraction']:.1%} |")
    lines.append("")
    lines.append("Step times of every round (ms): " + "; ".join(
        f"{name} {', '.join(f'{t * 1e3:.0f}' for t in r['all_step_s'])}"
        for name, r in rows.items()) + ".")
    est, est_lines = _gp_estimate(result["gp_pfn"])
    result["gp_8gpu_estimate"] = est
    lines += est_lines
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2,
                        help="each setting runs this many times, interleaved; the best counts")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the table from benchmarks/results/scaling.json, no runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    parser.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= SKIP:
        parser.error(f"--steps: expected more than {SKIP}; got {args.steps}")
    if args.worker:
        print(json.dumps(_gp_worker(args) if args.gp else _worker(args)))
        return
    if args.render:
        sys.path.insert(0, str(BENCH.parent))
        from _docs import RESULTS, save

        result = json.loads((RESULTS / "scaling.json").read_text())
        result.setdefault("cores", os.cpu_count())
        md = _render(result)
        save("scaling", result, md)
        print(md)
        return
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    four = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):  # interleaved, so a busy spell on the machine hits all alike
        for n in (1, 2, 4):
            runs.setdefault(f"{n} device{'s' if n > 1 else ''}", []).append(
                _run([*common, "--devices", str(n)], four))
        runs.setdefault("2 processes", []).append(_two_processes(common))
    rows = {name: dict(min(rs, key=lambda r: r["step_s"]), all_step_s=[r["step_s"] for r in rs])
            for name, rs in runs.items()}
    gp = _run(["--gp", "--steps", str(args.steps)], _env())
    sys.path.insert(0, str(BENCH.parent))
    import jax

    result = {"machine": f"{os.cpu_count()} CPUs", "cores": os.cpu_count(),
              "jax": jax.__version__, "steps": args.steps, "batch_size": args.batch_size,
              "rows": rows, "flops_per_step": rows["1 device"]["flops_per_step"],
              "n_params": rows["1 device"]["n_params"], "rounds": args.rounds, "gp_pfn": gp,
              "load_average_at_end": os.getloadavg()[0]}
    md = _render(result)
    from _docs import save

    save("scaling", result, md)
    print(md)


if __name__ == "__main__":
    main()
