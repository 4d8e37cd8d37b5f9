"""The host's GPUs: what NVML (``pynvml``) reports, plus any the admin declares in
``c.GpuInventory.static_gpus``, and which CUDA their driver runs.

NVML failures (no library, no driver, a GPU fallen off the bus) become reasons and GPU
states, never exceptions. :mod:`.gpus` hands these GPUs out.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from jupyterhub.traitlets import ByteSpecification
from packaging.version import InvalidVersion, Version
from traitlets import Dict, List, TraitError, validate
from traitlets.config import LoggingConfigurable

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

    def naming_lost(self, previous: GpuScan) -> GpuScan:
        """This scan with each GPU NVML could not name (lost or failing: no UUID) named as
        ``previous`` saw the GPU at its index, if that UUID is listed nowhere now: the lost GPU a
        server holds shows as that GPU, with its holder, not as an unknown GPU beside a missing one."""
        earlier = {gpu.index: gpu for gpu in previous.gpus if gpu.source == "nvml" and gpu.uuid}
        gpus = []
        for gpu in self.gpus:
            seen = earlier.get(gpu.index)
            if gpu.source == "nvml" and not gpu.uuid and seen is not None and seen.uuid not in self.by_uuid:
                gpu = dataclasses.replace(gpu, uuid=seen.uuid, name=seen.name, memory_total=seen.memory_total)
            gpus.append(gpu)
        return GpuScan(tuple(gpus), self.notes, self.unreadable)

    def summary(self) -> str:
        """"no GPUs: <why>" or "3 GPUs (1 lost)"."""
        if not self.gpus:
            return "no GPUs: " + ("; ".join(self.notes) or "none found")
        unusable = len(self.gpus) - len(self.usable)
        text = plural(len(self.gpus), "GPU")
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
        for field, values in (("uuid", [gpu.uuid for gpu in gpus]), ("index", [str(gpu.index) for gpu in gpus])):
            duplicates = sorted({value for value in values if values.count(value) > 1})
            if duplicates:
                implied = " (an entry without 'index' is at its position in the list)" if field == "index" else ""
                raise TraitError(f"static_gpus: the same {field} is declared twice: {', '.join(duplicates)}{implied}")
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


def plural(count: int, noun: str) -> str:
    """``plural(1, "GPU")`` -> "1 GPU", ``plural(3, "GPU")`` -> "3 GPUs"."""
    return f"{count} {noun}" + ("" if count == 1 else "s")
