"""Job keys: a hash of a job's resolved configuration and its inputs' keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

#: Bump when a change to the core would change what a finished job contains.
CORE_JOB_VERSION = 1


def job_key(kind: str, **parts: Any) -> str:
    payload = {"job": kind, "v": CORE_JOB_VERSION, **parts}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
