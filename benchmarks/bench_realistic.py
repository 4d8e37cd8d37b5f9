#!/usr/bin/env python
"""Real-size environments: cold builds against the floor, and layers shared between images.

Prints figures next to the goals of issue 12 (parts 2 and 3); it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_realistic.py [--set datascience|full] [--shared N] [--routes R,...]

It sets the bench up with a real package set (``condaspawner_bench.realchannel``: PyPI's
wheels as conda packages, ``full`` adds PyTorch and NVIDIA's CUDA libraries, ~3 GB,
downloaded once into the bench) and fills the package cache first, so that downloads
are not part of any figure. Then:

1. **Cold builds** of the ``datascience`` environment (numpy, pandas, matplotlib) and,
   with ``--set full``, the ``torch-cuda`` one, by each route (``layered``: the builder
   writes the layers itself; ``dockerfile``: build context and ``COPY``), each a new key.
   The floor, measured in the same run just before and just after the builds (their mean:
   the machine's speed drifts): the same installed environment's bytes streamed once into
   a new image layer (``docker import`` of a tar of the staged prefix). ``--rounds N``
   repeats that N times. Printed for scripts: ``cold build / floor, NAME: X.XX`` (the
   layered route, the median over the rounds; goal <= 1.5), the
   Dockerfile route beside it, the phase breakdown with the compile container's summary
   (files compiled, files that took the base image's byte code, shipped byte code adopted:
   the second depends on how much of the environment the base image holds too) and the
   image sizes. Then the same
   environment on a hub that built another one first (ipykernel's closure, which every
   environment installs: the byte-code cache holds what the first build compiled and what it
   took from the base image, in packs; python's layer is sent again, as it
   sits above numpy's and pandas' here):
   ``cold build / floor, NAME, after another environment: X.XX``. Beside the seconds, the
   whole machine's CPU-seconds (busy, not idle nor waiting on the disk: ``psutil``) over each
   build and each floor: ``CPU-seconds cold build / floor, NAME: X.XX``, and the least a
   build of those CPU-seconds could take on this machine's cores, as a ratio to the floor:
   ``least possible on N cores / floor, NAME: X.XX`` (both medians over the rounds). The
   CPU counts other work on the machine too: read it beside the load it prints.
2. **Layers shared**: ``--shared`` environments (default 5) of the largest set's stack
   that differ in a few small packages, the fifth in python's patch release alone (the
   ``full`` channel's second python, ``condaspawner_bench.cpython``), built by the layered route and pushed to a new
   registry on loopback: ``disk for 5 envs / disk for 1: X.XX`` (the daemon's layer
   store, goal <= 1.5) and ``registry bytes for envs 2-5 / env 1: X.XX`` (bytes pushed,
   goal <= 0.10).

Images, registry and scratch folders of the run are removed at the end; the daemon,
channels, base image and package cache stay. Progress goes to stderr, figures to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from condaspawner_bench import cpython  # noqa: E402
from condaspawner_bench.bench import Bench, ensure_bench  # noqa: E402
from condaspawner_bench.registry import start_registry  # noqa: E402
from jupyterhub_condaspawner import imageload, layers  # noqa: E402
from jupyterhub_condaspawner.builder import BuildRequest, ImageBuilder, ImageInfo  # noqa: E402
from jupyterhub_condaspawner.resolve import Resolver  # noqa: E402
from jupyterhub_condaspawner.spec import SpecPolicy  # noqa: E402

RUN_ID = uuid.uuid4().hex[:8]
CUDA = "12.4"  # the torch environment's CUDA libraries need a driver: solved as a GPU profile's
ENVIRONMENTS = {
    "datascience": ("numpy", "pandas", "matplotlib"),
    "torch-cuda": ("torch", "numpy"),
}
# What the shared-layer environments add to the stack: a few small packages each.
# The fifth differs in python's patch release alone (the full channel's second python, cpython.py).
VARIANTS = ((), ("cs-alpha=1.0",), ("cs-beta",), ("cs-gamma",), (f"python={cpython.VERSION}",),
            ("cs-alpha=2.0",), ("cs-alpha=1.1", "pip"))
FLOOR_GOAL, DISK_GOAL, REGISTRY_GOAL = 1.5, 1.5, 0.10
CORES = psutil.cpu_count() or 1


def say(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def request(name: str, packages: tuple[str, ...], label: str) -> BuildRequest:
    """``packages`` may pin python's release (``python=3.9.2``); python 3.9 otherwise."""
    python = next((package for package in packages if package.startswith("python=")), "python=3.9")
    dependencies = ", ".join((python, "ipykernel", *(package for package in packages if package != python)))
    text = f"channels: [conda-forge]\ndependencies: [{dependencies}]\nvariables: {{BENCH_RUN: {RUN_ID}-{label}}}\n"
    cuda = CUDA if "torch" in packages else None
    return BuildRequest(SpecPolicy().parse(text), cuda=cuda, env_name=name)


