"""Objectives by name: ``get_objective("pdu", top_k=5)``; ``available()`` lists them."""

from __future__ import annotations

from typing import Any

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make an objective available under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"objective name missing or registered twice: {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def get_objective(name: str, **params: Any):
    """Instantiate the objective registered as ``name`` with its parameters."""
    return objective_class(name)(**params)


def objective_class(name: str) -> type:
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def available() -> dict[str, str]:
    """``{name: one-line description}`` of every registered objective."""
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}
