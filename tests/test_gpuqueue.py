"""The GPU queue on a fake NVML host: order, hand-over, cancellation, timeout, quotas."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fake_nvml import DRIVER_NOT_LOADED, FakeGpu, FakeNvml, fake_uuid

from jupyterhub_condaspawner import gpuqueue
from jupyterhub_condaspawner.gpuqueue import GpuQueue, QueueCancelled
from jupyterhub_condaspawner.gpus import GpuAllocator, GpuInfeasible, GpuInventory, GpuQuotaExceeded, GpuUnavailable
from jupyterhub_condaspawner.notices import Notices

GIB = 2**30


def queue_for(gpus: int, **traits) -> GpuQueue:
    fake = FakeNvml.with_gpus(gpus)
    return GpuQueue(GpuAllocator(inventory=GpuInventory(nvml=fake), **traits))


class Positions:
    """Records what a waiting spawn is told: (ahead, seconds waited)."""

    def __init__(self) -> None:
        self.told: list[int] = []

    async def __call__(self, ahead: int, waited: float) -> None:
        self.told.append(ahead)


async def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_waiting_spawns_get_freed_gpus_first_come_first_served(monkeypatch):
    # No periodic retry within the test: a freed GPU must reach the head through the release itself.
    monkeypatch.setattr(gpuqueue, "RETRY_INTERVAL_S", 3600.0)
    queue = queue_for(1)
    await queue.allocate("holder", "", 1)
    told = {name: Positions() for name in ("first", "second", "third")}
    tasks = {}
    for name in ("first", "second", "third"):
        tasks[name] = asyncio.ensure_future(queue.allocate(name, "", 1, waiting=told[name]))
        await until(lambda: queue.ahead_of(name, "") is not None)
    assert [queue.ahead_of(name, "") for name in told] == [0, 1, 2]

    queue.allocator.release("holder", "")
    first = await asyncio.wait_for(tasks["first"], 30)  # at once, not at a retry an hour away
    assert first.uuids == (fake_uuid(0),)
    await until(lambda: told["second"].told[-1] == 0)
    assert told["second"].told == [1, 0] and told["third"].told[:2] == [2, 1]
    assert not tasks["second"].done()

    queue.allocator.release("first", "")
    assert (await asyncio.wait_for(tasks["second"], 30)).user == "second"
    queue.allocator.release("second", "")
    assert (await asyncio.wait_for(tasks["third"], 30)).user == "third"
    assert queue.length == 0


async def test_a_newcomer_of_the_same_kind_never_overtakes_a_waiting_spawn():
    queue = queue_for(1)
    await queue.allocate("holder", "", 1)
    waiting = asyncio.ensure_future(queue.allocate("early", "", 1))
    await until(lambda: queue.length == 1)
    queue.allocator.release("holder", "")
    late = asyncio.ensure_future(queue.allocate("late", "", 1))
    assert (await asyncio.wait_for(waiting, 30)).user == "early"
    await until(lambda: queue.ahead_of("late", "") == 0)
    assert not late.done()
    late.cancel()


async def test_a_spawn_is_told_of_older_spawns_of_other_kinds_that_would_take_its_gpus_first():
    """Freed GPUs go to the oldest kinds first: a 2-GPU start that joins behind an older 1-GPU one
    on the same A100s is not next (it was told 0 ahead), while one waiting for a T4 only is."""
    fake = FakeNvml([FakeGpu(fake_uuid(0), "NVIDIA A100-SXM4-80GB", 80 * GIB),
                     FakeGpu(fake_uuid(1), "NVIDIA A100-SXM4-80GB", 80 * GIB),
                     FakeGpu(fake_uuid(2), "Tesla T4", 16 * GIB)])
    queue = GpuQueue(GpuAllocator(inventory=GpuInventory(nvml=fake), queue_hold_after=600))
    for holder, model in (("h0", "*A100*"), ("h1", "*A100*"), ("h2", "*T4*")):
        await queue.allocate(holder, "", 1, model)
    one = asyncio.ensure_future(queue.allocate("one", "", 1, "*A100*"))
    await until(lambda: queue.length == 1)
    told = Positions()
    two = asyncio.ensure_future(queue.allocate("two", "", 2, "*A100*", waiting=told))
    t4 = asyncio.ensure_future(queue.allocate("t4", "", 1, "*T4*"))
    await until(lambda: queue.length == 3)
    assert (queue.ahead_of("one", ""), queue.ahead_of("two", ""), queue.ahead_of("t4", "")) == (0, 1, 0)
    assert [(row["user"], row["position"]) for row in queue.waiting()] == [("one", 0), ("two", 1), ("t4", 0)]

    queue.allocator.release("h0", "")  # the first A100 freed goes to the older 1-GPU start
    assert (await asyncio.wait_for(one, 30)).uuids == (fake_uuid(0),)
    await until(lambda: told.told[-1] == 0)
    assert told.told == [1, 0] and not two.done()
    for task in (two, t4):
        task.cancel()


async def test_a_bigger_older_request_is_overtaken_only_until_queue_hold_after():
    now = [0.0]
    allocator = GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(2)), queue_hold_after=120)
    queue = GpuQueue(allocator, clock=lambda: now[0])
    for holder in ("h1", "h2"):
        await queue.allocate(holder, "", 1)
    big = asyncio.ensure_future(queue.allocate("big", "", 2))
    await until(lambda: queue.length == 1)
    small = asyncio.ensure_future(queue.allocate("small", "", 1))
    await until(lambda: queue.length == 2)

    allocator.release("h1", "")  # one GPU: not enough for big, so small (younger) may take it
    assert (await asyncio.wait_for(small, 30)).user == "small"

    now[0] = 121.0  # big has waited past queue_hold_after: GPUs it could use are held for it
    told = Positions()
    late = asyncio.ensure_future(queue.allocate("late", "", 1, waiting=told))
    await until(lambda: queue.length == 2)
    assert told.told == [1]  # behind big, though first of its own kind
    allocator.release("h2", "")  # free, and held for big: late waits
    await asyncio.sleep(1.5)  # a retry of the queue's (every second) comes and goes
    assert not late.done() and not big.done()
    assert [gpu for gpu, state in allocator.gpu_states().items() if state == "free"] == [fake_uuid(1)]

    allocator.release("small", "")
    assert sorted((await asyncio.wait_for(big, 30)).uuids) == [fake_uuid(0), fake_uuid(1)]
    allocator.release("big", "")
    assert (await asyncio.wait_for(late, 30)).user == "late"


async def test_gpus_held_for_an_older_request_are_only_those_it_could_use():
    # Two A100s, busy; a T4, free. An older 2-A100 start past queue_hold_after has the A100s held
    # for it: a younger start of any model still gets the T4, which the older one never would.
    now = [0.0]
    fake = FakeNvml([FakeGpu(fake_uuid(0), "NVIDIA A100"), FakeGpu(fake_uuid(1), "NVIDIA A100"),
                     FakeGpu(fake_uuid(2), "Tesla T4")])
    allocator = GpuAllocator(inventory=GpuInventory(nvml=fake), queue_hold_after=120, queue_timeout=600)
    queue = GpuQueue(allocator, clock=lambda: now[0])
    for holder in ("h1", "h2"):
        await queue.allocate(holder, "", 1, "*A100*")
    big = asyncio.ensure_future(queue.allocate("big", "", 2, "*A100*"))
    await until(lambda: queue.length == 1)
    now[0] = 121.0

    assert (await asyncio.wait_for(queue.allocate("any", "", 1), 30)).uuids == (fake_uuid(2),)

    late = asyncio.ensure_future(queue.allocate("late", "", 1))  # only A100s left: held for big
    await until(lambda: queue.length == 2)
    allocator.release("h1", "")
    await asyncio.sleep(1.5)  # a retry of the queue's (every second) comes and goes
    assert not late.done() and not big.done()
    allocator.release("h2", "")
    assert sorted((await asyncio.wait_for(big, 30)).uuids) == [fake_uuid(0), fake_uuid(1)]
    allocator.release("any", "")
    assert (await asyncio.wait_for(late, 30)).uuids == (fake_uuid(2),)


async def test_a_cancelled_spawn_leaves_the_queue_and_the_next_one_moves_up():
    queue = queue_for(1)
    await queue.allocate("holder", "", 1)
    first = asyncio.ensure_future(queue.allocate("first", "", 1))
    await until(lambda: queue.length == 1)
    second = asyncio.ensure_future(queue.allocate("second", "", 1))
    await until(lambda: queue.length == 2)

    assert queue.cancel("first", "")  # the user stopped the pending server
    with pytest.raises(QueueCancelled, match="cancelled while it waited for a GPU"):
        await first
    assert queue.ahead_of("second", "") == 0
    second.cancel()  # the hub cancelled the spawn task itself
    with pytest.raises(asyncio.CancelledError):
        await second
    assert queue.length == 0
    queue.allocator.release("holder", "")
    assert queue.allocator.allocations() == []  # nobody got a GPU after leaving


async def test_waiting_ends_after_queue_timeout_with_the_usual_refusal():
    queue = queue_for(1, queue_timeout=0.3)
    await queue.allocate("holder", "", 1, profile="gpu")
    told = Positions()
    started = time.monotonic()
    with pytest.raises(GpuUnavailable) as refusal:
        await asyncio.wait_for(queue.allocate("late", "", 1, profile="gpu", waiting=told), 30)
    assert time.monotonic() - started >= 0.3  # it waited its queue_timeout
    assert refusal.value.user_message.startswith("No GPU is free on this hub: 0 of 1 ('gpu' needs 1 GPU; ")
    assert refusal.value.user_message.endswith("after waiting 0 s in the queue (GpuAllocator.queue_timeout)")
    assert told.told == [0] and queue.length == 0


async def test_a_spawn_whose_own_time_runs_out_first_leaves_the_queue_naming_that_limit():
    queue = queue_for(1, queue_timeout=600)
    await queue.allocate("holder", "", 1, profile="gpu")
    with pytest.raises(GpuUnavailable) as refusal:
        await asyncio.wait_for(queue.allocate("late", "", 1, profile="gpu",
                                              time_left=(0.2, "Spawner.start_timeout")), 30)
    assert refusal.value.user_message.startswith("No GPU is free on this hub: 0 of 1 ('gpu' needs 1 GPU; ")
    assert refusal.value.user_message.endswith("in the queue (Spawner.start_timeout)")
    assert queue.length == 0
    queue.allocator.release("holder", "")
    assert (await queue.allocate("late", "", 1, time_left=(-5.0, "Spawner.start_timeout"))).uuids  # free: no wait


async def test_queue_timeout_zero_refuses_at_once():
    queue = queue_for(1, queue_timeout=0)
    await queue.allocate("holder", "", 1)
    with pytest.raises(GpuUnavailable, match="try again when a server stops"):
        await asyncio.wait_for(queue.allocate("late", "", 1), 30)


async def test_what_can_never_fit_and_quota_refusals_do_not_queue():
    queue = queue_for(2, per_user_gpu_quota=1)
    await queue.allocate("alice", "one", 1)
    with pytest.raises(GpuQuotaExceeded):
        await asyncio.wait_for(queue.allocate("alice", "two", 1), 30)
    with pytest.raises(GpuInfeasible):
        await asyncio.wait_for(queue.allocate("bob", "", 1, model_glob="*H100*"), 30)
    assert queue.length == 0


async def test_kinds_wait_separately_and_memory_freed_outside_the_hub_is_noticed():
    fake = FakeNvml([FakeGpu(fake_uuid(0), "NVIDIA A100-SXM4-80GB", 80 * GIB),
                     FakeGpu(fake_uuid(1), "Tesla T4", 16 * GIB, memory_used=15 * GIB)])
    queue = GpuQueue(GpuAllocator(inventory=GpuInventory(nvml=fake), rescan_interval=0))
    await queue.allocate("holder", "", 1, model_glob="*A100*")
    a100 = asyncio.ensure_future(queue.allocate("a", "", 1, model_glob="*A100*"))
    t4 = asyncio.ensure_future(queue.allocate("t", "", 1, model_glob="*T4*", min_free_memory=8 * GIB))
    await until(lambda: queue.length == 2)
    assert queue.ahead_of("a", "") == 0 and queue.ahead_of("t", "") == 0  # one line per kind

    fake.gpus[1].memory_used = 0  # another process on the host let go of the T4's memory
    assert (await asyncio.wait_for(t4, 30)).uuids == (fake_uuid(1),)  # noticed by the periodic retry
    assert not a100.done()
    a100.cancel()


async def test_waiting_spawns_stay_queued_while_the_driver_does_not_answer():
    fake = FakeNvml.with_gpus(1)
    queue = GpuQueue(GpuAllocator(inventory=GpuInventory(nvml=fake), rescan_interval=0, queue_timeout=30))
    await queue.allocate("alice", "", 1)
    waiting = asyncio.ensure_future(queue.allocate("bob", "", 1))
    await until(lambda: queue.length == 1)
    fake.failures["nvmlDeviceGetCount"] = DRIVER_NOT_LOADED
    await asyncio.to_thread(queue.allocator.refresh)  # the queue's retry (or the sampler) reads nothing
    queue.allocator.release("alice", "")  # freed while NVML reads nothing: the head tries, and waits
    await asyncio.sleep(0.2)
    assert not waiting.done() and queue.length == 1
    fake.failures.clear()
    assert (await asyncio.wait_for(waiting, 30)).uuids == (fake_uuid(0),)


def test_notices_are_read_once_and_named_without_user_text(tmp_path):
    notices = Notices(tmp_path)
    notices.post("../../etc/passwd", "x/y", "hello")
    assert [path.parent for path in tmp_path.iterdir()] == [tmp_path]
    assert notices.take("../../etc/passwd", "y") is None
    assert notices.take("../../etc/passwd", "x/y") == "hello"
    assert notices.take("../../etc/passwd", "x/y") is None
    notices.post("a", "", "bye")
    notices.discard("a", "")
    assert notices.take("a", "") is None


class WatchedNvml(FakeNvml):
    """Records NVML calls made on one thread (the hub's event loop); a gate can hold scans."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loop_thread: int | None = None
        self.on_loop: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.stuck = threading.Event()

    def nvmlDeviceGetCount(self):
        if threading.get_ident() == self.loop_thread:
            self.on_loop.append("nvmlDeviceGetCount")
        if not self.gate.is_set():
            self.stuck.set()
            self.gate.wait(120)  # a safety net: longer than any bound the tests wait with
        return super().nvmlDeviceGetCount()


async def test_nvml_is_never_read_on_the_event_loop_and_a_stuck_read_holds_nothing_up():
    nvml = WatchedNvml([FakeGpu(fake_uuid(0), "NVIDIA A100-SXM4-80GB", 80 * GIB)])
    allocator = GpuAllocator(inventory=GpuInventory(nvml=nvml), rescan_interval=0, queue_timeout=30)
    queue = GpuQueue(allocator)
    allocator.refresh()  # the hub's first scan, before it serves
    nvml.loop_thread = threading.get_ident()
    await queue.allocate("alice", "", 1)
    waiting = asyncio.ensure_future(queue.allocate("bob", "", 1))
    await until(lambda: queue.length == 1)

    nvml.gate.clear()  # the driver hangs: the sampler's scan (a thread) gets stuck in it
    sampling = asyncio.ensure_future(asyncio.to_thread(allocator.sample))
    await until(nvml.stuck.is_set)
    allocator.check_feasible("carol", "", 1)  # the form's check: by the last scan, not waiting for the lock
    allocator.release("alice", "")  # the head of the queue is handed the GPU meanwhile
    assert (await asyncio.wait_for(waiting, 30)).user == "bob"
    nvml.gate.set()
    await sampling
    assert nvml.on_loop == []


async def test_a_rebuild_reads_nvml_before_the_allocators_lock_so_a_stuck_driver_holds_no_allocation_up():
    nvml = WatchedNvml(FakeNvml.with_gpus(2).gpus)
    allocator = GpuAllocator(inventory=GpuInventory(nvml=nvml), rescan_interval=0)
    allocator.refresh()
    nvml.gate.clear()  # the driver hangs while a late restore (a thread) rescans
    rebuilding = asyncio.ensure_future(asyncio.to_thread(allocator.rebuild, []))
    try:
        await until(nvml.stuck.is_set)
        # The queue's allocation and a stop's release, by the last scan: 30 s bound only so that a
        # lock held through the stuck read fails the test instead of hanging it.
        granted = await asyncio.wait_for(asyncio.to_thread(allocator.allocate, "alice", "", 1, rescan=False), 30)
        assert granted.uuids == (fake_uuid(0),)
        assert await asyncio.wait_for(asyncio.to_thread(allocator.release, "alice", ""), 30) == granted
    finally:
        nvml.gate.set()
    await rebuilding
