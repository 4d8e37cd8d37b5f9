"""GPUs: what the host has, which server holds which, and how a container gets its own.

- :class:`GpuInventory` (:mod:`.gpuinventory`) lists the host's GPUs through NVML (``pynvml``)
  plus any the admin declares in ``c.GpuInventory.static_gpus``. NVML failures (no library, no
  driver, a GPU fallen off the bus) become reasons and GPU states, never exceptions.
- :class:`GpuAllocator` hands GPUs to servers keyed by (user, server name), exclusive
  by default, and refuses with :class:`GpuUnavailable` (one clear line) when nothing
  fits; :mod:`.gpuchoice` picks the GPUs and words the refusals. Container labels
  (``LABEL_*``, :mod:`.gputable`, with the table of allocations) record every allocation,
  so after a hub restart :meth:`GpuAllocator.rebuild_from_containers` rebuilds the table
  from the containers that exist.
- :meth:`GpuAllocator.container_options` turns an allocation into the Docker pieces:
  a ``DeviceRequest`` for the GPU UUIDs (or ``NVIDIA_VISIBLE_DEVICES`` alone on hosts
  whose default runtime is nvidia), the environment and the labels.
- :mod:`.gpustatus`: the GPUs' states for the metrics, and the `condaspawner gpus` report.

The spawner calls :meth:`~GpuAllocator.allocate` in ``start()``, merges
:meth:`~GpuAllocator.container_options` into the container it creates, and calls
:meth:`~GpuAllocator.release` in ``stop()`` and when ``poll()`` finds the server dead.
The names of those modules that other code uses are importable from here too.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import docker.types
from jupyterhub.traitlets import ByteSpecification
from traitlets import CaselessStrEnum, Integer
from traitlets.config import LoggingConfigurable

from . import gpustatus, metrics
from .gpuchoice import (
    POLICIES,
    CudaIncompatible,
    GpuChooser,
    GpuInfeasible,
    GpuOverQuota,
    GpuQuotaExceeded,
    GpuRequest,
    GpuUnavailable,
    GpuUnreadable,
    check_cuda,
    check_feasible,
    describe_server,
    unavailable_error,
)
from .gpuinventory import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_RESET_REQUIRED,
    NVML_ERROR_UNKNOWN,
    NVML_FUNCTIONS,
    UNREADABLE,
    Gpu,
    GpuInventory,
    GpuScan,
    Nvml,
    cuda_supported,
    cuda_version_text,
    describe_nvml_error,
    driver_supports,
    plural,
    static_gpu,
)
from .gpustatus import format_status, status_report
from .gputable import (
    LABEL_GPUS,
    LABEL_GPUS_SINCE,
    LABEL_SERVER,
    LABEL_USER,
    Allocation,
    AllocationTable,
    ChangeLog,
    ContainerRecord,
    container_records,
    format_since,
    parse_since,
    parse_uuids,
)
from .traittypes import FiniteFloat

# What other modules have always imported from here; each lives in the module its concept has.
__all__ = [
    "CudaIncompatible", "GpuInfeasible", "GpuOverQuota", "GpuQuotaExceeded", "GpuRequest", "GpuUnavailable", "GpuUnreadable",
    "POLICIES", "check_cuda", "unavailable_error",
    "NVML_ERROR_DRIVER_NOT_LOADED", "NVML_ERROR_GPU_IS_LOST", "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
    "NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_NOT_SUPPORTED",
    "NVML_ERROR_RESET_REQUIRED", "NVML_ERROR_UNKNOWN", "NVML_FUNCTIONS", "UNREADABLE", "Gpu", "GpuInventory",
    "GpuScan", "Nvml", "cuda_supported", "cuda_version_text", "describe_nvml_error", "driver_supports",
    "static_gpu",
    "format_status", "status_report",
    "LABEL_GPUS", "LABEL_GPUS_SINCE", "LABEL_SERVER", "LABEL_USER", "Allocation", "ContainerRecord",
    "container_records", "format_since", "parse_since", "parse_uuids",
    "ENV_GPUS", "ENV_NVIDIA_VISIBLE_DEVICES", "NO_GPUS", "DEVICE_MODES", "GpuContainerOptions", "GpuAllocator",
]

ENV_GPUS = "CONDASPAWNER_GPUS"  # comma-separated GPU UUIDs, for the user's code
ENV_NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
# nvidia-container-runtime reads "void" as "no NVIDIA devices at all"; it overrides an
# image's own NVIDIA_VISIBLE_DEVICES=all (CUDA base images set it).
NO_GPUS = "void"

DEVICE_MODES = ("device-request", "nvidia-runtime")


@dataclass(frozen=True)
class GpuContainerOptions:
    """How one container gets its GPUs: pieces for docker-py (and DockerSpawner)."""

    device_requests: tuple[docker.types.DeviceRequest, ...]
    environment: Mapping[str, str]
    labels: Mapping[str, str]

    def host_config(self) -> dict[str, Any]:
        """Keyword arguments for ``APIClient.create_host_config`` (DockerSpawner's ``extra_host_config``)."""
        return {"device_requests": list(self.device_requests)} if self.device_requests else {}

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``DockerClient.containers.create``/``run``."""
        return {"environment": dict(self.environment), "labels": dict(self.labels), **self.host_config()}


class GpuAllocator(LoggingConfigurable):
    """Hands GPUs to servers, keyed by (user, server name); one per hub process."""

    policy = CaselessStrEnum(
        POLICIES,
        default_value="pack",
        help="""Which free GPUs a server gets. 'pack': the lowest-numbered free GPUs (and,
        with time-sharing, GPUs that already have servers first), keeping whole GPUs and
        neighbouring groups free for multi-GPU requests. 'spread': the least-loaded,
        least-recently-used GPUs, spreading heat and wear.

            c.GpuAllocator.policy = "spread"
        """,
    ).tag(config=True)

    max_servers_per_gpu = Integer(
        1,
        min=1,
        help="""How many servers may share one GPU. 1 (the default) gives each server its
        GPUs exclusively; more time-shares them (memory is not partitioned: pair it with
        min_free_memory).

            c.GpuAllocator.max_servers_per_gpu = 2
        """,
    ).tag(config=True)

    per_user_gpu_quota = Integer(
        0,
        min=0,
        help="""The most GPUs one user may hold across all their running servers; 0 means
        no limit.

            c.GpuAllocator.per_user_gpu_quota = 2
        """,
    ).tag(config=True)

    min_free_memory = ByteSpecification(
        None,
        allow_none=True,
        help="""Only hand out GPUs with at least this much free memory (as last seen by NVML),
        for every GPU profile (profiles have no setting of their own); a GPU whose total
        memory is smaller is never offered. None: no minimum.

            c.GpuAllocator.min_free_memory = "20G"
        """,
    ).tag(config=True)

    device_mode = CaselessStrEnum(
        DEVICE_MODES,
        default_value="device-request",
        help="""How a container gets its GPUs. 'device-request' (the default): a Docker
        DeviceRequest naming the GPU UUIDs, like `docker run --gpus device=UUID`.
        'nvidia-runtime': only NVIDIA_VISIBLE_DEVICES=UUIDs, for hosts whose Docker default
        runtime is nvidia and which lack DeviceRequest support.

            c.GpuAllocator.device_mode = "nvidia-runtime"
        """,
    ).tag(config=True)

    queue_timeout = FiniteFloat(
        600.0,
        min=0.0,
        help="""Seconds a spawn waits in the GPU queue when every fitting GPU is held, before it
        is refused with "No GPU is free". Spawns wait first-come first-served per GPU
        requirement (count, model, CUDA, free memory). 0 refuses at once.

            c.GpuAllocator.queue_timeout = 1800
        """,
    ).tag(config=True)

    queue_hold_after = FiniteFloat(
        120.0,
        min=0.0,
        help="""Seconds a waiting spawn may be overtaken by smaller requests of other kinds (a
        1-GPU start taking a GPU that an older 2-GPU start needs one more of). After that,
        freed GPUs it could use are held for it: younger spawns that would take them wait
        behind it, so a big request never starves. 0: never overtaken; a day (86400): hardly
        ever held, so waits are shorter for small requests and big ones may time out.

            c.GpuAllocator.queue_hold_after = 300
        """,
    ).tag(config=True)

    rescan_interval = FiniteFloat(
        10.0,
        min=0.0,
        help="""Seconds an inventory scan stays fresh; an allocation after that rescans NVML
        first (free memory, lost GPUs). 0 rescans on every allocation.

            c.GpuAllocator.rescan_interval = 30
        """,
    ).tag(config=True)

    idle_utilization = FiniteFloat(
        5.0,
        min=0.0,
        max=100.0,
        help="""A held GPU whose utilization (percent, as NVML or, on a conda-swarm hub, the
        node's dcgm-exporter last read it) is at or below this is idle: the
        condaspawner_gpus{state="held_idle"} metric, the GPU-seconds held idle and GPU-aware
        idle culling count it. GPUs without a utilization reading (static GPUs) are never idle.

            c.GpuAllocator.idle_utilization = 10
        """,
    ).tag(config=True)

    gpu_sample_interval = FiniteFloat(
        30.0,
        min=0.0,
        help="""Seconds between the hub's samples of its GPUs (an NVML scan: utilization and
        memory in use; on a conda-swarm hub, each GPU node's dcgm-exporter), which advance
        condaspawner_gpu_idle_seconds_total, refresh the GPU metrics and drive GPU-aware idle
        culling. 0 turns sampling off, and with it
        the culling of idle GPU servers (gpu_idle_timeout).

            c.GpuAllocator.gpu_sample_interval = 10
        """,
    ).tag(config=True)

    def __init__(self, inventory: GpuInventory | None = None, clock: Callable[[], float] = time.time,
                 **kwargs: Any):
        """``inventory``: where GPUs come from (default: a :class:`GpuInventory` sharing this config);
        ``clock``: epoch seconds, for the allocations' ``since``."""
        super().__init__(**kwargs)
        self.inventory = inventory if inventory is not None else GpuInventory(parent=self)
        self._clock = clock
        self._lock = threading.RLock()
        self._table = AllocationTable()
        self._changes = ChangeLog()
        self._scan: GpuScan | None = None
        self._ever_listed: set[str] = set()  # UUIDs a scan of this process listed: this host's GPUs
        self._scanned_at = 0.0
        self._chooser = GpuChooser()
        self._release_listeners: list[Callable[[], None]] = []
        # Whether the table was rebuilt from the servers' containers since this process began
        # (rebuild_from_containers): until then, running servers may hold GPUs it calls free.
        self.restored = False
        self._sampled_at: float | None = None  # self._clock() of the last sample()

    # -- inventory ----------------------------------------------------------------------

    def refresh(self) -> GpuScan:
        """Scan the inventory now. NVML is read without the allocator's lock: a slow driver
        never holds up allocations (on the hub's event loop) that use the last scan."""
        scan = self.inventory.scan()
        with self._lock:
            if scan.unreadable and self._scan is not None:
                scan = scan.keeping_unreadable(self._scan)
            elif self._scan is not None:
                scan = scan.naming_lost(self._scan)
            self._scan = scan
            self._ever_listed.update(scan.by_uuid)
            self._scanned_at = time.monotonic()
            self._record_states()
            return self._scan

    def latest_scan(self) -> GpuScan:
        """The latest scan, refreshed when older than ``rescan_interval`` (blocks on NVML then:
        off the event loop, see :meth:`known_scan`)."""
        with self._lock:
            scan, stale = self._scan, time.monotonic() - self._scanned_at >= self.rescan_interval
        if scan is None or stale:
            return self.refresh()
        return scan

    def known_scan(self) -> GpuScan:
        """The latest scan however old (the first one is made now): what the event loop uses,
        after :meth:`ensure_scanned` (or :meth:`latest_scan` in a thread, where freshness matters)."""
        with self._lock:
            scan = self._scan
        return scan if scan is not None else self.refresh()

    async def ensure_scanned(self) -> GpuScan:
        """:meth:`known_scan` for the event loop: the first scan, when none exists yet, is read in
        a thread, as NVML may block. Returns without suspending once a scan exists."""
        with self._lock:
            scan = self._scan
        return scan if scan is not None else await asyncio.to_thread(self.refresh)

    # -- allocate / release -------------------------------------------------------------

    def allocate(self, user: str, server_name: str, count: int, model_glob: str | None = None,
                 min_free_memory: int | None = None, *, cuda: str | None = None,
                 profile: str | None = None, rescan: bool = True,
                 avoid: Callable[[Gpu], bool] | None = None) -> Allocation:
        """Give (user, server_name) ``count`` GPUs, or raise :class:`GpuUnavailable`.

        ``model_glob`` matches GPU names ("*A100*"); ``min_free_memory`` (bytes) overrides
        the trait; ``cuda`` is the CUDA version the environment was solved for (a driver
        supporting less is refused with :class:`CudaIncompatible`); ``profile`` only names
        the request in messages. The same server asking again gets its GPUs back if they
        still fit. ``count`` 0 releases what the server held and returns an empty allocation.
        ``rescan`` False: judge by :meth:`known_scan`, never NVML (the event loop's calls).
        ``avoid``: GPUs not to hand out (those the queue holds for an older request).
        """
        if count < 0:
            raise ValueError(f"cannot allocate {count} GPUs")
        request = self._request(count, model_glob, min_free_memory, cuda, profile)
        with self._lock:
            try:
                if count == 0:
                    self._table.remove((user, server_name))
                    return Allocation(user, server_name, (), self._clock())
                return self._allocate(user, server_name, request, rescan, avoid)
            finally:
                self._changes.note(self._table)
                self._record_states()

    def release(self, user: str, server_name: str) -> Allocation | None:
        """Free the server's GPUs; the allocation it held, or None if it held none."""
        with self._lock:
            released = self._table.remove((user, server_name))
            self._changes.note(self._table)
            self._record_states()
        if released is not None and released.uuids:
            for listener in list(self._release_listeners):
                listener()
        return released

    def on_release(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from any thread) whenever a server's GPUs are freed."""
        self._release_listeners.append(listener)

    def allocation(self, user: str, server_name: str) -> Allocation | None:
        """What (user, server_name) holds now, if anything."""
        return self._table.allocations.get((user, server_name))

    def allocations(self) -> list[Allocation]:
        """Every allocation, active and rebuilt-from-stopped."""
        with self._lock:
            return list(self._table.allocations.values())

    def holders(self) -> dict[str, list[Allocation]]:
        """GPU UUID -> the allocations that include it."""
        holders: dict[str, list[Allocation]] = {}
        for allocation in self.allocations():
            for uuid in allocation.uuids:
                holders.setdefault(uuid, []).append(allocation)
        return holders

    # -- states and samples (metrics; the idle culler's input) --------------------------

    def gpu_states(self, scan: GpuScan | None = None) -> dict[str, str]:
        """GPU UUID (or "#index" when NVML could not read it) -> "free", "held_busy",
        "held_idle" or "unusable", from the table and ``scan`` (default: the latest scan,
        not refreshed). Held means by a running server; idle means a utilization reading at
        or below ``idle_utilization``."""
        with self._lock:
            scan = scan if scan is not None else self._scan
            if scan is None:
                return {}
            # One trait read for all the GPUs: a read per GPU costs.
            return gpustatus.gpu_states(scan, self._table.load, self.idle_utilization)

    def sample(self) -> GpuScan:
        """Scan the GPUs now (NVML: utilization, memory in use) and count the GPU-seconds held
        idle since the last sample: each GPU held idle now counts the time since the previous
        sample, or since its allocation if later. The hub calls this every
        ``gpu_sample_interval`` seconds; it blocks on NVML, so call it off the event loop."""
        scan = self.refresh()
        with self._lock:
            now = self._clock()
            previous, self._sampled_at = self._sampled_at, now
            if previous is None:
                return scan
            idle_seconds = 0.0
            for uuid, state in self.gpu_states(scan).items():
                if state == "held_idle":
                    since = min((a.since for a in self._table.allocations.values() if a.active and uuid in a.uuids),
                                default=previous)
                    idle_seconds += max(0.0, now - max(previous, since))
        metrics.record_gpu_idle(idle_seconds)
        return scan

    def _record_states(self) -> None:
        metrics.show_gpu_states(self._shown_states)  # the allocator last used is the one scraped

    def _shown_states(self) -> Iterable[str] | None:
        with self._lock:
            scan = self._scan
            if scan is None:
                return None  # not scanned yet: the metric shows nothing rather than "no GPU free"
            states = list(self.gpu_states(scan).values())
            # A GPU a running server holds and NVML no longer lists (off the bus, a driver
            # reloaded without it) is lost, not gone from the count. One NVML still lists without
            # a UUID (lost) may be it: counted once. Only GPUs this host listed once: a container
            # of another hub on the same daemon (another host's GPU, a test's) is not one of ours.
            missing = sum(1 for uuid, servers in self._table.load.items()
                          if servers and uuid not in scan.by_uuid and uuid in self._ever_listed)
            nameless = sum(1 for gpu in scan.gpus if not gpu.uuid)
        return states + ["unusable"] * max(0, missing - nameless)

    def check_feasible(self, user: str, server_name: str, count: int, model_glob: str | None = None,
                       min_free_memory: int | None = None, *, cuda: str | None = None,
                       profile: str | None = None) -> None:
        """Raise :class:`GpuInfeasible` if no amount of waiting could give this request its GPUs
        here (too few GPUs of that model, a driver too old for ``cuda``, over the quota).
        Holds nothing: a spawn checks this at submit and allocates only once its image is ready.
        """
        if count <= 0:
            return
        request = self._request(count, model_glob, min_free_memory, cuda, profile)
        what = describe_server(user, server_name, request)
        if self.per_user_gpu_quota and count > self.per_user_gpu_quota:
            message = (f"{what} needs {plural(count, 'GPU')}, more than the per-user quota of "
                       f"{self.per_user_gpu_quota}: pick a smaller profile")
            raise GpuOverQuota(message)
        # The event loop (the form, the REST options): the spawner awaited ensure_scanned() first.
        check_feasible(self.known_scan(), request, what, self.max_servers_per_gpu)

    def _request(self, count: int, model_glob: str | None, min_free_memory: int | None, cuda: str | None,
                 profile: str | None) -> GpuRequest:
        return GpuRequest(count, model_glob or None,
                          min_free_memory if min_free_memory is not None else self.min_free_memory, cuda, profile)

    def _allocate(self, user: str, server_name: str, request: GpuRequest, rescan: bool = True,
                  avoid: Callable[[Gpu], bool] | None = None) -> Allocation:
        scan = self.latest_scan() if rescan else self.known_scan()
        # The server's own GPUs count as free for its new request (a restart gets them back).
        previous = self._table.remove((user, server_name))
        try:
            self._check_quota(user, server_name, request)
            chosen = self._chooser.choose(scan, request, self._table, previous,
                                          describe_server(user, server_name, request), policy=self.policy,
                                          max_servers=self.max_servers_per_gpu, avoid=avoid)
        except GpuUnavailable:
            if previous is not None:
                self._table.add(previous)
            raise
        for uuid in chosen:
            self._evict_soft_holders(uuid)
        since = previous.since if previous is not None and set(previous.uuids) == set(chosen) else self._clock()
        allocation = Allocation(user, server_name, chosen, since)
        self._table.add(allocation)
        return allocation

    def _check_quota(self, user: str, server_name: str, request: GpuRequest) -> None:
        quota = self.per_user_gpu_quota
        held = self._table.user_gpus.get(user, 0)
        if not quota or held + request.count <= quota:
            return
        need = f"{describe_server(user, server_name, request)} needs {plural(request.count, 'GPU')}"
        if request.count > quota:  # as check_feasible says it: no stop of another server helps (400, not 429)
            raise GpuOverQuota(f"{need}, more than the per-user quota of {quota}: pick a smaller profile")
        raise GpuQuotaExceeded(f"{need}, but {user} already holds {held} of their quota of {quota}: "
                               f"stop another server first")

    def _evict_soft_holders(self, uuid: str) -> None:
        for key in list(self._table.soft.get(uuid, ())):
            evicted = self._table.remove(key)
            if evicted is None:
                continue
            self.log.info("GPU %s goes to a new server; the stopped server %s/%r no longer holds %s",
                          uuid, key[0], key[1], ",".join(evicted.uuids))

    # -- restart --------------------------------------------------------------------------

    def rebuild(self, records: Iterable[ContainerRecord], listed_after: int | None = None) -> list[str]:
        """Replace the table with the allocations recorded on these containers.

        Running containers hold their GPUs; stopped-but-kept ones hold them softly (the
        server gets them back on restart unless someone needed them meanwhile). Returns
        the problems found (also logged): unlabelled users, a server in two containers,
        GPUs this host no longer has (kept: if one comes back it is still taken), more
        running servers on a GPU than ``max_servers_per_gpu`` allows. ``listed_after``: the
        mark of :meth:`rebuild_from_containers`'s listing; what was allocated and released
        since it began is kept.
        """
        records = sorted(records, key=lambda record: (not record.running, record.created, record.name))
        scan = self.latest_scan()  # NVML, before the lock: a slow driver holds up no allocation meanwhile
        with self._lock:
            self._table = AllocationTable()
            limit = self.max_servers_per_gpu
            problems = [problem for record in records for problem in self._table.restore(record, scan, limit)]
            if listed_after is not None:
                self._table.apply(self._changes.since(listed_after))
            self._table.touched.clear()
            self._record_states()
        for problem in problems:
            self.log.warning("GPU table rebuild: %s", problem)
        return problems

    def rebuild_from_containers(self, docker_client: Any, label_filters: Iterable[str] = ()) -> list[str]:
        """:meth:`rebuild` from every container with GPU labels on this Docker daemon
        (running or not). ``label_filters`` ("key=value") narrows the containers considered.
        Sets :attr:`restored`; a daemon that does not answer raises, and leaves it unset."""
        with self._lock:
            mark = self._changes.begin()
        try:
            problems = self.rebuild(container_records(docker_client, label_filters), listed_after=mark)
        finally:
            with self._lock:
                self._changes.end(mark)
        self.restored = True
        return problems

    # -- containers -----------------------------------------------------------------------

    def container_options(self, allocation: Allocation) -> GpuContainerOptions:
        """The device request, environment and labels that give a container these GPUs (and only these)."""
        uuids = ",".join(allocation.uuids)
        environment = {ENV_GPUS: uuids, ENV_NVIDIA_VISIBLE_DEVICES: uuids or NO_GPUS}
        requests: tuple[docker.types.DeviceRequest, ...] = ()
        if allocation.uuids and self.device_mode == "device-request":
            requests = (docker.types.DeviceRequest(driver="nvidia", device_ids=list(allocation.uuids),
                                                   capabilities=[["gpu"]]),)
        return GpuContainerOptions(requests, environment, allocation.labels())

    # -- status ---------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per GPU (and per held UUID the host lacks), with its holders."""
        return gpustatus.status_rows(self.latest_scan(), self.holders())
