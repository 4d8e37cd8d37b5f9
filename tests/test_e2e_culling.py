"""End to end: a real hub stops a GPU server whose GPU computes nothing, and tells its owner.

The hub reads a fake NVML (tests/fake_nvml.py) whose one A100 reports the utilization this
test writes to a file, replaying a trace into the running hub: busy while the server
trains, then idle while its owner keeps the browser busy. Culling is the default
``c.CondaSpawner.gpu_idle_timeout`` of 6 seconds, sampled every half second.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fake_nvml import write_levels
from fixtures_hub import FAKE_GPU, metric

pytestmark = pytest.mark.docker

TESTS = Path(__file__).resolve().parent
IDLE_TIMEOUT_S = 6
HUB_EXTRA_CONFIG = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
from fake_nvml import FakeGpu, FileDrivenNvml
import jupyterhub_condaspawner.gpuinventory as _gpuinventory
# The hub's NVML: one fake A100 whose utilization the test plays through this file.
_nvml = FileDrivenNvml([FakeGpu({FAKE_GPU!r})], os.path.join(os.environ["CONDASPAWNER_DEMO_STATE"], "gpu-levels.json"))
_gpuinventory._load_pynvml = lambda: _nvml
c.GpuInventory.static_gpus = []
c.GpuAllocator.device_mode = "nvidia-runtime"  # no NVIDIA runtime here: the GPU travels as an env var
c.GpuAllocator.gpu_sample_interval = 0.5
c.CondaSpawner.gpu_idle_timeout = {IDLE_TIMEOUT_S / 60!r}
"""


def levels(hub, percent: int) -> None:
    write_levels(hub.state / "gpu-levels.json", {FAKE_GPU: percent})


def start_gpu_server(hub, user: str) -> None:
    status, body = hub.spawn(user, {"profile": "gpu-demo"})
    assert status in (201, 202), body
    events = hub.progress(user)
    assert events[-1].get("ready"), events


def wait_until_stopped(hub, user: str, *, meanwhile, timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hub.server_model(user) is None:
            return True
        meanwhile()
        time.sleep(0.5)
    return False


def test_an_idle_gpu_server_is_stopped_through_the_hub_and_its_owner_told_why(hub):
    levels(hub, 90)
    start_gpu_server(hub, "trainer")
    # Training: several timeouts pass with the GPU busy and nobody in the browser.
    time.sleep(3 * IDLE_TIMEOUT_S)
    assert hub.server_model("trainer") is not None, hub.log()[-2000:]
    assert metric(hub.metrics(), "condaspawner_gpus", state="held_busy") == 1

    # Training ends; the notebook tab stays open and busy (requests through the proxy
    # count as activity for the generic culler), but the GPU idles.
    levels(hub, 2)
    seen_by_browser = []

    def browse() -> None:
        seen_by_browser.append(hub.user_api("trainer", "/status")[0])

    assert wait_until_stopped(hub, "trainer", meanwhile=browse), hub.log()[-3000:]
    assert 200 in seen_by_browser  # the browser really was using the server meanwhile
    assert hub.user_api("trainer", "/status")[0] != 200  # its route is gone from the proxy

    samples = hub.metrics()
    assert metric(samples, "condaspawner_culls_total", reason="gpu_idle") == 1
    assert metric(samples, "condaspawner_gpus", state="free") == 1
    log = hub.log()
    assert "Stopping trainer/(default): its GPUs were idle" in log

    page = hub.spawn_page("trainer")
    assert "Your server on Fake A100 (CUDA 12.4) was stopped after " in page
    assert "with its GPU idle" in page
    assert "with its GPU idle" not in hub.spawn_page("trainer")  # told once

    # The freed GPU is anyone's; the owner starts again and is watched again.
    levels(hub, 90)
    start_gpu_server(hub, "trainer")
    model = hub.server_model("trainer")
    assert model["state"]["condaspawner"]["gpus"] == [FAKE_GPU]
    hub.stop_server("trainer")
    assert metric(hub.metrics(), "condaspawner_culls_total", reason="gpu_idle") == 1
