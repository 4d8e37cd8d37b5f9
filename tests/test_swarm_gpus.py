"""GPU utilization on a swarm without a swarm (swarmgpus.py): dcgm-exporter's text, GPU states from
Swarm's tasks and the nodes' readings, idle GPU-seconds, and the idle culler fed by them.

The swarm's records are the manager's shapes (test_swarm_plan.py's helpers); the readings come from
a fake source, or from a real HTTP server on loopback speaking dcgm-exporter's format. On the
multi-node bench with a real hub: test_e2e_swarm_gpus.py.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import threading
from collections.abc import Iterator, Sequence

import pytest
from prometheus_client import REGISTRY
from test_swarm_plan import FakeApi, node_attrs, task

from jupyterhub_condaspawner import swarm, swarmgpus
from jupyterhub_condaspawner.culler import Cull, GpuIdleCuller
from jupyterhub_condaspawner.gpus import GpuAllocator, GpuInventory
from jupyterhub_condaspawner.swarm import NodeInfo
from jupyterhub_condaspawner.swarmgpus import DcgmExporterSource, GpuReading, SwarmGpuSampler

A100 = "NVIDIA A100-SXM4-80GB"
# What dcgm-exporter 3.x serves (default counters; trimmed to two GPUs and the fields we read).
DCGM_TEXT = """\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-w1-0",pci_bus_id="00000000:07:00.0",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",Hostname="w1",DCGM_FI_DRIVER_VERSION="550.54.15"} 0
DCGM_FI_DEV_GPU_UTIL{gpu="1",UUID="GPU-w1-1",pci_bus_id="00000000:0F:00.0",device="nvidia1",modelName="NVIDIA A100-SXM4-80GB",Hostname="w1",DCGM_FI_DRIVER_VERSION="550.54.15"} 87
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-w1-0",pci_bus_id="00000000:07:00.0",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",Hostname="w1",DCGM_FI_DRIVER_VERSION="550.54.15"} 1024
DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-w1-1",pci_bus_id="00000000:0F:00.0",device="nvidia1",modelName="NVIDIA A100-SXM4-80GB",Hostname="w1",DCGM_FI_DRIVER_VERSION="550.54.15"} 40960
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{gpu="0",UUID="GPU-w1-0",pci_bus_id="00000000:07:00.0",device="nvidia0",modelName="NVIDIA A100-SXM4-80GB",Hostname="w1",DCGM_FI_DRIVER_VERSION="550.54.15"} 80896
DCGM_FI_DEV_FB_FREE{gpu="1",UUID="GPU-w1-1",pci_bus_id="00000000:0F:00.0",device="nvidia1",modelName="NVIDIA A100-SXM4-80GB",Hostname="w1",DCGM_FI_DRIVER_VERSION="550.54.15"} 40960
# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{gpu="0",UUID="GPU-w1-0",Hostname="w1"} 1410
"""
EPOCH = 1_796_050_000.0  # 2026-11-30T15:26:40Z


class FakeSource:
    """Readings the test sets, per GPU; which nodes were asked."""

    def __init__(self) -> None:
        self.utilization: dict[str, float] = {}
        self.asked: list[list[str]] = []

    def read(self, nodes: Sequence[NodeInfo]) -> dict[str, GpuReading]:
        self.asked.append([node.hostname for node in nodes])
        gpus = {gpu for node in nodes for gpu in node.gpus}
        return {gpu: GpuReading(value) for gpu, value in self.utilization.items() if gpu in gpus}


class Swarm:
    """Two GPU workers (w2 can be marked down) and the tasks a test places; a simulated clock."""

    def __init__(self) -> None:
        self.tasks: list[dict] = []
        self.w2_state = "ready"
        self.now = EPOCH

    def nodes(self) -> list[dict]:
        return [node_attrs("manager", "10.0.0.1"),
                node_attrs("w1", "10.0.0.2", ("GPU-w1-0", "GPU-w1-1"), A100),
                node_attrs("w2", "10.0.0.3", ("GPU-w2-0", "GPU-w2-1"), A100, state=self.w2_state)]

    def run(self, service: str, user: str, node: str, gpu: str, started: float) -> None:
        record = task(service, user, node, (gpu,), 1)
        record["Status"]["Timestamp"] = _rfc3339(started)
        self.tasks.append(record)

    def read(self) -> swarm.SwarmState:
        return swarm.read_swarm(FakeApi(self.nodes(), self.tasks))


def _rfc3339(epoch: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.123456789Z")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_dcgm_exporters_text_gives_utilization_and_memory_per_gpu_uuid():
    readings = swarmgpus.parse_dcgm(DCGM_TEXT)

    # memory: in use, and in all (used + free: 81920 MiB, an 80 GB A100)
    assert readings == {"GPU-w1-0": GpuReading(0.0, 1024 * 2**20, 81920 * 2**20),
                        "GPU-w1-1": GpuReading(87.0, 40960 * 2**20, 81920 * 2**20)}
    assert swarmgpus.parse_dcgm("") == {}


def test_gpu_states_and_idle_seconds_come_from_swarms_tasks_and_the_nodes_readings():
    bench, source = Swarm(), FakeSource()
    sampler = SwarmGpuSampler(bench.read, source, idle_utilization=5.0, clock=lambda: bench.now)
    bench.run("s1", "ada", "w1", "GPU-w1-0", started=EPOCH - 600)
    bench.run("s2", "bob", "w2", "GPU-w2-0", started=EPOCH - 600)
    source.utilization = {"GPU-w1-0": 3, "GPU-w2-0": 90}
    idle_before = metric("condaspawner_gpu_idle_seconds_total")

    states, holdings = sampler.sample()

    assert states == {"GPU-w1-0": "held_idle", "GPU-w1-1": "free", "GPU-w2-0": "held_busy", "GPU-w2-1": "free"}
    assert holdings[("ada", "")].uuids == ("GPU-w1-0",) and holdings[("ada", "")].since == EPOCH - 600
    assert source.asked == [["w1", "w2"]]  # only ready nodes with GPUs are read
    assert metric("condaspawner_gpus", state="held_idle") == 1 and metric("condaspawner_gpus", state="free") == 2
    assert metric("condaspawner_gpu_idle_seconds_total") == idle_before  # the first sample counts nothing yet

    bench.now += 30
    sampler.sample()
    assert metric("condaspawner_gpu_idle_seconds_total") == idle_before + 30

    # Bob's node dies: its GPUs are unusable, and no reading is asked of it; a GPU without a reading is busy.
    bench.w2_state, source.utilization = "down", {}
    bench.now += 30
    states, _ = sampler.sample()
    assert states == {"GPU-w1-0": "held_busy", "GPU-w1-1": "free", "GPU-w2-0": "unusable", "GPU-w2-1": "unusable"}
    assert source.asked[-1] == ["w1"]
    assert metric("condaspawner_gpu_idle_seconds_total") == idle_before + 30


def test_a_swarm_server_idle_for_its_timeout_is_culled_and_one_busy_sample_restarts_the_count():
    bench, source = Swarm(), FakeSource()
    sampler = SwarmGpuSampler(bench.read, source, idle_utilization=5.0, clock=lambda: bench.now)
    culler = GpuIdleCuller(GpuAllocator(inventory=GpuInventory(static_gpus=[])), clock=lambda: bench.now)
    stopped: list[Cull] = []

    async def stop(cull: Cull) -> None:
        stopped.append(cull)

    culler.watch("ada", "", timeout_minutes=10, profile="PyTorch on 1 GPU", stop=stop)
    culler.watch("bob", "", timeout_minutes=10, profile="PyTorch on 1 GPU", stop=stop)
    bench.run("s1", "ada", "w1", "GPU-w1-0", started=EPOCH)
    bench.run("s2", "bob", "w2", "GPU-w2-0", started=EPOCH)
    trace = {"GPU-w1-0": [0] * 25, "GPU-w2-0": [0] * 10 + [60] + [0] * 14}  # 30 s apart

    culled_at = {}
    for step in range(25):
        bench.now = EPOCH + 30 * step
        source.utilization = {gpu: levels[step] for gpu, levels in trace.items()}
        states, holdings = sampler.sample()
        for cull, callback in culler.observe(states, holdings):
            asyncio.run(callback(cull))
            culled_at[cull.user] = step

    assert culled_at == {"ada": 20}  # 10 min of 0% (20 samples of 30 s)
    assert stopped[0].notice == ("Your server on PyTorch on 1 GPU was stopped after 10 min with its GPU idle: "
                                 "start it again when you need it")
    assert culler.idle_for("bob", "") == 30 * 14  # idle since his busy sample (step 10), not since he started


@pytest.fixture
def exporter() -> Iterator[dict[str, str]]:
    """A dcgm-exporter stand-in on loopback: serves ``pages[path]`` (404 otherwise)."""
    pages: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = pages.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write((body or "").encode())

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    pages["port"] = str(server.server_address[1])
    yield pages
    server.shutdown()
    server.server_close()


def test_the_exporters_are_scraped_per_node_and_a_silent_node_is_logged_once(exporter, caplog):
    port = exporter.pop("port")
    exporter["/w1/metrics"] = DCGM_TEXT
    source = DcgmExporterSource(f"http://127.0.0.1:{port}/{{hostname}}/metrics", timeout=5)
    nodes = [swarm.node_info(node_attrs("w1", "127.0.0.1", ("GPU-w1-0", "GPU-w1-1"), A100)),
             swarm.node_info(node_attrs("w2", "127.0.0.1", ("GPU-w2-0",), A100))]

    with caplog.at_level(logging.INFO, logger=swarmgpus.__name__):
        first = source.read(nodes)
        again = source.read(nodes)
        exporter["/w2/metrics"] = DCGM_TEXT.replace("w1-", "w2-")
        back = source.read(nodes)

    assert first == again == swarmgpus.parse_dcgm(DCGM_TEXT)
    assert set(back) == {"GPU-w1-0", "GPU-w1-1", "GPU-w2-0", "GPU-w2-1"}
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"No GPU utilization from node w2 (http://127.0.0.1:{port}/w2/metrics): 404 Client Error")
    assert any(record.getMessage().startswith("GPU utilization from node w2") for record in caplog.records)


def test_free_gpus_of_a_drained_or_paused_node_are_unusable_and_held_ones_stay_held():
    # No new server can get them (an admin drained the node for maintenance): never counted as free.
    drained = node_attrs("w2", "10.0.0.3", ("GPU-w2-0", "GPU-w2-1"), A100)
    paused = node_attrs("w3", "10.0.0.4", ("GPU-w3-0", "GPU-w3-1"), A100)
    drained["Spec"]["Availability"], paused["Spec"]["Availability"] = "drain", "pause"
    nodes = [node_attrs("w1", "10.0.0.2", ("GPU-w1-0",), A100), drained, paused]
    state = swarm.read_swarm(FakeApi(nodes, [task("s1", "ada", "w3", ("GPU-w3-0",), 1)]))

    states = swarmgpus.gpu_states(state, {}, idle_utilization=5.0)

    assert states == {"GPU-w1-0": "free", "GPU-w2-0": "unusable", "GPU-w2-1": "unusable",
                      "GPU-w3-0": "held_busy", "GPU-w3-1": "unusable"}
