#!/usr/bin/env python
"""Benchmark the GPUs: allocator operations per second, and GPU-hours held idle over a day.

Prints figures next to the goals from issues 5 and 11; it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_gpus.py [--quick] [--seed N]

1. P6 throughput: allocate/release on a 64-GPU fake inventory (tests/fake_nvml.py) by
   60 users toggling their servers, asking for 1, 2 or 4 GPUs (70/20/10%); the mean
   number of busy GPUs and the refusals (which count as operations) are printed too.
   Goal: >= 10,000 operations per second.
2. A simulated day (a seeded trace of arrivals, work and compute bursts, breaks and
   meetings, forgotten servers and tabs left open, overnight jobs, first builds),
   replayed on a simulated clock through the product's own GpuAllocator, GpuQueue and
   GpuIdleCuller, with the fake NVML reporting each held GPU busy exactly while its
   user computes. Idle GPU-hours (held minus computing) of GPU-aware culling are
   compared with (a) activity-only culling, the generic jupyterhub-idle-culler's
   semantics (1 h without browser activity; an open tab counts as activity) and (b)
   static per-user assignment during office hours (08:00-18:00). The lines below are
   printed exactly so, for scripts:

       idle GPU-hours ratio gpu-aware/activity-only: X.XX      (goal <= 0.40)
       idle GPU-hours ratio gpu-aware/static office hours: X.XX
       GPU-seconds held during builds: N                        (goal 0)
       queue wait p50/p95 (s): X / Y    (a host with half the GPUs the users ask for)
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_nvml import FakeNvml  # the fake lives with the tests

from jupyterhub_condaspawner.culler import Cull, GpuIdleCuller
from jupyterhub_condaspawner.gpuqueue import GpuQueue
from jupyterhub_condaspawner.gpus import GpuAllocator, GpuInventory, GpuUnavailable

OPS_GOAL = 10_000
IDLE_RATIO_GOAL = 0.40  # gpu-aware / activity-only
HOUR = 3600.0
DAY = 24 * HOUR
MINUTE = 60.0
# Loop turns after each event: a release's dispatch, the grant, the waiter's inline NVML scan and
# return, its callback; retry timers that came due and their own scans and grants.
SETTLE_STEPS = 16


# -- 1. throughput ----------------------------------------------------------------------------


@dataclass
class Throughput:
    ops_per_second: float
    refused: int
    mean_busy: float  # GPUs held, averaged over the operations


def throughput(policy: str, operations: int, seed: int, rescan_interval: float = HOUR) -> Throughput:
    """Time ``operations`` allocate-or-release calls (each one op), refusals included."""
    allocator = GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(64)), policy=policy,
                             rescan_interval=rescan_interval)
    allocator.refresh()
    rng = random.Random(seed)
    users = [(f"user{i}", rng.choice(["", "gpu2"])) for i in range(60)]
    counts = rng.choices([1, 2, 4], weights=[70, 20, 10], k=operations)
    picks = [rng.randrange(len(users)) for _ in range(operations)]
    holding: dict[int, int] = {}
    refused = busy = busy_sum = 0
    start = time.perf_counter()
    for pick, count in zip(picks, counts):
        user, server = users[pick]
        if pick in holding:
            allocator.release(user, server)
            busy -= holding.pop(pick)
        else:
            try:
                allocator.allocate(user, server, count)
                holding[pick] = count
                busy += count
            except GpuUnavailable:
                refused += 1
        busy_sum += busy
    elapsed = time.perf_counter() - start
    return Throughput(operations / elapsed, refused, busy_sum / operations)


def report_throughput(quick: bool, seed: int) -> None:
    operations, runs = (20_000, 3) if quick else (50_000, 5)
    print(f"P6 allocate/release throughput, 64-GPU fake inventory, {operations:,} ops x {runs} runs")
    for policy in ("pack", "spread"):
        results = [throughput(policy, operations, seed + run) for run in range(runs)]
        rates = [result.ops_per_second for result in results]
        refused = statistics.median(result.refused for result in results)
        busy = statistics.median(result.mean_busy for result in results)
        verdict = "meets" if statistics.median(rates) >= OPS_GOAL else "MISSES"
        print(f"  {policy:6}: median {statistics.median(rates):,.0f} ops/s (runs {min(rates):,.0f}-"
              f"{max(rates):,.0f}; on average {busy:.0f} of 64 GPUs busy, {refused:,.0f} refusals per run)"
              f"  goal >= {OPS_GOAL:,}/s: {verdict}")
    rescanning = throughput("pack", operations // 10, seed, rescan_interval=0)
    print(f"  for scale, rescanning the fake inventory on every allocation (rescan_interval=0): "
          f"{rescanning.ops_per_second:,.0f} ops/s")


# -- 2. a simulated day --------------------------------------------------------------------------

GPU_IDLE_TIMEOUT_MIN = 30.0  # the example config's c.CondaSpawner.gpu_idle_timeout
ACTIVITY_TIMEOUT = HOUR  # jupyterhub-idle-culler --timeout=3600
ACTIVITY_CULL_EVERY = ACTIVITY_TIMEOUT / 2  # its default --cull-every
SAMPLE_INTERVAL = 30.0  # GpuAllocator.gpu_sample_interval's default
QUEUE_TIMEOUT = 600.0  # GpuAllocator.queue_timeout's default
OFFICE_HOURS = (8 * HOUR, 18 * HOUR)


@dataclass
class UserDay:
    """One user's day: when they are at the keyboard, when their GPUs compute, how they leave."""

    user: str
    gpus: int
    present: list[tuple[float, float]] = field(default_factory=list)
    compute: list[tuple[float, float]] = field(default_factory=list)
    stops_at_breaks: set[int] = field(default_factory=set)  # indexes of present blocks followed by a stop
    stops_at_end: bool = False
    tab_left_open: bool = False  # leaves without stopping, the notebook tab open on a desktop
    build_seconds: float = 0.0  # their own environment's first build, at the day's first spawn

    def computing(self, now: float) -> bool:
        return any(start <= now < end for start, end in self.compute)

    def browser_activity(self) -> list[tuple[float, float]]:
        """When the generic culler sees activity: at the keyboard, the tab open through the
        working day's breaks (unless the server was stopped), kernels computing, and an open
        tab after leaving until the day ends."""
        if not self.present:
            return []
        spans = list(self.present) + list(self.compute)
        for index, ((_, end), (next_start, _)) in enumerate(itertools.pairwise(self.present)):
            if index not in self.stops_at_breaks:
                spans.append((end, next_start))
        if self.tab_left_open:
            spans.append((self.present[-1][1], DAY))
        return merged(spans)


