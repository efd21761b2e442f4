"""Where the shared reference data (posteriordb, sbibm) live on this machine.

The reference data are not shipped with the package. They sit in a folder called ``shared`` next to
the repository (``<repo>/../shared/benchmarks/<kind>``) or wherever the environment variable
``FLASHBAYES_SHARED`` points (the path of the ``shared`` folder itself).

Example:
    >>> from flashbayes._shared import SharedDataMissing, shared_benchmarks_dir
    >>> try:
    ...     path = shared_benchmarks_dir("posteriordb")
    ... except SharedDataMissing:
    ...     path = None
    >>> path is None or path.name == "posteriordb"
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

ENV_VAR = "FLASHBAYES_SHARED"
KINDS = ("posteriordb", "sbibm")


class SharedDataMissing(FileNotFoundError):
    """The shared reference data could not be found (set ``FLASHBAYES_SHARED``)."""


def _search_starts() -> list[Path]:
    """Directories the upward search starts from: this file's folder, then the working folder."""
    return [Path(__file__).resolve().parent, Path.cwd().resolve()]


def _find(kind: str, *, environ: Mapping[str, str], starts: Iterable[Path]) -> Path:
    """The search behind `shared_benchmarks_dir`, with the environment and start points explicit."""
    if kind not in KINDS:
        raise ValueError(f"expected kind to be one of {list(KINDS)}; got {kind!r}")
    tail = Path("benchmarks") / kind
    setting = environ.get(ENV_VAR)
    if setting:
        path = Path(setting).expanduser() / tail
        if path.is_dir():
            return path
        raise SharedDataMissing(
            f"expected the shared {kind} data at {path} ({ENV_VAR}={setting!r}); got no such folder"
        )
    searched = []
    for start in starts:
        for folder in (start, *start.parents):
            path = folder / "shared" / tail
            if path.is_dir():
                return path
        searched.append(str(start))
    raise SharedDataMissing(
        f"expected a folder shared/{tail.as_posix()} in a parent of {searched}; got none. "
        f"Set {ENV_VAR} to the path of the 'shared' folder that holds benchmarks/{kind}."
    )


def shared_benchmarks_dir(kind: str) -> Path:
    """The folder ``<shared>/benchmarks/<kind>`` that holds the shared reference data.

    Search order: the environment variable ``FLASHBAYES_SHARED`` (the path of the ``shared``
    folder; when it is set, nothing else is searched); then, walking up from this module's folder
    and then from the working folder, the first folder ``P`` with ``P/shared/benchmarks/<kind>``.

    Args:
        kind: ``"posteriordb"`` or ``"sbibm"``.

    Returns:
        The path of the existing folder.

    Raises:
        ValueError: `kind` is not a known kind.
        SharedDataMissing: the folder was not found.

    Example:
        >>> try:
        ...     shared_benchmarks_dir("sbibm").is_dir()
        ... except SharedDataMissing:
        ...     True
        True
    """
    return _find(kind, environ=os.environ, starts=_search_starts())
