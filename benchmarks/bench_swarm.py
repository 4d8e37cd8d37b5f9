#!/usr/bin/env python
"""Benchmark the conda-swarm spawner on the multi-node bench: the pull a node must do, and the hub under a storm.

Prints figures (and ratios); asserts nothing. Run it as root (network namespaces) with

    .venv/bin/python benchmarks/bench_swarm.py [--runs N] [--gpu-runs N] [--link-mbit N] [--users N] [--pollers N] [--keep-logs DIR]

It sets up the single-host bench (``ensure_bench``: daemon, channel, offline base, proxy) and a
multi-node bench of its own (``condaspawner_bench/swarm.py``: a manager and two workers with two
fake GPUs each, a registry on the manager; state under ``.swarm-bench-benchmark/``), seeds the base
image into that registry, and runs a real hub with the ``conda-swarm`` spawner (the demo config,
as ``tests/test_e2e_swarm.py`` runs it; the hub in the host's namespace, the servers on the nodes,
profile ``python39``, real single-user servers). Then:

1. **Spawn-to-ready on a node that has the image vs one that must pull it**: a user pinned to
   worker1 (a ``pre_spawn_hook`` sets the placement constraint) spawns ``--runs`` times with the
   image already on worker1 and ``--runs`` times after it was removed there (every layer is then
   pulled from the registry), interleaved. POST -> ready, and Swarm's part (the progress page's
   "Starting your server" -> "Running on node": placing, pull, create, start); medians, ratios.
2. **The GPU held while a node pulls**: a GPU profile (``gpu39``: the same environment on one fake
   GPU) spawned ``--gpu-runs`` times each way by users pinned to worker1, the image and its base
   removed from worker1 before each (and the hub restarted before a pulls-first spawn: it
   remembers which nodes pulled which image): with the nodes pulling first (the default) and with
   ``prepull_timeout = 0`` (the node given the server pulls with its GPU held), interleaved. The
   GPU is held from the service's creation ("Starting your server") until the task runs
   ("Running on node"); worker1's link is shaped to ``--link-mbit`` (1000: a GPU node's LAN;
   unshaped, the bench's nodes pull from a registry in memory at memory speed). Printed: how long
   the nodes took to pull first, the GPU-held seconds each way, their ratio, spawn-to-ready each way.
3. **Hub API p95 during concurrent spawns across nodes**: ``--users`` users spawn at once
   (placed by Swarm on the three nodes; worker2 pulls the image for the first of them), while
   ``--pollers`` threads poll ``GET /hub/api/users``; latency p50/p95 during the storm against
   the same pollers on the idle hub just before, as a ratio; how many got ready, the wall time,
   and the spread over the nodes. Each server reserves 0.01 CPU and 64 MiB
   (``cpu_guarantee``/``mem_guarantee``) so that Swarm places them all at once: the point is the
   hub, not Swarm's CPU book-keeping.

On this 2-core machine 20 real single-user servers booting at once (about 7 CPU-seconds each)
take minutes and dominate the load: ``--users`` may be lowered, and the figure says how many ran.
At the end the servers and the hub are stopped, and the multi-node bench is torn down (its
registry storage, in ``.swarm-bench-benchmark/cache``, is kept for the next run). Progress goes to
stderr, figures to stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]  # the bench package and the tests' harness

from bench_spawn import (  # noqa: E402  (the single-host spawn benchmark's hub harness)
    BenchHub,
    Pollers,
    Spawn,
    make_hub,
    ms_figures,
    percentile,
    say,
    seconds_range,
    spawn,
)

from condaspawner_bench.bench import Bench, ensure_bench  # noqa: E402
from condaspawner_bench.netns import PrivateNetwork, nsenter  # noqa: E402
from condaspawner_bench.swarm import SwarmBench  # noqa: E402
from jupyterhub_condaspawner.gpus import LABEL_USER  # noqa: E402

RUN_ID = uuid.uuid4().hex[:8]
REPOSITORY = "condaspawner-bench-swarm"
PROFILE = "python39"
PINNED = f"pin{RUN_ID}"
GPU_PROFILE = "gpu39"
PULLS_FIRST, PULLS_WITH_GPU = f"gpufirst{RUN_ID}", f"gpuheld{RUN_ID}"
SPAWN_TIMEOUT_S = 900
# The benchmark's own multi-node bench (the tests' lives in .swarm-bench): both may run at once.
SWARM_DIR = REPO_ROOT / ".swarm-bench-benchmark"

SWARM_CONFIG = """
import os
c.JupyterHub.spawner_class = "conda-swarm"
c.DockerSpawner.client_kwargs = {{"base_url": {manager!r}}}
c.ImageBuilder.registry = {registry!r} + "/{repository}"
c.ImageBuilder.insecure_registries = [{registry!r}]
c.ImageBuilder.base_image = {base!r}
c.JupyterHub.hub_ip = {host!r}
c.JupyterHub.hub_connect_ip = {host!r}
c.Spawner.cpu_guarantee = 0.01
c.Spawner.mem_guarantee = "64M"
c.Spawner.start_timeout = {timeout}
c.JupyterHub.concurrent_spawn_limit = 0
c.ProfileCatalog.profiles_dir = {profiles!r}


