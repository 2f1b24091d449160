"""Training methods as plug-ins of the engine (see :mod:`vireid_fast.methods.base`). Built in: ``dcl``."""

from .base import METHODS, Method, cluster_means, get_method, register_method
from .dcl import DCL

__all__ = ["DCL", "METHODS", "Method", "cluster_means", "get_method", "register_method"]
