"""The ``noise`` dataset plugin: synthetic out-of-distribution images, generated offline.

The auxiliary set of the offline default: the energy-based OOD fine-tuning of Liu et al.
(2020) needs images that are not from the in-distribution set, and the synthetic
anomalies of Hendrycks et al. (2019) make such a set without any download.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, PositiveInt

import stitchbench
from stitchbench import DatasetPlugin, Params

from ._common import validated

if TYPE_CHECKING:
    import torch

    from stitchbench import LoadedDataset

Kind = Literal["uniform", "gaussian", "rademacher", "smooth", "blobs"]
KINDS: tuple[Kind, ...] = ("uniform", "gaussian", "rademacher", "smooth", "blobs")


def generate(kind: Kind, n: int, shape: tuple[int, int, int], g: torch.Generator) -> torch.Tensor:
    """``n`` images of one kind, (n, C, H, W) float32 in [0, 1].

    - uniform: every pixel U[0, 1].
    - gaussian: every pixel N(0.5, 0.25^2), clipped to [0, 1] (Hendrycks et al.'s N(0, 0.5^2)
      clipped to [-1, 1], in our [0, 1] scale).
    - rademacher: every pixel 0 or 1 with probability 1/2.
    - smooth: low-frequency noise, U[0, 1] on a grid 4x coarser than the image (at least
      2x2), upsampled bilinearly; each channel independent.
    - blobs: smooth noise thresholded at 0.5, so amorphous shapes with definite edges.
    """
    import torch
    import torch.nn.functional as F

    c, h, w = shape
    if kind == "uniform":
        return torch.rand((n, c, h, w), generator=g)
    if kind == "gaussian":
        return (0.5 + 0.25 * torch.randn((n, c, h, w), generator=g)).clamp_(0.0, 1.0)
    if kind == "rademacher":
        return torch.randint(0, 2, (n, c, h, w), generator=g).float()
    coarse = torch.rand((n, c, max(2, h // 4), max(2, w // 4)), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    if kind == "smooth":
        return smooth
    return (smooth > 0.5).float()


def noise_images(n: int, shape: tuple[int, int, int], kinds: tuple[Kind, ...], seed: int) -> torch.Tensor:
    """``n`` images (n, C, H, W) in [0, 1]; image ``i`` is of kind ``kinds[i % len(kinds)]``.

    The kinds draw their images in turn, each in one block, from one generator seeded with
    ``seed``, so the result depends only on the arguments.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    out = torch.empty((n, *shape))
    for k, kind in enumerate(kinds):
        idx = torch.arange(k, n, len(kinds))
        out[idx] = generate(kind, len(idx), shape, g)
    return out


class Noise(DatasetPlugin):
    """Synthetic noise images (uniform, Gaussian, Rademacher, smooth, blobs); auxiliary OOD set, offline.

    Images are (C, H, W) = ``image_shape`` float32 in [0, 1], the scale of the unnormalised
    in-distribution sets (digits, cifar10, svhn). The default shape is CIFAR's (3, 32, 32);
    whoever pairs this set with an in-distribution set passes that set's shape (e.g.
    (1, 8, 8) for digits). The kinds alternate (image i is of kind i mod len(kinds)); the
    train and test splits are drawn from different seeds (2 * seed and 2 * seed + 1), so
    they share no image. One class: every label is 0 and carries no meaning.
    """

    name = "noise"
    auxiliary = True

    class Params(Params):
        n_train: PositiveInt = Field(10_000, description="number of training images")
        n_test: PositiveInt = Field(2_000, description="number of test images")
        image_shape: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
            (3, 32, 32), description="(C, H, W) of the images; set it to the in-distribution set's shape"
        )
        kinds: tuple[Kind, ...] = Field(KINDS, min_length=1, description="the kinds of noise, in turn")
        seed: int = Field(0, ge=0, description="seed of the generator")

    def load(
        self, params: Params | dict | None, data_dir: Path | None = None, download: bool = False
    ) -> LoadedDataset:
        """Generate both splits (``data_dir`` and ``download`` are ignored)."""
        import torch

        from stitchbench import LoadedDataset, TensorSplit

        p = validated(self, params)
        shape = tuple(p.image_shape)
        train = noise_images(p.n_train, shape, p.kinds, 2 * p.seed)
        test = noise_images(p.n_test, shape, p.kinds, 2 * p.seed + 1)
        return LoadedDataset(
            name=self.name,
            num_classes=1,
            image_shape=shape,
            train=TensorSplit(train, torch.zeros(p.n_train, dtype=torch.int64)),
            test=TensorSplit(test, torch.zeros(p.n_test, dtype=torch.int64)),
            augment=None,
            description=self.describe(),
        )


@stitchbench.hookimpl
def register_datasets(register):
    register(Noise())
