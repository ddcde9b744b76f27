"""The backbone registry (torchvision style): each backbone is one :class:`BackboneEntry`, registered
beside its builder in its family's module (``mcunet.py``, ``torchvision_models.py``, ``vit.py``,
``small_cnn.py``, ``cl_nets.py``).

An entry says everything the rest of the project asks about a backbone: how to build it, its native
resolution and normalisation, its parameter count (checked against the built model by the tests),
and, for pretrained ones, its :class:`Weights` (URL, accepted file names, SHA-256 where the
published file has been hashed here). ``lance backbones`` and the app's Setup page read entries;
``engine.models.build_backbone`` builds from them. Adding a backbone is one ``register(...)`` call.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)  # GPM's normalisation
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


@dataclass(frozen=True)
class Weights:
    """A published state_dict: where it comes from and how to recognise it.

    ``file_names``: the names accepted in the weights folder, the first one is the download target.
    ``sha256``: full hex SHA-256 of the published file, where known (checked on download);
    ``hash_prefix``: the first hex digits of it that the upstream file name carries (torchvision, DeiT).
    ``torch_hub``: also look in torch's hub cache (``torch.hub.get_dir()/checkpoints``).
    """

    url: str
    file_names: tuple[str, ...]
    sha256: str | None = None
    hash_prefix: str | None = None
    torch_hub: bool = False
    dataset: str = "ImageNet-1k"
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone. ``builder(weights_folder) -> nn.Module`` builds it with random weights and its
    published head (``default_classes`` outputs); ``num_params`` counts that model's parameters."""

    name: str
    family: str               # mcunet | torchvision | vit | small | continual
    builder: Callable[[Path], nn.Module]
    resolution: int           # native input side (B, 3, resolution, resolution)
    mean: tuple
    std: tuple
    description: str
    num_params: int
    weights: Weights | None = None
    macs: int | None = None   # multiply-adds of one forward pass at ``resolution`` (published, where known)
    linear_input: str = "2-D"  # what its nn.Linear layers see: 2-D (B,F), 3-D (B,L,F), 4-D (B,H,W,F)
    default_classes: int = 1000
    meta: dict = field(default_factory=dict)

    @property
    def pretrained(self) -> bool:
        """Whether published (ImageNet) weights exist for it."""
        return self.weights is not None


REGISTRY: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    """Add ``entry`` (its name must be new); returns it."""
    if entry.name in REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is registered twice")
    REGISTRY[entry.name] = entry
    return entry


def get(name: str) -> BackboneEntry:
    """The entry of ``name``; a clear error listing the known names otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]
