"""JAX's persistent compilation cache, switched on by the reference engines in a folder users pick.

The folder is, in order: the last `set_compilation_cache(path)`, the environment variable
`FLASHBAYES_CACHE_DIR`, or `~/.cache/flashbayes/jax`. `FLASHBAYES_CACHE_DIR=off` (or
`set_compilation_cache(None)`) leaves the cache off.
"""

from __future__ import annotations

import os
from pathlib import Path

_state: dict = {"configured": False, "dir": None}


def _default_dir() -> Path | None:
    env = os.environ.get("FLASHBAYES_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0") else Path(env).expanduser()
    return Path.home() / ".cache" / "flashbayes" / "jax"


def set_compilation_cache(path: str | os.PathLike | None) -> Path | None:
    """Store compiled programs in `path` (created if needed); None switches the cache off.

    Compiled reference engines (NUTS, SMC, VI) then load from disk in a new process instead of
    compiling again. Returns the folder in use.

    Example:
        >>> import tempfile
        >>> import flashbayes as fb
        >>> d = fb.reference.set_compilation_cache(tempfile.mkdtemp())
        >>> fb.reference.compilation_cache_dir() == d
        True
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    folder = None if path is None else Path(path).expanduser()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", None if folder is None else str(folder))
    if folder is not None:
        # programs that took more than half a second to compile are worth a disk entry
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    _state.update(configured=True, dir=folder)
    return folder


def compilation_cache_dir() -> Path | None:
    """The folder of the persistent compilation cache (None when off)."""
    return _state["dir"]


def ensure_disk_cache() -> None:
    """Switch the cache on at the default folder unless the user already chose one."""
    if not _state["configured"]:
        try:
            set_compilation_cache(_default_dir())
        except OSError:  # an unwritable home: run without the disk cache
            set_compilation_cache(None)


def ensure_compilation_cache() -> None:
    """`ensure_disk_cache`, and NumPy's BLAS on one thread (`limit_blas_threads`): what the
    reference engines do before each run."""
    from flashbayes._runtime import limit_blas_threads

    limit_blas_threads()
    ensure_disk_cache()
