"""Load test of `flashbayes serve`: micro-batching against one update at a time, side by side.

Usage:
    python benchmarks/serve_load.py [--model lti_tracking] [--streams 200] [--updates 50]
                                    [--clients 32] [--segment 10]

Four servers are started in subprocesses on free localhost ports (real sockets, one SQLite file
each): micro-batching on (`--max-batch 64`) and off (`--max-batch 1`), each with SQLite
`--sync full` (the default) and `--sync normal`. Each gets `--streams` streams with priors from
the task's family, then `--updates` observations per stream, one per request, from `--clients`
concurrent keep-alive connections (asyncio; a minimal HTTP/1.1 client, see `Connection`); the
observations of one stream go in order, so at most `--clients` streams are in flight. The
servers take turns, `--segment` updates per stream at a time in a rotating order, so that
background load on a shared machine falls on every configuration alike. Reported per server:
errors (any answer but 200 with the expected step, or a transport failure), streams that
reached the last step, p50 and p99 request latency, updates per second (over its turns) and the
mean batch size it saw; and the throughput ratio of batching on / off. Writes
benchmarks/results/serve_load.json and serve_load.md, then docs/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import numpy as np

import flashbayes as fb

SEED = 20261123
CONFIGS = [  # (label, max_batch, sync)
    ("batched, sync full", 64, "full"),
    ("one at a time, sync full", 1, "full"),
    ("batched, sync normal", 64, "normal"),
    ("one at a time, sync normal", 1, "normal"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workload(model_arg: str, n_streams: int, n_updates: int):
    """Priors (GMM JSON) of the task's family and observation sequences (n_updates, p)
    simulated from a draw of each prior."""
    from flashbayes.cli import _load_model

    model = _load_model(model_arg)
    task = model.task
    kb, kt = jax.random.split(jax.random.key(SEED))
    batch = jax.jit(task.sample_batch, static_argnums=1)(kb, n_streams)
    tracks = jax.jit(jax.vmap(lambda k, x: task.simulate_trajectory(k, x, n_updates)[1]))(
        jax.random.split(kt, n_streams), batch.theta)
    w, m, s, cm = (np.asarray(a, np.float64) for a in (batch.weights, batch.means,
                                                       batch.scale_tril, batch.cmask))
    priors = []
    for i in range(n_streams):
        keep = cm[i] > 0
        priors.append({"weights": (w[i, keep] / w[i, keep].sum()).tolist(),
                       "means": m[i, keep].tolist(), "scale_tril": s[i, keep].tolist()})
    return model, priors, np.asarray(tracks, np.float64).tolist()


class Server:
    """`flashbayes serve` in a subprocess; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, model_arg: str, db: Path, *, max_batch: int, sync: str, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "flashbayes", "serve", model_arg, "--port", str(self.port),
               "--db", str(db), "--max-batch", str(max_batch), "--sync", sync,
               "--log-level", "warning"]
        self.log = open(db.with_suffix(".log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}; see "
                                   f"{self.log.name}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Connection:
    """A minimal HTTP/1.1 keep-alive client for the load (JSON POST, Content-Length framed).

    httpx.AsyncClient costs about 4 ms of CPU per request on this machine, more than the
    server spends: with it the load generator, not the server, sets the pace. Setup and checks
    use httpx.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                          + data)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(":") for line in head[1:] if line)}
        payload = await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def create_streams(url: str, priors: list) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        ids = []
        for prior in priors:
            r = await client.post("/v1/streams", json={"prior": prior})
            r.raise_for_status()
            ids.append(r.json()["id"])
    return ids


async def run_segment(port: int, ids: list, tracks: list, steps: range, clients: int,
                      stats: dict) -> None:
    """Post observations `steps` of every stream (in order per stream) from `clients`
    connections; adds latencies, errors and wall time to `stats`."""
    todo = list(range(len(ids)))
    failed = stats["failed_streams"]

    async def worker():
        conn = Connection("127.0.0.1", port)
        while todo:
            i = todo.pop()
            if i in failed:
                continue
            for t in steps:
                t0 = time.perf_counter()
                try:
                    status, payload = await conn.post(f"/v1/streams/{ids[i]}/observations",
                                                      {"observations": [tracks[i][t]]})
                    ok = status == 200 and json.loads(payload)["step"] == t + 1
                    if not ok:
                        stats["errors"].append(f"{status}: {payload[:200]!r}")
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    stats["errors"].append(f"{type(exc).__name__}: {exc}")
                    ok = False
                    await conn.close()
                stats["latencies"].append(time.perf_counter() - t0)
                if not ok:
                    failed.add(i)
                    break
        await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    stats["seconds"] += time.perf_counter() - t0


async def summarise(url: str, ids: list, n_updates: int, stats: dict, before: dict) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        after = (await client.get("/v1/health")).json()
        steps = []
        for sid in ids:
            r = await client.get(f"/v1/streams/{sid}")
            steps.append(r.json()["step"] if r.status_code == 200 else -1)
    lat = np.array(stats["latencies"]) * 1e3
    batches = after["batches"] - before["batches"]
    return {"updates": len(lat), "errors": len(stats["errors"]),
            "first_errors": stats["errors"][:5],
            "streams_complete": int(sum(s == n_updates for s in steps)),
            "seconds": stats["seconds"], "updates_per_second": len(lat) / stats["seconds"],
            "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p99": float(np.percentile(lat, 99)),
            "mean_batch": (after["steps"] - before["steps"]) / max(batches, 1)}


def markdown(res: dict) -> str:
    lines = [f"{res['streams']} streams x {res['updates_per_stream']} updates from "
             f"{res['clients']} concurrent clients (`{res['model']}`, one observation per "
             f"request, {res['cpus']} CPU cores shared with other work); the four servers "
             f"took turns of {res['segment']} updates per stream.", "",
             "| server | errors | streams complete | p50 latency | p99 latency | updates/s "
             "| mean batch |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        lines.append(f"| {r['label']} | {r['errors']} | {r['streams_complete']}/{res['streams']}"
                     f" | {r['latency_ms_p50']:.1f} ms | {r['latency_ms_p99']:.1f} ms | "
                     f"{r['updates_per_second']:.0f} | {r['mean_batch']:.1f} |")
    lines.append("")
    for sync, ratio in res["throughput_ratio"].items():
        lines.append(f"- throughput, batched / one at a time (sync {sync}): **{ratio:.1f}x**")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lti_tracking",
                    help="shipped model name or checkpoint path")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--updates", type=int, default=50)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--segment", type=int, default=10,
                    help="updates per stream in each turn of a server")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args()
    model, priors, tracks = workload(args.model, args.streams, args.updates)
    rounds = [range(a, min(a + args.segment, args.updates))
              for a in range(0, args.updates, args.segment)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # one compilation cache for the servers: the first compiles, the others reuse it
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax-cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        servers, ids, stats, before = [], [], [], []
        for i, (_, max_batch, sync) in enumerate(CONFIGS):
            server = stack.enter_context(Server(args.model, Path(tmp) / f"run{i}.sqlite",
                                                max_batch=max_batch, sync=sync, env=env))
            server.wait_ready()
            servers.append(server)
            ids.append(asyncio.run(create_streams(server.url, priors)))
            before.append(httpx.get(server.url + "/v1/health").json())
            stats.append({"latencies": [], "errors": [], "seconds": 0.0,
                          "failed_streams": set()})
        # the servers take turns, a segment of updates each, in a rotating order: every
        # configuration sees the same spread of background load
        for r, steps in enumerate(rounds):
            for j in range(len(CONFIGS)):
                c = (j + r) % len(CONFIGS)
                asyncio.run(run_segment(servers[c].port, ids[c], tracks, steps, args.clients,
                                        stats[c]))
        runs = []
        for c, (label, max_batch, sync) in enumerate(CONFIGS):
            out = asyncio.run(summarise(servers[c].url, ids[c], args.updates, stats[c],
                                        before[c]))
            out.update(label=label, max_batch=max_batch, sync=sync)
            print(f"{label}: {out['updates_per_second']:.0f} updates/s, p50 "
                  f"{out['latency_ms_p50']:.1f} ms, p99 {out['latency_ms_p99']:.1f} ms, "
                  f"{out['errors']} errors, mean batch {out['mean_batch']:.1f}", flush=True)
            runs.append(out)
    by = {(r["max_batch"] > 1, r["sync"]): r["updates_per_second"] for r in runs}
    res = {"model": args.model, "model_step": model.meta.get("step"),
           "streams": args.streams, "updates_per_stream": args.updates, "clients": args.clients,
           "segment": args.segment,
           "cpus": os.cpu_count(), "platform": platform.platform(),
           "jax": jax.__version__, "flashbayes": fb.__version__, "runs": runs,
           "throughput_ratio": {s: by[(True, s)] / by[(False, s)] for s in ("full", "normal")}}
    md = markdown(res)
    print(md)
    if not args.no_save:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _docs import save

        save("serve_load", res, md)


if __name__ == "__main__":
    main()