def lognormal_minutes(rng: random.Random, median: float, sigma: float) -> float:
    return rng.lognormvariate(0, sigma) * median * MINUTE


def generate_day(rng: random.Random, user: str) -> UserDay:
    day = UserDay(user, gpus=rng.choices([1, 2], weights=[85, 15])[0])
    if rng.random() < 0.12:  # not working today
        return day
    now = rng.uniform(7.5, 10.5) * HOUR
    leave = rng.uniform(16.5, 19.5) * HOUR
    had_lunch = False
    while now < leave:
        block_end = min(leave, now + lognormal_minutes(rng, 70, 0.5))
        day.present.append((now, block_end))
        day.compute += compute_bursts(rng, now, block_end)
        if not had_lunch and block_end > 12 * HOUR:
            gap, had_lunch = rng.uniform(40, 75) * MINUTE, True
        elif rng.random() < 0.2:
            gap = rng.uniform(45, 120) * MINUTE  # a meeting
        else:
            gap = rng.expovariate(1 / (12 * MINUTE))  # a short break
        if gap > 30 * MINUTE and rng.random() < 0.3:
            day.stops_at_breaks.add(len(day.present) - 1)
        now = block_end + gap
    if rng.random() < 0.12:  # a training run left going overnight
        start = day.present[-1][1]
        day.compute.append((start, min(DAY, start + rng.uniform(3, 10) * HOUR)))
    day.stops_at_end = rng.random() < 0.45
    day.tab_left_open = not day.stops_at_end and rng.random() < 0.5
    if rng.random() < 0.15:  # a new environment of their own: the first start builds it
        day.build_seconds = lognormal_minutes(rng, 4, 0.5)
    return day


