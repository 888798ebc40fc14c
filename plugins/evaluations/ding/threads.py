"""Torch's CPU thread count for work made of many tiny operations."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def one_cpu_thread(device: Any, threads: int | None = 1) -> Iterator[None]:
    """On the CPU, one intra-op thread within the block: for work made of many tiny
    operations (a probe step, a least-squares fit of a few dozen columns) thread hand-offs
    cost far more than they gain (measured 10-40x slower with 2 threads than with 1 on a
    loaded 2-core machine). ``threads`` other than 1 may be given; None changes nothing."""
    import torch

    if threads is None or torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
