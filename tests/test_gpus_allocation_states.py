"""Random interleavings of spawn, stop, crash and hub restart never double-assign a GPU,
never leak one, and never refuse a request that fits.

The model is what is true on the host: which servers run on which GPUs, and the label
store (one container per server, running or stopped-but-kept) the hub rebuilds from.
"""

from __future__ import annotations

from fake_nvml import FakeGpu, FakeNvml, fake_uuid
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jupyterhub_condaspawner.gpus import (
    Allocation,
    ContainerRecord,
    GpuAllocator,
    GpuInventory,
    GpuQuotaExceeded,
    GpuUnavailable,
)

QUOTA = 3
NAMES = {fake_uuid(i): ("NVIDIA A100-SXM4-80GB" if i < 4 else "Tesla T4") for i in range(6)}
GLOBS = {None: set(NAMES), "*A100*": {u for u, n in NAMES.items() if "A100" in n},
         "*t4": {u for u, n in NAMES.items() if "T4" in n}}
users = st.sampled_from(["alice", "bob", "carol"])
server_names = st.sampled_from(["", "gpu2"])


class GpuAllocationStates(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.nvml = FakeNvml([FakeGpu(uuid, name) for uuid, name in NAMES.items()])
        self.clock = 0.0
        self.allocator = self.new_allocator()
        self.running: dict[tuple[str, str], tuple[str, ...]] = {}  # what runs on which GPUs
        self.containers: dict[tuple[str, str], ContainerRecord] = {}  # the label store
        self.died_unnoticed: set[tuple[str, str]] = set()  # stopped while the hub was down

    def new_allocator(self) -> GpuAllocator:
        return GpuAllocator(inventory=GpuInventory(nvml=self.nvml), per_user_gpu_quota=QUOTA,
                            clock=self.tick)

    def tick(self) -> float:
        self.clock += 1.0
        return self.clock

    # -- what the model expects -------------------------------------------------------------

    def free(self, glob: str | None) -> set[str]:
        busy = {uuid for uuids in self.running.values() for uuid in uuids}
        return GLOBS[glob] - busy

    def held_by(self, user: str) -> int:
        return sum(len(uuids) for (owner, _), uuids in self.running.items() if owner == user)

    # -- rules --------------------------------------------------------------------------------

    @rule(user=users, server=server_names, count=st.integers(1, 3), glob=st.sampled_from(list(GLOBS)))
    def spawn(self, user, server, count, glob):
        key = (user, server)
        if key in self.running:
            return  # the hub never starts a server that runs
        free = self.free(glob)
        soft = self.allocator.allocation(user, server)
        try:
            allocation = self.allocator.allocate(user, server, count, model_glob=glob)
        except GpuQuotaExceeded:
            assert self.held_by(user) + count > QUOTA
            return
        except GpuUnavailable:
            assert self.held_by(user) + count <= QUOTA and len(free) < count
            return
        assert self.held_by(user) + count <= QUOTA
        assert len(allocation.uuids) == count and set(allocation.uuids) <= free
        if soft is not None and len(soft.uuids) == count and set(soft.uuids) <= free:
            assert allocation.uuids == soft.uuids  # a restarted server gets its own GPUs back
        self.running[key] = allocation.uuids
        self.containers[key] = ContainerRecord(f"jupyter-{user}-{server}", allocation.labels(), True, self.clock)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), keep_container=st.booleans())
    def stop(self, data, keep_container):
        key = data.draw(st.sampled_from(sorted(self.running)))
        self.allocator.release(*key)
        del self.running[key]
        self.stop_container(key, keep_container)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def crash_noticed_by_poll(self, data):
        key = data.draw(st.sampled_from(sorted(self.running)))
        self.stop_container(key, keep=True)
        self.allocator.release(*key)
        del self.running[key]

    @precondition(lambda self: set(self.running) - self.died_unnoticed)
    @rule(data=st.data())
    def crash_while_the_hub_is_down(self, data):
        key = data.draw(st.sampled_from(sorted(set(self.running) - self.died_unnoticed)))
        self.stop_container(key, keep=True)
        self.died_unnoticed.add(key)

    @rule()
    def restart_hub(self):
        self.allocator = self.new_allocator()
        assert self.allocator.rebuild(self.containers.values()) == []
        for key in sorted(self.died_unnoticed):  # the hub polls its servers: these are gone
            self.allocator.release(*key)
            del self.running[key]
        self.died_unnoticed.clear()

    def stop_container(self, key: tuple[str, str], keep: bool) -> None:
        self.died_unnoticed.discard(key)
        if keep:
            record = self.containers[key]
            self.containers[key] = ContainerRecord(record.name, record.labels, False, record.created)
        else:
            del self.containers[key]

    # -- invariants ---------------------------------------------------------------------------

    def active(self) -> list[Allocation]:
        return [a for a in self.allocator.allocations() if a.active]

    @invariant()
    def no_gpu_is_assigned_twice(self):
        uuids = [uuid for allocation in self.active() for uuid in allocation.uuids]
        assert len(uuids) == len(set(uuids))

    @invariant()
    def the_table_holds_exactly_what_runs(self):
        # died_unnoticed servers still run as far as the hub knows, until it restarts
        assert {a.key: a.uuids for a in self.active()} == self.running

    @invariant()
    def stopped_holds_come_from_kept_containers(self):
        for allocation in self.allocator.allocations():
            if not allocation.active:
                record = self.containers.get(allocation.key)
                assert record is not None and not record.running
                assert record.labels == allocation.labels()

    @invariant()
    def stopped_holds_yield_to_running_servers(self):
        running = {uuid for allocation in self.active() for uuid in allocation.uuids}
        stopped = {uuid for allocation in self.allocator.allocations() if not allocation.active
                   for uuid in allocation.uuids}
        assert not running & stopped


GpuAllocationStates.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_gpu_allocation_states = GpuAllocationStates.TestCase
