#!/usr/bin/env python
"""Benchmark spawns on a real hub: cache-hit spawn vs plain DockerSpawner, and a spawn storm.

Prints figures next to the goals from the issue; it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_spawn.py [--spawns N] [--users N] [--envs N] [--pollers N] [--keep-logs DIR]

It sets the bench up with ``condaspawner_bench.bench.ensure_bench()`` (Docker
daemon, local conda channel, offline base image, configurable-http-proxy; all cached)
and runs real JupyterHub processes from ``demo/jupyterhub_config.py`` through the
``Hub`` harness of ``tests/fixtures_hub.py``: host networking, everything on
127.0.0.1, a per-run image repo ``condaspawner-benchspawn-<run>`` and state under
``<bench>/bench-spawn/<run>/``.

1. P1, end to end: spawn-to-ready time of a cache-hit CondaSpawner spawn (profile
   ``python39``, its image already built) against a plain DockerSpawner hub serving
   the very same image, ``--spawns`` spawns each, interleaved; medians and the ratio,
   and where the time goes: the spawner's own work (POST -> docker's container
   "start" event), the server booting (-> its first activity report in the hub
   log) and the hub noticing it (JupyterHub's randomised polling -> ready).
2. P7, a storm: ``--users`` users spawn at once, spread over ``--envs`` new custom
   environments (profile ``python39`` plus an environment.yml with different packages
   of the dev channel, and a variable making each key new): how many get ready, how
   many builds run (from the hub log) and how many reused layers Docker already had
   (from the build logs), the wall time, and the hub API's latency seen by
   ``--pollers`` concurrent pollers during the storm against the same pollers on the
   idle hub just before. ``--users 0`` skips it.

At the end every server is stopped, the hubs are stopped, and this run's containers,
home volumes, images and state are removed; the daemon, channel, base image and
package cache stay. Progress goes to stderr, figures to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]  # the bench package and the tests' harness

from fixtures_hub import TOKEN, Hub, free_port  # the tests' hub harness

from condaspawner_bench.bench import Bench, ensure_bench

RUN_ID = uuid.uuid4().hex[:8]
IMAGE_REPO = f"condaspawner-benchspawn-{RUN_ID}"
VOLUME_PREFIX = "condaspawner-demo-"  # demo/jupyterhub_config.py: one home volume per user
PROFILE = "python39"
P1_RATIO_GOAL = 1.10

# Both hubs: an API token for the benchmark, and POST returns at once (progress streams the rest).
COMMON_CONFIG = f"""
c = get_config()
c.JupyterHub.services = [{{"name": "bench", "api_token": {TOKEN!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "bench",
    "scopes": ["admin:users", "admin:servers", "access:servers", "read:users", "list:users"],
    "services": ["bench"],
}}]
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
"""
# The baseline hub: plain DockerSpawner with CondaSpawner's image and the profile's limits.
BASELINE_CONFIG = """
from dockerspawner import DockerSpawner
from jupyterhub.utils import random_port


class HostNetworkDockerSpawner(DockerSpawner):
    # DockerSpawner reads published ports by default; host networking publishes none.

    async def start(self):
        self.ip = "127.0.0.1"
        self.port = random_port()  # a fresh loopback port per start, as CondaSpawner does
        return await super().start()

    async def get_ip_and_port(self):
        return "127.0.0.1", self.port


c.JupyterHub.spawner_class = HostNetworkDockerSpawner
c.DockerSpawner.image = {image!r}
c.DockerSpawner.network_name = "host"
c.DockerSpawner.use_internal_ip = True
c.DockerSpawner.cpu_limit = {cpu_limit!r}   # the python39 profile's limits, which CondaSpawner applies
c.DockerSpawner.mem_limit = {mem_limit!r}
"""


def say(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def seconds_range(values: list[float]) -> str:
    if not values:
        return "none"
    return f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"


def memory_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def median_difference(values: list[float], baseline: list[float]) -> str:
    if not values or not baseline:
        return "no difference (no samples)"
    return f"{(statistics.median(values) - statistics.median(baseline)) * 1000:+.0f} ms"


def ms_figures(seconds: list[float]) -> str:
    if not seconds:
        return "no samples"
    ms = [s * 1000 for s in seconds]
    return f"p50 {percentile(ms, 50):.1f} ms, p95 {percentile(ms, 95):.1f} ms, max {max(ms):.1f} ms"


# The storm's environments differ in their packages (the dev channel's), not only in a variable.
STORM_PACKAGES = ((), ("cs-alpha=1.0",), ("cs-beta",), ("cs-gamma",), ("cs-alpha=2.0",), ("cs-alpha=1.1", "pip"))


def env_text(label: str, packages: tuple[str, ...] = ()) -> str:
    """A custom environment.yml as a user posts it, a new key thanks to its variable."""
    dependencies = ", ".join(("python=3.9", "ipykernel", *packages))
    return (f"name: {label}\nchannels: [conda-forge]\ndependencies: [{dependencies}]\n"
            f"variables: {{BENCH_ID: {label}-{uuid.uuid4().hex}}}\n")


# ---------------------------------------------------------------- the hubs


class BenchHub(Hub):
    """The tests' Hub, plus: progress events with their arrival time, bulk user creation,
    the server-up moment from the hub log, and the hub process's CPU time."""

    def timed_progress(self, user: str, timeout: float) -> list[tuple[float, dict]]:
        request = urllib.request.Request(f"{self.url}/hub/api/users/{user}/servers//progress",
                                         headers={"Authorization": f"token {TOKEN}"})
        events: list[tuple[float, dict]] = []
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                if line.startswith(b"data:"):
                    event = json.loads(line[5:])
                    events.append((time.monotonic(), event))
                    if event.get("ready") or event.get("failed"):
                        break
        return events

    def create_users(self, names: list[str]) -> None:
        status, body = self.api("POST", "/users", {"usernames": names})
        if status not in (201, 409):
            raise RuntimeError(f"creating users: {status} {body}")

    def mark_server_up(self, result: Spawn) -> None:
        """Set ``result.server_up`` from the hub log: the server's first activity report after the POST."""
        pattern = re.compile(r"^\[\w (\S+ \S+) JupyterHub log:\d+\] 200 POST /hub/api/users/"
                             + re.escape(result.user) + r"/activity ", re.MULTILINE)
        for match in pattern.finditer(self.log()):
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            if stamp >= result.posted_wall:
                result.server_up = stamp - result.posted_wall
                return

    def cpu_seconds(self) -> float:
        """User + system CPU time of the hub process so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HUBS: list[BenchHub] = []    # every hub this run made, for the clean-up
USERS: list[str] = []        # every user this run made: containers jupyter-<user>, volumes


def make_hub(bench: Bench, root: Path, name: str, extra_config: str, image_repo: str = IMAGE_REPO) -> BenchHub:
    """A hub (not started) with the demo config, COMMON_CONFIG and ``extra_config``, its state
    under ``root``/``name``, and images in ``image_repo``."""
    state = root / name
    state.mkdir(parents=True)
    extra = state / "extra_config.py"
    extra.write_text(COMMON_CONFIG + extra_config)
    env = {
        **os.environ,
        "CONDASPAWNER_BENCH_DIR": str(bench.directory),
        "CONDASPAWNER_DEMO_STATE": str(state),
        "CONDASPAWNER_DEMO_PORT": str(free_port()),
        "CONDASPAWNER_DEMO_HUB_PORT": str(free_port()),
        "CONDASPAWNER_DEMO_PROXY_PORT": str(free_port()),
        "CONDASPAWNER_PROXY_COMMAND": "\n".join(bench.proxy_command),
        "CONDASPAWNER_DEMO_PROFILES": str(REPO_ROOT / "demo" / "profiles"),
        "CONDASPAWNER_DEMO_IMAGE_REPO": image_repo,
        "CONDASPAWNER_DEMO_EXTRA_CONFIG": str(extra),
    }
    hub = BenchHub(state, env)
    HUBS.append(hub)
    return hub


# ---------------------------------------------------------------- one spawn


@dataclass
class Spawn:
    user: str
    posted: float = 0.0                  # monotonic time of the POST
    posted_wall: float = 0.0             # the same, as time.time() (compared with docker's events)
    container_start: float | None = None  # seconds from the POST to docker's "start" event
    server_up: float | None = None       # seconds from the POST to the server's first activity report
    post_status: int = 0
    post_seconds: float = 0.0
    events: list[tuple[float, dict]] = field(default_factory=list)
    error: str = ""

    @property
    def ready(self) -> bool:
        return bool(self.events) and bool(self.events[-1][1].get("ready"))

    @property
    def failure(self) -> str:
        if self.error:
            return self.error
        if self.events and self.events[-1][1].get("failed"):
            return self.events[-1][1].get("message", "failed")
        return "" if self.ready else "no ready event"

    @property
    def seconds(self) -> float:
        """POST -> the ready event."""
        return self.events[-1][0] - self.posted

    def between(self, first: str | None, last: str | None) -> float | None:
        """Seconds between two marks: None (the POST), "container", "up" or "ready"."""
        marks = {None: 0.0, "container": self.container_start, "up": self.server_up,
                 "ready": self.seconds if self.ready else None}
        if marks[first] is None or marks[last] is None:
            return None
        return marks[last] - marks[first]

    def at(self, prefix: str) -> float | None:
        """Seconds from the POST to the first event whose message starts with ``prefix``."""
        return next((stamp - self.posted for stamp, event in self.events
                     if event.get("message", "").startswith(prefix)), None)


def spawn(hub: BenchHub, user: str, options: dict, timeout: float) -> Spawn:
    result = Spawn(user)
    result.posted, result.posted_wall = time.monotonic(), time.time()
    try:
        result.post_status, body = hub.api("POST", f"/users/{user}/servers/", options)
        result.post_seconds = time.monotonic() - result.posted
        if result.post_status not in (201, 202):
            result.error = f"POST {result.post_status}: {body}"
            return result
        result.events = hub.timed_progress(user, timeout)
    except (OSError, http.client.HTTPException, ValueError) as error:  # timeout, reset: reported, not raised
        result.error = f"{type(error).__name__}: {error}"
    return result


class ContainerStarts:
    """Docker's container "start" events, by container name, read in a thread."""

    def __init__(self, bench: Bench):
        self.starts: dict[str, list[float]] = {}
        self._stream = bench.daemon.client(timeout=None).events(
            filters={"type": "container", "event": "start"}, decode=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # close() makes the blocked read fail: the end
            for event in self._stream:
                name = event.get("Actor", {}).get("Attributes", {}).get("name", "")
                self.starts.setdefault(name, []).append(event["timeNano"] / 1e9)

    def annotate(self, result: Spawn) -> None:
        """Set ``result.container_start``: the first start of jupyter-<user> after its POST."""
        stamps = [t for t in self.starts.get(f"jupyter-{result.user}", []) if t >= result.posted_wall]
        result.container_start = min(stamps) - result.posted_wall if stamps else None

    def close(self) -> None:
        self._stream.close()


def proxied_request_seconds(hub: BenchHub, user: str) -> tuple[int, float]:
    """The first request to the ready server through the proxy (its /api/status)."""
    started = time.monotonic()
    status, _ = hub.request("GET", f"/user/{user}/api/status")
    return status, time.monotonic() - started


def container_cpu_seconds(bench: Bench, name: str) -> float:
    """CPU time a container has used so far (all its processes), from docker's stats."""
    stats = bench.daemon.client().containers.get(name).stats(stream=False)
    return stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9


def stop(hub: BenchHub, user: str) -> float:
    started = time.monotonic()
    hub.stop_server(user)
    return time.monotonic() - started


# ---------------------------------------------------------------- P1


def bench_p1(bench: Bench, root: Path, spawns: int, starts: ContainerStarts) -> tuple[BenchHub, str]:
    conda_user, docker_user = f"c{RUN_ID}", f"d{RUN_ID}"
    USERS.extend([conda_user, docker_user])
    hub = make_hub(bench, root, "conda-hub", "")
    say(f"P1: starting the CondaSpawner hub on {hub.url}")
    hub.start()
    hub.create_users([conda_user])
    say(f"P1: first spawn of profile {PROFILE} (builds {IMAGE_REPO}:..., docker may reuse layers)")
    first = spawn(hub, conda_user, {"profile": PROFILE}, timeout=600)
    if not first.ready:
        raise RuntimeError(f"the first CondaSpawner spawn failed: {first.failure}\n{hub.log()[-3000:]}")
    saved = hub.server_model(conda_user)["state"]["condaspawner"]
    image = saved["image"]
    stop(hub, conda_user)
    built = "built" if first.at("First build") is not None else "found cached"
    say(f"P1: first spawn {first.seconds:.1f} s ({built} {image})")

    baseline = make_hub(bench, root, "docker-hub", BASELINE_CONFIG.format(image=image, cpu_limit=1.0, mem_limit="2G"))
    say(f"P1: starting the plain DockerSpawner hub on {baseline.url} with image {image}")
    baseline.start()
    try:
        baseline.create_users([docker_user])
        say("P1: a warm-up spawn on each hub (home volume creation, page cache), not timed")
        for one_hub, user, options in ((hub, conda_user, {"profile": PROFILE}), (baseline, docker_user, {})):
            warm = spawn(one_hub, user, options, timeout=120)
            if not warm.ready:
                raise RuntimeError(f"warm-up spawn of {user} failed: {warm.failure}\n{one_hub.log()[-3000:]}")
            stop(one_hub, user)

        runs: dict[str, list[Spawn]] = {"conda": [], "docker": []}
        proxied: dict[str, list[float]] = {"conda": [], "docker": []}
        stops: dict[str, list[float]] = {"conda": [], "docker": []}
        boot_cpu: list[float] = []  # CPU-seconds each CondaSpawner server had used once ready
        failures: list[str] = []
        sides = {"conda": (hub, conda_user, {"profile": PROFILE}), "docker": (baseline, docker_user, {})}
        load_before = os.getloadavg()[0]
        for round_index in range(spawns):
            order = ["conda", "docker"] if round_index % 2 == 0 else ["docker", "conda"]
            for side in order:
                one_hub, user, options = sides[side]
                result = spawn(one_hub, user, options, timeout=120)
                if result.ready:
                    starts.annotate(result)
                    one_hub.mark_server_up(result)
                    runs[side].append(result)
                    if side == "conda":
                        boot_cpu.append(container_cpu_seconds(bench, f"jupyter-{user}"))
                    status, seconds = proxied_request_seconds(one_hub, user)
                    if status == 200:
                        proxied[side].append(seconds)
                    else:
                        failures.append(f"{side} round {round_index}: GET /user/{user}/api/status -> {status}")
                else:
                    failures.append(f"{side} round {round_index}: {result.failure}")
                stops[side].append(stop(one_hub, user))
            say(f"P1: round {round_index + 1}/{spawns}: conda "
                f"{runs['conda'][-1].seconds if runs['conda'] else float('nan'):.2f} s, docker "
                f"{runs['docker'][-1].seconds if runs['docker'] else float('nan'):.2f} s")
    finally:
        baseline.stop()

    conda_times = [run.seconds for run in runs["conda"]]
    docker_times = [run.seconds for run in runs["docker"]]
    if conda_times and docker_times:
        ratio = statistics.median(conda_times) / statistics.median(docker_times)
        verdict = "meets" if ratio <= P1_RATIO_GOAL else "misses"
        print(f"P1 cache-hit spawn -> ready, CondaSpawner vs plain DockerSpawner, same image {image}: "
              f"ratio of medians {ratio:.2f} (goal <= {P1_RATIO_GOAL:.2f}; {verdict} it)")
    else:
        print(f"P1 cache-hit spawn -> ready: no ratio, spawns failed: {failures}")
    print(f"  CondaSpawner:       {seconds_range(conda_times)} over {len(conda_times)}/{spawns} spawns")
    print(f"  DockerSpawner:      {seconds_range(docker_times)} over {len(docker_times)}/{spawns} spawns "
          f"(baseline: same image, network, cpu/mem limits; own hub process, run interleaved)")
    print(f"  difference of medians: {median_difference(conda_times, docker_times)}; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")

    def part(since: str | None, until: str | None) -> dict[str, list[float]]:
        return {side: [t for t in (r.between(since, until) for r in runs[side]) if t is not None] for side in runs}

    print("  where the time goes (conda vs docker):")
    for label, since, until in (
        ("POST -> docker's 'start' event (the spawner's own work)", None, "container"),
        ("docker start -> server up (the same image booting)", "container", "up"),
        ("server up -> ready (the hub's wait_up: random backoff)", "up", "ready"),
    ):
        times = part(since, until)
        print(f"    {label:56} {seconds_range(times['conda'])} vs {seconds_range(times['docker'])}: "
              f"{median_difference(times['conda'], times['docker'])}")
    boot = part("container", "up")["conda"]
    print(f"server boot, median (s): {statistics.median(boot):.2f}" if boot else "server boot, median (s): none")
    print(f"  server CPU-seconds until ready, median: {statistics.median(boot_cpu):.2f} "
          f"(runs {min(boot_cpu):.2f}-{max(boot_cpu):.2f}; the container's cgroup, from docker stats)"
          if boot_cpu else "  server CPU-seconds until ready: none")
    up = part(None, "up")
    if up["conda"] and up["docker"]:
        print(f"  POST -> server up, without the hub's polling: ratio of medians "
              f"{statistics.median(up['conda']) / statistics.median(up['docker']):.2f} "
              f"(server up = its first POST /hub/api/users/:name/activity in the hub log)")
    lookups = [t for t in (run.at("Image ready") for run in runs["conda"]) if t is not None]
    starting = [t for t in (run.at("Starting your server") for run in runs["conda"]) if t is not None]
    started = [t for t in (run.at("Container started") for run in runs["conda"]) if t is not None]
    print(f"  CondaSpawner phases, from the POST: image lookup done {seconds_range(lookups)}; "
          f"'Starting your server' {seconds_range(starting)}; container started {seconds_range(started)}")
    print(f"  POST /users/:name/servers/ itself: conda {seconds_range([r.post_seconds for r in runs['conda']])}; "
          f"docker {seconds_range([r.post_seconds for r in runs['docker']])}")
    print(f"  first request through the proxy after ready (GET /user/:name/api/status): conda "
          f"{seconds_range(proxied['conda'])}; docker {seconds_range(proxied['docker'])}")
    print(f"  stop (DELETE -> server gone): conda {seconds_range(stops['conda'])}; docker {seconds_range(stops['docker'])}")
    print(f"  first CondaSpawner spawn of the profile ({built} the image): {first.seconds:.1f} s")
    for failure in failures:
        print(f"  FAILED: {failure}")
    return hub, image


# ---------------------------------------------------------------- P7


class Poller:
    """GET /hub/api/users every ~100 ms in a thread; latency of each answer."""

    def __init__(self, hub: BenchHub, interval: float = 0.1):
        self.hub, self.interval = hub, interval
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, body = self.hub.api("GET", "/users")
                if status != 200:
                    self.errors.append(f"{status}: {str(body)[:100]}")
            except (OSError, http.client.HTTPException, ValueError) as error:
                self.errors.append(f"{type(error).__name__}: {error}")
            elapsed = time.monotonic() - started
            self.latencies.append(elapsed)
            self._stop.wait(max(0.0, self.interval - elapsed))

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


class Pollers:
    """Several :class:`Poller` at once, as several browsers' spawn pages poll the hub."""

    def __init__(self, hub: BenchHub, count: int):
        self.pollers = [Poller(hub) for _ in range(max(1, count))]

    def start(self) -> Pollers:
        for poller in self.pollers:
            poller.start()
        return self

    def stop(self) -> None:
        for poller in self.pollers:
            poller.stop()

    @property
    def latencies(self) -> list[float]:
        return [latency for poller in self.pollers for latency in poller.latencies]

    @property
    def errors(self) -> list[str]:
        return [error for poller in self.pollers for error in poller.errors]


def builds_reusing_layers(builds_dir: Path, builds_after: float) -> dict[str, int]:
    """Build key -> how many layers it found already stored (the layered route's log lines),
    or steps docker took from its build cache (the Dockerfile route), for builds since then."""
    reused = {}
    for log in builds_dir.glob("*/build.log"):
        if log.stat().st_mtime < builds_after:
            continue
        text = log.read_text(errors="replace")
        reused[log.parent.name] = text.count(", already stored") + text.count("Using cache")
    return reused


def bench_p7(hub: BenchHub, count: int, env_count: int, timeout: float, starts: ContainerStarts,
             pollers: int = 4) -> None:
    names = [f"u{RUN_ID}x{index:02d}" for index in range(count)]  # [a-z0-9]: no escaping in docker names
    USERS.extend(names)
    hub.create_users(names)
    envs = [env_text(f"storm{index}", STORM_PACKAGES[index % len(STORM_PACKAGES)]) for index in range(env_count)]
    env_of = {name: index % env_count for index, name in enumerate(names)}

    say("P7: the API poller on the idle hub for 5 s (baseline)")
    idle = Pollers(hub, pollers).start()
    time.sleep(5)
    idle.stop()

    log_offset = len(hub.log())
    started_wall = time.time()
    cpu_before = hub.cpu_seconds()
    load_before = os.getloadavg()[0]
    memory_before = memory_available_gib()
    results: dict[str, Spawn] = {}
    barrier = threading.Barrier(count + 1)

    def one(name: str) -> None:
        barrier.wait()
        results[name] = spawn(hub, name, {"profile": PROFILE, "environment": envs[env_of[name]]}, timeout)

    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    say(f"P7: {count} users x {env_count} new environments spawn at once (timeout {timeout:.0f} s)")
    poller = Pollers(hub, pollers).start()
    barrier.wait()
    started = time.monotonic()
    deadline = started + timeout + 30
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    finished = time.monotonic()
    memory_after = memory_available_gib()
    poller.stop()
    cpu_storm = hub.cpu_seconds() - cpu_before
    storm_log = hub.log()[log_offset:]

    done = [results[name] for name in names if name in results]
    ready = [result for result in done if result.ready]
    hung = [name for name in names if name not in results]
    last_ready = max((r.events[-1][0] for r in ready), default=finished)
    builds = re.findall(r"Building image (\S+) ", storm_log)
    models = {}
    status, listing = hub.api("GET", "/users")
    if status == 200:
        models = {user["name"]: user.get("servers", {}).get("") for user in listing if user["name"] in env_of}
    images_per_env: dict[int, set[str]] = {}
    for name, model in models.items():
        image = ((model or {}).get("state") or {}).get("condaspawner", {}).get("image")
        if image:
            images_per_env.setdefault(env_of[name], set()).add(image)

    print(f"P7 storm: {count} users x {env_count} new environments at once, {os.cpu_count()} cores: "
          f"{len(ready)}/{count} ready (goal all), {len(builds)} builds in the hub log "
          f"(must be {env_count}), wall {last_ready - started:.1f} s (first POST -> last ready)")
    print(f"  hub API GET /hub/api/users, {pollers} concurrent pollers, during the storm: "
          f"{ms_figures(poller.latencies)} over {len(poller.latencies)} polls, {len(poller.errors)} errors; "
          f"idle hub just before: {ms_figures(idle.latencies)} over {len(idle.latencies)} polls")
    reused = builds_reusing_layers(hub.state / "builder" / "builds", builds_after=started_wall)
    print(f"  builds that reused layers: {sum(1 for count in reused.values() if count)} of {len(reused)} "
          f"({', '.join(f'{key[:12]}: {count}' for key, count in sorted(reused.items())) or 'none'}; "
          f"layers Docker already had, from each build's log)")
    print(f"  hub process CPU during the storm: {cpu_storm:.1f} s over {finished - started:.1f} s wall; load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} at the end; host memory available "
          f"{memory_before:.1f} GiB before, {memory_after:.1f} GiB with the servers up")
    print(f"  POST /users/:name/servers/ during the storm: "
          f"{ms_figures([r.post_seconds for r in done if r.post_status])}")
    distinct = sorted(set(builds))
    per_tag = {tag: builds.count(tag) for tag in distinct}
    tags = ", ".join(f"{tag.rsplit(':', 1)[-1]} x{n}" for tag, n in per_tag.items()) or "none"
    print(f"  builds per image: {tags}; "
          f"images per environment (from the server state): "
          f"{', '.join(f'env{index}: {len(images)}' for index, images in sorted(images_per_env.items())) or 'none'}")
    queued = sum(1 for r in done if r.at("waiting for") is not None)
    print(f"  users who saw 'waiting for N running builds' (max_concurrent_builds): {queued}")
    for index in range(env_count):
        group = [results[name] for name in names if env_of[name] == index and name in results]
        image_ready = [t for t in (r.at("Starting your server") for r in group) if t is not None]
        ready_at = [r.seconds for r in group if r.ready]
        print(f"  env{index} ({len(group)} users): image ready -> 'Starting your server' at "
              f"{min(image_ready) if image_ready else float('nan'):.1f}-{max(image_ready) if image_ready else float('nan'):.1f} s; "
              f"ready at {min(ready_at) if ready_at else float('nan'):.1f}-{max(ready_at) if ready_at else float('nan'):.1f} s "
              f"({len(ready_at)}/{len(group)} ready)")
    for result in ready:
        starts.annotate(result)
        hub.mark_server_up(result)
    container = [r.seconds - r.at("Starting your server") for r in ready if r.at("Starting your server") is not None]
    queue = [r.container_start - r.at("Starting your server") for r in ready
             if r.container_start is not None and r.at("Starting your server") is not None]
    boot = [t for t in (r.between("container", "up") for r in ready) if t is not None]
    noticed = [t for t in (r.between("up", "ready") for r in ready) if t is not None]
    print(f"  container phase ('Starting your server' -> ready) per user: {seconds_range(container)}; of which")
    print(f"    'Starting your server' -> docker's 'start' event {seconds_range(queue)}")
    print(f"    docker start -> server up (first activity report)  {seconds_range(boot)}")
    print(f"    server up -> ready (the hub's wait_up polling)      {seconds_range(noticed)}")
    failures = [(r.user, r.failure) for r in done if not r.ready]
    for name in hung:
        failures.append((name, f"no answer within {timeout:.0f} s"))
    for user, failure in failures[:10]:
        print(f"  NOT READY {user}: {failure[:300]}")
    if len(failures) > 10:
        print(f"  ... and {len(failures) - 10} more not ready")
    problems = [line for line in storm_log.splitlines() if re.match(r"\[(E|C) ", line) or "Traceback" in line]
    print(f"  hub log during the storm: {len(problems)} error lines"
          + "".join(f"\n    {line[:240]}" for line in dict.fromkeys(problems[:5])))

    say(f"P7: stopping the {len(ready)} servers")
    started = time.monotonic()
    threads = [threading.Thread(target=hub.stop_server, args=(name,), kwargs={"timeout": 120}) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    left = [name for name in names if hub.server_model(name) is not None]
    print(f"  stop all {count} at once: {time.monotonic() - started:.1f} s, {len(left)} server(s) left")


# ---------------------------------------------------------------- clean-up


def clean_up(bench: Bench, hubs: list[BenchHub], users: list[str], root: Path, keep_logs: Path | None) -> None:
    for hub in hubs:
        if hub.process and hub.process.poll() is None:
            status, listing = hub.api("GET", "/users")
            for user in listing if status == 200 else []:
                for server in user.get("servers", {}):
                    hub.api("DELETE", f"/users/{user['name']}/servers/{server}")
        hub.stop()
        if keep_logs is not None and hub.log_path.exists():
            keep_logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(hub.log_path, keep_logs / f"{hub.state.name}-{RUN_ID}.log")
    client = bench.daemon.client()
    names = {f"jupyter-{user}" for user in users}
    removed = 0
    for container in client.containers.list(all=True):
        tags = container.image.tags if container.image else []
        if container.name in names or any(tag.startswith(IMAGE_REPO + ":") for tag in tags):
            container.remove(force=True)
            removed += 1
    volumes = 0
    for volume in client.volumes.list():
        if volume.name in {VOLUME_PREFIX + user for user in users}:
            volume.remove(force=True)
            volumes += 1
    images = 0
    for image in client.images.list(name=IMAGE_REPO):
        for tag in image.tags:
            if tag.startswith(IMAGE_REPO + ":"):
                client.images.remove(tag, noprune=False)
        images += 1
    shutil.rmtree(root, ignore_errors=True)
    say(f"removed {removed} container(s), {volumes} volume(s), {images} {IMAGE_REPO} image(s) and {root}")


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spawns", type=int, default=10, help="timed P1 spawns per spawner")
    parser.add_argument("--users", type=int, default=20, help="P7: users spawning at once (0: no storm)")
    parser.add_argument("--envs", type=int, default=4, help="P7: distinct new environments among them")
    parser.add_argument("--pollers", type=int, default=4, help="P7: concurrent hub API pollers")
    parser.add_argument("--storm-timeout", type=float, default=420, help="P7: seconds each spawn may take")
    parser.add_argument("--skip-p1", action="store_true", help="only the storm")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the hub logs here before clean-up")
    arguments = parser.parse_args()

    bench = ensure_bench(say=say)
    root = bench.directory / "bench-spawn" / RUN_ID
    started = time.monotonic()
    starts = ContainerStarts(bench)
    try:
        if arguments.skip_p1:
            hub = make_hub(bench, root, "conda-hub", "")
            hub.start()
        else:
            hub, _ = bench_p1(bench, root, arguments.spawns, starts)
        if arguments.users > 0:
            bench_p7(hub, arguments.users, arguments.envs, arguments.storm_timeout, starts, arguments.pollers)
    finally:
        starts.close()
        clean_up(bench, HUBS, USERS, root, arguments.keep_logs)
    say(f"done in {time.monotonic() - started:.1f} s after set-up")
    sys.stdout.flush()
    time.sleep(0.3)  # py-rattler 0.28 may abort at interpreter exit right after an awaited call


if __name__ == "__main__":
    main()
