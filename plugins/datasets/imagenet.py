"""The ``imagenet`` dataset plugin: ILSVRC-2012 (or any image set) in the ImageFolder layout.

The images stay on disk and are decoded per item by torchvision's ``ImageFolder``, with
the transforms of PyTorch's ImageNet example (the recipe the reference code trained its
ImageNet ResNet-18 with).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

import stitchbench
from stitchbench import DatasetInfo, DatasetPlugin, Params, UsageError

from ._common import missing_error, require_data_dir, validated

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from stitchbench import LoadedDataset

#: Per-channel mean and standard deviation of ImageNet's training images (RGB, [0, 1] scale).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

LAYOUT = (
    "Lay it out as DIR/imagenet/train/<wnid>/*.JPEG and DIR/imagenet/val/<wnid>/*.JPEG "
    "(or DIR/train/... and DIR/val/...), one folder per class with the same folder names in "
    "both, and pass --data-dir DIR. The official validation images come in one flat folder: "
    "sort them into class folders with their ground-truth labels first (e.g. with the "
    "valprep.sh script of PyTorch's ImageNet example). It cannot be downloaded automatically "
    "(image-net.org requires a login)."
)


def find_root(data_dir: Path) -> Path | None:
    """The folder holding ``train/`` and ``val/``: ``data_dir/imagenet`` or ``data_dir`` itself."""
    for root in (data_dir / "imagenet", data_dir):
        if (root / "train").is_dir() and (root / "val").is_dir():
            return root
    return None


class ImageNet(DatasetPlugin):
    """ImageNet (ILSVRC-2012) or any ImageFolder tree with train/ and val/ under --data-dir.

    Images are (3, S, S) float32 with S = ``image_size`` (224), normalised with ImageNet's
    per-channel mean and standard deviation. Test (val/): resize the shorter side to
    ``resize`` (256 for S = 224) and take the central S x S crop. Train: a random-resized
    crop to S x S and a horizontal flip with probability 1/2, drawn per image when it is
    read (so there is no batch ``augment``). The number of classes is the number of class
    folders; labels index the folder names in sorted order.
    """

    name = "imagenet"
    needs_data_dir = True

    class Params(Params):
        image_size: int = Field(224, ge=8, description="side of the square network input, in pixels")
        resize: int | None = Field(
            None,
            ge=8,
            description="shorter side before the test centre crop; default image_size / 0.875 (256 for 224)",
        )
        train_augmentation: bool = Field(
            True,
            description="random-resized crop and flip for the train split; false gives it the test transform",
        )
        limit_train: int | None = Field(
            None,
            ge=1,
            description="use N training images, evenly spaced over the sorted file list (all classes)",
        )
        limit_test: int | None = Field(
            None, ge=1, description="use N validation images, evenly spaced over the sorted file list"
        )

    def info(self, params: Params | dict | None) -> DatasetInfo:
        """ILSVRC-2012's sizes (1,281,167 training and 50,000 validation images, 1000 classes)."""
        p = validated(self, params)
        n_train, n_test = 1_281_167, 50_000
        return DatasetInfo(1000, (3, p.image_size, p.image_size), min(n_train, p.limit_train or n_train),
                           min(n_test, p.limit_test or n_test))

    def load(
        self, params: Params | dict | None, data_dir: Path | None, download: bool = False
    ) -> LoadedDataset:
        """Index the two folders (the images are read lazily, per item)."""
        from torchvision import datasets, transforms

        from stitchbench import LoadedDataset

        p = validated(self, params)
        data_dir = require_data_dir(self, data_dir, "imagenet/train/ and imagenet/val/ (ImageFolder layout)")
        root = find_root(data_dir)
        if root is None:
            looked = [
                data_dir / "imagenet" / "train",
                data_dir / "imagenet" / "val",
                data_dir / "train",
                data_dir / "val",
            ]
            raise missing_error(self, looked, LAYOUT)
        size = p.image_size
        resize = p.resize if p.resize is not None else round(size / 0.875)
        normalize = transforms.Normalize(MEAN, STD)
        test_tf = transforms.Compose(
            [transforms.Resize(resize), transforms.CenterCrop(size), transforms.ToTensor(), normalize]
        )
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        try:
            train = datasets.ImageFolder(
                str(root / "train"), transform=train_tf if p.train_augmentation else test_tf
            )
            test = datasets.ImageFolder(str(root / "val"), transform=test_tf)
        except FileNotFoundError as e:  # a class folder without images, or no class folders at all
            raise UsageError(f"dataset 'imagenet' under {root.resolve()}: {e}. {LAYOUT}") from e
        if train.classes != test.classes:
            only_train = sorted(set(train.classes) - set(test.classes))
            only_val = sorted(set(test.classes) - set(train.classes))
            raise UsageError(
                f"dataset 'imagenet' under {root.resolve()}: "
                "train/ and val/ must have the same class folders "
                f"(only in train/: {only_train[:5]}{' ...' if len(only_train) > 5 else ''}; "
                f"only in val/: {only_val[:5]}{' ...' if len(only_val) > 5 else ''})"
            )
        return LoadedDataset(
            name=self.name,
            num_classes=len(train.classes),
            image_shape=(3, size, size),
            train=spread(train, p.limit_train),
            test=spread(test, p.limit_test),
            augment=None,
            description=self.describe(),
        )


def spread(split: Dataset, limit: int | None) -> Dataset:
    """``limit`` items of ``split`` at evenly spaced indices (all of it when ``limit`` is None).

    ImageFolder lists images class by class, so the first N would hold only the first
    classes; evenly spaced indices (the centres of ``limit`` equal stretches of the list)
    keep every class in proportion.
    """
    import torch

    n = len(split)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return split
    return torch.utils.data.Subset(split, [(2 * i + 1) * n // (2 * limit) for i in range(limit)])


@stitchbench.hookimpl
def register_datasets(register):
    register(ImageNet())
