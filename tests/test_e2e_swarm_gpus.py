"""End to end on the multi-node bench: the GPU metrics and GPU-aware idle culling of a conda-swarm hub.

Each node runs a stand-in for NVIDIA's dcgm-exporter: a global Swarm service (busybox httpd, host
networking, port 9400 on every node) serving, from a host folder per node, the Prometheus text the
test writes: each fake GPU's utilization. The hub (as in test_e2e_swarm.py, with GPU sampling every
second and a 6-second gpu_idle_timeout) scrapes it as it would scrape dcgm-exporter, reads the
holders from Swarm's tasks, serves the states on /hub/metrics, and stops the server whose GPU idles.
"""

from __future__ import annotations

from pathlib import Path

import docker.types
import pytest
from fixtures_hub import metric
from fixtures_swarm import SWARM_HUB_CONFIG
from test_e2e_envpage import Client
from test_e2e_failures import Spawn
from test_swarm_spawner import wait_until

from condaspawner_bench.swarm import SwarmBench
from jupyterhub_condaspawner.gpus import LABEL_USER

pytestmark = [pytest.mark.swarm, pytest.mark.docker, pytest.mark.usefixtures("swarm_hub_settings")]

EXPORTER_PORT = 9400
EXPORTER = "csw-fake-dcgm"
EXPORTER_FILTER = {"label": f"com.docker.swarm.service.name={EXPORTER}"}
IDLE_TIMEOUT_S = 6
HUB_EXTRA_CONFIG = SWARM_HUB_CONFIG + f"""c.GpuAllocator.gpu_sample_interval = 1
c.CondaSwarmSpawner.gpu_metrics_url = "http://{{address}}:{EXPORTER_PORT}/metrics"
c.CondaSpawner.gpu_idle_timeout = {IDLE_TIMEOUT_S / 60!r}
"""


class FakeExporters:
    """dcgm-exporter stand-ins on every node; ``set`` writes what a node's GPUs report."""

    def __init__(self, bench: SwarmBench, folder: Path):
        self.bench, self.folder = bench, folder

    def set(self, utilization: dict[str, int]) -> None:
        for node in self.bench.workers:
            lines = ["# TYPE DCGM_FI_DEV_GPU_UTIL gauge"]
            lines += [f'DCGM_FI_DEV_GPU_UTIL{{gpu="{index}",UUID="{gpu}",Hostname="{node.name}"}} '
                      f"{utilization.get(gpu, 90)}" for index, gpu in enumerate(node.gpus)]
            for name, mib in (("DCGM_FI_DEV_FB_USED", 1024), ("DCGM_FI_DEV_FB_FREE", 80896)):  # an 80 GB card
                lines += [f"# TYPE {name} gauge"]
                lines += [f'{name}{{gpu="{index}",UUID="{gpu}",Hostname="{node.name}"}} {mib}'
                          for index, gpu in enumerate(node.gpus)]
            page = self.folder / node.name / "metrics"
            page.with_suffix(".new").write_text("\n".join(lines) + "\n")
            page.with_suffix(".new").replace(page)


@pytest.fixture(scope="module")
def exporters(swarm_bench: SwarmBench, tmp_path_factory) -> FakeExporters:
    folder = tmp_path_factory.mktemp("dcgm")
    for node in swarm_bench.workers:
        (folder / node.name).mkdir()
    fake = FakeExporters(swarm_bench, folder)
    fake.set({})
    client = swarm_bench.manager_client()
    service = client.services.create(
        swarm_bench.tiny_image, ["httpd", "-f", "-p", str(EXPORTER_PORT), "-h", "/www"], name=EXPORTER,
        mode=docker.types.ServiceMode("global"), networks=["host"],
        mounts=[docker.types.Mount("/www", f"{folder}/{{{{.Node.Hostname}}}}", type="bind", read_only=True)],
        constraints=["node.role==worker"])
    try:
        for node in swarm_bench.workers:
            wait_until(lambda node=node: node.client().containers.list(ignore_removed=True, filters=EXPORTER_FILTER),
                       f"the fake exporter on {node.name}")
        yield fake
    finally:
        service.remove()
        for node in swarm_bench.workers:
            wait_until(lambda node=node: not node.client().containers.list(ignore_removed=True, all=True, filters=EXPORTER_FILTER),
                       f"the fake exporter on {node.name} to go")