def _pin(spawner):
    # Parts 1 and 2: these users' servers run on worker1 only; part 2's second user without pulls first.
    if spawner.user.name.startswith(({pinned!r}, {pulls_first!r}, {pulls_with_gpu!r})):
        spawner.extra_placement_spec = {{"constraints": ["node.hostname==worker1"]}}
    if spawner.user.name.startswith({pulls_with_gpu!r}):
        spawner.prepull_timeout = 0


c.Spawner.pre_spawn_hook = _pin
"""


def write_profiles(root: Path) -> Path:
    """The demo's python39 profile, and the same environment on one GPU (``GPU_PROFILE``)."""
    profiles = root / "profiles"
    shutil.copytree(REPO_ROOT / "demo" / "profiles" / "envs", profiles / "envs")
    shutil.copyfile(REPO_ROOT / "demo" / "profiles" / f"10-{PROFILE}.yaml", profiles / f"10-{PROFILE}.yaml")
    (profiles / f"20-{GPU_PROFILE}.yaml").write_text(
        f"display_name: Python 3.9 on one GPU\nslug: {GPU_PROFILE}\nenvironment: envs/python39.yml\ngpus: 1\n")
    return profiles


def make_swarm_hub(bench: Bench, swarm: SwarmBench, base: str, root: Path) -> BenchHub:
    return make_hub(bench, root, "hub", SWARM_CONFIG.format(
        manager=swarm.manager.docker_host, registry=swarm.registry_address, repository=REPOSITORY, base=base,
        host=swarm.host_address, pinned=PINNED, pulls_first=PULLS_FIRST, pulls_with_gpu=PULLS_WITH_GPU,
        timeout=SPAWN_TIMEOUT_S, profiles=str(write_profiles(root))), image_repo=REPOSITORY)


def remove_env_images(swarm: SwarmBench, node: str) -> int:
    """Remove this benchmark's environment images from ``node`` (their layers with them); bytes freed."""
    client = swarm.nodes[node].client()
    deadline = time.monotonic() + 120
    while client.containers.list(all=True, filters={"label": LABEL_USER}):  # the stopped server's, going
        if time.monotonic() > deadline:
            raise RuntimeError(f"the last server's container on {node} did not go")
        time.sleep(0.2)
    freed = 0
    for image in client.images.list():
        names = image.attrs.get("RepoDigests", []) + image.tags
        if any(f"/{REPOSITORY}" in name for name in names):
            freed += int(image.attrs.get("Size", 0))
            client.images.remove(image.id, force=True)
    return freed


def node_part(result: Spawn) -> float | None:
    """Seconds from the service's creation to its task running (placing, pull, create, start)."""
    start, running = result.at("Starting your server"), result.at("Running on node")
    return running - start if start is not None and running is not None else None


def timed_spawn(hub: BenchHub, user: str, profile: str = PROFILE) -> Spawn:
    result = spawn(hub, user, {"profile": profile}, SPAWN_TIMEOUT_S)
    if not result.ready:
        raise RuntimeError(f"{user}'s spawn failed: {result.failure}")
    return result


def part1(hub: BenchHub, swarm: SwarmBench, runs: int) -> None:
    say("part 1: warm-up spawn (builds and pushes the image on the first run)")
    hub.create_users([PINNED])
    warm = timed_spawn(hub, PINNED)
    say(f"warm-up ready in {warm.seconds:.1f} s")
    hub.stop_server(PINNED)
    cached: list[Spawn] = []
    pulled: list[Spawn] = []
    image_bytes = 0
    for run in range(runs):
        say(f"part 1, run {run + 1}/{runs}: worker1 has the image")
        cached.append(timed_spawn(hub, PINNED))
        hub.stop_server(PINNED)
        image_bytes = remove_env_images(swarm, "worker1") or image_bytes
        say(f"part 1, run {run + 1}/{runs}: worker1 must pull it ({image_bytes / 2**20:.0f} MiB unpacked)")
        pulled.append(timed_spawn(hub, PINNED))
        hub.stop_server(PINNED)
    ready_cached, ready_pulled = [s.seconds for s in cached], [s.seconds for s in pulled]
    node_cached = [v for v in map(node_part, cached) if v is not None]
    node_pulled = [v for v in map(node_part, pulled) if v is not None]
    print(f"spawn-to-ready, node has the image: {seconds_range(ready_cached)}")
    print(f"spawn-to-ready, node must pull it ({image_bytes / 2**20:.0f} MiB unpacked): {seconds_range(ready_pulled)}")
    print(f"spawn-to-ready ratio must-pull/has-image: "
          f"{statistics.median(ready_pulled) / statistics.median(ready_cached):.2f}")
    if node_cached and node_pulled:
        ratio = statistics.median(node_pulled) / statistics.median(node_cached)
        print(f"service created -> task running, has the image: {seconds_range(node_cached)}; "
              f"must pull: {seconds_range(node_pulled)}; ratio {ratio:.2f}")


