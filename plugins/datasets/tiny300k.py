"""The ``tiny300k`` dataset plugin: the "300K Random Images" of Hendrycks et al. (2019).

The auxiliary out-of-distribution set the reference code fine-tunes its energy-based
detectors with (after Liu et al. 2020): 300,000 32x32 images from 80 Million Tiny Images,
cleaned of CIFAR classes, in one NumPy file ``300K_random_images.npy`` of uint8
(300000, 32, 32, 3). The file is memory-mapped, so only the chosen subsets are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, PositiveInt

import stitchbench
from stitchbench import DatasetPlugin, Params, UsageError

from ._common import missing_error, require_data_dir, uint8_split, validated

if TYPE_CHECKING:
    from stitchbench import LoadedDataset

FILE = "300K_random_images.npy"
URL = "https://people.eecs.berkeley.edu/~hendrycks/300K_random_images.npy"


class Tiny300k(DatasetPlugin):
    """300K Random Images (Hendrycks et al.'s Outlier Exposure set) from --data-dir; auxiliary OOD set.

    Images are (3, 32, 32) float32 in [0, 1] (uint8 / 255, no mean/std normalisation, like
    cifar10). The splits are disjoint random subsets of the file: ``n_train`` and ``n_test``
    images drawn without replacement with ``seed``, each kept in file order. One class:
    every label is 0 and carries no meaning. Expects ``<data-dir>/300K_random_images.npy``
    (the ``file`` param); --download fetches it (920 MB).
    """

    name = "tiny300k"
    auxiliary = True
    needs_data_dir = True
    downloadable = True

    class Params(Params):
        file: str = Field(FILE, description="the .npy file, relative to --data-dir (or an absolute path)")
        n_train: PositiveInt = Field(50_000, description="number of training images")
        n_test: PositiveInt = Field(
            10_000, description="number of test images (disjoint from the training ones)"
        )
        seed: int = Field(0, ge=0, description="seed of the random choice of images")

    def load(
        self, params: Params | dict | None, data_dir: Path | None, download: bool = False
    ) -> LoadedDataset:
        """Read the two subsets into memory (12 KB of float32 per image)."""
        import numpy as np

        from stitchbench import LoadedDataset

        p = validated(self, params)
        root = require_data_dir(self, data_dir, f"{FILE} (download it from {URL})")
        path = root / p.file
        if download and not path.is_file():
            from torchvision.datasets.utils import download_url

            download_url(URL, str(path.parent), path.name)
        if not path.is_file():
            raise missing_error(
                self,
                [path],
                f"Download {FILE} (920 MB) from {URL} into {path.parent.resolve()}, or add --download "
                "to fetch it there.",
            )
        images = np.load(path, mmap_mode="r")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise UsageError(f"{path}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        n = images.shape[0]
        if p.n_train + p.n_test > n:
            raise UsageError(f"{path} holds {n} images; n_train + n_test = {p.n_train + p.n_test} is more")
        chosen = np.random.default_rng(p.seed).permutation(n)[: p.n_train + p.n_test]
        # Sorted indices read the memory map front to back instead of seeking at random.
        idx_train, idx_test = np.sort(chosen[: p.n_train]), np.sort(chosen[p.n_train :])
        _, h, w, c = images.shape

        def split(idx: np.ndarray):
            return uint8_split(
                images[idx], np.zeros(len(idx), np.int64), channels_last=True, num_classes=1, source=path
            )

        return LoadedDataset(
            name=self.name,
            num_classes=1,
            image_shape=(c, h, w),
            train=split(idx_train),
            test=split(idx_test),
            augment=None,
            description=self.describe(),
        )


@stitchbench.hookimpl
def register_datasets(register):
    register(Tiny300k())
