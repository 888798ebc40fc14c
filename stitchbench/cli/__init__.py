"""The ``stitchbench`` command line (`main`); light at import time (no torch, no MLflow)."""

from .main import main

__all__ = ["main"]
