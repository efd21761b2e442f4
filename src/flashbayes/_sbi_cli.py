"""`flashbayes sbi simulate | train | sample`: neural posterior estimation on a registered task."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Simulation-based inference: simulate a task, train NPE, sample posteriors.")
console = Console()
err_console = Console(stderr=True)


class _Usage(Exception):
    """Bad input from the user."""


def _user_errors(fn):
    """Bad input (ours or the library's refusals) -> one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (_Usage, ValueError, TypeError, FileNotFoundError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _task(name: str):
    from flashbayes.sbi import tasks

    return tasks.get(name)  # ValueError names the known tasks


def _read_observation(path: Path, width: int):
    """One observation from a CSV: an optional header line, then one row of `width` numbers."""
    import numpy as np

    if not path.is_file():
        raise _Usage(f"--observation: expected a CSV file; got {path} (no such file)")
    rows = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        float(rows[0].split(",")[0]) if rows else None
    except ValueError:
        rows = rows[1:]  # a header line
    if len(rows) != 1:
        raise _Usage(f"--observation: expected one row of numbers (after an optional header); "
                     f"got {len(rows)} rows in {path}")
    try:
        values = np.array([float(v) for v in rows[0].split(",")])
    except ValueError as exc:
        raise _Usage(f"--observation: expected numbers; got {rows[0]!r} in {path}") from exc
    if values.shape != (width,):
        raise _Usage(f"--observation: expected {width} values; got {values.size} in {path}")
    return values


@app.command("simulate")
@_user_errors
def simulate_cmd(
        task: Annotated[str, typer.Argument(help="task name (see flashbayes.sbi.tasks)")],
        n: Annotated[int, typer.Option("--n", help="number of simulations")],
        out: Annotated[Path, typer.Option(help="simulation file (.npz)")],
        seed: Annotated[int, typer.Option(help="seed of the prior draws and simulations")] = 0):
    """Simulate N (theta, x) pairs of TASK into a .npz file (resumed if interrupted)."""
    from flashbayes.sbi import simulate

    t = _task(task)
    if n < 1:
        raise _Usage(f"--n: expected a positive integer; got {n}")
    sims = simulate(t.prior(), t.simulator, n, seed=seed, out=out, backend="jax")
    console.print(f"{sims.num_ok} of {n} simulations of {task} ok; written to {out}",
                  highlight=False)


@app.command("train")
@_user_errors
def train_cmd(
        task: Annotated[str, typer.Argument(help="task name (see flashbayes.sbi.tasks)")],
        simulations: Annotated[int, typer.Option(help="simulation budget")],
        out: Annotated[Path, typer.Option(help="folder for the estimator (npe.safetensors)")],
        head: Annotated[str | None, typer.Option(
            help="density head: nsf, maf, gmm, or several joined by '+' (default: the task's "
                 "own, nsf+maf but for slcp's nsf)")] = None,
        ensemble: Annotated[int, typer.Option(help="networks trained per head")] = 5,
        interval_map: Annotated[str, typer.Option(
            help="bijection onto a box prior: flat (linear but near the edges) or logit")]
        = "flat",
        sims_file: Annotated[Path | None, typer.Option(
            help="train on the first SIMULATIONS of this .npz file instead of simulating")]
        = None,
        seed: Annotated[int, typer.Option(help="PRNG seed")] = 0,
        max_epochs: Annotated[int, typer.Option(help="epoch limit")] = 1000,
        patience: Annotated[int, typer.Option(help="epochs without improvement before stopping")]
        = 20):
    """Train NPE for TASK; the best estimator is kept in OUT/npe.safetensors."""
    import jax
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from flashbayes.sbi import load_simulations, train_npe

    t = _task(task)
    if simulations < 2:
        raise _Usage(f"--simulations: expected an integer >= 2; got {simulations}")
    if sims_file is not None:
        if not sims_file.is_file():
            raise _Usage(f"--sims-file: expected a .npz simulation file; got {sims_file} "
                         "(no such file)")
        source, budget = load_simulations(sims_file), simulations
    else:
        source, budget = t.simulator, simulations
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                        TextColumn("network {task.fields[member]}  epoch {task.fields[epoch]}  "
                                   "val loss {task.fields[val]}"),
                        console=err_console, transient=True)
    settings = t.npe_settings(head)
    head = settings["head"]
    with progress:
        bar = progress.add_task(f"training {task} ({head})", epoch=0, val="-", member=1)

        def report(ev):
            progress.update(bar, epoch=ev.epoch, val=f"{ev.val_loss:.4f}", member=ev.member + 1)

        est = train_npe(t.prior(), source, budget, key=jax.random.key(seed),
                        ensemble=ensemble, interval_map=interval_map,
                        max_epochs=max_epochs, patience=patience,
                        parameter_names=list(t.parameter_names), out_dir=out, callback=report,
                        **settings)
    epochs = est.config["epochs"]
    nets = len(epochs) if isinstance(epochs, list) else 1
    console.print(f"trained {head} NPE ({nets} network{'s' * (nets > 1)}) for {task} on "
                  f"{est.config['num_simulations']} simulations in "
                  f"{sum(epochs) if nets > 1 else epochs} epochs (validation loss "
                  f"{est.config['best_val_loss']:.4f}); saved to {out}", highlight=False)


