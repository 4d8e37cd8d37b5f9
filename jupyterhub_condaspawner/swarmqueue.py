"""The swarm's GPUs as the hub's GPU queue sees them (:class:`SwarmSeats`).

On a conda-swarm hub, GPU starts wait in the hub's own :class:`~.gpuqueue.GpuQueue`, as on
one host: first come, first served, "2 ahead of you" on the progress page,
``GpuAllocator.queue_timeout``, the hold for an older, bigger request. A start leaves the
queue (its service is created) only when the swarm, as last read from the manager, has a GPU
for it: with ``assign`` (``CondaSwarmSpawner.gpu_assignment = "hub"``) the seat names that
node and GPU ids, which the service is pinned to; else Swarm's scheduler assigns them. Without this, every
waiting start would be a pending service, and whichever Swarm's scheduler picks first would
get the next free GPU.

A start let through holds a *seat* until Swarm has placed its task (or the start ends): it
counts against the free GPUs meanwhile, so the next in line does not go for the same one.
Pending GPU tasks of the swarm (another hub's, or a start waiting in Swarm for CPU or memory)
count against them too: they are older, and take a GPU as soon as one is free.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import swarmplacement
from .gpuinventory import Gpu, GpuScan
from .gpuqueue import HeldFor
from .gpus import Allocation, GpuAllocator, GpuUnavailable
from .swarm import NodeInfo, ServiceRequest, SwarmState, check_feasible, check_quota, closed_gpus_note

# How old the swarm's last read may be when a waiting start tries again (at most once a second).
SWARM_READ_INTERVAL_S = 1.0

Key = tuple[str, str]  # (user name, server name)


@dataclass(frozen=True)
class _Seat:
    count: int
    node_id: str = ""  # with ``assign``: the node whose GPUs it was given
    gpus: tuple[str, ...] = ()
    cpus: int = 0  # nano-CPUs and memory bytes its service reserves on that node
    memory: int = 0


@dataclass(frozen=True)
class _Needs:
    nano_cpus: int = 0
    memory: int = 0
    constraints: tuple[str, ...] = ()  # the admin's (extra_placement_spec)


class NodeBusy(GpuUnavailable):
    """GPUs are free, but not on a node with the CPU and memory the start reserves (``assign`` only)."""


class SwarmSeats:
    """What :class:`~.gpuqueue.GpuQueue` asks of an allocator, answered from the swarm's state.

    ``settings``: the hub's GpuAllocator, for ``queue_timeout`` and ``queue_hold_after``;
    ``read_state``: reads the swarm from its manager (blocking); ``assign``: the hub picks each
    start's node and GPU ids (CondaSwarmSpawner.gpu_assignment "hub"), else Swarm does.
    """

    def __init__(self, settings: GpuAllocator, read_state: Callable[[], SwarmState], assign: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.assign = assign
        self._read_state = read_state
        self._clock = clock
        self._lock = threading.Lock()
        self._state: SwarmState | None = None
        self._read_at = float("-inf")
        self._seats: dict[Key, _Seat] = {}
        self._needs: dict[Key, _Needs] = {}  # what each start's service reserves, where it may go
        self._refused: dict[Key, str] = {}  # what each start's last try lacked
        self._listeners: list[Callable[[], None]] = []
        self._releases = 0  # seats given up so far: a read begun before one may predate its task

    @property
    def queue_timeout(self) -> float:
        return self.settings.queue_timeout

    @property
    def queue_hold_after(self) -> float:
        return self.settings.queue_hold_after

    # -- the swarm's state ------------------------------------------------------------------

    def latest_scan(self) -> GpuScan:
        """The swarm's GPUs, read again from the manager when the last read is older than
        SWARM_READ_INTERVAL_S (blocking: off the event loop)."""
        with self._lock:
            stale = self._clock() - self._read_at >= SWARM_READ_INTERVAL_S
        if stale:
            self.refresh()
        return self.known_scan()

    def refresh(self) -> SwarmState:
        """Read the swarm from the manager now (blocking) and take that as its state, unless a seat
        went while the read was under way: the read may predate that seat's task, whose GPUs would
        look free (then the state the seat went with stands, or the swarm is read again)."""
        while True:
            with self._lock:
                releases = self._releases
            state = self._read_state()
            with self._lock:
                if self._releases == releases:
                    self._state, self._read_at = state, self._clock()
                if self._state is not None and self._read_at > float("-inf"):
                    return self._state

    def known_scan(self) -> GpuScan:
        """The swarm's GPUs as last read, as GPUs named by their node's model (what the queue
        compares requests by); none before the first read."""
        with self._lock:
            state = self._state
        nodes = state.nodes if state is not None else ()
        return GpuScan(tuple(_as_gpu(node, index, gpu) for node in nodes for index, gpu in enumerate(node.gpus)))

    def observe(self, state: SwarmState) -> None:
        """Take ``state`` (read from the manager just now) as the swarm's."""
        with self._lock:
            self._state, self._read_at = state, self._clock()

    # -- seats ------------------------------------------------------------------------------

    def allocate(self, user: str, server_name: str, count: int, model_glob: str | None = None,
                 min_free_memory: int | None = None, *, cuda: str | None = None, profile: str | None = None,
                 rescan: bool = False, avoid: Callable[[Gpu], bool] | None = None) -> Allocation:
        """A seat for (user, server_name) when a node that fits has ``count`` GPUs free, counting
        the GPUs of tasks Swarm has not placed yet and of the other seats; else GpuUnavailable
        (SwarmInfeasible when no node could ever run it). With ``assign``, the seat is ``count``
        GPU ids of one node (the fullest that has them: whole nodes stay free for bigger
        requests), which the allocation names. ``avoid``: GPUs not to go for (those the queue
        holds for an older request): a node with one of them is not counted. GpuQuotaExceeded when the
        user's other servers hold their quota (``settings.per_user_gpu_quota``). ``min_free_memory``
        and ``rescan`` are the one-host allocator's (Swarm reads no memory)."""
        with self._lock:
            state = self._state
            if state is None:
                raise GpuUnavailable("the swarm has not been read yet", "No GPU is known on this hub yet: try again")
            request = ServiceRequest(gpus=count, gpu_model=model_glob, cuda=cuda, profile=profile)
            check_feasible(state, request)
            check_quota(state, user, server_name, count, self.settings.per_user_gpu_quota, profile,
                        held=self._held_by(state, user, server_name))
            allowed = self._needs.get((user, server_name), _Needs()).constraints
            nodes = [node for node in state.nodes if node.schedulable and request.fits(node)
                     and swarmplacement.allows(node.attributes, allowed) and not _avoided(node, avoid)]
            free = {node.id: self._free_ids(state, node) for node in nodes}
            unplaced = self._unplaced(state, except_key=(user, server_name))
            self._refused.pop((user, server_name), None)
            if max(map(len, free.values()), default=0) < count or sum(map(len, free.values())) - unplaced < count:
                self._refused[(user, server_name)] = "a GPU"
                raise _no_gpu_free(state, request, unplaced + self._seated(state))
            seat = _Seat(count)
            if self.assign:
                seat = self._pick(state, (user, server_name), request, free)
            self._seats[(user, server_name)] = seat
        return Allocation(user, server_name, seat.gpus, time.time())

    def _held_by(self, state: SwarmState, user: str, server_name: str) -> int:
        """GPUs the user's other servers hold or are about to: their live tasks', and their seats' whose
        task Swarm has not made yet (a quota refusal never waits in the queue, as on one host)."""
        asked = {task.server_name: task.gpus_requested for task in state.tasks if task.live and task.user == user}
        asked.update((name, seat.count) for (owner, name), seat in self._seats.items()
                     if owner == user and name not in asked)
        asked.pop(server_name, None)
        return sum(asked.values())

    def _pick(self, state: SwarmState, key: Key, request: ServiceRequest, free: dict[str, tuple[str, ...]]) -> _Seat:
        """The seat of an assigning start: ``request.gpus`` ids of the fullest node that has them and the
        CPU and memory the start reserves (:meth:`expect`) free; NodeBusy when no such node has those."""
        needs = self._needs.get(key, _Needs())
        cpus, memory = needs.nano_cpus, needs.memory
        nodes = {node.id: node for node in state.nodes}
        roomy = [node_id for node_id, ids in free.items() if len(ids) >= request.gpus
                 and all(have >= need for have, need in zip(self._room(state, nodes[node_id]), (cpus, memory)))]
        if not roomy:
            self._refused[key] = "CPU or memory"
            raise NodeBusy(f"{request.describe()}: the nodes with its GPUs free lack the CPU or memory it reserves",
                           "No node with a free GPU has the CPU or memory your server reserves free now "
                           "(try again when a server stops)")
        node_id = min(roomy, key=lambda node_id: (len(free[node_id]), node_id))
        return _Seat(request.gpus, node_id, free[node_id][:request.gpus], cpus, memory)

    def _room(self, state: SwarmState, node: NodeInfo) -> tuple[int, int]:
        """(nano-CPUs, memory bytes) the node has unreserved by conda-swarm tasks and by seats given
        its GPUs whose task it does not run yet; a node that reports none has no limit."""
        _, cpus, memory = state.free_on(node)
        placed = {(task.user, task.server_name) for task in state.tasks if task.live and task.node_id == node.id}
        for key, seat in self._seats.items():
            if seat.node_id == node.id and key not in placed:
                cpus, memory = cpus - seat.cpus, memory - seat.memory
        return (cpus if node.nano_cpus else 1 << 62, memory if node.memory else 1 << 62)

    def waiting_for(self, user: str, server_name: str) -> str:
        """What (user, server_name)'s last try lacked: "a GPU", "CPU or memory" (beside free GPUs), or ""."""
        with self._lock:
            return self._refused.get((user, server_name), "")

    def expect(self, user: str, server_name: str, nano_cpus: int = 0, memory: int = 0,
               constraints: tuple[str, ...] = ()) -> None:
        """What (user, server_name)'s service will reserve beside its GPUs, and the admin's placement
        constraints it carries: its seat counts only nodes those allow, and an assigning seat goes to
        one that has the CPU and memory free (forgotten with the seat)."""
        with self._lock:
            self._needs[(user, server_name)] = _Needs(nano_cpus, memory, constraints)

    def _free_ids(self, state: SwarmState, node: NodeInfo) -> tuple[str, ...]:
        """The node's GPUs that no live task holds and no seat has been given."""
        taken = set(state.holders()) | {gpu for seat in self._seats.values() for gpu in seat.gpus}
        return tuple(gpu for gpu in node.gpus if gpu not in taken)

    def _unplaced(self, state: SwarmState, except_key: Key) -> int:
        """GPUs asked for by live tasks Swarm has not assigned GPUs yet, and by seats whose task
        is not placed (created a moment ago, or not yet) and that name no GPUs: they go to those first."""
        placed = {(task.user, task.server_name) for task in state.tasks if task.live and task.gpus}
        waiting = {(task.user, task.server_name): task.gpus_requested for task in state.tasks
                   if task.live and task.gpus_requested and not task.gpus}
        waiting.update((key, seat.count) for key, seat in self._seats.items() if key not in placed and not seat.gpus)
        waiting.pop(except_key, None)
        return sum(waiting.values())

    def open_gpus(self) -> tuple[int, int]:
        """(held, all) GPUs of the nodes that take servers, as last read (SwarmState.open_gpus), the ids
        given to seats whose task Swarm does not show yet counted as held (what the waiting line says)."""
        with self._lock:
            return (0, 0) if self._state is None else self._held_and_open(self._state)

    def held_text(self) -> str | None:
        """"3 of 4 GPUs are held" (as :meth:`open_gpus`), with the GPUs of nodes that take no servers now,
        all from one read of the swarm (what the waiting line says); None before the first read."""
        with self._lock:
            if self._state is None:
                return None
            held, open_gpus = self._held_and_open(self._state)
            return f"{held} of {open_gpus} GPUs are held{closed_gpus_note(self._state, open_gpus)}"

    def _held_and_open(self, state: SwarmState) -> tuple[int, int]:
        held, open_gpus = state.open_gpus()
        return held + self._seated(state), open_gpus

    def _seated(self, state: SwarmState) -> int:
        """GPU ids given to seats (``assign``) on the nodes that take servers, that no task holds yet."""
        held = state.holders()
        open_ids = {gpu for node in state.nodes if node.schedulable for gpu in node.gpus}
        return len({gpu for seat in self._seats.values() for gpu in seat.gpus if gpu in open_ids and gpu not in held})

    def node_of(self, user: str, server_name: str) -> str:
        """The node whose GPUs (user, server_name)'s seat was given ("" without ``assign``, or no seat)."""
        with self._lock:
            seat = self._seats.get((user, server_name))
        return seat.node_id if seat is not None else ""

    def release(self, user: str, server_name: str, placed: SwarmState | None = None) -> Allocation | None:
        """Give up (user, server_name)'s seat: its start ended, or Swarm placed its task
        (``placed``: the state that says so, in which the task holds its GPUs; the queue's heads
        try again on it). Without ``placed``, they try on the next read of the swarm: a service
        of the seat that outlived its start (its removal failed) must be seen holding its GPUs."""
        with self._lock:
            if placed is not None:
                self._state, self._read_at = placed, self._clock()
            else:
                self._read_at = float("-inf")
            seat = self._seats.pop((user, server_name), None)
            self._releases += seat is not None
            self._needs.pop((user, server_name), None)
            self._refused.pop((user, server_name), None)
        if seat is not None and placed is not None:
            self._tell_listeners()
        return None

    def freed(self, state: SwarmState | None = None) -> None:
        """GPUs may be free (a server stopped, a seat went): the queue's heads try again, judging
        by ``state`` when given (a read made after the change), else by the next read of the swarm."""
        if state is not None:
            self.observe(state)
        else:  # the next try reads the swarm again
            with self._lock:
                self._read_at = float("-inf")
        self._tell_listeners()

    def _tell_listeners(self) -> None:
        for listener in list(self._listeners):
            listener()

    def on_release(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from any thread) whenever GPUs may have become free."""
        self._listeners.append(listener)

    def seats(self) -> dict[Key, tuple[str, ...]]:
        """The seats now: the GPU ids each was given (none without ``assign``)."""
        with self._lock:
            return {key: seat.gpus for key, seat in self._seats.items()}


def _avoided(node: NodeInfo, avoid: Callable[[Gpu], bool] | None) -> bool:
    """Whether the node has a GPU ``avoid`` names; when they are held for an older start (HeldFor),
    only if the node has as many GPUs as it asks for: its GPUs must all be on one node."""
    if avoid is None or (isinstance(avoid, HeldFor) and len(node.gpus) < avoid.request.count):
        return False
    return any(avoid(_as_gpu(node, index, gpu)) for index, gpu in enumerate(node.gpus))


def _as_gpu(node: NodeInfo, index: int, gpu_id: str) -> Gpu:
    return Gpu(index=index, uuid=gpu_id, name=node.gpu_model or "", source="swarm")


def _no_gpu_free(state: SwarmState, request: ServiceRequest, unplaced: int) -> GpuUnavailable:
    """"No GPU is free on this hub: F of T (...)", as on one host, of the nodes that take new servers
    (``unplaced``: GPUs older starts will take first, not free for this one)."""
    held, open_gpus = state.open_gpus()
    elsewhere = closed_gpus_note(state, open_gpus)
    detail = (f"{request.describe()}: {held} of {open_gpus} GPUs of the nodes that take servers are held, "
              f"{unplaced} more asked for by older starts{elsewhere}")
    free = max(open_gpus - held - unplaced, 0)
    return GpuUnavailable(detail, f"No GPU is free on this hub: {free} of {open_gpus} "
                                  f"({request.describe(True)}{elsewhere}; try again when a server stops)")
