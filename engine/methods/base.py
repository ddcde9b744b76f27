"""What every activation-compression method implements: what to store in forward, how to get dW.

A method object belongs to exactly one :class:`engine.layers.CompressedLayer` (it may keep state in
that layer's buffers so that checkpoints carry it). Everything here runs on detached tensors under
``no_grad`` (the autograd Function's forward and backward already are).
"""
from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from engine import functional as Fn
from engine import spectra as S
from engine import tensor_ops as T
from engine.matmul import mm

if TYPE_CHECKING:  # pragma: no cover
    from engine.layers import CompressedLayer

Tensor = torch.Tensor


@dataclass
class Stash:
    """What a method keeps from forward to backward.

    tensors: saved with ``ctx.save_for_backward`` (measured by the saved-bytes meter).
    meta: plain Python values (which factors exist, ranks, FLOPs of the compression work, energy).
    """

    tensors: list[Tensor]
    meta: dict = field(default_factory=dict)


def stores_raw(compressed_bytes: int, raw_bytes: int) -> bool:
    """The one "never worse than raw" rule: a compressed form not smaller than the activation is not kept.

    ``compressed_bytes``: what the method would store (core + factors at the chosen ranks, batch factor
    included, at this batch size); ``raw_bytes``: the activation itself. ``True``: store the activation
    (exact gradient). A byte comparison from shapes and ranks, no trial compression.
    """
    return int(compressed_bytes) >= int(raw_bytes)


def stored_bytes(shape: Sequence[int], ranks: Sequence[int], element_bytes: int = 4) -> tuple[int, bool]:
    """``(bytes stored, raw?)`` for an activation of ``shape`` kept at Tucker ``ranks``: the Tucker bytes, or the
    raw activation's where that is not larger (:func:`stores_raw`)."""
    raw = math.prod(int(d) for d in shape) * int(element_bytes)
    tucker = Fn.tucker_bytes(shape, ranks, element_bytes)
    return (raw, True) if stores_raw(tucker, raw) else (tucker, False)


def raw_stash(x: Tensor) -> Stash:
    """The activation itself, for an exact gradient (``meta["stored"] == "raw"``)."""
    return Stash([x], {"ranks": list(x.shape), "flops_compress": 0, "stored": "raw"})


def exact_weight_grad(layer, x: Tensor, grad_output: Tensor) -> Tensor:
    """dW from the full input ``x`` (conv ``(B, C, H, W)`` or linear ``(B, …, F)``)."""
    if layer.kind == "conv":
        return layer.geometry.weight_grad(x, grad_output, layer.weight.shape, layer.geometry.groups, padded=False)
    out_features = grad_output.shape[-1]
    return mm(grad_output.reshape(-1, out_features).T, x.reshape(-1, x.shape[-1]))


