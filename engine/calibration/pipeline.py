"""Calibration end to end: spectra of every compressible layer, perplexity and bytes of the fine-tuned ones.

Two entry points:
- :func:`calibrate_model` — pure core on a model you hold and a list of ``(x, y)`` batches.
- :func:`calibrate` — builds the backbone (with the dataset's real head) and the data, then calls
  :func:`calibrate_model`; results are cached as JSON under ``$LANCE_HOME/cache/calibration/``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from engine.calibration import cache as cache_mod
from engine.calibration.perplexity import capture_layer_gradients, clip_ranks, gradient_errors
from engine.calibration.spectra import SpectraCollector
from engine.data import get_dataset, num_classes
from engine.methods.base import stored_bytes
from engine.models import build_backbone
from engine.surgery import compressible_layers, resolve_layers

DEFAULT_EPS_GRID: tuple[float, ...] = tuple(round(0.4 + 0.05 * i, 2) for i in range(12))  # 0.40 … 0.95
ELEMENT_BYTES = 4  # float32 activations
FORMAT_VERSION = 2  # 2: one rank rule (engine.spectra); batch rank of the sample-weighted mean spectrum

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class CalibrationResult:
    """JSON-serialisable calibration. ``layers``: one dict per compressible layer, in forward order::

        {name, kind: "conv"|"linear", finetuned: bool, input_shape: [B, …], samples, batches,
         modes: [{mode, dim, energy: [...], cumulative: [...], eigenvalues: [...]}],
         ranks: [[r per mode] per ε], full_bytes: int (the uncompressed input, what vanilla stores),
         bytes: [per ε] | None, perplexity: [per ε] | None, relative_perplexity: [per ε] | None,
         stored: ["compressed" | "raw" per ε] | None, grad_norm: float | None}

    ``bytes`` are what training stores at those ranks: the Tucker bytes, or ``full_bytes`` where the
    Tucker form is not smaller (``stored == "raw"``; training then keeps the activation, exact).

    ``bytes``/``perplexity`` exist for the fine-tuned layers only and are for a batch of ``batch_size``.
    """

    config: dict
    eps_grid: list[float]
    batch_size: int
    layers: list[dict]
    finetuned_layers: list[str]
    timing: dict = field(default_factory=dict)
    cache_key: str | None = None
    from_cache: bool = False
    skipped_layers: dict = field(default_factory=dict)  # {name: why it has no spectrum}
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    def layer(self, name: str) -> dict:
        for layer in self.layers:
            if layer["name"] == name:
                return layer
        raise KeyError(f"no layer {name!r} in this calibration")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationResult":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        missing = {"config", "eps_grid", "batch_size", "layers", "finetuned_layers"} - set(known)
        if missing:
            raise ValueError(f"not a calibration result: missing {sorted(missing)}")
        return cls(**known)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationResult":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist: "
                                    f"create it with `lance calibrate … --out {path}`")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ValueError as err:
            raise ValueError(f"{path} is not a calibration written by `lance calibrate`: {err}") from None


def check_eps_grid(eps_grid: Sequence[float]) -> list[float]:
    grid = [float(e) for e in eps_grid]
    if not grid:
        raise ValueError("the ε grid is empty: give energies in (0, 1], e.g. 0.4,0.5,0.6,0.7,0.8,0.9")
    bad = [e for e in grid if not (0.0 < e <= 1.0) or math.isnan(e)]
    if bad:
        raise ValueError(f"ε values must lie in (0, 1], got {bad}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"the ε grid has duplicates: {grid}")
    return sorted(grid)


def _split_batch(batch) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError("calibration batches must be (inputs, targets) pairs: perplexity needs the real loss")


def calibrate_model(
    model: nn.Module,
    batches: Sequence,
    finetuned_layers: int | str | Sequence[str] | None,
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] = F.cross_entropy,
    spectra_layers: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    config: dict | None = None,
    progress: Progress | None = None,
) -> CalibrationResult:
    """Spectra over all ``batches`` for every compressible layer, perplexity on ``batches[0]`` for the fine-tuned ones.

    ``batches[0]`` runs once, with grad (its forward feeds both the spectra and the perplexity capture);
    the other batches run under ``no_grad``. Timing: ``capture_s`` (that pass), ``spectra_s`` (the
    rest of the spectra), ``perplexity_s`` (compressed gradients per ε).

    ``batches``: a sequence of ``(x, y)`` pairs, ``x`` e.g. ``(B, 3, H, W)``. ``finetuned_layers``: ``K``
    (the last K compressible layers), names, or ``None``/``"all"``. The model runs in eval mode;
    ``loss_fn(model(x), y)`` is the fine-tuning loss (use the real head). Ranks per ε come from the
    accumulated spectra and are clipped to the perplexity batch; bytes are ``tucker_bytes`` of that
    batch's input shape at those ranks (float32), or the raw activation's where the Tucker form is not
    smaller (``stored[j] == "raw"``: training keeps the activation; the rank selection then offers the
    exact "uncompressed" option instead).
    """
    grid = check_eps_grid(eps_grid)
    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches: the dataset gave none")
    all_layers = compressible_layers(model)
    spectra_names = list(spectra_layers) if spectra_layers is not None else all_layers
    finetuned = resolve_layers(all_layers, "all" if finetuned_layers is None else finetuned_layers)
    spectra_names = [n for n in all_layers if n in set(spectra_names) | set(finetuned)]
    if finetuned:
        x, y = _split_batch(batches[0])
    else:  # spectra only: plain input batches are fine
        x, y = (batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]), None
    if device is not None:
        x, y = x.to(device), (y.to(device) if isinstance(y, torch.Tensor) else y)
    if progress:
        progress("spectra", 0, len(batches))
    # Batch 0 runs once, with grad: its forward feeds the spectra hooks and the perplexity capture.
    start = time.perf_counter()
    capture_s = 0.0
    captured: dict = {}
    was_training = model.training
    try:
        with SpectraCollector(model, spectra_names, keep_first_grams=finetuned) as collector:
            if finetuned:
                captured = capture_layer_gradients(model, finetuned, x, y, loss_fn)
                capture_s = time.perf_counter() - start
                rest = batches[1:]
            else:
                rest = batches
            collector.batches += len(batches) - len(rest)
            model.eval()
            with torch.no_grad():
                for batch in rest:
                    xb = batch[0] if isinstance(batch, (tuple, list)) else batch
                    model(xb if device is None else xb.to(device))
                    collector.count_batch()
                    if progress:
                        progress("spectra", collector.batches, len(batches))
    finally:
        model.train(was_training)
    spectra = collector.finish()
    skipped = {name: "its module is never called in forward (the model uses its weight directly), "
                     "so neither hooks nor compressed layers see it" for name in collector.never_ran()}
    spectra_names = [n for n in spectra_names if n in spectra]
    spectra_s = time.perf_counter() - start - capture_s

    start = time.perf_counter()
    rows: dict[str, list[dict]] = {}
    grad_norms: dict[str, float] = {}
    shapes: dict[str, list[int]] = {}
    if finetuned:
        if progress:
            progress("perplexity", 0, len(finetuned))
        for k, name in enumerate(finetuned):
            cap = captured.pop(name)  # free each layer's tensors as soon as it is measured
            ranks = [clip_ranks(spectra[name].ranks(e), cap.activation.shape) for e in grid]
            rows[name] = gradient_errors(cap, ranks, grams=collector.first_grams(name))
            grad_norms[name] = float(torch.linalg.vector_norm(cap.weight_grad.double()))
            shapes[name] = list(cap.activation.shape)
            del cap
            if progress:
                progress("perplexity", k + 1, len(finetuned))
    perplexity_s = time.perf_counter() - start

    layers_out = []
    for name in spectra_names:
        spec = spectra[name]
        d = spec.to_dict(grid)
        d["finetuned"] = name in rows
        shape = shapes.get(name, [int(x.shape[0])] + spec.input_shape[1:])
        d["full_bytes"] = math.prod(shape) * ELEMENT_BYTES
        if name in rows:
            # never worse than raw: at ranks whose Tucker form is not smaller, training stores the activation
            # itself (exact gradient), so the option costs full_bytes (perplexity: still the measured truncation)
            stored = [stored_bytes(shape, row["ranks"], ELEMENT_BYTES) for row in rows[name]]
            d["ranks"] = [row["ranks"] for row in rows[name]]
            d["stored"] = ["raw" if raw else "compressed" for _, raw in stored]
            d["bytes"] = [b for b, _ in stored]
            d["perplexity"] = [row["perplexity"] for row in rows[name]]
            d["relative_perplexity"] = [row["relative_perplexity"] for row in rows[name]]
            d["grad_norm"] = grad_norms[name]
        else:
            d["bytes"] = d["perplexity"] = d["relative_perplexity"] = d["grad_norm"] = d["stored"] = None
        layers_out.append(d)
    return CalibrationResult(
        config=dict(config or {}),
        eps_grid=grid,
        batch_size=int(x.shape[0]),
        layers=layers_out,
        finetuned_layers=finetuned,
        skipped_layers=skipped,
        timing={"spectra_s": spectra_s, "perplexity_s": perplexity_s, "capture_s": capture_s, "batches": len(batches),
                "spectra_layers": len(spectra_names), "finetuned_layers": len(finetuned)},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def calibration_batches(dataset, batches: int, batch_size: int, seed: int) -> list:
    """The first ``batches`` batches of a seeded shuffle of ``dataset`` (same seed, same samples)."""
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches and batch size must be >= 1, got {batches} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=0)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= batches:
            break
    return out


def calibrate(
    backbone: str,
    weights: str | None = None,
    dataset: str = "cifar10",
    layers_k: int | str | Sequence[str] | None = 4,
    eps_grid: Sequence[float] = DEFAULT_EPS_GRID,
    batches: int = 2,
    batch_size: int = 64,
    resolution: int | None = None,
    seed: int = 0,
    data_root: str | None = None,
    use_cache: bool = True,
    device: str | None = None,
    progress: Progress | None = None,
    max_per_class: int | None = None,
) -> CalibrationResult:
    """Calibrate ``backbone`` (with ``dataset``'s head) on ``batches`` seeded training batches.

    Spectra for every compressible layer; perplexity and bytes for ``layers_k`` (the last K
    compressible layers, names, or ``"all"``). A result already in the cache is returned at once
    (``result.from_cache``). ``max_per_class``: draw the batches from the first N training images
    of each class only (a quick calibration that decodes few images).
    """
    grid = check_eps_grid(eps_grid)
    layers_key = layers_k if isinstance(layers_k, (int, str)) or layers_k is None else sorted(layers_k)
    config = {"backbone": backbone, "weights": str(weights), "dataset": dataset, "layers": layers_key,
              "eps_grid": grid, "batches": int(batches), "batch_size": int(batch_size),
              "resolution": resolution, "seed": int(seed),
              "data_root": None if data_root is None else str(Path(data_root).expanduser().resolve()),
              "max_per_class": max_per_class, "format_version": FORMAT_VERSION}
    key = cache_mod.cache_key(config)
    if use_cache:
        cached = cache_mod.load_cached(key)
        if cached is not None:
            result = CalibrationResult.from_dict(cached)
            result.from_cache = True
            return result


    start = time.perf_counter()
    classes = num_classes(dataset, data_root=data_root)
    with torch.random.fork_rng(devices=[]):  # a seeded head, without touching the caller's RNG state
        torch.manual_seed(seed)
        bb = build_backbone(backbone, weights=weights, num_classes=classes)
    res = int(resolution or bb.resolution)
    data = get_dataset(dataset, split="train", resolution=res, mean=bb.mean, std=bb.std,
                       data_root=data_root, seed=seed, augment=False, max_per_class=max_per_class)
    data_batches = calibration_batches(data, batches, batch_size, seed)
    setup_s = time.perf_counter() - start
    model = bb.model.to(device) if device else bb.model
    result = calibrate_model(model, data_batches, layers_k, grid, spectra_layers=None, device=device,
                             config={**config, "resolution": res, "num_classes": classes}, progress=progress)
    result.timing["setup_s"] = setup_s
    result.timing["total_s"] = time.perf_counter() - start
    result.cache_key = key
    if use_cache:
        cache_mod.store_cached(key, result.to_dict())
    return result
