"""Micro-batching: the pending updates of many streams go through one compiled call.

One worker thread owns the model's batched step. Requests queue their observations per
stream; the worker takes the next observation of up to `max_batch` different streams (waiting
at most `window` seconds for more to arrive while the batch is not full), runs them as one
`AmortizedFilter.step_batch` call padded to a power of two, commits the finished requests in
one SQLite transaction and only then answers them. A stream is in at most one batch at a time
and its requests are applied in arrival order, one observation per batch; a request of n
observations is committed (or refused) as a whole, after its n-th step.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

import numpy as np

from flashbayes.serve._store import State, StreamTable


class StreamGone(Exception):
    """The stream does not exist (never created, or deleted while the update waited)."""


class NumericalError(Exception):
    """The network returned a non-finite or invalid posterior; the stream is unchanged."""


class Busy(Exception):
    """Too many updates are waiting; the request was not queued."""


class Closed(Exception):
    """The service is shutting down; the request was not queued."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's observations for one stream.

    `settle` is called exactly once with `(step, state)` after the commit, or with an
    exception instance (`StreamGone`, `NumericalError`, or another error): from the worker
    thread, or wherever the batcher's `deliver` hook runs it.
    """

    stream_id: str
    ys: np.ndarray  # (n, p) float32, zeros where missing
    observed: np.ndarray  # (n,) bool
    settle: Callable[[object], None]
    cursor: int = 0
    step0: int = 0
    state: State | None = None
    result: object = None


def _settle_all(jobs: list[Job]) -> None:
    for job in jobs:
        job.settle(job.result)


def batch_bucket(b: int) -> int:
    """The padded batch size of b updates: the next power of two."""
    return 1 << max(0, (b - 1).bit_length())


def valid_states(w, m, s, mask) -> np.ndarray:
    """Per state of a batch (B, ...): finite, some weight on its components, and positive
    Cholesky diagonals on them."""
    finite = np.isfinite(w).all(1) & np.isfinite(m).all((1, 2)) & np.isfinite(s).all((1, 2, 3))
    diag = np.diagonal(s, axis1=-2, axis2=-1) > 0
    with np.errstate(invalid="ignore"):
        weight = np.where(mask, w, 0.0).sum(1) > 0
    return finite & weight & (diag | ~mask[..., None]).all((1, 2))


class Batcher:
    """The worker thread that batches stream updates.

    Args:
        flt: the model's `AmortizedFilter`.
        table: where committed states live.
        max_batch: most streams per compiled call (1 switches batching off).
        window: seconds the worker waits for more updates while a batch is not full.
        max_queued: most requests waiting at once (`submit` raises `Busy` beyond).
        deliver: called once per batch from the worker thread with the finished jobs; it must
            call each job's `settle(job.result)` (for example on an event loop, with one
            wake-up for the whole batch). By default they are settled in the worker thread.
    """

    def __init__(self, flt, table: StreamTable, *, max_batch: int, window: float,
                 max_queued: int, deliver: Callable[[list[Job]], None] | None = None):
        self.deliver = deliver if deliver is not None else _settle_all
        self.flt = flt
        self.table = table
        self.max_batch = max_batch
        self.window = window
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque[Job]] = {}
        self._ready: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._queued = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.steps = 0

    # -- life cycle -------------------------------------------------------------------------------
    def warmup(self, state: State) -> None:
        """Compile the batched step for every padded batch size up to `max_batch`."""
        b = 1
        while True:
            self._call([state] * b, np.zeros((b, self.flt.task.data_dim), np.float32),
                       np.zeros(b, bool))
            if b >= self.max_batch:
                break
            b *= 2

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flashbayes-batcher",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a request (thread-safe); its `settle` is called when it is done."""
        with self._cond:
            if self._stopping:
                raise Closed("the service is shutting down")
            if self._queued >= self.max_queued:
                raise Busy(f"updates: expected at most {self.max_queued} waiting requests; "
                           "the queue is full (retry later)")
            queue = self._queues.setdefault(job.stream_id, collections.deque())
            queue.append(job)
            self._queued += 1
            if len(queue) == 1:  # not in a batch and not waiting: becomes ready
                self._ready[job.stream_id] = time.monotonic()
                # wake the worker only when it has something new to do: the first update
                # after idling, or a full batch that ends its window early
                if len(self._ready) == 1 or len(self._ready) >= self.max_batch:
                    self._cond.notify()

    @property
    def queued(self) -> int:
        return self._queued

    # -- worker -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if not self._ready:
                    return
                if self.window > 0 and len(self._ready) < self.max_batch:
                    # wait for company, counting from the oldest waiting update
                    deadline = min(self._ready.values()) + self.window
                    while len(self._ready) < self.max_batch and not self._stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                ids, since = [], []
                while self._ready and len(ids) < self.max_batch:
                    sid, t = self._ready.popitem(last=False)
                    ids.append(sid)
                    since.append(t)
                jobs = [self._queues[sid][0] for sid in ids]
            try:
                self._process(jobs)
            except Exception as exc:  # the compiled call or the database failed: answer all
                for job in jobs:
                    if job.result is None:
                        job.result = exc
            finished = [job for job in jobs if job.result is not None]
            if finished:
                self.deliver(finished)
            with self._cond:
                for sid, job, t in zip(ids, jobs, since):
                    queue = self._queues[sid]
                    if job.result is not None:
                        queue.popleft()
                        self._queued -= 1
                        t = time.monotonic()
                    if queue:  # more work for this stream: back of the line, keeping its age
                        self._ready[sid] = t
                    else:
                        del self._queues[sid]

    def _process(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            if job.state is None:  # first step of this request: start from the committed state
                current = self.table.get(job.stream_id)
                if current is None:
                    job.result = StreamGone(f"stream {job.stream_id!r}: no such stream")
                    continue
                job.step0, job.state = current
            live.append(job)
        if not live:
            return
        out = self._call([job.state for job in live],
                         np.stack([job.ys[job.cursor] for job in live]),
                         np.array([job.observed[job.cursor] for job in live]))
        self.batches += 1
        self.steps += len(live)
        ok = valid_states(*out[:4])  # the posterior part of the states
        done = []
        for i, job in enumerate(live):
            new = tuple(a[i] for a in out)  # read-only views
            if not ok[i]:
                job.result = NumericalError(
                    f"observations[{job.cursor}]: the network returned a non-finite posterior "
                    "(observation or state far outside the training range?); the stream is "
                    f"unchanged at step {job.step0}")
                continue
            job.state = new
            job.cursor += 1
            if job.cursor == len(job.ys):
                done.append(job)
        written = self.table.commit_steps([(job.stream_id, job.step0 + job.cursor, job.state)
                                           for job in done])
        for job, ok in zip(done, written):
            job.result = (job.step0 + job.cursor, job.state) if ok else StreamGone(
                f"stream {job.stream_id!r}: deleted while the update waited")

    def _call(self, states: list[State], ys: np.ndarray, observed: np.ndarray):
        b = len(states)
        bb = batch_bucket(b)
        if bb > b:  # pad with copies of the first stream, unobserved; their results are dropped
            states = states + [states[0]] * (bb - b)
            ys = np.concatenate([ys, np.zeros((bb - b, ys.shape[1]), ys.dtype)])
            observed = np.concatenate([observed, np.zeros(bb - b, bool)])
        stacked = tuple(np.stack([s[j] for s in states]) for j in range(len(states[0])))
        out = []
        for a in self.flt.step_batch(stacked, ys, observed):
            a = np.asarray(a)[:b]
            a.flags.writeable = False  # states are shared, never changed in place
            out.append(a)
        return out
