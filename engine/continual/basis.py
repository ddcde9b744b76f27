"""Protected bases and calibrated factors for continual learning (pure functions on Gram matrices).

Every function here works on a layer's *feature Gram* ``M = Σ_n x_n x_nᵀ`` (shape ``(D, D)``, float64),
where ``x_n`` are the layer's input feature vectors: for a linear layer the rows of its input
(``D = F``), for a conv the im2col patches at every output position (``D = C·kh·kw``).

* :func:`extend_basis` — GPM's rule (Saha et al., ICLR 2021), used after every task by ``lance`` and
  ``gpm``: add the leading residual directions of the new task until the *total* captured energy of
  the task's activations reaches ``eps_cl``.
* :func:`residual_factor` — LANCE's calibration before task ``t``: the leading directions of the
  residual ``(I − P Pᵀ) A`` up to energy ``eps`` of the residual, hence ``U ⊥ span(P)``.
* :func:`plain_factor` — the plain energy rule (any mode, no protection).
"""
from __future__ import annotations

import torch

from engine.spectra import eigh_descending, rank_for_energy


def _descending64(gram: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`engine.spectra.eigh_descending` of ``gram`` decomposed in ``dtype`` (float32 is ~3x faster for
    D = 2048 and enough for calibrated factors; the protected basis uses float64), returned in float64."""
    values, vectors = eigh_descending(gram.double(), dtype)
    return values.double(), vectors.double()


def _orthonormal_complement_part(vectors: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Project ``vectors (D, k)`` off ``span(basis)`` twice (numerical safety) and orthonormalise."""
    if vectors.shape[1] == 0:
        return vectors
    out = vectors
    if basis is not None and basis.shape[1] > 0:
        b = basis.to(out.dtype)
        for _ in range(2):
            out = out - b @ (b.T @ out)
    q, _ = torch.linalg.qr(out, mode="reduced")
    return q


def residual_gram(gram: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """``(I − P Pᵀ) M (I − P Pᵀ)`` in float64; ``M`` itself when the basis is empty."""
    m = gram.double()
    if basis is None or basis.shape[1] == 0:
        return m
    p = basis.double()
    mp = m @ p
    return m - mp @ p.T - p @ mp.T + p @ (p.T @ mp) @ p.T


def residual_spectrum(basis: torch.Tensor | None, gram: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                      dtype: torch.dtype = torch.float64) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """``(total energy, residual energy, residual eigenvalues (k,), eigenvectors (D, k))``, largest first.

    Give either the feature Gram ``gram (D, D)`` or, cheaper when there are fewer rows than features
    (fully connected layers, ``N < D``), the feature rows ``rows (N, D)`` themselves: then the thin SVD
    of the residual rows replaces the ``D × D`` eigendecomposition (GPM does the same).
    """
    if rows is not None:
        x = rows.to(dtype)
        total = float((x.double() ** 2).sum())
        if basis is not None and basis.shape[1] > 0:
            p = basis.to(dtype)
            x = x - (x @ p) @ p.T
        residual = float((x.double() ** 2).sum())
        _, sing, vh = torch.linalg.svd(x, full_matrices=False)
        return total, residual, (sing.double() ** 2), vh.double().T
    if gram is None:
        raise ValueError("give the feature Gram or the feature rows")
    total = float(torch.trace(gram.double()))
    res = residual_gram(gram, basis)
    values, vectors = _descending64(res, dtype)
    return total, float(torch.trace(res)), values, vectors


def extend_basis(basis: torch.Tensor | None, gram: torch.Tensor | None, eps_cl: float,
                 rows: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """GPM's energy rule: extend ``basis (D, k)`` with the new task's leading residual directions.

    ``gram``: the new task's feature Gram ``(D, D)``. Directions are added until
    ``(‖P Pᵀ A‖² + Σ added σ²) / ‖A‖² >= eps_cl``; none when the old basis already holds that much.
    Returns ``(new_basis (D, k'), info)`` with ``info = {"added", "rank", "dim", "captured_before"}``.
    The result is orthonormal (float32) and never exceeds ``D`` columns.
    """
    source = gram if gram is not None else rows
    dim = source.shape[-1]
    old = torch.zeros(dim, 0, dtype=torch.float64, device=source.device) if basis is None else basis.double()
    total, residual_energy, values, vectors = residual_spectrum(old, gram, rows, torch.float64)
    captured_before = (total - residual_energy) / total if total > 0 else 1.0
    added = rank_for_energy(values, eps_cl, total=total, captured=total - residual_energy, min_rank=0)
    added = min(added, dim - old.shape[1])
    new = _orthonormal_complement_part(vectors[:, :added], old)
    out = torch.cat([old, new], dim=1).float()
    return out, {"added": int(added), "rank": int(out.shape[1]), "dim": int(dim), "captured_before": captured_before}


def residual_factor(gram: torch.Tensor | None, basis: torch.Tensor | None, eps: float, max_rank: int | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """LANCE's feature factor ``U (D, r)`` for the next task, orthonormal and ``⊥ span(basis)``.

    ``r`` is the smallest rank reaching energy ``eps`` of the *residual* ``(I − P Pᵀ) A``; at least 1
    while the residual is numerically non-zero, and 0 (an empty ``(D, 0)`` factor: the layer cannot
    learn) when the protected basis already spans every direction of the new data.
    """
    total, _, values, vectors = residual_spectrum(basis, gram, rows, torch.float32)
    if basis is not None and basis.shape[1] > 0:
        # directions the protected basis spans have (numerically) zero residual energy; judge noise
        # against the raw data's energy, not the residual's largest eigenvalue
        floor = 1e-7 * total  # float32-accurate spectra are good to ~1e-7
        values = values[: int((values > floor).sum())]
    # at least 1 while the residual is numerically non-zero, 0 when it is all zero
    r = rank_for_energy(values, eps, min_rank=1 if float(values.sum()) > 0.0 else 0) if values.numel() else 0
    r = min(r, vectors.shape[1])
    if max_rank is not None:
        r = min(r, max_rank)
    return _orthonormal_complement_part(vectors[:, :r], basis).float()


def plain_factor(gram: torch.Tensor, eps: float, max_rank: int | None = None) -> torch.Tensor:
    """The plain energy rule: ``U (D, r)``, the leading eigenvectors of ``gram`` reaching energy ``eps``."""
    values, vectors = _descending64(gram, torch.float32)
    r = rank_for_energy(values, eps, min_rank=1 if float(values.sum()) > 0 else 0)
    if max_rank is not None:
        r = min(r, max_rank)
    return vectors[:, :r].float().contiguous()
