"""Measured activation memory: the bytes autograd actually keeps for backward.

:class:`SavedBytesMeter` installs ``torch.autograd.graph.saved_tensors_hooks`` around a forward pass
and records every saved tensor's *storage* once (views and re-saves of one storage count once).
Parameters and the model's non-method buffers (BatchNorm running statistics) are model state, not
activations, and are left out. Two figures:

* ``layer_activation_bytes``: what the compressed layers save for their weight gradients (the figure
  the papers report, on paper);
* ``region_activation_bytes``: everything autograd saves in the pass: BatchNorm inputs, activation
  function outputs, pooling indices, the loss' softmax, the compressed layers' stashes.

Both are the peak, over the block, of the bytes autograd holds at once: a tensor counts from the
moment it is saved until its graph node releases it (backward, or the graph being dropped). The pack
hook hands autograd a detached alias, so the meter itself never keeps a graph alive.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import threading
import weakref
from collections import defaultdict
from typing import Self

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


class _Saved:
    """What the pack hook hands autograd: a detached alias of the saved tensor (no ``grad_fn``, so no
    reference cycle node → saved tensor → node) and the storage it was counted under."""

    __slots__ = ("__weakref__", "key", "layer", "tensor")

    def __init__(self, tensor: torch.Tensor, key, layer):
        self.tensor = tensor
        self.key = key
        self.layer = layer


class SavedBytesMeter:
    """Context manager measuring saved-for-backward bytes during the forward passes inside it.

    ``model``: its parameters and (non-method) buffers are excluded. Every saved storage is counted
    once while autograd holds it; the figures are the **peak of the live saved bytes** over the block
    (a side graph built and dropped in forward is released, and stops counting, when it is dropped).
    Attributes after the block: ``layer_activation_bytes``, ``region_activation_bytes``,
    ``per_layer_bytes`` (name → peak bytes), ``tensor_count`` (storages counted).
    ``saved_by_op(root)`` lists what the graph under ``root`` (e.g. the loss, before backward) saves,
    by the saving node's ``grad_fn`` name.
    """

    def __init__(self, model: nn.Module | None = None):
        self._excluded: set[tuple[str, int]] = set()
        if model is not None:
            for module in model.modules():
                for p in module.parameters(recurse=False):
                    self._excluded.add(_storage_key(p))
                # modules whose buffers backward reads (engine.layers.CompressedLayer, the continual layers)
                if getattr(module, "saves_buffers_for_backward", False):
                    continue  # its buffers are method state that backward needs: they count
                for b in module.buffers(recurse=False):
                    self._excluded.add(_storage_key(b))
        self.layer_activation_bytes = 0
        self.region_activation_bytes = 0
        self.per_layer_bytes: dict[str, int] = defaultdict(int)
        self.tensor_count = 0
        self._lock = threading.RLock()  # CUDA backward frees saved tensors on the device thread
        self._live: dict[tuple[str, int], list[int]] = {}  # storage -> [holders alive, nbytes]
        self._live_layer: dict[tuple[str, int], list] = {}  # storage -> [holders alive, nbytes, layer]
        self._live_bytes = 0
        self._live_layer_bytes = 0
        self._live_per_layer: dict[str, int] = defaultdict(int)
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        if t.layout != torch.strided:
            return t
        key = _storage_key(t)
        if key in self._excluded:
            return t  # a parameter or buffer: a leaf, no graph to keep alive
        nbytes = t.untyped_storage().nbytes()
        layer = _CURRENT_LAYER.get()
        holder = _Saved(t.detach(), key, layer)
        with self._lock:
            entry = self._live.get(key)
            if entry is None:
                self._live[key] = [1, nbytes]
                self._live_bytes += nbytes
                self.tensor_count += 1
                self.region_activation_bytes = max(self.region_activation_bytes, self._live_bytes)
            else:
                entry[0] += 1
            if layer is not None:
                lentry = self._live_layer.get(key)
                if lentry is None:
                    self._live_layer[key] = [1, nbytes, layer]
                    self._live_layer_bytes += nbytes
                    self._live_per_layer[layer] += nbytes
                    self.layer_activation_bytes = max(self.layer_activation_bytes, self._live_layer_bytes)
                    self.per_layer_bytes[layer] = max(self.per_layer_bytes[layer], self._live_per_layer[layer])
                else:
                    lentry[0] += 1
        weakref.finalize(holder, self._release, key, layer is not None)
        return holder

    def _release(self, key, in_layer: bool) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] == 0:
                    del self._live[key]
                    self._live_bytes -= entry[1]
            if in_layer:
                lentry = self._live_layer.get(key)
                if lentry is not None:
                    lentry[0] -= 1
                    if lentry[0] == 0:
                        del self._live_layer[key]
                        self._live_layer_bytes -= lentry[1]
                        self._live_per_layer[lentry[2]] -= lentry[1]

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    @property
    def live_region_bytes(self) -> int:
        """Saved bytes autograd holds now (falls to 0 as backward frees the graph)."""
        return int(self._live_bytes)

    def __enter__(self) -> Self:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    def saved_by_op(self, root: torch.Tensor | torch.autograd.graph.Node) -> list[dict]:
        """What the graph under ``root`` saves for backward, by saving op: ``[{"op", "bytes", "tensors",
        "shapes", "dtypes"}]``, largest first (call before backward frees the graph).

        ``op`` is the saving node's ``grad_fn`` name (``NativeBatchNormBackward0``, ``HardtanhBackward0``,
        ``PackedReLUBackward`` …); a storage saved by several nodes goes to the first one reached from
        ``root``. Parameters and buffers are left out, as in the figures.
        """
        node = root.grad_fn if isinstance(root, torch.Tensor) else root
        claimed: set[tuple[str, int]] = set()
        rows: dict[str, dict] = {}
        seen: set = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n is None or n in seen:
                continue
            seen.add(n)
            for t in _node_saved_tensors(n):
                if t.layout != torch.strided:
                    continue
                key = _storage_key(t)
                if key in self._excluded or key in claimed:
                    continue
                claimed.add(key)
                row = rows.setdefault(n.name(), {"op": n.name(), "bytes": 0, "tensors": 0, "shapes": [],
                                                 "dtypes": []})
                row["bytes"] += t.untyped_storage().nbytes()
                row["tensors"] += 1
                row["shapes"].append(list(t.shape))
                row["dtypes"].append(str(t.dtype).replace("torch.", ""))
            stack.extend(nxt for nxt, _ in n.next_functions)
        return sorted(rows.values(), key=lambda r: -r["bytes"])


def _node_saved_tensors(node) -> list[torch.Tensor]:
    """The tensors an autograd node holds for backward (built-in ``_saved_*`` fields and a custom
    Function's ``saved_tensors``)."""
    out: list[torch.Tensor] = []
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        try:
            value = getattr(node, attr)
        except (RuntimeError, AttributeError):
            continue
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (tuple, list)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
    saved = None
    try:
        saved = getattr(node, "saved_tensors", None)
    except RuntimeError:
        saved = None
    if saved:
        out.extend(t for t in saved if isinstance(t, torch.Tensor))
    return out


class PeakMemoryMeter:
    """Context manager measuring the peak memory a block allocates, by the allocator (not an estimate).

    ``peak_memory_bytes`` after the block: the highest level of allocated bytes during the block minus
    the level at its start (what the step itself needs on top of what was already allocated: saved
    activations, transients, gradients). CUDA: ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` (synchronised). CPU: ``torch.profiler`` with ``profile_memory=True``,
    the running sum of its allocation and free events in time order (the first profiled block pays the
    profiler's start-up, about a second; later ones a few percent). ``None`` where nothing measures
    (another profiler already running, an other device type).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_memory_bytes: int | None = None
        self._profiler = None
        self._start = 0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto's per-start USDT lines on stderr
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                              profile_memory=True)
            try:
                profiler.__enter__()
            except RuntimeError:  # a profiler is already running: no measurement
                profiler = None
            self._profiler = profiler
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self._profiler is not None:
            self._profiler.__exit__(*exc)
            self.peak_memory_bytes = _cpu_peak(self._profiler)
            self._profiler = None


def _cpu_peak(profiler) -> int:
    events = [e for e in profiler.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return int(peak)


PEAK_EVERY_STEPS = 10  # CPU: the profiler that measures the peak costs up to ~15 % of a step, so it samples


def peak_due(step_index: int, device: torch.device | str) -> bool:
    """Whether training step ``step_index`` (0-based) measures its peak memory: every step on CUDA (the
    allocator's counter is free), else step 0 and every ``PEAK_EVERY_STEPS``-th step (``torch.profiler``'s
    memory events cost up to ~15 % of a CPU step: ``python3 docs/bench/peak_overhead.py``)."""
    return torch.device(device).type == "cuda" or step_index % PEAK_EVERY_STEPS == 0


class StepMeter(SavedBytesMeter):
    """:class:`SavedBytesMeter` plus :class:`PeakMemoryMeter` around one training step.

    ``peak_memory_bytes`` (``None`` when not measured: ``measure_peak=False`` or no measurement on this
    device); ``saved_ops`` (after :meth:`observe_loss` with ``record_ops=True``): ``saved_by_op(loss)``.
    """

    def __init__(self, model: nn.Module | None = None, device: torch.device | str | None = None,
                 measure_peak: bool = True, record_ops: bool = False):
        super().__init__(model)
        if device is None:  # the model's
            first = next(iter(model.parameters()), None) if model is not None else None
            device = first.device if first is not None else "cpu"
        self._peak = PeakMemoryMeter(device) if measure_peak else None
        self.peak_memory_bytes: int | None = None
        self.record_ops = record_ops
        self.saved_ops: list[dict] | None = None

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called with the loss before backward: lists what its graph saves, by op (``record_ops``)."""
        if self.record_ops and loss.grad_fn is not None:
            self.saved_ops = self.saved_by_op(loss)

    def __enter__(self) -> Self:
        if self._peak is not None:
            self._peak.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._peak is not None:
            self._peak.__exit__(*exc)
            self.peak_memory_bytes = self._peak.peak_memory_bytes
