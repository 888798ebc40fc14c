# docs/examples/blobs_dataset.py
"""The ``blobs`` dataset plugin: an elongated Gaussian blob on noise, its orientation the class.

The blob lies anywhere near the centre, so the class is a local pattern (what convolutions
see), not a position. Generated offline in milliseconds; a small CNN learns it in a few
epochs, so a whole run on it takes seconds. Torch is imported inside the functions:
`stitchbench plugins list` imports this module and stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

import stitchbench


class Blobs(stitchbench.DatasetPlugin):
    """An elongated Gaussian blob on noise whose orientation is the class (1 x size x size)."""

    name = "blobs"

    class Params(stitchbench.Params):
        n_train: int = Field(1000, ge=1, description="training images")
        n_test: int = Field(300, ge=1, description="test images")
        num_classes: int = Field(4, ge=2, le=12, description="orientations (classes), spread over 180 degrees")
        size: int = Field(16, ge=8, description="image height and width")
        noise: float = Field(0.3, ge=0, description="std of the Gaussian pixel noise")
        augment: bool = Field(True, description="shift training batches by up to one pixel")
        seed: int = Field(0, description="training images use 2*seed, test images 2*seed+1")

    #: What `stitchbench plugins check` loads: a small data set, made in milliseconds.
    check_params: ClassVar[dict[str, Any]] = {"n_train": 64, "n_test": 32}

    def info(self, params: Params) -> stitchbench.DatasetInfo:
        """Classes, image shape and split sizes without generating anything (`--dry-run`)."""
        return stitchbench.DatasetInfo(num_classes=params.num_classes,
                                       image_shape=(1, params.size, params.size),
                                       n_train=params.n_train, n_test=params.n_test)

    def load(self, params: Params, data_dir: Path | None = None,
             download: bool = False) -> stitchbench.LoadedDataset:
        """Both splits, generated (``data_dir`` and ``download`` are not used)."""
        train = make_split(params, params.n_train, 2 * params.seed)
        test = make_split(params, params.n_test, 2 * params.seed + 1)
        return stitchbench.LoadedDataset(
            name=self.name,
            num_classes=params.num_classes,
            image_shape=(1, params.size, params.size),
            train=stitchbench.TensorSplit(*train),
            test=stitchbench.TensorSplit(*test),
            # only for training (networks, TLM stitchers, probes), never for activations; no
            # flips: a mirrored blob has another orientation, so another class
            augment=stitchbench.random_crop_flip(padding=1, flip=False) if params.augment else None,
            description=self.describe(),
        )


def make_split(params: Blobs.Params, n: int, seed: int) -> tuple[Any, Any]:
    """``n`` images (n, 1, size, size) float32 and their labels (n,) int64, from ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    s = params.size
    labels = torch.randint(0, params.num_classes, (n,), generator=g)
    angle = math.pi * labels.double() / params.num_classes  # (n,)
    centre = s / 4 + s / 2 * torch.rand(2, n, 1, 1, generator=g, dtype=torch.float64)
    grid = torch.arange(s, dtype=torch.float64)
    dy, dx = grid[None, :, None] - centre[0], grid[None, None, :] - centre[1]  # (n, s, 1), (n, 1, s)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    along, across = dx * cos + dy * sin, dy * cos - dx * sin  # (n, s, s)
    blob = torch.exp(-(along / (s / 5)) ** 2 / 2 - (across / (s / 16)) ** 2 / 2)  # peak 1
    images = blob + params.noise * torch.randn(n, s, s, generator=g, dtype=torch.float64)
    return images[:, None].float(), labels


@stitchbench.hookimpl
def register_datasets(register):
    register(Blobs())
