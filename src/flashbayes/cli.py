"""Command-line interface. Config files and CSV/JSON inputs are parsed here and nowhere else."""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="flashbayes: fast amortized Bayesian inference with run-time priors.")
console = Console()
err_console = Console(stderr=True)


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _user_errors(fn):
    """Turn bad input into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from flashbayes.amortized import CheckpointError, TrainingError

        try:
            return fn(*args, **kwargs)
        except (UsageError, CheckpointError, TrainingError, FileNotFoundError) as exc:
            _fail(str(exc))
        except OSError as exc:  # e.g. an output folder that does not exist
            _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))

    return wrapper


def _fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _load_model(checkpoint: str, task: str | None = None):
    import flashbayes as fb
    from flashbayes.amortized import DT_PRETRAINED, GP_PRETRAINED

    path = Path(checkpoint)
    if not path.exists() and checkpoint in GP_PRETRAINED:
        raise UsageError(f"checkpoint: expected a Distribution Transformer "
                         f"({', '.join(DT_PRETRAINED)} or a checkpoint); {checkpoint!r} is a GP "
                         f"predictive model: use `flashbayes gp {checkpoint} --data ...`")
    if not path.exists() and checkpoint in DT_PRETRAINED:
        model = fb.load_pretrained(checkpoint)
    elif not path.exists():
        raise UsageError(f"checkpoint: expected a file, a training folder or one of "
                         f"{', '.join(DT_PRETRAINED)}; got {checkpoint!r} (no such file)")
    else:
        model = fb.load(path)
    if task is not None and model.task.name != task:
        raise UsageError(f"checkpoint: expected a model for task {task!r}; got one for "
                         f"{model.task.name!r} ({checkpoint})")
    return model


def _read_prior(path: Path, dim: int):
    from flashbayes.distributions import GMM

    if not path.is_file():
        raise UsageError(f"--prior: expected a JSON file; got {path} (no such file)")
    try:
        prior = GMM.from_json(path.read_text())
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--prior {path}: {exc}") from exc
    if prior.dim != dim:
        raise UsageError(f"--prior {path}: expected a prior of dimension {dim}; got {prior.dim}")
    return prior


def _check_out_folder(option: str, path: Path | None) -> None:
    if path is not None and not path.resolve().parent.is_dir():
        raise UsageError(f"{option}: expected a path in an existing folder; got {path} (no folder "
                         f"{path.resolve().parent})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, width: int, *, option: str = "--data", allow_nan: bool = False):
    """Rows of `width` numbers (an optional header row); with `allow_nan`, a row of NaN (or
    empty cells) marks a missing observation."""
    import numpy as np

    if not path.is_file():
        raise UsageError(f"{option}: expected a CSV file; got {path} (no such file)")
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {path}: expected a text CSV file; got undecodable bytes") \
            from exc
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.split(",")]
        if allow_nan and i > 0 and all(c == "" for c in cells):
            cells = ["nan"] * len(cells)
        try:
            values = [float(c) for c in cells]
        except ValueError:
            if i == 0 and not any(_is_number(c) for c in cells):  # a header row
                continue
            raise UsageError(f"{option} {path}: expected numbers on line {i + 1}; got "
                             f"{line[:60]!r}") from None
        if len(values) != width:
            raise UsageError(f"{option} {path}: expected {width} columns per row; got "
                             f"{len(values)} on line {i + 1}")
        rows.append(values)
    x = np.asarray(rows, dtype=np.float64).reshape(-1, width)
    if allow_nan and x.shape[0] == 0:
        raise UsageError(f"{option} {path}: expected at least one row of numbers; got none")
    if allow_nan:
        missing = np.isnan(x).all(1)
        if not np.all(np.isfinite(x[~missing])):
            raise UsageError(f"{option} {path}: expected finite numbers or a whole row of NaN "
                             "(missing); got NaN or inf in a partly filled row")
    elif not np.all(np.isfinite(x)):
        raise UsageError(f"{option} {path}: expected finite numbers; got NaN or inf")
    return x


@app.command()
@_user_errors
def demo(seed: Annotated[int | None, typer.Option(help="PRNG seed (random if omitted)")] = None,
         n: Annotated[int, typer.Option(help="data points, 0..20")] = 10,
         plot: Annotated[Path, typer.Option(help="where to write the picture")] = Path(
             "flashbayes-demo.png"),
         nuts: Annotated[bool, typer.Option(help="also run NUTS for the speed-up")] = True):
    """Shipped gmm_linear model vs the exact posterior and NUTS on a random problem."""
    import jax

    from flashbayes._demo import run_demo

    if not 0 <= n <= 20:
        raise UsageError(f"--n: expected 0..20 (the range the shipped model was trained on); "
                         f"got {n}")
    _check_out_folder("--plot", plot)
    seed = random.randrange(2**31) if seed is None else seed
    with console.status("loading the model, drawing a problem, running the engines..."):
        out = run_demo(key=jax.random.key(seed), n=n, nuts=nuts, plot=plot)
    table = Table(title=f"gmm_linear, seed {seed}: {out['n_components']}-component GMM prior, "
                        f"n = {out['n']} data points")
    table.add_column("method")
    table.add_column("KL(exact || method)", justify="right")
    table.add_column("NLL of true theta", justify="right")
    table.add_column("wall time", justify="right")
    table.add_column("time / DT time", justify="right")
    for r in out["rows"]:
        kl = "-" if r["kl"] is None else (f"{r['kl']:.4f}" if "kl_se" not in r
                                          else f"{r['kl']:.4f} ± {r['kl_se']:.4f}")
        nll = "-" if r["nll"] is None else f"{r['nll']:.3f}"
        table.add_row(r["method"], kl, nll, _fmt_seconds(r["seconds"]),
                      f"{r['speedup_of_dt']:.1f}x")
    console.print(table)
    for r in out["rows"]:
        if "first_call_seconds" in r:
            console.print(f"NUTS first call, compilation included: "
                          f"{_fmt_seconds(r['first_call_seconds'])}; the Distribution "
                          f"Transformer is {r['speedup_of_dt']:.0f}x faster than warm NUTS.")
    console.print(f"picture written to {out['plot']}")


@app.command("tasks")
@_user_errors
def tasks_cmd():
    """List the registered tasks."""
    import flashbayes as fb

    table = Table(title="tasks")
    table.add_column("name", no_wrap=True)
    for col in ("theta dim", "data row", "n", "exact posterior", "description"):
        table.add_column(col)
    for name in fb.tasks.names():
        t = fb.tasks.get(name)
        table.add_row(name, str(t.theta_dim), str(t.data_dim), f"{t.n_min}..{t.n_max}",
                      "yes" if t.has_exact else "no (NUTS)", t.description)
    console.print(table)


@app.command()
@_user_errors
def train(task: Annotated[str, typer.Argument(help="task name (see `flashbayes tasks`)")],
          out: Annotated[Path, typer.Option(help="folder for checkpoints and the model")],
          steps: Annotated[int | None, typer.Option(help="optimiser steps [default: 20000]")]
          = None,
          batch_size: Annotated[int | None, typer.Option(help="problems per step [default: 256]")]
          = None,
          learning_rate: Annotated[float | None, typer.Option(
              help="peak learning rate [default: 1e-3]")] = None,
          checkpoint_every: Annotated[int | None, typer.Option(
              help="steps between checkpoints [default: 1000]")] = None,
          seed: Annotated[int, typer.Option(help="PRNG seed")] = 0,
          config: Annotated[Path | None, typer.Option(
              help="JSON file of TrainConfig fields (command-line options win)")] = None,
          resume: Annotated[bool, typer.Option(help="continue from the last checkpoint")] = False,
          init: Annotated[str | None, typer.Option(
              help="start from the weights of this model (checkpoint path or shipped name) with "
                   "a fresh warm-up and decay: fine-tuning")] = None,
          d_model: Annotated[int | None, typer.Option(help="token width")] = None,
          n_layers: Annotated[int | None, typer.Option(help="transformer blocks")] = None,
          devices: Annotated[int | None, typer.Option(
              help="data-parallel devices on this host (on a CPU, that many are created); "
                   "default: 1, or every device of every process when processes are joined")]
          = None,
          coordinator: Annotated[str | None, typer.Option(
              help="HOST:PORT of process 0, to join several processes (also "
                   "FLASHBAYES_COORDINATOR; Slurm/Open MPI variables are read when unset)")]
          = None,
          num_processes: Annotated[int | None, typer.Option(
              help="processes taking part (also FLASHBAYES_NUM_PROCESSES)")] = None,
          process_id: Annotated[int | None, typer.Option(
              help="this process's rank, 0 writes the checkpoints (also "
                   "FLASHBAYES_PROCESS_ID)")] = None):
    """Train a Distribution Transformer; writes OUT/ckpt_*.safetensors and OUT/model.safetensors.

    Data-parallel: --devices N shards each batch over N devices of this host; --coordinator,
    --num-processes and --process-id join several processes (hosts) into one run.
    """
    import jax
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    import flashbayes as fb
    from flashbayes.amortized import DistributedError, initialize_distributed, request_cpu_devices

    if devices is not None:
        if devices < 1:
            raise UsageError(f"--devices: expected a positive integer; got {devices}")
        request_cpu_devices(devices)
    try:
        group = initialize_distributed(coordinator, num_processes, process_id)
    except DistributedError as exc:
        raise UsageError(str(exc)) from exc
    if group.num_processes > 1:
        # every local device of every process; --devices says how many per process
        mesh_devices = None if devices is None else [
            d for p in range(group.num_processes)
            for d in [x for x in jax.devices() if x.process_index == p][:devices]]
    else:
        mesh_devices = devices or 1

    if task not in fb.tasks.names():
        raise UsageError(f"task: expected one of {', '.join(fb.tasks.names())}; got {task!r}")
    fields: dict = {}
    if config is not None:
        if not config.is_file():
            raise UsageError(f"--config: expected a JSON file; got {config} (no such file)")
        try:
            fields = json.loads(config.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--config {config}: expected JSON; got malformed JSON ({exc.msg})") \
                from exc
        if not isinstance(fields, dict):
            raise UsageError(f"--config {config}: expected a JSON object; got "
                             f"{type(fields).__name__}")
    given = {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
             "checkpoint_every": checkpoint_every, "d_model": d_model, "n_layers": n_layers}
    fields.update({k: v for k, v in given.items() if v is not None})
    start = None
    if init is not None:
        start = _load_model(init, task)
        for name in ("d_model", "n_layers", "n_heads", "mlp_ratio", "data_layers"):
            fields.setdefault(name, getattr(start.network.config, name))
    try:
        cfg = fb.TrainConfig.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"train config: {exc}") from exc
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]}"),
                        TextColumn("{task.fields[rate]} steps/s"), TimeRemainingColumn(),
                        console=console, transient=False, disable=not group.is_main)
    with progress:
        bar = progress.add_task(f"training {task}", total=cfg.steps, loss="-", rate="-")

        def callback(ev):
            if ev.message:
                progress.console.print(f"[yellow]{ev.message}")
                return
            progress.update(bar, completed=ev.step, loss=f"{ev.loss:.4f}",
                            rate=f"{ev.steps_per_second:.1f}")

        try:
            model = fb.train(task, cfg, key=jax.random.key(seed), out_dir=out, resume=resume,
                             callback=callback, devices=mesh_devices, init=start)
        except (DistributedError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
    if not group.is_main:
        return
    path = model.save(out / "model.safetensors")
    console.print(f"model written to {path} ({model.meta['train_seconds']:.0f} s of training)")


@app.command()
@_user_errors
def infer(checkpoint: Annotated[str, typer.Argument(help="checkpoint file or pretrained name")],
          prior: Annotated[Path, typer.Option(help="prior GMM as JSON: weights, means, "
                                                   "scale_tril (or cov)")],
          data: Annotated[Path, typer.Option(help="data as CSV, one row per data point")],
          method: Annotated[str, typer.Option(
              help="auto (amortized, NUTS when its k-hat check fails), amortized, exact, nuts, "
                   "smc or vi")] = "auto",
          seed: Annotated[int, typer.Option(help="PRNG seed of the check and the engines")] = 0,
          out: Annotated[Path | None, typer.Option(
              help="write the posterior as JSON (a GMM, or draws for sampling engines)")] = None,
          plot: Annotated[Path | None, typer.Option(help="write a PNG of prior and posterior")]
          = None,
          task: Annotated[str | None, typer.Option(help="refuse a checkpoint of another task")]
          = None):
    """Posterior for one prior and one data set: amortized, checked, exact when flagged."""
    import time
    import warnings

    import jax
    import numpy as np

    import flashbayes as fb
    from flashbayes.amortized import OutOfRangeWarning
    from flashbayes.reference import ConvergenceWarning

    _check_out_folder("--out", out)
    _check_out_folder("--plot", plot)
    model = _load_model(checkpoint, task)
    gmm_prior = _read_prior(prior, model.theta_dim)
    x = _read_csv(data, model.data_dim)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OutOfRangeWarning)
            warnings.simplefilter("always", ConvergenceWarning)
            t0 = time.perf_counter()
            post = fb.infer(model, x, prior=gmm_prior, method=method, key=jax.random.key(seed))
            post.mean()
            seconds = time.perf_counter() - t0
    except (ValueError, TypeError, FloatingPointError) as exc:
        raise UsageError(str(exc)) from exc
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {w.message}")
    info = post.info
    stages = ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in info.get("seconds", {}).items())
    console.print(f"path: [bold]{info['path']}[/] ({info.get('reason', '')}); {stages}",
                  highlight=False)
    title = (f"posterior ({model.task.name}, n = {x.shape[0]}, {_fmt_seconds(seconds)} "
             "incl. compilation)")
    is_gmm = isinstance(post, fb.GMM)
    if is_gmm:
        table = Table(title=title)
        table.add_column("component")
        table.add_column("weight", justify="right")
        table.add_column("mean")
        table.add_column("sd")
        cov = np.asarray(post.scale_tril) @ np.swapaxes(np.asarray(post.scale_tril), -1, -2)
        for k in range(post.n_components):
            table.add_row(str(k), f"{float(post.weights[k]):.4f}",
                          np.array2string(np.asarray(post.means[k]), precision=4),
                          np.array2string(np.sqrt(np.diagonal(cov[k])), precision=4))
        console.print(table)
    else:
        _print_draw_summary(post, title)
    console.print(f"posterior mean {np.array2string(np.asarray(post.mean()), precision=4)}")
    if out is not None:
        if is_gmm:
            out.write_text(post.to_json())
        else:
            flat = post.flat
            out.write_text(json.dumps({"type": "draws", "path": info["path"],
                                       "names": post.names, "draws": flat.tolist()}))
        console.print(f"posterior written to {out}")
    if plot is not None:
        from flashbayes._plots import plot_prior_posterior

        shown = post if is_gmm else fb.fit_gmm(jax.random.key(seed), post.flat,
                                                gmm_prior.n_components)
        path = plot_prior_posterior(gmm_prior, shown, plot)
        console.print(f"picture written to {path}")


def _print_draw_summary(post, title: str) -> None:
    import numpy as np

    summary = post.info.get("summary", {})
    table = Table(title=title)
    for col in ("parameter", "mean", "sd", "R-hat", "ESS bulk"):
        table.add_column(col, justify="left" if col == "parameter" else "right")
    mean, sd = np.asarray(post.mean()), np.sqrt(np.diag(np.asarray(post.cov())))
    for i, name in enumerate(post.names):
        s = summary.get(name, {})
        table.add_row(name, f"{mean[i]:.4f}", f"{sd[i]:.4f}",
                      f"{s['rhat']:.3f}" if s else "-", f"{s['ess_bulk']:.0f}" if s else "-")
    console.print(table)


bench_app = typer.Typer(no_args_is_help=True, help="benchmarks against public references")
app.add_typer(bench_app, name="bench")


@bench_app.command("posteriordb")
@_user_errors
def bench_posteriordb(
        names: Annotated[str | None, typer.Option(
            help="comma-separated posterior names (default: all 13)")] = None,
        out: Annotated[Path, typer.Option(help="folder for posteriordb.json and .md")]
        = Path("."),
        seed: Annotated[int, typer.Option(help="PRNG seed")] = 0,
        num_warmup: Annotated[int, typer.Option(help="NUTS warm-up steps per chain")] = 1000,
        num_samples: Annotated[int, typer.Option(help="NUTS draws per chain")] = 2500,
        num_chains: Annotated[int, typer.Option(help="NUTS chains")] = 4,
        numpyro: Annotated[bool, typer.Option(help="also time NumPyro's own NUTS")] = True,
        vi: Annotated[bool, typer.Option(help="also fit full-rank VI")] = True,
        c2st: Annotated[bool, typer.Option(help="C2ST of NUTS draws vs the reference")] = True,
        repeated: Annotated[bool, typer.Option(
            help="rerun three models on new data of the same shape vs NumPyro")] = True,
        x64: Annotated[bool, typer.Option(
            help="double precision, as the Stan references were made")] = True):
    """NUTS and VI on the posteriordb references: moment errors, C2ST, ESS/s, wall times.

    Finished posteriors are kept in OUT/posteriordb.journal.jsonl; a rerun with the same
    options continues where an interrupted run stopped.
    """
    if x64:
        import jax

        jax.config.update("jax_enable_x64", True)
    from flashbayes.benchmarks import _posteriordb_bench as bench
    from flashbayes.benchmarks import posteriordb

    chosen = None
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in posteriordb.names()]
        if unknown:
            raise UsageError(f"--names: expected posteriors from {posteriordb.names()}; got "
                             f"{unknown}")
    if not out.is_dir():
        raise UsageError(f"--out: expected an existing folder; got {out}")
    try:
        result = bench.run(chosen, seed=seed, repeated=repeated,
                           progress=lambda n: err_console.print(f"running {n}"),
                           journal=out / "posteriordb.journal.jsonl",
                           num_warmup=num_warmup, num_samples=num_samples,
                           num_chains=num_chains, with_numpyro=numpyro, with_vi=vi,
                           with_c2st=c2st)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    result["x64"] = x64
    (out / "posteriordb.json").write_text(json.dumps(result, indent=1))
    table = bench.markdown(result)
    (out / "posteriordb.md").write_text(table)
    console.print(table, highlight=False, soft_wrap=True)
    console.print(f"written to {out / 'posteriordb.json'} and {out / 'posteriordb.md'}")


@bench_app.command("sbibm")
@_user_errors
def bench_sbibm(
        tasks: Annotated[str | None, typer.Option(
            help="comma-separated sbibm tasks (default: all six)")] = None,
        budgets: Annotated[str, typer.Option(
            help="comma-separated simulation budgets")] = "1000,10000,100000",
        head: Annotated[str | None, typer.Option(
            help="NPE head: nsf, maf, gmm, or several joined by '+' (default: each task's own, "
                 "nsf+maf but for slcp's nsf)")] = None,
        ensemble: Annotated[int, typer.Option(help="networks trained per head")] = 5,
        observations: Annotated[str, typer.Option(
            help="comma-separated observation numbers (1..10)")] = "1,2,3,4,5",
        max_epochs: Annotated[int, typer.Option(help="training epochs at most")] = 1000,
        c2st_draws: Annotated[int, typer.Option(help="draws of each set in the C2ST")] = 10_000,
        c2st_early_stopping: Annotated[bool, typer.Option(
            help="stop each C2ST classifier on a validation split (fast; not the published "
                 "protocol)")] = False,
        new: Annotated[int, typer.Option(
            help="also score this many observations of our own per task (C2ST against the "
                 "task's reference posterior; under the protocol too, unless "
                 "--c2st-early-stopping)")] = 0,
        obs_seed: Annotated[int, typer.Option(
            help="seed of the observations of our own (another one: a fresh set)")] = 31415,
        seed: Annotated[int, typer.Option(help="training seed of the first pair")] = 20261123,
        out: Annotated[Path, typer.Option(help="folder for sbibm.json and .md")] = Path(".")):
    """NPE on the sbibm tasks: C2ST against the reference posteriors beside published results.

    One amortized network per task and budget serves every observation. Finished pairs are kept
    in OUT/sbibm.journal.jsonl; a rerun with the same options continues where it stopped.
    """
    from flashbayes.benchmarks import _sbibm_bench as bench
    from flashbayes.sbi import tasks as sbi_tasks

    def ints(text: str, what: str) -> list[int]:
        try:
            return [int(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise UsageError(f"--{what}: expected comma-separated integers; got {text!r}") from exc

    chosen = sbi_tasks.names() if tasks is None else [
        t.strip() for t in tasks.split(",") if t.strip()]
    heads = head.split("+") if head is not None else []  # None: each task's own head
    if any(h not in ("nsf", "maf", "gmm") for h in heads) or len(set(heads)) != len(heads):
        raise UsageError(f"--head: expected nsf, maf, gmm or several joined by '+'; got "
                         f"{head!r}")
    if ensemble < 1:
        raise UsageError(f"--ensemble: expected a positive integer; got {ensemble}")
    if not out.is_dir():
        raise UsageError(f"--out: expected an existing folder; got {out}")
    try:
        result = bench.run(chosen, ints(budgets, "budgets"), head=head, ensemble=ensemble,
                           observations=ints(observations, "observations"),
                           max_epochs=max_epochs, c2st_draws=c2st_draws,
                           early_stopping=c2st_early_stopping, seed=seed, new=new,
                           obs_seed=obs_seed, journal=out / "sbibm.journal.jsonl",
                           progress=lambda m: err_console.print(f"running {m}"))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    (out / "sbibm.json").write_text(json.dumps(result, indent=1))
    table = bench.markdown(result)
    (out / "sbibm.md").write_text(table)
    console.print(table, highlight=False, soft_wrap=True)
    console.print(f"written to {out / 'sbibm.json'} and {out / 'sbibm.md'}")


@app.command("eval")
@_user_errors
def eval_cmd(checkpoint: Annotated[str, typer.Argument(help="checkpoint file or pretrained name")],
             n_priors: Annotated[int, typer.Option(help="held-out problems")] = 1000,
             seed: Annotated[int, typer.Option(help="PRNG seed of the held-out draws")] = 12345,
             json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
             task: Annotated[str | None, typer.Option(help="refuse a checkpoint of another task")]
             = None):
    """Score a model on fresh held-out problems of its task."""
    import jax

    from flashbayes._evaluate import evaluate

    if n_priors < 1:
        raise UsageError(f"--n-priors: expected a positive integer; got {n_priors}")
    model = _load_model(checkpoint, task)
    res = evaluate(model, key=jax.random.key(seed), n_priors=n_priors)
    summary = {k: v for k, v in res.items() if k != "per_problem"}
    if json_out:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{model.task.name}: {n_priors} held-out problems (seed {seed})")
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


@app.command()
@_user_errors
def check(checkpoint: Annotated[str, typer.Argument(help="checkpoint file or pretrained name")],
          sims: Annotated[int, typer.Option(help="simulated problems (at least 100)")] = 1000,
          out: Annotated[Path, typer.Option(help="folder for sbc_ranks.png, coverage.png and "
                                                 "check.json")] = Path("flashbayes-check"),
          seed: Annotated[int, typer.Option(help="PRNG seed of the simulations")] = 0):
    """Calibration over the model's task (SBC, expected coverage, TARP); exit 1 if miscalibrated."""
    import jax

    from flashbayes._check import report_table, run_check, write_outputs

    if sims < 100:
        raise UsageError(f"--sims: expected an integer >= 100; got {sims}")
    _check_out_folder("--out", out)
    model = _load_model(checkpoint)
    out.mkdir(exist_ok=True)
    try:
        with console.status(f"simulating {sims} problems of {model.task.name}..."):
            report = run_check(jax.random.key(seed), model, n_sims=sims, seed=seed,
                               name=checkpoint)
    except FloatingPointError as exc:
        raise UsageError(str(exc)) from exc
    files = write_outputs(report, out)
    console.print(report_table(report))
    console.print(f"written: {', '.join(str(p) for p in files.values())}", soft_wrap=True)
    if report.calibrated:
        console.print(f"[green]calibrated[/] ({report.seconds:.1f} s)")
    else:
        console.print(f"[bold red]not calibrated[/] at family-wise level {report.level} "
                      f"({report.seconds:.1f} s)")
    raise typer.Exit(code=0 if report.calibrated else 1)


