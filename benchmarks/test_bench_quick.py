"""(d) The quick preset end to end (not part of the default test run).

    .venv/bin/python -m pytest benchmarks/test_bench_quick.py --benchmark-only -s

`stitchbench run` (preset ``quick``: two width-16 ResNet-18s on digits, DM and TLM
matrices, the four indices, layer identification, energy OOD and both Ding tests) as a
user starts it, in a fresh workspace, then the same command again. Printed: the wall time
of the first run against the default's 5-minute budget, and of the second run (which
reuses every network, matrix and detector) against the first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BUDGET_S = 300.0


def _run(ws: Path) -> float:
    exe = Path(sys.executable).with_name("stitchbench")
    start = time.perf_counter()
    proc = subprocess.run([str(exe), "run"], check=False, cwd=ws, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return seconds


def test_quick_preset_end_to_end(benchmark, tmp_path):
    times: dict[str, float] = {}

    def both() -> None:
        times["first"] = _run(tmp_path)
        times["second"] = _run(tmp_path)

    benchmark.pedantic(both, rounds=1, iterations=1)
    first, second = times["first"], times["second"]
    print(f"\n(d) quick preset end to end: first run {first:.1f} s = {first / BUDGET_S:.2f}x the "
          f"{BUDGET_S:.0f} s budget; second (everything reused) {second:.1f} s = {second / first:.3f}x the first")
    benchmark.extra_info.update(first_s=first, second_s=second, budget_ratio=first / BUDGET_S,
                                rerun_ratio=second / first)
    assert first < BUDGET_S
    assert second < first
