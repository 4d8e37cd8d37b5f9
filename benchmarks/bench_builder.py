#!/usr/bin/env python
"""Benchmark the ImageBuilder on the bench daemon: cache hits, shared builds, cold builds, sizes.

Prints figures next to the goals from the issue; it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_builder.py [--iterations N] [--concurrent N]

It sets the bench up the way the tests do, all cached so reruns are quick: the
Docker daemon (``DOCKER_HOST``, else the bench dockerd of ``<bench>``, started if
needed; ``<bench>`` is $CONDASPAWNER_BENCH_DIR or ``<repo>/.bench``), the dev
channel in ``<bench>/channel`` (mapped to ``conda-forge``) and the offline base
image. Its own ImageBuilder tags images ``condaspawner-bench:<key16>`` and keeps
logs, locks and staging in ``<bench>/bench-builder/``.

1. P1, the cache-hit path: environment.yml text -> ``SpecPolicy().parse`` ->
   ``builder.lookup`` (build_key + find_image + mark_used) on a built image, with
   a breakdown of its parts (p50/p95 over ``--iterations`` runs each).
2. P2, ``--concurrent`` concurrent ``get_image`` calls of one new environment:
   builds run, and wall time against one request alone for another new
   environment of the same packages.
3. P3, a cold build of python=3.9 + pip + ipykernel with an empty package cache,
   then rebuilds (new keys) with the package cache warm.
4. Sizes of the base image and of a small environment image (and its layers).

Every environment gets a new key (a random ``variables:`` entry). Environments
that should not reuse docker's layer cache also get a new ``env_name`` (the
conda prefix differs, so ``COPY env`` has new content). At the end the images in
``condaspawner-bench`` (this run's and any left over) and their build folders
are removed; the base image and the daemon stay. Progress goes to stderr,
figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the bench package lives in the checkout, not the wheel

from condaspawner_bench.devchannel import build_dev_channel, read_channel_info
from condaspawner_bench.dockerd import DaemonHandle, ensure_daemon
from condaspawner_bench.offlinebase import build_offline_base
from jupyterhub_condaspawner.baseimage import BASE_TAG
from jupyterhub_condaspawner.builder import (
    LABEL_KEY,
    BuildRequest,
    ImageBuilder,
    ImageInfo,
)
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.spec import SpecPolicy

IMAGE_REPO = "condaspawner-bench"
CHANNEL_NAME = "conda-forge"  # what the specs name; mapped to the dev channel's URL
CACHE_HIT_GOAL_MS = 20.0
COLD_BUILD_GOAL_S = 30.0
RUN_ID = uuid.uuid4().hex[:8]


def bench_dir() -> Path:
    return Path(os.environ.get("CONDASPAWNER_BENCH_DIR") or REPO_ROOT / ".bench")


def say(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- helpers


def env_text(conda: list[str]) -> str:
    """An environment.yml as a user uploads it, made unique by a random variable."""
    dependencies = "".join(f"  - {spec}\n" for spec in conda)
    return f"channels: [{CHANNEL_NAME}]\ndependencies:\n{dependencies}variables:\n  BENCH_ID: {uuid.uuid4().hex}\n"


def new_env_name(label: str) -> str:
    """A fresh slug: a new conda prefix, so no docker layer of an earlier build matches."""
    return f"{label}-{RUN_ID}-{uuid.uuid4().hex[:6]}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms_figures(seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return f"p50 {percentile(ms, 50):7.3f} ms  p95 {percentile(ms, 95):7.3f} ms"


def time_calls(function: Callable[[], object], iterations: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


async def time_async_calls(function, iterations: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        await function()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        await function()
        times.append(time.perf_counter() - started)
    return times


class LoopLag:
    """Samples how late the event loop wakes a 10 ms sleeper: what blocking calls cost everyone else."""

    TICK = 0.01

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (wake-up time, seconds late)
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.TICK)
            now = time.perf_counter()
            self.samples.append((now, now - before - self.TICK))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._tick())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def worst(self, start: float, end: float) -> float:
        """The longest stall that ended in [start, end] (a stall ends when the sleeper wakes)."""
        return max((lag for stamp, lag in self.samples if start <= stamp <= end), default=0.0)

    def blocked(self, threshold: float = 0.05) -> tuple[int, float]:
        stalls = [lag for _, lag in self.samples if lag > threshold]
        return len(stalls), sum(stalls)


@dataclass
class BuildTiming:
    """One build followed through its progress events."""

    info: ImageInfo
    wall: float
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds until the next phase
    context_upload: float = 0.0  # "building the image" -> docker's first "Step" line
    steps: list[tuple[str, float]] = field(default_factory=list)  # Dockerfile step -> seconds
    cached_steps: list[str] = field(default_factory=list)  # steps docker answered "Using cache"
    stalls: dict[str, float] = field(default_factory=dict)  # phase -> worst event-loop stall (s)
    stall_count: int = 0  # event-loop stalls > 50 ms during the build
    stall_total: float = 0.0

    def stall_summary(self) -> str:
        worst = max(self.stalls.items(), key=lambda item: item[1], default=("-", 0.0))
        per_phase = ", ".join(f"{phase} {lag * 1000:.0f}" for phase, lag in self.stalls.items())
        return (f"event loop blocked: worst {worst[1] * 1000:.0f} ms (during {worst[0]}), "
                f"{self.stall_count} stalls > 50 ms totalling {self.stall_total:.2f} s; worst per phase (ms): "
                f"{per_phase}")

    def summary(self) -> str:
        parts = ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in self.phases.items())
        hits = ", ".join(step.split()[0] for step in self.cached_steps) or "none"
        return f"{self.wall:.1f} s ({parts} s; docker cache hits {len(self.cached_steps)}: {hits})"

    def slowest_steps(self, count: int = 4) -> str:
        ranked = sorted(self.steps, key=lambda step: -step[1])[:count]
        return "; ".join(f"{name[:60]} {seconds:.1f} s" for name, seconds in ranked)


async def timed_build(builder: ImageBuilder, request: BuildRequest) -> BuildTiming:
    """Build ``request`` (a new key), timing each phase from the build's progress events."""
    lag = LoopLag()
    lag.start()
    await asyncio.sleep(0)
    started = time.perf_counter()
    build = builder.ensure(request)
    stamps: list[tuple[float, dict]] = []
    async for event in build.follow():
        stamps.append((time.perf_counter(), event))
    info = await build.result()
    wall = time.perf_counter() - started
    await lag.stop()
    await builder.finish_removals()  # the staging folder goes after the image is ready: not in the next run
    timing = BuildTiming(info, wall)
    # Phase durations: from a phase's first event to the next phase's first event.
    firsts: list[tuple[str, float]] = []
    for stamp, event in stamps:
        if not firsts or firsts[-1][0] != event["phase"]:
            firsts.append((event["phase"], stamp))
    timing.phases["key+start"] = (firsts[0][1] if firsts else started) - started
    for (phase, stamp), (_, following) in itertools.pairwise(firsts):
        timing.phases[phase] = timing.phases.get(phase, 0.0) + following - stamp
    # A stall that ends at the next phase's first event happened in the phase before it.
    bounds = [("key+start", started)] + firsts + [("end", started + wall + 1.0)]
    for (phase, stamp), (_, following) in itertools.pairwise(bounds):
        timing.stalls[phase] = max(timing.stalls.get(phase, 0.0), lag.worst(stamp, following))
    timing.stall_count, timing.stall_total = lag.blocked()
    # Dockerfile steps: from one "Step N/M" line to the next (the last one to "tag").
    step_stamps = [(stamp, event["message"]) for stamp, event in stamps if event["message"].startswith("Step ")]
    building = next((stamp for stamp, event in stamps if event["phase"] == "build"), None)
    if building is not None and step_stamps:
        timing.context_upload = step_stamps[0][0] - building
    end = next((stamp for stamp, event in stamps if event["phase"] == "tag"), stamps[-1][0])
    for (stamp, message), (following, _) in zip(step_stamps, step_stamps[1:] + [(end, "")]):
        timing.steps.append((message.split(" : ", 1)[-1], following - stamp))
    step = ""
    for _, event in stamps:
        if event["message"].startswith("Step "):
            step = event["message"].split(" : ", 1)[-1]
        elif "Using cache" in event["message"]:
            timing.cached_steps.append(step)
    return timing


