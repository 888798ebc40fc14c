"""Low-rank approximation of activations in channel (or embedding) space.

Used by the low-rank variant of direct matching and by the Ding et al. sensitivity test
(the authors' ``low_rank_approx``, szegedai/stitching-ood
``nn_stitching/utils/low_rank/low_rank.py``). It lives in the core so that stitchers saved with
a low-rank source transform can be rebuilt by anyone who loads them.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankProjection(nn.Module):
    """Fixed rank-r approximation in channel (or embedding) space, applied at every
    position or token: ``x -> mean + (x - mean) V Vᵀ``.

    ``mean`` (C,) and ``basis`` V (C, r) are buffers fitted once on the DM sample; nothing
    here is trained. Input (N, C, H, W) or (N, T, C); output has the same shape.
    """

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor):
        super().__init__()
        if mean.ndim != 1 or basis.ndim != 2 or basis.shape[0] != mean.shape[0]:
            raise ValueError(
                f"mean (C,) and basis (C, r) expected, got {tuple(mean.shape)}, {tuple(basis.shape)}"
            )
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("basis", basis.detach().clone().float())

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = x.ndim == 4
        h = x.movedim(1, -1) if conv else x
        mean, basis = self.mean.to(h.dtype), self.basis.to(h.dtype)
        h = mean + ((h - mean) @ basis) @ basis.T
        return h.movedim(-1, 1).contiguous() if conv else h

    def extra_repr(self) -> str:
        return f"channels={self.mean.shape[0]}, rank={self.rank}"
