"""Reference engines the amortized answers are checked against.

Every engine has the signature `engine(key, target, **options)` and returns an object in the
posterior interface (`sample`, `log_prob` where defined, `mean`, `cov`, `to_inference_data`).
A target is what to sample: `NumPyroTarget(model, data)`, `TaskTarget(task, prior, data)` or
`LogDensityTarget(fn, dim=...)`. Most users call `fb.infer(..., method=name)` instead.
"""

from flashbayes.reference import _nonlinear_filters  # noqa: F401  (registration)
from flashbayes.reference._base import (
    ConvergenceWarning,
    SampleSet,
    engines,
    flat_names,
    get_engine,
)
from flashbayes.reference._cache import compilation_cache_dir, set_compilation_cache
from flashbayes.reference._exact import exact
from flashbayes.reference._filters import filters, get_filter, register_filter
from flashbayes.reference._gp import (
    GaussianMixturePredictive,
    gp_nuts,
    gp_oracle,
    gp_quadrature,
    gp_type2_ml,
)
from flashbayes.reference._numpyro import numpyro_model, run_numpyro_nuts
from flashbayes.reference._nuts import TaskNUTS, diagnose, nuts
from flashbayes.reference._smc import smc
from flashbayes.reference._target import LogDensityTarget, NumPyroTarget, Target, TaskTarget
from flashbayes.reference._vi import VIPosterior, vi

__all__ = ["ConvergenceWarning", "GaussianMixturePredictive", "LogDensityTarget", "NumPyroTarget",
           "SampleSet", "Target",
           "TaskNUTS", "TaskTarget", "VIPosterior", "compilation_cache_dir", "diagnose",
           "engines", "exact", "filters", "flat_names", "get_engine", "get_filter", "gp_nuts",
           "gp_oracle", "gp_quadrature", "gp_type2_ml",
           "numpyro_model", "nuts", "register_filter", "run_numpyro_nuts",
           "set_compilation_cache", "smc", "vi"]
