"""A fair queue for GPUs: a spawn that finds every fitting GPU held waits its turn.

Spawns asking for the same thing (GPU count, model, CUDA, free memory) wait first come,
first served; a newcomer never overtakes an earlier spawn of its own kind. Whenever GPUs
are freed (and at least once a second while anyone waits, for memory freed outside the
hub), the head of each kind tries again, oldest kind first. A smaller request of another
kind may take GPUs an older, bigger one waits for, but only for
``GpuAllocator.queue_hold_after`` seconds: then the GPUs the older one could use are held
for it (younger spawns that could take them wait), so no request starves. A spawn leaves
the queue when it gets its GPUs, when it is cancelled (the user stops the pending server),
or after ``GpuAllocator.queue_timeout`` (or less, when the spawn's own time runs out first)
with the usual one-line refusal. Requests this host can never meet, and quota refusals,
never queue.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import metrics
from .gpuinventory import Gpu, GpuScan
from .gpus import Allocation, GpuInfeasible, GpuQuotaExceeded, GpuRequest, GpuUnavailable

# The longest a waiting spawn goes without retrying (memory freed outside the hub, rescans).
RETRY_INTERVAL_S = 1.0

Kind = tuple[int, str, str, int]  # count, model glob, cuda, min free memory


class GpuSource(Protocol):
    """What the queue hands out: one host's :class:`~.gpus.GpuAllocator`, or a swarm's
    :class:`~.swarmqueue.SwarmSeats`."""

    @property
    def queue_timeout(self) -> float: ...

    @property
    def queue_hold_after(self) -> float: ...

    def latest_scan(self) -> GpuScan: ...

    def known_scan(self) -> GpuScan: ...

    def allocate(self, user: str, server_name: str, count: int, model_glob: str | None = None,
                 min_free_memory: int | None = None, *, cuda: str | None = None, profile: str | None = None,
                 rescan: bool = True, avoid: Callable[[Gpu], bool] | None = None) -> Allocation: ...

    def release(self, user: str, server_name: str) -> Allocation | None: ...

    def on_release(self, listener: Callable[[], None]) -> None: ...


@dataclass
class _Waiter:
    user: str
    server_name: str
    count: int
    model_glob: str | None
    cuda: str | None
    profile: str | None
    min_free_memory: int | None
    ticket: int
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    moved: asyncio.Event = field(default_factory=asyncio.Event)  # someone ahead left the queue
    joined: float = 0.0  # the queue's clock when it came

    @property
    def kind(self) -> Kind:
        return (self.count, self.model_glob or "", self.cuda or "", self.min_free_memory or 0)

    @property
    def request(self) -> GpuRequest:
        return GpuRequest(self.count, self.model_glob, self.min_free_memory, self.cuda, self.profile)


@dataclass(frozen=True)
class HeldFor:
    """``avoid`` of a younger spawn: the GPUs an older spawn past queue_hold_after could use. A
    swarm's seats read ``request`` too (its GPUs must be on one node: a smaller node is not held)."""

    request: GpuRequest

    def __call__(self, gpu: Gpu) -> bool:
        return self.request.model_matches(gpu)


class QueueCancelled(GpuUnavailable):
    """The spawn was stopped while it waited for a GPU."""


