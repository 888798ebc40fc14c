"""The ``digits`` dataset plugin: scikit-learn's bundled 8x8 handwritten digits.

The embedded default data set: it ships inside scikit-learn, so a run needs neither a
download nor ``--data-dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

import stitchbench
from stitchbench import DatasetInfo, DatasetPlugin, Params

from ._common import validated

if TYPE_CHECKING:
    from stitchbench import LoadedDataset


class Digits(DatasetPlugin):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes); offline.

    Images are (1, 8, 8) float32 in [0, 1] (the 0..16 grey levels divided by 16), with no
    mean/std normalisation, as the reference code feeds ``ToTensor()`` images. Labels are
    the digits 0..9. The train/test split is stratified by class and fixed by
    ``split_seed``; the defaults give 1,437 training and 360 test images. No augmentation
    (random crops would cut away much of an 8x8 digit, and flips change digits).
    """

    name = "digits"

    class Params(Params):
        test_fraction: float = Field(
            0.2, gt=0.0, lt=1.0, description="fraction of the images held out for test"
        )
        split_seed: int = Field(0, description="seed of the stratified train/test split")

    def info(self, params: Params | dict | None) -> DatasetInfo:
        import math

        p = validated(self, params)
        n_test = math.ceil(1797 * p.test_fraction)  # scikit-learn's rounding of test_size
        return DatasetInfo(10, (1, 8, 8), 1797 - n_test, n_test)

    def load(
        self, params: Params | dict | None, data_dir: Path | None = None, download: bool = False
    ) -> LoadedDataset:
        """Load the images (``data_dir`` and ``download`` are ignored: the data is bundled)."""
        import numpy as np
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        from stitchbench import LoadedDataset, TensorSplit

        p = validated(self, params)
        bunch = load_digits()
        images = (bunch.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
        labels = bunch.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(
            images, labels, test_size=p.test_fraction, random_state=p.split_seed, stratify=labels
        )
        return LoadedDataset(
            name=self.name,
            num_classes=10,
            image_shape=(1, 8, 8),
            train=TensorSplit(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
            test=TensorSplit(torch.from_numpy(x_te), torch.from_numpy(y_te)),
            augment=None,
            description=self.describe(),
        )


@stitchbench.hookimpl
def register_datasets(register):
    register(Digits())
