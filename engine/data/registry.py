"""The dataset registry: names, where each lives in a data root, how to get it, official splits."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torchvision.datasets as tvd
from torchvision.datasets.utils import download_and_extract_archive

from engine.models.weights import offline

from . import sources
from .arrays import ImageArrays
from .errors import DatasetMissing
from .paths import data_roots

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: ``load(folder, official_split, store_size, max_per_class) -> ImageArrays``."""

    name: str
    description: str
    num_classes: int | None
    folders: tuple[str, ...]            # candidate sub-folders of a data root ("" = the root itself)
    marker: str                          # a file or folder that must exist inside the dataset folder
    how_to_get: str
    load: Callable[..., ImageArrays]
    official_splits: tuple[str, ...] = ("train", "test")
    download: Callable[[Path], None] | None = field(default=None, compare=False)
    builtin: bool = False                # always available (no files)

    def splits_of(self, folder: Path | None) -> tuple[str, ...]:
        if self.name.startswith("imagefolder:") or self.name == "notmnist":
            return tuple(sources.imagefolder_layout(folder))
        return self.official_splits


def _tv_download(cls_name: str, **kwargs) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        cls = getattr(tvd, cls_name)
        for extra in ([{"train": True}, {"train": False}] if "split" not in kwargs else [{}]):
            cls(str(root), download=True, **{**kwargs, **extra})
    return download


def _tv_split_download(cls_name: str, splits: list[dict]) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        for extra in splits:
            getattr(tvd, cls_name)(str(root), download=True, **extra)
    return download


def _cub_download(root: Path) -> None:
    download_and_extract_archive("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz", str(root))


def _notmnist_folder_load(folder: Path, split: str, store_size, max_per_class=None) -> ImageArrays:
    return sources.load_imagefolder(folder, split, store_size or 28, max_per_class)


def _how(name: str, layout: str, url: str = "") -> str:
    return (f"run `lance datasets --download {name} --data-root DIR` on a machine with internet"
            f"{' (' + url + ')' if url else ''}, or put {layout} inside a data root "
            f"(--data-root DIR or LANCE_DATA_ROOT=DIR)")


SPECS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "digits", "scikit-learn's 1,797 handwritten digits (8x8 grey), bundled: always available", 10, ("",), "",
        "bundled with scikit-learn", lambda folder, split, store, mpc=None: sources.load_digits_arrays(mpc),
        official_splits=("all",), builtin=True),
    "digits-0to4": DatasetSpec(
        "digits-0to4", "digits 0-4 of scikit-learn's digits (901 images), bundled: the default backbone's "
        "pretraining task", 5, ("",), "", "bundled with scikit-learn",
        lambda folder, split, store, mpc=None: sources.load_digits_classes(0, 4, mpc), official_splits=("all",),
        builtin=True),
    "digits-5to9": DatasetSpec(
        "digits-5to9", "digits 5-9 of scikit-learn's digits (896 images), bundled: the default fine-tune task "
        "(classes the default backbone never saw)", 5, ("",), "", "bundled with scikit-learn",
        lambda folder, split, store, mpc=None: sources.load_digits_classes(5, 9, mpc), official_splits=("all",),
        builtin=True),
    "cifar10": DatasetSpec(
        "cifar10", "CIFAR-10 (python pickles, 50k train / 10k test, 32 px)", 10, ("cifar-10-batches-py",),
        "data_batch_1", _how("cifar10", "cifar-10-batches-py/", "https://www.cs.toronto.edu/~kriz/cifar.html"),
        lambda folder, split, store, mpc=None: sources.load_cifar(folder, split, False, mpc),
        download=_tv_download("CIFAR10")),
    "cifar100": DatasetSpec(
        "cifar100", "CIFAR-100 (python pickles, 50k train / 10k test, 32 px, 100 fine labels)", 100,
        ("cifar-100-python",), "train", _how("cifar100", "cifar-100-python/"),
        lambda folder, split, store, mpc=None: sources.load_cifar(folder, split, True, mpc),
        download=_tv_download("CIFAR100")),
    "cifar10-jpeg": DatasetSpec(
        "cifar10-jpeg", "CIFAR-10 re-encoded as JPEG in an image folder (train/<class>/, test/<class>/)", 10,
        ("cifar10-jpeg",), "train",
        "put the image folder cifar10-jpeg/{train,test}/<class>/*.jpg in a data root "
        "(e.g. LANCE_DATA_ROOT=../shared/datasets), or use imagefolder:PATH",
        lambda folder, split, store, mpc=None: sources.load_imagefolder(folder, split, store, mpc)),
    "pets": DatasetSpec(
        "pets", "Oxford-IIIT Pet (37 breeds; trainval / test)", 37, ("oxford-iiit-pet",), "annotations/trainval.txt",
        _how("pets", "oxford-iiit-pet/{images,annotations}/"), sources.load_pets,
        download=_tv_split_download("OxfordIIITPet", [{"split": "trainval"}, {"split": "test"}])),
    "flowers102": DatasetSpec(
        "flowers102", "Oxford Flowers-102 (official train / val / test)", 102, ("flowers-102",), "setid.mat",
        _how("flowers102", "flowers-102/{jpg/,imagelabels.mat,setid.mat}"), sources.load_flowers,
        official_splits=("train", "val", "test"),
        download=_tv_split_download("Flowers102", [{"split": "train"}, {"split": "val"}, {"split": "test"}])),
    "cub200": DatasetSpec(
        "cub200", "Caltech-UCSD Birds-200-2011 (200 species; official train / test)", 200, ("CUB_200_2011",),
        "images.txt", _how("cub200", "CUB_200_2011/{images/,images.txt,…}",
                           "https://data.caltech.edu/records/65de6-vp158"), sources.load_cub, download=_cub_download),
    "mnist": DatasetSpec(
        "mnist", "MNIST handwritten digits (28 px grey; 5-datasets part)", 10, ("MNIST/raw",), "",
        _how("mnist", "MNIST/raw/{train,t10k}-*-ubyte"),
        lambda folder, split, store, mpc=None: sources.load_mnist_like(folder, split, [str(i) for i in range(10)], mpc),
        download=_tv_download("MNIST")),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", "Fashion-MNIST (28 px grey; 5-datasets part)", 10, ("FashionMNIST/raw",), "",
        _how("fashion-mnist", "FashionMNIST/raw/{train,t10k}-*-ubyte"),
        lambda folder, split, store, mpc=None: sources.load_mnist_like(folder, split, FASHION_CLASSES, mpc),
        download=_tv_download("FashionMNIST")),
    "svhn": DatasetSpec(
        "svhn", "SVHN cropped digits (32 px; 5-datasets part)", 10, ("SVHN", "svhn", ""), "train_32x32.mat",
        _how("svhn", "SVHN/{train,test}_32x32.mat"),
        lambda folder, split, store, mpc=None: sources.load_svhn(folder, split, mpc),
        download=lambda root: _tv_split_download("SVHN", [{"split": "train"}, {"split": "test"}])(root / "SVHN")),
    "notmnist": DatasetSpec(
        "notmnist", "notMNIST letters A-J (image folder; 5-datasets part)", 10, ("notMNIST_small", "notMNIST"), "",
        "download notMNIST_small (http://yaroslavvb.com/upload/notMNIST/) and unpack it as notMNIST_small/<A..J>/ "
        "in a data root (--data-root DIR or LANCE_DATA_ROOT=DIR)", _notmnist_folder_load),
}

