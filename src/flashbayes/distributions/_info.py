"""`Info`: the report a distribution carries about what produced it."""

from __future__ import annotations


class Info(dict):
    """A dict (engine, path taken, seconds, diagnostics) kept as a static field of an equinox
    distribution. Static fields belong to the tree structure, so every `Info` compares equal to
    every other and hashes alike: distributions that differ only in their reports share one
    compiled program instead of retracing jitted functions.

    Example:
        >>> Info(path="nuts") == Info(path="amortized"), Info(path="nuts")["path"]
        (True, 'nuts')
    """

    def __eq__(self, other) -> bool:
        return isinstance(other, Info)

    def __ne__(self, other) -> bool:
        return not isinstance(other, Info)

    def __hash__(self) -> int:
        return 0
