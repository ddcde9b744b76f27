"""The Tucker methods: HOSVD_ε (per-step energy ranks), ASI (fixed ranks, warm-started subspace
iteration) and LANCE (fixed factors from a one-shot calibration).

Modes follow the activation: conv ``(B, C, H, W)``; linear ``(B, F)``, ``(B, L, F)``, ``(B, H, W, F)``.
The non-batch modes have fixed sizes, so their factors can be kept across steps (ASI's warm state,
LANCE's calibrated subspace). The batch mode is handled the same way by all three for any batch size:
its factor is derived in every step from the tensor already projected in the other modes (a Gram of
at most ``B×B`` on a tensor that is ``Π D_m/r_m`` times smaller than the activation); a batch rank at or
above the batch size keeps the batch mode whole (exact).
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine import functional as Fn
from engine import spectra as S
from engine import tensor_ops as T
from engine.matmul import mm
from engine.methods.base import (
    Method,
    Stash,
    batch_factor,
    contract_except,
    effective_ranks,
    energy_ratio,
    project_modes,
    projection_order,
    spatial_pair_at,
    tucker_stash,
    tucker_weight_grad,
)

Tensor = torch.Tensor

#: a batch mode of at most this many rows per rank is cheap to handle through its B×B Gram on the whole
#: activation: ASI then iterates it through the Gram, LANCE may project it first (above it, batch 128 at
#: r_B = 8, that Gram costs more than the other modes' projections)
BATCH_GRAM_ROWS_PER_RANK = 8


def _check_ranks(layer_name: str, ranks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    if len(ranks) != len(shape):
        raise ValueError(
            f"layer {layer_name!r}: {len(ranks)} ranks given for an activation of shape {tuple(shape)} "
            f"({len(shape)} modes, batch first); give one rank per mode"
        )
    if any(int(r) < 1 for r in ranks):
        raise ValueError(f"layer {layer_name!r}: ranks must be positive integers, got {tuple(ranks)}")
    return tuple(min(int(r), int(d)) for r, d in zip(ranks, shape))


def _check_eps(eps: float, method: str) -> float:
    eps = float(eps)
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"{method}: energy threshold eps must be in (0, 1], got {eps}")
    return eps


class _TuckerMethod(Method):
    def weight_grad(self, layer, tensors, meta, grad_output):
        return tucker_weight_grad(layer, tensors, meta, grad_output)

    @staticmethod
    def _finish(x: Tensor, y: Tensor, factors: list, batch_rank: int | None, flops: int, track_energy: bool,
                generator: torch.Generator | None = None, total_energy: Tensor | None = None) -> Stash:
        """Project the batch mode of the partly projected ``y`` (unless done: ``batch_rank=None``) and pack."""
        batch_flops = 0
        if batch_rank is not None:
            u_batch, batch_flops = batch_factor(y, batch_rank, generator)
            if u_batch is not None:
                y = T.mode_product(y, u_batch, 0)
                batch_flops += 2 * y.numel() * x.shape[0]
            factors[0] = u_batch
        meta = {
            "ranks": effective_ranks(x.shape, factors),
            "flops_compress": int(flops + batch_flops),
        }
        if track_energy:
            meta["captured_energy"] = energy_ratio(y, x, total_energy)
        return tucker_stash(y, factors, meta)


class HOSVD(_TuckerMethod):
    """HOSVD_ε: every step, every mode's Gram is eigendecomposed and truncated at energy ε."""

    name = "hosvd"

    def __init__(self, layer_name: str = "", seed: int = 0, eps: float = 0.8, track_energy: bool = True):
        super().__init__(layer_name, seed)
        self.eps = _check_eps(eps, "hosvd")
        self.track_energy = track_energy

    def describe(self) -> dict:
        return {"method": self.name, "eps": self.eps}

    def compress(self, layer, x: Tensor) -> Stash:
        shape = x.shape
        factors: list[Tensor | None] = [None] * x.dim()
        flops = 0
        ranks = {}
        for mode in range(x.dim()):
            d = shape[mode]
            other = x.numel() // d
            if d > other:  # a wide mode (a linear layer's features): the small Gram of the other side
                r, factor, f = self._wide_mode_factor(x, mode)
            else:
                values, vectors = S.eigh_descending(T.mode_gram(x, mode))
                f = 2 * x.numel() * d + 9 * d**3
                r = S.rank_for_energy(values, self.eps)
                factor = vectors[:, :r].contiguous() if r < d else None
            flops += f
            ranks[mode] = r
            factors[mode] = factor
        y, f = project_modes(x, factors, projection_order(shape, {m: r for m, r in ranks.items() if m > 0}))
        flops += f
        if factors[0] is not None:
            flops += 2 * y.numel() * ranks[0]
            y = T.mode_product(y, factors[0], 0)
        meta = {"ranks": effective_ranks(shape, factors), "flops_compress": int(flops)}
        if self.track_energy:
            meta["captured_energy"] = energy_ratio(y, x)
        return tucker_stash(y, factors, meta)


    def _wide_mode_factor(self, x: Tensor, mode: int) -> tuple[int, Tensor | None, int]:
        """(rank, factor (D, r) or None, FLOPs) of a mode whose size D exceeds n = numel/D.

        ``M = x_(m)`` (D × n) has the same nonzero spectrum as the n × n Gram ``MᵀM``; its leading left
        singular vectors span ``M V_r`` (V_r: the Gram's leading eigenvectors), orthonormalised by a thin QR.
        Costs 2·numel·n + 9n³ + 2·numel·r + 2·D·r² instead of 2·numel·D + 9D³ (a 1280-feature classifier
        at batch 32: 40× fewer FLOPs); same subspace, same energy rank.
        """
        d = x.shape[mode]
        m = T.unfold(x, mode)  # (D, n)
        n = m.shape[1]
        values, vectors = S.eigh_descending(mm(m.T, m))
        values = torch.cat([values, values.new_zeros(d - n)])  # the D − n zero eigenvalues of M Mᵀ
        r = S.rank_for_energy(values, self.eps)
        flops = 2 * x.numel() * n + 9 * n**3
        if r >= d:
            return d, None, flops
        if r > n:  # cannot happen for eps <= 1 (rank <= n nonzero values), kept exact anyway
            return self._full_gram_factor(x, mode, r) + (flops,)
        factor = T.orth(mm(m, vectors[:, :r]))
        return r, factor.contiguous(), flops + 2 * x.numel() * r + 2 * d * r * r

    @staticmethod
    def _full_gram_factor(x: Tensor, mode: int, r: int) -> tuple[int, Tensor]:
        _, vectors = S.eigh_descending(T.mode_gram(x, mode))
        return r, vectors[:, :r].contiguous()


