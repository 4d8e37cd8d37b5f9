"""The hub's GPU queue in front of a swarm (swarmqueue.SwarmSeats), judged on swarm states as the
manager reports them (nodes, tasks). tests/test_swarm_spawner.py runs it on the real swarm."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import pytest

from jupyterhub_condaspawner import swarmplacement
from jupyterhub_condaspawner.gpuqueue import GpuQueue
from jupyterhub_condaspawner.gpus import GpuAllocator, GpuInventory, GpuQuotaExceeded, GpuUnavailable
from jupyterhub_condaspawner.swarm import (
    NodeInfo,
    ServiceRequest,
    SwarmInfeasible,
    SwarmState,
    TaskInfo,
    node_info,
    reservation,
)
from jupyterhub_condaspawner.swarmqueue import NodeBusy, SwarmSeats

A100 = "NVIDIA A100-SXM4-80GB"


def node(name: str, gpus: int, availability: str = "active", model: str = A100) -> NodeInfo:
    return NodeInfo(f"id-{name}", name, "10.0.0.1", "ready", availability, "worker",
                    tuple(f"GPU-{name}-{index}" for index in range(gpus)), model, 4 * 10**9, 8 * 2**30)


def task(user: str, gpus: tuple[str, ...] = (), requested: int = 1, state: str = "running") -> TaskInfo:
    on = f"id-{gpus[0].split('-')[1]}" if gpus else ""  # GPU-worker3-0 is worker3's
    return TaskInfo(f"task-{user}", f"service-{user}", on, state if gpus else "pending",
                    "running", "", "", user, "", requested, gpus, "2026-12-03T10:00:00Z")


class Swarm:
    """What the manager would answer, changed by the test."""

    def __init__(self, *nodes: NodeInfo):
        self.state = SwarmState(nodes, ())
        self.reads = 0
        self.meanwhile: Callable[[], object] | None = None  # what happens while a read is under way

    def read(self) -> SwarmState:
        self.reads += 1
        state = self.state
        if self.meanwhile is not None:
            self.meanwhile()
        return state

    def run(self, *tasks: TaskInfo) -> SwarmState:
        self.state = SwarmState(self.state.nodes, tasks)
        return self.state


def seats_on(swarm: Swarm, assign: bool = False, **settings) -> SwarmSeats:
    seats = SwarmSeats(GpuAllocator(inventory=GpuInventory(static_gpus=[]), **settings), swarm.read, assign=assign)
    seats.latest_scan()
    return seats


def test_a_seat_counts_against_the_free_gpus_until_swarm_has_placed_its_task():
    swarm = Swarm(node("worker1", 2))
    seats = seats_on(swarm)
    seats.allocate("ann", "", 1)
    seats.allocate("bob", "", 1)
    with pytest.raises(GpuUnavailable) as refusal:
        seats.allocate("cid", "", 1)
    assert refusal.value.user_message == ("No GPU is free on this hub: 0 of 2 (this server needs 1 GPU; try again "
                                          "when a server stops)")

    # Swarm placed ann's task: her GPU is held, bob's seat still counts: nothing for cid.
    seats.observe(swarm.run(task("ann", ("GPU-worker1-0",)), task("bob")))
    with pytest.raises(GpuUnavailable):
        seats.allocate("cid", "", 1)
    # bob's start ended before Swarm placed it (its service removed): his GPU is cid's.
    seats.release("bob", "", placed=swarm.run(task("ann", ("GPU-worker1-0",))))
    assert seats.allocate("cid", "", 1).user == "cid"


def test_pending_gpu_tasks_of_the_swarm_go_first():
    # Another hub's server (or one waiting in Swarm for CPU) asked before: the free GPU is its.
    swarm = Swarm(node("worker1", 2))
    swarm.run(task("ann", ("GPU-worker1-0",)), task("other-hub"))
    seats = seats_on(swarm)
    with pytest.raises(GpuUnavailable) as refusal:
        seats.allocate("bob", "", 1)
    assert "0 of 2" in refusal.value.user_message


def test_gpus_of_a_drained_node_and_gpus_split_across_nodes_are_not_free_for_a_request():
    swarm = Swarm(node("worker1", 2), node("worker2", 2, availability="drain"), node("worker3", 2))
    swarm.run(task("ann", ("GPU-worker1-0",)), task("bob", ("GPU-worker3-0",)))
    seats = seats_on(swarm)
    with pytest.raises(GpuUnavailable) as refusal:
        seats.allocate("cid", "", 2)  # one free on worker1, one on worker3: no node has two
    assert refusal.value.user_message == (
        "No GPU is free on this hub: 2 of 4 (this server needs 2 GPUs, and 2 more are on nodes that take no new "
        "servers now (down, drained or paused); try again when a server stops)")
    assert seats.allocate("cid", "", 1).user == "cid"


def test_a_request_no_node_could_ever_meet_is_refused_as_infeasible():
    seats = seats_on(Swarm(node("worker1", 2)))
    with pytest.raises(SwarmInfeasible):
        seats.allocate("ann", "", 3)
    with pytest.raises(SwarmInfeasible):
        seats.allocate("ann", "", 1, "*H100*")


def test_the_swarm_is_read_again_only_when_the_last_read_is_stale_or_gpus_were_freed():
    swarm = Swarm(node("worker1", 1))
    seats = seats_on(swarm)
    seats.latest_scan()
    assert swarm.reads == 1  # read a moment ago
    seats.freed()
    seats.latest_scan()
    assert swarm.reads == 2
    assert [gpu.name for gpu in seats.known_scan().countable] == [A100]


async def test_waiting_starts_get_the_swarms_freed_gpus_first_come_first_served():
    swarm = Swarm(node("worker1", 1))
    swarm.run(task("holder", ("GPU-worker1-0",)))
    queue = GpuQueue(seats_on(swarm, queue_timeout=60))
    seats = queue.allocator
    first = asyncio.ensure_future(queue.allocate("first", "", 1))
    await until(lambda: queue.ahead_of("first", "") == 0)
    second = asyncio.ensure_future(queue.allocate("second", "", 1))
    await until(lambda: queue.ahead_of("second", "") == 1)

    seats.freed(swarm.run())  # the holder's service was removed
    assert (await asyncio.wait_for(first, 30)).user == "first"
    await until(lambda: queue.ahead_of("second", "") == 0)
    assert not second.done()  # first's seat holds the GPU until Swarm places its task

    seats.release("first", "", placed=swarm.run(task("first", ("GPU-worker1-0",))))
    await asyncio.sleep(0.1)
    assert not second.done()  # placed: the GPU is first's now
    seats.freed(swarm.run())
    assert (await asyncio.wait_for(second, 30)).user == "second"


async def until(condition) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail("not after 500 tries")


def test_assigning_seats_give_distinct_ids_of_the_fullest_node_that_has_them():
    # gpu_assignment "hub": the seat names its node and GPU ids; whole nodes stay free for bigger requests.
    swarm = Swarm(node("worker1", 2), node("worker2", 2))
    swarm.run(task("ann", ("GPU-worker2-0",)))
    seats = seats_on(swarm, assign=True)
    first = seats.allocate("bob", "", 1)
    assert first.uuids == ("GPU-worker2-1",) and seats.node_of("bob", "") == "id-worker2"
    pair = seats.allocate("cid", "", 2)
    assert set(pair.uuids) == {"GPU-worker1-0", "GPU-worker1-1"} and seats.node_of("cid", "") == "id-worker1"
    with pytest.raises(GpuUnavailable):
        seats.allocate("dan", "", 1)  # every id is held or given to a seat


def test_gpus_a_hub_assigned_are_held_from_their_services_labels_even_before_swarm_placed_the_task():
    # A new hub (no seats) reads who holds which GPU from the services' labels: never handed out twice.
    swarm = Swarm(node("worker1", 2))
    pending = TaskInfo("task-ann", "service-ann", "", "pending", "running", "", "", "ann", "", 1, ("GPU-worker1-1",),
                       "2026-12-03T10:00:00Z")
    swarm.run(pending)
    seats = seats_on(swarm, assign=True)
    assert seats.allocate("bob", "", 1).uuids == ("GPU-worker1-0",)



def test_an_assigning_seat_goes_to_a_node_with_the_cpu_its_start_reserves_or_waits():
    # Each node has 4 CPUs; ann's server reserves 3 on worker1, which has the most GPUs taken.
    swarm = Swarm(node("worker1", 2), node("worker2", 2))
    swarm.run(TaskInfo("task-ann", "service-ann", "id-worker1", "running", "running", "", "", "ann", "", 1,
                       ("GPU-worker1-0",), "2026-12-03T10:00:00Z", nano_cpus=3 * 10**9))
    seats = seats_on(swarm, assign=True)
    seats.expect("bob", "", 2 * 10**9, 2**30)
    assert seats.allocate("bob", "", 1).uuids == ("GPU-worker2-0",)  # not the fuller worker1: 1 CPU left there
    seats.expect("cid", "", 3 * 10**9, 0)
    with pytest.raises(NodeBusy) as busy:
        seats.allocate("cid", "", 1)  # GPUs free on both, 3 CPUs on neither (bob's seat counts on worker2)
    assert busy.value.user_message == ("No node with a free GPU has the CPU or memory your server reserves free now "
                                       "(try again when a server stops)")
    assert seats.allocate("dan", "", 1).uuids == ("GPU-worker1-1",)  # reserving nothing, it fits the fullest


POOL_NODE = {"ID": "n1", "Description": {"Hostname": "gpu1", "Platform": {"OS": "linux", "Architecture": "x86_64"},
                                         "Engine": {"Labels": {"rack": "B4"}}},
             "Spec": {"Role": "worker", "Labels": {"pool": "Jupyter", "Zone": "east"}}}


@pytest.mark.parametrize(("constraints", "allowed"), [
    (["node.labels.pool==jupyter"], True),  # values without regard to case
    (["node.labels.pool!=jupyter"], False),
    (["node.labels.zone==east"], False),  # label names with it: "Zone" is another label
    (["node.labels.gpu==yes"], False), (["node.labels.gpu!=yes"], True),  # a label the node lacks
    (["node.role==worker", "node.hostname==gpu1", "node.id==n1"], True),
    (["node.role==manager"], False),
    (["node.ip==10.0.0.0/24"], True), (["node.ip==10.0.1.7"], False),
    (["node.ip!=10.0.0.0/33"], False), (["node.ip!=gpu1"], False),  # malformed: Swarm places it on no node
    (["NODE.IP == 10.0.0.7 "], True),  # keys without regard to case, spaces around
    (["node.platform.os==linux", "node.platform.arch==x86_64", "engine.labels.rack==b4"], True),
])
def test_the_hub_judges_an_admins_placement_constraints_as_swarm_does(constraints, allowed):
    attributes = swarmplacement.node_attributes({**POOL_NODE, "Status": {"Addr": "10.0.0.7"}})
    assert swarmplacement.allows(attributes, constraints) is allowed


def test_constraints_the_hub_cannot_judge_are_named():
    assert swarmplacement.unjudged(["node.labels.pool==jupyter", "node.weight>3", "service.name==x"]) == [
        "node.weight>3", "service.name==x"]
    # No value: Swarm refuses the service; the hub says so at once rather than finding no node for ever.
    assert swarmplacement.unjudged(["node.labels.gpu==", "node.role != "]) == ["node.labels.gpu==", "node.role != "]


def test_a_seat_counts_only_nodes_the_admins_constraints_allow():
    pooled = dataclasses.replace(node("worker1", 1), attributes=(("node.labels.pool", "jupyter"),))
    swarm = Swarm(pooled, node("worker2", 2))
    swarm.run(task("ann", ("GPU-worker1-0",)))
    seats = seats_on(swarm, assign=True)
    seats.expect("bob", "", constraints=("node.labels.pool==jupyter",))
    with pytest.raises(GpuUnavailable):
        seats.allocate("bob", "", 1)  # worker2's GPUs are free, but outside the pool
    assert seats.allocate("cid", "", 1).uuids == ("GPU-worker2-0",)


def test_a_read_begun_before_a_seat_went_does_not_free_that_seats_gpus():
    # A slow read of the manager began before ann's service existed; meanwhile Swarm placed her task
    # and her seat went (with the state that shows it). That older read must not make her GPU free.
    swarm = Swarm(node("worker1", 1))
    seats = seats_on(swarm, assign=True)
    ann = seats.allocate("ann", "", 1)
    swarm.meanwhile = lambda: seats.release("ann", "", placed=swarm.run(task("ann", ann.uuids)))
    seats.freed()  # the next try reads the swarm again
    seats.latest_scan()
    swarm.meanwhile = None
    with pytest.raises(GpuUnavailable):
        seats.allocate("bob", "", 1)
    assert seats.seats() == {}


async def test_a_start_over_the_users_quota_is_refused_at_once_not_queued():
    # per_user_gpu_quota 1: ann's running server holds one, so her second start is refused as on one
    # host, not left waiting for a GPU it may never hold (and given one ahead of others).
    swarm = Swarm(node("worker1", 2))
    swarm.run(task("ann", ("GPU-worker1-0",)), task("bob", ("GPU-worker1-1",)))
    queue = GpuQueue(seats_on(swarm, queue_timeout=60, per_user_gpu_quota=1))
    with pytest.raises(GpuQuotaExceeded) as refusal:
        await asyncio.wait_for(queue.allocate("ann", "second", 1), 30)
    assert refusal.value.user_message.endswith("ann already holds 1 of their quota of 1: stop another server first")
    assert queue.length == 0


def test_a_seat_counts_against_its_users_quota_before_swarm_has_placed_its_task():
    swarm = Swarm(node("worker1", 2))
    seats = seats_on(swarm, assign=True, per_user_gpu_quota=1)
    seats.allocate("ann", "", 1)
    with pytest.raises(GpuQuotaExceeded):
        seats.allocate("ann", "second", 1)
    assert seats.allocate("bob", "", 1).user == "bob"


def test_a_pinned_start_pending_in_swarm_waits_for_cpu_or_memory_not_for_its_own_gpus():
    # gpu_assignment "hub": bob's service was given worker1's last GPU (its label) and waits in Swarm
    # for CPU there. His progress line and timeout must say CPU or memory: the GPU is his.
    swarm = Swarm(node("worker1", 2))
    ann = task("ann", ("GPU-worker1-0",))
    bob = TaskInfo("task-bob", "service-bob", "", "pending", "running", "", "no suitable node (insufficient "
                   "resources on 1 node)", "bob", "", 1, ("GPU-worker1-1",), "2026-12-03T10:00:00Z")
    state = swarm.run(ann, bob)
    request = ServiceRequest(gpus=1, cpu_reservation=4)
    assert state.waiting_for(request, own=bob) == "CPU or memory"
    assert state.waiting_for(request) == "a GPU"  # for anyone else, none is free


def test_node_ip_is_compared_as_an_address_and_as_swarm_sees_it():
    attrs = {**POOL_NODE, "Status": {"Addr": "2001:db8::7"}}
    assert swarmplacement.allows(node_info(attrs).attributes, ["node.ip==2001:DB8:0::7"])
    # A manager that reports 0.0.0.0 is reached at its manager address, but Swarm's node.ip is 0.0.0.0.
    manager = {**POOL_NODE, "Status": {"Addr": "0.0.0.0"}, "ManagerStatus": {"Addr": "10.0.0.9:2377"}}
    info = node_info(manager)
    assert info.address == "10.0.0.9"
    assert not swarmplacement.allows(info.attributes, ["node.ip==10.0.0.9"])


def test_the_cpu_and_memory_a_seat_must_find_free_are_what_the_service_reserves():
    # The admin's reservations (extra_resources_spec) apply where the profile sets none: the hub's
    # pick of a node must count them, or the pinned service waits in Swarm on a node without them.
    admins = {"cpu_reservation": 2 * 10**9, "mem_reservation": 2**30}
    assert reservation(ServiceRequest(gpus=1), admins) == (2 * 10**9, 2**30)
    assert reservation(ServiceRequest(gpus=1, cpu_reservation=1.5), admins) == (1_500_000_000, 2**30)
    assert reservation(ServiceRequest(gpus=1)) == (0, 0)


def test_a_refusal_counts_the_gpus_the_hub_gave_seats_as_not_free():
    swarm = Swarm(node("worker1", 1))
    seats = seats_on(swarm, assign=True)
    seats.allocate("ann", "", 1)  # her service is being made: Swarm does not show it yet
    with pytest.raises(GpuUnavailable) as refusal:
        seats.allocate("bob", "", 1)
    assert refusal.value.user_message == ("No GPU is free on this hub: 0 of 1 (this server needs 1 GPU; try again "
                                          "when a server stops)")


def test_the_waiting_line_counts_gpus_given_to_seats_as_held():
    swarm = Swarm(node("worker1", 2), node("worker2", 2, availability="drain"))
    swarm.run(task("ann", ("GPU-worker1-0",)))
    seats = seats_on(swarm, assign=True)
    assert seats.open_gpus() == (1, 2)
    seats.allocate("bob", "", 1)  # his service is being made: Swarm shows no task of it yet
    assert seats.open_gpus() == (2, 2)
    # The line's figures and its note on the drained node's GPUs come from one read.
    assert seats.held_text() == ("2 of 2 GPUs are held, and 2 more are on nodes that take no new servers now "
                                 "(down, drained or paused)")
    assert seats_on(Swarm(), assign=True).held_text() == "0 of 0 GPUs are held"


def test_a_stopped_servers_task_holds_its_gpu_until_its_container_has_ended():
    # The user stopped ann's server (its service removed): Swarm shuts the task down, and its
    # container runs on for its grace period with the GPU. That GPU is not bob's yet.
    swarm = Swarm(node("worker1", 1))
    stopping = dataclasses.replace(task("ann", ("GPU-worker1-0",)), desired_state="remove")
    swarm.run(stopping)
    seats = seats_on(swarm, assign=True)
    with pytest.raises(GpuUnavailable):
        seats.allocate("bob", "", 1)
    seats.freed(swarm.run(dataclasses.replace(stopping, state="shutdown")))  # its container exited
    assert seats.allocate("bob", "", 1).uuids == ("GPU-worker1-0",)


async def test_gpus_held_for_an_older_bigger_start_are_only_those_of_nodes_it_could_run_on():
    # queue_hold_after has passed for a 4-GPU start waiting for node big: small's one GPU, which it
    # could never use (a start's GPUs are on one node), still goes to a younger 1-GPU start.
    swarm = Swarm(node("big", 4), node("small", 1))
    swarm.run(*(task(f"user{index}", (f"GPU-big-{index}",)) for index in range(4)))
    queue = GpuQueue(seats_on(swarm, assign=True, queue_timeout=60, queue_hold_after=0))
    older = asyncio.ensure_future(queue.allocate("older", "", 4))
    await until(lambda: queue.ahead_of("older", "") == 0)
    younger = await asyncio.wait_for(queue.allocate("younger", "", 1), 30)
    assert younger.uuids == ("GPU-small-0",)
    assert not older.done()
    older.cancel()
