"""Prometheus metrics of the spawner, served on the hub's ``/hub/metrics``.

Every metric lives on prometheus_client's default ``REGISTRY``, the one JupyterHub's
``/hub/metrics`` serves, with a ``condaspawner_`` prefix. The product records into them
where things happen (builder, GPU allocator, GPU queue) through the functions below.
Recording never raises: a metric must never break a spawn.

- ``condaspawner_gpus{state}``: GPUs by state: ``free``, ``held_busy``, ``held_idle``
  (utilization at or below ``GpuAllocator.idle_utilization``), ``unusable`` (lost or failing);
  no sample until the hub's first GPU scan.
- ``condaspawner_gpu_idle_seconds_total``: GPU-seconds held idle, advanced by
  ``GpuAllocator.sample()`` (the hub samples every ``GpuAllocator.gpu_sample_interval``).
- ``condaspawner_gpu_queue_length``: spawns waiting for a GPU now.
- ``condaspawner_gpu_queue_wait_seconds{outcome}``: how long spawns that queued waited,
  observed when they leave: ``granted``, ``timeout``, ``cancelled``, ``refused``, ``error``.
- ``condaspawner_builds_total{result,phase}``: finished image builds: ``success`` (phase
  ``ready``), ``failure`` with the failing phase (``BuildError.phase``: solve, install, build,
  load, pip, timeout, ...), ``cancelled`` (phase ``cancelled``).
- ``condaspawner_build_duration_seconds{result}``: how long those builds took.
- ``condaspawner_image_cache_lookups_total{result}``: a spawn's image lookup, ``hit`` or ``miss``.
- ``condaspawner_culls_total{reason}``: servers stopped by the spawner's own culling
  (``gpu_idle``: GPU-aware idle culling, culler.py).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "condaspawner_"
GPU_STATES = ("free", "held_busy", "held_idle", "unusable")
QUEUE_OUTCOMES = ("granted", "timeout", "cancelled", "refused", "error")

GPU_IDLE_SECONDS = Counter(
    PREFIX + "gpu_idle_seconds", "GPU-seconds that servers held GPUs whose utilization was at or below "
    "GpuAllocator.idle_utilization (counted at each GPU sample)", registry=REGISTRY)
QUEUE_LENGTH = Gauge(PREFIX + "gpu_queue_length", "Spawns waiting in the GPU queue for a busy GPU", registry=REGISTRY)
QUEUE_WAIT = Histogram(
    PREFIX + "gpu_queue_wait_seconds", "Seconds spawns waited in the GPU queue, observed when they left it, "
    "by outcome (granted, timeout, cancelled, refused, error)", ["outcome"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600), registry=REGISTRY)
BUILDS = Counter(
    PREFIX + "builds", "Finished image builds by result (success, failure, cancelled) and phase (ready, "
    "cancelled, or where it failed: base-image, daemon, solve, install, build, load, pip, timeout, registry, "
    "registry-failed, disk, config, internal)",
    ["result", "phase"], registry=REGISTRY)
BUILD_DURATION = Histogram(
    PREFIX + "build_duration_seconds", "Seconds image builds took (queue for a build slot included), by result",
    ["result"], buckets=(10, 30, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600), registry=REGISTRY)
CACHE_LOOKUPS = Counter(
    PREFIX + "image_cache_lookups", "Image cache lookups of spawns, by result (hit: the image exists; "
    "miss: it gets built)", ["result"], registry=REGISTRY)
CULLS = Counter(PREFIX + "culls", "Servers the spawner stopped by itself, by reason", ["reason"], registry=REGISTRY)

for _result in ("hit", "miss"):  # both show from the start, at 0
    CACHE_LOOKUPS.labels(_result)


def _quietly(record: Callable[..., None]) -> Callable[..., None]:
    """A recording function that never raises (a metric must never break a spawn)."""

    def quiet(*args: Any, **kwargs: Any) -> None:
        try:
            record(*args, **kwargs)
        except Exception:  # nothing a metric does is worth a failed spawn
            pass

    quiet.__name__, quiet.__doc__ = record.__name__, record.__doc__
    return quiet


# -- GPUs -----------------------------------------------------------------------------


class _GpuStates(Collector):
    """``condaspawner_gpus{state}``, counted when /hub/metrics is scraped from the source last
    shown (:func:`show_gpu_states`): an allocation pays nothing for it."""

    help = ("GPUs of this hub by state (on a conda-swarm hub, every node's): free, held_busy, held_idle "
            "(held, utilization at or below GpuAllocator.idle_utilization), unusable (lost or failing)")

    def __init__(self) -> None:
        self.source: Callable[[], Callable[[], Iterable[str] | None] | None] = lambda: None

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(PREFIX + "gpus", self.help, labels=["state"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(PREFIX + "gpus", self.help, labels=["state"])
        try:
            states = self.source()
            known = states() if states is not None else None
            counts = dict.fromkeys(GPU_STATES, 0)
            for state in known if known is not None else ():
                counts[state] = counts.get(state, 0) + 1
        except Exception:  # a scrape must not fail either
            known = None
        # Until a scan says what the host has (a hub just restarted, before its first spawn or
        # GPU sample), no sample at all: all zeros would read "no GPU free" and fire alerts.
        if known is not None:
            for state, count in counts.items():
                family.add_metric([state], count)
        return [family]


_GPU_STATES = _GpuStates()
REGISTRY.register(_GPU_STATES)


@_quietly
def show_gpu_states(states: Callable[[], Iterable[str] | None]) -> None:
    """Count ``states()`` (one state string per GPU on the host; None: not known yet, no sample
    shown) in ``condaspawner_gpus`` at each scrape. A bound method is held weakly: an allocator
    that is gone shows none."""
    if getattr(states, "__self__", None) is not None:
        _GPU_STATES.source = weakref.WeakMethod(states)  # type: ignore[arg-type]
    else:
        _GPU_STATES.source = lambda: states


@_quietly
def record_gpu_states(states: Iterable[str]) -> None:
    """Show this snapshot of every GPU's state in ``condaspawner_gpus`` (one string per GPU)."""
    snapshot = tuple(states)
    show_gpu_states(lambda: snapshot)


