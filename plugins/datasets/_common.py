"""Helpers shared by the bundled dataset plugins.

Kept free of torch at module level (the plugin modules import this one when
``stitchbench plugins list`` imports them); torch and numpy are imported inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from stitchbench import DatasetPlugin, Params, UsageError

if TYPE_CHECKING:
    import numpy as np

    from stitchbench import TensorSplit


class SplitLimits(Params):
    """Params of a data set read whole into memory: optionally only the first N images."""

    limit_train: int | None = Field(None, ge=1, description="use only the first N training images")
    limit_test: int | None = Field(None, ge=1, description="use only the first N test images")


def validated(plugin: DatasetPlugin, params: Any) -> Any:
    """``params`` (None, a dict or an instance of ``plugin.Params``) as ``plugin.Params``."""
    return plugin.Params.model_validate(params if params is not None else {})


def require_data_dir(plugin: DatasetPlugin, data_dir: Path | str | None, what: str) -> Path:
    """``data_dir`` as a Path, or a UsageError saying the data set is read from disk.

    ``what`` completes "pass --data-dir DIR holding ..." (e.g. ``"cifar-10-batches-py/"``)."""
    if data_dir is None:
        raise UsageError(f"dataset {plugin.name!r} needs --data-dir: pass --data-dir DIR holding {what}")
    return Path(data_dir).expanduser()


def missing_error(plugin: DatasetPlugin, looked_at: list[Path], how: str) -> UsageError:
    """The error for a data set that is not on disk: every full path looked at, then how to get it."""
    paths = "\n".join(f"  {p.resolve()}" for p in looked_at)
    return UsageError(f"dataset {plugin.name!r} not found; looked for:\n{paths}\n{how}")


def uint8_split(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    channels_last: bool,
    num_classes: int,
    source: Path,
    limit: int | None = None,
) -> TensorSplit:
    """A `TensorSplit` of float32 images in [0, 1] from uint8 pixels.

    ``images`` is (N, H, W, C) when ``channels_last`` else (N, C, H, W); ``labels`` (N,)
    integers in [0, num_classes) (checked; ``source`` names the file in the error). Only the
    first ``limit`` examples are kept when it is given, sliced before the float copy is
    made. The pixel scale is the reference code's ``ToTensor()`` (value / 255), with no
    mean/std normalisation.
    """
    import numpy as np
    import torch

    from stitchbench import TensorSplit

    if images.dtype != np.uint8:
        raise UsageError(f"{source}: expected uint8 pixels, got {images.dtype}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise UsageError(
            f"{source}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images))
    if channels_last:
        # Reorder while still uint8: a quarter of the bytes to move of a float copy.
        x = x.permute(0, 3, 1, 2).contiguous()
    # Divide in float32, as ToTensor() does, so the values are bit-identical to the reference's.
    return TensorSplit(x.float().div_(255.0), torch.from_numpy(labels.copy()))
