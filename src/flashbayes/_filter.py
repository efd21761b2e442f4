"""Sequential inference: posterior -> (transition) -> next prior, one observation at a time.

The amortized path runs the model's network once per step; the same compiled step serves the
whole-sequence path (`jax.lax.scan`), the stream path (`Stream.update`) and the service (many
streams in one batched call). Reference filters (Kalman, EKF, UKF, particle, grid) sit in
`flashbayes.reference` and are reached through the same `filter` function by name.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashbayes._padding import pad_prior, size_bucket
from flashbayes.amortized._model import grouped_core
from flashbayes.distributions import GMM

PRUNE_BELOW = 1e-6  # components under this weight are dropped after each update
PACK_GROUPS = 2  # run_parallel: steps of a window computed per packed sequence of rows


# -- component bound ---------------------------------------------------------------------------


def reduce_components(prior: GMM, max_components: int) -> GMM:
    """Merge the pair of components with the smallest loss of information until at most
    `max_components` remain (moment-preserving merges; the pair cost is the upper bound on the
    KL increase of Runnalls, 2007). Float64; the mixture's mean and covariance are kept.

    Example:
        >>> import numpy as np
        >>> import flashbayes as fb
        >>> g = fb.GMM(np.full(3, 1 / 3), np.array([[0.0], [0.1], [5.0]]), np.ones((3, 1, 1)))
        >>> reduce_components(g, 2).n_components
        2
    """
    if not isinstance(max_components, int) or max_components < 1:
        raise ValueError(f"max_components: expected a positive integer; got {max_components!r}")
    w = list(np.asarray(prior.weights, np.float64))
    m = list(np.asarray(prior.means, np.float64))
    ls = np.asarray(prior.scale_tril, np.float64)
    c = [L @ L.T for L in ls]

    def merged(i, j):
        wi, wj = w[i], w[j]
        wt = wi + wj
        mt = (wi * m[i] + wj * m[j]) / wt
        ct = (wi * (c[i] + np.outer(m[i] - mt, m[i] - mt))
              + wj * (c[j] + np.outer(m[j] - mt, m[j] - mt))) / wt
        return wt, mt, ct

    def cost(i, j):
        wt, _, ct = merged(i, j)
        ld = np.linalg.slogdet
        return 0.5 * (wt * ld(ct)[1] - w[i] * ld(c[i])[1] - w[j] * ld(c[j])[1])

    while len(w) > max_components:
        pairs = [(cost(i, j), i, j) for i in range(len(w)) for j in range(i + 1, len(w))]
        _, i, j = min(pairs)
        wt, mt, ct = merged(i, j)
        for idx in (j, i):
            del w[idx], m[idx], c[idx]
        w.append(wt)
        m.append(mt)
        c.append(0.5 * (ct + ct.T))
    w_arr = np.array(w)
    return GMM(w_arr / w_arr.sum(), np.array(m), np.linalg.cholesky(np.array(c)))


# -- observations -------------------------------------------------------------------------------


def validate_observations(observations: Any, data_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, data_dim) observations as float64, and the mask of the observed steps.

    A row that is all NaN is a missing observation (the step only applies the transition).
    """
    try:
        y = np.asarray(observations, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError("observations: expected an array of numbers; got "
                        f"{type(observations).__name__}") from exc
    if y.ndim == 1 and data_dim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != data_dim:
        raise ValueError(f"observations: expected shape (T, {data_dim}); got {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("observations: expected at least one step; got none")
    missing = np.isnan(y).all(1)
    if not np.isfinite(y[~missing]).all():
        raise ValueError("observations: expected finite values (a row of NaN marks a missing "
                         "observation); got NaN or inf in a partly observed row")
    return np.where(missing[:, None], 0.0, y), ~missing


# -- amortized filter ----------------------------------------------------------------------------


class AmortizedFilter:
    """The compiled update steps of an amortized model: one step for one stream, a scan for a
    whole sequence, and a batched step for many streams at once.

    The state starts with the current posterior as a padded mixture (weights (K,), means (K, d),
    scale_tril (K, d, d), mask (K,)), K = the task's component count; the network maps K
    components to K components, so the mixture never grows, and components whose weight falls
    under `PRUNE_BELOW` are masked out.

    Tasks whose state moves (`task.dynamic`) update with one observation at a time: the
    posterior, moved by the transition, is the next prior. For static tasks trained on data sets
    of up to n_max rows, the model conditions its *anchor* prior on all observations since the
    anchor in one pass (`window` = n_max), which avoids compounding the error of many small
    updates; when the window is full, the current posterior becomes the new anchor. Their state
    appends (anchor weights, means, scale_tril, mask, buffer (rows, p), count).
    """

    def __init__(self, model):
        task = model.task
        if task.n_max < 1:
            raise ValueError(f"model: expected a task that takes observations; {task.name!r} "
                             "takes none")
        self.model = model
        self.task = task
        self.k = task.k_max
        dynamic = getattr(task, "dynamic", False)
        self.window = 1 if dynamic else task.n_max
        self.rows = size_bucket(self.window)
        core = model.core
        window = self.window

        def prune(pw, pm, ps, cm):
            keep = cm & ((pw >= PRUNE_BELOW) | (pw == jnp.max(jnp.where(cm, pw, -1.0))))
            pw = jnp.where(keep, pw, 0.0)
            pw = pw / jnp.sum(pw)
            ps = jnp.where(keep[:, None, None], ps, jnp.eye(ps.shape[-1], dtype=ps.dtype))
            return pw, jnp.where(keep[:, None], pm, 0.0), ps, keep

        def step(state, obs):
            y, observed = obs
            if window == 1:
                w, m, s, cm = state
                if dynamic:
                    w, m, s = task.transition_arrays(w, m, s)
                data = jnp.zeros((self.rows, y.shape[0]), y.dtype).at[0].set(y)
                dmask = (jnp.arange(self.rows) == 0) & observed
                new = prune(*core(w, m, s, cm, data, dmask), cm)
                return new, new
            post, anchor, buf, cnt = state[:4], state[4:8], state[8], state[9]
            full = cnt >= window  # the posterior so far becomes the anchor
            anchor = tuple(jnp.where(full, a, b) for a, b in zip(post, anchor))
            buf = jnp.where(full, 0.0, buf)
            cnt = jnp.where(full, 0, cnt)
            buf = jnp.where(observed, buf.at[cnt].set(y), buf)
            cnt = cnt + observed.astype(cnt.dtype)
            dmask = jnp.arange(self.rows) < cnt
            aw, am, as_, acm = anchor
            new_post = prune(*core(aw, am, as_, acm, buf, dmask), acm)
            new = (*new_post, *anchor, buf, cnt)
            return new, new_post

        self._step = jax.jit(step)
        self._batched = jax.jit(jax.vmap(step))
        self._scan = jax.jit(lambda state, ys, obs: jax.lax.scan(step, state, (ys, obs))[1])
        # one anchor, many packed data sets: the posteriors of a window's steps side by side
        packed = grouped_core(model.network, task, PACK_GROUPS)
        self._window_packed = jax.jit(jax.vmap(
            lambda aw, am, as_, acm, data, group: jax.vmap(prune, in_axes=(0, 0, 0, None))(
                *packed(aw, am, as_, acm, data, group), acm),
            in_axes=(None, None, None, None, 0, 0)))

    # -- conversions ------------------------------------------------------------------------
    def initial_state(self, prior: GMM, *, host: bool = False):
        """The padded state of a prior (merged down to the model's component count), as JAX
        arrays, or NumPy arrays with `host` (what `run_parallel` works on)."""
        prior = self.model._check_prior(prior)
        if prior.n_components > self.k:
            prior = reduce_components(prior, self.k)
        mix = pad_prior(prior, self.k)
        if self.window > 1:
            buf = np.zeros((self.rows, self.task.data_dim), np.float32)
            mix = (*mix, *mix, buf, np.asarray(0, np.int32))
        return tuple(mix) if host else tuple(jnp.asarray(a) for a in mix)

    @staticmethod
    def to_gmm(state) -> GMM:
        return AmortizedFilter.to_gmms(tuple(a[None] for a in state[:4]))[0]

    @staticmethod
    def to_gmms(stacked) -> list[GMM]:
        """The GMM of each step of stacked posteriors (weights, means, scale_tril, mask)."""
        w, m, s, cm = (np.asarray(a) for a in stacked[:4])
        w, m, s, cm = w.astype(np.float64), m.astype(np.float64), s.astype(np.float64), cm != 0
        if np.all(cm == cm[:1]):  # the usual case: the same components at every step
            w, m, s = w[:, cm[0]], m[:, cm[0]], s[:, cm[0]]
            return [GMM.unchecked(w[t], m[t], s[t]) for t in range(len(w))]
        return [GMM.unchecked(w[t][cm[t]], m[t][cm[t]], s[t][cm[t]]) for t in range(len(w))]

    # -- paths --------------------------------------------------------------------------------
    def step(self, state, y: np.ndarray, observed: bool):
        new, _ = self._step(state, (jnp.asarray(y, jnp.float32), jnp.asarray(observed)))
        return new

    def step_batch(self, states, ys: np.ndarray, observed: np.ndarray):
        """One update of B streams in one call: states stacked on axis 0, ys (B, p)."""
        new, _ = self._batched(states, (jnp.asarray(ys, jnp.float32),
                                        jnp.asarray(observed, bool)))
        return new

    def run(self, state, ys: np.ndarray, observed: np.ndarray):
        """All steps in one compiled scan; returns the stacked posteriors (T, ...)."""
        return self._scan(state, jnp.asarray(ys, jnp.float32), jnp.asarray(observed, bool))

    def run_parallel(self, state, ys: np.ndarray, observed: np.ndarray):
        """All steps of a static task, the steps of each window side by side.

        Within a window every posterior is the network's answer for the window's anchor and the
        observations since it, so the steps do not wait for each other: each window is one
        batched call, and only the windows run in turn. In that call the steps' data sets are
        packed two to a sequence of rows (the step reading most rows with the one reading
        fewest that fits), each attending to its own rows only, so hardly any padded row is
        computed; and only the anchor's real components are run. The answers are those of
        `run` to float32 rounding; returns the stacked posteriors (T, ...) as numpy arrays.
        """
        if self.window == 1:
            raise ValueError(f"run_parallel: expected a static task; {self.task.name!r} moves "
                             "its state, so each step needs the one before (use run)")
        ys = np.asarray(ys, np.float32)
        observed = np.asarray(observed, bool)
        post = tuple(np.asarray(a) for a in state[:4])
        anchor = tuple(np.asarray(a) for a in state[4:8])
        buf = np.array(state[8], np.float32)
        cnt = int(state[9])
        out: list[list[np.ndarray]] = [[], [], [], []]
        t, total = 0, len(ys)
        while t < total:
            if cnt >= self.window:  # as in `step`: the posterior so far becomes the anchor
                anchor, buf, cnt = post, np.zeros_like(buf), 0
            counts = []
            while t < total:
                if observed[t]:
                    buf[cnt] = ys[t]
                    cnt += 1
                counts.append(cnt)
                t += 1
                if cnt >= self.window:
                    break
            parts = self._window_posteriors(anchor, buf, np.asarray(counts))
            for acc, part in zip(out, parts):
                acc.append(part)
            post = tuple(a[-1] for a in parts)
        return tuple(np.concatenate(acc) for acc in out)

    def _window_posteriors(self, anchor, buf: np.ndarray, counts: np.ndarray):
        # Step s of the window reads rows buf[:counts[s]]. The steps are packed PACK_GROUPS to
        # a sequence of at most `window` rows (the longest with the shortest that fits), so
        # few padded rows are computed, and only the anchor's real components are run (the
        # network treats components independently of padding); one compiled call.
        comps = np.flatnonzero(anchor[3])
        trimmed = [np.asarray(a)[comps] for a in anchor[:3]] + [np.ones(len(comps), bool)]
        rows = min(size_bucket(max(int(counts.max()), 1)), self.window)
        order = np.argsort(-counts, kind="stable")
        seqs, lo, hi = [], 0, len(order) - 1
        while lo <= hi:
            seq = [order[lo]]
            lo += 1
            while len(seq) < PACK_GROUPS and lo <= hi and (
                    sum(counts[i] for i in seq) + counts[order[hi]] <= rows):
                seq.append(order[hi])
                hi -= 1
            seqs.append(seq)
        n_seq = -(-len(seqs) // 4) * 4  # few compiled shapes
        data = np.zeros((n_seq, rows, buf.shape[1]), np.float32)
        group = np.full((n_seq, rows), -1, np.int32)
        where = np.zeros((len(counts), 2), np.int64)
        for j, seq in enumerate(seqs):
            at = 0
            for g, step in enumerate(seq):
                c = counts[step]
                data[j, at:at + c] = buf[:c]
                group[j, at:at + c] = g
                where[step] = j, g
                at += c
        res = self._window_packed(*trimmed, jnp.asarray(data), jnp.asarray(group))
        res = [np.asarray(a)[where[:, 0], where[:, 1]] for a in res]
        # back to the model's padded components (padding as `prune` leaves it)
        t, d = len(counts), anchor[1].shape[-1]
        full = [np.zeros((t, self.k), np.float32), np.zeros((t, self.k, d), np.float32),
                np.broadcast_to(np.eye(d, dtype=np.float32), (t, self.k, d, d)).copy(),
                np.zeros((t, self.k), bool)]
        for f, r in zip(full, res):
            f[:, comps] = r
        return full


def _filter_of(model) -> AmortizedFilter:
    # one compiled filter per model object
    cached = getattr(model, "_amortized_filter", None)
    if cached is None:
        cached = AmortizedFilter(model)
        model._amortized_filter = cached
    return cached


# -- results -------------------------------------------------------------------------------------


@dataclasses.dataclass
class FilterResult:
    """The posterior over the current state after each of T steps.

    `result[t]` is the posterior after observation t + 1 (a `GMM`, or for sample-based filters
    a weighted `SampleSet`); `means` is (T, d); `info` says how it was computed and how long it
    took.
    """

    posteriors: list
    info: dict

    def __len__(self) -> int:
        return len(self.posteriors)

    def __getitem__(self, t: int):
        return self.posteriors[t]

    def __iter__(self):
        return iter(self.posteriors)

    @property
    def means(self) -> np.ndarray:
        return np.stack([np.asarray(p.mean(), np.float64) for p in self.posteriors])

    def log_prob(self, states: Any) -> np.ndarray:
        """(T,) log density of states (T, d) under the posterior of each step."""
        x = np.asarray(states, np.float64)
        if x.shape != (len(self), self.posteriors[0].mean().shape[-1]):
            raise ValueError(f"states: expected shape ({len(self)}, d); got {x.shape}")
        return np.array([float(np.asarray(p.log_prob(x[t][None]))[0])
                         for t, p in enumerate(self.posteriors)])


class Stream:
    """Step-at-a-time filtering for observations that arrive one by one.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> model = fb.load_pretrained("lti_tracking")
        >>> prior = model.task.sample_problem(jax.random.key(0), n=0).prior
        >>> stream = fb.Stream(model, prior)
        >>> post = stream.update([0.3, -1.2])
        >>> stream.step, post.dim
        (1, 4)
    """

    def __init__(self, model, prior: GMM):
        self._filter = _filter_of(model)
        self._state = self._filter.initial_state(prior)
        self.step = 0

    @property
    def posterior(self) -> GMM:
        return AmortizedFilter.to_gmm(self._state)

    def update(self, observation: Any) -> GMM:
        """Apply the transition (if the state moves) and one observation (all NaN: missing)."""
        y, observed = validate_observations(np.asarray(observation, np.float64)[None],
                                            self._filter.task.data_dim)
        self._state = self._filter.step(self._state, y[0], bool(observed[0]))
        self.step += 1
        return self.posterior


def filter(model: Any, prior: GMM, observations: Any, *, key: jax.Array,
           method: str = "auto", task: Any = None, **options: Any) -> FilterResult:
    """Filter a sequence: the posterior over the current state after each observation.

    The prior is over the initial state x_0 and the first observation is y_1. For tasks whose
    state moves (`task.dynamic`), each step first applies the task's transition, then the
    update with the observation. A row of NaN is a missing observation.

    Args:
        model: an amortized model (`fb.load_pretrained("lti_tracking")`, `fb.load(...)`), or the
            name of a reference filter (`fb.reference.filters()`: "kalman", "ekf", "ukf",
            "particle", "grid"), which then needs `task`.
        prior: a `GMM` over the initial state.
        observations: (T, data_dim) array.
        key: PRNG key (used by stochastic filters; the amortized filter is deterministic).
        method: amortized models only, all giving the same answer: "scan" (one compiled
            loop), "step" (one call per observation, as a stream does), "parallel" (static
            tasks: the steps of each window side by side, see `AmortizedFilter.run_parallel`),
            or "auto" (default: "parallel" for static tasks, "scan" for moving states).
        task: for reference filters, the task (name or object).
        **options: passed to the reference filter (e.g. `num_particles`).

    Returns:
        A `FilterResult` of T posteriors.

    Example:
        >>> import jax
        >>> import flashbayes as fb
        >>> model = fb.load_pretrained("lti_tracking")
        >>> task = model.task
        >>> prior = task.sample_problem(jax.random.key(0), n=0).prior
        >>> _, ys = task.simulate_trajectory(jax.random.key(1), prior.mean(), 20)
        >>> res = fb.filter(model, prior, ys, key=jax.random.key(2))
        >>> len(res), res.info["method"]
        (20, 'scan')
    """
    from flashbayes.amortized import AmortizedPosterior

    _check_key(key)
    if isinstance(model, str):
        from flashbayes import tasks as _tasks
        from flashbayes.reference import get_filter

        if task is None:
            raise ValueError(f"task: expected a task (name or object) for the reference filter "
                             f"{model!r}; got None")
        task_obj = _tasks.get(task) if isinstance(task, str) else task
        engine = get_filter(model)
        ys, observed = validate_observations(observations, task_obj.data_dim)
        if not isinstance(prior, GMM):
            raise TypeError(f"prior: expected a GMM; got {type(prior).__name__}")
        t0 = time.perf_counter()
        posts = engine(key, task_obj, prior, ys, observed, **options)
        info = {"method": model, "seconds": time.perf_counter() - t0}
        return FilterResult(list(posts), info)
    if not isinstance(model, AmortizedPosterior):
        raise TypeError("model: expected an amortized model or a reference filter name; got "
                        f"{type(model).__name__}")
    if options:
        raise TypeError(f"unexpected options for an amortized model: {sorted(options)}")
    flt = _filter_of(model)
    ys, observed = validate_observations(observations, model.task.data_dim)
    t0 = time.perf_counter()
    if method == "auto":
        method = "scan" if flt.window == 1 else "parallel"
    state = flt.initial_state(prior, host=method == "parallel")
    if method in ("scan", "parallel"):
        run = flt.run if method == "scan" else flt.run_parallel
        posts = AmortizedFilter.to_gmms(run(state, ys, observed))
    elif method == "step":
        posts = []
        for y, o in zip(ys, observed):
            state = flt.step(state, y, bool(o))
            posts.append(AmortizedFilter.to_gmm(state))
    else:
        raise ValueError(f"method: expected 'auto', 'scan', 'parallel' or 'step'; got "
                         f"{method!r}")
    return FilterResult(posts, {"method": method, "seconds": time.perf_counter() - t0,
                                "steps": len(ys)})


def _check_key(key: Any) -> None:
    ok = isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                         or (key.dtype == jnp.uint32 and key.shape == (2,)))
    if not ok:
        raise TypeError(f"key: expected a JAX PRNG key (jax.random.key(seed)); got {key!r}")
