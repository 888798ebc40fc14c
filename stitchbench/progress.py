"""Progress bars (tqdm) that stay quiet when asked to."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_bar(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    disable = os.environ.get("STITCHBENCH_PROGRESS", "").lower() in ("0", "off", "false", "no")
    return tqdm(file=sys.stderr, disable=disable, leave=False, dynamic_ncols=True, **kwargs)
