"""Diagnostics comparing a posterior with a reference."""

from flashbayes.diagnostics._basic import c2st, kl_divergence, nll

__all__ = ["c2st", "kl_divergence", "nll"]
