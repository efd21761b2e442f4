"""`fb.infer`: fast by default, exact when flagged."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jaxtyping import Array

from flashbayes._arviz import arviz

KHAT_THRESHOLD = 0.7
PREDICTIVE_METHODS = ("auto", "amortized", "nuts")
_LOG_RATIO: dict[Any, Any] = {}


def _log_ratio_fn(target, n: int):
    """Compiled: n draws theta ~ q (a padded GMM), then log p(theta, data) - log q(theta)."""
    from flashbayes.distributions._gmm import _log_prob, _sample

    key = (target.cache_key, n)
    if key not in _LOG_RATIO:
        def fn(k, w, m, s, data):
            z = _sample(k, w, m, s, n)
            # the GMM prior takes all draws at once (a per-draw vmap of its triangular solves
            # is about 100 times slower on CPU); the likelihood is vmapped
            lp = target.log_prior(z, data) + jax.vmap(
                lambda zz: target.log_likelihood(zz, data))(z)
            return lp - _log_prob(w, m, s, z)

        _LOG_RATIO[key] = jax.jit(fn)
    return _LOG_RATIO[key]


def amortized_khat(key: Array, target, posterior, *, n: int = 1000) -> float:
    """PSIS k-hat of the importance ratios p(theta | data) / q(theta), theta ~ q (a GMM).

    The unnormalised target is the exact prior x likelihood of the task; k-hat <= 0.7 means the
    amortized posterior is a reliable proposal for it (Vehtari et al. 2024). The GMM is padded
    to the task's component count, so one compiled program serves every prior of a size bucket.
    """
    from flashbayes._padding import pad_prior

    w, m, s, _ = pad_prior(posterior, max(target.task.k_max, posterior.n_components))
    lr = np.asarray(_log_ratio_fn(target, int(n))(key, w, m, s, target.data), np.float64)
    if not np.all(np.isfinite(lr)):
        return float("inf")
    return float(arviz().psislw(lr.copy())[1])


def infer(model: Any, data: Any = None, *, prior: Any = None, method: str = "auto",
          key: Array | None = None, khat_threshold: float = KHAT_THRESHOLD,
          khat_draws: int = 1000, **options: Any):
    """Posterior for `data` under `model`: amortized when it can be trusted, exact otherwise.

    Args:
        model: an amortized model (`fb.load_pretrained(...)`) with `prior` a GMM, a GP
            predictive model (`fb.load_pretrained("gp_hyperprior_pfn")`), or a NumPyro model
            function with `data` the dict of its keyword arguments.
        data: the observations (rows for an amortized model; a dict for a NumPyro model;
            `(context_x, context_y, query_x)` or a dict of those names for a GP model, whose
            answer is the posterior predictive at the query inputs: the network's inside its
            training range, NUTS over the hyperparameters outside it, or for method "nuts").
        prior: the GMM prior (amortized models only).
        method: "auto", "amortized", or a reference engine name (`fb.reference.engines()`:
            "exact", "nuts", "smc", "vi"). For an amortized model, "auto" returns the network's
            posterior when its PSIS k-hat against prior x likelihood is at most
            `khat_threshold` and the input lies inside the training range; otherwise it runs
            NUTS started from amortized draws. For a NumPyro model "auto" means NUTS.
        key: PRNG key (required except for "amortized" and "exact").
        khat_threshold, khat_draws: the k-hat check of "auto" (posterior models only).
        **options: passed to the engine (e.g. `num_samples`, `family`, `dense_mass`); for a GP
            model, `standardize` ("auto", True, False: see `PFNPredictor.predictive`) and the
            options of `flashbayes.reference.gp_nuts`, used when NUTS answers.

    Returns:
        A posterior (a `GMM` or a `SampleSet`; for a GP model the predictive, a
        `BarDistribution` or `GaussianMixturePredictive`) whose `info` dict says which path was
        taken
        (`info["path"]`), why (`info["reason"]`), the k-hat where computed (`info["khat"]`) and
        the seconds spent in each stage (`info["seconds"]`).

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> model = fb.load_pretrained("gmm_linear")
        >>> prior = fb.GMM([1.0], [[0.0, 0.0]], [np.eye(2)])
        >>> post = fb.infer(model, np.zeros((5, 2)), prior=prior, key=jax.random.key(0))
        >>> post.info["path"], post.info["khat"] <= 0.7
        ('amortized', True)
    """
    from flashbayes._runtime import limit_blas_threads
    from flashbayes.amortized import AmortizedPosterior
    from flashbayes.amortized._pfn import PFNPredictor
    from flashbayes.reference import engines, get_engine
    from flashbayes.reference._target import NumPyroTarget, TaskTarget

    limit_blas_threads()
    valid = ["auto", "amortized", *engines()]
    if isinstance(model, PFNPredictor):
        valid = list(PREDICTIVE_METHODS)
    if method not in valid:
        raise ValueError(f"method: expected one of {valid}; got {method!r}")
    if key is None and method not in ("amortized", "exact"):
        raise ValueError(f"key: expected a PRNG key (jax.random.key(...)) for method "
                         f"{method!r}; got None")

    if isinstance(model, PFNPredictor):
        if prior is not None:
            raise ValueError(f"prior: expected None for a GP predictive model (it holds its "
                             f"hyperprior); got a {type(prior).__name__}")
        return _infer_predictive(model, data, method, key, options)
    if isinstance(model, AmortizedPosterior):
        if prior is None:
            raise ValueError("prior: expected a GMM prior for an amortized model; got None")
        target = TaskTarget(model.task, prior, data)
        return _infer_amortized(model, target, method, key, khat_threshold, khat_draws,
                                options)
    if isinstance(model, Callable):
        if prior is not None:
            raise ValueError("prior: a NumPyro model states its own prior; got prior=...")
        if method == "amortized":
            raise ValueError("method 'amortized' needs an amortized model; got a NumPyro model")
        if data is not None and not isinstance(data, Mapping):
            raise TypeError(f"data: expected a dict of the model's keyword arguments; got "
                            f"{type(data).__name__}")
        target = NumPyroTarget(model, data or {})
        name = "nuts" if method == "auto" else method
        post = get_engine(name)(key, target, **options)
        post.info.update(path=name, reason=f"method={method!r}",
                         seconds={name: post.info["seconds"]})
        return post
    raise TypeError(f"model: expected an amortized model or a NumPyro model function; got "
                    f"{type(model).__name__}")


def _infer_amortized(model, target, method, key, khat_threshold, khat_draws, options):
    from flashbayes.amortized._model import OutOfRangeWarning
    from flashbayes.reference import get_engine

    if method not in ("auto", "amortized"):
        post = get_engine(method)(key, target, **options)
        post.info.update(path=method, reason=f"method={method!r}",
                         seconds={method: post.info["seconds"]})
        return post

    ok, why = model.in_training_range(target.prior, target.x)
    seconds: dict[str, float] = {}
    post = None
    if ok or method == "amortized":
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            if method == "auto":
                warnings.simplefilter("ignore", OutOfRangeWarning)
            post = model.posterior(target.prior, target.x)
        seconds["amortized"] = time.perf_counter() - t0
    if method == "amortized":
        post.info = {"path": "amortized", "reason": "method='amortized'", "khat": None,
                     "seconds": seconds}
        return post

    khat = None
    if post is not None:
        k_khat, key = jax.random.split(key)
        t0 = time.perf_counter()
        khat = amortized_khat(k_khat, target, post, n=khat_draws)
        seconds["khat"] = time.perf_counter() - t0
        if khat <= khat_threshold:
            post.info = {"path": "amortized", "seconds": seconds, "khat": khat,
                         "reason": f"k-hat {khat:.2f} <= {khat_threshold} and the input lies "
                                   "inside the training range"}
            return post
        reason = f"k-hat {khat:.2f} > {khat_threshold}: the amortized posterior is unreliable"
    else:
        reason = f"outside the training range: {why}"

    options = dict(options)
    chains = int(options.setdefault("num_chains", 4))
    k_init, k_nuts = jax.random.split(key)
    if post is not None and "init" not in options:
        options["init"] = post.sample(k_init, chains)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfRangeWarning)
        result = get_engine("nuts")(k_nuts, target, **options)
    seconds["nuts"] = time.perf_counter() - t0
    result.info.update(path="nuts", reason=reason, khat=khat, seconds=seconds)
    return result


def _predictive_problem(data):
    names = ("context_x", "context_y", "query_x")
    if isinstance(data, Mapping):
        missing = [n for n in names if n not in data]
        if missing or len(data) != 3:
            raise ValueError(f"data: expected a dict with keys {list(names)}; got keys "
                             f"{sorted(data)}")
        return tuple(data[n] for n in names)
    if isinstance(data, (tuple, list)) and len(data) == 3:
        return tuple(data)
    got = (f"a {type(data).__name__} of length {len(data)}"
           if isinstance(data, (tuple, list)) else f"a {type(data).__name__}")
    raise ValueError(f"data: expected (context_x, context_y, query_x) or a dict of those for a "
                     f"GP predictive model; got {got}")


def _infer_predictive(model, data, method, key, options):
    """`infer` for a PFN: its predictive inside the training range, else NUTS over the
    hyperparameters (in the same standard units, mapped back to the user's)."""
    from flashbayes.reference import GaussianMixturePredictive, gp_nuts

    cx, cy, qx = model.task.validate(*_predictive_problem(data))
    standardize = options.pop("standardize", "auto")
    sx, sy, sq, shift, scale = model.in_standard_units(cx, cy, qx, standardize)
    why = model.out_of_range(sx, sq)
    if method == "amortized" or (method == "auto" and not why):
        # options are NUTS's, for the fallback of "auto"; "amortized" has no use for them
        if options and method == "amortized":
            raise TypeError(f"options: expected none for method 'amortized' (the network "
                            f"takes none); got {sorted(options)}")
        t0 = time.perf_counter()
        pred = jax.block_until_ready(model.answer_standard(sx, sy, sq, shift, scale))
        info = {"path": "amortized", "seconds": {"amortized": time.perf_counter() - t0},
                "reason": (f"method={method!r}" if method == "amortized" else
                           "the input lies inside the training range")}
        return dataclasses.replace(pred, info=info)
    reason = f"method={method!r}" if method == "nuts" else f"outside the training range: {why}"
    options.setdefault("warn", False)
    t0 = time.perf_counter()
    ref = gp_nuts(key, model.reference_task(sx.shape[0]), sx, sy, sq, **options)
    pred = GaussianMixturePredictive(ref.weights, ref.means * scale + shift,
                                     ref.variances * scale**2, dict(ref.info))
    pred.info.update(path="nuts", reason=reason, seconds={"nuts": time.perf_counter() - t0})
    return pred
