# docs/examples/tiny_cnn/__init__.py
"""The ``tiny_cnn`` architecture plugin: a small CNN with four stitchable conv blocks.

The network class imports torch, so it lives in `network.py`, imported inside `build`: this
module, which `stitchbench plugins list` imports, stays free of torch. Register the package
directory: `stitchbench plugins register docs/examples/tiny_cnn`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import stitchbench

if TYPE_CHECKING:
    from .network import TinyCNN


class TinyCNNArchitecture(stitchbench.ArchitecturePlugin):
    """A small CNN: conv stem, four conv-BN-ReLU blocks (stitchable), pooled linear head."""

    name = "tiny_cnn"

    class Params(stitchbench.Params):
        width: int = Field(16, ge=1, description="channels of the first block; the blocks have w, 2w, 2w, 4w")

    def build(self, params: Params, num_classes: int, image_shape: tuple[int, int, int]) -> TinyCNN:
        """A freshly initialised network (the core seeds torch before calling it)."""
        from .network import TinyCNN

        return TinyCNN(num_classes, in_channels=image_shape[0], width=params.width)

    def tag(self, params: Params) -> str:
        """The settings in model names: ``blobs-tiny_cnn-w16-seed0``."""
        return f"{self.name}-w{params.width}"


@stitchbench.hookimpl
def register_architectures(register):
    register(TinyCNNArchitecture())
