# docs/examples/tiny_cnn/network.py
"""`TinyCNN`, the network the ``tiny_cnn`` architecture builds (imports torch)."""

from __future__ import annotations

from torch import nn

import stitchbench


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class TinyCNN(stitchbench.StitchableNetwork):
    """stem -> ``block1`` .. ``block4`` (the stitchable layers) -> head.

    For a (C, H, W) input with ``width`` w the layers' outputs are (w, H, W),
    (2w, H/2, W/2), (2w, H/2, W/2) and (4w, H/4, W/4) (halved sizes rounded up). The base
    class provides ``forward``, ``front``, ``back``, ``activations`` and ``layer_shapes``
    from ``stem``, ``blocks``, ``head`` and ``layer_names``.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        w = width
        self.stem = conv_bn_relu(in_channels, w)
        # an nn.ModuleList, never a plain list: a list hides the blocks' parameters from
        # the network, so they would never be trained or saved
        self.blocks = nn.ModuleList([
            conv_bn_relu(w, w),
            conv_bn_relu(w, 2 * w, stride=2),
            conv_bn_relu(2 * w, 2 * w),
            conv_bn_relu(2 * w, 4 * w, stride=2),
        ])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))
        self.layer_names = ["block1", "block2", "block3", "block4"]  # one per block, in order