class Method:
    """Base class. Subclasses set ``name`` and implement :meth:`compress` and :meth:`weight_grad`."""

    name = "base"
    exact_input_grad = True
    #: buffer names this method registers on its layer (resized when a checkpoint is loaded)
    state_names: tuple[str, ...] = ()

    def __init__(self, layer_name: str = "", seed: int = 0):
        self.layer_name = layer_name
        self.seed = seed

    def generator(self, device: torch.device) -> torch.Generator:
        """This layer's own random stream (never the global RNG), seeded from (seed, layer name)."""
        generators = self.__dict__.setdefault("_generators", {})
        key = str(device)
        if key not in generators:
            g = torch.Generator(device=device)
            g.manual_seed((self.seed * 1_000_003 + zlib.crc32(self.layer_name.encode())) % (2**63))
            generators[key] = g
        return generators[key]

    def step_generator(self, device: torch.device, step: int) -> torch.Generator:
        """The layer's generator re-seeded from (seed, layer name, step): a checkpoint that stores the step
        count resumes the same random stream, so a resumed run repeats the uninterrupted one exactly."""
        g = self.generator(device)
        g.manual_seed((self.seed * 1_000_003 + zlib.crc32(self.layer_name.encode()) + 7919 * int(step)) % (2**63))
        return g

    def setup(self, layer: "CompressedLayer") -> None:
        """Register state buffers on ``layer`` (called once, at surgery)."""

    def planned_ranks(self, layer: "CompressedLayer", shape: torch.Size) -> Sequence[int] | None:
        """The Tucker ranks :meth:`compress` would use for an input of ``shape``, when known before compressing
        (fixed ranks, calibrated factors); ``None`` otherwise. Lets the layer decide "raw" without compressing."""
        return None

    def compress(self, layer: "CompressedLayer", x: Tensor) -> Stash:
        raise NotImplementedError

    def weight_grad(self, layer: "CompressedLayer", tensors: Sequence[Tensor], meta: dict,
                    grad_output: Tensor) -> Tensor:
        raise NotImplementedError

    def constrain_weight_grad(self, layer: "CompressedLayer", grad_weight: Tensor, meta: dict) -> Tensor:
        """Where the weight may move, applied to every weight gradient (raw stash included): unchanged here;
        projected off the protected subspace by :class:`engine.methods.protected.ProtectedLANCE`."""
        return grad_weight

    def raw_weight_grad(self, layer: "CompressedLayer", x: Tensor, grad_output: Tensor, meta: dict) -> Tensor:
        """dW from the kept input ``x`` itself (a raw stash), constrained by :meth:`constrain_weight_grad`."""
        grad_weight = exact_weight_grad(layer, x, grad_output).to(layer.weight.dtype)
        return self.constrain_weight_grad(layer, grad_weight, meta)

    def input_grad(self, layer: "CompressedLayer", tensors: Sequence[Tensor], meta: dict, grad_output: Tensor,
                   weight: Tensor, input_shape: torch.Size) -> Tensor:
        return layer.exact_input_grad(grad_output, weight, input_shape)

    def input_grad_flops(self, layer: "CompressedLayer", x: Tensor, out: Tensor, meta: dict) -> int:
        """FLOPs of :meth:`input_grad` for input ``x`` and output ``out``: the exact transposed op (2 · MACs)."""
        return 2 * layer.forward_macs(x, out)

    def describe(self) -> dict:
        return {"method": self.name}


# ---------------------------------------------------------------------------------------------
# Shared by the Tucker methods (HOSVD, ASI, LANCE)
# ---------------------------------------------------------------------------------------------


def tucker_stash(core: Tensor, factors: Sequence[Tensor | None], meta: dict) -> Stash:
    """Pack ``core`` + present factors; ``meta['factor_modes']`` records which modes have one."""
    present = [m for m, f in enumerate(factors) if f is not None]
    meta = dict(meta)
    meta["factor_modes"] = present
    meta["ndim"] = core.dim()
    tensors = [T.compact(core)] + [T.compact(factors[m]) for m in present]
    return Stash(tensors, meta)


def unpack_tucker(tensors: Sequence[Tensor], meta: dict) -> tuple[Tensor, list[Tensor | None]]:
    core = tensors[0]
    factors: list[Tensor | None] = [None] * meta["ndim"]
    for m, t in zip(meta["factor_modes"], tensors[1:]):
        factors[m] = t
    return core, factors


def tucker_weight_grad(layer: "CompressedLayer", tensors: Sequence[Tensor], meta: dict, grad_output: Tensor) -> Tensor:
    core, factors = unpack_tucker(tensors, meta)
    if layer.kind == "conv":
        return Fn.conv_weight_grad(core, factors, grad_output, layer.geometry, layer.weight.shape)
    return Fn.linear_weight_grad(core, factors, grad_output)


#: per-element cost of one mode-product pass, in units of rank (fitted to 1-thread CPU timings of all
#: six orders on the bench's conv shapes; the FLOP-only model (0) picks a 2× slower order on small layers)
PROJECTION_ELEMENT_COST = 100.0


