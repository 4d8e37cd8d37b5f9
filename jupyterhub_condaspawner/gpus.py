"""GPUs: what the host has, which server holds which, and how a container gets its own.

- :class:`GpuInventory` lists the host's GPUs through NVML (``pynvml``) plus any the
  admin declares in ``c.GpuInventory.static_gpus``. NVML failures (no library, no
  driver, a GPU fallen off the bus) become reasons and GPU states, never exceptions.
- :class:`GpuAllocator` hands GPUs to servers keyed by (user, server name), exclusive
  by default, and refuses with :class:`GpuUnavailable` (one clear line) when nothing
  fits. Container labels (``LABEL_*``) record every allocation, so after a hub restart
  :meth:`GpuAllocator.rebuild_from_containers` rebuilds the table from the containers
  that exist.
- :meth:`GpuAllocator.container_options` turns an allocation into the Docker pieces:
  a ``DeviceRequest`` for the GPU UUIDs (or ``NVIDIA_VISIBLE_DEVICES`` alone on hosts
  whose default runtime is nvidia), the environment and the labels.

The spawner calls :meth:`~GpuAllocator.allocate` in ``start()``, merges
:meth:`~GpuAllocator.container_options` into the container it creates, and calls
:meth:`~GpuAllocator.release` in ``stop()`` and when ``poll()`` finds the server dead.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, Protocol

import docker
import docker.errors
import docker.types
import requests
from jupyterhub.traitlets import ByteSpecification
from packaging.version import InvalidVersion, Version
from traitlets import CaselessStrEnum, Dict, Float, Integer, List, TraitError, validate
from traitlets.config import LoggingConfigurable

from . import metrics

LABEL_USER = "io.condaspawner.user"
LABEL_SERVER = "io.condaspawner.server"
LABEL_GPUS = "io.condaspawner.gpus"  # comma-separated GPU UUIDs
LABEL_GPUS_SINCE = "io.condaspawner.gpus.since"  # ISO 8601 UTC time of the allocation
ENV_GPUS = "CONDASPAWNER_GPUS"  # comma-separated GPU UUIDs, for the user's code
ENV_NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
# nvidia-container-runtime reads "void" as "no NVIDIA devices at all"; it overrides an
# image's own NVIDIA_VISIBLE_DEVICES=all (CUDA base images set it).
NO_GPUS = "void"

POLICIES = ("pack", "spread")
DEVICE_MODES = ("device-request", "nvidia-runtime")

# Docker states in which a container may be using its GPUs.
_LIVE_CONTAINER_STATES = frozenset({"running", "paused", "restarting"})


# -- NVML -------------------------------------------------------------------------------


class Nvml(Protocol):
    """The part of ``pynvml`` this module calls; the module itself or a test fake."""

    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...
    def nvmlSystemGetCudaDriverVersion(self) -> int: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...  # .total, .used, .free in bytes
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...  # .gpu, .memory in percent


NVML_FUNCTIONS = tuple(name for name in Nvml.__dict__ if name.startswith("nvml"))

# NVML return codes (nvml.h). They are part of the C ABI and never change.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999

_NVML_EXPLANATIONS = {
    NVML_ERROR_LIBRARY_NOT_FOUND: "libnvidia-ml.so.1 is not installed or not visible to the hub: "
    "no NVIDIA driver on this host, or the hub runs in a container without the NVIDIA runtime",
    NVML_ERROR_DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded",
    NVML_ERROR_NO_PERMISSION: "the hub process may not open /dev/nvidia*",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "the NVML library and the loaded kernel driver differ "
    "(driver upgraded without a reboot?)",
    NVML_ERROR_GPU_IS_LOST: "the GPU has fallen off the bus; it needs a reset or a reboot",
    NVML_ERROR_RESET_REQUIRED: "the GPU needs a reset",
}
# Errors after which a GPU must not be handed out. Others (say NOT_SUPPORTED for
# utilization on some boards) only leave that reading empty.
_FATAL_DEVICE_ERRORS = frozenset({NVML_ERROR_GPU_IS_LOST, NVML_ERROR_RESET_REQUIRED, NVML_ERROR_UNKNOWN})


def describe_nvml_error(error: Exception) -> str:
    """One line: NVML's own words, and what they mean for an admin."""
    code = getattr(error, "value", None)
    explanation = _NVML_EXPLANATIONS.get(code) if isinstance(code, int) else None
    return f"NVML error '{error}'" + (f": {explanation}" if explanation else "")


