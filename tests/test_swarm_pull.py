"""Which nodes a conda-swarm GPU start has pull its image before it takes a GPU (swarmpull.targets),
judged on swarm states as the manager reports them. tests/test_swarm_spawner.py runs the pulls on
the real swarm."""

from __future__ import annotations

import dataclasses

from jupyterhub_condaspawner import swarmpull
from jupyterhub_condaspawner.swarm import NodeInfo, ServiceRequest, SwarmState

A100, H100 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"


def node(name: str, gpus: int, model: str = A100, state: str = "ready", availability: str = "active",
         labels: tuple[tuple[str, str], ...] = (), cuda: str | None = None) -> NodeInfo:
    return NodeInfo(f"id-{name}", name, "10.0.0.1", state, availability, "worker",
                    tuple(f"GPU-{name}-{index}" for index in range(gpus)), model if gpus else None,
                    4 * 10**9, 8 * 2**30, cuda, attributes=(("node.id", f"id-{name}"), ("node.hostname", name), *labels))


def names(nodes: list[NodeInfo]) -> list[str]:
    return [node.hostname for node in nodes]


def test_only_nodes_that_could_run_the_gpu_server_now_pull_its_image():
    state = SwarmState((node("manager", 0), node("a100-1", 2), node("a100-2", 1), node("h100", 4, H100),
                        node("down", 2, state="down"), node("drained", 2, availability="drain"),
                        node("paused", 2, availability="pause")), ())
    two_a100s = ServiceRequest(gpus=2, gpu_model="*A100*")
    # No node without GPUs, of another model, with too few, or that takes no task now.
    assert names(swarmpull.targets(state, two_a100s, ())) == ["a100-1"]
    assert names(swarmpull.targets(state, ServiceRequest(gpus=1), ())) == ["a100-1", "a100-2", "h100"]


def test_the_admins_constraints_cpu_memory_cuda_and_nodes_left_out_narrow_the_pulls():
    pooled = node("pooled", 2, labels=(("node.labels.pool", "jupyter"),), cuda="12.4")
    other_pool = node("other", 2, labels=(("node.labels.pool", "batch"),), cuda="12.4")
    old_driver = node("old", 2, labels=(("node.labels.pool", "jupyter"),), cuda="11.8")
    small = dataclasses.replace(node("small", 2, labels=(("node.labels.pool", "jupyter"),)), nano_cpus=10**9)
    state = SwarmState((pooled, other_pool, old_driver, small), ())
    request = ServiceRequest(gpus=1, cuda="12.4", cpu_reservation=2.0)
    assert names(swarmpull.targets(state, request, ["node.labels.pool==jupyter"])) == ["pooled"]
    assert swarmpull.targets(state, request, ["node.labels.pool==jupyter"], avoid=["id-pooled"]) == []
    # A constraint the hub cannot judge is Swarm's to apply: the nodes are not narrowed by it.
    assert names(swarmpull.targets(state, request, ["node.labels.pool==jupyter", "engine.labels.x ~= y"])) == \
        ["pooled"]


def test_a_node_seen_pulling_an_image_is_not_asked_again_until_it_turns_out_to_lack_it():
    swarmpull.forget_all()
    image = "registry.example.edu/envs@sha256:" + "0" * 64
    assert not swarmpull.already_pulled(image, "id-a")
    swarmpull._pulled.add((image, "id-a"))  # what a completed pull job records
    assert swarmpull.already_pulled(image, "id-a") and not swarmpull.already_pulled(image, "id-b")
    swarmpull.forget(image, "id-a")  # its server's task could not get the image there
    assert not swarmpull.already_pulled(image, "id-a")


def test_a_failed_pull_is_told_in_the_words_of_a_failed_start():
    assert swarmpull.why_not_pulled("No such image: registry:5000/envs@sha256:00") == \
        "it could not pull the image from the registry"
    assert swarmpull.why_not_pulled("the image had not arrived within 600 s") == \
        "the image had not arrived within 600 s"
    assert swarmpull.why_not_pulled("starting container failed: exec format error") == \
        "starting container failed: exec format error"
