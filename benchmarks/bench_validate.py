#!/usr/bin/env python
"""Benchmark `condaspawner validate` on 50 files in one call, beyond its start-up.

Prints figures next to the goal from issue 14 (50 files checked in one call within
1 s beyond start-up); it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_validate.py [--runs N]

The 50 files are written by this script into a temporary folder, heavier than the
files people upload: 10 `conda env export`s of 200 pinned packages with build strings
and 20 pip lines each, 20 hand-written files of 15-30 specs and a pip section (markers,
extras, hashes), and 20 refused files from the project's corpus (every problem of each
is collected). "Beyond start-up" is the median of `validate` on those 50 files minus
the median of `validate` on one small file, as fresh processes run interleaved (ABAB),
so load from other jobs hits both alike.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import condaspawner_command, load_line, median_ms, timed  # noqa: E402  (the CLI benchmarks' helpers)

REPO_ROOT = Path(__file__).resolve().parents[1]
CORPUS = REPO_ROOT / "tests" / "corpus"
SMALL_FILE = CORPUS / "good" / "variables.yml"
GOAL_S = 1.0
FILES = 50


def export_file(rng: random.Random, index: int) -> str:
    """A `conda env export` as Linux writes it: pinned versions, build strings, a pip section, a prefix."""
    lines = [f"name: export{index}", "channels:", "  - conda-forge", "  - defaults", "dependencies:"]
    for n in range(200):
        version = f"{rng.randint(0, 30)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
        build = f"py311h{rng.getrandbits(28):07x}_{rng.randint(0, 5)}"
        lines.append(f"  - package-{index}-{n}={version}={build}")
    lines.append("  - pip:")
    lines += [f"    - pypkg-{index}-{n}=={rng.randint(0, 9)}.{rng.randint(0, 9)}" for n in range(20)]
    lines.append(f"prefix: /home/user{index}/miniconda3/envs/export{index}")
    return "\n".join(lines) + "\n"


def handwritten_file(rng: random.Random, index: int) -> str:
    """What a researcher writes: ranges, globs, channel::package, pip markers, extras and hashes."""
    lines = ["name: research", "channels:", "  - pytorch", "  - nvidia", "  - conda-forge", "  - nodefaults",
             "dependencies:", "  - python=3.11", "  - pytorch::pytorch>=2.1=*cuda*", "  - pytorch-cuda=12.1"]
    for n in range(rng.randint(15, 30)):
        lines.append(rng.choice([f"  - lib{n}>=1.{n},<2", f"  - 'tool{n} 1.{n}.*'", f"  - pkg{n}  # comment",
                                 f"  - conda-forge::mod{n}=0.{n}"]))
    lines += ["  - pip", "  - pip:",
              "    - rich[jupyter]==13.7.0; python_version >= '3.9' --hash=sha256:" + "%064x" % rng.getrandbits(256),
              "    - requests==2.31.0 --hash=sha256:" + "%064x" % rng.getrandbits(256),
              "    - Foo_Bar==1.0 --hash=sha256:" + "%064x" % rng.getrandbits(256)]
    lines += ["variables:", f"  OMP_NUM_THREADS: {index % 8 + 1}"]
    return "\n".join(lines) + "\n"


def write_files(folder: Path) -> list[str]:
    rng = random.Random(14)
    names = []
    for index in range(10):
        names.append(folder / f"export-{index}.yml")
        names[-1].write_text(export_file(rng, index))
    for index in range(20):
        names.append(folder / f"research-{index}.yml")
        names[-1].write_text(handwritten_file(rng, index))
    hostile = sorted((CORPUS / "hostile").iterdir())
    names += rng.sample(hostile, FILES - len(names))
    return [str(name) for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs of each command (default 9)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-validate-") as folder:
        files = write_files(Path(folder))
        many = [*condaspawner_command(), "validate", *files]
        one = [*condaspawner_command(), "validate", str(SMALL_FILE)]
        lines = subprocess.run(many, capture_output=True, text=True, cwd="/").stdout.splitlines()
        for command in (many, one):  # warm the OS page cache
            timed(command, check=False)
        many_s, one_s = [], []
        for _ in range(args.runs):
            many_s.append(timed(many, check=False))
            one_s.append(timed(one, check=False))
        total_bytes = sum(Path(name).stat().st_size for name in files)
        entries = sum(Path(name).read_text(errors="replace").count("\n  - ") for name in files)

    beyond = [m - o for m, o in zip(many_s, one_s)]
    many_median, one_median = statistics.median(many_s), statistics.median(one_s)
    print(f"files: {len(files)} ({total_bytes / 1000:.0f} KB, about {entries} conda entries); "
          f"output: {sum(': ok ' in line for line in lines)} ok, {sum(': error: ' in line for line in lines)} "
          "error lines")
    print(f"validate {len(files)} files: {median_ms(many_s)}")  # some files are refused: exit 1
    print(f"validate 1 small file (start-up): {median_ms(one_s)}")
    print(f"{len(files)} files beyond start-up: {(many_median - one_median) * 1000:.0f} ms "
          f"= {(many_median - one_median) / GOAL_S:.2f} of the goal ({GOAL_S:.0f} s); "
          f"per-pair {min(beyond) * 1000:.0f}-{max(beyond) * 1000:.0f} ms")
    print(load_line())


if __name__ == "__main__":
    main()