def remove_whole_image(swarm: SwarmBench, base: str) -> int:
    """The environment images and the base below them removed from worker1: its next server pulls
    every layer (a GPU node that never ran this base, as a CUDA image's GBs would be)."""
    image_bytes = remove_env_images(swarm, "worker1")
    client = swarm.nodes["worker1"].client()
    client.containers.prune()  # ended pull jobs' containers: an image one uses stays, untagged
    for image in client.images.list(all=True):
        if not image.tags and not image.attrs.get("RepoDigests"):
            client.images.remove(image.id, force=True)  # what the prune freed
    for image in client.images.list():
        if base in image.attrs.get("RepoDigests", []) + image.tags:
            client.images.remove(image.id, force=True)
    return image_bytes


def limit_link(swarm: SwarmBench, node: str, mbit: int) -> list[str]:
    """Traffic to ``node`` shaped to ``mbit`` Mbit/s (its switch port's egress); the command that undoes it."""
    network = swarm.network
    assert network is not None
    port = f"p{list(network.nodes).index(node)}-{network.tag}"
    subprocess.run(network_command(network, "tc", "qdisc", "add", "dev", port, "root", "tbf", "rate", f"{mbit}mbit",
                                   "burst", "1mb", "latency", "100ms"), check=True)
    return network_command(network, "tc", "qdisc", "del", "dev", port, "root")


def network_command(network: PrivateNetwork, *argv: str) -> list[str]:
    return nsenter(network.switch_path, *argv)


def part_gpu_pull(hub: BenchHub, swarm: SwarmBench, base: str, runs: int, mbit: int) -> None:
    say("GPU part: warm-up spawn (builds and pushes the GPU profile's image)")
    hub.create_users([PULLS_FIRST, PULLS_WITH_GPU])
    timed_spawn(hub, PULLS_FIRST, GPU_PROFILE)
    hub.stop_server(PULLS_FIRST)
    first: list[Spawn] = []
    held: list[Spawn] = []
    undo = limit_link(swarm, "worker1", mbit) if mbit else []
    try:
        pull_runs(hub, swarm, base, runs, first, held)
    finally:
        if undo:
            subprocess.run(undo, check=True)
    link = f" (worker1's link shaped to {mbit} Mbit/s)" if mbit else ""
    held_first = [v for v in map(node_part, first) if v is not None]
    held_with = [v for v in map(node_part, held) if v is not None]
    pulls = [pulled - asked for asked, pulled in ((s.at("Pulling the image"), s.at("Pulled the image")) for s in first)
             if asked is not None and pulled is not None]
    print(f"nodes pulling first{link}: {seconds_range(pulls)}, no GPU held")
    print(f"GPU held before the server ran, node must pull{link}: nodes pull first {seconds_range(held_first)}; "
          f"node pulls with the GPU held {seconds_range(held_with)}")
    if held_first and held_with:
        print(f"GPU-seconds held before the server ran, ratio pulls-first/pull-with-GPU: "
              f"{statistics.median(held_first) / statistics.median(held_with):.2f}")
    print(f"spawn-to-ready, node must pull: nodes pull first {seconds_range([s.seconds for s in first])}; "
          f"node pulls with the GPU held {seconds_range([s.seconds for s in held])}")


def pull_runs(hub: BenchHub, swarm: SwarmBench, base: str, runs: int, first: list[Spawn], held: list[Spawn]) -> None:
    for run in range(runs):
        for user, results in ((PULLS_FIRST, first), (PULLS_WITH_GPU, held)):
            image_bytes = remove_whole_image(swarm, base)
            if user == PULLS_FIRST:  # the hub remembers which nodes pulled which image: a new hub process
                hub.stop()
                hub.start()
            say(f"GPU part, run {run + 1}/{runs}: {user}, worker1 must pull the image "
                f"({image_bytes / 2**20:.0f} MiB unpacked)")
            results.append(timed_spawn(hub, user, GPU_PROFILE))
            say("  " + "; ".join(f"{stamp - results[-1].posted:.1f} s {event.get('message', '')}"
                                 for stamp, event in results[-1].events))
            hub.stop_server(user)


