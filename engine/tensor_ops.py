"""Pure tensor algebra for Tucker compression: unfoldings, mode products, Grams.

Eigendecompositions and the energy rank rule live in :mod:`engine.spectra`.

Notation follows methods.md §1: for ``x`` of shape ``(D_0, …, D_{n-1})`` the mode-``m`` unfolding is
``x_(m) ∈ R^{D_m × Π_{j≠m} D_j}``; ``mode_product(x, U, m)`` contracts mode ``m`` of ``x`` with the
*first* index of ``U`` (``U: (D_m, r)`` gives a tensor whose mode ``m`` has size ``r``), i.e. it
computes ``x ×_m Uᵀ`` in the usual textbook notation: a projection onto the columns of ``U``.
``mode_expand(x, U, m)`` is the opposite contraction (``x ×_m U``: mode ``m`` goes from ``r`` to ``D_m``).

A tensor is viewed as ``(a, D_m, b)`` and contracted with one batched matmul, which reads the input
once; where the inner size ``b`` is small (the spatial modes, a weight gradient's kernel taps) the
batched matmul is dominated by per-matrix overhead and one transposed copy plus a single matmul is
used instead (profiled: 4-5× faster at ``b ≤ 16``).
"""
from __future__ import annotations

import math

import torch

from engine.matmul import mm

Tensor = torch.Tensor

#: below this inner size ``b`` a mode product goes through one transposed matmul instead of a batched one
_BMM_MIN_INNER = 32


def _split(shape: torch.Size, mode: int) -> tuple[int, int, int]:
    """(a, D_m, b) with a = Π_{j<m} D_j and b = Π_{j>m} D_j."""
    a = math.prod(shape[:mode])
    b = math.prod(shape[mode + 1 :])
    return a, shape[mode], b