def compute_bursts(rng: random.Random, start: float, end: float) -> list[tuple[float, float]]:
    """Alternate thinking/editing and GPU work; the last burst may run past the block (a job left running)."""
    bursts, now = [], start + rng.expovariate(1 / (8 * MINUTE))
    while now < end:
        burst_end = now + lognormal_minutes(rng, 12, 0.8)
        if burst_end > end and rng.random() > 0.3:
            burst_end = end
        bursts.append((now, min(DAY, burst_end)))
        now = burst_end + rng.expovariate(1 / (10 * MINUTE))
    return merged(bursts)


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def intersection(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(max(a, c), min(b, d)) for a, b in first for c, d in second if max(a, c) < min(b, d)]


def overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in intervals)


@dataclass
class Outcome:
    """What one replay measured."""

    held: float = 0.0  # GPU-seconds held
    computing: float = 0.0  # GPU-seconds held while the user computed
    idle_present: float = 0.0  # GPU-seconds held idle while the user was at the keyboard
    held_during_builds: float = 0.0  # GPU-seconds a server held while its image built
    waits: list[float] = field(default_factory=list)  # seconds each queued spawn waited for its GPUs
    waits_by_count: dict[int, list[float]] = field(default_factory=dict)  # the same, by GPUs asked for
    gave_up_by_count: dict[int, int] = field(default_factory=dict)
    spawns: int = 0
    gave_up: int = 0  # spawns that waited QUEUE_TIMEOUT and were refused
    culls: int = 0
    culls_present: int = 0  # of those, culls while the user was at the keyboard (their kernels' state lost)

    @property
    def idle_hours(self) -> float:
        return (self.held - self.computing) / HOUR


@dataclass
class _Server:
    state: str = "stopped"  # stopped, building, queued, running
    held: tuple[str, ...] = ()
    held_since: float = 0.0
    build: tuple[float, float] | None = None
    task: asyncio.Task | None = None
    built: bool = False


