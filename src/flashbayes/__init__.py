"""flashbayes: fast amortized Bayesian inference whose prior can be changed at run time.

Example:
    >>> import flashbayes as fb
    >>> "gmm_linear" in fb.tasks.names()
    True
"""

from flashbayes import diagnostics, sbi, tasks
from flashbayes._filter import FilterResult, Stream, filter
from flashbayes._infer import infer
from flashbayes.amortized import (
    AmortizedPosterior,
    CheckpointError,
    DistributionTransformer,
    DTConfig,
    TrainConfig,
    TrainEvent,
    load,
    load_pretrained,
    train,
)
from flashbayes.distributions import GMM, fit_gmm

__version__ = "0.1.0"

__all__ = ["GMM", "AmortizedPosterior", "CheckpointError", "DTConfig", "DistributionTransformer",
           "FilterResult", "Stream", "TrainConfig", "TrainEvent", "diagnostics", "filter",
           "fit_gmm", "infer", "load",
           "load_pretrained", "reference", "sbi", "tasks", "train", "__version__"]


def __getattr__(name: str):
    # the reference engines pull in BlackJAX and NumPyro: imported on first use only
    if name == "reference":
        import importlib

        return importlib.import_module("flashbayes.reference")
    raise AttributeError(f"module 'flashbayes' has no attribute {name!r}")
