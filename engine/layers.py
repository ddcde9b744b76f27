"""The compressed layer: one module and one autograd Function for ``nn.Conv2d`` and ``nn.Linear``.

The forward output is exact. Forward stores only what the layer's method needs (``Method.compress``,
run on the detached input under no-grad); backward computes dW from that in compressed space and the
input gradient exactly from the weight (gradient filtering excepted). The module shares its
``weight``/``bias`` Parameters with the original layer, which :func:`engine.surgery.restore_model`
puts back.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.functional import tucker_bytes
from engine.geometry import conv_geometry
from engine.matmul import linear, mm
from engine.memory import attribute_to_layer
from engine.methods import Method, Stash
from engine.methods.base import raw_stash, stores_raw

Tensor = torch.Tensor


class _CompressedOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, layer: "CompressedLayer") -> Tensor:
        out = layer.exact_forward(x, weight, bias)
        ctx.layer = layer
        ctx.input_shape = x.shape
        ctx.has_bias = bias is not None
        ctx.meta = None
        if ctx.needs_input_grad[1]:
            stash = layer.compress_or_raw(x.detach())
            ctx.meta = stash.meta
            layer._record(x, out, stash)
            ctx.save_for_backward(weight, *stash.tensors)
        else:
            ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        layer: CompressedLayer = ctx.layer
        weight, *tensors = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_input = grad_weight = grad_bias = None
        raw = ctx.meta is not None and ctx.meta.get("stored") == "raw"
        if ctx.needs_input_grad[0]:
            if ctx.meta is not None and not raw:
                grad_input = layer.method.input_grad(layer, tensors, ctx.meta, grad_output, weight, ctx.input_shape)
            else:
                grad_input = layer.exact_input_grad(grad_output, weight, ctx.input_shape)
        if ctx.needs_input_grad[1]:
            if raw:  # the activation itself was kept: the exact gradient (constrained), whatever the method
                grad_weight = layer.method.raw_weight_grad(layer, tensors[0], grad_output, ctx.meta)
            else:
                grad_weight = layer.method.weight_grad(layer, tensors, ctx.meta, grad_output).to(weight.dtype)
                grad_weight = layer.method.constrain_weight_grad(layer, grad_weight, ctx.meta)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dims = [0, 2, 3] if layer.kind == "conv" else list(range(grad_output.dim() - 1))
            grad_bias = grad_output.sum(dim=dims)
        return grad_input, grad_weight, grad_bias, None


class CompressedLayer(nn.Module):
    """A Conv2d or Linear whose saved activation is compressed by ``method``.

    Never worse than raw (:meth:`compress_or_raw`): where the compressed form would not be smaller
    than the activation, the activation itself is kept and the gradient is exact.

    ``last_stats`` (after each training forward): ``stored`` (``"compressed"`` or ``"raw"``),
    ``stored_bytes`` (= ``analytic_bytes``), ``full_bytes`` (the raw activation), ``ranks`` (effective,
    per mode; the full shape when raw), ``activation_shape``, ``flops`` (``forward``, ``input_grad``,
    ``weight_grad``, ``compress``) and, for compressed Tucker methods, ``captured_energy`` (‖core‖²/‖A‖²).
    """

    saves_buffers_for_backward = True  # its buffers are method state (ASI's factors): SavedBytesMeter counts them

    def __init__(self, original: nn.Module, method: Method, name: str = ""):
        super().__init__()
        if isinstance(original, nn.Conv2d):
            self.kind = "conv"
            self.geometry = conv_geometry(original)
        elif isinstance(original, nn.Linear):
            self.kind = "linear"
            self.geometry = None
        else:
            raise TypeError(f"can only compress nn.Conv2d or nn.Linear, got {type(original).__name__} ({name})")
        self.weight = original.weight
        self.bias = original.bias
        self.layer_name = name
        self.method = method
        object.__setattr__(self, "original", original)  # not a submodule: no duplicate state_dict keys
        self.last_stats: dict = {}
        method.setup(self)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.method.describe()}"

    # -- exact parts ---------------------------------------------------------------------------
    def exact_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.kind == "conv":
            return self.geometry.forward(x, weight, bias)
        return linear(x, weight, bias)

    def exact_input_grad(self, grad_output: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        if self.kind == "conv":
            return self.geometry.input_grad(grad_output, weight, input_shape)
        return mm(grad_output.reshape(-1, grad_output.shape[-1]), weight).reshape(input_shape)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "conv" and x.dim() != 4:
            raise ValueError(f"{self.layer_name}: conv input must be (B, C, H, W), got shape {tuple(x.shape)}")
        if self.kind == "linear" and not 2 <= x.dim() <= 4:
            raise ValueError(
                f"{self.layer_name}: linear input must be (B, F), (B, L, F) or (B, H, W, F), got {tuple(x.shape)}"
            )
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            return self.exact_forward(x, self.weight, self.bias)
        with attribute_to_layer(self.layer_name):
            return _CompressedOp.apply(x, self.weight, self.bias, self)

    def compress_or_raw(self, x: Tensor) -> Stash:
        """What forward keeps for backward: the method's compressed stash, or the activation itself where that
        is not larger (:func:`engine.methods.base.stores_raw`) — the one place every method goes through.

        The decision is a byte comparison from shapes and ranks: before compressing where the method knows
        its ranks (:meth:`Method.planned_ranks`: ASI, LANCE), otherwise on the stash's tensors (HOSVD_ε's
        per-step ranks, gradient filter's pooled tensor).
        """
        raw_bytes = x.numel() * x.element_size()
        planned = self.method.planned_ranks(self, x.shape)
        if planned is not None and stores_raw(tucker_bytes(x.shape, planned, x.element_size()), raw_bytes):
            return raw_stash(x)
        stash = self.method.compress(self, x)
        if stores_raw(sum(t.numel() * t.element_size() for t in stash.tensors), raw_bytes):
            return raw_stash(x)
        return stash

    # -- statistics ----------------------------------------------------------------------------
    def forward_macs(self, x: Tensor, out: Tensor) -> int:
        if self.kind == "conv":
            return self.geometry.macs(x.shape[0], out.shape[2], out.shape[3])
        return out.numel() * x.shape[-1]

    def _weight_grad_flops(self, x: Tensor, out: Tensor, meta: dict) -> int:
        ranks = meta.get("ranks", list(x.shape))
        full = 2 * self.forward_macs(x, out)
        if self.method.name == "vanilla" or meta.get("exact") or meta.get("stored") == "raw":
            return full
        if self.method.name == "gradient_filter":
            pooled = math.prod(ranks[2:])
            return 2 * out.shape[0] * out.shape[1] * pooled * (x.shape[1] // self.geometry.groups) + out.numel()
        r_b = ranks[0]
        flops = 2 * out.numel() * r_b if r_b < x.shape[0] else 0  # project G on the batch factor
        if self.kind == "conv":
            g = self.geometry
            out_hw = out.shape[2] * out.shape[3]
            kh, kw = g.kernel
            hp = x.shape[2] + g.padding[0] + g.padding[1]
            wp = x.shape[3] + g.padding[2] + g.padding[3]
            r_c, r_h, r_w = ranks[1], ranks[2], ranks[3]
            flops += 2 * r_b * r_c * hp * r_h * r_w + 2 * r_b * r_c * hp * wp * r_w  # spatial expansion
            if g.groups == 1:
                flops += 2 * r_b * out.shape[1] * out_hw * r_c * kh * kw
                flops += 2 * out.shape[1] * kh * kw * r_c * x.shape[1] if r_c < x.shape[1] else 0
            else:
                flops += 2 * r_b * x.shape[1] * hp * wp * r_c if r_c < x.shape[1] else 0
                flops += 2 * r_b * out.shape[1] * out_hw * (x.shape[1] // g.groups) * kh * kw
            return flops
        lead = math.prod(ranks[:-1])
        for mode in range(1, x.dim() - 1):  # project G on the token / spatial factors
            flops += 2 * math.prod(ranks[:mode]) * math.prod(x.shape[mode:-1]) * out.shape[-1] * ranks[mode]
        flops += 2 * out.shape[-1] * lead * ranks[-1]
        flops += 2 * out.shape[-1] * ranks[-1] * x.shape[-1] if ranks[-1] < x.shape[-1] else 0
        return flops

    @staticmethod
    def _analytic_bytes(x: Tensor, stash) -> int:
        """The formula: Tucker ``(Π r_m + Σ D_m r_m)·element size``; otherwise the stored tensor's size."""
        if "factor_modes" in stash.meta:
            return tucker_bytes(x.shape, stash.meta["ranks"], x.element_size())
        return int(sum(t.numel() * t.element_size() for t in stash.tensors))

    def _record(self, x: Tensor, out: Tensor, stash) -> None:
        meta = stash.meta
        macs = self.forward_macs(x, out)
        analytic = self._analytic_bytes(x, stash)
        stats = {
            "method": self.method.name,
            "activation_shape": list(x.shape),
            "ranks": list(meta.get("ranks", x.shape)),
            "stored": meta.get("stored", "compressed"),
            "stored_bytes": analytic,
            "analytic_bytes": analytic,
            "full_bytes": int(x.numel() * x.element_size()),
            "flops": {
                "forward": 2 * macs,
                "input_grad": int(self.method.input_grad_flops(self, x, out, meta)),
                "weight_grad": int(self._weight_grad_flops(x, out, meta)),
                "compress": int(meta.get("flops_compress", 0)),
            },
        }
        if "captured_energy" in meta:
            stats["captured_energy"] = float(meta["captured_energy"])
        self.last_stats = stats

    # -- checkpoints ---------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Method state (warm factors, calibrated subspaces) has data-dependent shapes: adopt the saved ones.
        for name in self.method.state_names:
            key = prefix + name
            if key in state_dict:
                saved = state_dict[key]
                self._buffers[name] = torch.empty_like(saved, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
