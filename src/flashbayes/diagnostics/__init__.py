"""Diagnostics: two-sample comparisons of a posterior with a reference (KL, NLL, C2ST, MMD),
importance-weight reliability (PSIS k-hat) and calibration over a task's prior predictive
(SBC, expected coverage, TARP). Every diagnostic is an entry of one registry (`names`, `get`).

Example:
    >>> import flashbayes as fb
    >>> "sbc" in fb.diagnostics.names()
    True
"""

from flashbayes.diagnostics._basic import c2st, kl_divergence, nll
from flashbayes.diagnostics._calibration import (
    CalibrationDraws,
    CoverageResult,
    PosteriorModel,
    SBCResult,
    calibration_draws,
    expected_coverage,
    sbc,
    scale_covariance,
    tarp,
)
from flashbayes.diagnostics._mmd import MMDResult, mmd
from flashbayes.diagnostics._psis import PSISResult, importance_khat, khat_threshold, psis_khat
from flashbayes.diagnostics._registry import Case, Diagnostic, get, names

__all__ = ["CalibrationDraws", "Case", "CoverageResult", "Diagnostic", "MMDResult", "PSISResult",
           "PosteriorModel", "SBCResult", "c2st", "calibration_draws", "expected_coverage", "get",
           "importance_khat", "khat_threshold", "kl_divergence", "mmd", "names", "nll",
           "psis_khat", "sbc", "scale_covariance", "tarp"]