def cuda_version_text(code: int) -> str:
    """NVML's CUDA version number as text: 12040 -> "12.4", 11080 -> "11.8"."""
    return f"{code // 1000}.{code % 1000 // 10}"


def _load_pynvml() -> Any:
    with warnings.catch_warnings():
        # pynvml 12+ is a shim over nvidia-ml-py that warns on import; same module, same API.
        warnings.simplefilter("ignore", FutureWarning)
        import pynvml
    return pynvml


# -- inventory --------------------------------------------------------------------------


@dataclass(frozen=True)
class Gpu:
    """One GPU as last seen. ``state`` is "ok", "lost" (off the bus), "failed", or
    "unreadable" (NVML answered nothing for the whole host: the GPU as an earlier scan saw it)."""

    index: int
    uuid: str  # "" when NVML could not read it (a lost GPU)
    name: str
    memory_total: int | None = None  # bytes
    memory_used: int | None = None  # bytes
    utilization: int | None = None  # percent
    driver_version: str | None = None
    cuda_version: str | None = None  # the newest CUDA the driver supports, "12.4"
    source: str = "nvml"  # or "static"
    state: str = "ok"
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.state == "ok" and bool(self.uuid)

    @property
    def memory_free(self) -> int | None:
        if self.memory_total is None:
            return None
        return self.memory_total - (self.memory_used or 0)


@dataclass(frozen=True)
class GpuScan:
    """The GPUs one scan found, and host-level notes (why NVML gave none, say)."""

    gpus: tuple[Gpu, ...]
    notes: tuple[str, ...] = ()
    unreadable: str = ""  # NVML's host-level error when it answered nothing (its driver reloading, say)

    @cached_property
    def by_uuid(self) -> dict[str, Gpu]:
        return {gpu.uuid: gpu for gpu in self.gpus if gpu.uuid}

    @cached_property
    def usable(self) -> tuple[Gpu, ...]:
        return tuple(gpu for gpu in self.gpus if gpu.usable)

    @cached_property
    def countable(self) -> tuple[Gpu, ...]:
        """The GPUs the host has when NVML answers: the usable ones and the unreadable ones."""
        return tuple(gpu for gpu in self.gpus if gpu.usable or gpu.state == UNREADABLE)

    def keeping_unreadable(self, previous: GpuScan) -> GpuScan:
        """This scan (NVML answered nothing) with the NVML GPUs ``previous`` saw, as unreadable: a
        driver reloading for a moment is not a host without GPUs, and what servers hold stays known."""
        kept = tuple(dataclasses.replace(gpu, state=UNREADABLE, reason=self.unreadable, utilization=None, memory_used=None)
                     for gpu in previous.gpus if gpu.source == "nvml" and gpu.uuid and gpu.uuid not in self.by_uuid)
        return GpuScan(self.gpus + kept, self.notes, self.unreadable)

    def summary(self) -> str:
        """"no GPUs: <why>" or "3 GPUs (1 lost)"."""
        if not self.gpus:
            return "no GPUs: " + ("; ".join(self.notes) or "none found")
        unusable = len(self.gpus) - len(self.usable)
        text = _plural(len(self.gpus), "GPU")
        return text + (f" ({unusable} unusable)" if unusable else "")


UNREADABLE = "unreadable"  # a Gpu's state while NVML answers nothing for its host
_STATIC_GPU_KEYS = ("uuid", "name", "index", "memory", "driver_version", "cuda_version")


