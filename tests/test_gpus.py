"""GPU inventory, allocation, container options, restart rebuild and the `gpus` command.

Unit tests run on tests/fake_nvml.py (pynvml's API and error types, scripted devices);
the rebuild and device-request tests use the real bench Docker daemon; one test uses the
real NVML and runs only where it finds GPUs.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
import threading
import uuid as uuidlib
import warnings
from concurrent.futures import ThreadPoolExecutor

import docker
import docker.types
import pytest
from fake_nvml import (
    DRIVER_NOT_LOADED,
    GIB,
    GPU_IS_LOST,
    LIBRARY_NOT_FOUND,
    NOT_SUPPORTED,
    FakeGpu,
    FakeNvml,
    fake_uuid,
)
from gated_daemon import GatedDaemon
from traitlets import TraitError
from traitlets.config import Config

from jupyterhub_condaspawner import cli, gpuinventory, gpus
from jupyterhub_condaspawner.gpus import (
    LABEL_GPUS,
    LABEL_GPUS_SINCE,
    LABEL_SERVER,
    LABEL_USER,
    Allocation,
    ContainerRecord,
    CudaIncompatible,
    Gpu,
    GpuAllocator,
    GpuInventory,
    GpuOverQuota,
    GpuQuotaExceeded,
    GpuUnavailable,
    check_cuda,
    cuda_version_text,
    format_since,
    parse_since,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import pynvml

T0 = 1_717_236_000.0  # 2024-06-01T10:00:00Z


def allocator_for(fake: FakeNvml, **traits) -> GpuAllocator:
    return GpuAllocator(inventory=GpuInventory(nvml=fake), clock=lambda: T0, **traits)


def mixed_host() -> FakeNvml:
    """Two A100s (indexes 0, 1) and two T4s (2, 3)."""
    return FakeNvml([
        FakeGpu(fake_uuid(0), "NVIDIA A100-SXM4-80GB", 80 * GIB),
        FakeGpu(fake_uuid(1), "NVIDIA A100-SXM4-80GB", 80 * GIB),
        FakeGpu(fake_uuid(2), "Tesla T4", 16 * GIB),
        FakeGpu(fake_uuid(3), "Tesla T4", 16 * GIB),
    ])


def indexes(allocation: Allocation) -> list[int]:
    return [int(uuid.rsplit("-", 1)[1], 16) for uuid in allocation.uuids]


# --- the fake is faithful to pynvml ---------------------------------------------------------


def test_fake_has_every_nvml_call_the_inventory_makes_with_pynvmls_parameters():
    fake = FakeNvml()
    for name in gpus.NVML_FUNCTIONS:
        real = list(inspect.signature(getattr(pynvml, name)).parameters)
        assert list(inspect.signature(getattr(fake, name)).parameters) == real, name
    assert set(gpus.NVML_FUNCTIONS) >= {"nvmlInit", "nvmlDeviceGetUUID", "nvmlSystemGetCudaDriverVersion"}


def test_error_codes_the_inventory_knows_are_pynvmls():
    for name in ("NOT_SUPPORTED", "NO_PERMISSION", "DRIVER_NOT_LOADED", "LIBRARY_NOT_FOUND", "GPU_IS_LOST",
                 "RESET_REQUIRED", "LIB_RM_VERSION_MISMATCH", "UNKNOWN"):
        assert getattr(gpus, f"NVML_ERROR_{name}") == getattr(pynvml, f"NVML_ERROR_{name}")


def test_fake_raises_pynvmls_own_error_classes_and_needs_init_like_nvml():
    fake = FakeNvml.with_gpus(1)
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlDeviceGetCount()
    fake.nvmlInit()
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        fake.nvmlDeviceGetHandleByIndex(1)
    fake.lose(0)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        fake.nvmlDeviceGetHandleByIndex(0)
    fake.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        fake.nvmlShutdown()


def test_fake_returns_pynvmls_structures():
    fake = FakeNvml([FakeGpu(fake_uuid(7), memory_total=16 * GIB, memory_used=4 * GIB, utilization_gpu=35)])
    fake.nvmlInit()
    handle = fake.nvmlDeviceGetHandleByIndex(0)
    memory = fake.nvmlDeviceGetMemoryInfo(handle)
    assert isinstance(memory, pynvml.c_nvmlMemory_t)
    assert (memory.total, memory.used, memory.free) == (16 * GIB, 4 * GIB, 12 * GIB)
    assert isinstance(fake.nvmlDeviceGetUtilizationRates(handle), pynvml.c_nvmlUtilization_t)


# --- inventory ------------------------------------------------------------------------------


def test_scan_reads_every_field():
    fake = FakeNvml([FakeGpu(fake_uuid(0), "NVIDIA H100 80GB HBM3", 80 * GIB, 3 * GIB, utilization_gpu=42)],
                    driver_version="550.54.15", cuda_driver_version=12040)

    scan = GpuInventory(nvml=fake).scan()

    assert scan.gpus == (Gpu(0, fake_uuid(0), "NVIDIA H100 80GB HBM3", 80 * GIB, 3 * GIB, 42,
                             "550.54.15", "12.4"),)
    assert scan.notes == ()
    assert scan.summary() == "1 GPU"
    assert scan.gpus[0].memory_free == 77 * GIB


@pytest.mark.parametrize("code, text", [(12040, "12.4"), (11080, "11.8"), (12010, "12.1"), (13000, "13.0")])
def test_cuda_version_text(code, text):
    assert cuda_version_text(code) == text


def test_no_nvml_library_means_zero_gpus_and_says_why():
    fake = FakeNvml.with_gpus(2, failures={"nvmlInit": LIBRARY_NOT_FOUND})

    scan = GpuInventory(nvml=fake).scan()

    assert scan.gpus == ()
    assert scan.summary().startswith("no GPUs: NVML error 'NVML Shared Library Not Found': libnvidia-ml.so.1")


def test_driver_not_loaded_is_a_reason_and_a_later_scan_recovers():
    fake = FakeNvml.with_gpus(2, failures={"nvmlInit": DRIVER_NOT_LOADED})
    inventory = GpuInventory(nvml=fake)

    assert "the NVIDIA kernel driver is not loaded" in inventory.scan().summary()
    fake.failures.clear()
    assert len(inventory.scan().usable) == 2


def test_a_driver_that_stops_answering_for_a_moment_keeps_the_gpus_known_and_refusals_retryable():
    fake = FakeNvml.with_gpus(2)
    allocator = allocator_for(fake, rescan_interval=0)
    allocator.allocate("alice", "", 1)
    fake.failures["nvmlDeviceGetCount"] = DRIVER_NOT_LOADED  # a driver reload

    scan = allocator.refresh()
    assert [gpu.state for gpu in scan.gpus] == ["unreadable", "unreadable"]
    assert scan.gpus[0].uuid == fake_uuid(0) and "the NVIDIA kernel driver is not loaded" in scan.gpus[0].reason
    # What servers hold stays visible: unusable, not gone.
    assert sorted(allocator.gpu_states().values()) == ["unusable", "unusable"]
    # A submit is judged on the GPUs the host has: 2 fit, 3 never do.
    allocator.check_feasible("bob", "", 2)
    with pytest.raises(gpus.GpuInfeasible):
        allocator.check_feasible("bob", "", 3)
    with pytest.raises(gpus.GpuUnreadable) as refusal:
        allocator.allocate("bob", "", 1)
    assert refusal.value.user_message == ("The hub cannot read its GPUs now (try again in a few minutes, or tell "
                                          "the hub admin if it lasts)")
    allocator.refresh()  # failing again: still the same two GPUs
    assert [gpu.uuid for gpu in allocator.latest_scan().gpus] == [fake_uuid(0), fake_uuid(1)]

    fake.failures.clear()
    assert allocator.allocate("bob", "", 1).uuids == (fake_uuid(1),)


def test_a_host_whose_nvml_never_answered_has_no_gpus_to_wait_for():
    allocator = allocator_for(FakeNvml.with_gpus(2, failures={"nvmlInit": DRIVER_NOT_LOADED}))
    with pytest.raises(gpus.GpuInfeasible):
        allocator.check_feasible("bob", "", 1)


def test_the_real_pynvml_never_raises_from_a_scan():
    scan = GpuInventory().scan()  # this machine: no NVML; a GPU machine: its GPUs
    assert scan.gpus or scan.summary().startswith("no GPUs: ")


def test_nvml_is_initialised_once_across_scans_and_shut_down_on_close():
    fake = FakeNvml.with_gpus(2)
    inventory = GpuInventory(nvml=fake)
    inventory.scan()
    inventory.scan()

    assert fake.calls["nvmlInit"] == 1
    inventory.close()
    assert not fake.initialized


def test_a_gpu_fallen_off_the_bus_is_listed_as_lost_and_never_allocated():
    fake = FakeNvml.with_gpus(3)
    fake.lose(0)
    allocator = allocator_for(fake)

    scan = allocator.latest_scan()
    assert [gpu.state for gpu in scan.gpus] == ["lost", "ok", "ok"]
    assert "fallen off the bus" in scan.gpus[0].reason
    assert scan.summary() == "3 GPUs (1 unusable)"
    assert indexes(allocator.allocate("alice", "", 2)) == [1, 2]
    with pytest.raises(GpuUnavailable, match="1 lost or failing"):
        allocator.allocate("bob", "", 1)


def test_a_gpu_lost_after_its_handle_was_found_is_lost_too():
    fake = FakeNvml.with_gpus(2)
    fake.gpus[1].failures["nvmlDeviceGetMemoryInfo"] = GPU_IS_LOST

    scan = GpuInventory(nvml=fake).scan()

    assert scan.gpus[1].uuid == fake_uuid(1)
    assert scan.gpus[1].state == "lost" and not scan.gpus[1].usable


def test_a_held_gpu_that_falls_off_the_bus_keeps_its_name_and_holder():
    # NVML cannot read a lost GPU's UUID: the hub names it as it last saw the GPU at that index,
    # so the status (environments page) shows it lost, with its holder, not "unknown" and "missing".
    fake = FakeNvml.with_gpus(2)
    allocator = allocator_for(fake, rescan_interval=0)
    allocator.allocate("alice", "", 1)  # GPU 0
    fake.lose(0)

    rows = allocator.status()

    assert [(row["index"], row["uuid"], row["state"]) for row in rows] == [
        (0, fake_uuid(0), "lost"), (1, fake_uuid(1), "ok")]
    assert [holder["user"] for holder in rows[0]["holders"]] == ["alice"]
    assert allocator.gpu_states() == {fake_uuid(0): "unusable", fake_uuid(1): "free"}
    assert indexes(allocator.allocate("bob", "", 1)) == [1]  # never the lost one


def test_unsupported_readings_leave_the_gpu_usable():
    fake = FakeNvml.with_gpus(1)
    fake.gpus[0].failures["nvmlDeviceGetUtilizationRates"] = NOT_SUPPORTED

    gpu = GpuInventory(nvml=fake).scan().gpus[0]

    assert gpu.usable and gpu.utilization is None and gpu.memory_total == 80 * GIB


def test_system_reading_failures_become_notes():
    fake = FakeNvml.with_gpus(1, failures={"nvmlSystemGetCudaDriverVersion": NOT_SUPPORTED})

    scan = GpuInventory(nvml=fake).scan()

    assert scan.gpus[0].cuda_version is None and scan.gpus[0].usable
    assert scan.notes == ("CUDA version unknown: NVML error 'Not Supported'",)


def test_a_rescan_sees_new_free_memory_and_lost_gpus():
    fake = FakeNvml.with_gpus(2)
    allocator = allocator_for(fake, rescan_interval=0)
    fake.gpus[0].memory_used = 79 * GIB

    assert indexes(allocator.allocate("alice", "", 1, min_free_memory=10 * GIB)) == [1]


# --- static GPUs -----------------------------------------------------------------------------


def test_static_gpus_are_used_where_nvml_is_not_visible():
    config = Config()
    config.GpuInventory.static_gpus = [
        {"uuid": "GPU-static-a", "name": "NVIDIA A100-SXM4-40GB", "memory": "40G", "cuda_version": "12.2"},
        {"uuid": "GPU-static-b", "name": "NVIDIA A100-SXM4-40GB", "index": 5},
    ]
    fake = FakeNvml(failures={"nvmlInit": LIBRARY_NOT_FOUND})
    allocator = GpuAllocator(inventory=GpuInventory(nvml=fake, config=config))

    scan = allocator.latest_scan()
    assert [(gpu.index, gpu.uuid, gpu.source, gpu.memory_total, gpu.cuda_version) for gpu in scan.gpus] == [
        (0, "GPU-static-a", "static", 40 * 2**30, "12.2"), (5, "GPU-static-b", "static", None, None)]
    assert "Shared Library Not Found" in scan.notes[0]
    assert allocator.allocate("alice", "", 2, model_glob="*A100*").uuids == ("GPU-static-a", "GPU-static-b")


def test_static_gpus_reach_the_inventory_through_the_allocators_config():
    config = Config()
    config.GpuInventory.static_gpus = [{"uuid": "GPU-static-a"}]

    allocator = GpuAllocator(config=config)

    assert allocator.inventory.static_gpus == [{"uuid": "GPU-static-a"}]
    assert "GPU-static-a" in allocator.latest_scan().by_uuid


def test_nvml_wins_over_a_static_entry_for_the_same_gpu():
    config = Config()
    config.GpuInventory.static_gpus = [{"uuid": fake_uuid(0), "name": "declared"}, {"uuid": "GPU-extra"}]

    scan = GpuInventory(nvml=FakeNvml.with_gpus(1), config=config).scan()

    assert [(gpu.uuid, gpu.source) for gpu in scan.gpus] == [(fake_uuid(0), "nvml"), ("GPU-extra", "static")]


@pytest.mark.parametrize("entries, message", [
    ([{"name": "A100"}], r"static_gpus\[0\]: 'uuid' must be the GPU's UUID"),
    ([{"uuid": "GPU-a,GPU-b"}], r"'uuid' must be"),
    ([{"uuid": "GPU-a", "memory": "lots"}], r"'memory' must be a size such as '80G', not 'lots'"),
    ([{"uuid": "GPU-a", "cuda_version": "twelve"}], r"'cuda_version' must be a version"),
    ([{"uuid": "GPU-a", "vram": "8G"}], r"unknown keys \['vram'\]"),
    ([{"uuid": "GPU-a", "index": -1}], r"'index' must be a whole number"),
    ([{"uuid": "GPU-a"}, {"uuid": "GPU-a"}], r"the same uuid is declared twice: GPU-a"),
    ([{"uuid": "GPU-a", "index": 0}, {"uuid": "GPU-b", "index": 0}], r"the same index is declared twice: 0"),
    ([{"uuid": "GPU-a"}, {"uuid": "GPU-b", "index": 0}], r"the same index is declared twice: 0 \(an entry without 'index' is at its position"),
    (["GPU-a"], r"expected a dict, not the str"),
])
def test_bad_static_gpus_are_refused_with_the_reason(entries, message):
    with pytest.raises(TraitError, match=message):
        GpuInventory(nvml=FakeNvml()).static_gpus = entries


# --- allocation policies and filters ------------------------------------------------------------


def test_pack_takes_the_lowest_free_indexes():
    allocator = allocator_for(FakeNvml.with_gpus(4))

    assert indexes(allocator.allocate("alice", "", 1)) == [0]
    assert indexes(allocator.allocate("bob", "", 2)) == [1, 2]
    allocator.release("alice", "")
    assert indexes(allocator.allocate("carol", "", 1)) == [0]


def test_pack_fills_shared_gpus_first_and_spread_spreads_them():
    pack = allocator_for(FakeNvml.with_gpus(4), max_servers_per_gpu=2)
    spread = allocator_for(FakeNvml.with_gpus(4), max_servers_per_gpu=2, policy="spread")

    assert [indexes(pack.allocate(user, "", 1)) for user in "abc"] == [[0], [0], [1]]
    assert [indexes(spread.allocate(user, "", 1)) for user in "abc"] == [[0], [1], [2]]


def test_spread_prefers_idle_and_least_recently_used_gpus():
    fake = FakeNvml.with_gpus(3)
    fake.gpus[0].utilization_gpu = 90  # used outside the hub
    allocator = allocator_for(fake, policy="SPREAD")

    first = allocator.allocate("alice", "", 1)
    allocator.release("alice", "")
    second = allocator.allocate("alice", "", 1)

    assert indexes(first) == [1] and indexes(second) == [2]


def test_model_glob_matches_gpu_names_case_insensitively():
    allocator = allocator_for(mixed_host())

    assert indexes(allocator.allocate("alice", "", 2, model_glob="*t4")) == [2, 3]
    assert indexes(allocator.allocate("bob", "", 1, model_glob="*A100*")) == [0]


def test_min_free_memory_skips_full_gpus_and_the_request_overrides_the_trait():
    fake = FakeNvml.with_gpus(3, memory_total=40 * GIB)
    fake.gpus[0].memory_used = 30 * GIB
    allocator = allocator_for(fake, min_free_memory="20G")

    assert indexes(allocator.allocate("alice", "", 1)) == [1]
    assert indexes(allocator.allocate("bob", "", 1, min_free_memory=5 * GIB)) == [0]


def test_max_servers_per_gpu_time_shares_each_gpu_that_many_times():
    allocator = allocator_for(FakeNvml.with_gpus(4), max_servers_per_gpu=2)

    held = [allocator.allocate(f"user{i}", "", 1).uuids[0] for i in range(8)]

    assert sorted(held) == sorted(fake_uuid(i) for i in range(4) for _ in range(2))
    with pytest.raises(GpuUnavailable, match="4 of the 4 GPUs on this host match, 4 busy"):
        allocator.allocate("user8", "", 1)


def test_a_server_never_gets_the_same_gpu_twice():
    allocator = allocator_for(FakeNvml.with_gpus(2), max_servers_per_gpu=4)

    assert sorted(indexes(allocator.allocate("alice", "", 2))) == [0, 1]
    with pytest.raises(GpuUnavailable):
        allocator.allocate("bob", "", 3)


# --- refusals ----------------------------------------------------------------------------------


def test_exhaustion_says_who_asked_what_how_many_are_busy_and_how_many_exist():
    allocator = allocator_for(mixed_host())
    allocator.allocate("bob", "", 1, model_glob="*A100*")

    with pytest.raises(GpuUnavailable) as refusal:
        allocator.allocate("alice", "big", 2, model_glob="*A100*", profile="PyTorch, 2 A100s")

    assert str(refusal.value) == (
        "alice's server 'big' (profile 'PyTorch, 2 A100s') needs 2 GPUs matching '*A100*': "
        "2 of the 4 GPUs on this host match, 1 busy; 2 other models; try again when a server stops")
    assert allocator.allocation("alice", "big") is None


def test_a_request_bigger_than_what_matches_says_it_can_never_fit():
    allocator = allocator_for(mixed_host())

    with pytest.raises(GpuUnavailable, match="needs 3 GPUs matching 'Tesla T4'.*no request this big can fit"):
        allocator.allocate("alice", "", 3, model_glob="Tesla T4")


def test_memory_refusal_counts_gpus_with_too_little_free_memory():
    fake = FakeNvml.with_gpus(2, memory_total=16 * GIB)
    fake.gpus[1].memory_used = 10 * GIB
    allocator = allocator_for(fake)
    allocator.allocate("bob", "", 1)

    with pytest.raises(GpuUnavailable, match=r"with 8 GiB free: 1 of the 2 GPUs on this host match, 1 busy; "
                                             r"1 too little free memory"):
        allocator.allocate("alice", "", 1, min_free_memory=8 * GIB)


def test_a_host_without_gpus_refuses_with_the_nvml_reason():
    allocator = allocator_for(FakeNvml(failures={"nvmlInit": DRIVER_NOT_LOADED}))

    with pytest.raises(GpuUnavailable, match=r"^alice's server needs 1 GPU, but this host has no GPUs: NVML error "
                                             r"'Driver Not Loaded': the NVIDIA kernel driver is not loaded$"):
        allocator.allocate("alice", "", 1)


def test_quota_counts_all_of_a_users_servers_and_frees_on_release():
    allocator = allocator_for(FakeNvml.with_gpus(8), per_user_gpu_quota=3)
    allocator.allocate("alice", "one", 2)
    allocator.allocate("alice", "two", 1)

    with pytest.raises(GpuQuotaExceeded, match="alice's server 'three' needs 1 GPU, but alice already holds 3 of "
                                               "their quota of 3: stop another server first"):
        allocator.allocate("alice", "three", 1)
    assert len(allocator.allocate("bob", "", 3).uuids) == 3
    with pytest.raises(GpuOverQuota, match="bob's server 'x' needs 4 GPUs, more than the per-user quota of 3"):
        allocator.allocate("bob", "x", 4)  # never possible: refused as check_feasible refuses it (400, not 429)
    allocator.release("alice", "one")
    assert len(allocator.allocate("alice", "three", 2).uuids) == 2


# --- release, re-allocation, named servers --------------------------------------------------------


def test_release_frees_the_gpus_and_returns_what_was_held():
    allocator = allocator_for(FakeNvml.with_gpus(1))
    held = allocator.allocate("alice", "", 1)

    assert allocator.release("alice", "") == held
    assert allocator.release("alice", "") is None
    assert allocator.allocate("bob", "", 1).uuids == held.uuids


def test_a_users_named_servers_hold_gpus_separately():
    allocator = allocator_for(FakeNvml.with_gpus(3))
    default = allocator.allocate("alice", "", 1)
    named = allocator.allocate("alice", "gpu2", 1)

    assert default.uuids != named.uuids
    allocator.release("alice", "gpu2")
    assert allocator.allocation("alice", "") == default


def test_the_same_server_asking_again_keeps_its_gpus_and_since():
    clock = iter([T0, T0 + 60])
    allocator = GpuAllocator(inventory=GpuInventory(nvml=FakeNvml.with_gpus(2)), clock=lambda: next(clock))
    first = allocator.allocate("alice", "", 1)

    again = allocator.allocate("alice", "", 1)

    assert again == first and len(allocator.allocations()) == 1


def test_a_failed_request_keeps_what_the_server_held():
    allocator = allocator_for(FakeNvml.with_gpus(2))
    held = allocator.allocate("alice", "", 1)

    with pytest.raises(GpuUnavailable):
        allocator.allocate("alice", "", 3)
    assert allocator.allocation("alice", "") == held


def test_zero_gpus_records_nothing_and_releases_what_the_server_held():
    allocator = allocator_for(FakeNvml.with_gpus(1))
    allocator.allocate("alice", "", 1)

    assert allocator.allocate("alice", "", 0).uuids == ()
    assert allocator.allocations() == []
    with pytest.raises(ValueError):
        allocator.allocate("alice", "", -1)


# --- concurrency -------------------------------------------------------------------------------


def spawn_at_once(allocator: GpuAllocator, users: int) -> list[str]:
    """``users`` threads allocate one GPU each, released together; the GPUs granted."""
    start = threading.Barrier(users)

    def spawn(user: str) -> tuple[str, ...]:
        start.wait()
        try:
            return allocator.allocate(user, "", 1).uuids
        except GpuUnavailable:
            return ()

    with ThreadPoolExecutor(users) as pool:
        return [uuid for uuids in pool.map(spawn, [f"user{i}" for i in range(users)]) for uuid in uuids]


@pytest.fixture
def eager_thread_switching():
    """Switch threads every microsecond: without the allocator's lock, about 1 run in 5 double-allocates."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def test_concurrent_threads_never_get_the_same_gpu(eager_thread_switching):
    for _ in range(20):
        granted = spawn_at_once(allocator_for(FakeNvml.with_gpus(8)), users=24)
        assert len(granted) == 8 and len(set(granted)) == 8


async def test_concurrent_async_spawns_never_double_allocate():
    allocator = allocator_for(FakeNvml.with_gpus(6, delay=0.0005), rescan_interval=0, max_servers_per_gpu=2)

    async def spawn(user: str) -> tuple[str, ...] | None:
        try:
            return (await asyncio.to_thread(allocator.allocate, user, "", 2)).uuids
        except GpuUnavailable:
            return None

    results = await asyncio.gather(*(spawn(f"user{i}") for i in range(12)))

    granted = [uuid for uuids in results if uuids for uuid in uuids]
    assert len(granted) == 12
    assert all(granted.count(uuid) == 2 for uuid in set(granted))


# --- CUDA compatibility ---------------------------------------------------------------------------


def test_a_profile_built_for_a_newer_cuda_than_the_driver_is_refused_and_nothing_is_held():
    allocator = allocator_for(FakeNvml.with_gpus(2, driver_version="550.54.15", cuda_driver_version=12040))

    with pytest.raises(CudaIncompatible) as refusal:
        allocator.allocate("alice", "", 1, cuda="12.6", profile="pytorch")

    assert str(refusal.value) == (
        "alice's server (profile 'pytorch') was built for CUDA 12.6, but NVIDIA driver 550.54.15 on this host "
        "supports CUDA up to 12.4: pick a profile built for CUDA 12.4 or older, or ask an admin to update the driver")
    assert allocator.allocations() == []


@pytest.mark.parametrize("cuda", ["12.4", "12.4.1", "12", "11.8", None])
def test_cuda_the_driver_supports_is_allowed(cuda):
    allocator = allocator_for(FakeNvml.with_gpus(1, cuda_driver_version=12040))
    assert allocator.allocate("alice", "", 1, cuda=cuda).uuids == (fake_uuid(0),)


def test_check_cuda_on_chosen_gpus_and_unknown_drivers_pass():
    new = Gpu(0, "GPU-a", "A100", cuda_version="12.4", driver_version="550.54.15")
    unknown = Gpu(1, "GPU-b", "A100")

    check_cuda("12.4", [new, unknown])
    with pytest.raises(CudaIncompatible, match="this server was built for CUDA 13.0, but NVIDIA driver 550.54.15"):
        check_cuda("13.0", [new])


# --- container options ---------------------------------------------------------------------------


def test_device_request_mode_names_the_uuids_in_a_device_request_env_and_labels():
    allocator = allocator_for(FakeNvml.with_gpus(2))
    held = allocator.allocate("alice", "gpu2", 2)

    options = allocator.container_options(held)

    uuids = f"{fake_uuid(0)},{fake_uuid(1)}"
    assert options.host_config() == {"device_requests": [docker.types.DeviceRequest(
        driver="nvidia", device_ids=[fake_uuid(0), fake_uuid(1)], capabilities=[["gpu"]])]}
    assert options.environment == {"CONDASPAWNER_GPUS": uuids, "NVIDIA_VISIBLE_DEVICES": uuids}
    assert options.labels == {LABEL_USER: "alice", LABEL_SERVER: "gpu2", LABEL_GPUS: uuids,
                              LABEL_GPUS_SINCE: "2024-06-01T10:00:00Z"}
    assert options.create_kwargs() == {"environment": options.environment, "labels": options.labels,
                                       "device_requests": options.host_config()["device_requests"]}


def test_nvidia_runtime_mode_sets_only_the_environment():
    allocator = allocator_for(FakeNvml.with_gpus(1), device_mode="nvidia-runtime")

    options = allocator.container_options(allocator.allocate("alice", "", 1))

    assert options.host_config() == {} and "device_requests" not in options.create_kwargs()
    assert options.environment["NVIDIA_VISIBLE_DEVICES"] == fake_uuid(0)


def test_a_server_without_gpus_sees_none_even_under_the_nvidia_runtime():
    allocator = allocator_for(FakeNvml.with_gpus(1), device_mode="nvidia-runtime")

    options = allocator.container_options(allocator.allocate("alice", "", 0))

    assert options.environment == {"CONDASPAWNER_GPUS": "", "NVIDIA_VISIBLE_DEVICES": "void"}
    assert options.labels == {LABEL_USER: "alice", LABEL_SERVER: ""}


# --- rebuild from labels (no daemon) ----------------------------------------------------------------


def record(allocation: Allocation, running: bool = True, name: str | None = None) -> ContainerRecord:
    return ContainerRecord(name or f"jupyter-{allocation.user}-{allocation.server_name}", allocation.labels(),
                           running)


def test_labels_round_trip_through_a_rebuild():
    before = allocator_for(FakeNvml.with_gpus(4))
    held = [before.allocate("alice", "", 2), before.allocate("bob", "x", 1)]

    after = allocator_for(FakeNvml.with_gpus(4))
    assert after.rebuild([record(a) for a in held]) == []

    assert sorted(after.allocations(), key=lambda a: a.user) == held
    assert indexes(after.allocate("carol", "", 1)) == [3]


def test_since_labels_round_trip():
    assert parse_since(format_since(T0)) == T0
    assert parse_since("yesterday") is None


def test_rebuild_keeps_gpus_the_host_no_longer_has_and_reports_them():
    allocator = allocator_for(FakeNvml.with_gpus(2))
    gone = Allocation("alice", "", (fake_uuid(0), "GPU-gone"), T0)

    problems = allocator.rebuild([record(gone, name="jupyter-alice")])

    assert problems == ["container jupyter-alice (alice/'') holds GPU-gone, which this host does not have now (2 GPUs)"]
    assert allocator.allocation("alice", "").uuids == (fake_uuid(0), "GPU-gone")
    assert allocator.status()[-1]["name"] == "(not on this host)"


def test_rebuild_reports_unlabelled_users_duplicate_servers_and_overcommitted_gpus():
    allocator = allocator_for(FakeNvml.with_gpus(2))
    labels = Allocation("alice", "", (fake_uuid(0),), T0).labels()
    records = [
        ContainerRecord("a-old", labels, running=True, created=1),
        ContainerRecord("a-new", labels, running=False, created=2),
        ContainerRecord("b", Allocation("bob", "", (fake_uuid(0),), T0).labels(), running=True, created=3),
        ContainerRecord("anon", {LABEL_GPUS: fake_uuid(1)}, running=True),
    ]

    problems = allocator.rebuild(records)

    assert problems == [
        "container anon has io.condaspawner.gpus but no io.condaspawner.user label; ignored",
        f"{fake_uuid(0)} is used by 2 running servers (max_servers_per_gpu=1); container b is one of them",
        "container a-new: alice/'' already holds GPUs from another container; ignored",
    ]
    assert {a.user for a in allocator.allocations()} == {"alice", "bob"}


def test_a_second_running_container_of_one_server_keeps_its_gpus_held():
    # Two hubs (or container prefixes) on one daemon, or a renamed leftover: both run on GPUs.
    allocator = allocator_for(FakeNvml.with_gpus(3))
    records = [
        ContainerRecord("jupyter-alice", Allocation("alice", "", (fake_uuid(0),), T0).labels(), running=True),
        ContainerRecord("staging-alice", Allocation("alice", "", (fake_uuid(1),), T0).labels(), running=True),
    ]

    problems = allocator.rebuild(records)

    assert problems == ["container staging-alice: alice/'' already holds GPUs from another container; its GPUs "
                        "stay held until that server stops"]
    assert allocator.allocation("alice", "").uuids == (fake_uuid(0), fake_uuid(1))
    assert allocator.allocate("bob", "", 1).uuids == (fake_uuid(2),)


def test_a_stopped_containers_gpus_return_to_its_server_or_go_to_whoever_needs_them():
    allocator = allocator_for(FakeNvml.with_gpus(2))
    stopped = Allocation("alice", "", (fake_uuid(0),), T0)
    allocator.rebuild([record(stopped, running=False)])
    assert allocator.allocation("alice", "").active is False

    assert indexes(allocator.allocate("bob", "", 1)) == [1]  # free GPUs first
    assert allocator.allocate("alice", "", 1) == stopped  # alice restarts: same GPU, same since