@dataclass
class Timed:
    info: ImageInfo
    seconds: float
    phases: list[tuple[float, str, str]] = field(default_factory=list)  # seconds since start, phase, message
    compiled: str = ""  # the compile container's summary line, from the build log
    cpu_seconds: float = 0.0  # the whole machine's, over the build

    def breakdown_and_compile(self) -> str:
        return self.breakdown() + (f" ({self.compiled})" if self.compiled else "")

    def breakdown(self) -> str:
        marks = self.phases + [(self.seconds, "end", "")]
        spans: dict[str, float] = {}
        for (at, phase, _), (after, _, _) in zip(marks, marks[1:]):
            spans[phase] = spans.get(phase, 0.0) + after - at
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in spans.items() if seconds >= 0.05)


def busy_cpu_seconds() -> float:
    """The whole machine's CPU-seconds so far, neither idle nor waiting on the disk (nor stolen
    by a hypervisor; guest time is inside user time already)."""
    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


@dataclass
class Floor:
    seconds: float
    cpu_seconds: float


async def timed_build(builder: ImageBuilder, build_request: BuildRequest) -> Timed:
    os.sync()  # as for the floor: the disk's write-back of earlier runs is not this build's
    cpu = busy_cpu_seconds()
    started = time.perf_counter()
    build = builder.ensure(build_request)
    phases = []
    async for event in build.follow():
        if not phases or phases[-1][1] != event["phase"]:
            phases.append((time.perf_counter() - started, event["phase"], event["message"]))
    info = await build.result()
    seconds = time.perf_counter() - started
    cpu = busy_cpu_seconds() - cpu
    await builder.finish_removals()  # the staging folder goes after the image is ready: not timed, not in the next run
    log = (Path(builder.key_dir(info.key)) / "build.log").read_text(errors="replace")
    compiled = next((line for line in log.splitlines() if line.startswith("compiled ")), "")
    return Timed(info, seconds, phases, compiled, cpu)


async def install_anew(resolver: Resolver, build_request: BuildRequest, folder: Path) -> Path:
    """``build_request``'s environment installed into an empty ``folder`` for the shared prefix."""
    lock = await resolver.solve(build_request.spec, cuda=build_request.cuda)
    shutil.rmtree(folder, ignore_errors=True)
    await resolver.install(lock, folder, layers.SHARED_PREFIX)
    return folder


def remove_images(bench: Bench, results: Iterable[Timed]) -> None:
    for result in results:
        bench.daemon.client(timeout=600).images.remove(result.info.image_id, force=True)


def mark(staged: Path, label: str) -> None:
    """Make a staged environment's whole layer one Docker has not seen in this run: the same
    bytes again would be written, found a duplicate, and deleted (slow on this bench's disk)."""
    (staged / ".condaspawner-bench").write_text(f"{RUN_ID} {label}\n")


def whole_layer(name: str, staged: Path) -> layers.Layer:
    """Every file of an environment staged for the shared prefix, as one layer."""
    prefix = layers.SHARED_PREFIX.lstrip("/")
    return layers.Layer(name, tuple(layers.Entry(f"{prefix}/{path}", staged / path)
                                    for path in sorted(layers.tree_paths(staged))))