def static_gpu(position: int, entry: Mapping[str, Any]) -> Gpu:
    """A ``static_gpus`` entry as a :class:`Gpu`; TypeError/ValueError say what is wrong with it."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"static_gpus[{position}] must be a dict, not {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_STATIC_GPU_KEYS))
    if unknown:
        raise ValueError(f"static_gpus[{position}]: unknown keys {unknown}; allowed: {list(_STATIC_GPU_KEYS)}")
    uuid = entry.get("uuid")
    if not isinstance(uuid, str) or not uuid.strip() or "," in uuid or uuid != uuid.strip():
        raise ValueError(f"static_gpus[{position}]: 'uuid' must be the GPU's UUID, e.g. 'GPU-5d6f...' (nvidia-smi -L)")
    index = entry.get("index", position)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"static_gpus[{position}]: 'index' must be a whole number >= 0")
    return Gpu(
        index=index,
        uuid=uuid,
        name=str(entry.get("name") or f"GPU {index}"),
        memory_total=_static_memory(position, entry.get("memory")),
        driver_version=str(entry["driver_version"]) if entry.get("driver_version") else None,
        cuda_version=_static_cuda(position, entry.get("cuda_version")),
        source="static",
    )


def _static_memory(position: int, value: Any) -> int | None:
    if value is None:
        return None
    try:
        memory = ByteSpecification().validate(None, value)
    except TraitError:
        raise ValueError(f"static_gpus[{position}]: 'memory' must be a size such as '80G', not {value!r}")
    return int(memory)


def _static_cuda(position: int, value: Any) -> str | None:
    if value is None:
        return None
    try:
        Version(str(value))
    except InvalidVersion:
        raise ValueError(f"static_gpus[{position}]: 'cuda_version' must be a version such as '12.4', not {value!r}")
    return str(value)


class GpuInventory(LoggingConfigurable):
    """The host's GPUs: NVML's, plus any the admin declares."""

    static_gpus = List(
        Dict(),
        help="""GPUs to use when NVML is not visible to the hub process (the hub in a
        container without the NVIDIA runtime, say). One dict per GPU: 'uuid' (required,
        from `nvidia-smi -L`), 'name', 'index', 'memory', 'driver_version' and
        'cuda_version' (the newest CUDA the driver supports, used to refuse profiles
        built for a newer CUDA). GPUs NVML also reports are taken from NVML.

            c.GpuInventory.static_gpus = [
                {"uuid": "GPU-5d6f0c4e-...", "name": "NVIDIA A100-SXM4-80GB",
                 "memory": "80G", "cuda_version": "12.4"},
            ]
        """,
    ).tag(config=True)

    @validate("static_gpus")
    def _validate_static_gpus(self, proposal: dict) -> list:
        entries = proposal["value"]
        try:
            gpus = [static_gpu(position, entry) for position, entry in enumerate(entries)]
        except (TypeError, ValueError) as error:
            raise TraitError(str(error))
        uuids = [gpu.uuid for gpu in gpus]
        duplicates = sorted({uuid for uuid in uuids if uuids.count(uuid) > 1})
        if duplicates:
            raise TraitError(f"static_gpus: the same uuid is declared twice: {', '.join(duplicates)}")
        return entries

    def __init__(self, nvml: Nvml | None = None, **kwargs: Any):
        """``nvml``: the pynvml module or a stand-in; default: import pynvml on first scan."""
        super().__init__(**kwargs)
        self._nvml = nvml
        self._nvml_initialized = False
        self._lock = threading.Lock()

    def scan(self) -> GpuScan:
        """Read every GPU now. Never raises for NVML problems: they become notes and states."""
        with self._lock:
            gpus, notes, unreadable = self._scan_nvml()
        seen = {gpu.uuid for gpu in gpus}
        gpus += [gpu for gpu in self._static() if gpu.uuid not in seen]
        return GpuScan(tuple(gpus), tuple(notes), unreadable)

    def close(self) -> None:
        """Shut NVML down if this inventory initialised it."""
        with self._lock:
            self._forget_nvml_session()

    def _static(self) -> list[Gpu]:
        return [static_gpu(position, entry) for position, entry in enumerate(self.static_gpus)]

    def _scan_nvml(self) -> tuple[list[Gpu], list[str], str]:
        """The GPUs, host-level notes, and NVML's error if it answered nothing (else "")."""
        if self._nvml is None:
            try:
                self._nvml = _load_pynvml()
            except ImportError as error:
                return [], [f"NVML unavailable: the pynvml package cannot be imported ({error})"], ""
        nvml = self._nvml
        try:
            if not self._nvml_initialized:
                nvml.nvmlInit()
                self._nvml_initialized = True
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as error:
            # The driver may come back (loaded, or reinstalled and rebooted): init again next time.
            self._forget_nvml_session()
            reason = describe_nvml_error(error)
            return [], [reason], reason
        notes: list[str] = []
        driver = _system_reading(nvml, nvml.nvmlSystemGetDriverVersion, "driver version", notes)
        cuda_code = _system_reading(nvml, nvml.nvmlSystemGetCudaDriverVersion, "CUDA version", notes)
        cuda = cuda_version_text(cuda_code) if cuda_code else None
        return [_read_device(nvml, index, driver, cuda) for index in range(count)], notes, ""

    def _forget_nvml_session(self) -> None:
        if self._nvml_initialized and self._nvml is not None:
            self._nvml_initialized = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass


