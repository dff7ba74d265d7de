"""Annotation methods behind one interface; importing this package fills the registry."""

from . import celltypist_method, controls, linear, scbalance  # noqa: F401  (registration)
from .base import Method, TorchMethod
from .registry import available, create, get, register

__all__ = ["Method", "TorchMethod", "available", "create", "get", "register"]