class DayReplay:
    """One day on one host, through the product's allocator, queue and (GPU-aware) culler.

    The clock is simulated: events (arrivals, compute bursts, stops, builds finishing,
    the hub's GPU samples, the generic culler's rounds) run in time order, and after
    each one the event loop runs until the queue has handed out what was freed.
    """

    def __init__(self, days: list[UserDay], host_gpus: int, policy: str, gpu_idle_minutes: float = GPU_IDLE_TIMEOUT_MIN,
                 queue_hold_after: float | None = None):
        self.days = {day.user: day for day in days}
        self.policy = policy  # "gpu-aware" or "activity-only"
        self.gpu_idle_minutes = gpu_idle_minutes
        self.now = 0.0
        self.nvml = FakeNvml.with_gpus(host_gpus)
        self.gpus = {gpu.uuid: gpu for gpu in self.nvml.gpus}
        clock = lambda: self.now  # noqa: E731
        hold = {} if queue_hold_after is None else {"queue_hold_after": queue_hold_after}
        self.allocator = GpuAllocator(inventory=GpuInventory(nvml=self.nvml), clock=clock, rescan_interval=DAY,
                                      queue_timeout=10 * DAY, gpu_sample_interval=SAMPLE_INTERVAL, **hold)
        self.queue = GpuQueue(self.allocator, clock=clock)
        self.culler = GpuIdleCuller(self.allocator, clock=clock)
        self.servers = {user: _Server() for user in self.days}
        self.events: list[tuple[float, int, str, str]] = []
        self.sequence = itertools.count()
        self.outcome = Outcome()

    def at(self, when: float, kind: str, user: str = "") -> None:
        if when <= DAY:
            heapq.heappush(self.events, (when, next(self.sequence), kind, user))

    async def run(self) -> Outcome:
        for day in self.days.values():
            for number, (start, end) in enumerate(day.present):
                self.at(start, "arrive", day.user)
                if number in day.stops_at_breaks or (number == len(day.present) - 1 and day.stops_at_end):
                    self.at(end, "user-stop", day.user)
            for start, _ in day.compute:
                self.at(start, "compute", day.user)
        if self.policy == "gpu-aware":
            for step in range(1, int(DAY / SAMPLE_INTERVAL) + 1):
                self.at(step * SAMPLE_INTERVAL, "sample")
        else:
            for step in range(1, int(DAY / ACTIVITY_CULL_EVERY) + 1):
                self.at(step * ACTIVITY_CULL_EVERY, "activity-cull")
        while self.events:
            self.now, _, kind, user = heapq.heappop(self.events)
            await getattr(self, "_" + kind.replace("-", "_"))(user)
            await self._settle()
        self.now = DAY
        for user in self.servers:
            self._released(user)
        return self.outcome

    # -- the users -------------------------------------------------------------------------

    async def _arrive(self, user: str) -> None:
        self._spawn(user)

    async def _compute(self, user: str) -> None:
        self._spawn(user)  # running a cell on a stopped server: they start it again

    async def _user_stop(self, user: str) -> None:
        await self._stop(user)

    def _spawn(self, user: str) -> None:
        server = self.servers[user]
        if server.state != "stopped":
            return
        day = self.days[user]
        self.outcome.spawns += 1
        self.allocator.check_feasible(user, "", day.gpus)  # the spawner's check at submit: holds nothing
        if day.build_seconds and not server.built:
            server.state, server.build = "building", (self.now, self.now + day.build_seconds)
            self.at(self.now + day.build_seconds, "built", user)
        else:
            self._join_queue(user)

    async def _built(self, user: str) -> None:
        server = self.servers[user]
        server.built = True
        if server.state == "building":
            self._join_queue(user)

    def _join_queue(self, user: str) -> None:
        server = self.servers[user]
        server.state = "queued"
        joined = self.now
        server.task = asyncio.ensure_future(self.queue.allocate(user, "", self.days[user].gpus))
        server.task.add_done_callback(lambda task: self._granted(user, task, joined))
        self.at(self.now + QUEUE_TIMEOUT, "queue-deadline", user)

    def _granted(self, user: str, task: asyncio.Task, joined: float) -> None:
        server = self.servers[user]
        if task.cancelled() or task.exception() is not None or server.state != "queued":
            return
        allocation = task.result()
        server.state, server.held, server.held_since = "running", allocation.uuids, self.now
        self.outcome.waits.append(self.now - joined)
        self.outcome.waits_by_count.setdefault(len(allocation.uuids), []).append(self.now - joined)
        if server.build:
            self.outcome.held_during_builds += len(allocation.uuids) * overlap(
                [server.build], allocation.since, DAY)
        if self.policy == "gpu-aware":
            self.culler.watch(user, "", timeout_minutes=self.gpu_idle_minutes, profile="GPU", stop=self._culled)

    async def _queue_deadline(self, user: str) -> None:
        server = self.servers[user]
        if server.state == "queued" and server.task is not None and not server.task.done():
            server.task.cancel()  # GpuAllocator.queue_timeout: "No GPU is free"; they try again later
            server.state = "stopped"
            self.outcome.gave_up += 1
            count = self.days[user].gpus
            self.outcome.gave_up_by_count[count] = self.outcome.gave_up_by_count.get(count, 0) + 1

    async def _stop(self, user: str) -> None:
        server = self.servers[user]
        if server.state == "queued" and server.task is not None:
            server.task.cancel()
        self._released(user)
        server.state = "stopped"

    def _released(self, user: str) -> None:
        server = self.servers[user]
        if server.state == "running":
            held_for = self.now - server.held_since
            day = self.days[user]
            computing = overlap(day.compute, server.held_since, self.now)
            self.outcome.held += len(server.held) * held_for
            self.outcome.computing += len(server.held) * computing
            present = overlap(day.present, server.held_since, self.now)
            computing_present = overlap(intersection(day.compute, day.present), server.held_since, self.now)
            self.outcome.idle_present += len(server.held) * (present - computing_present)
        self.culler.forget(user, "")
        self.allocator.release(user, "")
        server.held = ()

    # -- the hub ---------------------------------------------------------------------------

    async def _sample(self, _: str) -> None:
        holders = {uuid: user for user, server in self.servers.items() for uuid in server.held}
        for uuid, gpu in self.gpus.items():
            user = holders.get(uuid)
            gpu.utilization_gpu = 95 if user and self.days[user].computing(self.now) else 0
        scan = self.allocator.sample()
        for cull, stop in self.culler.observe(self.allocator.gpu_states(scan)):
            await stop(cull)

    async def _culled(self, cull: Cull) -> None:
        self.outcome.culls += 1
        if any(start <= self.now < end for start, end in self.days[cull.user].present):
            self.outcome.culls_present += 1
        await self._stop(cull.user)

    async def _activity_cull(self, _: str) -> None:
        """jupyterhub-idle-culler: stop servers with no browser activity for ACTIVITY_TIMEOUT."""
        for user, server in self.servers.items():
            if server.state != "running":
                continue
            seen = [end for start, end in self.days[user].browser_activity() if start <= self.now]
            last_activity = max([server.held_since, *(min(end, self.now) for end in seen)])
            if self.now - last_activity >= ACTIVITY_TIMEOUT:
                self.outcome.culls += 1
                await self._stop(user)

    async def _settle(self) -> None:
        for _ in range(SETTLE_STEPS):
            await asyncio.sleep(0)