def _system_reading(nvml: Nvml, call: Callable[[], Any], what: str, notes: list[str]) -> Any:
    try:
        return call()
    except nvml.NVMLError as error:
        notes.append(f"{what} unknown: {describe_nvml_error(error)}")
        return None


def _read_device(nvml: Nvml, index: int, driver: str | None, cuda: str | None) -> Gpu:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        uuid = nvml.nvmlDeviceGetUUID(handle)
    except nvml.NVMLError as error:
        return Gpu(index, "", "unknown", driver_version=driver, cuda_version=cuda,
                   state=_device_state(error), reason=describe_nvml_error(error))
    readings: dict[str, Any] = {}
    fatal: Exception | None = None
    calls = (("name", nvml.nvmlDeviceGetName), ("memory", nvml.nvmlDeviceGetMemoryInfo),
             ("utilization", nvml.nvmlDeviceGetUtilizationRates))
    for reading, call in calls:
        try:
            readings[reading] = call(handle)
        except nvml.NVMLError as error:
            if getattr(error, "value", None) in _FATAL_DEVICE_ERRORS and fatal is None:
                fatal = error
    memory, utilization = readings.get("memory"), readings.get("utilization")
    return Gpu(
        index=index,
        uuid=uuid,
        name=readings.get("name") or "unknown",
        memory_total=memory.total if memory is not None else None,
        memory_used=memory.used if memory is not None else None,
        utilization=utilization.gpu if utilization is not None else None,
        driver_version=driver,
        cuda_version=cuda,
        state=_device_state(fatal) if fatal else "ok",
        reason=describe_nvml_error(fatal) if fatal else "",
    )


def _device_state(error: Exception) -> str:
    return "lost" if getattr(error, "value", None) == NVML_ERROR_GPU_IS_LOST else "failed"


# -- CUDA compatibility -----------------------------------------------------------------


def _major_minor(version: str) -> tuple[int, int]:
    release = Version(version).release
    return (release[0], release[1] if len(release) > 1 else 0)


def driver_supports(gpu: Gpu, cuda: str | None) -> bool:
    """Whether ``gpu``'s driver runs code built for CUDA ``cuda``; unknown drivers pass."""
    return cuda_supported(cuda, gpu.cuda_version)


def cuda_supported(cuda: str | None, driver_cuda: str | None) -> bool:
    """Whether a driver supporting CUDA up to ``driver_cuda`` runs code built for CUDA ``cuda``;
    an unknown driver (None) passes."""
    if not cuda or not driver_cuda:
        return True
    # Drivers report major.minor; a 12.4.1 runtime needs what 12.4 needs.
    return _major_minor(cuda) <= _major_minor(driver_cuda)


def check_cuda(cuda: str | None, gpus: Iterable[Gpu], what: str = "this server") -> None:
    """Raise :class:`CudaIncompatible` if any of ``gpus`` has a driver too old for ``cuda``."""
    for gpu in gpus:
        if not driver_supports(gpu, cuda):
            raise CudaIncompatible(_cuda_refusal(what, cuda, gpu))


def _cuda_refusal(what: str, cuda: str | None, gpu: Gpu) -> str:
    driver = f"NVIDIA driver {gpu.driver_version}" if gpu.driver_version else "the NVIDIA driver"
    return (f"{what} was built for CUDA {cuda}, but {driver} on this host supports CUDA up to "
            f"{gpu.cuda_version}: pick a profile built for CUDA {gpu.cuda_version} or older, "
            f"or ask an admin to update the driver")


# -- allocation -------------------------------------------------------------------------


class GpuUnavailable(Exception):
    """No GPUs for this request now.

    ``str()`` / ``detail``: the whole reason, driver notes included (logs, `condaspawner gpus`);
    ``user_message``: one line for the user, without the host's driver details.
    """

    def __init__(self, detail: str, user_message: str = ""):
        super().__init__(detail)
        self.detail = detail
        self.user_message = user_message or detail


class GpuInfeasible(GpuUnavailable):
    """This request can never be met on this host, whoever holds what (count, model, driver)."""


