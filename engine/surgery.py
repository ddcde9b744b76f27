"""Model surgery: choose layers, swap in compressed layers, freeze the rest, undo it.

Rules (the papers' fine-tuning recipe): the chosen layers are trained (plus the head, the last
compressible layer, unless ``train_head=False``); every other parameter is frozen; modules before the
first chosen layer are kept in eval mode and every BatchNorm stays in eval mode throughout.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from engine.layers import CompressedLayer
from engine.methods import make_method
from engine.methods.calibration import calibrate_layers
from engine.packing import pack_region, unpack_region

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


def compressible_layers(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Conv2d`` / ``nn.Linear`` (or already compressed layer), in definition order."""
    return [
        name for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, CompressedLayer)) and name
    ]


def resolve_layers(model: nn.Module | Sequence[str], layers: Iterable[str] | int | str | None = None,
                   last_k: int | None = None) -> list[str]:
    """The chosen compressible layers, each once, in definition order. The one layer-choice rule.

    ``model``: a model (its :func:`compressible_layers`) or those names already listed. Choose by
    ``layers``: names (each checked), ``"all"``, or a count ``K`` (an int or its digits: the last ``K``,
    ``0 <= K <= n``); or by ``last_k=K``. Exactly one of ``layers`` / ``last_k``. ValueError says what is
    wrong and what there is.
    """
    available = compressible_layers(model) if isinstance(model, nn.Module) else list(model)
    if (layers is None) == (last_k is None):
        raise ValueError("choose layers either by name (layers=[...]) or by count (last_k=K), not both/neither")
    if isinstance(layers, str):
        text = layers.strip().lower()
        if text == "all":
            return available
        if not text.isdigit():
            raise ValueError(f"layers={layers!r}: give layer names (a list), a count K or 'all'")
        last_k = int(text)
    elif isinstance(layers, int):
        last_k = layers
    if last_k is not None:
        if isinstance(last_k, bool) or not isinstance(last_k, int) or not 0 <= last_k <= len(available):
            raise ValueError(f"last_k must be between 0 and {len(available)} (compressible layers here), "
                             f"got {last_k!r}")
        return available[len(available) - last_k:]
    names = list(layers)
    unknown = [n for n in names if n not in available]
    if unknown:
        shown = ", ".join(available[-8:])
        raise ValueError(f"not compressible layers of this model: {unknown}; the last ones are: {shown} "
                         f"({len(available)} in all, see engine.compressible_layers)")
    order = {n: i for i, n in enumerate(available)}
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@dataclass
class CompressionHandle:
    """What :func:`compress_model` did: the compressed layers and the trainable parameters."""

    model: nn.Module
    method: str
    layers: dict[str, CompressedLayer]
    frozen_prefix: list[str] = field(default_factory=list)
    packed: list[str] = field(default_factory=list)  # modules saving a packed form (engine.packing)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_mode(self) -> nn.Module:
        """``model.train()`` but with the frozen prefix and every BatchNorm in eval mode."""
        set_train_mode(self.model, self.frozen_prefix)
        return self.model

    def stats(self) -> dict[str, dict]:
        return {name: layer.last_stats for name, layer in self.layers.items()}

    def analytic_bytes(self) -> int:
        return sum(layer.last_stats.get("analytic_bytes", 0) for layer in self.layers.values())


def set_train_mode(model: nn.Module, frozen_prefix: Iterable[str] = ()) -> None:
    model.train()
    names = set(frozen_prefix)
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS) or name in names:
            module.eval()


def compress_model(model: nn.Module, method: str, layers: Iterable[str] | None = None, last_k: int | None = None,
                   options: dict | None = None, calibration_loader=None, calibration_batches: int | None = None,
                   seed: int = 0, train_head: bool = True, calibration_forward=None,
                   pack: bool = True) -> CompressionHandle:
    """Compress the chosen layers of ``model`` in place with ``method`` and freeze everything else.

    ``options``: the method's keyword options (see :data:`engine.methods.METHODS`); ``ranks`` may be a
    dict keyed by layer name. LANCE needs ``calibration_loader`` (batches or ``(x, y)`` pairs) and uses
    ``calibration_batches`` of it (all when ``None``). ``pack`` (default on, every method): the rest of
    the region saves its lossless packed forms (:mod:`engine.packing`: frozen BatchNorm nothing,
    ReLU/ReLU6 masks as bits, max-pool offsets as uint8); ``pack=False`` keeps plain autograd.
    Returns a :class:`CompressionHandle`.
    """
    if any(isinstance(m, CompressedLayer) for m in model.modules()):
        raise ValueError("model is already compressed: call engine.restore_model(model) first")
    names = resolve_layers(model, layers, last_k)
    if not names:
        raise ValueError("no layer chosen: give layers=[names] or last_k >= 1")
    all_layers = compressible_layers(model)
    head = all_layers[-1]
    methods = {name: make_method(method, name, options, seed) for name in names}  # validates options first
    if method == "lance":
        if calibration_loader is None:
            raise ValueError("method 'lance' calibrates its subspaces once before training: pass calibration_loader "
                             "(and calibration_batches, paper default 100)")
        statistics = calibrate_layers(model, names, calibration_loader, calibration_batches, calibration_forward)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model._lance_requires_grad = requires_grad  # for restore_model
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    compressed: dict[str, CompressedLayer] = {}
    for name in names:
        original = modules[name]
        layer = CompressedLayer(original, methods[name], name)
        _set_submodule(model, name, layer)
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.requires_grad_(True)
        if method == "lance":
            methods[name].set_calibration(layer, statistics[name])
        compressed[name] = layer
    if train_head and head not in names:
        for p in modules[head].parameters():
            p.requires_grad_(True)
    first = names[0]
    prefix = []
    for name, _ in model.named_modules():
        if name == first:
            break
        if name and not first.startswith(name + "."):
            prefix.append(name)
    packed = pack_region(model) if pack else []
    handle = CompressionHandle(model, method, compressed, prefix, packed)
    handle.train_mode()
    return handle


def restore_model(model: nn.Module) -> nn.Module:
    """Undo :func:`compress_model`: original modules back (same Parameters), requires_grad as before,
    packing off."""
    unpack_region(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, CompressedLayer):
            _set_submodule(model, name, module.original)
    flags = getattr(model, "_lance_requires_grad", None)
    if flags is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        del model._lance_requires_grad
    return model
