"""Conv/linear layers for continual learning: a protected basis per layer and LANCE's compressed gradient.

:class:`CLConv2d` and :class:`CLLinear` subclass ``nn.Conv2d`` / ``nn.Linear`` (so every tool that looks
for convs and linears still finds them) and share the original layer's ``weight``/``bias`` Parameters.
Each carries, as buffers (resized on ``load_state_dict``, so a checkpoint restores them):

* ``protected_basis`` ``(D, k)``: orthonormal basis of the old tasks' input features (GPM's ``P``);
  ``D = C·kh·kw`` (conv, im2col patch space) or ``F`` (linear).
* ``u_feat`` ``(D, r)``: LANCE's feature factor for the current task, ``⊥ span(P)``.
* ``u_h`` ``(H', r_H)``, ``u_w`` ``(W', r_W)``: optional spatial factors of a conv's output grid
  (empty = that mode is stored uncompressed). The batch mode is never compressed, so any batch size works.

Storage modes (``layer.storage``):

* ``"full"``: plain autograd (``F.conv2d`` / ``F.linear``) — the input ``A`` is saved (gpm, finetune).
* ``"lance"``: forward exact; the saved tensors are the core ``S = patches(A) ×_F U_Fᵀ ×_H U_Hᵀ ×_W U_Wᵀ``
  of shape ``(B, r, r_H, r_W)`` (linear: ``(N, r)``) and the factors backward reads (counted as
  activation bytes, like fine-tune LANCE's). The weight gradient is computed from ``S``
  without rebuilding ``A``: ``dW = (G ×_H U_Hᵀ ×_W U_Wᵀ : S) U_Fᵀ`` — every update lies in
  ``span(U_F)``, orthogonal to the protected basis. The input gradient is exact (needs ``W`` only).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.memory import attribute_to_layer

_RESIZABLE = ("protected_basis", "u_feat", "u_h", "u_w")


def _empty(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape)


class _LanceConv2dFunction(torch.autograd.Function):
    """Exact conv forward; saves the Tucker core of the im2col patches on fixed factors."""

    @staticmethod
    def forward(ctx, x, weight, bias, u_feat, u_h, u_w, stride, padding, dilation):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, 1)
        c_out, c_in, kh, kw = weight.shape
        rank = u_feat.shape[1]
        if rank > 0:
            # projecting every patch onto U_F == a conv with the r columns of U_F as filters
            filters = u_feat.t().reshape(rank, c_in, kh, kw).to(x.dtype)
            core = F.conv2d(x, filters, None, stride, padding, dilation, 1)  # (B, r, H', W')
            if u_h.numel():
                core = torch.einsum("brhw,hi->briw", core, u_h.to(x.dtype))
            if u_w.numel():
                core = torch.einsum("briw,wj->brij", core, u_w.to(x.dtype))
            core = core.contiguous()
        else:
            core = x.new_zeros(0)
        ctx.save_for_backward(core, weight, u_feat, u_h, u_w)
        ctx.conf = (tuple(x.shape), stride, padding, dilation, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        core, weight, u_feat, u_h, u_w = ctx.saved_tensors
        input_shape, stride, padding, dilation, has_bias = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(input_shape, weight, grad_out, stride, padding, dilation, 1)
        if ctx.needs_input_grad[1]:
            if u_feat.shape[1] == 0:
                grad_w = torch.zeros_like(weight)
            else:
                g = grad_out
                if u_h.numel():
                    g = torch.einsum("bohw,hi->boiw", g, u_h.to(g.dtype))
                if u_w.numel():
                    g = torch.einsum("boiw,wj->boij", g, u_w.to(g.dtype))
                small = torch.einsum("boij,brij->or", g, core)  # (C', r)
                grad_w = (small @ u_feat.t().to(small.dtype)).reshape(weight.shape)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _LanceLinearFunction(torch.autograd.Function):
    """Exact linear forward on ``(..., F)``; saves ``S = A U_F`` of shape ``(N, r)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, u_feat):
        out = F.linear(x, weight, bias)
        flat = x.reshape(-1, x.shape[-1])
        core = flat @ u_feat.to(x.dtype) if u_feat.shape[1] > 0 else x.new_zeros(0)
        ctx.save_for_backward(core, weight, u_feat)
        ctx.conf = (tuple(x.shape), bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        core, weight, u_feat = ctx.saved_tensors
        input_shape, has_bias = ctx.conf
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, F')
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(g.dtype)).reshape(input_shape)
        if ctx.needs_input_grad[1]:
            if u_feat.shape[1] == 0:
                grad_w = torch.zeros_like(weight)
            else:
                grad_w = (g.t() @ core) @ u_feat.t().to(g.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=0)
        return grad_x, grad_w, grad_b, None


