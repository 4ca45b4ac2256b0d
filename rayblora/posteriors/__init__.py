"""Posterior families behind one interface (:class:`~rayblora.posteriors.base.Posterior`), one module or package
each, registered by name in the leaf registry :mod:`rayblora.registry`."""

from rayblora.posteriors.base import AdapterState, Posterior
from rayblora.registry import available_methods, get_posterior_class, register

__all__ = ["AdapterState", "Posterior", "available_methods", "get_posterior_class", "register"]
