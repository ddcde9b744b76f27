"""One home for activation spectra: the per-mode Gram accumulator, the eigendecomposition, the rank rule.

Every part of the project that turns activations into ranks goes through this module: LANCE's
calibration (:mod:`engine.methods.calibration`), ``lance calibrate`` and the app's Spectra and Budget
pages (:mod:`engine.calibration.spectra`), HOSVD_ε's per-step ranks (:mod:`engine.methods.tucker`,
:func:`engine.functional.hosvd_ranks`) and the continual learner (:mod:`engine.continual.basis`).

Notation (methods.md §1–2): an activation ``A`` of shape ``(B, D_1, …, D_{n-1})`` (batch first; conv
``(B, C, H, W)``, linear ``(B, F)``, ``(B, L, F)``, ``(B, H, W, F)``); ``A_(m)`` is its mode-``m`` unfolding
``(D_m, Π_{j≠m} D_j)``. The eigenvalues of the Gram ``A_(m) A_(m)ᵀ`` are the squared singular values σ²
of ``A_(m)``: the *energy* per direction.

**The rank rule** (:func:`rank_for_energy`): for ``ε < 1`` the smallest ``r`` with
``captured + Σ_{i<r} λ_i ≥ (ε − ENERGY_TOLERANCE) · total`` (``total`` defaults to ``captured + Σ λ``);
for ``ε = 1`` every direction above the noise floor, ``λ_i > ENERGY_TOLERANCE · λ_0`` (so the null space
of a rank-deficient float64 Gram is dropped, while float32 round-off directions are kept and the
gradient stays exact); never below ``min_rank`` (1 unless asked) and never above ``len(λ)``; an
all-zero spectrum gives ``min_rank``. ``ENERGY_TOLERANCE = 1e-9`` is the one tolerance: a cumulative
energy within 1e-9 (relative to the total) of ε counts as reaching it, so float round-off never adds a
direction, and at ε = 1 the same 1e-9 (relative to the largest eigenvalue) is the noise floor.

**The accumulator** (:class:`GramAccumulator`): a true mean over samples, every sample weighing the
same whatever the batch sizes (a smaller last batch included):

- non-batch modes ``m ≥ 1``: ``G_m = Σ_batches A_(m) A_(m)ᵀ / N`` (``N`` samples seen), which is exactly the
  Gram of the concatenated data divided by ``N``; factors are its leading eigenvectors;
- the batch mode: its ``B×B`` Gram depends on which samples share a batch, so it cannot be summed as a
  matrix. Its spectrum is the *sum of the per-batch eigenvalue vectors* (zero-padded to the widest
  batch) divided by ``N`` — the same normalisation as the other modes (its total is the mean energy per
  sample, like every mode's trace), and a batch contributes in proportion to its samples' energy.
  The batch rank at ε is the rank of that mean spectrum by the same rule (not a mean of per-batch ranks).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine import tensor_ops as T

Tensor = torch.Tensor

#: The one tolerance of the rank rule (relative to the total energy).
ENERGY_TOLERANCE = 1e-9


def rank_for_energy(values: Tensor | np.ndarray | Sequence[float], eps: float, *, total: float | None = None,
                    captured: float = 0.0, min_rank: int = 1) -> int:
    """Smallest ``r`` (``min_rank ≤ r ≤ len(values)``) with ``captured + Σ_{i<r} values[i] ≥ (eps − 1e-9)·total``.

    ``values``: eigenvalues of a Gram (σ², descending) or normalised energies (σ²/Σσ²), ``(D,)``;
    negatives (round-off) count as 0. ``total`` defaults to ``captured + Σ values``; ``captured`` is
    energy already held elsewhere (GPM's protected part, continual learning; it may give ``r = 0`` when
    ``min_rank=0``). ``eps = 1`` keeps every direction above the noise floor ``1e-9·values[0]``; an
    all-zero spectrum (total ≤ 0) gives ``min_rank``; a total the values never reach gives ``len(values)``.
    ``eps`` must be in ``(0, 1]``.
    """
    eps = float(eps)
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"energy threshold eps must be in (0, 1], got {eps}")
    lam = np.clip(np.asarray(values.detach().double().cpu() if isinstance(values, Tensor) else values,
                             dtype=np.float64).reshape(-1), 0.0, None)
    n = int(lam.size)
    floor = min(int(min_rank), n)
    total = float(captured + lam.sum()) if total is None else float(total)
    if total <= 0.0 or n == 0:
        return floor
    if eps >= 1.0:
        return max(floor, int((lam > ENERGY_TOLERANCE * float(lam.max())).sum()))
    cumulative = captured + np.concatenate([[0.0], np.cumsum(lam)])  # energy held by the first r, r = 0..n
    reached = np.nonzero(cumulative >= (eps - ENERGY_TOLERANCE) * total)[0]
    r = int(reached[0]) if reached.size else n
    return max(floor, min(r, n))


def eigh_descending(gram: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD ``(D, D)`` Gram, largest first.

    The matrix is symmetrised (``(G + Gᵀ)/2``) and decomposed in ``dtype`` (default: the Gram's own;
    HOSVD's per-step Grams stay float32, calibration Grams are float64). Returns ``(eigenvalues (D,)``
    descending and clamped at 0, ``eigenvectors (D, D))`` in that dtype, column ``i`` for eigenvalue ``i``.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"a Gram matrix must be square, got shape {tuple(gram.shape)}")
    g = gram if dtype is None else gram.to(dtype)
    values, vectors = torch.linalg.eigh(0.5 * (g + g.T))
    return values.flip(0).clamp_min(0.0), vectors.flip(1)


def gram64(x: Tensor, mode: int) -> Tensor:
    """``A_(m) A_(m)ᵀ`` of ``x`` as float64 ``(D_m, D_m)``; the product runs in ``x``'s dtype (float32 for speed)."""
    x = x.detach()
    if not x.is_floating_point():
        x = x.float()
    return T.mode_gram(x, mode).double()