def package_cache_state(directory: Path) -> str:
    if not directory.exists():
        return "absent (empty)"
    entries = [entry for entry in directory.iterdir() if entry.is_dir()]
    size = sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and not path.is_symlink())
    return f"{len(entries)} extracted packages, {size / 1e6:.0f} MB"


# ---------------------------------------------------------------- bench set-up


async def set_up(package_cache: Path) -> tuple[ImageBuilder, DaemonHandle]:
    bench = bench_dir()
    started = time.perf_counter()
    handle = ensure_daemon(bench)
    os.environ["DOCKER_HOST"] = handle.docker_host
    say(f"docker daemon at {handle.docker_host}" + (" (started here)" if handle.owned else ""))
    channel_dir = bench / "channel"
    build_dev_channel(channel_dir, progress=say)
    channel = read_channel_info(channel_dir)
    if channel is None or not channel.python_available:
        reason = channel.python_skip_reason if channel else "no channel-info.json"
        raise SystemExit(f"the dev channel has no python package ({reason}): cannot build environments")
    client = handle.client()
    base_resolver = Resolver(channel_urls={CHANNEL_NAME: channel.url}, package_cache_dir=str(bench / "pkgs"))
    base_id = await build_offline_base(client, bench, base_resolver)
    say(f"base image {BASE_TAG} ready ({base_id[:19]}); set-up took {time.perf_counter() - started:.2f} s")
    builder = ImageBuilder(
        resolver=Resolver(channel_urls={CHANNEL_NAME: channel.url}, package_cache_dir=str(package_cache)),
        docker_client=client,
        base_image=BASE_TAG,
        cache_dir=str(bench / "bench-builder"),
        image_repo=IMAGE_REPO,
        pip_config={"no-index": "true"},  # no pip section here; never reach out if one appears
    )
    return builder, handle