async def floor_seconds(bench: Bench, resolver: Resolver, build_request: BuildRequest, scratch: Path,
                        label: str = "x") -> Floor:
    """Stream the installed environment's bytes once into a new image layer (docker import): its
    seconds and the machine's CPU-seconds."""
    staging = await install_anew(resolver, build_request, scratch / "floor-env")  # the solve lists ipykernel
    mark(staging, f"floor {label}")
    whole = whole_layer("floor", staging)
    size = layers.tar_size(whole.entries)
    api = bench.daemon.client(timeout=3600).api
    tag = f"condaspawner-floor-{RUN_ID}-{build_request.env_name}"
    os.sync()  # each figure starts with nothing left to write back (the staging, an earlier build)
    cpu = busy_cpu_seconds()
    started = time.perf_counter()
    api.import_image_from_data(layers.stream_tar(whole, size), repository=tag, tag=label)
    seconds = time.perf_counter() - started
    cpu = busy_cpu_seconds() - cpu
    # The image stays until the run's clean-up: see settle_daemon.
    shutil.rmtree(staging, ignore_errors=True)
    return Floor(seconds, cpu)


def check_imports(bench: Bench, info: ImageInfo, packages: tuple[str, ...]) -> str:
    """Import the environment's main packages in its image (no GPU here: torch runs on the CPU)."""
    code = ("import importlib, sys; mods = [importlib.import_module(n) for n in sys.argv[1:]]; "
            "print(', '.join(f'{m.__name__} {m.__version__}' for m in mods)); "
            "import torch; print('torch CUDA', torch.version.cuda, 'available:', torch.cuda.is_available(), "
            "'CPU tensor sum', int(torch.ones(3).sum()))" if "torch" in packages else
            "import importlib, sys; print(', '.join(f'{n} {importlib.import_module(n).__version__}' for n in sys.argv[1:]))")
    client = bench.daemon.client(timeout=600)
    output = client.containers.run(info.tag, [f"/opt/conda/envs/{info.env_name}/bin/python", "-c", code, *packages],
                                   network_mode="none", remove=True)
    return " / ".join(output.decode().split("\n")).strip(" /")


def stored_bytes(bench: Bench, images: list[str], base: str) -> int:
    """Bytes Docker stores for these images' layers above the base, each layer once (its
    chain), from the sizes in its layer database."""
    api = bench.daemon.client(timeout=600).api
    layerdb = bench.directory / "docker" / "image" / "overlay2" / "layerdb" / "sha256"
    below = len(api.inspect_image(base)["RootFS"]["Layers"])
    chains = {chain for image in images for chain in layers.chain_ids(api.inspect_image(image)["RootFS"]["Layers"])[below:]}
    return sum(int((layerdb / chain.removeprefix("sha256:") / "size").read_text()) for chain in chains)


def make_builder(bench: Bench, resolver: Resolver, scratch: Path, route: str, label: str = "", **settings
                 ) -> ImageBuilder:
    suffix = f"{route}-{len(settings)}{label}"
    return ImageBuilder(
        resolver=resolver, docker_client=bench.daemon.client(timeout=3600), base_image=bench.base_image,
        cache_dir=str(scratch / f"cache-{suffix}"),
        # a cold build compiles every package: no byte code kept by earlier runs on this bench
        bytecode_cache_dir=str(scratch / f"bytecode-{suffix}"),
        image_repo=f"condaspawner-realistic-{RUN_ID}-{suffix}",
        layered_images=route == "layered", build_timeout=7200, **settings)


async def cold_builds(bench: Bench, resolver: Resolver, scratch: Path, names: list[str], routes: list[str],
                      rounds: int = 1) -> None:
    print(f"\nCold builds on {CORES} cores (package cache warm; each build a new key; the floor "
          f"measured just before and just after the builds, their mean the ratios' floor)")
    for name in names:
        packages = ENVIRONMENTS[name]
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        least: list[float] = []
        results: dict[str, Timed] = {}
        for round_ in range(rounds):
            if round_:  # a cold build again: Docker would skip the layers the last round's images hold
                remove_images(bench, results.values())
                await settle_again(bench, resolver, scratch, name, f"round {round_}")
            floor, results = await cold_round(bench, resolver, scratch, name, routes, round_)
            main_route = "layered" if "layered" in results else routes[0]
            ratios.append(results[main_route].seconds / floor.seconds)
            cpu_ratios.append(results[main_route].cpu_seconds / floor.cpu_seconds)
            least.append(results[main_route].cpu_seconds / CORES / floor.seconds)
        if rounds > 1:
            print(f"  {name}: over {rounds} rounds, {main_route} cold build / floor median {statistics.median(ratios):.2f} "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})")
        print(f"cold build / floor, {name}: {statistics.median(ratios):.2f}")
        print(f"CPU-seconds cold build / floor, {name}: {statistics.median(cpu_ratios):.2f}")
        print(f"least possible on {CORES} cores / floor, {name}: {statistics.median(least):.2f}")
        print(f"  {name} runs: {check_imports(bench, results[main_route].info, packages)}")
        if "layered" in results:
            remove_images(bench, results.values())  # Docker skips layers it holds: none of this environment's
            after = await build_after_another(bench, resolver, scratch, name, packages)
            print(f"    layered, on a hub that built another environment before "
                  f"(ipykernel's closure built before): {after.seconds:.1f} s = {after.seconds / floor.seconds:.2f} x floor, "
                  f"{after.cpu_seconds:.1f} CPU-s: {after.breakdown_and_compile()}")
            print(f"cold build / floor, {name}, after another environment: {after.seconds / floor.seconds:.2f}")


