"""End to end on the multi-node bench: a real hub (in the host's namespace) with the conda-swarm spawner.

The hub (fixtures_hub's, with the settings below) listens for its servers' API calls on the
host's address on the swarm's private subnet; it builds on the manager, pushes to the swarm's
registry, Swarm places each server on a worker with a fake GPU, and the hub and its proxy reach
the server at that worker's address. A kernel then runs on each server through the proxy.
"""

from __future__ import annotations

import pytest
from fixtures_hub import metric
from fixtures_swarm import SWARM_HUB_CONFIG
from test_e2e_failures import Spawn, assert_one_clean_line, failure_message
from test_swarm_spawner import wait_until

from jupyterhub_condaspawner.gpus import LABEL_USER

pytestmark = [pytest.mark.swarm, pytest.mark.docker, pytest.mark.usefixtures("swarm_hub_settings")]

HUB_EXTRA_CONFIG = SWARM_HUB_CONFIG + """
c.Spawner.poll_interval = 2  # the hub notices a dead node's servers within seconds
"""
EXTRA_PROFILES = {
    "60-three.yaml": "display_name: Three GPUs\nslug: three\nenvironment: envs/gpu.yml\ngpus: 3\n",
    "61-h100.yaml": 'display_name: H100\nslug: h100\nenvironment: envs/gpu.yml\ngpus: 1\ngpu_model: "*H100*"\n',
}


async def test_four_gpu_servers_run_kernels_through_the_proxy_and_a_fifth_waits_its_turn(hub, swarm_bench):
    users = [f"swarm-{name}" for name in ("ada", "bob", "cy", "dee")]
    spawns = [Spawn(hub, user, {"profile": "gpu-demo"}) for user in users]
    fifth = None
    try:
        for spawn in spawns:
            assert spawn.wait().get("ready"), spawn.messages
        print("\n".join(spawns[0].messages))
        states = [hub.server_model(user)["state"]["condaspawner"] for user in users]
        code = "import os; print(os.environ['CONDASPAWNER_GPUS'], os.uname().nodename, os.environ['CONDASPAWNER_ENV'])"
        outputs = [await hub.execute(user, "gpu-demo", code) for user in users]

        # The four may have waited in the queue too, for a node still pulling their image (swarmpull.py).
        waits_before = metric(hub.metrics(), "condaspawner_gpu_queue_wait_seconds_count", outcome="granted") or 0
        fifth = Spawn(hub, "swarm-eve", {"profile": "gpu-demo"})
        fifth.wait_for("Waiting for a GPU on any node")
        assert hub.server_model("swarm-eve")["pending"] == "spawn"
        # It waits in the hub's GPU queue (no service yet): /hub/metrics counts it, as on one host.
        assert metric(hub.metrics(), "condaspawner_gpu_queue_length") == 1
        assert not swarm_bench.manager_client().services.list(filters={"label": f"{LABEL_USER}=swarm-eve"})
        hub.stop_server(users[0])
        assert fifth.wait().get("ready"), fifth.messages
        fifth_state = hub.server_model("swarm-eve")["state"]["condaspawner"]
        fifth_output = await hub.execute("swarm-eve", "gpu-demo", "import os; print(os.environ['CONDASPAWNER_GPUS'])")
    finally:
        for user in [*users, "swarm-eve"]:
            hub.stop_server(user)

    print(outputs)
    gpus = [state["gpus"][0] for state in states]
    assert len(set(gpus)) == 4 and all(len(state["gpus"]) == 1 for state in states), states
    assert sorted(state["node"] for state in states) == ["worker1", "worker1", "worker2", "worker2"]
    for state, output, spawn in zip(states, outputs, spawns):
        node = state["node"]
        assert state["gpus"][0] in swarm_bench.nodes[node].gpus
        # The kernel runs on that node, in the profile's environment, and sees its GPU.
        assert output.split() == [state["gpus"][0], node, "/opt/conda/envs/gpu-demo"]
        assert f"Running on node {node} with GPU {state['gpus'][0]}" in spawn.messages
    # The fifth got the GPU the first gave back.
    assert (fifth_state["node"], fifth_state["gpus"]) == (states[0]["node"], states[0]["gpus"])
    assert fifth_output.strip() == states[0]["gpus"][0]
    waited = hub.metrics()
    assert metric(waited, "condaspawner_gpu_queue_length") == 0
    assert metric(waited, "condaspawner_gpu_queue_wait_seconds_count", outcome="granted") == waits_before + 1
    assert not swarm_bench.manager_client().services.list(filters={"label": LABEL_USER})