class GpuQueue:
    """Waiting spawns of one hub, in front of its :class:`GpuAllocator`."""

    def __init__(self, allocator: GpuSource, clock: Callable[[], float] = time.monotonic):
        self.allocator = allocator
        self._clock = clock
        self._waiting: dict[Kind, list[_Waiter]] = {}
        self._tickets = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        allocator.on_release(self._released)
        metrics.track_queue(self)

    async def allocate(self, user: str, server_name: str, count: int, model_glob: str | None = None, *,
                       cuda: str | None = None, profile: str | None = None,
                       min_free_memory: int | None = None,
                       waiting: Callable[[int, float], Awaitable[None]] | None = None,
                       time_left: tuple[float, str] | None = None) -> Allocation:
        """The server's GPUs, now or after waiting its turn; GpuUnavailable when refused.

        ``waiting(ahead, waited_seconds)`` is awaited whenever the number of spawns ahead of
        this one changes (and first with the position it joins at). ``time_left``: the
        seconds the spawn itself has left and the setting that limits them
        (``(120.0, "Spawner.start_timeout")``): it waits no longer, even within queue_timeout.
        """
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.allocator.latest_scan)  # NVML, when the scan is stale: off the loop
        waiter = _Waiter(user, server_name, count, model_glob, cuda, profile, min_free_memory, next(self._tickets))
        waiter.joined = self._clock()
        # Nobody of this kind waits: no one to overtake, but GPUs held for an older spawn are not its.
        if not self._waiting.get(waiter.kind):
            try:
                return self._try(waiter, self._holder())
            except (GpuInfeasible, GpuQuotaExceeded):
                raise
            except GpuUnavailable:
                if not self.allocator.queue_timeout:
                    raise
        self._waiting.setdefault(waiter.kind, []).append(waiter)
        joined, outcome = self._clock(), "error"
        self._dispatch()  # GPUs may be free already: the kind's head goes first
        try:
            allocation = await self._wait(waiter, waiting, time_left)
            outcome = "granted"
            return allocation
        except asyncio.CancelledError:
            outcome = "cancelled"
            self._give_back(waiter)
            raise
        except GpuUnavailable as refusal:
            outcome = _outcome(refusal)
            raise
        finally:
            self._leave(waiter)
            metrics.record_queue_wait(outcome, self._clock() - joined)

    def ahead_of(self, user: str, server_name: str) -> int | None:
        """How many spawns wait ahead of this server's, or None if it is not waiting."""
        for waiters in self._waiting.values():
            for waiter in waiters:
                if (waiter.user, waiter.server_name) == (user, server_name):
                    return self._position(waiter)
        return None

    def cancel(self, user: str, server_name: str) -> bool:
        """Take the server's spawn out of the queue (its start then fails as cancelled)."""
        for waiters in self._waiting.values():
            for waiter in waiters:
                if (waiter.user, waiter.server_name) == (user, server_name) and not waiter.granted.done():
                    message = "The start was cancelled while it waited for a GPU"
                    waiter.granted.set_exception(QueueCancelled(message, message))
                    return True
        return False

    def waiting(self) -> list[dict[str, Any]]:
        """The spawns waiting now, JSON-ready, in the order they came: user, server, GPUs asked for,
        model, profile, position (spawns ahead of it: :meth:`_position`), seconds waited."""
        now, competing = self._clock(), dict[tuple[Kind, Kind], bool]()
        placed = [(waiter, self._position(waiter, competing)) for waiter in
                  sorted((waiter for waiters in self._waiting.values() for waiter in waiters),
                         key=lambda waiter: waiter.ticket)]
        return [{"user": waiter.user, "server": waiter.server_name, "gpus": waiter.count,
                 "model": waiter.model_glob or "", "profile": waiter.profile or "", "position": position,
                 "waited_seconds": round(now - waiter.joined)} for waiter, position in placed]

    @property
    def length(self) -> int:
        return sum(len(waiters) for waiters in self._waiting.values())

    # -- inside --------------------------------------------------------------------------

    async def _wait(self, waiter: _Waiter, waiting: Callable[[int, float], Awaitable[None]] | None,
                    time_left: tuple[float, str] | None) -> Allocation:
        started = self._clock()
        limit, setting = self.allocator.queue_timeout, "GpuAllocator.queue_timeout"
        if time_left is not None and time_left[0] < limit:
            limit, setting = max(time_left[0], 0.0), time_left[1]
        deadline = started + limit
        reported = None
        while True:
            ahead = self._position(waiter)
            if waiting is not None and ahead != reported:
                reported = ahead
                await waiting(ahead, self._clock() - started)
            remaining = deadline - self._clock()
            if remaining <= 0:
                self._leave(waiter)
                return self._last_try(waiter, self._clock() - started, setting)
            waiter.moved.clear()
            moved = asyncio.ensure_future(waiter.moved.wait())
            try:
                await asyncio.wait({waiter.granted, moved}, timeout=min(RETRY_INTERVAL_S, remaining),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
            if waiter.granted.done():
                return waiter.granted.result()
            if not waiter.moved.is_set():
                await asyncio.to_thread(self.allocator.latest_scan)  # NVML, when the scan is stale
                self._dispatch()

    def _last_try(self, waiter: _Waiter, waited: float, setting: str) -> Allocation:
        try:
            return self._try(waiter, self._holder())
        except GpuUnavailable as refusal:  # how busy the GPUs are, and how long this spawn waited
            after = f" after waiting {_duration(waited)} in the queue ({setting})"
            raise GpuUnavailable(refusal.detail + after, refusal.user_message + after) from None

    def _try(self, waiter: _Waiter, holder: _Waiter | None = None) -> Allocation:
        """Allocate ``waiter``'s GPUs, none that ``holder`` (an older spawn past queue_hold_after)
        could use: a younger spawn may still take a GPU the holder never would (another model)."""
        avoid = None
        if holder is not None and holder is not waiter and waiter.ticket > holder.ticket:
            avoid = HeldFor(holder.request)
        # On the event loop: by the last scan; _wait refreshes it in a thread.
        return self.allocator.allocate(waiter.user, waiter.server_name, waiter.count, waiter.model_glob,
                                       waiter.min_free_memory, cuda=waiter.cuda, profile=waiter.profile,
                                       rescan=False, avoid=avoid)

    def _position(self, waiter: _Waiter, competing: dict[tuple[Kind, Kind], bool] | None = None) -> int:
        """Spawns ahead of this one: the older ones, of any kind, that could take a GPU it could
        use (freed GPUs go to the oldest kinds first), so a 2-GPU start behind an older 1-GPU
        one of the same model is not told it is next. ``competing``: a cache for one listing."""
        competing = {} if competing is None else competing
        scan = self.allocator.known_scan()
        ahead = 0
        for older in (other for waiters in self._waiting.values() for other in waiters):
            if older.ticket >= waiter.ticket or older.granted.done():
                continue
            pair = (older.kind, waiter.kind)
            if pair not in competing:
                competing[pair] = older.kind == waiter.kind or any(
                    older.request.model_matches(gpu) and waiter.request.model_matches(gpu) for gpu in scan.countable)
            ahead += competing[pair]
        return ahead

    def _released(self) -> None:
        """GPUs were freed (maybe on another thread): let the heads of the queue try now."""
        if self._loop is not None and not self._loop.is_closed() and self.length:
            self._loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        """Give freed GPUs to the oldest waiting spawn of each kind that fits, oldest first;
        none to a younger spawn that would take GPUs held for an older one (``_holder``)."""
        holder = None
        for first in sorted(self._heads(), key=lambda waiter: waiter.ticket):
            waiters = self._waiting[first.kind]
            while waiters:
                head = waiters[0]
                if head.granted.done():  # cancelled, or granted and not yet gone
                    waiters.pop(0)
                    continue
                try:
                    head.granted.set_result(self._try(head, holder))
                except (GpuInfeasible, GpuQuotaExceeded) as refusal:
                    head.granted.set_exception(refusal)
                except GpuUnavailable:
                    if holder is None and self._clock() - head.joined >= self.allocator.queue_hold_after:
                        holder = head
                    break
                waiters.pop(0)
                # Of its kind only: waking every kind's spawns would skip their periodic retries
                # (which hand over held GPUs once queue_hold_after passes); others see their new
                # position at their next retry, within RETRY_INTERVAL_S.
                for behind in waiters:
                    behind.moved.set()

    def _heads(self) -> list[_Waiter]:
        return [waiters[0] for waiters in self._waiting.values() if waiters]

    def _holder(self) -> _Waiter | None:
        """The oldest spawn that has waited past queue_hold_after: freed GPUs it could use are its."""
        overdue = [waiter for waiter in self._heads() if not waiter.granted.done()
                   and self._clock() - waiter.joined >= self.allocator.queue_hold_after]
        return min(overdue, key=lambda waiter: waiter.ticket, default=None)

    def _leave(self, waiter: _Waiter) -> None:
        waiters = self._waiting.get(waiter.kind)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            for behind in waiters:
                behind.moved.set()
        if waiters == []:
            del self._waiting[waiter.kind]

    def _give_back(self, waiter: _Waiter) -> None:
        """A cancelled spawn that was granted GPUs in the same instant frees them again."""
        if waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
            self.allocator.release(waiter.user, waiter.server_name)


def _outcome(refusal: GpuUnavailable) -> str:
    """How a refused spawn left the queue, for the wait-time metric."""
    if isinstance(refusal, QueueCancelled):
        return "cancelled"
    if isinstance(refusal, (GpuInfeasible, GpuQuotaExceeded)):
        return "refused"
    return "timeout"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
