"""Task registry: prior families, likelihoods / simulators and exact posteriors.

Example:
    >>> import flashbayes as fb
    >>> fb.tasks.names()[:3]
    ['gaussian_variance', 'gmm_linear', 'logistic_regression']
"""

# registration
from flashbayes.tasks import (  # noqa: F401
    _gp,
    _linear,
    _logistic,
    _nonlinear,
    _qubit,
    _simulator,
    _tracking,
    _variance,
)
from flashbayes.tasks._base import Batch, Problem, Task, get, names, register, task_params
from flashbayes.tasks._gp import GPHyperprior
from flashbayes.tasks._linear import gaussian_sum_update
from flashbayes.tasks._predictive import (
    PredictiveBatch,
    PredictiveProblem,
    PredictiveTask,
    get_predictive,
    predictive_names,
    register_predictive,
)
from flashbayes.tasks._variance import LogInverseGamma

__all__ = ["Batch", "GPHyperprior", "LogInverseGamma", "PredictiveBatch", "PredictiveProblem",
           "PredictiveTask", "Problem", "Task", "gaussian_sum_update", "get", "get_predictive",
           "names", "predictive_names", "register", "register_predictive", "task_params"]
