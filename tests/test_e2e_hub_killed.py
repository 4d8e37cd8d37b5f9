"""End to end: a hub killed outright (SIGKILL: the OOM killer, ``kill -9``, a crash), not stopped.

Nothing of the hub runs at its end: no exit handler, no notice written then, no build told to
stop, its proxy left running. It must leave what a SIGTERM leaves (test_e2e_failures): running
servers keep running and keep their GPUs when the hub starts again, a start that waited for a
GPU or was building is told so on its owner's next spawn page, and a build cut off mid-way
leaves no build running and builds again on the next start.
"""

from __future__ import annotations

import time

import pytest
from fixtures_hub import FAKE_GPU
from pip_index import HUB_PIP_CONFIG, served_to_hubs
from test_build_faults import WAIT_S, present, traces_of
from test_e2e_failures import Spawn, assert_a_restart_keeps_the_gpu_server, gpus_held, spawn_held_in_pip

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = HUB_PIP_CONFIG + """
c.GpuAllocator.device_mode = "nvidia-runtime"  # no NVIDIA runtime here: the fake GPU travels as an env var
"""


@pytest.fixture(scope="module", autouse=True)
def pip_index():
    with served_to_hubs() as index:
        yield index


async def test_a_killed_hub_keeps_its_servers_and_gpus_and_tells_a_queued_start(hub):
    def restart() -> None:
        hub.kill()
        hub.start()

    await assert_a_restart_keeps_the_gpu_server(hub, ("kill-r", "kill-q", "kill-c"), restart)


def test_a_hub_killed_mid_build_leaves_no_build_running_and_the_next_start_builds(hub, pip_index, docker_daemon):
    gate, environment, spawn = spawn_held_in_pip(hub, pip_index, "kill-b")
    try:
        (key_dir,) = [path.parent for path in (hub.state / "builder" / "builds").glob("*/status.json")
                      if '"building"' in path.read_text()]
        containers, _ = traces_of(key_dir)
        assert containers, key_dir  # the pip step's, at least
        hub.kill()
        # Docker ends the build whose client went away: its pip step's container goes while the
        # index still holds pip's request (so nothing else could have ended it).
        client = docker_daemon.client()
        deadline = time.monotonic() + WAIT_S
        while (left := present(client, containers, [])) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == []
    finally:
        gate.set()
    hub.start()

    page = hub.spawn_page("kill-b")
    assert "was building its environment when the hub restarted, and did not go on: start it again" in page
    again = Spawn(hub, "kill-b", {"profile": "python39", "environment": environment})
    assert again.wait().get("ready"), again.messages
    hub.stop_server("kill-b")


async def test_a_hub_killed_while_a_gpu_server_boots_finds_it_running_with_its_gpu(hub):
    booting = Spawn(hub, "kill-w", {"profile": "gpu-demo"})
    booting.wait_for("Container started; waiting for JupyterLab to answer")
    hub.kill()
    hub.start()

    model = hub.server_once_checked("kill-w")  # it answered meanwhile, to a hub that was down
    assert model is not None and model["ready"], model
    assert gpus_held(hub, "kill-w") == [FAKE_GPU]
    output = await hub.execute("kill-w", "gpu-demo", "import os; print(os.environ['CONDASPAWNER_GPUS'])")
    assert output.strip() == FAKE_GPU
    waiting = Spawn(hub, "kill-x", {"profile": "gpu-demo"})
    waiting.wait_for("Waiting for a GPU: you are next")  # the GPU is still kill-w's
    hub.stop_server("kill-w")
    assert waiting.wait().get("ready"), waiting.messages
    hub.stop_server("kill-x")
