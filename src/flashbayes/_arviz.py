"""ArviZ, imported on first use (it is slow to import and warns about its own refactor)."""

from __future__ import annotations

import functools
import warnings


@functools.cache
def arviz():
    """The `arviz` module, imported once with its import-time FutureWarning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az