@app.command("sample")
@_user_errors
def sample_cmd(
        estimator: Annotated[Path, typer.Argument(help="folder or file written by `sbi train`")],
        observation: Annotated[Path, typer.Option(help="CSV: optional header, one row")],
        out: Annotated[Path, typer.Option(help="CSV of draws (header: parameter names)")],
        n: Annotated[int, typer.Option("--n", help="number of draws")] = 10_000,
        seed: Annotated[int, typer.Option(help="PRNG seed")] = 0,
        prior: Annotated[Path | None, typer.Option(
            help="prior as GMM JSON (weights, means, scale_tril), for a prior-swap model "
                 "(`flashbayes train sbi_TASK`), which takes the prior as input")] = None):
    """Draw N posterior samples for one observation into a CSV.

    ESTIMATOR is an NPE estimator (`flashbayes sbi train`), whose prior is the task's, or a
    prior-swap Distribution Transformer (`flashbayes train sbi_TASK`, or the shipped
    `sbi_gaussian_linear`), which needs --prior.
    """
    import jax
    import numpy as np

    from flashbayes.amortized import CheckpointError
    from flashbayes.amortized._checkpoint import checkpoint_file, read_header
    from flashbayes.amortized._model import pretrained_path
    from flashbayes.sbi import load_npe
    from flashbayes.tasks._simulator import SIMULATOR_TASKS

    shipped = {f"sbi_{name}" for name in SIMULATOR_TASKS}
    if not estimator.exists() and str(estimator) in shipped:
        try:
            estimator = pretrained_path(str(estimator))
        except ValueError as exc:
            raise _Usage(f"estimator: no shipped model {str(estimator)!r}; train one with "
                         f"`flashbayes train {estimator} --out DIR`") from exc
    if not estimator.exists():
        raise _Usage(f"estimator: expected a folder or file from `flashbayes sbi train`; got "
                     f"{estimator} (no such path)")
    if n < 1:
        raise _Usage(f"--n: expected a positive integer; got {n}")
    try:
        kind = read_header(checkpoint_file(estimator)).get("kind")
    except CheckpointError:
        kind = None  # let load_npe name what is wrong
    if kind == "distribution_transformer":
        return _sample_swap_model(estimator, observation, out, n, seed, prior)
    if prior is not None:
        raise _Usage("--prior: an NPE estimator keeps the prior it was trained under; re-weight "
                     "its posterior with fb.sbi.prior_swap in Python, or train a prior-swap "
                     "model (`flashbayes train sbi_TASK`) that takes the prior as input")
    try:
        est = load_npe(estimator)
    except CheckpointError as exc:
        raise _Usage(str(exc)) from None
    if len(est.x_shape) != 1:
        raise _Usage(f"estimator: expected observations of one dimension; this one takes "
                     f"shape {est.x_shape}")
    x_obs = _read_observation(observation, est.x_shape[0])
    draws = np.asarray(est.posterior(x_obs).sample(jax.random.key(seed), n), np.float64)
    np.savetxt(out, draws, delimiter=",", header=",".join(est.parameter_names), comments="",
               fmt="%.9g")
    console.print(f"{n} draws written to {out}", highlight=False)


def _sample_swap_model(path: Path, observation: Path, out: Path, n: int, seed: int,
                       prior_path: Path | None) -> None:
    """`sbi sample` for a Distribution Transformer: one forward pass from (prior, x)."""
    import jax
    import numpy as np

    import flashbayes as fb
    from flashbayes.amortized import CheckpointError
    from flashbayes.cli import UsageError, _read_prior

    try:
        model = fb.load(path)
    except CheckpointError as exc:
        raise _Usage(str(exc)) from None
    task = model.task
    if prior_path is None:
        raise _Usage(f"--prior: expected a prior GMM JSON file; this model ({task.name}) takes "
                     "the prior as an input")
    try:
        gmm = _read_prior(prior_path, task.theta_dim)
    except UsageError as exc:
        raise _Usage(str(exc)) from None
    x_obs = _read_observation(observation, task.data_dim)
    post = model.posterior(gmm, x_obs[None])
    draws = np.asarray(post.sample(jax.random.key(seed), n), np.float64)
    sbi_task = getattr(task, "sbi_task", None)
    names = (sbi_task.parameter_names if sbi_task is not None else
             tuple(f"theta_{i + 1}" for i in range(task.theta_dim)))
    np.savetxt(out, draws, delimiter=",", header=",".join(names), comments="", fmt="%.9g")
    console.print(f"{n} draws written to {out} ({task.name}, a {gmm.n_components}-component "
                  "prior)", highlight=False)
