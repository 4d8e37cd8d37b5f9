"""benchmarks/bench_gpus.py --quick: the lines scripts read, from a replay through the product's code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpus.py"
LINES = {
    "activity": r"idle GPU-hours ratio gpu-aware/activity-only: (\d+\.\d\d)",
    "static": r"idle GPU-hours ratio gpu-aware/static office hours: (\d+\.\d\d)",
    "builds": r"GPU-seconds held during builds: (\d+)",
    "queue": r"queue wait p50/p95 \(s\): (\d+) / (\d+)",
}


def test_quick_run_prints_the_script_lines_and_holds_no_gpu_during_builds():
    output = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, check=True,
                            timeout=600).stdout
    found = {name: re.search(f"^{pattern}$", output, re.MULTILINE) for name, pattern in LINES.items()}
    assert all(found.values()), output
    # GPU-aware culling holds GPUs idle for less than either baseline on the same day.
    assert 0 < float(found["activity"].group(1)) < 1
    assert 0 < float(found["static"].group(1)) < 1
    # Servers with a first build get their GPUs only once the image is ready.
    assert found["builds"].group(1) == "0"
    p50, p95 = (int(value) for value in found["queue"].groups())
    assert 0 <= p50 <= p95