class _CLMixin:
    """State and behaviour shared by :class:`CLConv2d` and :class:`CLLinear`."""

    storage: str
    protected: bool
    #: LANCE's factors ``u_feat``/``u_h``/``u_w`` are buffers that the compressed backward reads from what
    #: autograd saved: ``SavedBytesMeter`` counts them as activation bytes, as it does fine-tune LANCE's
    #: factors (one byte definition: docs/continual.md). The protected basis is never saved: not counted.
    saves_buffers_for_backward = True

    def _init_cl(self, protected: bool, name: str = "") -> None:
        self.storage = "full"
        # LANCE: when the core would be larger than the input itself (a conv's patch space has C·kh·kw
        # dimensions), store the input and project the weight gradient onto span(U_F) instead
        self.store_input_instead = False
        self.layer_name = name  # tensors this layer saves are attributed to it by SavedBytesMeter
        self.protected = protected  # heads are per task: no basis, never projected
        dim = self.feature_dim
        self.register_buffer("protected_basis", _empty(dim, 0))
        self.register_buffer("u_feat", _empty(dim, 0))
        self.register_buffer("u_h", _empty(0, 0))
        self.register_buffer("u_w", _empty(0, 0))

    @property
    def feature_dim(self) -> int:
        w = self.weight
        return int(w[0].numel())

    def usage(self) -> float:
        """Subspace usage ``rank(P) / D`` in [0, 1]."""
        return self.protected_basis.shape[1] / self.feature_dim

    def set_factors(self, u_feat: torch.Tensor, u_h: torch.Tensor | None = None,
                    u_w: torch.Tensor | None = None) -> None:
        dev = self.weight.device
        self.u_feat = u_feat.detach().float().to(dev).contiguous()
        self.u_h = (u_h if u_h is not None else _empty(0, 0)).detach().float().to(dev).contiguous()
        self.u_w = (u_w if u_w is not None else _empty(0, 0)).detach().float().to(dev).contiguous()

    def set_basis(self, basis: torch.Tensor) -> None:
        self.protected_basis = basis.detach().float().to(self.weight.device).contiguous()

    def restrict_weight_grad(self) -> None:
        """``dW <- dW U_F U_Fᵀ`` (in place): the update LANCE's core would give with full spatial modes."""
        grad = self.weight.grad
        if grad is None:
            return
        flat = grad.reshape(grad.shape[0], -1)
        u = self.u_feat
        flat.copy_((flat @ u) @ u.t()) if u.shape[1] else flat.zero_()

    def project_weight_grad(self) -> None:
        """GPM: ``dW <- dW − dW P Pᵀ`` on the flattened ``(C', D)`` weight gradient (in place)."""
        grad = self.weight.grad
        p = self.protected_basis
        if grad is None or p.shape[1] == 0:
            return
        flat = grad.reshape(grad.shape[0], -1)
        flat.sub_((flat @ p) @ p.t())

    def compressed_ranks(self) -> tuple[int, ...]:
        ranks = [self.u_feat.shape[1]]
        if self.u_h.numel():
            ranks.append(self.u_h.shape[1])
        if self.u_w.numel():
            ranks.append(self.u_w.shape[1])
        return tuple(ranks)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _RESIZABLE:
            key = prefix + name
            if key in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[key], device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLConv2d(_CLMixin, nn.Conv2d):
    """``nn.Conv2d`` (groups = 1) with a protected basis over its im2col patch space ``C·kh·kw``."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, protected: bool = True, name: str = "") -> "CLConv2d":
        if conv.groups != 1:
            raise ValueError(f"continual-learning layers support groups=1 convs only, got groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"continual-learning layers support zero padding only, got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError("string padding ('same'/'valid') is not supported; give explicit integers")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                     "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(layer, attr, getattr(conv, attr))
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._init_cl(protected, name)
        layer.to(conv.weight.device)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H', W')
        with attribute_to_layer(self.layer_name or "conv"):
            if (self.storage == "lance" and not self.store_input_instead and torch.is_grad_enabled()
                    and self.weight.requires_grad):
                return _LanceConv2dFunction.apply(x, self.weight, self.bias, self.u_feat, self.u_h, self.u_w,
                                                  self.stride, self.padding, self.dilation)
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, 1)

    def unfold_features(self, x: torch.Tensor) -> torch.Tensor:
        """im2col patches as feature rows: ``(B·H'·W', C·kh·kw)``."""
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, D, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class CLLinear(_CLMixin, nn.Linear):
    """``nn.Linear`` with a protected basis over its input features ``F``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, protected: bool = True, name: str = "") -> "CLLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = linear.in_features
        layer.out_features = linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_cl(protected, name)
        layer.to(linear.weight.device)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., F) -> (..., F')
        with attribute_to_layer(self.layer_name or "linear"):
            if (self.storage == "lance" and not self.store_input_instead and torch.is_grad_enabled()
                    and self.weight.requires_grad):
                return _LanceLinearFunction.apply(x, self.weight, self.bias, self.u_feat)
            return F.linear(x, self.weight, self.bias)

    def unfold_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input rows as features: ``(N, F)``."""
        return x.reshape(-1, x.shape[-1])


CLLayer = (CLConv2d, CLLinear)
