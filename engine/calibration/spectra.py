"""Energy spectra of layer inputs: per-mode Gram eigenvalues, normalised and cumulative energy, ranks per ε.

For an activation ``A`` with modes ``(D_0, …, D_{n-1})`` (conv input ``(B, C, H, W)``; linear input
``(B, F)``, ``(B, L, F)`` or ``(B, H, W, F)``), the squared singular values of the mode-``m`` unfolding
``A_(m) ∈ R^{D_m × Π_{j≠m} D_j}`` are the eigenvalues of its Gram matrix ``A_(m) A_(m)ᵀ`` (``D_m × D_m``).

Accumulation over calibration batches and the rank rule are :mod:`engine.spectra`'s (the one
:class:`~engine.spectra.GramAccumulator` and the one :func:`~engine.spectra.rank_for_energy`, also used by
LANCE's training calibration): non-batch modes take the eigenvalues of the true-mean Gram (summed over
batches / samples); the batch mode takes the sample-weighted mean of the per-batch ``B×B`` spectra
(zero-padded to the largest batch). Ranks per ε are that rule on those eigenvalues, so the ranks
reported here are the ranks LANCE trains with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from engine.spectra import GramAccumulator, eigh_descending, gram64, rank_for_energy

# Mode names by activation kind and rank (number of dims).
CONV_MODES = ("B", "C", "H", "W")
LINEAR_MODES = {2: ("B", "F"), 3: ("B", "L", "F"), 4: ("B", "H", "W", "F")}


def mode_names(layer: nn.Module, ndim: int) -> tuple[str, ...]:
    """Names of the activation modes of ``layer``'s input with ``ndim`` dims."""
    if isinstance(layer, nn.Conv2d):
        if ndim != 4:
            raise ValueError(f"a Conv2d input must be (B, C, H, W), got {ndim} dims")
        return CONV_MODES
    if ndim in LINEAR_MODES:
        return LINEAR_MODES[ndim]
    raise ValueError(f"a Linear input must be (B, F), (B, L, F) or (B, H, W, F), got {ndim} dims")


def gram_eigenvalues(gram: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric PSD Gram matrix, descending, clamped at 0 (:func:`engine.spectra.eigh_descending`)."""
    return eigh_descending(gram.double())[0].cpu().numpy()


def normalised_energy(eigenvalues: np.ndarray) -> np.ndarray:
    """``σ_k² / Σ σ²`` (sums to 1); an all-zero spectrum gives all zeros."""
    eig = np.asarray(eigenvalues, dtype=np.float64)
    total = eig.sum()
    return eig / total if total > 0 else np.zeros_like(eig)


def hosvd_singular_values(activation: torch.Tensor) -> list[np.ndarray]:
    """Singular values of every unfolding of one tensor (descending), via the Gram eigenvalues."""
    return [np.sqrt(gram_eigenvalues(gram64(activation, m))) for m in range(activation.ndim)]


@dataclass
class ModeSpectrum:
    """One mode of one layer: ``energy[k] = σ_k²/Σσ²`` (descending), ``cumulative[k] = Σ_{j<=k} energy[j]``."""

    mode: str
    dim: int
    energy: list[float]
    cumulative: list[float]
    eigenvalues: list[float]  # mean spectrum per sample (GramAccumulator.eigenvalues; batch mode included)

    def rank(self, eps: float) -> int:
        return rank_for_energy(self.eigenvalues, eps)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "dim": self.dim, "energy": self.energy,
                "cumulative": self.cumulative, "eigenvalues": self.eigenvalues}


def _mode_spectra(acc: GramAccumulator, modes: Sequence[str]) -> list[ModeSpectrum]:
    """Every mode's :class:`ModeSpectrum` from an accumulator (the same eigenvalues LANCE's ranks use)."""
    out = []
    for m, name in enumerate(modes):
        eig = acc.eigenvalues(m)
        energy = normalised_energy(eig)
        out.append(ModeSpectrum(name, int(eig.size), energy.tolist(), np.minimum(np.cumsum(energy), 1.0).tolist(),
                                eig.tolist()))
    return out


@dataclass
class LayerSpectra:
    """Spectra of every mode of one layer's input over the calibration batches."""

    name: str
    kind: str                   # "conv" or "linear"
    input_shape: list[int]      # shape of the first calibration batch's input
    samples: int                # samples seen (all batches)
    batches: int
    modes: list[ModeSpectrum]

    def ranks(self, eps: float) -> tuple[int, ...]:
        return tuple(m.rank(eps) for m in self.modes)

    def to_dict(self, eps_grid: Sequence[float] | None = None) -> dict:
        d = {"name": self.name, "kind": self.kind, "input_shape": self.input_shape,
             "samples": self.samples, "batches": self.batches,
             "modes": [m.to_dict() for m in self.modes]}
        if eps_grid is not None:
            d["ranks"] = [list(self.ranks(e)) for e in eps_grid]
        return d