def projection_order(shape: Sequence[int], ranks: dict[int, int]) -> list[int]:
    """Order of the modes to project one after another at the least cost.

    Projecting mode m costs ∝ (current size)·(r_m + c) and shrinks the tensor by r_m/D_m, where ``c``
    (:data:`PROJECTION_ELEMENT_COST`) is the per-element memory traffic of a pass in rank units: a
    product onto a small spatial mode (D = 6, r = 3) is memory-bound, so shrinking the channels first
    is faster even where the FLOPs say otherwise (measured on (32, 480, 6, 6): channels first 1.3 ms,
    spatial first 2.6-2.9 ms). With at most three modes the best order is found by enumeration.
    """
    modes = [m for m, r in ranks.items() if r < shape[m]]
    best, best_cost = modes, math.inf
    for perm in itertools.permutations(modes):
        size, cost = 1.0, 0.0
        for m in perm:
            cost += size * (ranks[m] + PROJECTION_ELEMENT_COST)
            size *= ranks[m] / shape[m]
        if cost < best_cost:
            best, best_cost = list(perm), cost
    return best


def spatial_pair_at(modes: Sequence[int], i: int, shape: Sequence[int]) -> bool:
    """Whether ``modes[i]`` and ``modes[i + 1]`` are a conv's two spatial modes (either order) on a map small
    enough to be handled together (:func:`engine.tensor_ops.pair_fits`)."""
    return (len(shape) == 4 and sorted(modes[i : i + 2]) == [2, 3]
            and T.pair_fits(int(shape[2]), int(shape[3])))


def project_modes(y: Tensor, factors: Sequence[Tensor | None], order: Sequence[int]) -> tuple[Tensor, int]:
    """Project ``y`` onto ``factors[m]`` for each mode ``m`` of ``order``, one after another → (tensor, FLOPs).

    The two spatial modes of a conv's small map, next to each other in ``order``, go together in one
    product (:func:`engine.tensor_ops.pair_product`): the same numbers to rounding, one pass, no copies.
    """
    flops, i, order = 0, 0, list(order)
    while i < len(order):
        mode = order[i]
        if spatial_pair_at(order, i, y.shape):
            flops += 2 * y.numel() * factors[2].shape[1] * factors[3].shape[1]
            y = T.pair_product(y, factors[2], factors[3])
            i += 2
            continue
        flops += 2 * y.numel() * factors[mode].shape[1]
        y = T.mode_product(y, factors[mode], mode)
        i += 1
    return y, flops


def contract_except(x: Tensor, y: Tensor, mode: int) -> Tensor:
    """``x_(m) y_(m)ᵀ``: x ``(…, D, …)``, y ``(…, r, …)`` (same other modes) → ``(D, r)``. 2·numel(x)·r FLOPs."""
    a = math.prod(x.shape[:mode])
    b = math.prod(x.shape[mode + 1 :])
    d, r = x.shape[mode], y.shape[mode]
    if a == 1:
        return mm(x.reshape(d, b), y.reshape(r, b).T)
    if b == 1:
        return mm(x.reshape(a, d).T, y.reshape(a, r))
    return torch.einsum("adb,arb->dr", x.reshape(a, d, b), y.reshape(a, r, b))


#: the batch factor comes from the exact ``B×B`` Gram (one compute-bound pass over ``y``, B²·n multiply-adds)
#: rather than the range finder (its n×k Gaussian draw and three memory-bound passes) up to this batch size,
#: and above it while the unfolding is at least GRAM_COLUMNS_PER_ROW·B columns wide. Measured on one thread,
#: r = 8 (``python3 docs/bench/tucker_routes.py``): (32, 47040) 3.7 → 1.0 ms, (64, 47040) 10.5 → 3.6 ms,
#: (128, 47040) 13.3 → 9.8 ms; (128, 5760) stays on the range finder (1.0 against 1.7 ms). Fewer columns than
#: rows (n < B) always take the small n×n Gram.
GRAM_MAX_BATCH = 64
GRAM_COLUMNS_PER_ROW = 256


