"""Protected LANCE: the continual-learning method (methods.md §5) on the engine's one compressed layer.

One :class:`ProtectedLANCE` belongs to one :class:`engine.layers.CompressedLayer` (``groups = 1`` convs and
linears). Its state, as layer buffers (checkpointed, resized on load):

* ``protected_basis`` ``(D, k)``: orthonormal basis of the old tasks' input features (GPM's ``P``);
  ``D = C·kh·kw`` for a conv (its im2col patch space), ``F`` for a linear layer;
* ``u_feat`` ``(D, r)``: the feature factor of the current task, calibrated ``⊥ span(P)``
  (``engine.continual``); ``None`` until calibrated;
* ``u_h`` ``(H', r_H)``, ``u_w`` ``(W', r_W)``: optional factors of a conv's output grid (``None`` = that
  mode is kept whole). The batch mode is never compressed, so any batch size works.

``mode`` (set per task by the continual learner):

* ``"full"``: the input is kept (a raw stash, exact weight gradient); with ``project=True`` (GPM) the weight
  gradient is projected off the protected basis in backward: ``dW ← dW − dW P Pᵀ``.
* ``"lance"``: the stash is the core ``S = patches(A) ×_F U_Fᵀ [×_H U_Hᵀ ×_W U_Wᵀ]`` of shape
  ``(B, r, r_H, r_W)`` (linear ``(N, r)``) plus the factors backward reads; projecting every patch on
  ``U_F`` is a conv with the ``r`` columns of ``U_F`` as filters (no im2col tensor). ``dW = (G ×_H U_Hᵀ
  ×_W U_Wᵀ : S) U_Fᵀ`` lies in ``span(U_F)`` ⊥ ``span(P)``. Never worse than raw: where core + factors
  would not be smaller than the input at this batch size, the input is kept and the exact gradient is
  restricted to ``span(U_F)`` (``dW ← dW U_F U_Fᵀ``), the update the core would give with whole spatial modes.

Input gradients are exact in both modes (they need only ``W``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from engine import tensor_ops as T
from engine.matmul import mm
from engine.methods.base import Method, Stash, contract_except, raw_stash, stores_raw

Tensor = torch.Tensor

MODES = ("full", "lance")


def feature_dim(layer) -> int:
    """``D``: ``C·kh·kw`` (conv) or ``F`` (linear)."""
    return int(layer.weight[0].numel())


def feature_rows(layer, x: Tensor) -> Tensor:
    """The layer's input as feature rows: conv im2col patches ``(B·H'·W', C·kh·kw)``, linear ``(N, F)``."""
    if layer.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    g = layer.geometry
    top, bottom, left, right = g.padding
    if g.symmetric:
        patches = F.unfold(x, g.kernel, g.dilation, (top, left), g.stride)
    else:
        patches = F.unfold(F.pad(x, (left, right, top, bottom)), g.kernel, g.dilation, 0, g.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B·L, D)


def project_patches(layer, x: Tensor, u_feat: Tensor) -> Tensor:
    """``patches(x) ×_F U_Fᵀ`` on the output grid: x ``(B, C, H, W)``, u_feat ``(D, r)`` → ``(B, r, H', W')``."""
    _, c_in, kh, kw = layer.weight.shape
    filters = u_feat.t().reshape(u_feat.shape[1], c_in, kh, kw).to(x.dtype)
    return layer.geometry.forward(x, filters, None)


