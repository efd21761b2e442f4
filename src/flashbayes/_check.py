"""`flashbayes check`: calibration of a model over its task (SBC, expected coverage, TARP), with
a table, two plots and a JSON report."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flashbayes.diagnostics import (
    CoverageResult,
    SBCResult,
    calibration_draws,
    expected_coverage,
    sbc,
    tarp,
)

N_TESTS = 3  # SBC, expected coverage, TARP: each at level / 3 (Bonferroni)


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """SBC, expected coverage and TARP of one model on one set of simulations.

    Each of the three tests runs at `level / 3`, so that a calibrated model is declared
    miscalibrated with probability at most `level`.
    """

    model: str
    task: str
    n_sims: int
    n_draws: int
    seed: int | None
    level: float
    sbc: SBCResult
    coverage: CoverageResult
    tarp: CoverageResult
    seconds: float

    @property
    def calibrated(self) -> bool:
        return self.sbc.passed and self.coverage.passed and self.tarp.passed

    def sbc_threshold(self) -> float:
        """The p-value each SBC rank statistic must exceed."""
        return self.sbc.level / len(self.sbc.statistics)

    def to_dict(self) -> dict[str, Any]:
        counts, expected = self.sbc.histogram()

        def curve(c: CoverageResult) -> dict[str, Any]:
            return {"alphas": c.alphas.tolist(), "ecp": c.ecp.tolist(),
                    "max_deviation": c.max_deviation, "bound": c.bound, "p_value": c.p_value,
                    "area": c.area, "signed_area": c.signed_area, "level": c.level,
                    "passed": c.passed}

        return {
            "model": self.model, "task": self.task, "n_sims": self.n_sims,
            "n_draws": self.n_draws, "seed": self.seed, "level": self.level,
            "calibrated": self.calibrated, "seconds": self.seconds,
            "sbc": {"statistics": list(self.sbc.statistics),
                    "p_values": self.sbc.p_values.tolist(),
                    "p_value_threshold": self.sbc_threshold(), "n_bins": self.sbc.n_bins,
                    "level": self.sbc.level, "passed": self.sbc.passed,
                    "bin_edges": self.sbc.bin_edges().tolist(),
                    "counts": {s: counts[:, j].tolist()
                               for j, s in enumerate(self.sbc.statistics)},
                    "expected_counts": expected.tolist()},
            "coverage": curve(self.coverage),
            "tarp": curve(self.tarp),
        }


def run_check(key: jax.Array, model: Any, *, n_sims: int = 1000, n_draws: int = 99,
              level: float = 0.05, seed: int | None = None,
              name: str | None = None) -> CheckReport:
    """Simulate `n_sims` problems of the model's task once and run SBC, expected coverage and
    TARP on them, each at level / 3.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> exact = fb.diagnostics.PosteriorModel.exact(fb.tasks.get("gmm_linear"))
        >>> run_check(jax.random.key(0), exact, n_sims=100).calibrated
        True
    """
    t0 = time.perf_counter()
    k_sim, k_cov, k_tarp = jax.random.split(key, 3)
    draws = calibration_draws(k_sim, model, n_sims=n_sims, n_draws=n_draws)
    each = level / N_TESTS
    alphas = np.linspace(0.0, 1.0, 101)
    res_sbc = sbc(k_sim, draws, n_bins=min(20, n_sims // 5, n_draws + 1), level=each)
    res_cov = expected_coverage(k_cov, draws, alphas=alphas, level=each)
    res_tarp = tarp(k_tarp, draws, alphas=alphas, level=each)
    return CheckReport(model=name or draws.model_name, task=draws.task_name, n_sims=n_sims,
                       n_draws=n_draws, seed=seed, level=level, sbc=res_sbc, coverage=res_cov,
                       tarp=res_tarp, seconds=time.perf_counter() - t0)


def report_table(report: CheckReport):
    """A rich table of the check: one row per test statistic."""
    from rich.table import Table

    def verdict(ok: bool) -> str:
        return "[green]pass[/]" if ok else "[bold red]FAIL[/]"

    table = Table(title=f"calibration of {report.model} ({report.task}): {report.n_sims} "
                        f"simulations, {report.n_draws} posterior draws each")
    table.add_column("test")
    table.add_column("statistic", justify="right")
    table.add_column("criterion", justify="right")
    table.add_column("result")
    table.add_column("note")
    thr = report.sbc_threshold()
    for name, p in zip(report.sbc.statistics, report.sbc.p_values):
        table.add_row(f"SBC rank of {name}", f"p = {p:.3g}", f"p > {thr:.2g}", verdict(p > thr),
                      "chi-square, " + f"{report.sbc.n_bins} bins")
    for label, c in (("HPD coverage", report.coverage), ("TARP", report.tarp)):
        table.add_row(label, f"max dev {c.max_deviation:.3f}", f"<= {c.bound:.3f}",
                      verdict(c.passed), f"p = {c.p_value:.3g}, area {c.area:.3f} (signed "
                                         f"{c.signed_area:+.3f}; < 0: over-confident)")
    return table


def write_outputs(report: CheckReport, out_dir: str | Path) -> dict[str, Path]:
    """Write sbc_ranks.png, coverage.png and check.json to `out_dir` (which must exist)."""
    out_dir = Path(out_dir).resolve()
    paths = {"sbc_ranks": out_dir / "sbc_ranks.png", "coverage": out_dir / "coverage.png",
             "json": out_dir / "check.json"}
    plot_sbc_ranks(report.sbc, paths["sbc_ranks"])
    plot_coverage(report.coverage, report.tarp, paths["coverage"])
    data = report.to_dict()
    data["files"] = {k: str(v) for k, v in paths.items()}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(paths["json"])
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sbc_ranks(res: SBCResult, path: str | Path) -> Path:
    """Rank histograms per statistic, with the band holding 99% of each bin's count under
    uniform ranks (binomial quantiles)."""
    from scipy import stats

    plt = _pyplot()
    path = Path(path).resolve()
    counts, expected = res.histogram()
    edges = res.bin_edges()
    width = np.diff(edges)
    lo = stats.binom.ppf(0.005, res.n_sims, expected / res.n_sims)
    hi = stats.binom.ppf(0.995, res.n_sims, expected / res.n_sims)
    m = len(res.statistics)
    fig, axes = plt.subplots(1, m, figsize=(3.3 * m, 3.0), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.bar(edges[:-1], hi - lo, bottom=lo, width=width, align="edge", color="0.85",
               label="99% band (uniform)")
        ax.bar(edges[:-1], counts[:, j], width=width, align="edge", fill=False,
               edgecolor="C0", linewidth=1.2, label="ranks")
        ax.step(edges, np.r_[expected, expected[-1]], where="post", color="0.4", linewidth=0.8)
        ax.set_title(f"{res.statistics[j]}: p = {res.p_values[j]:.3g}", fontsize=10)
        ax.set_xlabel(f"rank among {res.n_draws} draws")
        ax.set_xlim(0, res.n_draws + 1)
    axes[0][0].set_ylabel("simulations")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_coverage(coverage: CoverageResult, tarp_res: CoverageResult | None,
                  path: str | Path) -> Path:
    """Expected coverage (and TARP) curves against the diagonal, with the Kolmogorov-Smirnov
    band of the test."""
    plt = _pyplot()
    path = Path(path).resolve()
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    a = np.linspace(0.0, 1.0, 101)
    ax.fill_between(a, np.clip(a - coverage.bound, 0, 1), np.clip(a + coverage.bound, 0, 1),
                    color="0.88", label=f"KS band (level {coverage.level:.3g})")
    ax.plot(a, a, color="0.3", linewidth=0.8, linestyle=":")
    ax.plot(coverage.alphas, coverage.ecp, color="C0",
            label=f"HPD coverage (max dev {coverage.max_deviation:.3f})")
    if tarp_res is not None:
        ax.plot(tarp_res.alphas, tarp_res.ecp, color="C1", linestyle="--",
                label=f"TARP (max dev {tarp_res.max_deviation:.3f})")
    ax.set_xlabel("credibility level alpha")
    ax.set_ylabel("expected coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
