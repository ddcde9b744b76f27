"""Measured activation memory: the bytes autograd actually keeps for backward.

:class:`SavedBytesMeter` installs ``torch.autograd.graph.saved_tensors_hooks`` around a forward pass
and records every saved tensor's *storage* once (views and re-saves of one storage count once).
Parameters and the model's non-method buffers (BatchNorm running statistics) are model state, not
activations, and are left out. Two figures:

* ``layer_activation_bytes``: what the compressed layers save for their weight gradients (the figure
  the papers report, on paper);
* ``region_activation_bytes``: everything autograd saves in the pass: BatchNorm inputs, activation
  function outputs, pooling indices, the loss' softmax, the compressed layers' stashes.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict

import torch
from torch import nn

_CURRENT_LAYER: contextvars.ContextVar[str | None] = contextvars.ContextVar("lance_current_layer", default=None)


@contextlib.contextmanager
def attribute_to_layer(name: str):
    """Tensors saved inside this block are attributed to the compressed layer ``name``."""
    token = _CURRENT_LAYER.set(name)
    try:
        yield
    finally:
        _CURRENT_LAYER.reset(token)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedBytesMeter:
    """Context manager measuring saved-for-backward bytes during the forward passes inside it.

    ``model``: its parameters and (non-method) buffers are excluded. Attributes after the block:
    ``layer_activation_bytes``, ``region_activation_bytes``, ``per_layer_bytes`` (name → bytes),
    ``tensor_count``.
    """

    def __init__(self, model: nn.Module | None = None):
        self._excluded: set[tuple[str, int]] = set()
        if model is not None:
            from engine.layers import CompressedLayer

            for module in model.modules():
                for p in module.parameters(recurse=False):
                    self._excluded.add(_storage_key(p))
                if isinstance(module, CompressedLayer):
                    continue  # its buffers are method state that backward needs: they count
                for b in module.buffers(recurse=False):
                    self._excluded.add(_storage_key(b))
        self.layer_activation_bytes = 0
        self.region_activation_bytes = 0
        self.per_layer_bytes: dict[str, int] = defaultdict(int)
        self.tensor_count = 0
        self._seen_region: set[tuple[str, int]] = set()
        self._seen_layer: set[tuple[str, int]] = set()
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        if t.layout != torch.strided:
            return t
        key = _storage_key(t)
        if key in self._excluded:
            return t
        nbytes = t.untyped_storage().nbytes()
        if key not in self._seen_region:
            self._seen_region.add(key)
            self.region_activation_bytes += nbytes
            self.tensor_count += 1
        layer = _CURRENT_LAYER.get()
        if layer is not None and key not in self._seen_layer:
            self._seen_layer.add(key)
            self.layer_activation_bytes += nbytes
            self.per_layer_bytes[layer] += nbytes
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self) -> "SavedBytesMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    def as_dict(self) -> dict:
        return {
            "layer_activation_bytes": int(self.layer_activation_bytes),
            "region_activation_bytes": int(self.region_activation_bytes),
            "per_layer_bytes": dict(self.per_layer_bytes),
        }
