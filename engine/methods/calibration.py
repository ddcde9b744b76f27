"""One-shot calibration of per-mode subspaces from a data loader (LANCE, methods.md §2).

For every chosen layer the inputs of the calibration batches go into one
:class:`engine.spectra.GramAccumulator`: each non-batch mode's Gram is a true mean over samples (every
sample weighs the same, whatever the batch sizes), the batch mode's spectrum is the sample-weighted
mean of the per-batch spectra, and every rank (batch mode included) comes from
:func:`engine.spectra.rank_for_energy` on those mean spectra — the same accumulator and rule as
``lance calibrate`` (:mod:`engine.calibration.spectra`), so both report the same ranks at ε.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.phases import PhaseCallback, report
from engine.spectra import GramAccumulator

Tensor = torch.Tensor


def _first(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


@torch.no_grad()
def calibrate_layers(model: nn.Module, layer_names: list[str], loader: Iterable, batches: int | None = None,
                     forward=None, on_phase: PhaseCallback | None = None) -> dict[str, GramAccumulator]:
    """Run up to ``batches`` batches of ``loader`` through ``model`` (eval mode, no grad) and collect
    :class:`engine.spectra.GramAccumulator` of the inputs of ``layer_names``. ``forward(model, batch)``
    overrides the call
    (default: ``model(x)`` with ``x`` the batch or its first element, moved to the model's device).
    Reports ``("calibrating", batches done, batches)`` to ``on_phase`` (default: the installed one;
    total None when neither ``batches`` nor ``len(loader)`` says it).
    """
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise KeyError(f"no such layers: {missing}")
    stats = {name: GramAccumulator() for name in layer_names}
    hooks = [
        modules[name].register_forward_pre_hook(lambda _m, inputs, _n=name: stats[_n].update(inputs[0]))
        for name in layer_names
    ]
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        seen = 0
        total = batches if batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
        if total is not None and hasattr(loader, "__len__"):
            total = min(total, len(loader))
        report("calibrating", 0, total, on_phase)
        for batch in loader:
            if batches is not None and seen >= batches:
                break
            if forward is not None:
                forward(model, batch)
            else:
                model(_first(batch).to(device))
            seen += 1
            report("calibrating", seen, total, on_phase)
        if seen == 0:
            raise ValueError("calibration loader yielded no batches")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats
