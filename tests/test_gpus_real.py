"""The GPU code against a real NVIDIA GPU through NVML (the ``gpu`` marker).

Everywhere else these tests skip, saying why: the rest of the suite runs the same code
against the fake NVML. Where a GPU is present they check what the fake cannot: the real
inventory (UUIDs, memory, driver and CUDA versions), the device request a server gets, and
utilization sampling that tells an idle held GPU from a busy one, which is the idle
culler's input. The busy half needs something that computes on the GPU (PyTorch or CuPy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyterhub_condaspawner import cli
from jupyterhub_condaspawner.culler import GpuIdleCuller
from jupyterhub_condaspawner.gpus import Gpu, GpuAllocator, GpuInventory

pytestmark = pytest.mark.gpu

# Runs matrix products on GPU 0 until killed; prints "busy" once the first one finished.
_LOAD = """
import sys
try:
    import torch
    a = torch.randn(8192, 8192, device="cuda")
    def step():
        global a
        a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
except ImportError:
    import cupy
    a = cupy.random.rand(8192, 8192, dtype=cupy.float32)
    def step():
        global a
        a = cupy.clip(a @ a, -1, 1)
        cupy.cuda.Device().synchronize()
step()
print("busy", flush=True)
while True:
    step()
"""


@pytest.fixture
def inventory() -> Iterator[GpuInventory]:
    inventory = GpuInventory()
    scan = inventory.scan()
    if not scan.usable:
        inventory.close()
        pytest.skip(f"NVML finds no usable GPU here ({scan.summary()})")
    yield inventory
    inventory.close()


def _has_gpu_compute() -> bool:
    for module in ("torch", "cupy"):
        try:
            __import__(module)
            return True
        except ImportError:
            continue
    return False


def _utilization_settles(allocator: GpuAllocator, uuid: str, predicate, seconds: float = 30.0) -> Gpu:
    """Sample until the GPU's utilization satisfies ``predicate`` (NVML averages over its own
    sampling period, up to a second or so), or fail with what was read."""
    readings = []
    deadline = time.monotonic() + seconds
    while True:
        gpu = allocator.sample().by_uuid[uuid]
        readings.append(gpu.utilization)
        if predicate(gpu.utilization):
            return gpu
        if time.monotonic() > deadline:
            pytest.fail(f"utilization of {uuid} never settled: read {readings}")
        time.sleep(0.5)


def test_real_nvml_inventory_and_allocation(inventory):
    scan = inventory.scan()
    gpu = scan.usable[0]
    print(f"\nNVML: {scan.summary()}")
    for found in scan.gpus:
        print(f"  #{found.index} {found.uuid} {found.name} memory {found.memory_total} B, "
              f"used {found.memory_used} B, utilization {found.utilization}%, "
              f"driver {found.driver_version}, CUDA {found.cuda_version}")
    assert gpu.uuid.startswith(("GPU-", "MIG-")) and gpu.memory_total and gpu.memory_total > 0
    assert gpu.driver_version and gpu.cuda_version and "." in gpu.cuda_version
    assert gpu.utilization is not None and 0 <= gpu.utilization <= 100
    allocator = GpuAllocator(inventory=inventory)
    held = allocator.allocate("alice", "", 1)
    assert held.uuids[0] in scan.by_uuid
    assert allocator.container_options(held).host_config()["device_requests"][0]["DeviceIDs"] == list(held.uuids)


def test_real_gpu_held_idle_then_busy_then_culled_only_when_idle(inventory):
    if not _has_gpu_compute():
        pytest.skip("neither PyTorch nor CuPy is installed: nothing here can make the GPU busy")
    allocator = GpuAllocator(inventory=inventory, idle_utilization=5)
    held = allocator.allocate("alice", "", 1)
    uuid = held.uuids[0]
    clock = [time.time()]
    culler = GpuIdleCuller(allocator, clock=lambda: clock[0])

    async def stop(cull):  # never awaited here: observe() only says who is due
        raise AssertionError(cull)

    culler.watch("alice", "", timeout_minutes=1, profile="gpu", stop=stop)

    idle = _utilization_settles(allocator, uuid, lambda percent: percent is not None and percent <= 5)
    print(f"\nidle: utilization {idle.utilization}%, memory used {idle.memory_used} B")
    assert allocator.gpu_states()[uuid] == "held_idle"
    assert culler.observe(allocator.gpu_states()) == []

    load = subprocess.Popen([sys.executable, "-c", _LOAD], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "busy"
        busy = _utilization_settles(allocator, uuid, lambda percent: percent is not None and percent > 50)
        print(f"busy: utilization {busy.utilization}%, memory used {busy.memory_used} B")
        assert allocator.gpu_states()[uuid] == "held_busy"
        clock[0] += 120  # past the 1-minute timeout, but the GPU computes: not due
        assert culler.observe(allocator.gpu_states()) == []
        assert culler.idle_for("alice", "") is None
    finally:
        load.kill()
        load.wait()

    _utilization_settles(allocator, uuid, lambda percent: percent is not None and percent <= 5)
    clock[0] += 1
    assert culler.observe(allocator.gpu_states()) == []  # idle again, from now on
    clock[0] += 61
    due = culler.observe(allocator.gpu_states())
    assert [(cull.user, cull.server_name) for cull, _ in due] == [("alice", "")]
    assert "with its GPU idle" in due[0][0].notice


def test_real_gpus_command_lists_the_gpu(inventory, capsys):
    uuid = inventory.scan().usable[0].uuid
    assert cli.main(["gpus", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    print(json.dumps(report, indent=1))
    row = next(row for row in report["gpus"] if row["uuid"] == uuid)
    assert row["memory_total"] > 0 and row["state"] == "ok" and row["holders"] == []


def _outcome(call, *args):
    """What a call did, in terms both NVMLs can be compared by: its result's type, or the
    NVML error code it raised."""
    try:
        result = call(*args)
    except Exception as error:  # pynvml's NVMLError subclasses carry the C error code
        return ("error", getattr(error, "value", type(error).__name__))
    return ("ok", type(result).__name__)


def _script(nvml) -> dict[str, tuple]:
    """The calls the inventory makes, and the misuses the fake claims to answer as NVML does."""
    seen = {}
    nvml.nvmlInit()
    nvml.nvmlInit()  # reference counted: one shutdown leaves a session open
    nvml.nvmlShutdown()
    seen["count, one of two sessions closed"] = _outcome(nvml.nvmlDeviceGetCount)
    count = nvml.nvmlDeviceGetCount()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    seen["handle past the last GPU"] = _outcome(nvml.nvmlDeviceGetHandleByIndex, count)
    for name in ("nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion"):
        seen[name] = _outcome(getattr(nvml, name))
    for name in ("nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo",
                 "nvmlDeviceGetUtilizationRates"):
        seen[name] = _outcome(getattr(nvml, name), handle)
    seen["uuid's shape"] = tuple(len(part) for part in nvml.nvmlDeviceGetUUID(handle).split("-"))
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    seen["memory fields"] = tuple(type(getattr(memory, field)).__name__ for field in ("total", "free", "used"))
    utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
    seen["utilization fields"] = tuple(type(getattr(utilization, field)).__name__ for field in ("gpu", "memory"))
    nvml.nvmlShutdown()
    seen["count after the last shutdown"] = _outcome(nvml.nvmlDeviceGetCount)
    seen["uuid after the last shutdown"] = _outcome(nvml.nvmlDeviceGetUUID, handle)
    return seen


def test_the_fake_nvml_answers_as_the_real_one(inventory):
    """The fake (tests/fake_nvml.py) stands in for NVML in every other GPU test: here the
    same calls go to both, and each must return the same types or raise the same codes."""
    from fake_nvml import FakeNvml

    # NVML counts sessions per process: the real script runs where no other test holds one.
    here = Path(__file__).parent
    code = ("import json, test_gpus_real as t; from jupyterhub_condaspawner.gpuinventory import _load_pynvml; "
            "print(json.dumps(t._script(_load_pynvml())))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    real = json.loads(run.stdout.splitlines()[-1])
    fake = json.loads(json.dumps(_script(FakeNvml.with_gpus(1))))
    print("\n" + "\n".join(f"  {what}: real {real[what]}, fake {fake[what]}" for what in real))
    assert fake == real
