#!/usr/bin/env python
"""Benchmark the resolver: solve time on a large channel, install time with a shared cache.

Prints figures next to the goals from the issue; it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_resolve.py [--quick]

1. Solve: a synthetic ``noarch: generic`` channel of 2,000 names x 5 versions
   (10,000 packages) whose packages depend on 0-4 others with version ranges, solved
   for a 20-spec request through ``Resolver.solve``. Baseline: a 100-package channel
   (the first 20 names of the same generator) in the same process.
2. Install: two environments of 50 packages (~0.75 MB of random bytes each) that
   share 45 packages, installed with ``Resolver.install`` into fresh staging prefixes
   with one package cache (empty at the start of each repetition).

Generated channels are kept in ``<bench>/bench-channel/`` (``<bench>`` is
$CONDASPAWNER_BENCH_DIR or ``<repo>/.bench``), keyed by the generator's recipe, and
reused by later runs. Progress goes to stderr, figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the bench package lives in the checkout, not the wheel

from condaspawner_bench import devchannel
from condaspawner_bench.devchannel import (
    CondaPackage,
    PackageFile,
    index_channel,
    write_conda_package,
)
from jupyterhub_condaspawner.resolve import Lock, Resolver
from jupyterhub_condaspawner.spec import EnvironmentSpec

# Bump whenever the generator below changes: it invalidates the cached channels.
BENCH_RECIPE = 1
SEED = 20_240_601
VERSIONS = ("1.0", "1.1", "1.2", "2.0", "3.0")
# How many packages a package depends on, and how often (mean 1.9).
FAN_OUT_WEIGHTS = {0: 15, 1: 25, 2: 25, 3: 20, 4: 15}
REQUEST_SPECS = 20
TARGET_PREFIX = "/opt/conda/envs/bench"
CHANNEL_NAME = "conda-forge"  # what the specs name; mapped to the local channel's URL

SOLVE_GOAL_S = 1.0
INSTALL_RATIO_GOAL = 0.2


def bench_dir() -> Path:
    return Path(os.environ.get("CONDASPAWNER_BENCH_DIR") or REPO_ROOT / ".bench")


def say(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- channel generation


@dataclass(frozen=True)
class ChannelRecipe:
    """What a generated channel holds; its hash names the cache directory."""

    kind: str  # "solve" (dependency graph, tiny payloads) or "install" (big payloads)
    names: int
    versions: int
    payload_bytes: int
    seed: int = SEED

    @property
    def packages(self) -> int:
        return self.names * self.versions

    def key(self) -> str:
        recipe = {
            "bench_recipe": BENCH_RECIPE,
            "devchannel_recipe": devchannel.RECIPE_VERSION,
            **asdict(self),
        }
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def directory(self) -> Path:
        return bench_dir() / "bench-channel" / f"{self.kind}-{self.packages}-{self.key()}"


def solve_name(index: int) -> str:
    return f"bench-{index:05d}"


def solve_graph(recipe: ChannelRecipe) -> tuple[list[CondaPackage], list[int]]:
    """``recipe.names`` names x ``recipe.versions`` versions with a random dependency DAG.

    Packages depend only on names with a lower index (libraries), biased towards the
    lowest ones (a few core packages many depend on), so the first N names of a
    channel are a self-contained channel: the 100-package baseline is a prefix of the
    10,000-package one. Each name has a "witness" version (returned, by index) that
    every range on it admits, so any request that admits the witnesses is solvable;
    ranges that exclude newer versions make the solver backtrack, as real pins do.
    """
    rng = random.Random(recipe.seed)
    versions = VERSIONS[: recipe.versions]
    witness: list[int] = []
    packages = []
    for index in range(recipe.names):
        witness.append(rng.randrange(len(versions)))
        for version in versions:
            fan_out = rng.choices(list(FAN_OUT_WEIGHTS), weights=list(FAN_OUT_WEIGHTS.values()))[0]
            targets = sorted({int(index * rng.random() ** 2) for _ in range(fan_out)} if index else set())
            depends = [_range_spec(solve_name(t), witness[t], versions, rng) for t in targets]
            packages.append(
                CondaPackage(
                    name=solve_name(index),
                    version=version,
                    build="h_bench_0",
                    subdir="noarch",
                    noarch="generic",
                    depends=depends,
                    files=[PackageFile(f"share/{solve_name(index)}/VERSION", f"{version}\n".encode())],
                )
            )
    return packages, witness


def solve_packages(recipe: ChannelRecipe) -> list[CondaPackage]:
    return solve_graph(recipe)[0]


def _range_spec(name: str, witness: int, versions: tuple[str, ...], rng: random.Random) -> str:
    """``name`` with a version range that contains ``versions[witness]``."""
    low = rng.randint(0, witness)
    high = rng.randint(witness + 1, len(versions))  # == len(versions): no upper bound
    clauses = ([f">={versions[low]}"] if low else []) + ([f"<{versions[high]}"] if high < len(versions) else [])
    return f"{name} {','.join(clauses)}" if clauses else name


def solve_request(recipe: ChannelRecipe, first: int, last: int) -> list[str]:
    """REQUEST_SPECS specs on distinct names in [first, last), half with a lower bound."""
    rng = random.Random(recipe.seed + 1)
    witness = solve_graph(recipe)[1]
    specs = []
    for index in sorted(rng.sample(range(first, last), REQUEST_SPECS)):
        low = rng.randint(0, witness[index])
        lower_bound = low and rng.random() < 0.5
        specs.append(f"{solve_name(index)} >={VERSIONS[low]}" if lower_bound else solve_name(index))
    return specs


def install_name(index: int) -> str:
    return f"payload-{index:03d}"


def install_packages(recipe: ChannelRecipe) -> list[CondaPackage]:
    """``recipe.names`` dependency-free packages of 4 files of random (incompressible) bytes."""
    rng = random.Random(recipe.seed)
    file_bytes = recipe.payload_bytes // 4
    return [
        CondaPackage(
            name=install_name(index),
            version="1.0",
            build="h_bench_0",
            subdir="noarch",
            noarch="generic",
            files=[
                PackageFile(f"share/{install_name(index)}/blob-{part}.bin", rng.randbytes(file_bytes))
                for part in range(4)
            ],
        )
        for index in range(recipe.names)
    ]


async def ensure_channel(recipe: ChannelRecipe, make: Callable[[ChannelRecipe], list[CondaPackage]]) -> str:
    """Build the channel for ``recipe`` unless it is cached; return its file:// URL."""
    directory = recipe.directory()
    if (directory / "noarch" / "repodata.json").exists():
        say(f"reusing {recipe.packages}-package {recipe.kind} channel {directory}")
        return directory.as_uri()
    started = time.perf_counter()
    building = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    for subdir in ("noarch", "linux-64"):
        (building / subdir).mkdir(parents=True)
    packages = make(recipe)
    # bz2 releases the GIL: threads use every core.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda package: write_conda_package(package, building), packages))
    await index_channel(building)
    shutil.rmtree(directory, ignore_errors=True)
    building.rename(directory)
    say(f"built {recipe.packages}-package {recipe.kind} channel in {time.perf_counter() - started:.1f} s: {directory}")
    return directory.as_uri()