def test_a_stopped_container_whose_gpu_went_to_a_running_server_holds_nothing():
    allocator = allocator_for(FakeNvml.with_gpus(2))
    records = [record(Allocation("alice", "", (fake_uuid(0), fake_uuid(1)), T0), running=False),
               record(Allocation("bob", "", (fake_uuid(0),), T0 + 60), running=True)]

    assert allocator.rebuild(records) == []

    assert [a.key for a in allocator.allocations()] == [("bob", "")]
    assert indexes(allocator.allocate("carol", "", 1)) == [1]


def test_a_stopped_containers_hold_yields_when_nothing_else_is_free():
    allocator = allocator_for(FakeNvml.with_gpus(1), per_user_gpu_quota=1)
    allocator.rebuild([record(Allocation("alice", "", (fake_uuid(0),), T0), running=False)])

    assert allocator.allocate("alice", "other", 1).uuids == (fake_uuid(0),)  # stopped holds use no quota
    assert allocator.allocation("alice", "") is None


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GpuAllocator, GpuInventory])
def test_every_setting_has_help_with_a_config_example(cls):
    for name, trait in cls.class_traits(config=True).items():
        assert f"c.{cls.__name__}.{name} = " in trait.help, name


def test_settings_come_from_traitlets_config():
    config = Config()
    config.GpuAllocator.policy = "spread"
    config.GpuAllocator.max_servers_per_gpu = 3
    config.GpuAllocator.per_user_gpu_quota = 2
    config.GpuAllocator.min_free_memory = "1G"
    config.GpuAllocator.device_mode = "nvidia-runtime"

    allocator = GpuAllocator(config=config)

    assert (allocator.policy, allocator.max_servers_per_gpu, allocator.per_user_gpu_quota,
            allocator.min_free_memory, allocator.device_mode) == ("spread", 3, 2, 2**30, "nvidia-runtime")
    with pytest.raises(TraitError):
        allocator.policy = "random"
    with pytest.raises(TraitError):
        allocator.max_servers_per_gpu = 0


# --- real Docker daemon: labels, device requests, rebuild --------------------------------------------


@pytest.fixture
def labelled(docker_daemon, rootfs_image):
    """Create containers carrying a unique run label; remove them afterwards."""
    client = docker_daemon.client()
    run_label = f"io.condaspawner.test-run={uuidlib.uuid4().hex}"
    key, value = run_label.split("=")
    created = []

    def create(options, start: bool = False, name: str | None = None):
        kwargs = options.create_kwargs()
        kwargs["labels"] = {**kwargs["labels"], key: value}
        container = client.containers.create(rootfs_image, ["tini", "--", "sleep", "300"], network_mode="host",
                                             name=name, **kwargs)
        created.append(container)
        if start:
            container.start()
        return container

    create.client = client
    create.run_label = run_label
    yield create
    for container in created:
        container.remove(force=True)


@pytest.mark.docker
def test_a_created_container_carries_the_device_request_env_and_labels(labelled):
    allocator = allocator_for(FakeNvml.with_gpus(2))
    options = allocator.container_options(allocator.allocate("alice", "gpu2", 2))

    container = labelled(options)  # created, not started: this daemon has no GPU to start it on

    container.reload()
    assert container.attrs["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 0, "DeviceIDs": [fake_uuid(0), fake_uuid(1)],
         "Capabilities": [["gpu"]], "Options": {}}]
    env = container.attrs["Config"]["Env"]
    assert f"CONDASPAWNER_GPUS={fake_uuid(0)},{fake_uuid(1)}" in env
    assert f"NVIDIA_VISIBLE_DEVICES={fake_uuid(0)},{fake_uuid(1)}" in env
    assert container.labels[LABEL_GPUS] == f"{fake_uuid(0)},{fake_uuid(1)}"


@pytest.mark.docker
def test_the_low_level_api_path_dockerspawner_uses_carries_the_device_request(docker_daemon, rootfs_image):
    allocator = allocator_for(FakeNvml.with_gpus(1))
    options = allocator.container_options(allocator.allocate("alice", "", 1))
    api = docker_daemon.client().api
    host_config = api.create_host_config(network_mode="host", **options.host_config())

    container = api.create_container(rootfs_image, ["tini", "--", "true"], host_config=host_config,
                                     environment=dict(options.environment), labels=dict(options.labels))
    try:
        requests = api.inspect_container(container["Id"])["HostConfig"]["DeviceRequests"]
    finally:
        api.remove_container(container["Id"], force=True)
    assert requests[0]["DeviceIDs"] == [fake_uuid(0)] and requests[0]["Driver"] == "nvidia"


@pytest.mark.docker
def test_rebuild_from_running_and_stopped_containers_on_the_daemon(labelled):
    before = allocator_for(FakeNvml.with_gpus(4), device_mode="nvidia-runtime")  # these containers can start
    running = before.allocate("alice", "", 1)
    stopped = before.allocate("bob", "named", 2)
    never_started = before.allocate("carol", "", 1)
    labelled(before.container_options(running), start=True)
    bob = labelled(before.container_options(stopped), start=True)
    bob.stop(timeout=1)
    labelled(before.container_options(never_started))
    labelled(before.container_options(before.allocate("dave", "", 0)), start=True)  # no GPUs: not a holder

    after = allocator_for(FakeNvml.with_gpus(4))
    problems = after.rebuild_from_containers(labelled.client, label_filters=[labelled.run_label])

    assert problems == []
    table = {a.key: (a.uuids, a.active) for a in after.allocations()}
    assert table == {("alice", ""): (running.uuids, True), ("bob", "named"): (stopped.uuids, False),
                     ("carol", ""): (never_started.uuids, False)}
    assert after.allocation("alice", "").since == T0
    assert indexes(after.allocate("erin", "", 1)) != indexes(running)


