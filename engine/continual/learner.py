"""One continual learner: LANCE (orthogonal compressed subspaces), GPM, or plain fine-tuning.

The model is any multi-head network with ``forward(x, task)`` and a ``heads`` container (one classifier
per task). :func:`prepare_model` swaps every ``nn.Conv2d``/``nn.Linear`` for the engine's one compressed
layer (:class:`engine.layers.CompressedLayer`, sharing its Parameters) running the protected method
(:class:`engine.methods.protected.ProtectedLANCE`); head layers are marked unprotected. The method holds
the protected basis and the calibrated factors as layer buffers and applies each method's rule in backward.

Rules that keep old tasks' outputs fixed (``lance`` and ``gpm``, tasks ``t >= 1``):

* protected conv/linear weights move only orthogonally to ``span(P)`` (GPM: gradient projected in
  backward; LANCE: the compressed gradient already lies in ``span(U_F)``, ``U_F ⊥ P``);
* every other shared parameter — conv/linear biases, BatchNorm affine parameters — trains in task 0
  only, and BatchNorm layers are switched to eval mode (running statistics frozen) after task 0;
* old heads never receive a gradient (the loss only involves head ``t``).

``finetune`` trains everything, BatchNorm in train mode, every task.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn as nn

from engine.data.feature_cache import use_channels_last
from engine.layers import CompressedLayer
from engine.methods.protected import ProtectedLANCE, feature_rows, project_patches
from engine.spectra import GramAccumulator

from .basis import extend_basis, plain_factor, residual_factor

METHODS = ("lance", "gpm", "finetune")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class ContinualConfig:
    """Hyper-parameters of one continual-learning run (all methods share the training ones)."""

    method: str = "lance"
    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.0
    batch_size: int = 64
    eps: float = 0.3                  # LANCE: energy of the residual (I - P Pᵀ)A kept by U_F (protected layers, t >= 1)
    eps_plain: float | None = 0.9     # LANCE: energy for factors of raw activations (task 0, heads); None = eps
    spatial_eps: float | None = 0.5   # LANCE: energy for a conv's output rows/cols (t >= 1); None = uncompressed
    eps_cl: float = 0.97              # GPM rule: eps_cl(t) = eps_cl + t * eps_cl_step
    eps_cl_step: float = 0.0
    calibration_batches: int = 4      # LANCE: batches of task t used to calibrate its factors
    calibration_batch_size: int = 64  # LANCE: their size, independent of the training batch size (ranks of
                                      # fc layers and heads are capped by the number of calibration images)
    basis_samples: int = 125          # examples of task t whose activations extend P (GPM uses 125)
    compress_first_task: bool = True  # LANCE: task 0 trained compressed too (else full activations)
    eval_batch_size: int = 256        # test batches (a fixed seeded shuffle: batch-statistics BN sees mixed classes)
    recalibrate_every: int = 0        # LANCE: re-fit the factors every N epochs within a task (0 = once, before it)
    pack: bool = True                 # lossless packing of ReLU/dropout/max-pool saves (engine.packing); BN with
                                      # batch statistics keeps its input
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown continual method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.eps_plain is not None and not 0.0 < self.eps_plain <= 1.0:
            raise ValueError(f"eps_plain must be in (0, 1] or None, got {self.eps_plain}")
        for name in ("eps", "eps_cl"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.spatial_eps is not None and not 0.0 < self.spatial_eps <= 1.0:
            raise ValueError(f"spatial_eps must be in (0, 1] or None, got {self.spatial_eps}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be >= 1")
        if self.recalibrate_every < 0:
            raise ValueError(f"recalibrate_every must be >= 0 epochs (0 = calibrate once per task), "
                             f"got {self.recalibrate_every}")

    def eps_cl_at(self, task: int) -> float:
        return min(1.0, self.eps_cl + task * self.eps_cl_step)

    def eps_for(self, task: int, protected: bool) -> tuple[float, float | None]:
        """LANCE's (feature, spatial) energies for one layer in ``task``.

        A layer with nothing protected yet (every layer in task 0, every head) is calibrated on its raw,
        uncentred activations, whose spectrum is dominated by a few directions (the mean): it gets the
        higher ``eps_plain`` for both modes. A protected layer in a later task is calibrated on the
        residual ``(I − P Pᵀ) A``, whose spectrum is flat: ``eps`` (feature) and ``spatial_eps``.
        """
        if (task == 0 or not protected) and self.eps_plain is not None:
            return self.eps_plain, (None if self.spatial_eps is None else self.eps_plain)
        return self.eps, self.spatial_eps

    def to_dict(self) -> dict:
        return asdict(self)


def _head_module_names(model: nn.Module) -> set[str]:
    heads = getattr(model, "heads", None)
    if heads is None:
        raise ValueError("a continual-learning model needs a `heads` attribute (one classifier per task) "
                         "and forward(x, task); build it with engine.models.build_multihead")
    names = set()
    for name, _ in model.named_modules():
        if name == "heads" or name.startswith("heads."):
            names.add(name)
    return names


def prepare_model(model: nn.Module) -> dict[str, CompressedLayer]:
    """Swap every conv/linear for a :class:`CompressedLayer` running :class:`ProtectedLANCE`, in place;
    returns ``{name: layer}`` in definition order (heads unprotected)."""
    heads = _head_module_names(model)
    layers: dict[str, CompressedLayer] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, CompressedLayer):
            if not isinstance(module.method, ProtectedLANCE):
                raise ValueError(f"{name} is compressed with {module.method.name!r}; continual learning needs "
                                 "a plain model (it compresses every conv/linear itself)")
            layers[name] = module
            continue
        if type(module) is nn.Conv2d:
            if module.groups != 1:
                raise ValueError(f"continual-learning layers support groups=1 convs only, got groups={module.groups} "
                                 f"at {name}")
        elif type(module) is not nn.Linear:
            continue
        new = CompressedLayer(module, ProtectedLANCE(name, protected=name not in heads), name=name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        layers[name] = new
    if not any(layer.method.protected for layer in layers.values()):
        raise ValueError("the model has no conv/linear layer outside its heads: nothing to learn continually")
    return layers


def eval_layout(x: torch.Tensor) -> torch.Tensor:
    """A CPU image batch ``(B, C, H, W)`` in channels_last for evaluation: oneDNN's convolutions and ATen's
    BatchNorm, ReLU and max-pool run on NHWC without layout reorders, 124.7 → 89.9 ms for an alexnet-cl test
    batch of 256 on one thread, 379 → 262 ms for resnet18-reduced (``docs/bench/eval_layout.json``). The
    logits equal the NCHW ones to float rounding (summation order). Training keeps NCHW: the packed ops and
    the compressed layers' products are built for it (channels_last steps measured 25-40 % slower).
    ``LANCE_CHANNELS_LAST=0`` keeps NCHW (:func:`engine.data.feature_cache.use_channels_last`)."""
    if x.dim() == 4 and x.shape[1] > 1 and use_channels_last(x.device):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _inputs(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class _FeatureGrams:
    """Forward hooks that accumulate each layer's feature Gram (float64, ``(D, D)``) in an
    :class:`engine.spectra.GramAccumulator` (the mean ``Σ x xᵀ / N`` over feature rows; ranks and bases
    depend only on its spectrum's shape)."""

    def __init__(self, layers: dict[str, CompressedLayer], dtype: torch.dtype = torch.float64):
        self.layers = layers
        self.dtype = dtype  # of the per-batch product; the sum is kept in float64
        self.grams: dict[str, GramAccumulator] = {}
        self.rows: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}  # (input elements per sample, output shape per sample)
        self._kept: dict[str, list[torch.Tensor]] = {}  # the rows themselves while there are fewer than D
        self._handles = []

    def __enter__(self) -> "_FeatureGrams":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, args, output):
            self.shapes[name] = (args[0][0].numel(), tuple(output.shape[1:]))
            feats = feature_rows(module, args[0].detach()).to(self.dtype)  # (N, D)
            n_rows = self.rows.get(name, 0) + feats.shape[0]
            self.rows[name] = n_rows
            if n_rows <= feats.shape[1] and name not in self.grams:
                self._kept.setdefault(name, []).append(feats.cpu())
                return
            if name in self._kept:  # switch to the Gram
                feats = torch.cat([*self._kept.pop(name), feats.cpu()])
            self.grams.setdefault(name, GramAccumulator(batch_spectrum=False)).update(feats)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def names(self) -> list[str]:
        return [*self.grams, *self._kept]

    def spectrum_input(self, name: str) -> dict:
        """``{"gram": (D, D)}`` or, while there are fewer rows than features, ``{"rows": (N, D)}``."""
        if name in self.grams:
            return {"gram": self.grams[name].mean_gram(1).cpu(), "rows": None}
        return {"gram": None, "rows": torch.cat(self._kept[name])}