# ---------------------------------------------------------------- measurements


async def bench_cold_build(builder: ImageBuilder, package_cache: Path) -> tuple[str, BuildTiming]:
    """P3: cold build (empty package cache, no matching docker layer), then warm-cache rebuilds."""
    conda = ["python=3.9", "pip", "ipykernel"]
    cold_state = package_cache_state(package_cache)
    cold_text = env_text(conda)
    cold_request = BuildRequest(SpecPolicy().parse(cold_text), env_name=new_env_name("cold"))
    say(f"P3: cold build of {' + '.join(conda)} (package cache: {cold_state})")
    cold = await timed_build(builder, cold_request)
    warm_state = package_cache_state(package_cache)

    say("P3: rebuild with the package cache warm, new env_name (no docker layer reuse)")
    warm_request = BuildRequest(SpecPolicy().parse(env_text(conda)), env_name=new_env_name("warm"))
    warm = await timed_build(builder, warm_request)
    say("P3: rebuild with the package cache warm, same env_name as the cold build (docker may reuse layers)")
    reuse_request = BuildRequest(SpecPolicy().parse(env_text(conda)), env_name=cold_request.env_name)
    reuse = await timed_build(builder, reuse_request)

    packages = len(json.loads((builder.key_dir(cold.info.key) / "lock.json").read_text())["packages"])
    print(
        f"P3 cold build ({' + '.join(conda)}, {packages} packages): {cold.wall:.1f} s "
        f"(goal <= {COLD_BUILD_GOAL_S:g} s); package cache empty before ({cold_state}), "
        f"{warm_state} after"
    )
    print(f"  cold:                            {cold.summary()}")
    print(f"  warm package cache, new prefix:  {warm.summary()} -> ratio {warm.wall / cold.wall:.2f} of cold")
    print(f"  warm package cache, same prefix: {reuse.summary()} -> ratio {reuse.wall / cold.wall:.2f} of cold")
    print(
        f"  cold docker build: {cold.context_upload:.1f} s from 'building the image' to docker's first Step "
        f"(context tar + upload); slowest steps: {cold.slowest_steps()}"
    )
    print(f"  cold build {cold.stall_summary()}")
    print(f"  warm (new prefix) build {warm.stall_summary()}")
    print("  cold build, every Dockerfile step: " + "; ".join(
        f"{name[:22]} {seconds:.2f}" for name, seconds in cold.steps))
    return cold_text, cold