@pytest.mark.docker
def test_rebuild_from_the_daemon_reports_gpus_this_host_lacks(labelled):
    labels_only = gpus.GpuContainerOptions((), {}, Allocation("alice", "", ("GPU-gone",), T0).labels())
    labelled(labels_only, start=True, name=f"gone-{uuidlib.uuid4().hex[:8]}")

    allocator = allocator_for(FakeNvml.with_gpus(1))
    problems = allocator.rebuild_from_containers(labelled.client, label_filters=[labelled.run_label])

    assert len(problems) == 1 and "holds GPU-gone, which this host does not have now" in problems[0]


@pytest.mark.docker
def test_a_rebuild_keeps_what_was_allocated_and_released_while_its_listing_ran(tmp_path, docker_daemon, labelled):
    def labels_only(allocation: Allocation) -> gpus.GpuContainerOptions:
        return gpus.GpuContainerOptions((), {}, allocation.labels())

    labelled(labels_only(Allocation("alice", "", (fake_uuid(0),), T0)), start=True)
    labelled(labels_only(Allocation("dave", "", (fake_uuid(1),), T0)))  # created, never started
    allocator = allocator_for(FakeNvml.with_gpus(2))
    with ThreadPoolExecutor(1) as pool, GatedDaemon(tmp_path / "docker.sock", docker_daemon.docker_host) as daemon:
        client = docker.APIClient(base_url=daemon.url)
        # Only this test's containers: other tests' on the shared daemon may hold the same fake GPUs.
        rebuild = pool.submit(allocator.rebuild_from_containers, client, label_filters=[labelled.run_label])
        daemon.wait_for_listing()  # listed: alice runs on GPU 0, dave's stopped container had GPU 1
        allocator.release("alice", "")  # then alice's server stops
        bob, carol = allocator.allocate("bob", "", 1), allocator.allocate("carol", "", 1)
        daemon.answer(0)
        assert rebuild.result() == []

    assert allocator.restored
    assert {a.key: a.uuids for a in allocator.allocations()} == {("bob", ""): bob.uuids, ("carol", ""): carol.uuids}
    assert sorted(bob.uuids + carol.uuids) == [fake_uuid(0), fake_uuid(1)]


# --- the `condaspawner gpus` command ---------------------------------------------------------------


def write_config(tmp_path, static: list[dict]) -> str:
    path = tmp_path / "gpu_config.py"
    path.write_text(f"c.GpuInventory.static_gpus = {static!r}\n")
    return str(path)


def without_nvml(monkeypatch):
    monkeypatch.setattr(gpuinventory, "_load_pynvml", lambda: FakeNvml(failures={"nvmlInit": LIBRARY_NOT_FOUND}))


def test_gpus_command_without_nvml_says_no_gpus_and_why(monkeypatch, capsys):
    without_nvml(monkeypatch)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")

    assert cli.main(["gpus"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("no GPUs: NVML error 'NVML Shared Library Not Found'")
    assert lines[1].startswith("holders unknown: cannot reach the Docker daemon")


def test_gpus_command_on_this_machine_exits_0():
    assert cli.main(["gpus", "--json"]) == 0


def test_gpus_command_lists_static_gpus_with_holders_unknown_when_docker_is_down(monkeypatch, capsys, tmp_path):
    without_nvml(monkeypatch)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    config = write_config(tmp_path, [{"uuid": "GPU-static-a", "name": "NVIDIA L4", "memory": "24G"}])

    assert cli.main(["gpus", "--config", config]) == 0

    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["INDEX", "NAME", "MEMORY", "USED/TOTAL", "UTIL", "STATE", "HOLDER", "SINCE"]
    assert table[1].split() == ["0", "NVIDIA", "L4", "?/24.0", "GiB", "-", "ok", "unknown", "-"]
    assert table[-1].startswith("holders unknown: cannot reach the Docker daemon")


def test_gpus_command_refuses_a_bad_static_gpu(monkeypatch, capsys, tmp_path):
    without_nvml(monkeypatch)

    assert cli.main(["gpus", "--config", write_config(tmp_path, [{"name": "no uuid"}])]) == 1

    assert "error: bad GPU configuration: static_gpus[0]: 'uuid' must be" in capsys.readouterr().err


@pytest.mark.docker
def test_gpus_command_shows_holders_from_container_labels(monkeypatch, capsys, tmp_path, labelled):
    without_nvml(monkeypatch)
    static_uuid = f"GPU-static-{uuidlib.uuid4().hex[:8]}"
    config = write_config(tmp_path, [{"uuid": static_uuid, "name": "NVIDIA L4", "memory": "24G"}])
    held = Allocation("alice", "gpu2", (static_uuid,), T0)
    labelled(gpus.GpuContainerOptions((), {}, held.labels()), start=True)

    assert cli.main(["gpus", "--config", config, "--json"]) == 0

    report = json.loads(capsys.readouterr().out)
    row = next(row for row in report["gpus"] if row["uuid"] == static_uuid)
    assert report["holders_known"] is True
    assert row["holders"] == [{"user": "alice", "server": "gpu2", "since": "2024-06-01T10:00:00Z", "running": True}]
    assert cli.main(["gpus", "--config", config]) == 0
    assert "alice/gpu2" in capsys.readouterr().out
