"""Stream states in SQLite (WAL mode), mirrored in memory.

Every change is committed before the caller hears of it: `create`, `delete` and `commit_steps`
return only after SQLite's COMMIT, so an acknowledged change survives a killed process (and,
with `synchronous="full"`, a power cut). Reads come from the in-memory mirror, which only ever
holds committed states.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
import uuid

import numpy as np

SCHEMA_VERSION = 1
SYNCHRONOUS = ("full", "normal")


class StoreError(Exception):
    """The database cannot be used by this server (other model layout, unreadable file)."""


class CapacityError(Exception):
    """The server holds its maximum number of streams."""


State = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The arrays of a filter state of task `task`: a (shape, dtype) per part.

    The first four parts are the current posterior, padded: weights (k,), means (k, d),
    scale_tril (k, d, d), mask (k,); filters of static tasks append their anchor prior, the
    observation buffer and its count (`flashbayes._filter.AmortizedFilter`). A state is stored
    as the parts' little-endian bytes, one after another.
    """

    task: str
    parts: tuple[tuple[tuple[int, ...], str], ...]

    @classmethod
    def of(cls, task: str, state: State) -> StateLayout:
        """The layout of an example state."""
        return cls(task, tuple((tuple(int(n) for n in np.shape(a)),
                                np.asarray(a).dtype.newbyteorder("<").str) for a in state))

    @property
    def n_bytes(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
                   for shape, dt in self.parts)

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA_VERSION, "task": self.task,
                           "parts": [[list(shape), dt] for shape, dt in self.parts]})

    def encode(self, state: State) -> bytes:
        if len(state) != len(self.parts):
            raise ValueError(f"state: expected {len(self.parts)} arrays; got {len(state)}")
        out = []
        for a, (shape, dt) in zip(state, self.parts):
            a = np.asarray(a)
            if a.shape != shape:
                raise ValueError(f"state: expected an array of shape {shape}; got {a.shape}")
            out.append(np.ascontiguousarray(a, dtype=dt).tobytes())
        return b"".join(out)

    def decode(self, blob: bytes) -> State:
        if len(blob) != self.n_bytes:
            raise StoreError(f"stored state: expected {self.n_bytes} bytes; got {len(blob)}")
        out, at = [], 0
        for shape, dt in self.parts:
            n = int(np.prod(shape, dtype=np.int64))
            a = np.frombuffer(blob, dt, count=n, offset=at).reshape(shape)
            out.append(a.astype(np.dtype(dt).newbyteorder("=")))
            at += n * np.dtype(dt).itemsize
        return tuple(out)


class StreamTable:
    """The streams of one server: an in-memory mirror of an SQLite table.

    Thread-safe: writers take one lock; readers (`get`) see the last committed value of a
    stream (dictionary reads are atomic and stored states are never changed in place).

    Args:
        path: SQLite file (created if missing) or ":memory:".
        layout: the state shape of the served model; a file written for another layout is
            refused with `StoreError`.
        max_streams: `create` raises `CapacityError` beyond this count.
        synchronous: "full" (each commit is flushed to disk: survives a power cut) or
            "normal" (WAL's default: survives a killed process, not a power cut).
    """

    def __init__(self, path: str | os.PathLike, *, layout: StateLayout, max_streams: int,
                 synchronous: str = "full"):
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous: expected one of {SYNCHRONOUS}; got {synchronous!r}")
        self.layout = layout
        self.max_streams = max_streams
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False, timeout=10.0)
            self._setup(synchronous)
            self._streams: dict[str, tuple[int, State]] = self._load()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"database {self.path}: expected an SQLite file; got an error "
                             f"({exc})") from exc

    # -- set-up -----------------------------------------------------------------------------------
    def _setup(self, synchronous: str) -> None:
        c = self._conn
        mode = c.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() not in ("wal", "memory"):
            raise StoreError(f"database {self.path}: expected WAL journal mode; got {mode}")
        c.execute(f"PRAGMA synchronous={synchronous.upper()}")
        c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        c.execute("CREATE TABLE IF NOT EXISTS streams (id TEXT PRIMARY KEY, step INTEGER NOT "
                  "NULL, state BLOB NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)")
        want = self.layout.to_json()
        row = c.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
        if row is None:
            c.execute("INSERT INTO meta VALUES ('layout', ?)", (want,))
        elif json.loads(row[0]) != json.loads(want):
            raise StoreError(f"database {self.path}: expected streams of {want}; it holds "
                             f"streams of {row[0]} (use another --db for this model)")

    def _load(self) -> dict[str, tuple[int, State]]:
        rows = self._conn.execute("SELECT id, step, state FROM streams").fetchall()
        return {sid: (int(step), self.layout.decode(blob)) for sid, step, blob in rows}

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- reads ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._streams)

    def get(self, stream_id: str) -> tuple[int, State] | None:
        """(step, state) of the last committed update, or None for an unknown id."""
        return self._streams.get(stream_id)

    # -- writes (each returns after COMMIT) -------------------------------------------------------
    def create(self, state: State) -> str:
        """A new stream at step 0; its id (32 hex digits)."""
        blob = self.layout.encode(state)
        with self._lock:
            if len(self._streams) >= self.max_streams:
                raise CapacityError(f"streams: expected at most {self.max_streams} per server; "
                                    "the limit is reached (delete streams first)")
            sid = uuid.uuid4().hex
            now = time.time()
            self._conn.execute("INSERT INTO streams VALUES (?, 0, ?, ?, ?)", (sid, blob, now, now))
            self._streams[sid] = (0, _frozen(state))
        return sid

    def delete(self, stream_id: str) -> bool:
        """Remove a stream; False if it did not exist."""
        with self._lock:
            if stream_id not in self._streams:
                return False
            self._conn.execute("DELETE FROM streams WHERE id = ?", (stream_id,))
            del self._streams[stream_id]
        return True

    def commit_steps(self, updates: list[tuple[str, int, State]]) -> list[bool]:
        """Write new (step, state) of several streams in one transaction.

        Returns, per update, whether it was written (False: the stream was deleted meanwhile).
        On a database error nothing is written and the error propagates.
        """
        if not updates:
            return []
        now = time.time()
        with self._lock:
            alive = [sid in self._streams for sid, _, _ in updates]
            rows = [(step, self.layout.encode(state), now, sid)
                    for (sid, step, state), ok in zip(updates, alive) if ok]
            if rows:
                c = self._conn
                c.execute("BEGIN IMMEDIATE")
                try:
                    c.executemany("UPDATE streams SET step = ?, state = ?, updated = ? "
                                  "WHERE id = ?", rows)
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
            for (sid, step, state), ok in zip(updates, alive):
                if ok:
                    self._streams[sid] = (step, _frozen(state))
        return alive


def _frozen(state: State) -> State:
    """The state as read-only arrays (arrays that already are read-only are kept as they are:
    nothing in this package writes to them)."""
    out = []
    for a in state:
        if a.flags.writeable:
            a = np.array(a, copy=True)
            a.flags.writeable = False
        out.append(a)
    return tuple(out)
