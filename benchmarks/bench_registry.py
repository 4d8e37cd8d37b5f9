#!/usr/bin/env python
"""Benchmark pushes to a registry: bytes and seconds of a second environment that shares layers.

Prints figures; asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_registry.py [--repeat N]

It sets the bench up as the tests do (the Docker daemon: ``DOCKER_HOST``, else the bench
dockerd; the dev channel; the offline base image) and starts a new, empty registry
(Debian's docker-registry on 127.0.0.1, storage under ``<bench>/bench-registry/``), so
the first push is a cold one: the base image's layers go up with it. Then:

1. **first**: env A (python 3.9, ipykernel, cs-alpha) is built and pushed: every layer.
2. **shares the conda layer**: env B, the same packages with another variable (its kernel
   spec differs): the base, conda and compile layers are in the registry; only its small
   layers go up. ``--repeat`` such environments; the median is printed.
3. **shares the base only**: env C adds a package (cs-beta): a new conda layer goes up,
   the base's layers do not.

Bytes are the compressed bytes Docker uploaded (the new layers, the config and the
manifest; read back from the pushed manifest), seconds the push alone (from the build
log), each also as a ratio to the first push. The registry, its storage and this run's
images are removed at the end. Progress goes to stderr, figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the bench package lives in the checkout, not the wheel

from condaspawner_bench.devchannel import build_dev_channel, read_channel_info
from condaspawner_bench.dockerd import ensure_daemon
from condaspawner_bench.offlinebase import build_offline_base
from condaspawner_bench.registry import start_registry
from jupyterhub_condaspawner.baseimage import BASE_TAG
from jupyterhub_condaspawner.builder import BuildRequest, ImageBuilder, ImageInfo
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.spec import SpecPolicy

CHANNEL_NAME = "conda-forge"
RUN_ID = uuid.uuid4().hex[:8]
REPO_PATH = "condaspawner-bench-registry"


def bench_dir() -> Path:
    return Path(os.environ.get("CONDASPAWNER_BENCH_DIR") or REPO_ROOT / ".bench")


def say(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def env(packages: str, variable: str) -> BuildRequest:
    text = f"channels: [conda-forge]\ndependencies: [python=3.9, ipykernel, {packages}]\n" \
           f"variables: {{BENCH_RUN: {RUN_ID}-{variable}}}\n"
    return BuildRequest(SpecPolicy().parse(text), env_name="benchreg", kernel_display_name="Registry bench")


def push_seconds(builder: ImageBuilder, info: ImageInfo) -> float:
    log = (builder.key_dir(info.key) / "build.log").read_text()
    return float(re.findall(r"^push: .* ([0-9.]+) s$", log, re.M)[-1])


async def build(builder: ImageBuilder, request: BuildRequest, label: str) -> tuple[ImageInfo, float, float]:
    started = time.perf_counter()
    info = await builder.get_image(request)
    total = time.perf_counter() - started
    assert info.pushed_bytes is not None
    seconds = push_seconds(builder, info)
    say(f"{label}: build+push {total:.1f} s, push {seconds:.1f} s, {info.pushed_bytes / 1e6:.2f} MB pushed")
    return info, seconds, total


async def run(repeat: int) -> None:
    bench = bench_dir()
    handle = ensure_daemon(bench)
    os.environ["DOCKER_HOST"] = handle.docker_host
    build_dev_channel(bench / "channel", progress=say)
    channel = read_channel_info(bench / "channel")
    if channel is None or not channel.python_available:
        raise SystemExit("the dev channel has no python package: cannot build environments")
    client = handle.client()
    await build_offline_base(client, bench, Resolver(channel_urls={CHANNEL_NAME: channel.url},
                                                     package_cache_dir=str(bench / "pkgs")))
    workdir = bench / "bench-registry" / RUN_ID
    server = start_registry(workdir / "registry")
    repository = server.repository(REPO_PATH)
    say(f"registry {server.host}, storage {server.storage}")
    builder = ImageBuilder(
        resolver=Resolver(channel_urls={CHANNEL_NAME: channel.url}, package_cache_dir=str(bench / "pkgs")),
        docker_client=client, base_image=BASE_TAG, cache_dir=str(workdir / "cache"),
        registry=repository, insecure_registries=[server.host], pip_config={"no-index": "true"},
    )
    try:
        first, first_s, _ = await build(builder, env("cs-alpha", "a"), "first (cold registry)")
        shared = [await build(builder, env("cs-alpha", f"b{i}"), f"shares the conda layer #{i + 1}")
                  for i in range(repeat)]
        base_only, base_only_s, _ = await build(builder, env("cs-alpha, cs-beta", "c"), "shares the base only")
        stored = server.stored_bytes()
    finally:
        server.stop()
        for image in client.images.list(name=repository):
            client.images.remove(image.id, force=True)
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            workdir.parent.rmdir()  # when no other run is using it

    shared_bytes = statistics.median(info.pushed_bytes or 0 for info, _, _ in shared)
    shared_s = statistics.median(seconds for _, seconds, _ in shared)
    print(f"\nregistry push on {os.cpu_count()} cores ({server.host}, docker-registry, loopback)")
    print(f"{'push':<50} {'bytes':>14} {'ratio':>8} {'seconds':>8} {'ratio':>7}")
    rows = [
        ("first (base + env, cold registry)", first.pushed_bytes or 0, first_s),
        (f"second, shares the conda layer (median of {repeat})", shared_bytes, shared_s),
        ("third, shares the base only", base_only.pushed_bytes or 0, base_only_s),
    ]
    first_bytes = first.pushed_bytes or 1
    for label, pushed, seconds in rows:
        print(f"{label:<50} {int(pushed):>14,} {pushed / first_bytes:>8.4f} {seconds:>8.2f} {seconds / first_s:>7.3f}")
    print(f"registry storage after the run: {stored / 1e6:.1f} MB (each blob once, by digest)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="environments sharing the conda layer to push")
    arguments = parser.parse_args()
    asyncio.run(run(arguments.repeat))
    sys.stdout.flush()
    time.sleep(0.3)  # py-rattler 0.28 may abort at interpreter exit right after an awaited call


if __name__ == "__main__":
    main()
