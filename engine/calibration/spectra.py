"""Energy spectra of layer inputs: per-mode Gram eigenvalues, normalised and cumulative energy, ranks per ε.

For an activation ``A`` with modes ``(D_0, …, D_{n-1})`` (conv input ``(B, C, H, W)``; linear input
``(B, F)``, ``(B, L, F)`` or ``(B, H, W, F)``), the squared singular values of the mode-``m`` unfolding
``A_(m) ∈ R^{D_m × Π_{j≠m} D_j}`` are the eigenvalues of its Gram matrix ``A_(m) A_(m)ᵀ`` (``D_m × D_m``).

Accumulation over calibration batches (methods.md §2, LANCE):
- every mode except the batch mode: the Gram matrices are summed over batches and divided by the
  number of samples seen — a true running mean over the data, each batch weighted by its size;
  one ``eigvalsh`` at the end;
- the batch mode (mode 0): its Gram is ``B × B`` and depends on which samples share a batch, so it
  cannot be summed across batches. Its spectrum is computed *per batch*, normalised to unit total
  energy, zero-padded to the largest batch size seen and averaged over batches.

Rank rule (methods.md §2, HOSVD_ε): the smallest ``r`` with ``Σ_{k<r} σ_k² ≥ ε · Σ_k σ_k²``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

# Mode names by activation kind and rank (number of dims).
CONV_MODES = ("B", "C", "H", "W")
LINEAR_MODES = {2: ("B", "F"), 3: ("B", "L", "F"), 4: ("B", "H", "W", "F")}
ENERGY_TOLERANCE = 1e-9  # cumulative energy within this of ε counts as reaching it (float round-off)


def mode_names(layer: nn.Module, ndim: int) -> tuple[str, ...]:
    """Names of the activation modes of ``layer``'s input with ``ndim`` dims."""
    if isinstance(layer, nn.Conv2d):
        if ndim != 4:
            raise ValueError(f"a Conv2d input must be (B, C, H, W), got {ndim} dims")
        return CONV_MODES
    if ndim in LINEAR_MODES:
        return LINEAR_MODES[ndim]
    raise ValueError(f"a Linear input must be (B, F), (B, L, F) or (B, H, W, F), got {ndim} dims")


def unfolding_gram(activation: torch.Tensor, mode: int) -> torch.Tensor:
    """Gram matrix ``A_(m) A_(m)ᵀ`` of the mode-``mode`` unfolding: ``(D_m, D_m)`` in float64.

    The product runs in the activation's dtype (float32 for speed); the result is returned in float64.
    """
    x = activation.detach()
    if not x.is_floating_point():
        x = x.float()
    if mode == x.ndim - 1:
        flat = x.reshape(-1, x.shape[-1])  # (Π_{j≠m} D_j, D_m), no copy
        gram = flat.T @ flat
    else:
        flat = x.movedim(mode, 0).reshape(x.shape[mode], -1)  # (D_m, Π_{j≠m} D_j)
        gram = flat @ flat.T
    return gram.double()


