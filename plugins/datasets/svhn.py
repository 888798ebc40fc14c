"""The ``svhn`` dataset plugin: the cropped-digits SVHN from torchvision's on-disk layout.

The files are those torchvision's ``SVHN`` downloads (``<data_dir>/train_32x32.mat`` and
``test_32x32.mat``: MATLAB files with ``X`` uint8 (32, 32, 3, N) and ``y`` (N, 1), digit 0
stored as label 10). torchvision is used to download them; they are read here with
scipy, as torchvision reads them, because its constructor checks each file's md5 on every
load (and so refuses the tiny files the tests write in the same format).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import stitchbench
from stitchbench import DatasetInfo, DatasetPlugin, Params, UsageError

from ._common import SplitLimits, missing_error, require_data_dir, uint8_split, validated

if TYPE_CHECKING:
    import numpy as np

    from stitchbench import LoadedDataset, TensorSplit

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


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
    test files, in file order (the "extra" file is not used). Training augmentation: random
    crop 32 after zero padding 4, without flips (a flipped digit is another glyph).
    Expects ``<data-dir>/train_32x32.mat`` and ``<data-dir>/test_32x32.mat``.
    """

    name = "svhn"
    needs_data_dir = True
    downloadable = True

    class Params(SplitLimits):
        """Use only the first N training / test images (all by default)."""

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
            augment=random_crop_flip(padding=4, flip=False),
            description=self.describe(),
        )

    @staticmethod
    def _split(path: Path, limit: int | None) -> TensorSplit:
        images, labels = read_mat(path)
        return uint8_split(images, labels, channels_last=False, num_classes=10, source=path, limit=limit)


@stitchbench.hookimpl
def register_datasets(register):
    register(Svhn())
