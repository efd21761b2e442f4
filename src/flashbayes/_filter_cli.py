"""`flashbayes filter`: sequential inference on a CSV of observations (or a simulated run),
with the task's reference filters beside the model, as a table and a PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

# the reference filters each task is compared with by default
DEFAULT_BASELINES = {"lti_tracking": ["kalman"], "nonlinear_tracking": ["ekf", "ukf", "particle"],
                     "qubit_rabi": ["grid"]}


def register(app: typer.Typer, *, load_model, read_prior, read_csv, check_out, user_errors,
             usage_error, console, fmt_seconds) -> None:
    """Add the `filter` command to the CLI app (helpers come from cli.py)."""

    @app.command("filter")
    @user_errors
    def filter_cmd(
            checkpoint: Annotated[str, typer.Argument(
                help="checkpoint file, training folder or shipped model name")],
            observations: Annotated[Path | None, typer.Option(
                help="CSV of observations, one row per step (a row of NaN: missing); without "
                     "it a run is simulated")] = None,
            prior: Annotated[Path | None, typer.Option(
                help="GMM JSON prior over the initial state (default: the simulated one)")]
            = None,
            steps: Annotated[int, typer.Option(help="steps of the simulated run")] = 50,
            seed: Annotated[int, typer.Option(help="PRNG seed of the simulation and filters")]
            = 0,
            baseline: Annotated[list[str] | None, typer.Option(
                help="reference filter(s) to run beside the model (default: the task's)")]
            = None,
            plot: Annotated[Path | None, typer.Option(help="write a PNG of the run")] = None,
            out: Annotated[Path | None, typer.Option(
                help="write the posterior means and sds per step as JSON")] = None):
        """Filter a sequence of observations: the posterior after every step, beside the
        reference filters."""
        import jax
        import numpy as np

        import flashbayes as fb

        check_out("--plot", plot)
        check_out("--out", out)
        if not 1 <= steps <= 10_000:
            raise usage_error(f"--steps: expected 1..10000; got {steps}")
        model = load_model(checkpoint)
        task = model.task
        if task.n_max < 1:
            raise usage_error(f"checkpoint: expected a model of a sequential task; {task.name!r} "
                              "takes no observations")
        key = jax.random.key(seed)
        truth = None
        if observations is None:
            gmm_prior, ys, truth = simulate(task, key, steps)
        else:
            ys = read_csv(observations, task.data_dim, allow_nan=True)
            gmm_prior = None
        if prior is not None:
            gmm_prior = read_prior(prior, task.theta_dim)
        if gmm_prior is None:
            raise usage_error("--prior: expected a GMM JSON file with --observations; got none")
        names = DEFAULT_BASELINES.get(task.name, []) if baseline is None else list(baseline)
        unknown = sorted(set(names) - set(fb.reference.filters()))
        if unknown:
            raise usage_error(f"--baseline: expected names among {fb.reference.filters()}; got "
                              f"{unknown}")
        runs = {}
        try:
            fb.filter(model, gmm_prior, ys, key=key)  # compile outside the timing
            t0 = time.perf_counter()
            runs["model"] = (fb.filter(model, gmm_prior, ys, key=key), time.perf_counter() - t0)
            for name in names:
                t0 = time.perf_counter()
                res = fb.filter(name, gmm_prior, ys, key=key, task=task)
                runs[name] = (res, time.perf_counter() - t0)
        except (ValueError, TypeError, FloatingPointError) as exc:
            raise usage_error(str(exc)) from exc
        from rich.table import Table

        table = Table(title=f"{task.name}: {len(ys)} steps (seed {seed})")
        table.add_column("filter")
        table.add_column("final mean")
        table.add_column("final sd")
        if truth is not None:
            table.add_column("NLL of the truth / step", justify="right")
        table.add_column("time / step", justify="right")
        summary = {}
        for name, (res, seconds) in runs.items():
            last = res[-1]
            sd = np.sqrt(np.diag(np.asarray(last.cov())))
            row = [name, np.array2string(np.asarray(last.mean()), precision=3),
                   np.array2string(sd, precision=3)]
            entry = {"means": res.means.tolist(),
                     "sds": [np.sqrt(np.diag(np.asarray(p.cov()))).tolist() for p in res],
                     "seconds": seconds}
            if truth is not None:
                nll = float(np.mean(-res.log_prob(truth)))
                row.append(f"{nll:.3f}")
                entry["nll_per_step"] = nll
            row.append(fmt_seconds(seconds / len(ys)))
            table.add_row(*row)
            summary[name] = entry
        console.print(table)
        if out is not None:
            out.write_text(json.dumps({"task": task.name, "steps": len(ys), "filters": summary},
                                      indent=1))
            console.print(f"results written to {out}")
        if plot is not None:
            from flashbayes._plots import plot_filter

            written = plot_filter(task, runs, ys, truth, plot)
            console.print(f"plot written to {written}")


def simulate(task, key, steps: int):
    """A prior from the task's family, the true states (or parameter) and the observations."""
    import jax
    import numpy as np

    kp, kx, kt = jax.random.split(key, 3)
    problem = task.sample_problem(kp, n=1)
    if getattr(task, "dynamic", False):
        x0 = np.asarray(problem.prior.sample(kx, 1))[0]
        xs, ys = task.simulate_trajectory(kt, x0, steps)
        return problem.prior, np.asarray(ys, np.float64), np.asarray(xs, np.float64)
    theta = np.asarray(problem.theta, np.float32)
    ys = np.asarray(task._simulate(kt, theta, steps), np.float64)
    return problem.prior, ys, np.repeat(problem.theta[None], steps, 0)
