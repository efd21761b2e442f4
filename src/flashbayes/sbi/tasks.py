"""The sbibm benchmark tasks as a registry (`names`, `get`) and readers of the shared data.

Example:
    >>> from flashbayes.sbi import tasks
    >>> t = tasks.get("gaussian_linear")
    >>> t.dim_theta, t.dim_x
    (10, 10)
"""

from flashbayes.sbi._tasks import (
    SBITask,
    get,
    load_observation,
    load_reference_samples,
    load_true_parameters,
    names,
)

__all__ = ["SBITask", "get", "load_observation", "load_reference_samples", "load_true_parameters",
           "names"]
