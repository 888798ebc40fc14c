"""The ``svhn`` dataset plugin: the cropped-digits SVHN from torchvision's on-disk layout.

The files are those torchvision's ``SVHN`` downloads (``<data_dir>/train_32x32.mat`` and
``test_32x32.mat``: MATLAB files with ``X`` uint8 (32, 32, 3, N) and ``y`` (N, 1), digit 0
stored as label 10). torchvision is used to download them; they are read here with
scipy, as torchvision reads them, because its constructor checks each file's md5 on every
load (and so refuses the tiny files the tests write in the same format).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

import stitchbench
from stitchbench import DatasetInfo, DatasetPlugin, Params, UsageError

from ._common import SplitLimits, missing_error, require_data_dir, uint8_split, validated

if TYPE_CHECKING:
    import numpy as np
    import torch

    from stitchbench import LoadedDataset, TensorSplit

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}

#: The authors' SVHN training transform (``general_utils/datasets/svhn.py`` of
#: szegedai/stitching-ood): edge padding 4, a random affine map (rotation in [-5, 5] degrees,
#: scale in [0.9, 1.1], x-shear in [-5, 5] degrees, no translation, nearest neighbour, fill
#: 0) about the centre of the padded 40x40 image, then the central 32x32 crop.
AUTHORS_PAD = 4
AUTHORS_DEGREES = 5.0
AUTHORS_SCALE = (0.9, 1.1)
AUTHORS_SHEAR = 5.0


def authors_affine_params(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Angles, scales and x-shears (degrees, factors, degrees; float64, shape (b,)) drawn as
    torchvision's ``RandomAffine(5, scale=(0.9, 1.1), shear=5).get_params`` draws them, one
    per image (uniform on each range; y-shear and translation are 0)."""
    import torch

    u = torch.rand(3, b, generator=g, dtype=torch.float64)
    angle = (2 * u[0] - 1) * AUTHORS_DEGREES
    scale = AUTHORS_SCALE[0] + (AUTHORS_SCALE[1] - AUTHORS_SCALE[0]) * u[1]
    shear = (2 * u[2] - 1) * AUTHORS_SHEAR
    return angle, scale, shear


