"""Registry of annotation methods: ``register`` (class decorator), ``create``, ``available``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import InputError
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator registering a ``Method`` subclass under ``name`` (sets ``cls.name``)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"invalid method name {name!r}")

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"{cls!r} is not a Method subclass")
        known = _REGISTRY.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name '{name}' is already registered by {known!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The class registered under ``name``; InputError listing valid names if unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown method '{name}'",
            field="method",
            fix="use one of: " + ", ".join(available()),
        ) from None


def create(name: str, **params: Any) -> Method:
    """Instantiate method ``name`` with ``params`` (unknown parameters raise InputError)."""
    return get(name)(**params)