def bench_cache_hit(builder: ImageBuilder, text: str, built: ImageInfo, iterations: int) -> None:
    """P1: environment.yml text -> image of a built environment, and its parts."""
    policy = SpecPolicy()
    env_name = built.env_name
    request = BuildRequest(policy.parse(text), env_name=env_name)
    hit = builder.lookup(request)
    if hit is None or hit.image_id != built.image_id:
        print(f"P1 cache hit: lookup did not find the built image ({hit}); figures below are misses")

    def full() -> None:
        builder.lookup(BuildRequest(policy.parse(text), env_name=env_name))

    base_id = builder.base_image_id()
    key = builder.build_key(request)
    say(f"P1: {iterations} iterations of each part of the cache-hit path")
    full_times = time_calls(full, iterations)
    parse_times = time_calls(lambda: policy.parse(text), iterations)
    policy_parse_times = time_calls(lambda: SpecPolicy().parse(text), iterations)
    key_times = time_calls(lambda: builder.build_key(request), iterations)
    base_times = time_calls(builder.base_image_id, iterations)
    hash_times = time_calls(lambda: builder.build_key(request, base_id), iterations)
    find_times = time_calls(lambda: builder.find_image(key), iterations)
    mark_times = time_calls(lambda: builder.mark_used(key), iterations)
    ping_times = time_calls(builder.client.ping, iterations)

    p50 = percentile(full_times, 50)
    print(
        f"P1 cache hit (text -> parse -> lookup): {ms_figures(full_times)} over {iterations} "
        f"(goal p50 <= {CACHE_HIT_GOAL_MS:g} ms; {'meets' if p50 * 1000 <= CACHE_HIT_GOAL_MS else 'misses'} it)"
    )
    print(f"  SpecPolicy.parse (one policy)      {ms_figures(parse_times)}")
    print(f"  SpecPolicy().parse (new policy)    {ms_figures(policy_parse_times)}")
    print(f"  build_key (asks the daemon)        {ms_figures(key_times)}")
    print(f"    of which base_image_id (daemon)  {ms_figures(base_times)}")
    print(f"    build_key given the base id      {ms_figures(hash_times)}")
    print(f"  find_image (daemon)                {ms_figures(find_times)}")
    print(f"  mark_used (touch a file)           {ms_figures(mark_times)}")
    print(f"  daemon ping, for scale             {ms_figures(ping_times)}")
    daemon = percentile(base_times, 50) + percentile(find_times, 50)
    share = daemon / p50
    verdict = "the daemon round trips DOMINATE the cache-hit path" if share > 0.5 else \
        "the daemon round trips do not dominate"
    print(
        f"  2 daemon round trips per lookup (base_image_id + find_image): {daemon * 1000:.3f} ms of "
        f"{p50 * 1000:.3f} ms p50 = {share:.0%}: {verdict}; base_image_id alone is "
        f"{percentile(base_times, 50) / p50:.0%}"
    )


async def bench_cached_get_image(builder: ImageBuilder, request: BuildRequest, iterations: int) -> None:
    times = await time_async_calls(lambda: builder.get_image(request), iterations)
    print(f"  get_image on a hit (ensure: build_key; task: find_image) {ms_figures(times)}")


async def sample_lookups(builder: ImageBuilder, request: BuildRequest, times: list[float]) -> None:
    """A spawn's cache hit every 50 ms (in the event loop, as the hub does it) until cancelled."""
    while True:
        started = time.perf_counter()
        builder.lookup(request)
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0.05)


