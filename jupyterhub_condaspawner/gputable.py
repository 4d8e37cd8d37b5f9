"""Which server holds which GPUs: the allocations, the table of them the allocator keeps, and
the container labels that record them, from which the table is rebuilt after a hub restart."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .gpuinventory import GpuScan

LABEL_USER = "io.condaspawner.user"
LABEL_SERVER = "io.condaspawner.server"
LABEL_GPUS = "io.condaspawner.gpus"  # comma-separated GPU UUIDs
LABEL_GPUS_SINCE = "io.condaspawner.gpus.since"  # ISO 8601 UTC time of the allocation

# Docker states in which a container may be using its GPUs.
_LIVE_CONTAINER_STATES = frozenset({"running", "paused", "restarting"})


@dataclass(frozen=True)
class Allocation:
    """GPUs held by one server. ``active`` is False for a hold rebuilt from a stopped
    container: its GPUs go back to the server if it restarts, or to anyone who needs them."""

    user: str
    server_name: str
    uuids: tuple[str, ...]
    since: float = 0.0  # epoch seconds
    active: bool = True

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.server_name)

    def labels(self) -> dict[str, str]:
        """Container labels recording this allocation (see :meth:`.gpus.GpuAllocator.rebuild`)."""
        labels = {LABEL_USER: self.user, LABEL_SERVER: self.server_name}
        if self.uuids:
            labels[LABEL_GPUS] = ",".join(self.uuids)
            labels[LABEL_GPUS_SINCE] = format_since(self.since)
        return labels


@dataclass(frozen=True)
class ContainerRecord:
    """What a rebuild needs to know about one container."""

    name: str
    labels: Mapping[str, str]
    running: bool
    created: float = 0.0  # epoch seconds


@dataclass
class AllocationTable:
    """Allocations and the per-GPU counts derived from them."""

    allocations: dict[tuple[str, str], Allocation] = field(default_factory=dict)
    load: dict[str, int] = field(default_factory=dict)  # active servers per GPU
    soft: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # stopped holders per GPU
    user_gpus: dict[str, int] = field(default_factory=dict)  # active GPUs per user
    touched: set[tuple[str, str]] = field(default_factory=set)  # servers added or removed since ChangeLog.note

    def add(self, allocation: Allocation) -> None:
        self.touched.add(allocation.key)
        self.allocations[allocation.key] = allocation
        for uuid in allocation.uuids:
            if allocation.active:
                self.load[uuid] = self.load.get(uuid, 0) + 1
            else:
                self.soft.setdefault(uuid, set()).add(allocation.key)
        if allocation.active:
            self.user_gpus[allocation.user] = self.user_gpus.get(allocation.user, 0) + len(allocation.uuids)

    def remove(self, key: tuple[str, str]) -> Allocation | None:
        self.touched.add(key)  # even if it held nothing here: a listing may show it holding
        allocation = self.allocations.pop(key, None)
        if allocation is None:
            return None
        for uuid in allocation.uuids:
            if allocation.active:
                self.load[uuid] -= 1
                if not self.load[uuid]:
                    del self.load[uuid]
            else:
                self.soft[uuid].discard(key)
                if not self.soft[uuid]:
                    del self.soft[uuid]
        if allocation.active:
            self.user_gpus[allocation.user] -= len(allocation.uuids)
            if not self.user_gpus[allocation.user]:
                del self.user_gpus[allocation.user]
        return allocation

    def apply(self, changes: Mapping[tuple[str, str], Allocation | None]) -> None:
        """Set these servers' allocations (None: nothing held); a stopped server's hold on a GPU
        a running one now has goes, as when that GPU was handed out."""
        for key, allocation in changes.items():
            self.remove(key)
            if allocation is not None:
                self.add(allocation)
        for allocation in changes.values():
            for uuid in allocation.uuids if allocation is not None and allocation.active else ():
                for key in list(self.soft.get(uuid, ())):
                    self.remove(key)

    def restore(self, record: ContainerRecord, scan: GpuScan, max_servers_per_gpu: int) -> list[str]:
        """Add the allocation ``record``'s labels show (a GPU table rebuild); the problems found."""
        labels = record.labels
        user, server_name = labels.get(LABEL_USER), labels.get(LABEL_SERVER, "")
        uuids = parse_uuids(labels.get(LABEL_GPUS, ""))
        if not uuids:
            return []
        if not user:
            return [f"container {record.name} has {LABEL_GPUS} but no {LABEL_USER} label; ignored"]
        key = (user, server_name)
        if key in self.allocations:
            duplicate = f"container {record.name}: {user}/{server_name!r} already holds GPUs from another container"
            if not record.running:
                return [f"{duplicate}; ignored"]
            # Running (two hubs on one daemon, a renamed leftover): its GPUs are in use, so
            # they stay held, with the server's, until that server stops.
            held = self.remove(key)
            assert held is not None
            self.add(dataclasses.replace(held, uuids=tuple(dict.fromkeys(held.uuids + uuids)), active=True))
            return [f"{duplicate}; its GPUs stay held until that server stops"]
        if not record.running and any(uuid in self.load for uuid in uuids):
            return []  # its GPUs went to a running server after it stopped (running ones are restored first)
        since = parse_since(labels.get(LABEL_GPUS_SINCE)) or record.created
        allocation = Allocation(user, server_name, uuids, since, active=record.running)
        self.add(allocation)
        return self._restore_problems(record, allocation, scan, max_servers_per_gpu)

    def _restore_problems(self, record: ContainerRecord, allocation: Allocation, scan: GpuScan,
                          max_servers_per_gpu: int) -> list[str]:
        problems = [f"container {record.name} ({allocation.user}/{allocation.server_name!r}) holds {uuid}, "
                    f"which this host does not have now ({scan.summary()})"
                    for uuid in allocation.uuids if uuid not in scan.by_uuid]
        if allocation.active:
            problems += [f"{uuid} is used by {self.load[uuid]} running servers (max_servers_per_gpu="
                         f"{max_servers_per_gpu}); container {record.name} is one of them"
                         for uuid in allocation.uuids if self.load[uuid] > max_servers_per_gpu]
        return problems


