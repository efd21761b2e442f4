"""The simulation file and its journal of chunks.

``sims.npz`` is written once, atomically, when every chunk is done. Until then the chunks live in
``sims.npz.parts/``: ``manifest.json`` (what the run is: seed, budget, chunk size, simulator, a
hash of theta, the output shape) and one ``chunk-NNNNNN.npz`` per finished chunk. Every file is
written to a temporary name, flushed to disk and renamed, so a crash leaves either the whole
file or none of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from flashbayes.sbi._chunks import KINDS, OK

FORMAT = "flashbayes.simulations"
VERSION = 1
FILE_ARRAYS = ("theta", "x", "ok", "status", "seed", "meta")
# manifest entries a rerun must agree on, and how to name them in an error
IDENTITY = {
    "seed": "seed",
    "num_simulations": "num_simulations",
    "chunk_size": "chunk_size",
    "kind": "simulator kind (backend 'jax' or a Python backend)",
    "simulator": "simulator name",
    "theta_shape": "theta shape",
    "theta_sha256": "theta (the prior's draws)",
}


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Write `path` through `write(file)` to a temporary name, fsync, then rename into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _text(value: str) -> np.ndarray:
    return np.array(value, dtype=np.str_)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


class Journal:
    """The ``.parts`` directory beside an output file."""

    def __init__(self, out: Path):
        self.out = out
        self.dir = out.with_name(out.name + ".parts")
        self.manifest_path = self.dir / "manifest.json"

    def chunk_path(self, c: int) -> Path:
        return self.dir / f"chunk-{c:06d}.npz"

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.manifest_path}: expected the JSON manifest of an earlier "
                             f"run; got an unreadable file ({exc}). Delete {self.dir} to start "
                             "over.") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{self.manifest_path}: expected a manifest of format {FORMAT!r}; "
                             f"got something else. Delete {self.dir} to start over.")
        return manifest

    def start(self, manifest: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # left by a crash mid-write
            with contextlib.suppress(OSError):
                stale.unlink()
        if not self.manifest_path.exists():
            text = json.dumps(manifest, indent=1).encode()
            atomic_write(self.manifest_path, lambda f: f.write(text))

    def write_chunk(self, c: int, start: int, x: np.ndarray, status: np.ndarray,
                    errors: list) -> None:
        write_npz(self.chunk_path(c), {"start": np.int64(start), "x": x, "status": status,
                                       "errors": _text(json.dumps(errors))})

    def read_chunk(self, c: int, start: int, m: int, x_shape: tuple[int, ...]):
        """(x, status, errors) of a finished chunk, or None if it is missing or unreadable."""
        path = self.chunk_path(c)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                x, status = z["x"], z["status"]
                ok = (int(z["start"]) == start and x.shape == (m, *x_shape)
                      and status.shape == (m,) and status.dtype == np.int8)
                errors = json.loads(str(z["errors"])) if ok else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            ok = False
        if not ok:  # cannot happen with atomic writes unless the disk was tampered with: redo it
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return x, status, errors

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def identity_mismatch(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable differences between a stored run and the one asked for."""
    out = []
    for field, label in IDENTITY.items():
        if stored.get(field) != wanted[field]:
            if field == "theta_sha256":
                out.append(f"{label} differ (another prior?)")
            else:
                out.append(f"{label}: stored {stored.get(field)!r}, asked {wanted[field]!r}")
    return out


def failure_counts(status: np.ndarray) -> dict[str, int]:
    return {kind: int(np.sum(status == code)) for code, kind in enumerate(KINDS, start=1)}


def save_file(path: Path, theta: np.ndarray, x: np.ndarray, status: np.ndarray, seed: int,
              meta: dict[str, Any]) -> None:
    write_npz(path, {"theta": theta, "x": x, "ok": status == OK, "status": status,
                     "seed": np.int64(seed), "meta": _text(json.dumps(meta))})


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{path}: expected a flashbayes simulation file ({FORMAT} version "
                      f"{VERSION}: arrays {', '.join(FILE_ARRAYS)}); got {what}")


def load_file(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, dict[str, Any]]:
    """Read and validate a simulation file: (theta, x, status, seed, meta)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a simulation file; got no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in FILE_ARRAYS if k not in z.files]
            if missing:
                raise _bad(path, f"a file without {', '.join(missing)}")
            arrays = {k: z[k] for k in FILE_ARRAYS}
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise _bad(path, f"a file that is not a readable .npz ({exc})") from exc
    except ValueError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise _bad(path, f"unreadable arrays ({exc})") from exc
    theta, x, ok, status = (arrays[k] for k in ("theta", "x", "ok", "status"))
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as exc:
        raise _bad(path, "a meta entry that is not JSON") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise _bad(path, f"meta of format {found!r}")
    if meta.get("version") != VERSION:
        raise _bad(path, f"version {meta.get('version')!r}")
    if arrays["seed"].shape != () or not np.issubdtype(arrays["seed"].dtype, np.integer):
        raise _bad(path, f"seed of shape {arrays['seed'].shape} and dtype {arrays['seed'].dtype}")
    seed = int(arrays["seed"])
    n = meta.get("num_simulations")
    x_shape = tuple(meta.get("x_shape", ()))
    checks = [
        (theta.ndim == 2 and theta.shape[0] == n, f"theta of shape {theta.shape} for n={n}"),
        (x.shape == (n, *x_shape), f"x of shape {x.shape}; meta says ({n}, *{x_shape})"),
        (status.shape == (n,) and status.dtype == np.int8,
         f"status of shape {status.shape} and dtype {status.dtype}"),
        (ok.shape == (n,) and ok.dtype == np.bool_, f"ok of shape {ok.shape} and dtype {ok.dtype}"),
        (seed == meta.get("seed"), f"seed {seed} but meta seed {meta.get('seed')!r}"),
    ]
    for good, what in checks:
        if not good:
            raise _bad(path, what)
    if np.any((status < 0) | (status > len(KINDS))):
        raise _bad(path, "unknown status codes")
    if not np.array_equal(ok, status == OK):
        raise _bad(path, "an ok mask that disagrees with the status codes")
    if not (np.issubdtype(theta.dtype, np.floating) and np.issubdtype(x.dtype, np.floating)):
        raise _bad(path, f"theta of dtype {theta.dtype} and x of dtype {x.dtype}")
    if not np.all(np.isfinite(x[ok])):
        raise _bad(path, "NaN or inf in simulations marked ok")
    if meta.get("failures") != failure_counts(status):
        raise _bad(path, "failure counts in meta that disagree with the status codes")
    return theta, x, status, seed, meta
