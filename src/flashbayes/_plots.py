"""Plots shared by the CLI commands (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_prior_posterior(prior, posterior, path: str | Path) -> Path:
    """Marginal densities (1-D) or contours (first two dimensions) of prior and posterior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path).resolve()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    if prior.dim == 1:
        both = np.concatenate([np.asarray(prior.means).ravel(),
                               np.asarray(posterior.means).ravel()])
        sd = float(np.sqrt(np.asarray(prior.cov())[0, 0]))
        grid = np.linspace(both.min() - 3 * sd, both.max() + 3 * sd, 600)[:, None]
        for dist_, label, style in ((prior, "prior", "-"), (posterior, "posterior", "--")):
            ax.plot(grid[:, 0], np.exp(np.asarray(dist_.log_prob(grid))), style, label=label)
        ax.set_xlabel("theta")
        ax.set_ylabel("density")
    else:
        p2, q2 = prior.marginal([0, 1]), posterior.marginal([0, 1])
        pts = np.concatenate([np.asarray(p2.means), np.asarray(q2.means)])
        lo, hi = pts.min(0) - 2.5, pts.max(0) + 2.5
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
        grid = np.stack([gx.ravel(), gy.ravel()], -1)
        for dist_, cmap, label in ((p2, "Greys", "prior"), (q2, "Reds", "posterior")):
            dens = np.exp(np.asarray(dist_.log_prob(grid))).reshape(gx.shape)
            ax.contour(gx, gy, dens, levels=np.quantile(dens, [0.9, 0.97, 0.995]), cmap=cmap)
            ax.plot([], [], color=plt.get_cmap(cmap)(0.8), label=label)
        ax.set_xlabel("theta_1")
        ax.set_ylabel("theta_2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_filter(task, runs: dict, ys: np.ndarray, truth: np.ndarray | None,
                path: str | Path) -> Path:
    """A filtering run: for tracking tasks the x-y track (truth, observations, each filter's
    mean) and each filter's position sd over time; for static tasks each parameter's
    posterior mean +- 2 sd over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path).resolve()
    steps = np.arange(1, len(ys) + 1)
    colours = plt.get_cmap("tab10")
    if getattr(task, "dynamic", False):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
        if truth is not None:
            ax.plot(truth[:, 0], truth[:, 1], "k-", lw=2, label="true track")
        if hasattr(task, "H"):
            ax.plot(ys[:, 0], ys[:, 1], ".", color="grey", ms=4, label="observations")
        for i, (name, (res, _)) in enumerate(runs.items()):
            m = res.means
            ax.plot(m[:, 0], m[:, 1], "-", color=colours(i), lw=1.2, label=f"{name} mean")
            sd = np.array([np.sqrt(np.diag(np.asarray(p.cov()))[:2].mean()) for p in res])
            ax2.plot(steps, sd, "-", color=colours(i), label=name)
        ax.set_xlabel("x position")
        ax.set_ylabel("y position")
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=8)
        ax2.set_xlabel("step")
        ax2.set_ylabel("posterior position sd")
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
    else:
        d = task.theta_dim
        fig, axes = plt.subplots(1, d, figsize=(6 * d, 4.5), squeeze=False)
        labels = getattr(task, "param_names", [f"theta_{j + 1}" for j in range(d)])
        for j, ax in enumerate(axes[0]):
            for i, (name, (res, _)) in enumerate(runs.items()):
                m = res.means[:, j]
                sd = np.array([np.sqrt(np.asarray(p.cov())[j, j]) for p in res])
                ax.plot(steps, m, "-", color=colours(i), label=name)
                ax.fill_between(steps, m - 2 * sd, m + 2 * sd, color=colours(i), alpha=0.15)
            if truth is not None:
                ax.axhline(truth[0, j], color="k", ls="--", lw=1, label="truth")
            ax.set_xlabel("observations")
            ax.set_ylabel(labels[j])
            ax.legend(fontsize=8)
    fig.suptitle(f"{task.name}: posterior mean ± 2 sd" if not getattr(task, "dynamic", False)
                 else f"{task.name}: filtered track")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