def test_requests_no_node_can_meet_are_refused_at_once_through_rest(hub, swarm_bench):
    for name, text in EXTRA_PROFILES.items():
        (hub.state / "profiles" / name).write_text(text)

    model = Spawn(hub, "swarm-greedy", {"profile": "h100"})
    too_many = Spawn(hub, "swarm-greedy", {"profile": "three"})  # the example's per-user quota is 2

    assert (model.status, too_many.status) == (400, 400), (model.body, too_many.body)
    assert failure_message(hub, model) == (
        "No GPU on this hub fits: 0 of 4 ('h100' needs 1 GPU matching '*H100*'; no node of this hub has that "
        "many of that model: pick another profile or ask the hub admin)")
    assert failure_message(hub, too_many) == (
        "swarm-greedy's server (profile 'three') needs 3 GPUs, more than the per-user quota of 2: "
        "pick a smaller profile")
    for spawn in (model, too_many):
        assert_one_clean_line(failure_message(hub, spawn))
    assert hub.server_model("swarm-greedy") is None
    assert not swarm_bench.manager_client().services.list(filters={"label": LABEL_USER})


async def test_the_hub_notices_a_dead_worker_and_the_respawn_lands_on_the_other(hub, swarm_bench):
    user = "swarm-kate"
    first = Spawn(hub, user, {"profile": "gpu-demo"})
    assert first.wait().get("ready"), first.messages
    victim = hub.server_model(user)["state"]["condaspawner"]["node"]
    other = next(node.name for node in swarm_bench.workers if node.name != victim)
    try:
        swarm_bench.kill_node(victim)
        # The hub's own poll (every 2 s here) finds the server stopped and forgets it.
        wait_until(lambda: hub.server_model(user) is None, "the hub to notice the server is gone", attempts=300,
                   interval=0.2)
        assert not swarm_bench.manager_client().services.list(filters={"label": LABEL_USER})

        again = Spawn(hub, user, {"profile": "gpu-demo"})
        assert again.wait().get("ready"), again.messages
        state = hub.server_model(user)["state"]["condaspawner"]
        output = await hub.execute(user, "gpu-demo", "import os; print(os.uname().nodename)")
    finally:
        hub.stop_server(user)
        swarm_bench.restart_node(victim)
        swarm_bench.wait_for_node_state(victim, "ready")

    assert state["node"] == other and state["gpus"][0] in swarm_bench.nodes[other].gpus
    assert output.strip() == other


async def test_the_hub_restarts_without_losing_its_swarm_servers(hub, swarm_bench):
    user = "swarm-rita"
    spawn = Spawn(hub, user, {"profile": "gpu-demo"})
    assert spawn.wait().get("ready"), spawn.messages
    before = hub.server_model(user)["state"]["condaspawner"]
    try:
        hub.stop()  # cleanup_servers = False: the services stay
        assert len(swarm_bench.manager_client().services.list(filters={"label": LABEL_USER})) == 1
        hub.start()
        model = hub.server_model(user)
        output = await hub.execute(user, "gpu-demo", "import os; print(os.environ['CONDASPAWNER_GPUS'])")
    finally:
        hub.stop_server(user)

    assert model is not None and model["ready"], model
    assert model["state"]["condaspawner"] == before
    assert output.strip() == before["gpus"][0]


async def test_a_killed_hub_finds_its_swarm_servers_running_a_booting_one_too(hub, swarm_bench):
    # SIGKILL, not a stop: one server ready, another's service placed and its JupyterLab booting.
    users = ["swarm-kate", "swarm-kit"]
    ready = Spawn(hub, users[0], {"profile": "gpu-demo"})
    try:
        assert ready.wait().get("ready"), ready.messages
        booting = Spawn(hub, users[1], {"profile": "gpu-demo"})
        booting.wait_for("Running on node ")
        hub.kill()
        hub.start()
        models = [hub.server_once_checked(user) for user in users]
        code = "import os; print(os.environ['CONDASPAWNER_GPUS'])"
        outputs = [await hub.execute(user, "gpu-demo", code) for user in users]
    finally:
        for user in users:
            hub.stop_server(user)

    assert all(model is not None and model["ready"] for model in models), models
    assert all("condaspawner" in model["state"] for model in models), [model["state"] for model in models]
    gpus = [model["state"]["condaspawner"]["gpus"] for model in models]
    assert [output.split() for output in outputs] == gpus and gpus[0] != gpus[1], (outputs, gpus)
    assert not swarm_bench.manager_client().services.list(filters={"label": LABEL_USER})
