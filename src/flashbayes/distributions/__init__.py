"""Distributions: the Gaussian mixture and its EM fit."""

from flashbayes.distributions._bar import BarDistribution, bar_borders
from flashbayes.distributions._fit import fit_gmm, fit_gmm_arrays
from flashbayes.distributions._gmm import GMM, gmm_moments, validate_gmm_arrays
from flashbayes.distributions._mixture import GaussianMixturePredictive

__all__ = ["GMM", "BarDistribution", "GaussianMixturePredictive", "bar_borders", "fit_gmm",
           "fit_gmm_arrays", "gmm_moments", "validate_gmm_arrays"]
