"""The Prometheus metrics, read back from the default registry (the one /hub/metrics serves).

GPUs and the queue run on the fake NVML; builds on an ImageBuilder whose daemon calls are
stood in for (the real builds are counted in test_e2e_metrics.py). The registry is global,
so every test reads differences, never absolute values.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_nvml import FakeGpu, FakeNvml, fake_uuid
from prometheus_client import REGISTRY, generate_latest

from jupyterhub_condaspawner import metrics
from jupyterhub_condaspawner.builder import BuildError, BuildRequest, ImageBuilder, ImageInfo
from jupyterhub_condaspawner.culler import GpuIdleCuller
from jupyterhub_condaspawner.gpuqueue import GpuQueue
from jupyterhub_condaspawner.gpus import GpuAllocator, GpuInventory, GpuUnavailable
from jupyterhub_condaspawner.hubservices import _start_gpu_sampler
from jupyterhub_condaspawner.spec import parse_environment

T0 = 1_717_236_000.0


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def gpu_states() -> dict[str, float]:
    return {state: value("condaspawner_gpus", state=state) for state in metrics.GPU_STATES}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_every_metric_is_on_the_default_registry_with_help_and_prefix():
    text = generate_latest(REGISTRY).decode()
    names = ("condaspawner_gpus", "condaspawner_gpu_idle_seconds_total", "condaspawner_gpu_queue_length",
             "condaspawner_gpu_queue_wait_seconds", "condaspawner_builds_total",
             "condaspawner_build_duration_seconds", "condaspawner_image_cache_lookups_total",
             "condaspawner_culls_total")
    for name in names:
        family = name.removesuffix("_total")
        assert f"# HELP {family} " in text or f"# HELP {name} " in text, name
    assert 'condaspawner_image_cache_lookups_total{result="miss"}' in text  # shown at 0 from the start


def test_help_and_readme_name_every_build_phase_and_queue_outcome():
    # Admins write alerts from these lists: a label value missing there is one nobody watches.
    from jupyterhub_condaspawner.builderrors import PHASE_WORDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    builds_row = next(line for line in readme.splitlines() if line.startswith("| `condaspawner_builds_total"))
    queue_row = next(line for line in readme.splitlines() if line.startswith("| `condaspawner_gpu_queue_wait_seconds"))
    helps = {family.name: family.documentation for family in REGISTRY.collect()}
    for phase in PHASE_WORDS:
        assert f"`{phase}`" in builds_row and phase in helps["condaspawner_builds"], phase
    for outcome in metrics.QUEUE_OUTCOMES:
        assert f"`{outcome}`" in queue_row and outcome in helps["condaspawner_gpu_queue_wait_seconds"], outcome


def test_gpu_states_and_gpu_seconds_held_idle_from_samples():
    fake = FakeNvml([FakeGpu(fake_uuid(i), utilization_gpu=0) for i in range(3)] + [FakeGpu(fake_uuid(3))])
    clock = Clock()
    allocator = GpuAllocator(inventory=GpuInventory(nvml=fake), clock=clock, idle_utilization=5)
    idle_before = value("condaspawner_gpu_idle_seconds_total")
    allocator.sample()  # the first sample only sets the starting point
    assert gpu_states() == {"free": 4, "held_busy": 0, "held_idle": 0, "unusable": 0}

    allocator.allocate("busy", "", 1)  # GPU 0
    allocator.allocate("idle", "", 1)  # GPU 1
    fake.gpus[0].utilization_gpu = 90
    fake.gpus[1].utilization_gpu = 5  # at the threshold: idle
    fake.lose(3)
    clock.now += 30
    allocator.sample()
    assert gpu_states() == {"free": 1, "held_busy": 1, "held_idle": 1, "unusable": 1}
    # Both were allocated at T0 (the previous sample): GPU 1 was idle for those 30 s.
    assert value("condaspawner_gpu_idle_seconds_total") - idle_before == pytest.approx(30)

    clock.now += 10
    allocator.allocate("late", "", 1)  # GPU 2, utilization 0: idle only since it was handed out
    clock.now += 20
    allocator.sample()
    assert gpu_states()["held_idle"] == 2
    assert value("condaspawner_gpu_idle_seconds_total") - idle_before == pytest.approx(30 + 30 + 20)

    allocator.release("idle", "")  # released: free at once, without waiting for a sample
    assert gpu_states() == {"free": 1, "held_busy": 1, "held_idle": 1, "unusable": 1}
    assert allocator.gpu_states()[fake_uuid(1)] == "free"


def test_no_gpu_sample_until_the_hubs_first_gpu_scan():
    """A hub just restarted knows nothing of its GPUs until it scans them (its first spawn, or
    sample): all zeros would read "no GPU free" and fire the admin's alerts."""
    allocator = GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(2)))
    allocator.release("nobody", "")  # this allocator is now the one scraped: not scanned yet
    assert [REGISTRY.get_sample_value("condaspawner_gpus", {"state": state}) for state in metrics.GPU_STATES] == \
        [None] * len(metrics.GPU_STATES)
    assert "# HELP condaspawner_gpus " in generate_latest(REGISTRY).decode()  # the family is still there
    allocator.refresh()
    assert gpu_states() == {"free": 2, "held_busy": 0, "held_idle": 0, "unusable": 0}