class GpuUnreadable(GpuUnavailable):
    """NVML answers nothing for this host now (a driver reloading, say): worth waiting for."""


class GpuQuotaExceeded(GpuUnavailable):
    """The user already holds their quota of GPUs."""


class CudaIncompatible(GpuInfeasible):
    """The GPUs' driver is older than the CUDA the environment was built for."""


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
        """Container labels recording this allocation (see :meth:`GpuAllocator.rebuild`)."""
        labels = {LABEL_USER: self.user, LABEL_SERVER: self.server_name}
        if self.uuids:
            labels[LABEL_GPUS] = ",".join(self.uuids)
            labels[LABEL_GPUS_SINCE] = format_since(self.since)
        return labels


@dataclass(frozen=True)
class GpuRequest:
    """What a server asks for: how many GPUs, and which kind."""

    count: int
    model_glob: str | None = None  # matched against the GPU name, case-insensitively
    min_free_memory: int | None = None  # bytes
    cuda: str | None = None  # the CUDA version the environment was solved for
    profile: str | None = None  # for messages only

    def matches(self, gpu: Gpu) -> bool:
        return (gpu.usable and self.model_matches(gpu) and driver_supports(gpu, self.cuda)
                and self.memory_fits(gpu))

    def model_matches(self, gpu: Gpu) -> bool:
        return not self.model_glob or fnmatch.fnmatchcase(gpu.name.lower(), self.model_glob.lower())

    def memory_fits(self, gpu: Gpu) -> bool:
        if not self.min_free_memory:
            return True
        free = gpu.memory_free
        return free is not None and free >= self.min_free_memory


@dataclass(frozen=True)
class ContainerRecord:
    """What a rebuild needs to know about one container."""

    name: str
    labels: Mapping[str, str]
    running: bool
    created: float = 0.0  # epoch seconds


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


@dataclass
class _Table:
    """Allocations and the per-GPU counts derived from them."""

    allocations: dict[tuple[str, str], Allocation] = field(default_factory=dict)
    load: dict[str, int] = field(default_factory=dict)  # active servers per GPU
    soft: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # stopped holders per GPU
    user_gpus: dict[str, int] = field(default_factory=dict)  # active GPUs per user
    touched: set[tuple[str, str]] = field(default_factory=set)  # servers added or removed since _ChangeLog.note

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


