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


def _hpd_levels(dist_, key, masses=(0.39, 0.86, 0.99)):
    """Density values whose super-level sets hold the given probability masses."""
    draws = dist_.sample(key, 4000)
    dens = np.exp(np.asarray(dist_.log_prob(draws), np.float64))
    return np.sort(np.quantile(dens, 1.0 - np.asarray(masses)))


def _contours(ax, dist_, lo, hi, color, style, key):
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 220), np.linspace(lo[1], hi[1], 220))
    grid = np.stack([gx.ravel(), gy.ravel()], -1)
    dens = np.exp(np.asarray(dist_.log_prob(grid), np.float64)).reshape(gx.shape)
    levels = np.unique(_hpd_levels(dist_, key))
    if levels.size and dens.max() > levels[0]:
        ax.contour(gx, gy, dens, levels=levels, colors=color, linestyles=style, linewidths=1.4)


def plot_demo(prob, exact, q, task, path: str | Path, *, nuts_draws=None) -> Path:
    """Left: prior, data and posteriors in the prior's range. Right: a zoom on the posterior
    with the exact and amortized contours (39/86/99 % highest-density regions) and NUTS draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path).resolve()
    prior = prob.prior
    key = jax.random.key(0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    ls = np.linalg.solve(task.A, prob.data.T).T if prob.data.shape[0] else np.zeros((0, 2))
    m, sd = np.asarray(prior.mean()), np.sqrt(np.diagonal(np.asarray(prior.cov())))
    pts = np.concatenate([m[None] - 3 * sd, m[None] + 3 * sd, prob.theta[None]])
    views = [(pts.min(0) - 0.5, pts.max(0) + 0.5, "prior range")]
    em, esd = np.asarray(exact.mean()), np.sqrt(np.diagonal(np.asarray(exact.cov())))
    views.append((em - 4 * esd, em + 4 * esd, "zoom on the posterior"))
    for ax, (lo, hi, title) in zip(axes, views, strict=True):
        _contours(ax, prior, lo, hi, "0.55", "-", key)
        _contours(ax, exact, lo, hi, "tab:blue", "-", key)
        _contours(ax, q, lo, hi, "tab:red", "--", key)
        if nuts_draws is not None and title.startswith("zoom"):
            ax.scatter(nuts_draws[::4, 0], nuts_draws[::4, 1], s=2, alpha=0.25,
                       color="tab:green", zorder=1)
        if ls.shape[0]:
            ax.scatter(ls[:, 0], ls[:, 1], marker="x", color="black", s=25, zorder=4)
        ax.scatter([prob.theta[0]], [prob.theta[1]], marker="*", s=220, color="gold",
                   edgecolor="black", zorder=5)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xlabel("theta_1")
        ax.set_ylabel("theta_2")
        ax.set_title(title)
    handles = [plt.Line2D([], [], color="0.55", label="prior"),
               plt.Line2D([], [], color="tab:blue", label="exact posterior"),
               plt.Line2D([], [], color="tab:red", linestyle="--",
                          label="Distribution Transformer"),
               plt.Line2D([], [], marker="x", linestyle="", color="black",
                          label="data mapped to theta: A^-1 x_i"),
               plt.Line2D([], [], marker="*", linestyle="", color="gold",
                          markeredgecolor="black", markersize=12, label="true theta")]
    if nuts_draws is not None:
        handles.append(plt.Line2D([], [], marker=".", linestyle="", color="tab:green",
                                  label="NUTS draws"))
    axes[1].legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.85)
    fig.suptitle(f"gmm_linear: {prior.n_components}-component GMM prior, n = "
                 f"{prob.data.shape[0]} data points (contours: 39/86/99 % regions)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