async def test_a_swarm_servers_idle_gpu_shows_on_metrics_and_the_server_is_stopped(hub, swarm_bench, exporters):
    user = "swarm-idler"
    spawn = Spawn(hub, user, {"profile": "gpu-demo"})
    assert spawn.wait().get("ready"), spawn.messages
    state = hub.server_model(user)["state"]["condaspawner"]
    gpu = state["gpus"][0]

    def gpus(**expected: float) -> bool:
        samples = hub.metrics()
        return all(metric(samples, "condaspawner_gpus", state=key) == value for key, value in expected.items())

    # Busy (90% on every GPU): held and busy, several timeouts long, and not stopped.
    wait_until(lambda: gpus(held_busy=1, free=3, held_idle=0), "the held GPU to show busy", interval=0.5)
    idle_before = metric(hub.metrics(), "condaspawner_gpu_idle_seconds_total") or 0
    assert hub.server_model(user) is not None

    # Its node's exporter reports the server's GPU at 0%.
    exporters.set({gpu: 0})
    wait_until(lambda: gpus(held_idle=1, free=3) or hub.server_model(user) is None, "the GPU to show idle",
               interval=0.5)
    wait_until(lambda: hub.server_model(user) is None, "the hub to stop the idle server", interval=0.5)

    samples = hub.metrics()
    assert metric(samples, "condaspawner_culls_total", reason="gpu_idle") == 1
    assert (metric(samples, "condaspawner_gpu_idle_seconds_total") or 0) > idle_before
    wait_until(lambda: gpus(free=4, held_idle=0, held_busy=0), "the freed GPU to show free", interval=0.5)
    assert not swarm_bench.manager_client().services.list(filters={"label": LABEL_USER})
    assert f"Stopping {user}/(default): its GPUs were idle" in hub.log()
    page = hub.spawn_page(user)
    assert "Your server on Fake A100 (CUDA 12.4) was stopped after " in page and "with its GPU idle" in page
    exporters.set({})


def test_the_environments_pages_gpu_map_lists_every_nodes_gpus_and_their_holders(hub, swarm_bench, exporters):
    user = "swarm-mapped"
    spawn = Spawn(hub, user, {"profile": "gpu-demo"})
    assert spawn.wait().get("ready"), spawn.messages
    held = hub.server_model(user)["state"]["condaspawner"]["gpus"][0]
    admin = Client(hub, "admin")
    try:
        def held_row() -> dict | None:
            rows = {row["uuid"]: row for row in admin.get("/admin/gpus")["gpus"]}
            return rows[held] if rows[held]["holders"] and rows[held]["utilization"] is not None else None

        wait_until(held_row, "the held GPU with its holder and reading on the page", interval=0.5)
        view = admin.get("/admin/gpus")
        rows = {row["uuid"]: row for row in view["gpus"]}
        assert set(rows) == {gpu for node in swarm_bench.workers for gpu in node.gpus}
        assert len({row["host"] for row in rows.values()}) == len(swarm_bench.workers)
        row = rows[held]
        assert row["model"] and row["utilization"] == 90 and row["state"] == "held_busy", row
        assert (row["memory_used"], row["memory_total"]) == (1024 * 2**20, 80 * 2**30)
        [holder] = row["holders"]
        assert holder["user"] == user and holder["server"] == "" and holder["running"] and holder["since"]
        assert all(not other["holders"] and other["state"] == "free" for uuid, other in rows.items() if uuid != held)
        assert view["queue"] == []
        status, body, _ = Client(hub, "swarm-nobody").call("GET", "/admin/gpus")
        assert status == 403, body
    finally:
        hub.stop_server(user)