class ASI(_TuckerMethod):
    """ASI: fixed per-mode ranks; each step one warm-started subspace-iteration step per mode.

    Every mode's factor is ``U = orth(A_(m) (A_(m)ᵀ U_prev))`` from the previous step's ``U_prev``
    (cold start ``orth(A_(m) Ω)``, Gaussian ``Ω`` from the layer's own generator). Warm factors live in
    the layer's buffers ``asi_factor_<mode>`` (checkpointed). ``sequential=True`` (default) projects each
    mode as soon as its factor is known, the other modes in the cheapest order. The batch mode goes first
    (warm subspace iteration on a plain row-major product) only where that at least halves the work
    (wide layers at small r_B); otherwise it goes last and its factor is derived per step from the
    shrunk tensor (randomized SVD), which is more accurate because batch samples do not carry over from
    one step to the next. ``False`` iterates every mode on the full activation. A batch-first factor
    cold-starts whenever the batch size changes (a smaller last batch); ``r_B ≥ B`` keeps it whole.
    """

    name = "asi"
    #: the batch mode's iteration goes through its Gram up to this many rows per rank (:meth:`_iterate`)
    GRAM_ROWS_PER_RANK = BATCH_GRAM_ROWS_PER_RANK
    state_names = ("asi_factor_0", "asi_factor_1", "asi_factor_2", "asi_factor_3", "asi_steps")

    def __init__(self, layer_name: str = "", seed: int = 0, ranks: Sequence[int] | None = None,
                 sequential: bool = True, track_energy: bool = True):
        super().__init__(layer_name, seed)
        self.ranks = tuple(int(r) for r in ranks) if ranks is not None else None
        self.sequential = bool(sequential)
        self.track_energy = track_energy

    def describe(self) -> dict:
        return {"method": self.name, "ranks": list(self.ranks) if self.ranks else "default",
                "sequential": self.sequential}

    def setup(self, layer) -> None:
        for mode in (0, 1, 2, 3):
            layer.register_buffer(f"asi_factor_{mode}", None)
        layer.register_buffer("asi_steps", torch.zeros((), dtype=torch.long, device=layer.weight.device))

    def resolve_ranks(self, layer, shape: Sequence[int]) -> tuple[int, ...]:
        ranks = self.ranks if self.ranks is not None else Fn.default_asi_ranks(shape, layer.kind)
        return _check_ranks(self.layer_name, ranks, shape)

    def planned_ranks(self, layer, shape):
        return self.resolve_ranks(layer, shape)

    def _from_gram(self, layer, gram: Tensor, mode: int, rank: int) -> Tensor:
        """ASI's step for ``mode`` from its Gram ``G = A_(m) A_(m)ᵀ (D, D)``: warm ``orth(G U_prev)`` (the same
        iteration as ``orth(A (Aᵀ U_prev))``), cold the Gram's leading eigenvectors (exact). → ``(D, r)``."""
        d = gram.shape[0]
        prev = layer._buffers.get(f"asi_factor_{mode}")
        if prev is not None and tuple(prev.shape) == (d, rank):
            u = T.orth(gram @ prev.to(dtype=gram.dtype, device=gram.device))
        else:
            u = S.eigh_descending(gram)[1][:, :rank].contiguous()
        layer._buffers[f"asi_factor_{mode}"] = u
        return u

    def _iterate(self, layer, source: Tensor, mode: int, rank: int, generator: torch.Generator,
                 energy: list | None = None) -> tuple[Tensor, int]:
        """One subspace-iteration step for ``mode`` of ``source``: ``(D_m, r)`` factor, FLOPs.

        The leading mode of a tensor (the batch mode, batch first) with ``D ≤ GRAM_ROWS_PER_RANK · r`` goes
        through its ``D×D`` Gram (:meth:`_from_gram`): one pass over ``A`` instead of two.
        """
        d = source.shape[mode]
        if mode == 0 and d <= self.GRAM_ROWS_PER_RANK * rank:
            a = source.reshape(d, -1)
            gram = mm(a, a.T)
            if energy is not None:  # ‖source‖², the Gram's trace (as engine.methods.base.batch_factor gives it)
                energy.append(gram.diagonal().sum())
            u = self._from_gram(layer, gram, mode, rank)
            return u, 2 * source.numel() * d + 2 * d * d * rank + 2 * d * rank * rank
        prev = layer._buffers.get(f"asi_factor_{mode}")
        if prev is None or tuple(prev.shape) != (d, rank):
            sketch_shape = list(source.shape)
            sketch_shape[mode] = rank
            probe = torch.randn(sketch_shape, generator=generator, device=source.device,
                                dtype=source.dtype)
            flops = 0
        else:
            probe = T.mode_product(source, prev.to(dtype=source.dtype, device=source.device), mode)
            flops = 2 * source.numel() * rank
        u = T.orth(contract_except(source, probe, mode))
        layer._buffers[f"asi_factor_{mode}"] = u
        return u, flops + 2 * source.numel() * rank + 2 * d * rank * rank

    def _iterate_pair(self, layer, y: Tensor, first: int, second: int, ranks) -> tuple[Tensor, int]:
        """Both spatial modes of a small map in one pass: their joint Gram gives the first mode's Gram and,
        after projecting it, the second's (:func:`engine.tensor_ops.pair_mode_gram`); the same two sequential
        iterations. y ``(…, H, W)`` → (y projected on both, FLOPs)."""
        gram4 = T.pair_gram(y)
        u_first = self._from_gram(layer, T.pair_mode_gram(gram4, first - 2), first, ranks[first])
        u_second = self._from_gram(layer, T.pair_mode_gram(gram4, second - 2, u_first), second, ranks[second])
        factors = {first: u_first, second: u_second}
        positions = y.shape[-1] * y.shape[-2]
        flops = 2 * y.numel() * positions + 2 * y.numel() * ranks[2] * ranks[3] + 4 * positions**2 * max(y.shape[-2:])
        return T.pair_product(y, factors[2], factors[3]), flops

    def compress(self, layer, x: Tensor) -> Stash:
        shape = x.shape
        ranks = self.resolve_ranks(layer, shape)
        factors: list[Tensor | None] = [None] * x.dim()
        y, flops = x, 0
        generator = self.step_generator(x.device, int(layer.asi_steps))
        order = projection_order(shape, {m: ranks[m] for m in range(1, x.dim())})
        batch_first = ranks[0] < shape[0] and (not self.sequential or self._batch_first_is_cheaper(shape, ranks, order))
        modes = ([0] if batch_first else []) + order
        energy: list = []  # ‖x‖² from the batch Gram's trace, where the batch mode is iterated on x itself
        i = 0
        while i < len(modes):
            mode = modes[i]
            if self.sequential and spatial_pair_at(modes, i, shape):
                y, f = self._iterate_pair(layer, y, mode, modes[i + 1], ranks)
                factors[2], factors[3] = layer._buffers["asi_factor_2"], layer._buffers["asi_factor_3"]
                flops += f
                i += 2
                continue
            source = y if self.sequential else x
            u, f = self._iterate(layer, source, mode, ranks[mode], generator, energy if source is x else None)
            factors[mode] = u
            flops += f
            if self.sequential:
                flops += 2 * y.numel() * ranks[mode]
                y = T.mode_product(y, u, mode)
            i += 1
        if not self.sequential:
            y, f = project_modes(y, factors, modes)
            flops += f
        # Batch mode last (narrow layers or large r_B): derived exactly enough from the small tensor.
        batch_rank = None if batch_first else ranks[0]
        layer.asi_steps += 1
        return self._finish(x, y, factors, batch_rank, flops, self.track_energy, generator,
                            energy[0] if energy else None)

    @staticmethod
    def _batch_first_is_cheaper(shape, ranks, order) -> bool:
        """Subspace iteration costs ≈ 3 passes of rank r over the tensor it runs on: compare doing the batch
        mode first (then the other modes on B/r_B less data) with doing it last on the shrunk tensor."""
        def modes_cost(size: float) -> float:
            cost = 0.0
            for mode in order:
                cost += 3 * size * ranks[mode]
                size *= ranks[mode] / shape[mode]
            return cost

        numel = float(torch.Size(shape).numel())
        return 3 * numel * ranks[0] + modes_cost(numel * ranks[0] / shape[0]) < 0.5 * modes_cost(numel)