class SimulatedLoop(asyncio.SelectorEventLoop):
    """An event loop on the replay's clock, so that a replay gives the same figures every run.

    The queue's retry timers (``asyncio.wait`` with a timeout) then fire in simulated time, at the
    first event after they are due, not after real seconds of the replay; and its NVML scans
    (``asyncio.to_thread``, the fake NVML in memory) run inline, not on a thread that finishes
    whenever the machine lets it.
    """

    def __init__(self, clock: Callable[[], float]):
        super().__init__()
        self._simulated = clock

    def time(self) -> float:
        return self._simulated()

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future:
        future = self.create_future()
        try:
            future.set_result(func(*args))
        except Exception as error:  # noqa: BLE001 -- handed to the awaiting code, as a thread's would be
            future.set_exception(error)
        return future


def replay(day: DayReplay) -> Outcome:
    with asyncio.Runner(loop_factory=lambda: SimulatedLoop(lambda: day.now)) as runner:
        return runner.run(day.run())


def static_office_hours(days: list[UserDay]) -> Outcome:
    """Every user owns their GPUs 08:00-18:00, whether they compute or not."""
    start, end = OFFICE_HOURS
    held = sum(day.gpus * (end - start) for day in days)
    computing = sum(day.gpus * overlap(day.compute, start, end) for day in days)
    idle_present = sum(day.gpus * (overlap(day.present, start, end)
                                   - overlap(intersection(day.compute, day.present), start, end)) for day in days)
    return Outcome(held=held, computing=computing, idle_present=idle_present)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def seeded_days(seed: int, users: int) -> list[UserDay]:
    rng = random.Random(seed)
    return [generate_day(rng, f"user{i}") for i in range(users)]