class _SpatialGrams:
    """Forward hooks on convs: mode-H and mode-W mean Grams (:class:`engine.spectra.GramAccumulator`) of the
    feature-projected patches ``(B, r, H', W')``: ``h[name]`` ``(H', H')``, ``w[name]`` ``(W', W')``."""

    def __init__(self, layers: dict[str, CompressedLayer]):
        self.layers = layers
        self.accs: dict[str, GramAccumulator] = {}
        self._handles = []

    def __enter__(self) -> "_SpatialGrams":
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, args, output):
            core = project_patches(module, args[0].detach(), module.u_feat).double()
            self.accs.setdefault(name, GramAccumulator(batch_spectrum=False)).update(core)
        return hook

    @property
    def h(self) -> dict[str, torch.Tensor]:
        return {name: acc.mean_gram(2) for name, acc in self.accs.items()}

    @property
    def w(self) -> dict[str, torch.Tensor]:
        return {name: acc.mean_gram(3) for name, acc in self.accs.items()}

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ContinualLearner:
    """Holds a prepared multi-head model and applies one method's rules task after task."""

    def __init__(self, model: nn.Module, config: ContinualConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.layers = prepare_model(self.model)
        self.model.to(self.device)

    # ---- which parameters train -------------------------------------------------------------
    @property
    def protects(self) -> bool:
        return self.config.method in ("lance", "gpm")

    def _is_head_param(self, name: str, task: int) -> bool:
        return name.startswith(f"heads.{task}.")

    def configure_task(self, task: int) -> list[nn.Parameter]:
        """Set ``requires_grad``, BatchNorm modes and each layer's method mode for training ``task``; returns
        the trainable parameters."""
        model = self.model
        trainable = []
        protected_weights = {id(l.weight) for l in self.layers.values() if l.method.protected}
        for name, p in model.named_parameters():
            if name.startswith("heads."):
                train = self._is_head_param(name, task)
            elif not self.protects or task == 0:
                train = True
            else:
                train = id(p) in protected_weights
            p.requires_grad_(train)
            if train:
                trainable.append(p)
        compress = self.config.method == "lance" and (task > 0 or self.config.compress_first_task)
        for layer in self.layers.values():
            layer.method.mode = "lance" if compress else "full"
            layer.method.project = self.config.method == "gpm"  # GPM: dW - dW P Pᵀ in backward
        return trainable

    def train_mode(self, task: int) -> None:
        self.model.train()
        if self.protects and task > 0:
            for m in self.model.modules():
                if isinstance(m, _BN):
                    m.eval()

    # ---- LANCE calibration (before a task) ----------------------------------------------------
    @torch.no_grad()
    def calibrate(self, task: int, batches: Iterable) -> dict[str, tuple[int, ...]]:
        """Fit ``U_F ⊥ P`` (and spatial factors) for every layer used by ``task``; returns ranks."""
        cfg = self.config
        if cfg.method != "lance" or (task == 0 and not cfg.compress_first_task):
            return {}
        batches = list(batches)
        if not batches:
            raise ValueError(f"no calibration batches for task {task}: the task's training set is empty")
        was_training = self.model.training
        bn_state = self._forward_as_in_training(task)
        # float32 products suffice here: U_F is re-orthogonalised against P in float64 afterwards
        with _FeatureGrams(self.layers, dtype=torch.float32) as grams:
            for batch in batches:
                self.model(_inputs(batch).to(self.device), task)
        for name in grams.names():
            layer = self.layers[name]
            protected = layer.method.protected
            basis = layer.protected_basis.cpu() if protected else None
            data = grams.spectrum_input(name)
            ProtectedLANCE.set_factors(layer, residual_factor(data["gram"], basis, cfg.eps_for(task, protected)[0],
                                                              rows=data["rows"]))
        convs = {n: l for n, l in self.layers.items() if l.kind == "conv" and n in grams.names()}
        if cfg.spatial_eps is not None and convs:
            with _SpatialGrams({n: l for n, l in convs.items() if l.u_feat.shape[1] > 0}) as spatial:
                for batch in batches:
                    self.model(_inputs(batch).to(self.device), task)
            for name, layer in convs.items():
                if name in spatial.h:
                    eps_spatial = cfg.eps_for(task, layer.method.protected)[1]
                    ProtectedLANCE.set_factors(layer, layer.u_feat, plain_factor(spatial.h[name].cpu(), eps_spatial),
                                               plain_factor(spatial.w[name].cpu(), eps_spatial))
        # never worse than the input: each training step the method keeps the input instead of core + factors
        # where those would not be smaller at that batch size, and restricts the gradient to span(U_F)
        self._restore_bn(bn_state)
        self.model.train(was_training)
        return {n: ProtectedLANCE.ranks(self.layers[n]) for n in grams.names()}

    def _forward_as_in_training(self, task: int) -> dict:
        """Put the model in the mode ``task`` trains in (BatchNorm as in training, dropout off).

        Calibration must see the activations training will see; train-mode BatchNorm would update its
        running statistics, so they are saved here and put back by :meth:`_restore_bn`.
        """
        self.train_mode(task)
        saved = {}
        for name, m in self.model.named_modules():
            if isinstance(m, nn.Dropout) or "Dropout" in type(m).__name__:
                m.eval()
            if isinstance(m, _BN) and m.training:
                saved[name] = {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None}
        return saved

    def _restore_bn(self, saved: dict) -> None:
        for name, buffers in saved.items():
            m = self.model.get_submodule(name)
            for k, v in buffers.items():
                getattr(m, k).copy_(v)

    # ---- protected basis (after a task) --------------------------------------------------------
    @torch.no_grad()
    def extend_bases(self, task: int, batches: Iterable) -> dict[str, dict]:
        """Extend every protected layer's basis with ``task``'s activations (GPM's energy rule)."""
        if not self.protects:
            return {}
        was_training = self.model.training
        self.model.eval()
        protected = {n: l for n, l in self.layers.items() if l.method.protected}
        with _FeatureGrams(protected) as grams:
            for batch in batches:
                self.model(_inputs(batch).to(self.device), task)
        info = {}
        eps_cl = self.config.eps_cl_at(task)
        for name in grams.names():
            layer = protected[name]
            data = grams.spectrum_input(name)
            new, info[name] = extend_basis(layer.protected_basis.cpu(), data["gram"], eps_cl, rows=data["rows"])
            ProtectedLANCE.set_basis(layer, new)
        self.model.train(was_training)
        return info

    def usage(self) -> dict[str, float]:
        """``rank(P) / D`` per protected layer."""
        return {n: ProtectedLANCE.usage(l) for n, l in self.layers.items() if l.method.protected}

    @torch.no_grad()
    def evaluate(self, task: int, batches: Iterable) -> float:
        """Accuracy (points) of head ``task`` on ``batches`` of ``(x, y)`` with task-local labels."""
        was_training = self.model.training
        self.model.eval()
        correct = total = 0
        for x, y in batches:
            logits = self.model(eval_layout(x.to(self.device)), task)
            correct += int((logits.argmax(dim=1).cpu() == y).sum())
            total += int(y.numel())
        self.model.train(was_training)
        if total == 0:
            raise ValueError(f"task {task} has an empty test set")
        return 100.0 * correct / total