class LANCE(_TuckerMethod):
    """LANCE: factors of the non-batch modes fixed by a one-shot calibration; training only projects.

    Calibration (:func:`engine.methods.calibration.calibrate_layers`) accumulates each mode's Gram as a
    true mean over every calibration sample (:class:`engine.spectra.GramAccumulator`) and keeps the rank
    reaching energy ``eps`` by :func:`engine.spectra.rank_for_energy` (or fixed ``ranks``); the batch
    rank is the rank of the mean batch-mode spectrum, as ``lance calibrate`` reports it.
    ``batch_mode='factor'`` (default) derives a batch factor of the calibrated batch rank per
    step from the already projected tensor; ``'keep'`` leaves the batch mode whole.
    """

    name = "lance"
    state_names = ("lance_factor_1", "lance_factor_2", "lance_factor_3", "lance_batch_rank", "lance_calibrated",
                   "lance_steps")

    def __init__(self, layer_name: str = "", seed: int = 0, eps: float = 0.95, ranks: Sequence[int] | None = None,
                 batch_mode: str = "factor", track_energy: bool = True):
        super().__init__(layer_name, seed)
        self.eps = _check_eps(eps, "lance")
        self.ranks = tuple(int(r) for r in ranks) if ranks is not None else None
        if batch_mode not in ("factor", "keep"):
            raise ValueError(f"lance batch_mode must be 'factor' or 'keep', got {batch_mode!r}")
        self.batch_mode = batch_mode
        self.track_energy = track_energy

    def describe(self) -> dict:
        return {"method": self.name, "eps": self.eps, "ranks": list(self.ranks) if self.ranks else None,
                "batch_mode": self.batch_mode}

    def setup(self, layer) -> None:
        for mode in (1, 2, 3):
            layer.register_buffer(f"lance_factor_{mode}", None)
        layer.register_buffer("lance_batch_rank", torch.zeros((), dtype=torch.long, device=layer.weight.device))
        layer.register_buffer("lance_calibrated", None)
        layer.register_buffer("lance_steps", torch.zeros((), dtype=torch.long, device=layer.weight.device))

    def set_calibration(self, layer, calibration) -> None:
        """Fix the factors from a :class:`engine.spectra.GramAccumulator`."""
        shape = calibration.shape
        if self.ranks is not None:
            ranks = _check_ranks(self.layer_name, self.ranks, shape)
        else:
            ranks = calibration.ranks_at(self.eps)
        for mode in range(1, len(shape)):
            layer._buffers[f"lance_factor_{mode}"] = (
                None if ranks[mode] >= shape[mode] else calibration.factor(mode, ranks[mode])
            )
        layer.lance_batch_rank.fill_(int(ranks[0]))
        layer._buffers["lance_calibrated"] = torch.ones((), dtype=torch.bool, device=layer.weight.device)

    def planned_ranks(self, layer, shape):
        if layer._buffers.get("lance_calibrated") is None:
            return None  # compress raises the clear error
        ranks = [min(int(layer.lance_batch_rank), shape[0]) if self.batch_mode == "factor" else shape[0]]
        for mode in range(1, len(shape)):
            f = layer._buffers.get(f"lance_factor_{mode}")
            if f is not None and f.shape[0] != shape[mode]:
                return None  # another resolution: compress raises the clear error
            ranks.append(shape[mode] if f is None else int(f.shape[1]))
        return ranks

    def compress(self, layer, x: Tensor) -> Stash:
        if layer._buffers.get("lance_calibrated") is None:
            raise RuntimeError(
                f"LANCE layer {self.layer_name!r} has no calibrated subspace: pass calibration_loader= "
                "to engine.compress_model (or call engine.methods.calibration.calibrate_layers first)"
            )
        factors: list[Tensor | None] = [None] * x.dim()
        ranks = {}
        for mode in range(1, x.dim()):
            f = layer._buffers.get(f"lance_factor_{mode}")
            if f is not None:
                if f.shape[0] != x.shape[mode]:
                    raise ValueError(
                        f"LANCE layer {self.layer_name!r}: calibrated for mode {mode} of size {f.shape[0]}, "
                        f"got an input of shape {tuple(x.shape)}; recalibrate at this resolution"
                    )
                factors[mode] = f
                ranks[mode] = f.shape[1]
        batch_rank = int(layer.lance_batch_rank) if self.batch_mode == "factor" else x.shape[0]
        generator = self.step_generator(x.device, int(layer.lance_steps))
        layer.lance_steps += 1
        order = projection_order(x.shape, ranks)
        y, flops = x, 0
        energy: list = []  # ‖x‖² from the batch Gram's trace, where the batch mode goes first
        # batch first only while its Gram is small (B ≤ BATCH_GRAM_ROWS_PER_RANK·r_B): at batch 128, r_B = 8 the
        # (128, 128) Gram of the whole activation costs more than the fixed modes' projections (interleaved,
        # 1 thread: MobileNetV2's features.17 36.5 vs 40.9 ms, ResNet-18's layer4.0.downsample 66.9 vs 72.2 ms)
        if (batch_rank < x.shape[0] <= BATCH_GRAM_ROWS_PER_RANK * batch_rank
                and self._batch_first_is_cheaper(x.shape, ranks, order, batch_rank)):
            # Wide layers: the batch factor of the full activation (its Gram, engine.methods.base.batch_factor)
            # costs less than projecting the fixed channel factor first; the fixed modes then act on B/r_B
            # less data.
            u_batch, flops = batch_factor(x, batch_rank, generator, oversample=0, energy=energy)
            y = T.mode_product(x, u_batch, 0)
            flops += 2 * x.numel() * batch_rank
            factors[0] = u_batch
            batch_rank = None
        y, f = project_modes(y, factors, order)
        return self._finish(x, y, factors, batch_rank, flops + f, self.track_energy, generator,
                            energy[0] if energy else None)

    @staticmethod
    def _batch_first_is_cheaper(shape, ranks: dict, order: list, batch_rank: int) -> bool:
        def modes_cost(size: float) -> float:
            cost = 0.0
            for mode in order:
                cost += size * ranks[mode]
                size *= ranks[mode] / shape[mode]
            return cost

        numel = float(torch.Size(shape).numel())
        batch_first = 4 * numel * batch_rank + modes_cost(numel * batch_rank / shape[0])
        return batch_first < modes_cost(numel)