def part2(hub: BenchHub, users: int, pollers_count: int) -> None:
    names = [f"storm{RUN_ID}{index:02d}" for index in range(users)]
    hub.create_users(names)
    say(f"part 2: idle hub, {pollers_count} pollers for 5 s")
    idle = Pollers(hub, pollers_count).start()
    time.sleep(5)
    idle.stop()
    say(f"part 2: {users} spawns at once")
    results: dict[str, Spawn] = {}
    during = Pollers(hub, pollers_count).start()
    started = time.monotonic()
    threads = [threading.Thread(target=lambda name=name: results.__setitem__(
        name, spawn(hub, name, {"profile": PROFILE}, SPAWN_TIMEOUT_S))) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    during.stop()
    ready = [result for result in results.values() if result.ready]
    nodes: dict[str, int] = {}
    for name in names:
        model = hub.server_model(name)
        node = ((model or {}).get("state") or {}).get("condaspawner", {}).get("node") if model else None
        nodes[node or "none"] = nodes.get(node or "none", 0) + 1
    idle_p95, storm_p95 = percentile(idle.latencies, 95), percentile(during.latencies, 95)
    print(f"concurrent spawns across nodes: {len(ready)} of {users} ready in {wall:.1f} s wall; "
          f"spawn-to-ready {seconds_range([r.seconds for r in ready])}; "
          f"servers per node: {', '.join(f'{k} {v}' for k, v in sorted(nodes.items()))}")
    for result in results.values():
        if not result.ready:
            print(f"  {result.user}: {result.failure[:200]}")
    print(f"hub API (GET /hub/api/users, {pollers_count} pollers), idle: {ms_figures(idle.latencies)}")
    print(f"hub API during {users} concurrent spawns: {ms_figures(during.latencies)}; "
          f"{len(during.errors)} errors")
    print(f"hub API p95 ratio storm/idle: {storm_p95 / idle_p95:.2f}")
    for name in names:
        hub.api("DELETE", f"/users/{name}/servers/")
    for name in names:
        hub.stop_server(name, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="part 1: spawns per case (default 3)")
    parser.add_argument("--gpu-runs", type=int, default=3,
                        help="the GPU held while a node pulls: spawns per case (default 3; 0: skip)")
    parser.add_argument("--link-mbit", type=int, default=1000,
                        help="the GPU part: worker1's link shaped to this many Mbit/s, as a GPU node's LAN (0: not shaped)")
    parser.add_argument("--users", type=int, default=20, help="part 2: spawns at once (default 20; 0: skip)")
    parser.add_argument("--pollers", type=int, default=4, help="part 2: concurrent hub API pollers (default 4)")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the hub log here before clean-up")
    arguments = parser.parse_args()

    bench = ensure_bench(say=say)
    root = SWARM_DIR / "runs" / RUN_ID
    started = time.monotonic()
    swarm = SwarmBench.start(SWARM_DIR, cache_dir=SWARM_DIR / "cache", say=say)
    hub: BenchHub | None = None
    try:
        base = swarm.seed_image(bench.daemon.client(), bench.base_image)
        swarm.pull(base, ["manager"])  # the manager builds the environment images
        hub = make_swarm_hub(bench, swarm, base, root)
        hub.start()
        if arguments.runs > 0:
            part1(hub, swarm, arguments.runs)
        if arguments.gpu_runs > 0:
            part_gpu_pull(hub, swarm, base, arguments.gpu_runs, arguments.link_mbit)
        if arguments.users > 0:
            part2(hub, arguments.users, arguments.pollers)
        print(f"machine: {os.cpu_count()} cores; swarm: "
              + ", ".join(f"{node.name} ({len(node.gpus)} fake GPUs)" for node in swarm.nodes.values()))
    finally:
        if hub is not None:
            if arguments.keep_logs is not None and hub.log_path.exists():
                arguments.keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(hub.log_path, arguments.keep_logs / f"bench-swarm-{RUN_ID}.log")
            for service in swarm.manager_client().services.list(filters={"label": LABEL_USER}):
                service.remove()
            hub.stop()
        swarm.stop()
        shutil.rmtree(root, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.1f} s")
    sys.stdout.flush()
    time.sleep(0.3)  # py-rattler 0.28 may abort at interpreter exit right after an awaited call


if __name__ == "__main__":
    main()
