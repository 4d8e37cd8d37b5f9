#!/usr/bin/env python
"""Benchmark the `condaspawner` command's start-up: validate one file vs its parsers' import.

Prints figures next to the goal from issue 9 (validate of one file within 2x the time
of ``python -c "import yaml, rattler, packaging"``); it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_cli.py [--runs N]

Both commands run as fresh processes, interleaved (ABAB) so that load from other jobs
on the machine hits both alike; medians are compared. It also prints how many modules
each loads and what the command imported before it imported lazily (the hub's stack).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GOOD_FILE = REPO_ROOT / "tests" / "corpus" / "good" / "variables.yml"
GOAL_RATIO = 2.0
COUNT_MODULES = "import sys, json; print(json.dumps(len(sys.modules)))"


def condaspawner_command() -> list[str]:
    """The console script users run, next to this interpreter (else ``python -m``)."""
    script = Path(sys.executable).with_name("condaspawner")
    return [str(script)] if script.exists() else [sys.executable, "-m", "jupyterhub_condaspawner.cli"]


def timed(command: list[str], check: bool = True) -> float:
    """Wall seconds of one run of ``command``; ``check=False`` for commands that exit 1 on purpose."""
    started = time.perf_counter()
    subprocess.run(command, check=check, stdout=subprocess.DEVNULL, cwd="/")
    return time.perf_counter() - started


def median_ms(seconds: list[float]) -> str:
    """"median N ms (range A-B)" of run times."""
    return (f"median {statistics.median(seconds) * 1000:.0f} ms "
            f"(range {min(seconds) * 1000:.0f}-{max(seconds) * 1000:.0f})")


def load_line() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return f"load average: {' '.join(load)} on {os.cpu_count()} cores"


def module_count(code: str) -> int:
    result = subprocess.run([sys.executable, "-c", f"{code}\n{COUNT_MODULES}"], capture_output=True,
                            text=True, check=True, cwd="/")
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each command (default 15)")
    args = parser.parse_args()

    validate = [*condaspawner_command(), "validate", str(GOOD_FILE)]
    baseline = [sys.executable, "-c", "import yaml, rattler, packaging"]
    for command in (validate, baseline):  # warm the OS page cache
        timed(command)
    validate_s, baseline_s = [], []
    for _ in range(args.runs):
        validate_s.append(timed(validate))
        baseline_s.append(timed(baseline))
    ratios = [v / b for v, b in zip(validate_s, baseline_s)]
    validate_median, baseline_median = statistics.median(validate_s), statistics.median(baseline_s)

    print(f"command: {' '.join(Path(validate[0]).name if i == 0 else part for i, part in enumerate(validate))}")
    print(f"validate one file: {median_ms(validate_s)}")
    print(f"import yaml, rattler, packaging: {median_ms(baseline_s)}")
    print(f"validate one file / import yaml,rattler,packaging: {validate_median / baseline_median:.2f} "
          f"(goal <= {GOAL_RATIO:.1f}; per-pair ratios {min(ratios):.2f}-{max(ratios):.2f})")
    validate_modules = module_count(
        f"from jupyterhub_condaspawner import cli\ncli.main(['validate', {str(GOOD_FILE)!r}])"
    )
    print(f"modules loaded: validate {validate_modules}, "
          f"import yaml,rattler,packaging {module_count('import yaml, rattler, packaging')}, "
          f"the spawner (what validate loaded before) "
          f"{module_count('import jupyterhub_condaspawner.spawner, jupyterhub_condaspawner.cli')}")
    print(load_line())


if __name__ == "__main__":
    main()