class _ChangeLog:
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

    def note(self, table: _Table) -> None:
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
        unless a request says otherwise. None: no minimum.

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

    queue_timeout = Float(
        600.0,
        min=0.0,
        help="""Seconds a spawn waits in the GPU queue when every fitting GPU is held, before it
        is refused with "No GPU is free". Spawns wait first-come first-served per GPU
        requirement (count, model, CUDA). 0 refuses at once.

            c.GpuAllocator.queue_timeout = 1800
        """,
    ).tag(config=True)

    queue_hold_after = Float(
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

    rescan_interval = Float(
        10.0,
        min=0.0,
        help="""Seconds an inventory scan stays fresh; an allocation after that rescans NVML
        first (free memory, lost GPUs). 0 rescans on every allocation.

            c.GpuAllocator.rescan_interval = 30
        """,
    ).tag(config=True)

    idle_utilization = Float(
        5.0,
        min=0.0,
        max=100.0,
        help="""A held GPU whose utilization (percent, as NVML last read it) is at or below this
        is idle: the condaspawner_gpus{state="held_idle"} metric and the GPU-seconds held
        idle count it. GPUs without a utilization reading (static GPUs) are never idle.

            c.GpuAllocator.idle_utilization = 10
        """,
    ).tag(config=True)

    gpu_sample_interval = Float(
        30.0,
        min=0.0,
        help="""Seconds between the hub's samples of its GPUs (an NVML scan: utilization and
        memory in use), which advance condaspawner_gpu_idle_seconds_total and refresh the
        GPU metrics. 0 turns sampling off.

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
        self._table = _Table()
        self._changes = _ChangeLog()
        self._scan: GpuScan | None = None
        self._scanned_at = 0.0
        self._last_pick: dict[str, int] = {}
        self._picks = 0
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
            self._scan = scan
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
        with :meth:`latest_scan` called in a thread before it where freshness matters."""
        with self._lock:
            scan = self._scan
        return scan if scan is not None else self.refresh()

    # -- allocate / release -------------------------------------------------------------

    def allocate(self, user: str, server_name: str, count: int, model_glob: str | None = None,
                 min_free_memory: int | None = None, *, cuda: str | None = None,
                 profile: str | None = None, rescan: bool = True) -> Allocation:
        """Give (user, server_name) ``count`` GPUs, or raise :class:`GpuUnavailable`.

        ``model_glob`` matches GPU names ("*A100*"); ``min_free_memory`` (bytes) overrides
        the trait; ``cuda`` is the CUDA version the environment was solved for (a driver
        supporting less is refused with :class:`CudaIncompatible`); ``profile`` only names
        the request in messages. The same server asking again gets its GPUs back if they
        still fit. ``count`` 0 releases what the server held and returns an empty allocation.
        ``rescan`` False: judge by :meth:`known_scan`, never NVML (the event loop's calls).
        """
        if count < 0:
            raise ValueError(f"cannot allocate {count} GPUs")
        request = GpuRequest(count, model_glob or None,
                             min_free_memory if min_free_memory is not None else self.min_free_memory,
                             cuda, profile)
        with self._lock:
            try:
                if count == 0:
                    self._table.remove((user, server_name))
                    return Allocation(user, server_name, (), self._clock())
                return self._allocate(user, server_name, request, rescan)
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
            states = {}
            load, idle_utilization = self._table.load, self.idle_utilization  # a trait read per GPU costs
            for gpu in scan.gpus:
                if not gpu.usable:
                    state = "unusable"
                elif not load.get(gpu.uuid):
                    state = "free"
                elif gpu.utilization is not None and gpu.utilization <= idle_utilization:
                    state = "held_idle"
                else:
                    state = "held_busy"
                states[gpu.uuid or f"#{gpu.index}"] = state
            return states

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

    def _shown_states(self) -> Iterable[str]:
        return self.gpu_states().values()

    def check_feasible(self, user: str, server_name: str, count: int, model_glob: str | None = None,
                       min_free_memory: int | None = None, *, cuda: str | None = None,
                       profile: str | None = None) -> None:
        """Raise :class:`GpuInfeasible` if no amount of waiting could give this request its GPUs
        here (too few GPUs of that model, a driver too old for ``cuda``, over the quota).
        Holds nothing: a spawn checks this at submit and allocates only once its image is ready.
        """
        if count <= 0:
            return
        request = GpuRequest(count, model_glob or None,
                             min_free_memory if min_free_memory is not None else self.min_free_memory,
                             cuda, profile)
        what = _describe_server(user, server_name, request)
        if self.per_user_gpu_quota and count > self.per_user_gpu_quota:
            message = (f"{what} needs {_plural(count, 'GPU')}, more than the per-user quota of "
                       f"{self.per_user_gpu_quota}: pick a smaller profile")
            raise GpuInfeasible(message)
        scan = self.known_scan()  # the hub's event loop: the form, the REST options
        models = [gpu for gpu in scan.countable if request.model_matches(gpu)]
        if models and not any(driver_supports(gpu, cuda) for gpu in models):
            raise CudaIncompatible(_cuda_refusal(what, cuda, models[0]))
        able = [gpu for gpu in models if driver_supports(gpu, cuda) and _memory_could_fit(gpu, request)]
        if len(able) < count:
            detail = unavailable_error(scan, request, {}, self.max_servers_per_gpu, what).detail
            raise GpuInfeasible(detail, _user_refusal(scan, request, free=0, possible=False))

    def _allocate(self, user: str, server_name: str, request: GpuRequest, rescan: bool = True) -> Allocation:
        scan = self.latest_scan() if rescan else self.known_scan()
        # The server's own GPUs count as free for its new request (a restart gets them back).
        previous = self._table.remove((user, server_name))
        try:
            self._check_quota(user, server_name, request)
            chosen = self._choose(scan, request, previous, _describe_server(user, server_name, request))
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
        need = f"{_describe_server(user, server_name, request)} needs {_plural(request.count, 'GPU')}"
        if request.count > quota:
            raise GpuQuotaExceeded(f"{need}, more than the per-user quota of {quota}: pick a smaller profile")
        raise GpuQuotaExceeded(f"{need}, but {user} already holds {held} of their quota of {quota}: "
                               f"stop another server first")

    def _choose(self, scan: GpuScan, request: GpuRequest, previous: Allocation | None,
                what: str) -> tuple[str, ...]:
        load, limit = self._table.load, self.max_servers_per_gpu  # a trait read per GPU costs
        candidates = [gpu for gpu in scan.usable if load.get(gpu.uuid, 0) < limit and request.matches(gpu)]
        if previous is not None and len(previous.uuids) == request.count:
            mine = {gpu.uuid for gpu in candidates}
            if mine.issuperset(previous.uuids):
                return previous.uuids
        if len(candidates) < request.count:
            raise unavailable_error(scan, request, self._table.load, self.max_servers_per_gpu, what)
        candidates.sort(key=self._pack_order if self.policy == "pack" else self._spread_order)
        chosen = tuple(gpu.uuid for gpu in candidates[: request.count])
        for uuid in chosen:
            self._picks += 1
            self._last_pick[uuid] = self._picks
        return chosen

    def _pack_order(self, gpu: Gpu) -> tuple:
        return (gpu.uuid in self._table.soft, -self._table.load.get(gpu.uuid, 0), gpu.index)

    def _spread_order(self, gpu: Gpu) -> tuple:
        return (gpu.uuid in self._table.soft, self._table.load.get(gpu.uuid, 0), gpu.utilization or 0,
                self._last_pick.get(gpu.uuid, 0), gpu.index)

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
            self._table = _Table()
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
        scan = self.latest_scan()
        holders = self.holders()
        rows = [_status_row(gpu, holders.get(gpu.uuid, [])) for gpu in scan.gpus]
        missing = sorted(set(holders) - set(scan.by_uuid))
        rows += [_status_row(Gpu(-1, uuid, "(not on this host)", state="missing"), holders[uuid]) for uuid in missing]
        return rows


def unavailable_error(scan: GpuScan, request: GpuRequest, load: Mapping[str, int], max_servers: int,
                      what: str = "this server") -> GpuUnavailable:
    """The one-line refusal for ``request``: how many GPUs exist, match, are busy, and why not the rest."""
    need = f"{what} needs {_plural(request.count, 'GPU')}{_qualifiers(request)}"
    if any(gpu.state == UNREADABLE for gpu in scan.gpus):
        return GpuUnreadable(f"{need}, but NVML cannot read this host's GPUs now ({scan.unreadable})",
                             "The hub cannot read its GPUs now (try again in a few minutes, or tell the hub "
                             "admin if it lasts)")
    if not scan.gpus:
        return GpuInfeasible(f"{need}, but this host has {scan.summary()}",
                             _user_refusal(scan, request, free=0, possible=False))
    usable = [gpu for gpu in scan.usable if request.model_matches(gpu)]
    too_old = [gpu for gpu in usable if not driver_supports(gpu, request.cuda)]
    if usable and len(too_old) == len(usable):
        return CudaIncompatible(_cuda_refusal(what, request.cuda, too_old[0]))
    counts = {
        "other models": sum(1 for gpu in scan.usable if not request.model_matches(gpu)),
        "lost or failing": len(scan.gpus) - len(scan.usable),
        "driver too old": len(too_old),
        "too little free memory": sum(1 for gpu in usable if driver_supports(gpu, request.cuda)
                                      and not request.memory_fits(gpu)),
    }
    matching = [gpu for gpu in usable if request.matches(gpu)]
    busy = sum(1 for gpu in matching if load.get(gpu.uuid, 0) >= max_servers)
    facts = [f"{len(matching)} of the {_plural(len(scan.gpus), 'GPU')} on this host match, {busy} busy"]
    facts += [f"{count} {reason}" for reason, count in counts.items() if count]
    # Busy GPUs free up, and so does memory other processes use: only what never fits is final.
    possible = sum(1 for gpu in usable if driver_supports(gpu, request.cuda) and _memory_could_fit(gpu, request)) \
        >= request.count
    advice = "try again when a server stops" if possible else "no request this big can fit"
    user_message = _user_refusal(scan, request, free=len(matching) - busy, possible=possible)
    error_class = GpuUnavailable if possible else GpuInfeasible
    return error_class(f"{need}: {'; '.join(facts)}; {advice}", user_message)


def _user_refusal(scan: GpuScan, request: GpuRequest, *, free: int, possible: bool) -> str:
    """"No GPU is free on this hub: F of T (...)", in the user's terms, no driver details."""
    need = f"{request.profile!r} needs " if request.profile else "this server needs "
    need += _plural(request.count, "GPU") + _qualifiers(request)
    advice = ("try again when a server stops" if possible
              else "this hub never has that many: pick another profile or ask the hub admin")
    return f"No GPU is free on this hub: {free} of {len(scan.gpus)} ({need}; {advice})"


def _memory_could_fit(gpu: Gpu, request: GpuRequest) -> bool:
    """Whether the GPU's total memory could ever hold the request's minimum (unknown: yes)."""
    if not request.min_free_memory or gpu.memory_total is None:
        return True
    return gpu.memory_total >= request.min_free_memory


def _qualifiers(request: GpuRequest) -> str:
    parts = []
    if request.model_glob:
        parts.append(f"matching {request.model_glob!r}")
    if request.min_free_memory:
        parts.append(f"with {_gib(request.min_free_memory)} free")
    if request.cuda:
        parts.append(f"for CUDA {request.cuda}")
    return (" " + " ".join(parts)) if parts else ""


def _describe_server(user: str, server_name: str, request: GpuRequest) -> str:
    server = f"{user}'s server {server_name!r}" if server_name else f"{user}'s server"
    return server + (f" (profile {request.profile!r})" if request.profile else "")


def _status_row(gpu: Gpu, holders: list[Allocation]) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "memory_used": gpu.memory_used,
        "memory_total": gpu.memory_total,
        "utilization": gpu.utilization,
        "driver_version": gpu.driver_version,
        "cuda_version": gpu.cuda_version,
        "source": gpu.source,
        "state": gpu.state,
        "reason": gpu.reason,
        "holders": [{"user": a.user, "server": a.server_name, "since": format_since(a.since),
                     "running": a.active} for a in holders],
    }



# -- the `condaspawner gpus` report --------------------------------------------------------


def status_report(allocator: GpuAllocator, connect: Callable[[], Any] | None = None) -> dict[str, Any]:
    """GPUs, their holders (from the Docker daemon's container labels) and notes, JSON-ready.

    ``connect`` returns a DockerClient (None, or no ``connect``: ``docker.from_env``); if the daemon cannot
    be reached, the GPUs are still listed, with ``holders_known`` False and a note why.
    """
    notes = list(allocator.latest_scan().notes)
    try:
        client = (connect and connect()) or docker.from_env(timeout=10)
        client.ping()
        notes += allocator.rebuild_from_containers(client)
        holders_known = True
    except (docker.errors.DockerException, requests.RequestException) as error:
        notes.append(f"holders unknown: cannot reach the Docker daemon ({error})")
        holders_known = False
    return {"summary": allocator.latest_scan().summary(), "gpus": allocator.status(), "holders_known": holders_known,
            "notes": notes}


def format_status(report: Mapping[str, Any]) -> str:
    """The report as a table, then its notes; "no GPUs: <why>" when there are none."""
    lines = []
    if report["gpus"]:
        header = ("INDEX", "NAME", "MEMORY USED/TOTAL", "UTIL", "STATE", "HOLDER", "SINCE")
        rows = [header] + [_status_cells(row, report["holders_known"]) for row in report["gpus"]]
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    else:
        lines.append(report["summary"])
    lines += [note for note in report["notes"] if note not in report["summary"]]
    return "\n".join(lines)


def _status_cells(row: Mapping[str, Any], holders_known: bool) -> tuple[str, ...]:
    memory = "-"
    if row["memory_total"] is not None:
        used = "?" if row["memory_used"] is None else f"{row['memory_used'] / 2**30:.1f}"
        memory = f"{used}/{row['memory_total'] / 2**30:.1f} GiB"
    utilization = "-" if row["utilization"] is None else f"{row['utilization']}%"
    holders = [_holder_text(holder) for holder in row["holders"]]
    since = ", ".join(holder["since"] for holder in row["holders"])
    holder = ", ".join(holders) or ("free" if holders_known else "unknown")
    index = "-" if row["index"] < 0 else str(row["index"])
    return (index, row["name"], memory, utilization, row["state"], holder, since or "-")


def _holder_text(holder: Mapping[str, Any]) -> str:
    text = holder["user"] + (f"/{holder['server']}" if holder["server"] else "")
    return text if holder["running"] else f"{text} (stopped)"

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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"