async def settle_again(bench: Bench, resolver: Resolver, scratch: Path, name: str, label: str) -> None:
    """settle_daemon after removing images mid-run, on the environment installed anew (not timed)."""
    staging = await install_anew(resolver, request(name, ENVIRONMENTS[name], "settle"), scratch / "settle-env")
    settle_daemon(bench, staging, label.replace(" ", "-"))
    shutil.rmtree(staging, ignore_errors=True)


async def cold_round(bench: Bench, resolver: Resolver, scratch: Path, name: str, routes: list[str], round_: int
                     ) -> tuple[Floor, dict[str, Timed]]:
    """One floor before and one after a cold build by each route: the floors' mean, and the builds."""
    packages = ENVIRONMENTS[name]
    before = await floor_seconds(bench, resolver, request(name, packages, "floor"), scratch, f"r{round_}-before")
    results = {}
    for route in routes:
        say(f"{name}: cold build by the {route} route")
        results[route] = await timed_build(make_builder(bench, resolver, scratch, route, label=f"-r{round_}"),
                                           request(name, packages, f"cold-{route}-{round_}"))
    after = await floor_seconds(bench, resolver, request(name, packages, "floor"), scratch, f"r{round_}-after")
    floor = Floor((before.seconds + after.seconds) / 2, (before.cpu_seconds + after.cpu_seconds) / 2)
    size = next(iter(results.values())).info.size
    print(f"  {name}: floor (the installed bytes streamed once into a new layer) {floor.seconds:.1f} s "
          f"({before.seconds:.1f} s before, {after.seconds:.1f} s after), {floor.cpu_seconds:.1f} CPU-s; "
          f"image {size / 1e9:.2f} GB; load average {os.getloadavg()[0]:.1f}")
    for route, result in results.items():
        print(f"    {route:10} {result.seconds:7.1f} s = {result.seconds / floor.seconds:5.2f} x floor, "
              f"{result.cpu_seconds:.1f} CPU-s = {result.cpu_seconds / floor.cpu_seconds:.2f} x the floor's: "
              f"{result.breakdown_and_compile()}")
    return floor, results


async def build_after_another(bench: Bench, resolver: Resolver, scratch: Path, name: str, packages: tuple[str, ...]
                              ) -> Timed:
    """A new environment on a hub that has built before: every environment holds python and
    ipykernel; the first build kept the byte code it compiled and took from the base image
    (bytecode.py), so only the new packages are compiled. Its layers are all sent: python's sits on the base there, and
    above the large packages that do not depend on it here. The first build is not timed."""
    builder = make_builder(bench, resolver, scratch, "layered", label=f"-after-{name}")
    say(f"{name}: a first environment (python, ipykernel), then {name} on the same builder")
    await timed_build(builder, request("first", (), f"first-{name}"))
    return await timed_build(builder, request(name, packages, "after-another"))


