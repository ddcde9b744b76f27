"""BatchNorm with batch statistics (``track_running_stats=False``, GPM's nets) computed in fewer passes on CPU.

ATen's CPU kernel for a contiguous NCHW batch with batch statistics took 6-7 ms on alexnet-cl's conv1 output
(64, 64, 29, 29) on one thread, about 9 passes' worth of memory traffic. :func:`batch_stats_forward` computes

    mean = Σx / n,   var = Σ(x − mean)² / n (two-pass, as ATen),   y = (x − mean) · (invstd · w) + b

per channel (n = B·H·W) with one reduction, one subtraction into the output, one dot product and two in-place
per-channel updates of the output: forward 6.9 → 5.7 ms there, forward + backward 12.3 → 10.7; (64, 128, 12, 12)
2.2 → 1.5 ms (``python3 docs/bench/conv_stage_ops.py``, ``docs/bench/conv_stage_ops.json``). The backward is
ATen's own ``native_batch_norm_backward`` with these mean and invstd, what autograd runs after ATen's forward.
The numbers equal ATen's to float rounding (its sums accumulate in double, these in float's pairwise sums:
outputs within ~1e-6, gradients ~3e-7 relative), not bit for bit, which is why the continual nets opt in with
:class:`FastBatchNorm2d` and nothing else changes.

The route applies on CPU to float32/float64 inputs of 3 or more dims that are contiguous (NCHW) when the module
has no running statistics; everything else (channels_last, CUDA, running statistics, 2-D inputs, where ATen
is as fast) is ``nn.BatchNorm2d``'s own forward.
"""
from __future__ import annotations

import torch
from torch import nn


def _channel_sums(z: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (C,) sums over every dim but 1 (a last-dim reduction then a batch sum: no permute copy)."""
    return z.reshape(z.shape[0], z.shape[1], -1).sum(-1).sum(0)


def _channel_dots(z: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (C,) Σ z² over every dim but 1, without a squared temporary."""
    flat = z.reshape(z.shape[0], z.shape[1], -1)
    return torch.linalg.vecdot(flat, flat).sum(0)


def fast_route_applies(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() >= 3 and x.dtype in (torch.float32, torch.float64)
            and x.is_contiguous() and x.numel() > x.shape[1])  # more than one value per channel


class _BatchStatsNorm(torch.autograd.Function):
    """y = BN(x) with batch statistics; saves x, weight, mean, invstd (what ATen's own BN saves)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        mean, invstd, y = batch_stats_forward(x, weight, bias, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad.contiguous(), x, weight, None, None, mean,
                                                               invstd, True, ctx.eps, mask)
        return gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None


def batch_stats_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean (C,), invstd (C,), y like x) of BatchNorm with batch statistics over every dim but 1."""
    n = x.numel() // x.shape[1]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = _channel_sums(x) / n
    y = x - mean.view(shape)
    invstd = torch.rsqrt(_channel_dots(y) / n + eps)
    scale = invstd if weight is None else invstd * weight
    y.mul_(scale.view(shape))
    if bias is not None:
        y.add_(bias.view(shape))
    return mean, invstd, y


def batch_stats_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """BatchNorm of ``x`` (B, C, *S) with its own batch statistics (no running statistics), autograd-aware."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _BatchStatsNorm.apply(x, weight, bias, eps)
    return batch_stats_forward(x, weight, bias, eps)[2]


class FastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose batch-statistics CPU forward is :func:`batch_stats_norm` (same parameters,
    buffers and ``state_dict``); with running statistics, or off the fast route, it is ``nn.BatchNorm2d``."""

    def forward(self, x):
        if self.running_mean is None and self.running_var is None and fast_route_applies(x):
            self._check_input_dim(x)
            return batch_stats_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)
