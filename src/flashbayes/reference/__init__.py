"""Reference engines the amortized answers are checked against."""

from flashbayes.reference._numpyro import numpyro_model, run_numpyro_nuts
from flashbayes.reference._nuts import NUTS, ConvergenceWarning, SampleSet, TaskNUTS

__all__ = ["NUTS", "ConvergenceWarning", "SampleSet", "TaskNUTS", "numpyro_model",
           "run_numpyro_nuts"]