# ---------------------------------------------------------------- measurements


async def timed(awaitable: Awaitable[object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = await awaitable
    return time.perf_counter() - started, result


def environment(specs: list[str]) -> EnvironmentSpec:
    return EnvironmentSpec(channels=(CHANNEL_NAME,), conda=tuple(specs))


async def solve_times(url: str, specs: list[str], runs: int) -> tuple[float, list[float], int]:
    """(first solve, the following ``runs`` solves, packages in the solution)."""
    resolver = Resolver(channel_urls={CHANNEL_NAME: url})
    request = environment(specs)
    first, lock = await timed(resolver.solve(request))
    warm = [(await timed(resolver.solve(request)))[0] for _ in range(runs)]
    return first, warm, len(lock.records)


async def bench_solve(big: ChannelRecipe, small: ChannelRecipe, runs: int) -> None:
    big_url = await ensure_channel(big, solve_packages)
    small_url = await ensure_channel(small, solve_packages)
    big_request = solve_request(big, big.names // 2, big.names)
    small_request = solve_request(small, 0, small.names)

    say(f"solving {REQUEST_SPECS} specs on the {big.packages}-package channel, 1 + {runs} times")
    big_first, big_warm, big_closure = await solve_times(big_url, big_request, runs)
    say(f"solving {REQUEST_SPECS} specs on the {small.packages}-package channel, 1 + {runs} times")
    small_first, small_warm, small_closure = await solve_times(small_url, small_request, runs)
    say("solving the baseline's request on the big channel")
    same_first, same_warm, same_closure = await solve_times(big_url, small_request, runs)

    big_median = statistics.median(big_warm)
    small_median = statistics.median(small_warm)
    same_median = statistics.median(same_warm)
    print(
        f"solve {big.packages:,}-package channel: {big_median:.3f} s median of {runs} "
        f"(goal <= {SOLVE_GOAL_S:g} s; {REQUEST_SPECS} specs -> {big_closure} packages); "
        f"{small.packages}-package baseline {small_median:.3f} s "
        f"({REQUEST_SPECS} specs -> {small_closure} packages); ratio {big_median / small_median:.1f}x"
    )
    # rattler.solve makes a new Gateway per call: every solve above re-reads and parses
    # repodata.json (from the OS page cache); only process start-up separates the first.
    print(
        f"  first solve in this process: {big_first:.3f} s on {big.packages:,} packages, "
        f"{small_first:.3f} s on {small.packages} (each solve re-reads repodata.json: "
        "no in-memory repodata cache between Resolver.solve calls)"
    )
    print(
        f"  the baseline's request on the {big.packages:,}-package channel: {same_median:.3f} s median "
        f"({same_closure} packages; first {same_first:.3f} s) -> channel size alone costs "
        f"{same_median / small_median:.1f}x"
    )
    print(
        f"  range of the {runs} runs: {min(big_warm):.3f}-{max(big_warm):.3f} s ({big.packages:,}), "
        f"{min(small_warm):.3f}-{max(small_warm):.3f} s ({small.packages})"
    )


async def bench_install(recipe: ChannelRecipe, size_a: int, shared: int, repetitions: int) -> None:
    """Env A: packages [0, size_a); env B: [0, shared) plus size_a - shared packages A lacks."""
    url = await ensure_channel(recipe, install_packages)
    new = size_a - shared
    specs_a = [install_name(i) for i in range(size_a)]
    specs_b = [install_name(i) for i in range(shared)] + [install_name(size_a + i) for i in range(new)]
    scratch_root = bench_dir() / "tmp"
    scratch_root.mkdir(parents=True, exist_ok=True)
    lock_resolver = Resolver(channel_urls={CHANNEL_NAME: url})
    lock_a: Lock = await lock_resolver.solve(environment(specs_a))
    lock_b: Lock = await lock_resolver.solve(environment(specs_b))
    megabytes_a = sum(record.size or 0 for record in lock_a.records) / 1e6

    firsts, seconds, ratios = [], [], []
    for repetition in range(repetitions):
        # Staging prefixes and cache on one file system (as in production): links, not copies.
        with tempfile.TemporaryDirectory(dir=scratch_root, prefix="install-") as scratch:
            scratch_dir = Path(scratch)
            resolver = Resolver(channel_urls={CHANNEL_NAME: url}, package_cache_dir=str(scratch_dir / "pkgs"))
            first, _ = await timed(resolver.install(lock_a, scratch_dir / "env-a", TARGET_PREFIX))
            second, _ = await timed(resolver.install(lock_b, scratch_dir / "env-b", TARGET_PREFIX))
        firsts.append(first)
        seconds.append(second)
        ratios.append(second / first)
        say(f"install repetition {repetition + 1}: first {first:.2f} s, second {second:.2f} s, ratio {second / first:.2f}")

    print(
        f"second env ({shared * 100 // len(specs_b)}% shared) install: {statistics.median(seconds):.2f} s "
        f"vs first {statistics.median(firsts):.2f} s -> ratio {statistics.median(ratios):.2f} "
        f"(goal <= {INSTALL_RATIO_GOAL:g}; medians of {repetitions})"
    )
    print(
        f"  env A: {len(lock_a.records)} packages, {megabytes_a:.1f} MB of .tar.bz2, cache empty; "
        f"env B: {len(lock_b.records)} packages, {shared} of them already in the cache"
    )
    print(
        "  per repetition (second / first): "
        + ", ".join(f"{s:.2f}/{f:.2f} = {r:.2f}" for f, s, r in zip(firsts, seconds, ratios, strict=True))
    )


# ---------------------------------------------------------------- main


async def run(quick: bool) -> None:
    names = 400 if quick else 2000
    payload = 256 * 1024 if quick else 768 * 1024
    runs = 3 if quick else 9
    repetitions = 1 if quick else 3
    big = ChannelRecipe("solve", names=names, versions=5, payload_bytes=0)
    small = ChannelRecipe("solve", names=20, versions=5, payload_bytes=0)
    payloads = ChannelRecipe("install", names=55, versions=1, payload_bytes=payload)  # 50 + 5

    started = time.perf_counter()
    await bench_solve(big, small, runs)
    await bench_install(payloads, size_a=50, shared=45, repetitions=repetitions)
    say(f"done in {time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller channel, fewer runs (a smoke run)")
    arguments = parser.parse_args()
    asyncio.run(run(arguments.quick))
    sys.stdout.flush()
    time.sleep(0.3)  # py-rattler 0.28 may abort at interpreter exit right after an awaited call


if __name__ == "__main__":
    main()