def unfold(x: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding ``(D_m, Π_{j≠m} D_j)`` (a copy unless ``mode == 0``)."""
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)



def mode_gram(x: Tensor, mode: int) -> Tensor:
    """``x_(m) x_(m)ᵀ``: ``(D_m, D_m)``. Cost 2·numel·D_m FLOPs."""
    a, d, b = _split(x.shape, mode)
    if a == 1:
        m = x.reshape(d, b)
        return mm(m, m.T)
    if b == 1:
        m = x.reshape(a, d)
        return mm(m.T, m)
    x3 = x.reshape(a, d, b)
    return torch.einsum("adb,aeb->de", x3, x3)


def mode_product(x: Tensor, factor: Tensor, mode: int) -> Tensor:
    """Project mode ``mode`` onto the columns of ``factor``.

    x: ``(…, D_m, …)``, factor: ``(D_m, r)`` → ``(…, r, …)``. Cost 2·numel·r FLOPs.
    """
    a, d, b = _split(x.shape, mode)
    r = factor.shape[1]
    out_shape = x.shape[:mode] + (r,) + x.shape[mode + 1 :]
    if b == 1:
        return mm(x.reshape(a, d), factor).reshape(out_shape)
    if a == 1:
        return mm(factor.T, x.reshape(d, b)).reshape(out_shape)
    if b < _BMM_MIN_INNER:
        # Short inner dimension: a batched matmul of ``a`` thin (r×d)@(d×b) products is dominated by
        # per-matrix overhead; one (a·b, d)@(d, r) product on a transposed copy is several times faster.
        moved = mm(x.reshape(a, d, b).transpose(1, 2).reshape(a * b, d), factor)  # (a·b, r)
        return moved.reshape(a, b, r).transpose(1, 2).reshape(out_shape)
    return torch.matmul(factor.T, x.reshape(a, d, b)).reshape(out_shape)


def mode_expand(x: Tensor, factor: Tensor, mode: int) -> Tensor:
    """Lift mode ``mode`` from ``r`` back to ``D_m``: x ``(…, r, …)``, factor ``(D_m, r)`` → ``(…, D_m, …)``."""
    return mode_product(x, factor.T, mode)


#: a tensor's two trailing modes (a conv's spatial modes) are contracted together, with their Kronecker
#: factor, while they hold at most this many positions H·W: on small feature maps each per-mode product is
#: a memory-bound pass with a transposed copy; one product over the (…, H·W) view replaces two of them
#: (MobileNetV2's (8, 960, 7, 7) → (8, 960, 4, 4): 1.4 → 0.2 ms)
PAIR_MAX_POSITIONS = 64


def pair_fits(height: int, width: int) -> bool:
    """Whether a ``height × width`` map is small enough for the pair products."""
    return int(height) * int(width) <= PAIR_MAX_POSITIONS


def pair_gram(x: Tensor) -> Tensor:
    """The Gram of the two trailing modes together: x ``(…, H, W)`` → ``(H, W, H, W)``, entry
    ``[h, w, k, v] = Σ x[…, h, w]·x[…, k, v]``. Every mode Gram of those two modes (also after projecting
    the other one, :func:`pair_mode_gram`) is a contraction of it. Cost 2·numel·H·W FLOPs, one pass."""
    h, w = x.shape[-2:]
    m = x.reshape(-1, h * w)
    return mm(m.T, m).view(h, w, h, w)


def pair_mode_gram(gram4: Tensor, mode: int, other: Tensor | None = None) -> Tensor:
    """Mode Gram of trailing mode ``mode`` (0: H, 1: W of the pair) from :func:`pair_gram`'s ``(H, W, H, W)``.

    ``other``: the other mode's factor ``(D, r)`` already projected (the Gram of ``x ×_other otherᵀ``), or
    ``None`` (of ``x`` itself). → ``(D_mode, D_mode)``.
    """
    if other is None:
        return torch.einsum("hwkw->hk", gram4) if mode == 0 else torch.einsum("hwhv->wv", gram4)
    keep = other @ other.T  # the projector onto the other mode's factor
    if mode == 0:
        return torch.einsum("wv,hwkv->hk", keep, gram4)
    return torch.einsum("hk,hwkv->wv", keep, gram4)


def pair_product(x: Tensor, u_h: Tensor, u_w: Tensor) -> Tensor:
    """Project both trailing modes at once: x ``(…, H, W)``, ``u_h (H, r_h)``, ``u_w (W, r_w)`` → ``(…, r_h, r_w)``;
    equals ``mode_product(mode_product(x, u_h, -2), u_w, -1)``. Cost 2·numel·r_h·r_w FLOPs."""
    h, w = x.shape[-2:]
    (r_h, r_w) = u_h.shape[1], u_w.shape[1]
    # the Kronecker factor [(h, w), (i, j)] = u_h[h, i]·u_w[w, j] (torch.kron fails on transposed views)
    kron = (u_h[:, None, :, None] * u_w[None, :, None, :]).reshape(h * w, r_h * r_w)
    out = mm(x.reshape(-1, h * w), kron)
    return out.reshape(*x.shape[:-2], r_h, r_w)


def pair_expand(x: Tensor, u_h: Tensor, u_w: Tensor) -> Tensor:
    """Lift both trailing modes at once: x ``(…, r_h, r_w)`` → ``(…, H, W)`` (the inverse contraction)."""
    return pair_product(x, u_h.T, u_w.T)


def orth(matrix: Tensor) -> Tensor:
    """Reduced QR: an orthonormal basis ``(m, k)`` of the columns of ``matrix (m, k)``."""
    return torch.linalg.qr(matrix, mode="reduced").Q


def compact(t: Tensor) -> Tensor:
    """A contiguous tensor whose storage holds exactly its elements (views of larger storages are copied).

    Saved tensors are measured by storage, so anything kept for backward goes through this.
    """
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.contiguous().clone() if t.is_contiguous() else t.contiguous()
    return t
