"""GPU-aware idle culling: a server whose GPUs compute nothing for its timeout is stopped.

Browser activity does not count (an open notebook tab keeps no GPU): only what NVML
reads. After each of the hub's GPU samples (``GpuAllocator.gpu_sample_interval``) the
culler looks at every watched server: when each GPU it holds read at or below
``GpuAllocator.idle_utilization`` percent, it has been idle since the sample before (or
since it got its GPUs, if later); one busy reading, or a GPU without a reading, ends the
idle stretch. A GPU that failed (unusable, or gone from the host) computes nothing and is
left out, as long as the server has another to judge it by. A server idle for its timeout
is handed to its ``stop`` callback once. The spawner watches a server when it gets GPUs
(or is found again after a hub restart) with its profile's ``gpu_idle_timeout`` and stops
it through the hub.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from .gpus import Allocation, GpuAllocator

Key = tuple[str, str]  # user, server name
REASON_GPU_IDLE = "gpu_idle"


@dataclass(frozen=True)
class Cull:
    """A server to stop: idle for ``idle_seconds`` (at least its ``timeout_seconds``)."""

    user: str
    server_name: str
    profile: str  # the profile's display name, for the user's notice
    idle_seconds: float
    timeout_seconds: float

    @property
    def notice(self) -> str:
        """What the user reads on their next spawn page."""
        return (f"Your server on {self.profile} was stopped after {_minutes(self.idle_seconds)} "
                "with its GPU idle: start it again when you need it")


@dataclass
class _Watch:
    profile: str
    timeout_seconds: float
    stop: Callable[[Cull], Awaitable[None]]
    idle_since: float | None = None
    culled: bool = False


class GpuIdleCuller:
    """Which GPU servers of one hub have been idle for their timeout."""

    def __init__(self, allocator: GpuAllocator, clock: Callable[[], float] = time.time):
        """``clock``: epoch seconds, the allocator's clock (allocations carry their ``since``)."""
        self.allocator = allocator
        self._clock = clock
        self._watched: dict[Key, _Watch] = {}
        self._observed_at: float | None = None
        self._lock = threading.Lock()

    def watch(self, user: str, server_name: str, *, timeout_minutes: float, profile: str,
              stop: Callable[[Cull], Awaitable[None]]) -> None:
        """Cull this server once its GPUs stay idle ``timeout_minutes``; 0 forgets it."""
        with self._lock:
            if timeout_minutes <= 0:
                self._watched.pop((user, server_name), None)
                return
            self._watched[(user, server_name)] = _Watch(profile, timeout_minutes * 60.0, stop)

    def forget(self, user: str, server_name: str) -> None:
        """The server stopped (or gave its GPUs back): nothing to cull."""
        with self._lock:
            self._watched.pop((user, server_name), None)

    def rearm(self, user: str, server_name: str, *, from_now: bool = False) -> None:
        """A stop that failed: cull the server again at a later sample if it stays idle;
        ``from_now``: after a whole timeout from the next sample (a server not ready yet)."""
        with self._lock:
            watch = self._watched.get((user, server_name))
            if watch is not None:
                watch.culled = False
                if from_now:
                    watch.idle_since = None

    def watched(self) -> dict[Key, float]:
        """(user, server) -> its timeout in seconds."""
        with self._lock:
            return {key: watch.timeout_seconds for key, watch in self._watched.items()}

    def idle_for(self, user: str, server_name: str) -> float | None:
        """Seconds this server's GPUs have been idle as of the last sample; None when busy or unknown."""
        with self._lock:
            watch = self._watched.get((user, server_name))
            if watch is None or watch.idle_since is None or self._observed_at is None:
                return None
            return self._observed_at - watch.idle_since

    def observe(self, states: Mapping[str, str], holdings: Mapping[Key, Allocation] | None = None,
                ) -> list[tuple[Cull, Callable[[Cull], Awaitable[None]]]]:
        """Take one sample's GPU states (``GpuAllocator.gpu_states``); the servers to stop now,
        each with its stop callback. A server is returned once. ``holdings``: what each server
        holds, where not the allocator's table (on a swarm: Swarm's tasks, swarmgpus.py)."""
        now = self._clock()
        with self._lock:
            previous, self._observed_at = self._observed_at, now
            due = []
            for key, watch in self._watched.items():
                allocation = self.allocator.allocation(*key) if holdings is None else holdings.get(key)
                if allocation is None or not allocation.active or not allocation.uuids:
                    watch.idle_since = None
                    continue
                if not _all_idle(allocation.uuids, states):
                    watch.idle_since = None
                    continue
                if watch.idle_since is None:
                    watch.idle_since = max(allocation.since, previous if previous is not None else now)
                idle = now - watch.idle_since
                if idle >= watch.timeout_seconds and not watch.culled:
                    watch.culled = True
                    due.append((Cull(key[0], key[1], watch.profile, idle, watch.timeout_seconds), watch.stop))
            return due


def _all_idle(uuids: tuple[str, ...], states: Mapping[str, str]) -> bool:
    """Whether every GPU the server can still use read idle. One that failed (off the bus) must
    not keep its healthy ones held for ever; with none left that works, nothing is judged."""
    working = [states.get(uuid) for uuid in uuids if states.get(uuid) not in (None, "unusable")]
    return bool(working) and all(state == "held_idle" for state in working)


def _minutes(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"