def _input_of(batch) -> torch.Tensor:
    """The model input of a batch: ``x`` itself or the first element of an ``(x, y)`` pair."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


class SpectraCollector:
    """Forward hooks that accumulate every named layer's input spectra while the model runs.

    Use as a context manager around forward passes (with or without grad), counting each model
    forward with :meth:`count_batch`; :meth:`finish` returns ``{name: LayerSpectra}``. Layers in
    ``keep_first_grams`` also keep their first batch's per-mode Grams (``first_grams(name)``), so a
    perplexity measurement on that batch needs no second Gram pass.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str], keep_first_grams: Sequence[str] = ()):
        modules = dict(model.named_modules())
        missing = [n for n in layer_names if n not in modules]
        if missing:
            raise KeyError(f"no such layer(s) in the model: {missing}; see engine.surgery.compressible_layers(model)")
        for name in layer_names:
            if not isinstance(modules[name], (nn.Conv2d, nn.Linear)):
                raise TypeError(f"layer {name!r} is {type(modules[name]).__name__}; "
                                "spectra are for Conv2d and Linear inputs")
        keep = set(keep_first_grams)
        self.names = list(layer_names)
        self.modules = {n: modules[n] for n in self.names}
        self.accs = {n: GramAccumulator(keep_first_grams=n in keep) for n in self.names}
        self.batches = 0
        self._handles: list = []

    def __enter__(self) -> "SpectraCollector":
        for name in self.names:
            def hook(mod, inputs, _output, _name=name):
                x = inputs[0].detach()
                mode_names(mod, x.ndim)  # a clear error for an input of the wrong rank
                self.accs[_name].update(x)

            self._handles.append(self.modules[name].register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def count_batch(self) -> None:
        self.batches += 1

    def first_grams(self, name: str) -> list[torch.Tensor] | None:
        return self.accs[name].first_grams

    def never_ran(self) -> list[str]:
        """Layers whose module was never called, e.g. torchvision's Swin attention, which applies
        ``F.linear(x, self.qkv.weight)`` directly: they have no spectrum (and hooks cannot see them)."""
        return [n for n in self.names if self.accs[n].batches == 0]

    def finish(self) -> dict[str, LayerSpectra]:
        """``{name: LayerSpectra}`` for every layer that ran (see :meth:`never_ran` for the others)."""
        if self.batches == 0:
            raise ValueError("no calibration batches: the data loader was empty")
        out = {}
        for name in self.names:
            acc = self.accs[name]
            if acc.batches == 0:
                continue
            kind = "conv" if isinstance(self.modules[name], nn.Conv2d) else "linear"
            modes = mode_names(self.modules[name], acc.ndim)
            out[name] = LayerSpectra(name, kind, list(acc.first_shape), acc.samples, self.batches,
                                     _mode_spectra(acc, modes))
        return out


@torch.no_grad()
def collect_spectra(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, LayerSpectra]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and return each named layer's input spectra.

    ``batches``: iterable of input tensors or ``(x, y)`` pairs; at most ``max_batches`` are used.
    ``layer_names``: qualified module names of ``nn.Conv2d`` / ``nn.Linear`` layers.
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with SpectraCollector(model, layer_names) as collector:
            for batch in batches:
                if max_batches is not None and collector.batches >= max_batches:
                    break
                x = _input_of(batch)
                model(x if device is None else x.to(device))
                collector.count_batch()
    finally:
        model.train(was_training)
    return collector.finish()
