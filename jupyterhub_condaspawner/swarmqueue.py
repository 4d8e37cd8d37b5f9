"""The swarm's GPUs as the hub's GPU queue sees them (:class:`SwarmSeats`).

On a conda-swarm hub, GPU starts wait in the hub's own :class:`~.gpuqueue.GpuQueue`, as on
one host: first come, first served, "2 ahead of you" on the progress page,
``GpuAllocator.queue_timeout``, the hold for an older, bigger request. A start leaves the
queue (its service is created) only when the swarm, as last read from the manager, has a GPU
for it; Swarm then places the service and assigns its GPUs as before. Without this, every
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

from .gpuinventory import Gpu, GpuScan
from .gpus import Allocation, GpuAllocator, GpuUnavailable
from .swarm import NodeInfo, ServiceRequest, SwarmState, check_feasible, closed_gpus_note

# How old the swarm's last read may be when a waiting start tries again (at most once a second).
SWARM_READ_INTERVAL_S = 1.0

Key = tuple[str, str]  # (user name, server name)


class SwarmSeats:
    """What :class:`~.gpuqueue.GpuQueue` asks of an allocator, answered from the swarm's state.

    ``settings``: the hub's GpuAllocator, for ``queue_timeout`` and ``queue_hold_after``;
    ``read_state``: reads the swarm from its manager (blocking).
    """

    def __init__(self, settings: GpuAllocator, read_state: Callable[[], SwarmState],
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._read_state = read_state
        self._clock = clock
        self._lock = threading.Lock()
        self._state: SwarmState | None = None
        self._read_at = float("-inf")
        self._seats: dict[Key, int] = {}
        self._listeners: list[Callable[[], None]] = []

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
            self.observe(self._read_state())
        return self.known_scan()

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
        (SwarmInfeasible when no node could ever run it). ``avoid``: GPUs not to go for (those
        the queue holds for an older request): a node with one of them is not counted.
        ``min_free_memory`` and ``rescan`` are the one-host allocator's (Swarm reads no memory)."""
        with self._lock:
            state = self._state
            if state is None:
                raise GpuUnavailable("the swarm has not been read yet", "No GPU is known on this hub yet: try again")
            request = ServiceRequest(gpus=count, gpu_model=model_glob, cuda=cuda, profile=profile)
            check_feasible(state, request)
            nodes = [node for node in state.nodes if node.schedulable and request.fits(node)
                     and not (avoid is not None and any(avoid(_as_gpu(node, index, gpu))
                                                        for index, gpu in enumerate(node.gpus)))]
            free = [state.free_on(node)[0] for node in nodes]
            unplaced = self._unplaced(state, except_key=(user, server_name))
            if max(free, default=0) < count or sum(free) - unplaced < count:
                raise _no_gpu_free(state, request, unplaced)
            self._seats[(user, server_name)] = count
        return Allocation(user, server_name, (), time.time())

    def _unplaced(self, state: SwarmState, except_key: Key) -> int:
        """GPUs asked for by live tasks Swarm has not assigned GPUs yet, and by seats whose task
        is not placed (created a moment ago, or not yet): they go to those first."""
        placed = {(task.user, task.server_name) for task in state.tasks if task.live and task.gpus}
        waiting = {(task.user, task.server_name): task.gpus_requested for task in state.tasks
                   if task.live and task.gpus_requested and not task.gpus}
        waiting.update((key, count) for key, count in self._seats.items() if key not in placed)
        waiting.pop(except_key, None)
        return sum(waiting.values())

    def release(self, user: str, server_name: str, placed: SwarmState | None = None) -> Allocation | None:
        """Give up (user, server_name)'s seat: its start ended, or Swarm placed its task
        (``placed``: the state that says so, so that the next in line counts its GPUs)."""
        with self._lock:
            if placed is not None:
                self._state, self._read_at = placed, self._clock()
            count = self._seats.pop((user, server_name), None)
        if count is not None:
            self.freed()
        return None

    def freed(self, state: SwarmState | None = None) -> None:
        """GPUs may be free (a server stopped, a seat went): the queue's heads try again, judging
        by ``state`` when given (a read made after the change), else by the next read of the swarm."""
        if state is not None:
            self.observe(state)
        else:  # the next try reads the swarm again
            with self._lock:
                self._read_at = float("-inf")
        for listener in list(self._listeners):
            listener()

    def on_release(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from any thread) whenever GPUs may have become free."""
        self._listeners.append(listener)

    def seats(self) -> dict[Key, int]:
        with self._lock:
            return dict(self._seats)


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
