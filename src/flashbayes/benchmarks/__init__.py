"""Benchmark posteriors with gold-standard reference draws.

`posteriordb` holds 13 posteriors from posteriordb re-expressed as NumPyro models; their data and
reference draws are read from the shared data folder (see `flashbayes._shared`).

Example:
    >>> from flashbayes.benchmarks import posteriordb
    >>> len(posteriordb.names())
    13
"""

from flashbayes.benchmarks import posteriordb

__all__ = ["posteriordb"]
