"""The `flashbayes demo` job: the shipped gmm_linear model against the exact posterior and NUTS."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flashbayes.amortized import load_pretrained
from flashbayes.diagnostics import kl_divergence


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run_demo(*, key: jax.Array, n: int = 10, nuts: bool = True,
             plot: str | Path | None = "flashbayes-demo.png") -> dict[str, Any]:
    """Draw a prior and a data set of `gmm_linear`, and compare amortized, exact and NUTS.

    Returns a dict with the rows of the table and the path of the picture.
    """
    model = load_pretrained("gmm_linear")
    task = model.task
    k_prob, k_kl, k_nuts = jax.random.split(key, 3)
    prob = task.sample_problem(k_prob, n=n)

    q = model.posterior(prob.prior, prob.data)  # compile
    t_dt = _median_time(lambda: model.posterior(prob.prior, prob.data).weights, 50)
    exact = task.exact_posterior(prob.prior, prob.data)
    t_exact = _median_time(lambda: task.exact_posterior(prob.prior, prob.data).weights, 20)
    kl, kl_se = kl_divergence(k_kl, exact, q, n=4000)
    rows = [
        {"method": "exact (closed form)", "kl": 0.0, "nll": -float(exact.log_prob(prob.theta)),
         "seconds": t_exact},
        {"method": "Distribution Transformer", "kl": kl, "kl_se": kl_se,
         "nll": -float(q.log_prob(prob.theta)), "seconds": t_dt},
    ]
    nuts_draws = None
    if nuts:
        from flashbayes.reference import TaskNUTS

        sampler = TaskNUTS(task, num_warmup=1000, num_samples=1000, num_chains=4)
        t0 = time.perf_counter()
        res = sampler.run(k_nuts, prob.prior, prob.data, warn=False)
        t_first = time.perf_counter() - t0
        res = sampler.run(jax.random.fold_in(k_nuts, 1), prob.prior, prob.data, warn=False)
        nuts_draws = res.flat
        rows.append({"method": "BlackJAX NUTS, 4 x 1000 (warm)", "kl": None,
                     "nll": None, "seconds": res.seconds, "first_call_seconds": t_first})
    for r in rows:
        r["speedup_of_dt"] = r["seconds"] / t_dt
    out = {"n": int(n), "n_components": prob.prior.n_components, "rows": rows,
           "theta": prob.theta.tolist()}
    if plot is not None:
        out["plot"] = str(plot_demo(prob, exact, q, task, plot, nuts_draws=nuts_draws))
    return out


def plot_demo(prob, exact, q, task, path: str | Path, *, nuts_draws=None) -> Path:
    """Contours of prior, exact and amortized posterior, with the data mapped to theta space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path).resolve()
    prior = prob.prior
    pts = [np.asarray(prior.means), np.asarray(exact.means), prob.theta[None]]
    lo = np.min(np.concatenate(pts), 0) - 2.0
    hi = np.max(np.concatenate(pts), 0) + 2.0
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    grid = np.stack([gx.ravel(), gy.ravel()], -1)
    fig, ax = plt.subplots(figsize=(7, 6))
    styles = [(prior, "Greys", "prior"), (exact, "Blues", "exact posterior"),
              (q, "Reds", "Distribution Transformer")]
    handles = []
    for dist_, cmap, label in styles:
        dens = np.exp(np.asarray(dist_.log_prob(grid))).reshape(gx.shape)
        levels = np.quantile(dens[dens > 0], [0.9, 0.97, 0.995]) if np.any(dens > 0) else None
        cs = ax.contour(gx, gy, dens, levels=levels, cmap=cmap,
                        linestyles="--" if label == "Distribution Transformer" else "-")
        handles.append(plt.Line2D([], [], color=plt.get_cmap(cmap)(0.8), label=label,
                                  linestyle="--" if label == "Distribution Transformer" else "-"))
        del cs
    if nuts_draws is not None:
        ax.scatter(nuts_draws[::8, 0], nuts_draws[::8, 1], s=1, alpha=0.2, color="tab:green")
        handles.append(plt.Line2D([], [], marker=".", linestyle="", color="tab:green",
                                  label="NUTS draws"))
    if prob.data.shape[0]:
        ls = np.linalg.solve(task.A, prob.data.T).T  # each x_i mapped to A^-1 x_i
        ax.scatter(ls[:, 0], ls[:, 1], marker="x", color="black", s=20)
        handles.append(plt.Line2D([], [], marker="x", linestyle="", color="black",
                                  label="data, A^-1 x_i"))
    ax.scatter([prob.theta[0]], [prob.theta[1]], marker="*", s=200, color="gold",
               edgecolor="black", zorder=5)
    handles.append(plt.Line2D([], [], marker="*", linestyle="", color="gold",
                              markeredgecolor="black", markersize=12, label="true theta"))
    ax.set_xlabel("theta_1")
    ax.set_ylabel("theta_2")
    ax.set_title(f"gmm_linear: {prior.n_components}-component prior, n = {prob.data.shape[0]}")
    ax.legend(handles=handles, loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