_MNIST_MARKERS = {"mnist": "train-images-idx3-ubyte", "fashion-mnist": "train-images-idx3-ubyte"}


def _has_marker(spec: DatasetSpec, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if spec.name in _MNIST_MARKERS:
        marker = _MNIST_MARKERS[spec.name]
        return (folder / marker).is_file() or (folder / f"{marker}.gz").is_file()
    if spec.name == "notmnist":
        try:
            return bool(sources.imagefolder_layout(folder))
        except (ValueError, OSError):
            return False
    return not spec.marker or (folder / spec.marker).exists()


def imagefolder_spec(path: str | os.PathLike) -> DatasetSpec:
    folder = Path(path).expanduser()
    return DatasetSpec(
        f"imagefolder:{path}", f"image folder {folder}", None, (str(folder),), "",
        f"make {folder} an image folder: {folder}/train/<class>/<image> (+ test/, val/) or {folder}/<class>/<image>",
        lambda f, split, store, mpc=None: sources.load_imagefolder(f, split, store, mpc))


def get_spec(name: str) -> DatasetSpec:
    if name.startswith("imagefolder:"):
        return imagefolder_spec(name.split(":", 1)[1])
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(SPECS)}, or imagefolder:PATH")
    return SPECS[name]


def locate(name: str, data_root=None) -> Path | None:
    """The folder holding dataset ``name`` (None for bundled ones); raises DatasetMissing."""
    spec = get_spec(name)
    if spec.builtin:
        return None
    if name.startswith("imagefolder:"):
        folder = Path(spec.folders[0])
        if not folder.is_dir():
            raise DatasetMissing(name, [folder], spec.how_to_get, "no such folder")
        try:
            sources.imagefolder_layout(folder)
        except ValueError as error:
            raise DatasetMissing(name, [folder], spec.how_to_get, str(error)) from None
        return folder
    looked = []
    for root in data_roots(data_root):
        for sub in spec.folders:
            folder = root / sub if sub else root
            looked.append(folder)
            if _has_marker(spec, folder):
                return folder
    raise DatasetMissing(name, looked, spec.how_to_get)


def num_classes(name: str, data_root=None) -> int:
    """Number of classes of ``name`` (image folders: their class folders; needs the folder)."""
    spec = get_spec(name)
    if spec.num_classes is not None:
        return spec.num_classes
    folder = locate(name, data_root)
    layout = sources.imagefolder_layout(folder)
    first = layout.get("train") or layout["all"]
    return sum(1 for p in first.iterdir() if p.is_dir())


def download(name: str, data_root=None) -> Path:
    """Download ``name`` into the first data root with torchvision (needs a network)."""
    spec = get_spec(name)
    if spec.builtin:
        return Path(".")
    if spec.download is None:
        raise ValueError(f"{name} cannot be downloaded automatically: {spec.how_to_get}")

    if offline():
        raise OSError(f"LANCE_OFFLINE is set: not downloading {name}; {spec.how_to_get}")
    root = data_roots(data_root)[0]
    root.mkdir(parents=True, exist_ok=True)
    spec.download(root)
    return locate(name, root)
