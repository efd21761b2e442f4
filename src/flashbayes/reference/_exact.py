"""The closed-form posterior of the conjugate tasks, as a registered engine."""

from __future__ import annotations

import time
from typing import Any

from jaxtyping import Array

from flashbayes.reference._base import register_engine
from flashbayes.reference._target import Target, TaskTarget


@register_engine("exact")
def exact(key: Array, target: Target, **options: Any):
    """The exact posterior of a conjugate task (`gmm_linear`, `gaussian_variance`).

    `key` is unused (the answer is deterministic); it is accepted so every engine has the same
    signature. Raises ValueError for targets without a closed form.

    Example:
        >>> import jax, numpy as np
        >>> import flashbayes as fb
        >>> from flashbayes.reference import TaskTarget, exact
        >>> task = fb.tasks.get("gmm_linear")
        >>> prior = fb.GMM([1.0], [[0.0, 0.0]], [np.eye(2)])
        >>> post = exact(jax.random.key(0), TaskTarget(task, prior, np.zeros((3, 2))))
        >>> post.info["engine"]
        'exact'
    """
    if options:
        raise TypeError(f"exact: expected no options; got {sorted(options)}")
    if not isinstance(target, TaskTarget) or not target.task.has_exact:
        what = target.task.name if isinstance(target, TaskTarget) else type(target).__name__
        raise ValueError(f"exact: expected a task with a closed-form posterior (gmm_linear, "
                         f"gaussian_variance); got {what}")
    t0 = time.perf_counter()
    post = target.task.exact_posterior(target.prior, target.x)
    post.info = {"engine": "exact", "seconds": time.perf_counter() - t0}
    return post
