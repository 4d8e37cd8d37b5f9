"""A faithful stand-in for ``pynvml``, for machines without an NVIDIA GPU.

It offers the functions :class:`jupyterhub_condaspawner.gpus.Nvml` lists, with pynvml's
names and parameters, and behaves as pynvml does on a real host:

- failures raise pynvml's own ``NVMLError`` subclasses, built from the real error codes
  (``pynvml.NVMLError(code)`` picks the subclass: ``NVMLError_GpuIsLost`` for 15);
- every call but ``nvmlInit`` raises ``NVMLError_Uninitialized`` before ``nvmlInit`` or
  after the last ``nvmlShutdown`` (init/shutdown are reference counted);
- device calls take the opaque handle ``nvmlDeviceGetHandleByIndex`` returned; a bad
  index or handle raises ``NVMLError_InvalidArgument``;
- readings come back as pynvml's ctypes structures (``c_nvmlMemory_t``,
  ``c_nvmlUtilization_t``) and strings as ``str``.

Failures are configured per call: ``FakeNvml(failures={"nvmlInit": LIBRARY_NOT_FOUND})``
for the host, ``FakeGpu(failures={"nvmlDeviceGetUtilizationRates": NOT_SUPPORTED})`` for
one device, or ``fake.lose(index)`` for a GPU that fell off the bus.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import pynvml

NVMLError = pynvml.NVMLError
SUCCESS = pynvml.NVML_SUCCESS
UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
LIB_RM_VERSION_MISMATCH = pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN

GIB = 2**30
DEVICE_FUNCTIONS = (
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetUtilizationRates",
)


def fake_uuid(number: int) -> str:
    """A UUID in NVML's format, ``GPU-`` plus a version-4-looking UUID, unique per number."""
    return f"GPU-{number:08x}-0000-4000-8000-{number:012x}"


@dataclass
class FakeGpu:
    """One device. ``failures``: NVML function name -> error code it returns for this GPU."""

    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    memory_total: int = 80 * GIB
    memory_used: int = 0
    utilization_gpu: int = 0
    utilization_memory: int = 0
    failures: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeHandle:
    """Opaque, like pynvml's ``c_nvmlDevice_t`` pointer."""

    index: int


class FakeNvml:
    """The host: its driver, its GPUs, and what fails."""

    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: list[FakeGpu] | tuple[FakeGpu, ...] = (), *, driver_version: str = "550.54.15",
                 cuda_driver_version: int = 12040, failures: dict[str, int] | None = None,
                 delay: float = 0.0):
        self.gpus = list(gpus)
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self.failures = dict(failures or {})  # host-level: function name -> error code
        self.delay = delay  # seconds each device reading takes, to widen races in tests
        self.calls: Counter[str] = Counter()
        self._refcount = 0
        self._lock = threading.Lock()

    @classmethod
    def with_gpus(cls, count: int, name: str = "NVIDIA A100-SXM4-80GB", memory_total: int = 80 * GIB,
                  first: int = 0, **kwargs) -> FakeNvml:
        gpus = [FakeGpu(fake_uuid(first + i), name, memory_total) for i in range(count)]
        return cls(gpus, **kwargs)

    # -- scripting the host ---------------------------------------------------------------

    def lose(self, index: int) -> None:
        """The GPU falls off the bus: every call about it returns GPU_IS_LOST from now on."""
        for function in ("nvmlDeviceGetHandleByIndex", *DEVICE_FUNCTIONS):
            self.gpus[index].failures[function] = GPU_IS_LOST

    @property
    def initialized(self) -> bool:
        return self._refcount > 0

    # -- pynvml's API ---------------------------------------------------------------------

    def nvmlInit(self):
        self._enter("nvmlInit", needs_init=False)
        with self._lock:
            self._refcount += 1

    def nvmlShutdown(self):
        self._enter("nvmlShutdown")
        with self._lock:
            self._refcount -= 1

    def nvmlSystemGetDriverVersion(self):
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self):
        self._enter("nvmlSystemGetCudaDriverVersion")
        return self.cuda_driver_version

    def nvmlDeviceGetCount(self):
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._enter("nvmlDeviceGetHandleByIndex")
        if not isinstance(index, int) or not 0 <= index < len(self.gpus):
            raise NVMLError(INVALID_ARGUMENT)
        self._device_failure("nvmlDeviceGetHandleByIndex", self.gpus[index])
        return FakeHandle(index)

    def nvmlDeviceGetUUID(self, handle):
        return self._device("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle):
        return self._device("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        gpu = self._device("nvmlDeviceGetMemoryInfo", handle)
        return pynvml.c_nvmlMemory_t(total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used,
                                     used=gpu.memory_used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu = self._device("nvmlDeviceGetUtilizationRates", handle)
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    # -- plumbing -------------------------------------------------------------------------

    def _enter(self, function: str, needs_init: bool = True) -> None:
        self.calls[function] += 1
        if needs_init and not self.initialized:
            raise NVMLError(UNINITIALIZED)
        code = self.failures.get(function, SUCCESS)
        if code != SUCCESS:
            raise NVMLError(code)

    def _device(self, function: str, handle: FakeHandle) -> FakeGpu:
        self._enter(function)
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < len(self.gpus):
            raise NVMLError(INVALID_ARGUMENT)
        if self.delay:
            time.sleep(self.delay)
        gpu = self.gpus[handle.index]
        self._device_failure(function, gpu)
        return gpu

    @staticmethod
    def _device_failure(function: str, gpu: FakeGpu) -> None:
        code = gpu.failures.get(function, SUCCESS)
        if code != SUCCESS:
            raise NVMLError(code)


class FileDrivenNvml(FakeNvml):
    """A :class:`FakeNvml` whose utilization readings another process plays: each reading
    takes the GPU's percent from ``levels_file`` (JSON ``{uuid: percent}``) when it lists
    the GPU. A test replays a utilization trace into a real hub by rewriting the file."""

    def __init__(self, gpus: list[FakeGpu] | tuple[FakeGpu, ...], levels_file: str, **kwargs):
        super().__init__(gpus, **kwargs)
        self.levels_file = levels_file

    def nvmlDeviceGetUtilizationRates(self, handle):
        try:
            with open(self.levels_file) as levels:
                percent = json.load(levels)
        except (OSError, ValueError):
            percent = {}
        if isinstance(handle, FakeHandle) and 0 <= handle.index < len(self.gpus):
            gpu = self.gpus[handle.index]
            gpu.utilization_gpu = int(percent.get(gpu.uuid, gpu.utilization_gpu))
        return super().nvmlDeviceGetUtilizationRates(handle)


def write_levels(levels_file, percent: dict[str, int]) -> None:
    """Set what :class:`FileDrivenNvml` reads next, atomically."""
    partial = f"{levels_file}.tmp"
    with open(partial, "w") as out:
        json.dump(percent, out)
    os.replace(partial, levels_file)
