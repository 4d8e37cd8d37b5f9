"""Which GPUs a server gets: its request, the fitting GPUs in the policy's order ('pack' or
'spread'), and when none fit, the refusal: one line for the log, one for the user."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .gpuinventory import UNREADABLE, Gpu, GpuScan, driver_supports, plural
from .gputable import Allocation, AllocationTable

POLICIES = ("pack", "spread")


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


class GpuOverQuota(GpuInfeasible):
    """The request alone wants more GPUs than one user may hold (a profile no one can start)."""


class CudaIncompatible(GpuInfeasible):
    """The GPUs' driver is older than the CUDA the environment was built for."""


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


class GpuChooser:
    """Picks the GPUs of each request from the fitting ones, in the policy's order."""

    def __init__(self) -> None:
        self._last_pick: dict[str, int] = {}  # GPU UUID -> the number of the pick that last took it
        self._picks = 0

    def choose(self, scan: GpuScan, request: GpuRequest, table: AllocationTable, previous: Allocation | None,
               what: str, *, policy: str, max_servers: int,
               avoid: Callable[[Gpu], bool] | None = None) -> tuple[str, ...]:
        """The UUIDs ``request`` gets: ``previous``'s again if they all still fit, else the first
        fitting ones in ``policy``'s order, never one ``avoid`` names (GPUs held for an older
        request). Raises :class:`GpuUnavailable` when too few fit."""
        load = table.load
        candidates = [gpu for gpu in scan.usable if load.get(gpu.uuid, 0) < max_servers and request.matches(gpu)
                      and not (avoid is not None and avoid(gpu))]
        if previous is not None and len(previous.uuids) == request.count:
            mine = {gpu.uuid for gpu in candidates}
            if mine.issuperset(previous.uuids):
                return previous.uuids
        if len(candidates) < request.count:
            raise unavailable_error(scan, request, load, max_servers, what)
        candidates.sort(key=self._order(table, policy))
        chosen = tuple(gpu.uuid for gpu in candidates[: request.count])
        for uuid in chosen:
            self._picks += 1
            self._last_pick[uuid] = self._picks
        return chosen

    def _order(self, table: AllocationTable, policy: str) -> Callable[[Gpu], tuple]:
        if policy == "pack":
            return lambda gpu: (gpu.uuid in table.soft, -table.load.get(gpu.uuid, 0), gpu.index)
        return lambda gpu: (gpu.uuid in table.soft, table.load.get(gpu.uuid, 0), gpu.utilization or 0,
                            self._last_pick.get(gpu.uuid, 0), gpu.index)


def check_feasible(scan: GpuScan, request: GpuRequest, what: str, max_servers: int) -> None:
    """Raise :class:`GpuInfeasible` if the host ``scan`` saw could never give ``request`` its GPUs,
    whoever held what (too few GPUs of that model, a driver too old for its CUDA, too little memory)."""
    models = [gpu for gpu in scan.countable if request.model_matches(gpu)]
    if models and not any(driver_supports(gpu, request.cuda) for gpu in models):
        raise CudaIncompatible(_cuda_refusal(what, request.cuda, models[0]))
    able = [gpu for gpu in models if driver_supports(gpu, request.cuda) and _memory_could_fit(gpu, request)]
    if len(able) < request.count:
        detail = unavailable_error(scan, request, {}, max_servers, what).detail
        raise GpuInfeasible(detail, _user_refusal(scan, request, free=0, possible=False))


def unavailable_error(scan: GpuScan, request: GpuRequest, load: Mapping[str, int], max_servers: int,
                      what: str = "this server") -> GpuUnavailable:
    """The one-line refusal for ``request``: how many GPUs exist, match, are busy, and why not the rest."""
    need = f"{what} needs {plural(request.count, 'GPU')}{_qualifiers(request)}"
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
    facts = [f"{len(matching)} of the {plural(len(scan.gpus), 'GPU')} on this host match, {busy} busy"]
    facts += [f"{count} {reason}" for reason, count in counts.items() if count]
    # Busy GPUs free up, and so does memory other processes use: only what never fits is final.
    possible = sum(1 for gpu in usable if driver_supports(gpu, request.cuda) and _memory_could_fit(gpu, request)) \
        >= request.count
    advice = "try again when a server stops" if possible else "no request this big can fit"
    user_message = _user_refusal(scan, request, free=len(matching) - busy, possible=possible)
    error_class = GpuUnavailable if possible else GpuInfeasible
    return error_class(f"{need}: {'; '.join(facts)}; {advice}", user_message)


def _user_refusal(scan: GpuScan, request: GpuRequest, *, free: int, possible: bool) -> str:
    """"No GPU is free on this hub: F of T (...)", in the user's terms, no driver details; "No GPU
    on this hub fits: ..." when none ever could (waiting would not help: "free" would mislead)."""
    need = f"{request.profile!r} needs " if request.profile else "this server needs "
    need += plural(request.count, "GPU") + _qualifiers(request)
    if not possible:
        return (f"No GPU on this hub fits: {free} of {len(scan.gpus)} ({need}; this hub never has that many: "
                "pick another profile or ask the hub admin)")
    return f"No GPU is free on this hub: {free} of {len(scan.gpus)} ({need}; try again when a server stops)"


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


def describe_server(user: str, server_name: str, request: GpuRequest) -> str:
    server = f"{user}'s server {server_name!r}" if server_name else f"{user}'s server"
    return server + (f" (profile {request.profile!r})" if request.profile else "")


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"