@_quietly
def record_gpu_idle(gpu_seconds: float) -> None:
    """Add GPU-seconds held idle."""
    if gpu_seconds > 0:
        GPU_IDLE_SECONDS.inc(gpu_seconds)


# -- the GPU queue --------------------------------------------------------------------


class _Queue(Protocol):
    @property
    def length(self) -> int: ...


_queues: weakref.WeakSet = weakref.WeakSet()


def _queue_length() -> float:
    try:
        return float(sum(queue.length for queue in list(_queues)))
    except Exception:  # a scrape must not fail either
        return 0.0


QUEUE_LENGTH.set_function(_queue_length)


@_quietly
def track_queue(queue: _Queue) -> None:
    """Count ``queue.length`` in ``condaspawner_gpu_queue_length`` (read at each scrape) while it lives."""
    _queues.add(queue)


@_quietly
def record_queue_wait(outcome: str, seconds: float) -> None:
    """A spawn left the GPU queue after ``seconds`` with ``outcome`` (see QUEUE_OUTCOMES)."""
    QUEUE_WAIT.labels(outcome).observe(max(0.0, seconds))


# -- images ---------------------------------------------------------------------------


@_quietly
def record_cache_lookup(hit: bool) -> None:
    CACHE_LOOKUPS.labels("hit" if hit else "miss").inc()


@_quietly
def record_build(result: str, phase: str, seconds: float) -> None:
    BUILDS.labels(result, phase).inc()
    BUILD_DURATION.labels(result).observe(max(0.0, seconds))


def build_done(started: float, clock: Callable[[], float]) -> Callable[[asyncio.Future], None]:
    """A done-callback for a build's task: records its result, phase and duration.

    A task whose image turned out to be cached (built meanwhile by another hub process) is
    no build and records nothing.
    """

    @_quietly
    def done(task: asyncio.Future) -> None:
        seconds = clock() - started
        if task.cancelled():
            record_build("cancelled", "cancelled", seconds)
            return
        error = task.exception()
        if error is not None:
            record_build("failure", str(getattr(error, "phase", "") or "internal"), seconds)
            return
        info = task.result()
        if not getattr(info, "cached", False):
            record_build("success", "ready", getattr(info, "seconds", seconds))

    return done


# -- culling --------------------------------------------------------------------------


@_quietly
def record_cull(reason: str) -> None:
    """A server was stopped by the spawner's culler; ``reason`` e.g. "gpu_idle"."""
    CULLS.labels(reason).inc()