def gram_eigenvalues(gram: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric PSD Gram matrix, descending, negatives (round-off) clipped to 0."""
    sym = 0.5 * (gram + gram.T)
    eig = torch.linalg.eigvalsh(sym).cpu().numpy()[::-1].copy()
    return np.clip(eig, 0.0, None)


def normalised_energy(eigenvalues: np.ndarray) -> np.ndarray:
    """``σ_k² / Σ σ²`` (sums to 1); an all-zero spectrum gives all zeros."""
    eig = np.asarray(eigenvalues, dtype=np.float64)
    total = eig.sum()
    return eig / total if total > 0 else np.zeros_like(eig)


def rank_for_energy(cumulative_energy: Sequence[float] | np.ndarray, eps: float) -> int:
    """Smallest ``r >= 1`` with ``cumulative_energy[r-1] >= eps`` (cumulative energy: non-decreasing, ends at 1).

    ``eps >= 1`` gives the full dimension; an all-zero spectrum gives rank 1.
    """
    cum = np.asarray(cumulative_energy, dtype=np.float64)
    if cum.size == 0:
        raise ValueError("empty spectrum")
    if eps >= 1.0:
        return int(cum.size)
    if cum[-1] <= 0:
        return 1
    r = int(np.searchsorted(cum, eps - ENERGY_TOLERANCE, side="left")) + 1
    return max(1, min(r, int(cum.size)))


def ranks_for_energy(cumulative_per_mode: Sequence[np.ndarray], eps: float) -> tuple[int, ...]:
    """Per-mode ranks at energy ``eps``."""
    return tuple(rank_for_energy(c, eps) for c in cumulative_per_mode)


def hosvd_singular_values(activation: torch.Tensor) -> list[np.ndarray]:
    """Singular values of every unfolding of one tensor (descending), via the Gram eigenvalues."""
    return [np.sqrt(gram_eigenvalues(unfolding_gram(activation, m))) for m in range(activation.ndim)]


@dataclass
class ModeSpectrum:
    """One mode of one layer: ``energy[k] = σ_k²/Σσ²`` (descending), ``cumulative[k] = Σ_{j<=k} energy[j]``."""

    mode: str
    dim: int
    energy: list[float]
    cumulative: list[float]
    eigenvalues: list[float]  # mean Gram eigenvalues (per sample for non-batch modes; batch mode: per batch mean)

    def rank(self, eps: float) -> int:
        return rank_for_energy(self.cumulative, eps)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "dim": self.dim, "energy": self.energy,
                "cumulative": self.cumulative, "eigenvalues": self.eigenvalues}


@dataclass
class _LayerAccumulator:
    modes: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()        # activation shape of the first batch seen
    gram_sums: list = field(default_factory=list)   # per non-batch mode: Σ_batches Gram (float64)
    samples: int = 0
    batch_energy: list = field(default_factory=list)  # per batch: normalised batch-mode energy
    batch_eig: list = field(default_factory=list)
    calls: int = 0
    keep_first_grams: bool = False
    first_grams: list | None = None  # every mode's Gram of the first batch (float64), when kept

    def add(self, layer: nn.Module, activation: torch.Tensor) -> None:
        if not self.modes:
            self.modes = mode_names(layer, activation.ndim)
            self.shape = tuple(activation.shape)
            self.gram_sums = [None] * activation.ndim
        elif tuple(activation.shape[1:]) != tuple(self.shape[1:]):
            raise ValueError(
                f"input shape changed between calibration batches: {tuple(self.shape)} then "
                f"{tuple(activation.shape)}; calibrate with one input resolution"
            )
        self.calls += 1
        self.samples += int(activation.shape[0])
        grams = [unfolding_gram(activation, m) for m in range(activation.ndim)]
        if self.keep_first_grams and self.first_grams is None:
            self.first_grams = grams
        batch_eig = gram_eigenvalues(grams[0])
        self.batch_eig.append(batch_eig)
        self.batch_energy.append(normalised_energy(batch_eig))
        for m in range(1, activation.ndim):
            self.gram_sums[m] = grams[m] if self.gram_sums[m] is None else self.gram_sums[m] + grams[m]

    def finish(self) -> list[ModeSpectrum]:
        if self.calls == 0:
            raise RuntimeError("layer never ran during calibration")
        width = max(e.size for e in self.batch_energy)
        pad = lambda e: np.pad(e, (0, width - e.size))  # noqa: E731
        batch_energy = np.mean([pad(e) for e in self.batch_energy], axis=0)
        batch_eig = np.mean([pad(e) for e in self.batch_eig], axis=0)
        out = [ModeSpectrum(self.modes[0], width, batch_energy.tolist(),
                            np.minimum(np.cumsum(batch_energy), 1.0).tolist(), batch_eig.tolist())]
        for m in range(1, len(self.modes)):
            eig = gram_eigenvalues(self.gram_sums[m] / self.samples)
            energy = normalised_energy(eig)
            out.append(ModeSpectrum(self.modes[m], int(eig.size), energy.tolist(),
                                    np.minimum(np.cumsum(energy), 1.0).tolist(), eig.tolist()))
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
        self.accs = {n: _LayerAccumulator(keep_first_grams=n in keep) for n in self.names}
        self.batches = 0
        self._handles: list = []

    def __enter__(self) -> "SpectraCollector":
        for name in self.names:
            def hook(mod, inputs, _output, _name=name):
                self.accs[_name].add(mod, inputs[0].detach())

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
        return [n for n in self.names if self.accs[n].calls == 0]

    def finish(self) -> dict[str, LayerSpectra]:
        """``{name: LayerSpectra}`` for every layer that ran (see :meth:`never_ran` for the others)."""
        if self.batches == 0:
            raise ValueError("no calibration batches: the data loader was empty")
        out = {}
        for name in self.names:
            acc = self.accs[name]
            if acc.calls == 0:
                continue
            kind = "conv" if isinstance(self.modules[name], nn.Conv2d) else "linear"
            out[name] = LayerSpectra(name, kind, list(acc.shape), acc.samples, self.batches, acc.finish())
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