class GramAccumulator:
    """Per-mode Gram statistics of a stream of activations ``(B, D_1, …)``: a true mean over samples.

    ``update(x)`` once per batch; then ``eigenvalues(mode)`` (descending, ≥ 0, float64), ``eigh(mode)``
    (non-batch modes: values and eigenvectors of the mean Gram), ``ranks_at(eps)`` (one rank per mode by
    :func:`rank_for_energy`) and ``factor(mode, rank)``. ``shape`` is ``(largest batch, D_1, …)``,
    ``first_shape`` the first batch's shape, ``samples`` and ``batches`` the counts seen.
    ``keep_first_grams``: also keep every mode's Gram of the first batch (``first_grams``, float64).
    ``batch_spectrum=False``: skip the batch mode (no ``B×B`` Gram or eigendecomposition per batch; for
    row matrices ``(N, D)`` with many rows, e.g. the continual learner's im2col features).
    """

    def __init__(self, keep_first_grams: bool = False, batch_spectrum: bool = True):
        self.shape: tuple[int, ...] = ()
        self.first_shape: tuple[int, ...] = ()
        self.samples = 0
        self.batches = 0
        self.gram_sums: dict[int, Tensor] = {}
        self.batch_eig_sum: np.ndarray = np.zeros(0)
        self.keep_first_grams = keep_first_grams
        self.batch_spectrum = batch_spectrum
        self.first_grams: list[Tensor] | None = None
        self._eig: dict[int, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add one batch ``x (B, D_1, …)``."""
        x = x.detach()
        if x.dim() < 2:
            raise ValueError(f"an activation must be batch first with at least 2 dims, got shape {tuple(x.shape)}")
        if self.shape and tuple(x.shape[1:]) != tuple(self.shape[1:]):
            raise ValueError(
                f"input shape changed between calibration batches: {self.first_shape} then {tuple(x.shape)}; "
                "calibrate with one input resolution"
            )
        if not self.shape:
            self.first_shape = tuple(x.shape)
        batch = int(x.shape[0])
        self.shape = (max(self.shape[0], batch) if self.shape else batch,) + tuple(x.shape[1:])
        grams = [gram64(x, m) if m > 0 or self.batch_spectrum else None for m in range(x.dim())]
        if self.keep_first_grams and self.first_grams is None:
            self.first_grams = grams
        if self.batch_spectrum:
            batch_eig = eigh_descending(grams[0])[0].cpu().numpy()
            width = max(self.batch_eig_sum.size, batch_eig.size)
            self.batch_eig_sum = (np.pad(self.batch_eig_sum, (0, width - self.batch_eig_sum.size))
                                  + np.pad(batch_eig, (0, width - batch_eig.size)))
        for m in range(1, x.dim()):
            self.gram_sums[m] = grams[m] if m not in self.gram_sums else self.gram_sums[m] + grams[m]
        self.samples += batch
        self.batches += 1
        self._eig.clear()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _check(self) -> None:
        if self.samples == 0:
            raise RuntimeError("no activations accumulated: the layer never ran during calibration")

    def mean_gram(self, mode: int) -> Tensor:
        """``Σ_batches A_(m) A_(m)ᵀ / N`` for a non-batch mode ``m ≥ 1``: ``(D_m, D_m)`` float64."""
        self._check()
        if mode == 0:
            raise ValueError("the batch mode has no mean Gram (its B×B Gram depends on the batching); "
                             "use eigenvalues(0)")
        return self.gram_sums[mode] / self.samples

    def eigh(self, mode: int) -> tuple[Tensor, Tensor]:
        """Eigenvalues (descending, ≥ 0) and eigenvectors of the mean Gram of mode ``m ≥ 1`` (float64)."""
        if mode not in self._eig:
            self._eig[mode] = eigh_descending(self.mean_gram(mode))
        return self._eig[mode]

    def eigenvalues(self, mode: int) -> np.ndarray:
        """The mode's mean spectrum ``(D_m,)`` float64 (batch mode: Σ per-batch eigenvalues / N, largest batch wide)."""
        self._check()
        if mode == 0:
            if not self.batch_spectrum:
                raise ValueError("this accumulator skipped the batch mode (batch_spectrum=False)")
            return self.batch_eig_sum / self.samples
        return self.eigh(mode)[0].cpu().numpy()

    def ranks_at(self, eps: float) -> tuple[int, ...]:
        """One rank per mode (batch first) at energy ``eps``, all by :func:`rank_for_energy`."""
        return tuple(rank_for_energy(self.eigenvalues(m), eps) for m in range(self.ndim))

    def factor(self, mode: int, rank: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The leading ``rank`` eigenvectors of mode ``m ≥ 1``'s mean Gram: ``(D_m, rank)``, contiguous."""
        return self.eigh(mode)[1][:, :rank].to(dtype).contiguous()


def leading_subspace(gram: Tensor, rank: int) -> Tensor:
    """Orthonormal ``(D, rank)`` basis of the leading eigenvectors of ``gram`` (a compact copy)."""
    return eigh_descending(gram)[1][:, :rank].contiguous()
