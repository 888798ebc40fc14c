"""The ``cifar10`` dataset plugin: CIFAR-10 from torchvision's on-disk layout.

The files are those torchvision's ``CIFAR10`` downloads and reads
(``<data_dir>/cifar-10-batches-py/data_batch_1..5`` and ``test_batch``: pickled dicts with
``data``, uint8 (N, 3072) in channel-major order, and ``labels``). torchvision is used to
download them; they are read by the small reader below instead of ``CIFAR10(...)``,
because torchvision's constructor checks the md5 of every file on each load (half a
second, and it refuses the tiny files the tests write in the same format) and converts
the images to (N, H, W, C), which we would only transpose back.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import stitchbench
from stitchbench import DatasetInfo, DatasetPlugin, Params, UsageError

from ._common import SplitLimits, missing_error, require_data_dir, uint8_split, validated

if TYPE_CHECKING:
    import numpy as np

    from stitchbench import LoadedDataset, TensorSplit

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]


def read_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of CIFAR-10 pickle batches, in file order.

    A batch is a dict pickled by Python 2; ``latin1`` decodes its str keys and the numpy
    array's raw bytes unchanged (as torchvision does). Files pickled by Python 3 with bytes
    keys are accepted too.
    """
    import numpy as np

    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            entry: dict[Any, Any] = pickle.load(f, encoding="latin1")
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        if "data" not in entry or "labels" not in entry:
            raise UsageError(
                f"{path} is not a CIFAR-10 batch (it has no 'data' and 'labels'): {sorted(entry)}"
            )
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(entry["labels"]) != data.shape[0]:
            raise UsageError(
                f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {len(entry['labels'])}"
            )
        # Each row holds the 1024 red, then green, then blue values, each plane row-major.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


class Cifar10(DatasetPlugin):
    """CIFAR-10 (50,000 train / 10,000 test images, 10 classes) from --data-dir; --download fetches it.

    Images are (3, 32, 32) float32 in [0, 1] with no mean/std normalisation (the reference
    code's ``ToTensor()`` inputs); the splits are the official ones, in file order.
    Training augmentation: random crop 32 after zero padding 4, and a horizontal flip with
    probability 1/2 (the reference recipe). Expects
    ``<data-dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}``.
    """

    name = "cifar10"
    needs_data_dir = True
    downloadable = True

    class Params(SplitLimits):
        """Use only the first N training / test images (all by default)."""

    def info(self, params: Params | dict | None) -> DatasetInfo:
        p = validated(self, params)
        return DatasetInfo(10, (3, 32, 32), min(50_000, p.limit_train or 50_000), min(10_000, p.limit_test or 10_000))

    def load(
        self, params: Params | dict | None, data_dir: Path | None, download: bool = False
    ) -> LoadedDataset:
        """Read both splits into memory (about 600 MB of float32 for the full set)."""
        from stitchbench import LoadedDataset, random_crop_flip

        p = validated(self, params)
        root = require_data_dir(self, data_dir, f"{FOLDER}/, or add --download to fetch it there (170 MB)")
        folder = root / FOLDER
        wanted = [folder / f for f in TRAIN_FILES + TEST_FILES]
        if download and not all(f.is_file() for f in wanted):
            import torchvision

            root.mkdir(parents=True, exist_ok=True)
            torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
        missing = [f for f in wanted if not f.is_file()]
        if missing:
            raise missing_error(
                self,
                missing,
                f"Pass --data-dir DIR holding {FOLDER}/ (the python version of CIFAR-10, "
                "cifar-10-python.tar.gz, unpacked), or add --download to fetch it into DIR (170 MB).",
            )
        return LoadedDataset(
            name=self.name,
            num_classes=10,
            image_shape=(3, 32, 32),
            train=self._split(folder, TRAIN_FILES, p.limit_train),
            test=self._split(folder, TEST_FILES, p.limit_test),
            augment=random_crop_flip(padding=4, flip=True),
            description=self.describe(),
        )

    @staticmethod
    def _split(folder: Path, files: list[str], limit: int | None) -> TensorSplit:
        images, labels = read_batches([folder / f for f in files])
        return uint8_split(images, labels, channels_last=False, num_classes=10, source=folder, limit=limit)


@stitchbench.hookimpl
def register_datasets(register):
    register(Cifar10())
