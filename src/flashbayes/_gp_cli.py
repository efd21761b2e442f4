"""`flashbayes gp`: posterior-predictive bands of a GP network beside NUTS and type-II ML."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

LEVELS = (0.05, 0.95)  # the band: a 90 % predictive interval


def predictive_bands(model, context_x, context_y, query_x, *, key, nuts: bool = True,
                     type2_ml: bool = True, nuts_warmup: int = 500, nuts_samples: int = 500,
                     standardize: bool | str = "auto") -> dict:
    """Mean and 90 % band of y* at every query point for the network and the references.

    With `standardize` (True, or "auto" when some input lies outside the training box) the
    problem is standardised once (`PFNPredictor.in_standard_units`), every method answers in
    standard units, and the answers are mapped back to the user's units.

    Returns:
        {method: {"mean": (m,), "lower": (m,), "upper": (m,), "seconds": wall time}}.
    """
    import jax
    import numpy as np

    from flashbayes.reference import gp_nuts, gp_type2_ml

    cx, cy, qx = model.task.validate(context_x, context_y, query_x)
    sx, sy, sq, shift, scale = model.in_standard_units(cx, cy, qx, standardize)
    why = model.out_of_range(sx, sq)
    out: dict = {}

    def add(name, pred, seconds):
        out[name] = {"mean": shift + scale * np.asarray(pred.mean(), np.float64),
                     "lower": shift + scale * np.asarray(pred.quantile(LEVELS[0]), np.float64),
                     "upper": shift + scale * np.asarray(pred.quantile(LEVELS[1]), np.float64),
                     "seconds": seconds}

    if why:  # e.g. more context points than trained on: the references still answer
        out["network"] = {"refused": why}
    else:
        t0 = time.perf_counter()
        pred = jax.block_until_ready(model.answer_standard(sx, sy, sq))
        add("network", pred, time.perf_counter() - t0)
    k_ml, k_nuts = jax.random.split(key)
    ref_task = model.reference_task(sx.shape[0])  # the references take any context size
    if type2_ml:
        t0 = time.perf_counter()
        add("type-II ML", gp_type2_ml(k_ml, ref_task, sx, sy, sq), time.perf_counter() - t0)
    if nuts:
        t0 = time.perf_counter()
        add("NUTS", gp_nuts(k_nuts, ref_task, sx, sy, sq, num_warmup=nuts_warmup,
                            num_samples=nuts_samples, warn=False), time.perf_counter() - t0)
    return out


def _query_grid(spec: str, x_dim: int, read_csv, usage_error):
    """`START:STOP:K` (K evenly spaced points, one input dimension) or a CSV of rows."""
    import numpy as np

    parts = spec.split(":")
    if len(parts) == 3 and not Path(spec).exists():
        try:
            a, b, k = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise usage_error(f"--query: expected START:STOP:K (numbers, K an integer) or a "
                              f"CSV file; got {spec!r}") from None
        if x_dim != 1:
            raise usage_error(f"--query: START:STOP:K grids are for one input dimension; the "
                              f"model has {x_dim}: give a CSV of query rows")
        if not (1 <= k <= 10_000) or not np.isfinite([a, b]).all():
            raise usage_error(f"--query: expected 1 <= K <= 10000 points and finite ends; got "
                              f"{spec!r}")
        return np.linspace(a, b, k)[:, None]
    return read_csv(Path(spec), x_dim, option="--query")


def _plot(path: Path, cx, cy, qx, bands: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = np.argsort(qx[:, 0])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {"network": "tab:blue", "NUTS": "black", "type-II ML": "tab:orange"}
    for name, b in bands.items():
        if "mean" not in b:
            continue
        x = qx[order, 0]
        c = colours.get(name, None)
        ax.plot(x, b["mean"][order], color=c, label=f"{name} mean")
        if name == "network":
            ax.fill_between(x, b["lower"][order], b["upper"][order], color=c, alpha=0.25,
                            label="network 90 %")
        else:
            ax.plot(x, b["lower"][order], color=c, ls="--", lw=1, label=f"{name} 90 %")
            ax.plot(x, b["upper"][order], color=c, ls="--", lw=1)
    ax.scatter(cx[:, 0], cy, color="crimson", zorder=5, s=18, label="data")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def register(app: typer.Typer, *, read_csv, check_out, user_errors, usage_error,
             console) -> None:
    """Add the `gp` command to the CLI app (helpers come from cli.py)."""

    @app.command("gp")
    @user_errors
    def gp_cmd(
            checkpoint: Annotated[str, typer.Argument(
                help="a shipped model's name (gp_hyperprior_pfn) or a PFN checkpoint file "
                     "or training folder (from benchmarks/train_gp.py)")],
            data: Annotated[Path, typer.Option(
                help="CSV of context points: D input columns then y, optional header")],
            query: Annotated[str, typer.Option(
                help="query inputs: START:STOP:K (K points, D = 1) or a CSV of rows")]
            = "0:1:101",
            plot: Annotated[Path | None, typer.Option(help="write a PNG of the bands (D = 1)")]
            = None,
            out: Annotated[Path | None, typer.Option(help="write every query's bands as CSV")]
            = None,
            nuts: Annotated[bool, typer.Option(help="NUTS over the hyperparameters")] = True,
            type2_ml: Annotated[bool, typer.Option(help="type-II maximum likelihood")] = True,
            nuts_warmup: Annotated[int, typer.Option(help="NUTS warm-up steps")] = 500,
            nuts_samples: Annotated[int, typer.Option(help="NUTS draws per chain")] = 500,
            seed: Annotated[int, typer.Option(help="PRNG seed of the references")] = 0,
            standardize: Annotated[str, typer.Option(
                help="auto (when inputs leave the training box), yes or no")] = "auto",
            json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False):
        """Posterior-predictive mean and 90 % band of y at the query inputs: the network beside
        NUTS over the hyperparameters and type-II maximum likelihood.

        Data with inputs outside the training box are standardised (inputs onto the box,
        outputs to zero mean and unit standard deviation) and the answers mapped back to the
        data's units.
        """
        import jax
        import numpy as np

        from flashbayes.amortized import (
            DT_PRETRAINED,
            GP_PRETRAINED,
            CheckpointError,
            load_pretrained,
        )
        from flashbayes.amortized._pfn import load_predictor

        path = Path(checkpoint)
        names = ", ".join(GP_PRETRAINED)
        if checkpoint in GP_PRETRAINED and not path.exists():
            model = load_pretrained(checkpoint)
        elif checkpoint in DT_PRETRAINED and not path.exists():
            raise usage_error(f"checkpoint: expected a GP model ({names}); {checkpoint!r} is a "
                              f"Distribution Transformer")
        elif not path.exists():
            raise usage_error(f"checkpoint: expected a shipped GP model's name ({names}) or a "
                              f"PFN checkpoint file; got {checkpoint} (no such file)")
        else:
            try:
                model = load_predictor(path)
            except CheckpointError as exc:
                raise usage_error(str(exc)) from None
        task = model.task
        d = task.x_dim
        rows = read_csv(data, d + 1, option="--data")
        if rows.shape[0] == 0:
            raise usage_error(f"--data {data}: expected at least one row of numbers; got none")
        cx, cy = rows[:, :d], rows[:, d]
        qx = _query_grid(query, d, read_csv, usage_error)
        check_out("--plot", plot)
        check_out("--out", out)
        if plot is not None and d != 1:
            raise usage_error(f"--plot: expected a model with one input dimension; got {d}")
        modes = {"auto": "auto", "yes": True, "no": False}
        if standardize not in modes:
            raise usage_error(f"--standardize: expected auto, yes or no; got {standardize!r}")
        try:
            bands = predictive_bands(model, cx, cy, qx, key=jax.random.key(seed), nuts=nuts,
                                     type2_ml=type2_ml, nuts_warmup=nuts_warmup,
                                     nuts_samples=nuts_samples,
                                     standardize=modes[standardize])
        except ValueError as exc:
            raise usage_error(str(exc)) from None
        methods = [m for m in bands if "mean" in bands[m]]
        if out is not None:
            head = [f"x{i + 1}" for i in range(d)] + [
                f"{m} {s}" for m in methods for s in ("mean", "lower", "upper")]
            cols = [qx[:, i] for i in range(d)] + [
                bands[m][s] for m in methods for s in ("mean", "lower", "upper")]
            tmp = out.with_name(out.name + ".tmp")
            np.savetxt(tmp, np.column_stack(cols), delimiter=",", header=",".join(head),
                       comments="")
            tmp.replace(out)
        if plot is not None:
            _plot(plot, cx, cy, qx, bands)
        if json_out:
            console.print_json(json.dumps({m: {k: (v.tolist() if hasattr(v, "tolist") else v)
                                                for k, v in b.items()}
                                            for m, b in bands.items()}))
            return
        from rich.table import Table

        table = Table(title=f"{task.name}: {cx.shape[0]} context points, {qx.shape[0]} queries "
                            "(mean [5 %, 95 %])")
        table.add_column("x")
        for m in methods:
            table.add_column(m)
        shown = np.unique(np.linspace(0, qx.shape[0] - 1, min(qx.shape[0], 15)).astype(int))
        for i in shown:
            table.add_row(", ".join(f"{v:.3g}" for v in qx[i]), *[
                f"{bands[m]['mean'][i]:.3f} [{bands[m]['lower'][i]:.3f}, "
                f"{bands[m]['upper'][i]:.3f}]" for m in methods])
        console.print(table)
        console.print("time: " + ", ".join(f"{m} {bands[m]['seconds'] * 1e3:.1f} ms"
                                           for m in methods), highlight=False)
        if "refused" in bands.get("network", {}):
            console.print(f"network: {bands['network']['refused']}: outside its training "
                          "range; the references answer alone", highlight=False)
        for name, p in (("picture", plot), ("bands", out)):
            if p is not None:
                console.print(f"{name} written to {p}", highlight=False)