async def shared_layers(bench: Bench, resolver: Resolver, scratch: Path, name: str, count: int) -> None:
    registry = start_registry(scratch / "registry")
    try:
        repository = registry.repository(f"condaspawner-realistic-{RUN_ID}")
        builder = make_builder(bench, resolver, scratch, "layered", registry=repository,
                               insecure_registries=[registry.host])
        disk, pushed, images = [], [], []
        for index in range(count):
            variant = VARIANTS[index % len(VARIANTS)]
            say(f"shared layers: environment {index + 1} of {count} ({name} + {', '.join(variant) or 'nothing'})")
            result = await timed_build(builder, request(name, ENVIRONMENTS[name] + variant, f"shared{index}"))
            images.append(result.info.tag)
            disk.append(stored_bytes(bench, images, bench.base_image))
            pushed.append(result.info.pushed_bytes or 0)
            say(f"  {result.seconds:.1f} s; stored for the {index + 1} so far {disk[-1] / 1e9:.2f} GB; "
                f"pushed {pushed[-1] / 1e6:.1f} MB")
        differ = "; ".join(f"{index + 1}: {', '.join(VARIANTS[index % len(VARIANTS)]) or 'nothing more'}"
                           for index in range(count))
        print(f"\nLayers shared: {count} environments of the {name} stack differing in small packages "
              f"or python's patch release ({differ})")
        print(f"  stored above the base: {disk[0] / 1e9:.2f} GB for the first, {disk[-1] / 1e9:.2f} GB for all {count}; "
              f"pushed {pushed[0] / 1e6:.1f} MB first, then {', '.join(f'{p / 1e6:.1f}' for p in pushed[1:])} MB")
        print(f"disk for {count} envs / disk for 1: {disk[-1] / max(disk[0], 1):.2f}")
        print(f"registry bytes for envs 2-{count} / env 1: {sum(pushed[1:]) / max(pushed[0], 1):.2f}")
    finally:
        registry.stop()


def clean_up(bench: Bench, scratch: Path) -> None:
    client = bench.daemon.client(timeout=600)
    for image in client.images.list():
        if any(RUN_ID in tag for tag in image.tags):  # this run's repositories, local and pushed
            with contextlib.suppress(Exception):
                client.images.remove(image.id, force=True)
    shutil.rmtree(scratch, ignore_errors=True)


def settle_daemon(bench: Bench, staged: Path, label: str = "x") -> None:
    """Load ``staged`` as a throwaway image (not timed, removed with the run's images). On this
    bench (Docker 20.10, ext4 with online discard), removing an imported image, as the clean-up
    of an earlier run does with its floors', made the next large load or import 1.5-2x slower,
    even a minute later; a large load pays that in full. So no figure pays for earlier runs,
    and each floor's image stays until the clean-up, so that no build pays for a floor."""
    say("settling the daemon (a throwaway load, not timed)")
    mark(staged, f"settle {label}")
    result = imageload.load_image(bench.daemon.client(timeout=3600).api, bench.base_image, [whole_layer("settle", staged)],
                               {}, set(), layers.LayerMemo(None))
    bench.daemon.client(timeout=600).api.tag(result.image_id, f"condaspawner-settle-{RUN_ID}", label)


async def run(bench: Bench, arguments: argparse.Namespace) -> None:
    channel = bench.real_channel
    if channel is None:
        raise SystemExit(f"the bench built no real channel for --set {arguments.set}")
    resolver = Resolver(channel_urls={"conda-forge": channel.url}, package_cache_dir=str(bench.directory / "pkgs"))
    names = ["datascience"] + (["torch-cuda"] if arguments.set == "full" else [])
    scratch = bench.directory / "bench-realistic" / RUN_ID
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        say("filling the package cache (downloads are not part of any figure)")
        started = time.perf_counter()
        for name in names:
            warm = request(name, ENVIRONMENTS[name] + ("cs-alpha", "cs-beta", "cs-gamma"), "warm")
            await install_anew(resolver, warm, scratch / "warm")
            if name == names[0]:
                settle_daemon(bench, scratch / "warm")
            shutil.rmtree(scratch / "warm", ignore_errors=True)
        say(f"package cache ready in {time.perf_counter() - started:.1f} s")
        if arguments.routes:
            await cold_builds(bench, resolver, scratch, names, arguments.routes.split(","), arguments.rounds)
        if arguments.shared:
            await shared_layers(bench, resolver, scratch, names[-1], arguments.shared)
    finally:
        clean_up(bench, scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=("datascience", "full"), default="full",
                        help="the real package set (full: PyTorch and CUDA libraries, ~3 GB once)")
    parser.add_argument("--shared", type=int, default=5, help="environments in the shared-layers part (0: skip)")
    parser.add_argument("--routes", default="layered,dockerfile", help="build routes for the cold builds ('': none)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="cold builds of each environment, each between two floors (the printed ratio: the median)")
    arguments = parser.parse_args()
    bench = ensure_bench(real_set=arguments.set, say=say)  # it runs its own event loop
    asyncio.run(run(bench, arguments))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
