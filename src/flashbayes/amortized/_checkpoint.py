"""Checkpoints: safetensors for arrays, a JSON header in the safetensors metadata. Never pickle."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT_VERSION = 1
_HEADER_KEY = "flashbayes"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, of another format version or another task."""


def _leaf_names(tree: Any, prefix: str) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(prefix + jax.tree_util.keystr(path), leaf) for path, leaf in leaves]


def save_checkpoint(path: str | os.PathLike, header: dict, trees: dict[str, Any]) -> Path:
    """Write `trees` (name -> pytree of arrays) and `header` atomically to `path`.

    The file is written to a temporary name in the same folder, flushed to disk, then renamed,
    so a crash leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, tree in trees.items():
        for leaf_name, leaf in _leaf_names(tree, name):
            if leaf is None:
                continue
            arr = np.asarray(leaf)
            if arr.dtype == object:
                raise TypeError(f"cannot store leaf {leaf_name} of dtype object")
            tensors[leaf_name] = np.ascontiguousarray(arr)
    meta = {_HEADER_KEY: json.dumps({"format_version": FORMAT_VERSION, **header})}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; use the usual permissions
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def checkpoint_file(path: str | os.PathLike) -> Path:
    """`path`, or the latest checkpoint of the training folder `path`."""
    path = Path(path)
    if path.is_dir():
        from flashbayes.amortized._train import latest_checkpoint

        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"checkpoint: expected a checkpoint file in {path}; got none")
        path = found
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a checkpoint, checked for format version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: expected a file; got no file at {path}")
    try:
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CheckpointError(f"checkpoint: expected a safetensors file; {path} is not one "
                              f"({type(exc).__name__})") from exc
    if _HEADER_KEY not in meta:
        raise CheckpointError(f"checkpoint: expected a flashbayes header in {path}; got none")
    try:
        header = json.loads(meta[_HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint: expected a JSON header in {path}; got malformed "
                              "JSON") from exc
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: expected format version {FORMAT_VERSION}; got "
                              f"{version!r} in {path}")
    return header


def load_tree(path: str | os.PathLike, name: str, like: Any) -> Any:
    """Fill a pytree shaped like `like` with the arrays stored under `name`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    out = []
    with safe_open(str(path), framework="np") as fh:
        keys = set(fh.keys())
        for p, leaf in leaves:
            key = name + jax.tree_util.keystr(p)
            if key not in keys:
                raise CheckpointError(f"checkpoint: expected tensor {key} in {path}; missing")
            arr = fh.get_tensor(key)
            if np.shape(leaf) == () and arr.shape == (1,):  # scalars are stored as (1,)
                arr = arr.reshape(())
            if tuple(arr.shape) != tuple(np.shape(leaf)):
                raise CheckpointError(f"checkpoint: tensor {key} expected shape "
                                      f"{tuple(np.shape(leaf))}; got {tuple(arr.shape)}")
            out.append(jax.numpy.asarray(arr, dtype=np.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def has_tree(path: str | os.PathLike, name: str) -> bool:
    with safe_open(str(path), framework="np") as fh:
        return any(k.startswith(name) for k in fh.keys())
