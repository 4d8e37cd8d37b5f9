"""A conda-swarm GPU start's seat in the hub's GPU queue (swarmqueue.SwarmSeats): waiting its
turn, what it tells the seats it needs (CPU, memory, the admin's placement constraints), the node
and GPU ids the hub gives it (``gpu_assignment = "hub"``: pinned, labelled, in the runtime's
variable), another node's when its node cannot start it, and the seat's end. Mixed into
CondaSwarmSpawner by :class:`SwarmSeatMixin`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, cast

from . import swarm, swarmplacement
from .failures import config_failure
from .gpuqueue import GpuQueue
from .gpus import LABEL_GPUS, Allocation, GpuAllocator, GpuInfeasible, GpuUnavailable
from .spawngpus import CONTAINER_START_S
from .swarm import ServiceRequest, SwarmState
from .swarmqueue import SwarmSeats
from .swarmtask import TASK_POLL_S, cpu_wait_message

if TYPE_CHECKING:  # what the mixin is mixed into, for the type checker
    from .profiles import Profile
    from .spawner import CondaSpawner as _SpawnerBase
else:
    _SpawnerBase = object


class SwarmSeatMixin(_SpawnerBase):
    """The GPU seat of a server's start; the host class is a CondaSwarmSpawner."""

    if TYPE_CHECKING:  # CondaSwarmSpawner's own
        gpu_assignment: str
        gpu_resource: str
        extra_placement_spec: dict[str, Any]
        extra_resources_spec: dict[str, Any]
        _request: ServiceRequest
        _profile: Profile
        _deadline: float
        _assigned: tuple[str, ...]
        _failed_nodes: dict[str, str]
        _seated_off: tuple[str, ...]
        _pinned: tuple[str, tuple[str, ...]]
        _extra_labels: dict[str, str]

        def service_request(self, profile: Profile) -> ServiceRequest: ...

        def read_swarm(self, service_id: str | None = None) -> SwarmState: ...

        def _end_if_stop_asked(self, asked: bool = False) -> None: ...

        async def _pull_onto_gpu_nodes(self) -> None: ...

        def _nodes_still_pulling(self) -> list[str]: ...

        def _still_pulling_names(self) -> str: ...

        def _stop_following_pulls(self) -> None: ...

        def _follow_pulls_under_way(self, state: SwarmState) -> None: ...

        _pulls_matter: bool
        _pull_names: dict[str, str]

    async def _allocate_gpus(self, profile: Profile) -> Allocation | None:
        """A GPU start waits its turn in the hub's queue until a node has a GPU for it
        (swarmqueue.py; the per-user quota is checked there and again at create_object). With
        gpu_assignment "hub" its seat names the node and GPU ids (``_pinned``); else Swarm's
        scheduler assigns them. None: the server holds no allocation of the one-host allocator."""
        self._request = self.service_request(profile)
        self._profile = profile  # access is checked again if the task waits for a node
        self._pinned = ("", ())
        if profile.gpus:
            await self._pull_onto_gpu_nodes()  # no GPU held while a node pulls the image
            self._pulls_matter = True
            try:
                self._tell_seats_what_it_needs()
                allocation = await self._wait_in_gpu_queue(profile,
                                                           self._deadline - time.monotonic() - CONTAINER_START_S)
                # The seat counted no GPU of theirs: with gpu_assignment "swarm", Swarm may not place it there.
                self._seated_off = tuple(self._nodes_still_pulling())
            finally:
                self._stop_following_pulls()
            if allocation.uuids:  # gpu_assignment "hub": these GPUs, on their node
                self._pinned = (self._seats.node_of(*self.gpu_key), allocation.uuids)
        return None

    def _tell_seats_what_it_needs(self) -> None:
        """The CPU and memory the service reserves, and the admin's placement constraints: the
        queue gives it a seat only on a node where it can run."""
        constraints = tuple(self.extra_placement_spec.get("constraints") or ())
        self._check_judged(constraints)
        # Nodes that could not get the image, and those still pulling it (swarmpull.py).
        left = tuple(f"node.id!={node_id}" for node_id in [*self._failed_nodes, *self._nodes_still_pulling()])
        self._seats.expect(*self.gpu_key, *swarm.reservation(self._request, self.extra_resources_spec),
                           constraints + left)

    def _check_judged(self, constraints: tuple[str, ...]) -> None:
        """gpu_assignment "hub" picks the node itself: an admin's placement constraint it cannot
        judge (not a node attribute) would let it pick one Swarm never runs the service on."""
        unjudged = swarmplacement.unjudged(constraints) if self.gpu_assignment == "hub" else []
        if unjudged:
            raise config_failure(f"c.{type(self).__name__}.extra_placement_spec constraint {unjudged[0]!r} is not one "
                                 "the hub can judge when it picks the node (gpu_assignment 'hub'): use node.labels.*, "
                                 "node.role, node.hostname, node.id, node.ip, node.platform.* or engine.labels.*, "
                                 "or gpu_assignment 'swarm'")

    def gpu_queue(self, allocator: GpuAllocator) -> GpuQueue:
        """The hub's GPU queue, in front of the swarm: a start's service is created when its turn
        comes and a node has a GPU for it."""
        return GpuQueue(SwarmSeats(allocator, self.read_swarm, assign=self.gpu_assignment == "hub"))

    def _wake_the_queue(self) -> None:
        """The start's needs changed (a node may take it now): the queue's heads try again."""
        self._seats.freed()

    @property
    def _seats(self) -> SwarmSeats:
        return cast(SwarmSeats, self.services.queue.allocator)

    def _queue_message(self, ahead: int) -> str:
        who = "you are next" if not ahead else f"{ahead} ahead of you"
        held = self._seats.held_text()  # the GPUs given to starts a moment ago too
        if held is None:
            return f"Waiting for a GPU on any node: {who}"
        if self._seats.waiting_for(*self.gpu_key) == "CPU or memory":  # a node has the GPUs free, not the rest
            return cpu_wait_message(self._request)
        pulling = self._still_pulling_names()
        if pulling:  # their free GPUs are not this start's yet
            return f"Waiting for a GPU on a node that holds the image: {held}; still pulling it: {pulling}; {who}"
        return f"Waiting for a GPU on any node: {held}; {who}"

    def _leave_gpu_seat(self, placed: SwarmState | None = None) -> None:
        """The start's seat in the swarm's queue goes (``placed``: the state in which Swarm placed
        its task, whose GPUs the next in line then counts as held)."""
        if self._request.gpus:
            self._seats.release(*self.gpu_key, placed=placed)

    def _release_gpus(self) -> None:
        super()._release_gpus()
        if self._assigned:  # Swarm frees them as the task ends: the queue's next read sees it
            self._seats.freed()

    def _label_pinned_gpus(self) -> None:
        """gpu_assignment "hub": the service's GPU ids, in its label (which says who holds them:
        swarm.task_info, for this hub and the next) and in the runtime's variable."""
        gpus = self._pinned[1]
        if gpus:
            self._extra_labels[LABEL_GPUS] = ",".join(gpus)
            self._extra_env.update(swarm.pinned_gpus_env(gpus, self.gpu_resource))

    async def _pin_to_another_node(self) -> bool:
        """gpu_assignment "hub": the node the hub picked could not start the server (its service
        is removed): GPUs of a node this start has not failed on, as soon as one has them free
        (this start had its turn in the queue). False when none has before the start's deadline
        (the start fails: SwarmTaskMixin._try_another_node says why); True then, or when the hub
        assigned no GPUs (Swarm picks the next node)."""
        if not self._pinned[1]:
            return True
        seats = self._seats
        seats.release(*self.gpu_key)
        state = await asyncio.to_thread(seats.refresh)  # not one begun before its seat went
        self._follow_pulls_under_way(state)
        try:
            allocation = await self._another_nodes_gpus(state)
        finally:
            self._stop_following_pulls()
        if allocation is None:
            return False
        self._pinned = (seats.node_of(*self.gpu_key), allocation.uuids)
        self._label_pinned_gpus()
        return True

    async def _another_nodes_gpus(self, state: SwarmState) -> Allocation | None:
        """GPUs of a node the start has not failed on and that is not still pulling its image, as soon as
        one has them free (``state``: the swarm read after its seat went); None when none has before the
        start's deadline."""
        seats, request, told = self._seats, self._request, ""
        while True:
            self._tell_seats_what_it_needs()  # a node whose pull ended (or is overdue) may take it now
            self._end_if_stop_asked()
            node_of_gpu = {gpu: node.id for node in state.nodes for gpu in node.gpus}
            try:
                return seats.allocate(*self.gpu_key, request.gpus, request.gpu_model, cuda=request.cuda,
                                      profile=request.profile,
                                      avoid=lambda gpu: node_of_gpu.get(gpu.uuid) in self._failed_nodes)
            except GpuInfeasible:
                return None
            except GpuUnavailable:
                if time.monotonic() >= self._deadline:
                    return None
            pulling = self._still_pulling_names()
            message = f"Waiting for node {pulling} to finish pulling the image before taking its GPU" if pulling else ""
            if message and message != told:
                told = message
                await self._feed.publish("start", 91, message)
            await asyncio.sleep(TASK_POLL_S)
            state = await asyncio.to_thread(seats.refresh)  # not one begun before another seat went
