"""The two baselines that need no decomposition: vanilla backprop and gradient filtering."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from engine.methods.base import Method, Stash

Tensor = torch.Tensor


def exact_weight_grad(layer, x: Tensor, grad_output: Tensor) -> Tensor:
    """dW from the full input ``x`` (conv ``(B, C, H, W)`` or linear ``(B, …, F)``)."""
    if layer.kind == "conv":
        return layer.geometry.weight_grad(x, grad_output, layer.weight.shape, layer.geometry.groups, padded=False)
    out_features = grad_output.shape[-1]
    return grad_output.reshape(-1, out_features).T @ x.reshape(-1, x.shape[-1])


class Vanilla(Method):
    """Plain last-k backprop: the input itself is kept for dW."""

    name = "vanilla"

    def compress(self, layer, x: Tensor) -> Stash:
        return Stash([x], {"ranks": list(x.shape), "flops_compress": 0})

    def weight_grad(self, layer, tensors: Sequence[Tensor], meta: dict, grad_output: Tensor) -> Tensor:
        return exact_weight_grad(layer, tensors[0], grad_output)


class GradientFilter(Method):
    """Gradient filtering (Yang et al., CVPR 2023) with patch ``R``.

    Conv layers: ``A`` is averaged to the grid of ``R×R`` patches of the *output* (``⌈H'/R⌉×⌈W'/R⌉``),
    ``G`` is averaged over the same patches; dW gets one value per kernel tap pair
    ``Σ_patches |patch|·Ḡ·Ā`` (every tap the same), and the input gradient is computed exactly from
    ``Ḡ`` broadcast back over each patch (so it is approximate and errors compound with depth).
    Linear layers have no spatial patches: they stay exact (vanilla storage).
    """

    name = "gradient_filter"
    exact_input_grad = False

    def __init__(self, layer_name: str = "", seed: int = 0, patch: int = 2):
        super().__init__(layer_name, seed)
        if int(patch) < 1:
            raise ValueError(f"gradient_filter patch must be a positive integer, got {patch!r}")
        self.patch = int(patch)

    def describe(self) -> dict:
        return {"method": self.name, "patch": self.patch}

    def _grid(self, out_h: int, out_w: int) -> tuple[int, int]:
        return math.ceil(out_h / self.patch), math.ceil(out_w / self.patch)

    def compress(self, layer, x: Tensor) -> Stash:
        if layer.kind != "conv":
            return Stash([x], {"ranks": list(x.shape), "flops_compress": 0, "exact": True})
        out_h, out_w = layer.geometry.output_hw(x.shape[2], x.shape[3])
        grid = self._grid(out_h, out_w)
        pooled = F.adaptive_avg_pool2d(x, grid).contiguous()
        return Stash([pooled], {"ranks": list(pooled.shape), "flops_compress": x.numel(), "exact": False})

    def _pool_grad(self, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        """(Ḡ average over each patch, patch element counts) — patches clipped at the border."""
        r = self.patch
        pooled = F.avg_pool2d(grad_output, r, r, ceil_mode=True)
        ones = torch.ones(1, 1, *grad_output.shape[2:], dtype=grad_output.dtype, device=grad_output.device)
        counts = F.avg_pool2d(ones, r, r, ceil_mode=True, divisor_override=1)
        return pooled, counts

    def weight_grad(self, layer, tensors: Sequence[Tensor], meta: dict, grad_output: Tensor) -> Tensor:
        (saved,) = tensors
        if meta.get("exact"):
            return exact_weight_grad(layer, saved, grad_output)
        geometry = layer.geometry
        g_avg, counts = self._pool_grad(grad_output)
        g_sum = g_avg * counts  # (B, C', h, w)
        groups = geometry.groups
        batch, out_ch = g_sum.shape[:2]
        in_per_group = saved.shape[1] // groups
        g = g_sum.reshape(batch, groups, out_ch // groups, -1)
        a = saved.reshape(batch, groups, in_per_group, -1)
        per_tap = torch.einsum("bgop,bgcp->goc", g, a).reshape(out_ch, in_per_group)
        kh, kw = geometry.kernel
        return per_tap[:, :, None, None].expand(out_ch, in_per_group, kh, kw).contiguous()

    def input_grad(self, layer, tensors, meta, grad_output: Tensor, weight: Tensor, input_shape) -> Tensor:
        if meta.get("exact"):
            return layer.exact_input_grad(grad_output, weight, input_shape)
        g_avg, _ = self._pool_grad(grad_output)
        r = self.patch
        g_tilde = g_avg.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)
        g_tilde = g_tilde[:, :, : grad_output.shape[2], : grad_output.shape[3]]
        return layer.exact_input_grad(g_tilde.contiguous(), weight, input_shape)