class ChangeLog:
    """The allocations granted and released while container listings are under way.

    A listing may be older than a grant made while it ran, or show running a server that
    has released its GPUs since: a rebuild from it applies what changed after it began.
    Kept only while a listing is open; used under the allocator's lock.
    """

    def __init__(self) -> None:
        self._count = 0  # changes so far
        self._open: list[int] = []  # the count when each open listing began
        self._latest: dict[tuple[str, str], tuple[int, Allocation | None]] = {}

    def begin(self) -> int:
        """A listing begins: the mark to ask :meth:`since` with."""
        self._open.append(self._count)
        return self._count

    def end(self, mark: int) -> None:
        self._open.remove(mark)
        if not self._open:
            self._latest.clear()

    def note(self, table: AllocationTable) -> None:
        """Record what the servers ``table`` touched hold now."""
        if not table.touched:
            return
        self._count += 1
        if self._open:
            for key in table.touched:
                self._latest[key] = (self._count, table.allocations.get(key))
        table.touched.clear()

    def since(self, mark: int) -> dict[tuple[str, str], Allocation | None]:
        """Each server changed after ``mark``, and what it holds now."""
        return {key: allocation for key, (count, allocation) in self._latest.items() if count > mark}


# -- labels and containers --------------------------------------------------------------


def parse_uuids(text: str) -> tuple[str, ...]:
    """``"GPU-a,GPU-b"`` -> ("GPU-a", "GPU-b"); blanks dropped, order and duplicates kept once."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def format_since(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_since(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


def container_records(docker_client: Any, label_filters: Iterable[str] = ()) -> list[ContainerRecord]:
    """Every container (running or not) with a GPU label, from a DockerClient or APIClient."""
    api = getattr(docker_client, "api", docker_client)
    summaries = api.containers(all=True, filters={"label": [LABEL_GPUS, *label_filters]})
    return [
        ContainerRecord(
            name=(summary.get("Names") or [summary["Id"][:12]])[0].lstrip("/"),
            labels=summary.get("Labels") or {},
            running=summary.get("State") in _LIVE_CONTAINER_STATES,
            created=float(summary.get("Created") or 0),
        )
        for summary in summaries
    ]