def test_a_held_gpu_that_nvml_no_longer_lists_counts_as_unusable():
    fake = FakeNvml.with_gpus(3)
    allocator = GpuAllocator(inventory=GpuInventory(nvml=fake), rescan_interval=0)
    allocator.allocate("alice", "", 1)  # GPU 0
    allocator.allocate("bob", "", 1)  # GPU 1
    del fake.gpus[0]  # alice's GPU fell off the bus: NVML lists two GPUs now
    allocator.refresh()
    assert gpu_states() == {"free": 1, "held_busy": 0, "held_idle": 1, "unusable": 1}
    allocator.release("alice", "")  # held by nobody now: no longer this host's
    assert gpu_states() == {"free": 1, "held_busy": 0, "held_idle": 1, "unusable": 0}

    # Listed still, without its UUID (lost): counted once, not twice.
    lost = FakeNvml.with_gpus(2)
    allocator = GpuAllocator(inventory=GpuInventory(nvml=lost), rescan_interval=0)
    allocator.allocate("alice", "", 1)
    lost.lose(0)
    allocator.refresh()
    assert gpu_states() == {"free": 1, "held_busy": 0, "held_idle": 0, "unusable": 1}


def test_a_gpu_without_a_utilization_reading_is_never_idle():
    fake = FakeNvml([FakeGpu(fake_uuid(0))])
    fake.gpus[0].failures["nvmlDeviceGetUtilizationRates"] = 3  # NOT_SUPPORTED on this board
    clock = Clock()
    allocator = GpuAllocator(inventory=GpuInventory(nvml=fake), clock=clock)
    allocator.sample()
    allocator.allocate("a", "", 1)
    before = value("condaspawner_gpu_idle_seconds_total")
    clock.now += 60
    allocator.sample()
    assert allocator.gpu_states() == {fake_uuid(0): "held_busy"}
    assert value("condaspawner_gpu_idle_seconds_total") == before


def test_gpu_states_are_counted_at_the_scrape_from_the_allocator_last_used():
    first = GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(2)))
    first.allocate("ann", "", 1)
    assert gpu_states() == {"free": 1, "held_busy": 0, "held_idle": 1, "unusable": 0}  # the fake reads 0 %
    second = GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(3)))
    second.refresh()
    assert gpu_states() == {"free": 3, "held_busy": 0, "held_idle": 0, "unusable": 0}
    second.allocate("bob", "", 2)  # nothing recorded by hand: the scrape asks the allocator
    assert gpu_states() == {"free": 1, "held_busy": 0, "held_idle": 2, "unusable": 0}
    del second
    gc.collect()
    assert gpu_states() == {"free": 0, "held_busy": 0, "held_idle": 0, "unusable": 0}  # gone: no GPUs shown


async def test_queue_length_and_wait_time_by_outcome():
    # A long queue_timeout while "first" and "second" wait (each reads it as it starts waiting):
    # with a short one, a slow machine could time them out before the cancel and the release.
    queue = GpuQueue(GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(1)), queue_timeout=600))
    before = {outcome: value("condaspawner_gpu_queue_wait_seconds_count", outcome=outcome)
              for outcome in metrics.QUEUE_OUTCOMES}
    granted_sum = value("condaspawner_gpu_queue_wait_seconds_sum", outcome="granted")
    await queue.allocate("holder", "", 1)  # got it at once: never queued, not observed
    waiting = asyncio.ensure_future(queue.allocate("first", "", 1))
    cancelled = asyncio.ensure_future(queue.allocate("second", "", 1))
    deadline = time.monotonic() + 60
    while queue.length < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert value("condaspawner_gpu_queue_length") >= 2  # every live queue of this process counts
    queue.cancel("second", "")
    with pytest.raises(GpuUnavailable):
        await cancelled
    await asyncio.sleep(0.1)
    queue.allocator.release("holder", "")
    await asyncio.wait_for(waiting, 60)
    queue.allocator.queue_timeout = 0.3
    with pytest.raises(GpuUnavailable):  # "first" holds it now: this one times out
        await queue.allocate("third", "", 1)
    assert queue.length == 0

    after = {outcome: value("condaspawner_gpu_queue_wait_seconds_count", outcome=outcome)
             for outcome in metrics.QUEUE_OUTCOMES}
    assert {outcome: after[outcome] - before[outcome] for outcome in after} == {
        "granted": 1, "timeout": 1, "cancelled": 1, "refused": 0, "error": 0}
    assert value("condaspawner_gpu_queue_wait_seconds_sum", outcome="granted") - granted_sum >= 0.1