@app.command()
@_user_errors
def serve(checkpoint: Annotated[str, typer.Argument(
              help="checkpoint file, training folder or shipped model name (lti_tracking)")],
          host: Annotated[str, typer.Option(
              help="address to listen on; anything but localhost needs a token")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="TCP port")] = 8000,
          db: Annotated[Path, typer.Option(
              help="SQLite file of the streams (created if missing, reloaded on restart)")]
          = Path("flashbayes-state.sqlite"),
          token: Annotated[str | None, typer.Option(
              envvar="FLASHBAYES_TOKEN", show_default=False,
              help="bearer token every request must carry (prefer the environment variable)")]
          = None,
          max_batch: Annotated[int, typer.Option(
              help="most streams per batched forward pass; 1 switches batching off")] = 64,
          batch_window_ms: Annotated[float, typer.Option(
              help="how long an update waits for others to join its batch")] = 2.0,
          max_streams: Annotated[int, typer.Option(help="streams per server")] = 10_000,
          max_observations: Annotated[int, typer.Option(
              help="observation rows per request")] = 1000,
          max_body_bytes: Annotated[int, typer.Option(help="request body size")] = 1 << 20,
          sync: Annotated[str, typer.Option(
              help="SQLite synchronous mode: full (commits survive a power cut) or normal "
                   "(commits survive a killed server)")] = "full",
          warmup: Annotated[bool, typer.Option(
              help="compile every batch size before accepting requests")] = True,
          log_level: Annotated[str, typer.Option(
              help="uvicorn log level (critical, error, warning, info, debug)")] = "info",
          access_log: Annotated[bool, typer.Option(help="log every request")] = False):
    """Real-time posterior service: streams of observations filtered by the model (HTTP API,
    docs at /docs). Every acknowledged update is committed to --db first."""
    import uvicorn

    from flashbayes.serve import ServeConfig, StoreError, check_bind, create_app

    try:
        check_bind(host, token)
        config = ServeConfig(max_batch=max_batch, batch_window_ms=batch_window_ms,
                             max_streams=max_streams, max_observations=max_observations,
                             max_body_bytes=max_body_bytes, synchronous=sync, token=token or None,
                             warmup=warmup)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not 0 <= port <= 65535:
        raise UsageError(f"--port: expected 0..65535; got {port}")
    levels = ("critical", "error", "warning", "info", "debug")
    if log_level not in levels:
        raise UsageError(f"--log-level: expected one of {', '.join(levels)}; got {log_level!r}")
    _check_out_folder("--db", db)
    model = _load_model(checkpoint)
    try:
        api = create_app(model, db=db, config=config)
    except (StoreError, ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    n = len(api.state.table)
    err_console.print(f"serving {model.task.name} ({checkpoint}) on http://{host}:{port} "
                      f"(API docs at /docs); {n} stream{'s' if n != 1 else ''} in {db}; "
                      f"batches of up to {max_batch}", highlight=False, soft_wrap=True)
    uvicorn.run(api, host=host, port=port, log_level=log_level, access_log=access_log)


def _register_filter_command() -> None:
    from flashbayes._filter_cli import register

    register(app, load_model=_load_model, read_prior=_read_prior,
             read_csv=lambda p, w, allow_nan: _read_csv(p, w, option="--observations",
                                                        allow_nan=allow_nan),
             check_out=_check_out_folder, user_errors=_user_errors, usage_error=UsageError,
             console=console, fmt_seconds=_fmt_seconds)


_register_filter_command()


def _register_gp_command() -> None:
    from flashbayes._gp_cli import register

    register(app, read_csv=_read_csv, check_out=_check_out_folder, user_errors=_user_errors,
             usage_error=UsageError, console=console)


_register_gp_command()
app.add_typer(__import__("flashbayes._sbi_cli", fromlist=["app"]).app, name="sbi")


def main() -> None:
    """Console-script entry point."""
    app()
