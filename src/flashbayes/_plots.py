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
