"""End to end: a GPU server whose stop fails keeps its GPU until its container is seen stopped.

JupyterHub forgets a server whose stop raised, and says nothing (its stop handler swallows the
error), while the container may run on with its GPU. The hub here talks to the bench's daemon
through a gate (tests/gated_daemon.py) that drops one container stop unanswered, as a daemon
failing under a stop would: the GPU must not go to the next user while that container runs.
"""

from __future__ import annotations

import os
import time

import pytest
from fixtures_hub import FAKE_GPU, metric
from gated_daemon import GatedDaemon

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = """
import jupyterhub_condaspawner.spawngpus as _spawngpus
_spawngpus.FAILED_STOP_RECHECK_S = 0.5  # look at the container of a failed stop often
c.GpuAllocator.queue_timeout = 2
c.GpuAllocator.device_mode = "nvidia-runtime"  # no NVIDIA runtime here: the GPU travels as an env var
"""
GATES: list[GatedDaemon] = []


def hub_before_start(hub):
    gate = GatedDaemon(hub.state / "docker.sock", os.environ["DOCKER_HOST"])
    gate.answer_all()  # container listings go through at once: only the stop is dropped
    GATES.append(gate)
    hub.env["DOCKER_HOST"] = gate.url


def start_gpu_server(hub, user: str) -> list[dict]:
    status, body = hub.spawn(user, {"profile": "gpu-demo"})
    assert status in (201, 202), body
    return hub.progress(user)


def test_a_gpu_server_whose_stop_failed_keeps_its_gpu_until_its_container_stops(hub, docker_daemon):
    assert start_gpu_server(hub, "stopfail")[-1].get("ready")
    container = docker_daemon.client().containers.get(hub.server_model("stopfail")["state"]["object_id"])

    GATES[0].stops_to_drop = 1
    hub.stop_server("stopfail")
    assert hub.server_model("stopfail") is None  # JupyterHub forgot the server...
    container.reload()
    assert container.status == "running"  # ...which runs on, with its GPU

    refused = start_gpu_server(hub, "nextinline")[-1]  # never the GPU of stopfail while its container runs
    assert refused.get("failed") and "No GPU is free on this hub: 0 of 1" in refused["message"], refused
    assert metric(hub.metrics(), "condaspawner_gpus", state="free") == 0
    log = hub.log()
    assert "Stopping stopfail failed (" in log and f"so its GPUs ({FAKE_GPU}) stay held until it is seen stopped" in log

    container.stop()  # the admin stops it (or it ends): the hub frees the GPU
    deadline = time.monotonic() + 60
    while metric(hub.metrics(), "condaspawner_gpus", state="free") != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "The container of stopfail has stopped: its GPUs" in hub.log()
    assert start_gpu_server(hub, "nextinline")[-1].get("ready")
    assert hub.server_model("nextinline")["state"]["condaspawner"]["gpus"] == [FAKE_GPU]
    hub.stop_server("nextinline")


def test_a_start_that_fails_after_its_container_started_keeps_the_gpu_while_that_container_runs(hub, docker_daemon):
    # Docker started the container but its answer was lost: the start fails, and JupyterHub stops
    # the server; that stop fails too. The container runs on with the GPU: nobody else gets it.
    assert start_gpu_server(hub, "warmup")[-1].get("ready")  # the image is built: the next start is the server's
    hub.stop_server("warmup")
    gate = GATES[0]
    gate.start_answers_to_drop, gate.stops_to_drop = 1, 1
    failed = start_gpu_server(hub, "lostanswer")[-1]
    assert failed.get("failed"), failed
    assert hub.server_model("lostanswer") is None
    client = docker_daemon.client()
    [container] = client.containers.list(filters={"label": "io.condaspawner.user=lostanswer"})
    assert container.status == "running"

    refused = start_gpu_server(hub, "nextinline")[-1]
    assert refused.get("failed") and "No GPU is free on this hub: 0 of 1" in refused["message"], refused

    container.stop()
    deadline = time.monotonic() + 60
    while metric(hub.metrics(), "condaspawner_gpus", state="free") != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert start_gpu_server(hub, "nextinline")[-1].get("ready")
    hub.stop_server("nextinline")