async def bench_concurrent(builder: ImageBuilder, concurrent: int, hit: BuildRequest) -> BuildTiming:
    """P2: ``concurrent`` get_image calls of one new env vs one call of another new env."""
    conda = ["python=3.9", "ipykernel"]
    say(f"P2: one request alone for a new env ({' + '.join(conda)})")
    single_request = BuildRequest(SpecPolicy().parse(env_text(conda)), env_name=new_env_name("one"))
    before = builder.builds_started
    single = await timed_build(builder, single_request)
    single_builds = builder.builds_started - before

    say(f"P2: {concurrent} concurrent requests for another new env of the same packages")
    request = BuildRequest(SpecPolicy().parse(env_text(conda)), env_name=new_env_name("many"))
    before = builder.builds_started
    lookups: list[float] = []
    sampler = asyncio.ensure_future(sample_lookups(builder, hit, lookups))
    started = time.perf_counter()
    results = await asyncio.gather(*(builder.get_image(request) for _ in range(concurrent)))
    wall = time.perf_counter() - started
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    builds = builder.builds_started - before
    distinct = len({(r.key, r.image_id, r.tag) for r in results})
    built = sum(not r.cached for r in results)

    # The synchronous part of every call: ensure() computes the key (a daemon call) in the loop.
    keys = time_calls(lambda: builder.build_key(request), concurrent, warmup=0)
    print(
        f"P2 {concurrent} concurrent get_image of one new env: {builds} build(s) run (must be 1), "
        f"{distinct} distinct result(s), {built} with cached=False; wall {wall:.1f} s vs one request "
        f"alone {single.wall:.1f} s ({single_builds} build) -> ratio {wall / single.wall:.2f}"
    )
    print(
        f"  alone: {single.summary()}; {concurrent} build_key calls (one per ensure(), synchronous "
        f"in the event loop) take {sum(keys) * 1000:.1f} ms"
    )
    print(f"  alone: {single.stall_summary()}")
    print(
        f"  cache hits (P1's lookup) sampled every 50 ms during the shared build: {ms_figures(lookups)}, "
        f"max {max(lookups) * 1000:.1f} ms over {len(lookups)}"
    )
    return single


def bench_sizes(builder: ImageBuilder, small: ImageInfo) -> None:
    client = builder.client
    base = client.images.get(builder.base_image)
    image = client.images.get(small.image_id)
    base_size, size = base.attrs["Size"], image.attrs["Size"]
    print(
        f"image sizes: base {BASE_TAG} {base_size / 1e6:.1f} MB; small env image ({small.env_name}, "
        f"python + ipykernel) {size / 1e6:.1f} MB, of which its own layers {(size - base_size) / 1e6:.1f} MB"
    )
    base_layers = {entry["Id"] for entry in base.history() if entry["Id"] != "<missing>"}
    own = [entry for entry in image.history() if entry["Id"] not in base_layers and entry["Size"]]
    for entry in reversed(own):
        created_by = entry["CreatedBy"].replace("/bin/sh -c #(nop) ", "").replace("/bin/sh -c ", "RUN ")
        print(f"  {entry['Size'] / 1e6:7.1f} MB  {textwrap.shorten(created_by, 90)}")


def clean_up(builder: ImageBuilder, package_cache: Path) -> None:
    """Remove every image of IMAGE_REPO and its build folder; keep the base and the daemon."""
    client = builder.client
    removed = 0
    for image in client.images.list(name=IMAGE_REPO):
        key = image.labels.get(LABEL_KEY)
        for tag in image.tags:
            if tag.startswith(IMAGE_REPO + ":"):
                client.images.remove(tag, noprune=False)
        removed += 1
        if key:
            shutil.rmtree(builder.key_dir(key), ignore_errors=True)
    shutil.rmtree(package_cache, ignore_errors=True)
    say(f"removed {removed} {IMAGE_REPO} image(s) and this run's package cache")


# ---------------------------------------------------------------- main


async def run(iterations: int, concurrent: int) -> None:
    package_cache = bench_dir() / "bench-builder" / f"pkgs-{RUN_ID}"  # empty: P3 starts cold
    builder, _handle = await set_up(package_cache)
    started = time.perf_counter()
    try:
        cold_text, cold = await bench_cold_build(builder, package_cache)
        bench_cache_hit(builder, cold_text, cold.info, iterations)
        request = BuildRequest(SpecPolicy().parse(cold_text), env_name=cold.info.env_name)
        await bench_cached_get_image(builder, request, iterations)
        single = await bench_concurrent(builder, concurrent, request)
        bench_sizes(builder, single.info)
    finally:
        clean_up(builder, package_cache)
    say(f"done in {time.perf_counter() - started:.1f} s after set-up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200, help="runs of each cache-hit measurement")
    parser.add_argument("--concurrent", type=int, default=50, help="concurrent requests of one new env")
    arguments = parser.parse_args()
    asyncio.run(run(arguments.iterations, arguments.concurrent))
    sys.stdout.flush()
    time.sleep(0.3)  # py-rattler 0.28 may abort at interpreter exit right after an awaited call


if __name__ == "__main__":
    main()