def gram_route(batch: int, n: int) -> bool:
    """Whether :func:`batch_factor` takes the Gram route for a ``(batch, n)`` unfolding."""
    return batch <= GRAM_MAX_BATCH or n < batch or n >= GRAM_COLUMNS_PER_ROW * batch


def batch_factor(y: Tensor, rank: int, generator: torch.Generator | None = None,
                 oversample: int = 8, energy: list | None = None) -> tuple[Tensor | None, int]:
    """A batch factor derived in this step from ``y`` alone (no state, so any batch size works).

    y ``(B, …)`` → (``U_B (B, r)`` orthonormal, FLOPs). With ``M = y_(0)`` (B × n):

    - where :func:`gram_route` says so: the leading ``r`` eigenvectors of the Gram ``M Mᵀ``,
      i.e. the exact leading left singular vectors of ``M`` (no randomness); where ``n < B``, the same
      span from the smaller ``n×n`` Gram ``MᵀM`` (``orth(M V_r)``).
    - otherwise a randomized range finder with one power iteration: ``Q = orth(M Ω)``,
      ``Q = orth(M (Mᵀ Q))`` with ``k = r + oversample`` Gaussian columns from the layer's generator; with
      ``oversample > 0`` the leading ``r`` left singular vectors of ``Qᵀ M`` (from its k×k Gram) then pick
      the kept part.

    ``None`` when ``rank ≥ B``: the batch mode is kept whole (exact). ``energy`` (a list): on the Gram routes,
    ‖y‖² (the Gram's trace, a 0-d tensor) is appended to it, so that a caller needs no pass of its own.
    """
    batch = y.shape[0]
    if rank >= batch:
        return None, 0
    m = y.reshape(batch, -1)
    n = m.shape[1]
    k = min(rank + oversample, batch, n)
    if gram_route(batch, n):
        gram = mm(m.T, m) if n < batch else mm(m, m.T)
        if energy is not None:
            energy.append(gram.diagonal().sum())
        if n < batch:  # fewer columns than rows: the n×n Gram's eigenvectors V give the same span, M V_r
            _, vectors = S.eigh_descending(gram)
            u = T.orth(mm(m, vectors[:, :rank]))
            return u.contiguous(), 2 * batch * n * n + 9 * n**3 + 2 * batch * n * rank + 2 * batch * rank**2
        _, vectors = S.eigh_descending(gram)
        return vectors[:, :rank].contiguous(), 2 * batch * batch * n + 9 * batch**3
    omega = torch.randn(n, k, generator=generator, device=y.device, dtype=y.dtype)
    q = T.orth(mm(m, omega))
    q = T.orth(mm(m, mm(m.T, q)))
    flops = 2 * batch * n * k * 3 + 6 * batch * k * k
    if k == min(rank, n):
        return q.contiguous(), flops
    small = mm(q.T, m)  # (k, n)
    # the left singular vectors of ``small`` are the eigenvectors of its k×k Gram: 2-9× faster than an SVD of
    # (k, n) on CPU (k = 16: n = 540 0.35 → 0.08 ms, n = 5000 2.6 → 0.29 ms), same leading subspace
    _, u_small = S.eigh_descending(small @ small.T)
    flops += 2 * batch * n * k + 2 * k * k * n + 9 * k**3
    return (q @ u_small[:, : min(rank, k)]).contiguous(), flops


def energy_ratio(core: Tensor, x: Tensor, total: float | None = None) -> float:
    """‖core‖²/‖x‖²: the share of the activation's energy the orthonormal factors capture. ``total``: ‖x‖² when
    already known (the trace of a Gram of ``x``), saving a pass over the activation."""
    total = float(torch.linalg.vector_norm(x)) ** 2 if total is None else float(total)
    return float(torch.linalg.vector_norm(core)) ** 2 / total if total > 0 else 1.0


def effective_ranks(shape: Sequence[int], factors: Sequence[Tensor | None]) -> list[int]:
    return [int(shape[m]) if f is None else int(f.shape[1]) for m, f in enumerate(factors)]
