"""Perplexity: how far each fine-tuned layer's compressed weight gradient is from the exact one (methods.md §4).

One forward/backward pass with plain autograd over a labelled calibration batch, through the real head
and loss, captures every chosen layer's input ``A``, output gradient ``G`` and exact weight gradient
``dW``. Each layer is then measured in isolation: its compressed gradient ``dŴ`` is computed from the
same ``A`` (HOSVD-truncated to the ranks of each ε) and the same exact ``G``, so errors of other
layers never leak into its number. ``perplexity = ‖dW − dŴ‖_F``; ``relative = perplexity / ‖dW‖_F``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine import tensor_ops
from engine.functional import tucker_weight_grad
from engine.spectra import eigh_descending, gram64


@dataclass
class CapturedLayer:
    """What one layer saw in the calibration step. ``activation``: its input, e.g. ``(B, C, H, W)``;
    ``grad_output``: ``dL/d(output)``, e.g. ``(B, C', H', W')``; ``weight_grad``: exact ``dL/dW``."""

    name: str
    layer: nn.Module
    activation: torch.Tensor
    grad_output: torch.Tensor
    weight_grad: torch.Tensor


def capture_layer_gradients(
    model: nn.Module,
    layer_names: Sequence[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, CapturedLayer]:
    """One eval-mode forward/backward with vanilla autograd; returns each named layer's ``A``, ``G``, ``dW``.

    Only the named layers' weights require grad during the pass (every other parameter is treated as
    frozen, as in last-k fine-tuning); the ``requires_grad`` flags and train/eval mode are restored.
    ``inputs``: a model input batch ``(B, …)``; ``targets``: what ``loss_fn(model(inputs), targets)`` expects.
    """
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise KeyError(f"no such layer(s) in the model: {missing}")
    flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {p: p.grad for p in model.parameters()}
    activations: dict[str, torch.Tensor] = {}
    grad_outputs: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {n: 0 for n in layer_names}
    handles = []
    for name in layer_names:
        layer = modules[name]
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"layer {name!r} is {type(layer).__name__}; perplexity is for Conv2d and Linear layers")

        def hook(mod, inp, out, _name=name):
            calls[_name] += 1
            activations[_name] = inp[0].detach()

            def grad_hook(grad, _n=_name):
                grad_outputs[_n] = grad.detach()

            out.register_hook(grad_hook)

        handles.append(layer.register_forward_hook(hook))
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for name in layer_names:
            modules[name].weight.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            loss.backward()
        never = [n for n, c in calls.items() if c == 0]
        if never:
            raise RuntimeError(f"layer(s) {never} never ran as modules in the forward pass (the model applies "
                               "their weights directly), so their gradients cannot be measured or compressed; "
                               "fine-tune other layers (e.g. fewer last layers)")
        reused = [n for n, c in calls.items() if c != 1]
        if reused:
            raise RuntimeError(f"layer(s) {reused} ran {[calls[n] for n in reused]} times in one forward pass; "
                               "perplexity needs each measured layer to run exactly once")
        out = {}
        for name in layer_names:
            weight = modules[name].weight
            out[name] = CapturedLayer(name, modules[name], activations[name], grad_outputs[name],
                                      weight.grad.detach().clone())
        return out
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = saved_grads[p]
        model.train(was_training)


def clip_ranks(ranks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Ranks no larger than the activation's dims (a smaller batch than at calibration, for example)."""
    if len(ranks) != len(shape):
        raise ValueError(f"{len(ranks)} ranks for an activation with {len(shape)} modes {tuple(shape)}")
    return tuple(max(1, min(int(r), int(d))) for r, d in zip(ranks, shape))


def leading_factors(activation: torch.Tensor, grams: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Every mode's Gram eigenvectors, leading first: ``[(D_m, D_m)]`` in the activation's dtype.

    Computed once per layer; the factor at rank ``r`` is the first ``r`` columns, so a whole ε grid
    costs one eigendecomposition per mode instead of one per ε. ``grams``: the activation's per-mode
    Grams when already computed (e.g. by the spectra pass over the same batch).
    """
    factors = []
    for mode in range(activation.ndim):
        gram = gram64(activation, mode) if grams is None else grams[mode].double()
        factors.append(eigh_descending(gram)[1].to(activation.dtype))
    return factors


def truncate(activation: torch.Tensor, full_factors: Sequence[torch.Tensor], ranks: Sequence[int]):
    """HOSVD truncation at ``ranks``: ``(core, factors)`` with ``factors[m] = None`` where the mode is kept whole.

    activation ``(D_0, …)`` → core ``(r_0, …)``; factors ``[(D_m, r_m) | None]``.
    """
    core = activation
    factors: list[torch.Tensor | None] = []
    # project the mode that shrinks most first: later projections then touch a smaller tensor
    order = sorted(range(activation.ndim), key=lambda m: ranks[m] / activation.shape[m])
    chosen: dict[int, torch.Tensor] = {}
    for mode in order:
        if ranks[mode] < activation.shape[mode]:
            u = full_factors[mode][:, : ranks[mode]].contiguous()
            chosen[mode] = u
            core = tensor_ops.mode_product(core, u, mode)
    for mode in range(activation.ndim):
        factors.append(chosen.get(mode))
    return core, factors


@torch.no_grad()
def gradient_errors(captured: CapturedLayer, ranks_per_choice: Sequence[Sequence[int]],
                    grams: Sequence[torch.Tensor] | None = None) -> list[dict]:
    """For each ranks tuple: ``{"ranks", "perplexity", "relative_perplexity"}`` of the compressed gradient.

    The activation is HOSVD-truncated to ``ranks`` (leading Gram eigenvectors of each unfolding) and
    :func:`engine.functional.tucker_weight_grad` computes dW in compressed space (methods.md §3).
    ``grams``: the activation's per-mode Gram matrices, if already computed.
    """
    exact = captured.weight_grad.double()
    norm = float(torch.linalg.vector_norm(exact))
    if grams is not None and [tuple(g.shape) for g in grams] != [(d, d) for d in captured.activation.shape]:
        grams = None  # not this activation's Grams (another batch size): recompute
    full_factors = leading_factors(captured.activation, grams)
    rows = []
    cache: dict[tuple, dict] = {}
    for ranks in ranks_per_choice:
        r = clip_ranks(ranks, captured.activation.shape)
        if r not in cache:
            core, factors = truncate(captured.activation, full_factors, r)
            approx = tucker_weight_grad(captured.layer, core, factors, captured.grad_output)
            err = float(torch.linalg.vector_norm(exact - approx.double()))
            cache[r] = {"ranks": list(r), "perplexity": err, "relative_perplexity": err / norm if norm > 0 else 0.0}
        rows.append(dict(cache[r]))
    return rows
