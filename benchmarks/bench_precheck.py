#!/usr/bin/env python
"""Benchmark the spawn's "will it solve?" pre-check on the 10,000-package channel (issue 14).

Prints figures; it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_precheck.py [--quick] [--runs N] [--real-channel DIR]

On bench_resolve.py's synthetic channel (2,000 names x 5 versions, built once and cached
in ``<bench>/bench-channel/``), with bench_resolve's 20-spec request:

1. accepted: ``ImageBuilder.presolve`` (what ``CondaSpawner.precheck_solve`` awaits before
   a spawn is accepted), first call and warm median, next to ``SpecPolicy.precheck_timeout``;
2. refused: the same request with one name misspelt: the solver's "No candidates" plus the
   near-name hint (all package names of the channel, difflib), and the message;
3. the build's solve step afterwards (``ImageBuilder._resolve``): it takes the pre-check's
   lock instead of solving again, so the spawn pays the solve once.

4. with ``--real-channel DIR`` (the bench's real channel, e.g. ``.bench/channel-full``
   after ``python -m condaspawner_bench setup --real-set full``): the same accepted and
   refused pre-checks of real environments, data science (numpy, pandas, matplotlib) and
   PyTorch with NVIDIA's CUDA libraries (solved for CUDA 12.4), ipykernel added as the
   builder adds it.

The synthetic channel has no ipykernel, which the builder adds to every environment: the
request lists ``ipykernel`` under ``pip:`` (so the builder adds nothing) and the figures
are those of the conda solve alone.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_resolve import CHANNEL_NAME, ChannelRecipe, ensure_channel, say, solve_packages, solve_request

from jupyterhub_condaspawner.builder import Build, BuildRequest, ImageBuilder
from jupyterhub_condaspawner.resolve import Lock, ResolveError
from jupyterhub_condaspawner.spec import EnvironmentSpec, SpecPolicy


def request_for(specs: list[str]) -> BuildRequest:
    return BuildRequest(EnvironmentSpec(channels=(CHANNEL_NAME,), conda=tuple(sorted(specs)), pip=("ipykernel",)))


def misspelt(specs: list[str]) -> tuple[list[str], str]:
    """The request with two letters of its first name swapped (`bench-` -> `bnech-`), and that name."""
    name = specs[0].split()[0]
    typo = name.replace("bench-", "bnech-", 1)
    return [specs[0].replace(name, typo, 1), *specs[1:]], typo


async def timed_presolves(builder: ImageBuilder, request: BuildRequest, runs: int) -> tuple[Lock, float, list[float]]:
    """The lock, the first pre-check's seconds (repodata read), and ``runs`` warm ones."""
    started = time.perf_counter()
    lock = await builder.presolve(request)
    first = time.perf_counter() - started
    warm = []
    for _ in range(runs):
        started = time.perf_counter()
        lock = await builder.presolve(request)
        warm.append(time.perf_counter() - started)
    return lock, first, warm


async def run(quick: bool, runs: int) -> None:
    recipe = ChannelRecipe("solve", names=400 if quick else 2000, versions=5, payload_bytes=0)
    url = await ensure_channel(recipe, solve_packages)
    specs = solve_request(recipe, recipe.names // 2, recipe.names)
    timeout = SpecPolicy().precheck_timeout

    with tempfile.TemporaryDirectory(prefix="bench-precheck-") as cache:
        builder = ImageBuilder(cache_dir=cache)
        builder.resolver.channel_urls = {CHANNEL_NAME: url}
        request = request_for(specs)

        say(f"pre-checking {len(specs)} specs on the {recipe.packages:,}-package channel, 1 + {runs} times")
        lock, first, warm = await timed_presolves(builder, request, runs)

        say("the build's solve step after the pre-check")
        build = Build(key="0" * 64)
        builder.key_dir(build.key).mkdir(parents=True)
        started = time.perf_counter()
        await builder._resolve(build, request, io.StringIO())
        reused = time.perf_counter() - started

        wrong, typo = misspelt(specs)
        say(f"pre-checking the request with {typo!r} misspelt, {runs} times")
        refused, message = [], ""
        for _ in range(runs):
            started = time.perf_counter()
            try:
                await builder.presolve(request_for(wrong))
            except ResolveError as error:
                message = str(error)
            refused.append(time.perf_counter() - started)

    warm_median, refused_median = statistics.median(warm), statistics.median(refused)
    print(f"channel: {recipe.packages:,} packages ({recipe.names:,} names); request: {len(specs)} specs, "
          f"solution {len(lock.records)} packages")
    print(f"pre-check accepted: first {first:.3f} s (repodata read), warm median {warm_median:.3f} s "
          f"(range {min(warm):.3f}-{max(warm):.3f}) = {warm_median / timeout:.3f} of "
          f"SpecPolicy.precheck_timeout ({timeout:g} s)")
    print(f"pre-check refused (near names included): median {refused_median:.3f} s "
          f"(range {min(refused):.3f}-{max(refused):.3f}); {refused_median / warm_median:.2f} x the accepted one")
    print(f"  message: {message}")
    print(f"the build's solve step with the pre-check's lock: {reused * 1000:.1f} ms "
          f"(instead of a {warm_median:.3f} s solve)")


REAL_ENVIRONMENTS = {
    "data science": (("python=3.9", "numpy", "pandas", "matplotlib"), None, "pandas"),
    "torch-cuda": (("python=3.9", "torch", "numpy"), "12.4", "torch"),
}


async def run_real(channel_dir: Path, runs: int) -> None:
    url = channel_dir.resolve().as_uri()
    timeout = SpecPolicy().precheck_timeout
    print(f"\nreal channel {channel_dir}:")
    with tempfile.TemporaryDirectory(prefix="bench-precheck-") as cache:
        builder = ImageBuilder(cache_dir=cache)
        builder.resolver.channel_urls = {"conda-forge": url}
        for label, (specs, cuda, name) in REAL_ENVIRONMENTS.items():
            request = BuildRequest(EnvironmentSpec(channels=("conda-forge",), conda=specs), cuda=cuda)
            lock, first, warm = await timed_presolves(builder, request, runs)
            typo = name[0] + name[2] + name[1] + name[3:]
            wrong = BuildRequest(EnvironmentSpec(channels=("conda-forge",),
                                                 conda=tuple(s.replace(name, typo) for s in specs)), cuda=cuda)
            started = time.perf_counter()
            message = ""
            try:
                await builder.presolve(wrong)
            except ResolveError as error:
                message = str(error)
            refused = time.perf_counter() - started
            print(f"  {label}: {len(lock.records)} packages; pre-check first {first:.3f} s, warm median "
                  f"{statistics.median(warm):.3f} s = {statistics.median(warm) / timeout:.3f} of precheck_timeout; "
                  f"{typo!r} refused in {refused:.3f} s: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 2,000-package channel (a smoke run)")
    parser.add_argument("--runs", type=int, default=5, help="warm pre-checks of each kind (default 5)")
    parser.add_argument("--real-channel", type=Path, help="also pre-check real environments on this channel folder")
    arguments = parser.parse_args()
    asyncio.run(run(arguments.quick, arguments.runs))
    if arguments.real_channel:
        asyncio.run(run_real(arguments.real_channel, arguments.runs))
    sys.stdout.flush()
    time.sleep(0.3)  # py-rattler 0.28 may abort at interpreter exit right after an awaited call


if __name__ == "__main__":
    main()