def simulate_day(seed: int, users: int) -> dict[str, Outcome | int]:
    days = seeded_days(seed, users)
    asked = sum(day.gpus for day in days)
    return {
        "asked": asked,
        "gpu-aware": replay(DayReplay(days, asked, "gpu-aware")),
        "activity-only": replay(DayReplay(days, asked, "activity-only")),
        "static": static_office_hours(days),
        "half-host": replay(DayReplay(days, asked // 2, "gpu-aware")),
        # For scale: the queue without its hold for older, bigger requests (they may starve).
        "half-host-no-hold": replay(DayReplay(days, asked // 2, "gpu-aware", queue_hold_after=10 * DAY)),
    }


def by_count(outcome: Outcome) -> str:
    """Grants, queue wait p50/p95 and spawns that gave up, per number of GPUs asked for."""
    parts = []
    for count in sorted(set(outcome.waits_by_count) | set(outcome.gave_up_by_count)):
        waits = outcome.waits_by_count.get(count, [])
        wait = f"wait p50/p95 {percentile(waits, 0.5):.0f} / {percentile(waits, 0.95):.0f} s" if waits else "no grant"
        parts.append(f"{count} GPU(s): {len(waits)} grants, {wait}, {outcome.gave_up_by_count.get(count, 0)} gave up")
    return "; ".join(parts)


def report_day(quick: bool, seed: int, users: int) -> None:
    print(f"\nSimulated day: {users} users, seed {seed}; GPU-aware culling after {GPU_IDLE_TIMEOUT_MIN:.0f} min "
          f"idle GPU, activity-only after {ACTIVITY_TIMEOUT / MINUTE:.0f} min without browser activity")
    runs = [simulate_day(seed + number, users) for number in range(1 if quick else 5)]
    first = runs[0]
    aware, activity, static, half = (first[k] for k in ("gpu-aware", "activity-only", "static", "half-host"))
    assert isinstance(aware, Outcome) and isinstance(activity, Outcome)
    assert isinstance(static, Outcome) and isinstance(half, Outcome)
    for name, outcome in (("gpu-aware", aware), ("activity-only", activity), ("static office hours", static)):
        print(f"  {name:20}: held {outcome.held / HOUR:7.1f} GPU-h, computing {outcome.computing / HOUR:6.1f}, "
              f"idle {outcome.idle_hours:7.1f} GPU-h (at the keyboard {outcome.idle_present / HOUR:5.1f}); "
              f"{outcome.spawns} spawns, {outcome.culls} culled ({outcome.culls_present} at the keyboard)")
    print(f"  host with half the GPUs asked for ({first['asked']} asked, {int(first['asked']) // 2} on the host): "
          f"{len(half.waits)} grants, {half.gave_up} spawns gave up after {QUEUE_TIMEOUT:.0f} s in the queue")
    print(f"idle GPU-hours ratio gpu-aware/activity-only: {aware.idle_hours / activity.idle_hours:.2f}")
    print(f"idle GPU-hours ratio gpu-aware/static office hours: {aware.idle_hours / static.idle_hours:.2f}")
    print(f"GPU-seconds held during builds: {sum(run['gpu-aware'].held_during_builds for run in runs):.0f}")
    print(f"queue wait p50/p95 (s): {percentile(half.waits, 0.5):.0f} / {percentile(half.waits, 0.95):.0f}")
    no_hold = first["half-host-no-hold"]
    assert isinstance(no_hold, Outcome)
    print(f"  by GPUs asked for: {by_count(half)}")
    print(f"  for scale, without queue_hold_after (an older 2-GPU start overtaken for ever): {by_count(no_hold)}")
    if quick:
        return
    days = seeded_days(seed, users)
    asked = sum(day.gpus for day in days)
    sweep = []
    for minutes in (10, 15, 60):
        other = replay(DayReplay(days, asked, "gpu-aware", gpu_idle_minutes=minutes))
        sweep.append(f"{minutes:.0f} min {other.idle_hours / activity.idle_hours:.2f} "
                     f"({other.culls} culled, {other.culls_present} at the keyboard)")
    print("  for scale, other gpu_idle_timeout values, idle ratio to activity-only: " + ", ".join(sweep))
    if len(runs) > 1:
        ratios = [run["gpu-aware"].idle_hours / run["activity-only"].idle_hours for run in runs]
        print(f"  over {len(runs)} seeds: gpu-aware/activity-only median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f}-{max(ratios):.2f} (goal <= {IDLE_RATIO_GOAL:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations and one seed (under 40 s)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--users", type=int, default=40)
    arguments = parser.parse_args()
    report_throughput(arguments.quick, arguments.seed)
    report_day(arguments.quick, arguments.seed, arguments.users)


if __name__ == "__main__":
    main()