def builder_without_daemon(monkeypatch, outcome) -> ImageBuilder:
    """An ImageBuilder whose key and build steps are stand-ins: ``outcome`` is what a build gives."""
    builder = ImageBuilder()
    monkeypatch.setattr(builder, "build_key", lambda request: "k" * 64)
    monkeypatch.setattr(builder, "cached_info", lambda key, request, started: None)

    async def build_once(build, request, started):
        await asyncio.sleep(0.01)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(builder.runs, "build_once", build_once)
    return builder


REQUEST = BuildRequest(parse_environment("dependencies: [python=3.9]\n"), env_name="python39")


@pytest.mark.parametrize("outcome, labels", [
    (ImageInfo("k" * 64, "repo:k", "sha256:1", "python39", False, 42.0, 1), ("success", "ready")),
    (BuildError("solve: nothing provides numpy", phase="solve"), ("failure", "solve")),
    (RuntimeError("a bug"), ("failure", "internal")),
])
async def test_builds_by_result_phase_and_duration(monkeypatch, outcome, labels):
    builder = builder_without_daemon(monkeypatch, outcome)
    result, phase = labels
    count = value("condaspawner_builds_total", result=result, phase=phase)
    observed = value("condaspawner_build_duration_seconds_count", result=result)
    seconds = value("condaspawner_build_duration_seconds_sum", result=result)
    build = builder.ensure(REQUEST)
    with pytest.raises(Exception) if isinstance(outcome, Exception) else contextlib.nullcontext():
        await build.result()
    await asyncio.sleep(0)  # done-callbacks run on the next turn of the loop
    assert value("condaspawner_builds_total", result=result, phase=phase) == count + 1
    assert value("condaspawner_build_duration_seconds_count", result=result) == observed + 1
    if result == "success":  # the build's own duration
        assert value("condaspawner_build_duration_seconds_sum", result=result) - seconds == pytest.approx(42.0)


async def test_an_image_found_built_meanwhile_is_no_build(monkeypatch):
    builder = builder_without_daemon(monkeypatch, ImageInfo("k" * 64, "repo:k", "sha256:1", "python39", True))
    before = value("condaspawner_builds_total", result="success", phase="ready")
    await builder.ensure(REQUEST).result()
    await asyncio.sleep(0)
    assert value("condaspawner_builds_total", result="success", phase="ready") == before


def test_cache_lookups_count_hits_and_misses(monkeypatch):
    builder = ImageBuilder()
    monkeypatch.setattr(builder, "build_key", lambda request: "k" * 64)
    hit = ImageInfo("k" * 64, "repo:k", "sha256:1", "python39", True)
    found: list[ImageInfo | None] = [None, hit, hit]
    monkeypatch.setattr(builder, "cached_info", lambda key, request, started: found.pop(0))
    hits, misses = value("condaspawner_image_cache_lookups_total", result="hit"), \
        value("condaspawner_image_cache_lookups_total", result="miss")
    assert [builder.lookup(REQUEST) is not None for _ in range(3)] == [False, True, True]
    assert value("condaspawner_image_cache_lookups_total", result="hit") == hits + 2
    assert value("condaspawner_image_cache_lookups_total", result="miss") == misses + 1


def test_culls_are_counted_by_reason():
    before = value("condaspawner_culls_total", reason="gpu_idle")
    metrics.record_cull("gpu_idle")
    assert value("condaspawner_culls_total", reason="gpu_idle") == before + 1


def test_recording_never_raises():
    metrics.record_queue_wait("granted", "soon")  # type: ignore[arg-type]
    metrics.record_gpu_idle("long")  # type: ignore[arg-type]
    metrics.track_queue(object())  # type: ignore[arg-type]  # cannot be tracked: ignored
    metrics.build_done(0.0, time.monotonic)(None)  # type: ignore[arg-type]
    assert value("condaspawner_gpu_queue_length") >= 0


async def test_the_hub_samples_its_gpus_every_gpu_sample_interval():
    fake = FakeNvml.with_gpus(1)
    allocator = GpuAllocator(inventory=GpuInventory(nvml=fake), gpu_sample_interval=0.05)
    services = SimpleNamespace(allocator=allocator, culler=GpuIdleCuller(allocator), sampler=None,
                               sample_gpus=None)
    _start_gpu_sampler(services, None)  # type: ignore[arg-type]
    sampler = services.sampler
    assert sampler is not None
    _start_gpu_sampler(services, None)  # type: ignore[arg-type]
    assert services.sampler is sampler  # one sampler per hub
    try:
        deadline = time.monotonic() + 5
        while fake.calls["nvmlDeviceGetUtilizationRates"] < 3:
            assert time.monotonic() < deadline, "the GPUs were not sampled"
            await asyncio.sleep(0.02)
    finally:
        sampler.cancel()
    idle = GpuAllocator(inventory=GpuInventory(nvml=fake), gpu_sample_interval=0)
    off = SimpleNamespace(allocator=idle, culler=GpuIdleCuller(idle), sampler=None, sample_gpus=None)
    _start_gpu_sampler(off, None)  # type: ignore[arg-type]
    assert off.sampler is None