class ProtectedLANCE(Method):
    """LANCE with a protected feature subspace (continual learning); GPM and plain storage as modes."""

    name = "protected"
    state_names = ("protected_basis", "u_feat", "u_h", "u_w")

    def __init__(self, layer_name: str = "", seed: int = 0, protected: bool = True, mode: str = "full",
                 project: bool = False):
        super().__init__(layer_name, seed)
        self.protected = bool(protected)  # per-task heads: no basis, never projected
        self.mode = mode
        self.project = bool(project)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"protected method: mode must be one of {MODES}, got {value!r}")
        self._mode = value

    def describe(self) -> dict:
        return {"method": self.name, "mode": self.mode, "protected": self.protected, "project": self.project}

    def setup(self, layer) -> None:
        if layer.kind == "conv" and layer.geometry.groups != 1:
            raise ValueError(f"{self.layer_name}: continual learning supports groups=1 convs only, "
                             f"got groups={layer.geometry.groups}")
        dim = feature_dim(layer)
        layer.register_buffer("protected_basis", torch.zeros(dim, 0, device=layer.weight.device))
        for name in ("u_feat", "u_h", "u_w"):
            layer.register_buffer(name, None)

    # -- state ---------------------------------------------------------------------------------
    @staticmethod
    def set_factors(layer, u_feat: Tensor, u_h: Tensor | None = None, u_w: Tensor | None = None) -> None:
        """Fix the factors (float32, on the layer's device): ``u_feat (D, r)``, optional ``u_h``, ``u_w``."""
        dev = layer.weight.device
        layer._buffers["u_feat"] = u_feat.detach().float().to(dev).contiguous()
        layer._buffers["u_h"] = None if u_h is None else u_h.detach().float().to(dev).contiguous()
        layer._buffers["u_w"] = None if u_w is None else u_w.detach().float().to(dev).contiguous()

    @staticmethod
    def set_basis(layer, basis: Tensor) -> None:
        layer._buffers["protected_basis"] = basis.detach().float().to(layer.weight.device).contiguous()

    @staticmethod
    def usage(layer) -> float:
        """Subspace usage ``rank(P) / D`` in [0, 1]."""
        return layer.protected_basis.shape[1] / feature_dim(layer)

    @staticmethod
    def ranks(layer) -> tuple[int, ...]:
        """``(r, [r_H, r_W])`` of the calibrated factors (only the present ones)."""
        u = layer._buffers.get("u_feat")
        out = [0 if u is None else int(u.shape[1])]
        out += [int(f.shape[1]) for f in (layer._buffers.get("u_h"), layer._buffers.get("u_w")) if f is not None]
        return tuple(out)

    # -- forward -------------------------------------------------------------------------------
    def _factors(self, layer) -> tuple[Tensor, Tensor | None, Tensor | None]:
        u = layer._buffers.get("u_feat")
        if u is None:
            raise RuntimeError(f"continual LANCE layer {self.layer_name!r} has no calibrated feature factor: "
                               "calibrate it (engine.continual.ContinualLearner.calibrate) before training")
        return u, layer._buffers.get("u_h"), layer._buffers.get("u_w")

    def compressed_bytes(self, layer, shape: Sequence[int], element_bytes: int = 4) -> int:
        """Bytes of core + factors for an input of ``shape`` (from shapes and ranks, nothing computed)."""
        u, u_h, u_w = self._factors(layer)
        factors = sum(f.numel() for f in (u, u_h, u_w) if f is not None)
        if layer.kind == "linear":
            core = (int(torch.Size(shape).numel()) // int(shape[-1])) * u.shape[1]
        else:
            out_h, out_w = layer.geometry.output_hw(int(shape[2]), int(shape[3]))
            core = (int(shape[0]) * u.shape[1] * (out_h if u_h is None else u_h.shape[1])
                    * (out_w if u_w is None else u_w.shape[1]))
        return (core + factors) * int(element_bytes)

    def compress(self, layer, x: Tensor) -> Stash:
        if self.mode == "full":
            return raw_stash(x)
        if stores_raw(self.compressed_bytes(layer, x.shape, x.element_size()), x.numel() * x.element_size()):
            return raw_stash(x)  # backward restricts the exact gradient to span(U_F)
        return self.core_stash(layer, x)

    def core_stash(self, layer, x: Tensor) -> Stash:
        """The compressed form whatever its size: ``[core, U_F, (U_H), (U_W)]`` (:meth:`compress` keeps the
        input instead where this is not smaller)."""
        u, u_h, u_w = self._factors(layer)
        if layer.kind == "linear":
            core = mm(x.reshape(-1, x.shape[-1]), u.to(x.dtype))  # (N, r)
            flops = 2 * core.numel() * x.shape[-1]
            tensors = [core, u]
        else:
            if u.shape[1]:
                core = project_patches(layer, x, u)  # (B, r, H', W')
            else:  # the protected basis spans everything: the layer cannot learn (zero gradient)
                core = x.new_zeros((x.shape[0], 0, *layer.geometry.output_hw(x.shape[2], x.shape[3])))
            flops = 2 * core.numel() * u.shape[0]
            tensors = [None, u]
            for mode, f in ((2, u_h), (3, u_w)):
                if f is not None:
                    flops += 2 * core.numel() * f.shape[1]
                    core = T.mode_product(core, f.to(x.dtype), mode)
                    tensors.append(f)
            tensors[0] = T.compact(core)
        if layer.kind == "linear":
            ranks = [*map(int, x.shape[:-1]), int(u.shape[1])]
        else:
            out_hw = core.shape[2:] if u_h is None and u_w is None else layer.geometry.output_hw(*x.shape[2:])
            ranks = [int(x.shape[0]), int(u.shape[1]), int(out_hw[0] if u_h is None else u_h.shape[1]),
                     int(out_hw[1] if u_w is None else u_w.shape[1])]
        # ranks: per activation mode, the channel mode standing for the patch space (the layer's FLOP
        # statistics read them as a Tucker form's: approximate for this core)
        meta = {"ranks": ranks, "flops_compress": int(flops), "spatial": (u_h is not None, u_w is not None)}
        return Stash(tensors, meta)

    # -- backward ------------------------------------------------------------------------------
    def weight_grad(self, layer, tensors: Sequence[Tensor], meta: dict, grad_output: Tensor) -> Tensor:
        core, u, *spatial = tensors
        if u.shape[1] == 0:
            return grad_output.new_zeros(layer.weight.shape)
        if layer.kind == "linear":
            g = grad_output.reshape(-1, grad_output.shape[-1])  # (N, F')
            return mm(mm(g.T, core), u.T.to(g.dtype))
        g = grad_output
        it = iter(spatial)
        for mode, present in zip((2, 3), meta["spatial"]):
            if present:
                g = T.mode_product(g, next(it).to(g.dtype), mode)
        small = contract_except(g, core, 1)  # (C', r)
        return mm(small, u.T.to(small.dtype)).reshape(layer.weight.shape)

    def raw_weight_grad(self, layer, x: Tensor, grad_output: Tensor, meta: dict) -> Tensor:
        """A linear layer with fewer input rows ``N`` than outputs ``F'`` projects the rows, not dW:
        ``Gᵀ (X − X P Pᵀ)`` (GPM) or ``Gᵀ (X U_F) U_Fᵀ`` (LANCE, input kept) — the same matrix as projecting
        ``dW = Gᵀ X`` for ``2·N·D·k`` instead of ``2·F'·D·k`` FLOPs (alexnet-cl's fc2 at batch 64: 32× fewer)."""
        if layer.kind == "linear" and self.protected:
            rows = x.reshape(-1, x.shape[-1])
            g = grad_output.reshape(-1, grad_output.shape[-1])
            if rows.shape[0] < g.shape[1]:
                if self.mode == "lance" and meta.get("stored") == "raw":
                    u = layer.u_feat.to(rows.dtype)
                    return mm(g.T, mm(mm(rows, u), u.T)).to(layer.weight.dtype)
                p = layer.protected_basis
                if self.project and p.shape[1]:
                    p = p.to(rows.dtype)
                    return mm(g.T, rows - mm(mm(rows, p), p.T)).to(layer.weight.dtype)
        return super().raw_weight_grad(layer, x, grad_output, meta)

    def constrain_weight_grad(self, layer, grad_weight: Tensor, meta: dict) -> Tensor:
        """GPM (``project``): ``dW − dW P Pᵀ``; LANCE with the input kept: ``dW U_F U_Fᵀ``; else ``dW``."""
        flat = grad_weight.reshape(grad_weight.shape[0], -1)
        if self.mode == "lance" and meta.get("stored") == "raw":
            u = layer.u_feat.to(flat.dtype)
            return mm(mm(flat, u), u.T).reshape(grad_weight.shape)
        p = layer.protected_basis
        if self.project and self.protected and p.shape[1]:
            p = p.to(flat.dtype)
            return (flat - mm(mm(flat, p), p.T)).reshape(grad_weight.shape)
        return grad_weight