def authors_affine(x: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor) -> torch.Tensor:
    """``CenterCrop(H)(affine(Pad(4, 'edge')(x)))`` for a batch (B, C, H, W), image i with
    ``angle[i]``, ``scale[i]``, x-shear ``shear[i]``.

    The per-image version is torchvision's ``F.affine`` on a tensor (centre of the padded
    image, nearest neighbour, fill 0): the same inverse matrix, the same sampling grid at
    pixel centres and ``grid_sample``, but batched and evaluated only at the pixels the
    centre crop keeps. Nearest neighbour and edge padding only copy pixels (or write 0),
    so applying it to [0, 1] floats equals the authors' order (transform the uint8 image,
    then ``ToTensor()``)."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    p = AUTHORS_PAD
    padded = F.pad(x, (p, p, p, p), mode="replicate")  # Pad(4, padding_mode='edge')
    ph, pw = h + 2 * p, w + 2 * p
    # torchvision's _get_inverse_affine_matrix with centre (0, 0), no translation, y-shear 0.
    rot, sx = torch.deg2rad(angle), torch.deg2rad(shear)
    a = torch.cos(rot)
    bb = -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    c = torch.sin(rot)
    d = -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    zero = torch.zeros_like(a)
    inv = torch.stack([d, -bb, zero, -c, a, zero], dim=1) / scale[:, None]  # (B, 6)
    theta = inv.to(x.dtype).reshape(b, 2, 3)
    # torchvision's _gen_affine_grid on the padded image, restricted to the central crop.
    xs = torch.linspace(-pw * 0.5 + 0.5, pw * 0.5 - 0.5, steps=pw, dtype=x.dtype)[p : p + w]
    ys = torch.linspace(-ph * 0.5 + 0.5, ph * 0.5 - 0.5, steps=ph, dtype=x.dtype)[p : p + h]
    base = torch.empty(1, h, w, 3, dtype=x.dtype)
    base[..., 0] = xs
    base[..., 1] = ys[:, None]
    base[..., 2] = 1
    rescaled = theta.transpose(1, 2) / torch.tensor([0.5 * pw, 0.5 * ph], dtype=x.dtype)  # (B, 3, 2)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
    out = F.grid_sample(padded, grid.to(x.device), mode="nearest", padding_mode="zeros", align_corners=False)
    return out.contiguous()


def authors_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The authors' SVHN training augmentation on a batch: `authors_affine` with parameters
    drawn from ``g`` by `authors_affine_params` (so a seeded generator makes it repeatable)."""
    return authors_affine(x, *authors_affine_params(x.shape[0], g))


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 in 0..9 of one SVHN ``.mat`` file.

    ``X[h, w, c, n]`` becomes ``images[n, c, h, w]``; label 10 (the digit 0) becomes 0.
    """
    import numpy as np
    import scipy.io

    mat = scipy.io.loadmat(str(path))
    if "X" not in mat or "y" not in mat:
        raise UsageError(f"{path} is not an SVHN file (it has no 'X' and 'y')")
    x, y = mat["X"], np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != y.shape[0]:
        raise UsageError(f"{path}: expected X (H, W, 3, N) and N labels, got {x.shape} and {y.shape[0]}")
    y = np.where(y == 10, 0, y)
    return np.transpose(x, (3, 2, 0, 1)), y


class Svhn(DatasetPlugin):
    """SVHN cropped digits (73,257 train / 26,032 test, 10 classes) from --data-dir; --download fetches it.

    Images are (3, 32, 32) float32 in [0, 1] with no mean/std normalisation; labels are the
    digits 0..9 (the files' label 10 is the digit 0); the splits are the official train and
    test files, in file order (the "extra" file is not used). Training augmentation
    (``augmentation``): ``crop`` (the default) is a random crop 32 after zero padding 4,
    without flips (a flipped digit is another glyph); ``authors`` is the authors' transform
    (edge padding 4, random rotation +-5 degrees, scale 0.9-1.1 and x-shear +-5 degrees,
    centre crop 32; no flips either).
    Expects ``<data-dir>/train_32x32.mat`` and ``<data-dir>/test_32x32.mat``.
    """

    name = "svhn"
    needs_data_dir = True
    downloadable = True

    class Params(SplitLimits):
        """Use only the first N training / test images (all by default); the training augmentation."""

        augmentation: Literal["crop", "authors"] = Field(
            "crop",
            description="crop: random crop 32 after zero padding 4 (no flip); authors: the authors' "
            "transform (edge pad 4, random affine: rotation +-5 deg, scale 0.9-1.1, x-shear +-5 deg, "
            "nearest, fill 0; centre crop 32)",
        )

    def info(self, params: Params | dict | None) -> DatasetInfo:
        p = validated(self, params)
        return DatasetInfo(10, (3, 32, 32), min(73_257, p.limit_train or 73_257), min(26_032, p.limit_test or 26_032))

    def load(
        self, params: Params | dict | None, data_dir: Path | None, download: bool = False
    ) -> LoadedDataset:
        """Read both splits into memory (about 1.2 GB of float32 for the full set)."""
        from stitchbench import LoadedDataset, random_crop_flip

        p = validated(self, params)
        root = require_data_dir(self, data_dir, "train_32x32.mat and test_32x32.mat, or add --download")
        paths = {split: root / f for split, f in FILES.items()}
        if download:
            import torchvision

            root.mkdir(parents=True, exist_ok=True)
            for split, path in paths.items():
                if not path.is_file():
                    torchvision.datasets.SVHN(root=str(root), split=split, download=True)
        missing = [path for path in paths.values() if not path.is_file()]
        if missing:
            raise missing_error(
                self,
                missing,
                "Pass --data-dir DIR holding train_32x32.mat and test_32x32.mat (the 'Format 2' cropped "
                "digits of http://ufldl.stanford.edu/housenumbers/), or add --download to fetch them "
                "into DIR (182 MB + 64 MB).",
            )
        return LoadedDataset(
            name=self.name,
            num_classes=10,
            image_shape=(3, 32, 32),
            train=self._split(paths["train"], p.limit_train),
            test=self._split(paths["test"], p.limit_test),
            augment=authors_augment if p.augmentation == "authors" else random_crop_flip(padding=4, flip=False),
            description=self.describe(),
        )

    @staticmethod
    def _split(path: Path, limit: int | None) -> TensorSplit:
        images, labels = read_mat(path)
        return uint8_split(images, labels, channels_last=False, num_classes=10, source=path, limit=limit)


@stitchbench.hookimpl
def register_datasets(register):
    register(Svhn())
