#!/usr/bin/env python
"""Benchmark the GPU allocator: operations per second, and GPU-hours held idle over a day.

Prints figures next to the goals from issue 5; it asserts nothing. Run it with

    .venv/bin/python benchmarks/bench_gpus.py [--quick] [--seed N]

1. P6 throughput: allocate/release on a 64-GPU fake inventory (tests/fake_nvml.py) by
   60 users toggling their servers, asking for 1, 2 or 4 GPUs (70/20/10%); the mean
   number of busy GPUs and the refusals (which count as operations) are printed too.
   Goal: >= 10,000 operations per second.
2. A simulated day (a seeded trace of arrivals, work and compute bursts, breaks and
   meetings, forgotten servers, overnight jobs), replayed through GpuAllocator with
   release on stop and an idle culler. GPU-hours held idle (held minus computing) are
   compared with static per-user assignment (each user owns their GPUs all day).
   Goal: allocator / static <= 0.7.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_nvml import FakeNvml  # the fake lives with the tests

from jupyterhub_condaspawner.gpus import GpuAllocator, GpuInventory, GpuUnavailable

OPS_GOAL = 10_000
IDLE_RATIO_GOAL = 0.7
HOUR = 3600.0
DAY = 24 * HOUR
MINUTE = 60.0


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


@dataclass
class UserDay:
    """One user's day: when they are at the keyboard, when their GPUs compute, how they leave."""

    user: str
    gpus: int
    present: list[tuple[float, float]] = field(default_factory=list)
    compute: list[tuple[float, float]] = field(default_factory=list)
    stops_at_breaks: set[int] = field(default_factory=set)  # indexes of present blocks followed by a stop
    stops_at_end: bool = False


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
    return bursts


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def server_intervals(day: UserDay, cull_after: float) -> list[tuple[float, float]]:
    """When the user's server runs: from first activity, stopped by the user at some long
    breaks and (if they do) at the end, otherwise culled ``cull_after`` seconds after the
    last activity; a user back after a stop or a cull spawns again."""
    activity = merged(day.present + day.compute)
    if not activity:
        return []
    stops = {day.present[i][1] for i in day.stops_at_breaks}
    servers, start = [], activity[0][0]
    for (_, end), (next_start, _) in itertools.pairwise(activity):
        if end in stops or next_start - end >= cull_after:
            servers.append((start, end if end in stops else end + cull_after))
            start = next_start
    last_end = activity[-1][1]
    servers.append((start, min(DAY, last_end if day.stops_at_end else last_end + cull_after)))
    return servers


def overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in intervals)


@dataclass
class Replay:
    held_gpu_hours: float
    refused: int
    peak: int


def replay(days: list[UserDay], host_gpus: int, cull_after: float) -> Replay:
    """Spawn and stop every server through a real GpuAllocator in time order."""
    clock = [0.0]
    allocator = GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(host_gpus)), clock=lambda: clock[0],
                             rescan_interval=DAY)
    events: list[tuple[float, int, int, str, UserDay]] = []
    for number, day in enumerate(days):
        for start, end in server_intervals(day, cull_after):
            events += [(start, 1, number, "spawn", day), (end, 0, number, "stop", day)]  # stops first at ties
    heapq.heapify(events)
    held, refused, peak, busy, since = 0.0, 0, 0, 0, {}
    while events:
        clock[0], _, _, kind, day = heapq.heappop(events)
        if kind == "spawn":
            try:
                allocator.allocate(day.user, "", day.gpus)
            except GpuUnavailable:
                refused += 1
                continue
            since[day.user] = clock[0]
            busy += day.gpus
            peak = max(peak, busy)
        elif allocator.release(day.user, "") is not None:
            held += day.gpus * (clock[0] - since.pop(day.user)) / HOUR
            busy -= day.gpus
    return Replay(held, refused, peak)


def simulate_day(seed: int, users: int, cull_after: float) -> dict[str, float]:
    rng = random.Random(seed)
    days = [generate_day(rng, f"user{i}") for i in range(users)]
    static_gpus = sum(day.gpus for day in days)
    computing = sum(day.gpus * overlap(merged(day.compute), 0, DAY) for day in days) / HOUR
    computing_in_office_hours = sum(day.gpus * overlap(merged(day.compute), 8 * HOUR, 18 * HOUR)
                                    for day in days) / HOUR
    static_held = static_gpus * DAY / HOUR
    alloc = replay(days, static_gpus, cull_after)
    small_host = replay(days, static_gpus // 2, cull_after)
    return {
        "static_gpus": static_gpus, "computing": computing, "static_idle": static_held - computing,
        "office_hours_idle": static_gpus * 10 - computing_in_office_hours,
        "alloc_held": alloc.held_gpu_hours, "alloc_idle": alloc.held_gpu_hours - computing,
        "alloc_refused": alloc.refused, "peak": alloc.peak, "small_refused": small_host.refused,
        "spawns": sum(len(server_intervals(day, cull_after)) for day in days),
    }


def idle_ratio(day: dict[str, float]) -> float:
    return day["alloc_idle"] / day["static_idle"]


def report_day(quick: bool, seed: int, users: int, cull_after: float) -> None:
    print(f"\nSimulated day: {users} users, idle culler after {cull_after / MINUTE:.0f} min, seed {seed}")
    first = simulate_day(seed, users, cull_after)
    ratio = idle_ratio(first)
    print(f"  static per-user assignment: {first['static_gpus']} GPUs held 24 h = "
          f"{first['static_gpus'] * 24:,.0f} GPU-h, of which idle {first['static_idle']:,.1f} GPU-h")
    print(f"  allocator (release on stop, culling): held {first['alloc_held']:,.1f} GPU-h, idle "
          f"{first['alloc_idle']:,.1f} GPU-h; {first['spawns']} spawns, {first['alloc_refused']} refused, "
          f"peak {first['peak']} GPUs at once")
    print(f"  GPUs computing: {first['computing']:,.1f} GPU-h (the same in both)")
    print(f"  the same day on a host with half the GPUs ({first['static_gpus'] // 2}): "
          f"{first['small_refused']} of {first['spawns']} spawns refused")
    verdict = "meets" if ratio <= IDLE_RATIO_GOAL else "MISSES"
    print(f"  GPU-hours held idle, allocator / static: {ratio:.3f}  goal <= {IDLE_RATIO_GOAL}: {verdict}")
    seeds = range(seed + 1, seed + (4 if quick else 10))
    ratios = [idle_ratio(simulate_day(other, users, cull_after)) for other in seeds]
    print(f"  other seeds ({len(ratios)}): ratio median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")
    office = first["office_hours_idle"]
    print(f"  for scale, a static assignment held only 08:00-18:00 would idle {office:,.1f} GPU-h "
          f"(ratio {first['alloc_idle'] / office:.3f}; it would also cut off early, late and overnight work)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations and seeds (a smoke run)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--cull-minutes", type=float, default=60, help="idle culler timeout (default 60)")
    arguments = parser.parse_args()
    report_throughput(arguments.quick, arguments.seed)
    report_day(arguments.quick, arguments.seed, arguments.users, arguments.cull_minutes * MINUTE)


if __name__ == "__main__":
    main()
