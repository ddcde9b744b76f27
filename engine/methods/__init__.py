"""Activation-compression methods and their registry.

Adding a method: one file with a :class:`~engine.methods.base.Method` subclass plus a line in ``METHODS``.
"""
from __future__ import annotations

import inspect

from engine.methods.base import Method, Stash
from engine.methods.protected import ProtectedLANCE
from engine.methods.simple import GradientFilter, Vanilla
from engine.methods.tucker import ASI, HOSVD, LANCE

METHODS: dict[str, type[Method]] = {
    "vanilla": Vanilla,
    "gradient_filter": GradientFilter,
    "hosvd": HOSVD,
    "asi": ASI,
    "lance": LANCE,
    "protected": ProtectedLANCE,  # continual learning (engine.continual): LANCE with a protected subspace
}


def method_options(name: str) -> list[str]:
    """The option names ``name`` accepts (besides layer_name and seed)."""
    cls = get_method_class(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "layer_name", "seed")]


def get_method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def make_method(name: str, layer_name: str, options: dict | None = None, seed: int = 0) -> Method:
    """Instantiate ``name`` for one layer. Per-layer options: a ``ranks`` dict keyed by layer name is
    resolved to that layer's tuple; unknown option names are refused with the accepted ones."""
    cls = get_method_class(name)
    options = dict(options or {})
    allowed = method_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} does not take option(s) {unknown}; it accepts {allowed}")
    ranks = options.get("ranks")
    if isinstance(ranks, dict):
        if layer_name not in ranks:
            raise ValueError(f"method {name!r}: ranks given per layer but none for {layer_name!r}")
        options["ranks"] = ranks[layer_name]
    return cls(layer_name=layer_name, seed=seed, **options)


__all__ = ["METHODS", "Method", "Stash", "Vanilla", "GradientFilter", "HOSVD", "ASI", "LANCE",
           "make_method", "method_options", "get_method_class"]
