"""Annotation methods behind one interface; importing this package fills the registry."""

from . import (  # noqa: F401  (registration)
    celltypist_method,
    controls,
    ensemble,
    linear,
    mlp,
    scbalance,
    scnym,
    scpretrain,
    sctab,
    xgboost_pca,
)
from .base import Method, TorchMethod
from .registry import available, create, get, register

__all__ = ["Method", "TorchMethod", "available", "create", "get", "register"]
