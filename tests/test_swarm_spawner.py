"""The conda-swarm spawner on a real multi-node Docker Swarm (tests/fixtures_swarm.py).

CondaSwarmSpawners run in-process with stand-in users (as in test_spawner_failures.py)
and talk to the swarm's manager: the builder builds on the manager from the bench's
base image (seeded into the swarm's registry) and pushes there, the workers pull from
there, Swarm places each server and assigns its fake GPUs. The servers run a stand-in
command (the hub they would call is not running): it records CONDASPAWNER_GPUS and sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import docker.types
import pytest
from fixtures_docker import bench_dir
from jupyterhub.objects import Hub
from stand_in_user import StandInUser
from traitlets.config import Config

from condaspawner_bench.swarm import SwarmBench
from jupyterhub_condaspawner import cli, swarmpull, swarmservice
from jupyterhub_condaspawner.failures import StartFailure
from jupyterhub_condaspawner.gpus import LABEL_GPUS, LABEL_USER
from jupyterhub_condaspawner.hubservices import _services, hub_services
from jupyterhub_condaspawner.swarmspawner import CondaSwarmSpawner

pytestmark = [pytest.mark.swarm, pytest.mark.docker]

GPUS_FILE = "/tmp/condaspawner-gpus"
# Stands in for jupyterhub-singleuser: what the launcher exported, then nothing but waiting.
# written aside and renamed: a reader must never see the file created but not yet written
STAND_IN = ["sh", "-c", f'echo "$CONDASPAWNER_GPUS" > {GPUS_FILE}.new && mv {GPUS_FILE}.new {GPUS_FILE}; '
            "exec sleep 3600", "stand-in"]
PROFILES = {
    "10-cpu.yaml": "display_name: CPU\nslug: cpu\nenvironment: envs/py.yml\ncpu_limit: 0.1\nmem_limit: 256M\n",
    "20-gpu.yaml": ('display_name: One GPU\nslug: gpu\nenvironment: envs/py.yml\ngpus: 1\ngpu_model: "*A100*"\n'
                    'cuda: "12.4"\ncpu_limit: 0.1\nmem_limit: 256M\n'),
    "25-two.yaml": "display_name: Two GPUs\nslug: two\nenvironment: envs/py.yml\ngpus: 2\ncpu_limit: 0.1\n",
    "26-heavy.yaml": ("display_name: Heavy\nslug: heavy\nenvironment: envs/py.yml\ngpus: 1\ncpu_limit: 1.5\n"
                      "mem_limit: 256M\n"),
    "30-three.yaml": "display_name: Three GPUs\nslug: three\nenvironment: envs/py.yml\ngpus: 3\n",
    "40-h100.yaml": 'display_name: H100\nslug: h100\nenvironment: envs/py.yml\ngpus: 1\ngpu_model: "*H100*"\n',
    "50-huge.yaml": "display_name: Huge\nslug: huge\nenvironment: envs/py.yml\ncpu_limit: 64\n",
}
ENVIRONMENT = "channels: [conda-forge]\ndependencies: [python=3.9, cs-alpha]\n"


@pytest.fixture(scope="module")
def swarm_config(swarm_bench: SwarmBench, swarm_base: str, dev_python_channel, tmp_path_factory) -> Config:
    """One hub's config: every spawner made from it shares one builder (a build runs once)."""
    directory = tmp_path_factory.mktemp("swarm-hub")
    profiles = directory / "profiles"
    (profiles / "envs").mkdir(parents=True)
    for name, text in PROFILES.items():
        (profiles / name).write_text(text)
    (profiles / "envs" / "py.yml").write_text(ENVIRONMENT)
    config = Config()
    config.ProfileCatalog.profiles_dir = str(profiles)
    config.Resolver.channel_urls = {"conda-forge": dev_python_channel.url}
    config.Resolver.package_cache_dir = str(bench_dir() / "pkgs")
    config.ImageBuilder.cache_dir = str(directory / "builder")
    config.ImageBuilder.base_image = swarm_base
    config.ImageBuilder.registry = f"{swarm_bench.registry_url}/condaspawner-swarmtest"
    config.ImageBuilder.insecure_registries = [swarm_bench.registry_address]
    config.DockerSpawner.client_kwargs = {"base_url": swarm_bench.manager.docker_host}
    config.Spawner.cmd = STAND_IN
    config.DockerSpawner.volumes = {"csw-test-home-{username}": "/home/jovyan"}
    config.GpuAllocator.gpu_sample_interval = 0
    return config


@pytest.fixture(autouse=True)
def fresh_client(monkeypatch):
    # DockerSpawner caches one API client per class: each test starts without one.
    monkeypatch.setattr(CondaSwarmSpawner, "_client", None)


class Servers:
    """The spawners a test makes; their services are removed after it, whatever happened."""

    def __init__(self, config: Config):
        self.config = config
        self.spawners: list[CondaSwarmSpawner] = []

    def make(self, user: str = "", server: str = "", config: Config | None = None, **traits) -> CondaSwarmSpawner:
        if server:  # a named server's name comes from its database row
            traits["orm_spawner"] = SimpleNamespace(name=server, server=None, user_options=None)
        spawner = CondaSwarmSpawner(user=StandInUser(user or f"u{uuid.uuid4().hex[:6]}"), hub=Hub(),
                                    config=config or self.config, **traits)
        self.spawners.append(spawner)
        return spawner

    async def start(self, spawner: CondaSwarmSpawner, profile: str = "gpu") -> tuple[str, int]:
        spawner.apply_choice({"profile": profile})
        return await spawner.start()


@pytest.fixture
def servers(swarm_config: Config, swarm_bench: SwarmBench) -> Iterator[Servers]:
    made = Servers(swarm_config)
    yield made
    client = swarm_bench.manager_client()
    for service in client.services.list(filters={"label": LABEL_USER}):
        service.remove()
    for node in swarm_bench.nodes.values():
        if node.answers():
            wait_until(lambda node=node: not node.client().containers.list(ignore_removed=True), f"{node.name}'s servers to stop")


def wait_until(predicate, what: str, attempts: int = 300, interval: float = 0.1):
    """Poll ``predicate`` (a bounded number of times: no assertion on how long it takes)."""
    for _ in range(attempts):
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{what}: not after {attempts} tries")


def task_of(bench: SwarmBench, spawner: CondaSwarmSpawner) -> dict:
    tasks = bench.manager_client().api.tasks(filters={"service": spawner.object_id})
    return max(tasks, key=lambda task: task["CreatedAt"])


def exported_gpus(bench: SwarmBench, spawner: CondaSwarmSpawner) -> str:
    """What CONDASPAWNER_GPUS said inside the server's container, on its node."""
    task = task_of(bench, spawner)
    node = bench.node_for_id(task["NodeID"])
    container = node.client().containers.get(task["Status"]["ContainerStatus"]["ContainerID"])

    def read() -> tuple[str] | None:  # a tuple: an empty CONDASPAWNER_GPUS is an answer too
        result = container.exec_run(["cat", GPUS_FILE])
        return (result.output.decode().strip(),) if result.exit_code == 0 else None

    return wait_until(read, "the stand-in server to write its GPUs")[0]


def gpus_of(task: dict) -> list[str]:
    """The GPU ids of a server's task: Swarm's assignment, or the hub's (gpu_assignment "hub")."""
    if task.get("GenericResources"):
        return [item["NamedResourceSpec"]["Value"] for item in task["GenericResources"]]
    labels = task["Spec"]["ContainerSpec"].get("Labels") or {}
    return [gpu for gpu in labels.get(LABEL_GPUS, "").split(",") if gpu]


def assigned(bench: SwarmBench, spawner: CondaSwarmSpawner) -> tuple[str, str]:
    """(node name, GPU id) the server's task was given."""
    task = task_of(bench, spawner)
    gpus = gpus_of(task)
    assert len(gpus) == 1, task
    return bench.node_for_id(task["NodeID"]).name, gpus[0]


def swarm_assigned(config: Config) -> Config:
    """The config with Swarm's scheduler picking the GPUs (a generic-resource reservation)."""
    config = copy.deepcopy(config)
    config.CondaSwarmSpawner.gpu_assignment = "swarm"
    return config


def without_pulls_first(config: Config) -> Config:
    """The config with no pulls before the GPU (prepull_timeout 0): the node given the server pulls."""
    config = copy.deepcopy(config)
    config.CondaSwarmSpawner.prepull_timeout = 0
    return config


async def progress_messages(spawner: CondaSwarmSpawner) -> list[str]:
    return [event["message"] async for event in spawner.progress()]


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("assignment", ["hub", "swarm"])
async def test_two_gpu_servers_run_on_workers_with_distinct_gpus(swarm_bench, servers, swarm_config, assignment):
    config = swarm_assigned(swarm_config) if assignment == "swarm" else swarm_config
    alice, bob = servers.make("alice", config=config), servers.make("bob", config=config)

    (alice_ip, alice_port), (bob_ip, bob_port) = await asyncio.gather(servers.start(alice), servers.start(bob))

    placed = [assigned(swarm_bench, alice), assigned(swarm_bench, bob)]
    print("placed:", placed, (alice_ip, alice_port), (bob_ip, bob_port))
    assert placed[0][1] != placed[1][1], "two servers must never share a GPU"
    for spawner, ip, (node, gpu) in ((alice, alice_ip, placed[0]), (bob, bob_ip, placed[1])):
        assert node in {"worker1", "worker2"} and gpu in swarm_bench.nodes[node].gpus
        assert ip == swarm_bench.nodes[node].address  # the hub reaches the server at its node's address
        assert exported_gpus(swarm_bench, spawner) == gpu  # CONDASPAWNER_GPUS in the container
        service = swarm_bench.manager_client().api.inspect_service(spawner.object_id)
        spec = service["Spec"]["TaskTemplate"]
        assert spec["ContainerSpec"]["Image"].startswith(f"{swarm_bench.registry_url}/condaspawner-swarmtest:")
        assert "@sha256:" in spec["ContainerSpec"]["Image"]  # pinned: every node runs the same image
        assert spec["ContainerSpec"]["CapabilityDrop"] == ["ALL"]
        assert spec["ContainerSpec"]["Mounts"] == [  # a named volume on the node, not a bind of a relative path
            {"Type": "volume", "Source": f"csw-test-home-{spawner.user.name}", "Target": "/home/jovyan",
             "VolumeOptions": {"Labels": {LABEL_USER: spawner.user.name}}}]
        assert spec["RestartPolicy"]["Condition"] == "none"  # an ended server stays ended: the hub notices
        model = "node.labels.nvidia.gpu.product==NVIDIA A100-SXM4-80GB"
        node_id = swarm_bench.nodes[node].node_id
        if assignment == "swarm":  # Swarm's scheduler picks the node and the GPU
            assert spec["Resources"]["Reservations"]["GenericResources"] == [
                {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}]
            # plus, at most, a node still pulling the image for the other server: Swarm picks among the rest
            others = {f"node.id!={other.node_id}" for other in swarm_bench.nodes.values() if other.node_id != node_id}
            assert model in spec["Placement"]["Constraints"]
            assert set(spec["Placement"]["Constraints"]) - {model} <= others, spec["Placement"]["Constraints"]
        else:  # the hub did: the service is pinned to the node and names the GPU as Swarm would
            assert "GenericResources" not in spec["Resources"]["Reservations"]
            assert sorted(spec["Placement"]["Constraints"]) == sorted([model, f"node.id=={node_id}"])
            assert f"DOCKER_RESOURCE_NVIDIA-GPU={gpu}" in spec["ContainerSpec"]["Env"]
            assert spec["ContainerSpec"]["Labels"][LABEL_GPUS] == gpu
        assert spec["Resources"]["Limits"]["NanoCPUs"] == spec["Resources"]["Reservations"]["NanoCPUs"] == 10**8
        assert spec["Resources"]["Limits"]["MemoryBytes"] == 256 * 2**20
        assert spec["ContainerSpec"]["Labels"][LABEL_USER] == spawner.user.name
        assert await spawner.poll() is None
    assert alice_port != bob_port
    messages = await progress_messages(alice)
    assert any(message.startswith("Running on node worker") for message in messages), messages

    await alice.stop()
    assert await alice.poll() == 0
    assert not swarm_bench.manager_client().api.services(filters={"name": alice.object_name})


async def test_requests_no_node_could_ever_meet_are_refused_at_once(swarm_bench, servers):
    spawner = servers.make("greedy")

    refusals = {}
    for profile in ("three", "h100", "huge"):
        with pytest.raises(StartFailure) as refusal:  # REST: JupyterHub applies the options first
            await spawner._run_apply_user_options({"profile": profile})
        refusals[profile] = refusal.value
    await spawner.render_options_form()  # the form, as the user sees it before submitting
    with pytest.raises(ValueError) as form:  # the form says the same, in one line
        await spawner.options_from_form_data({"profile": ["three"]})

    print("\n".join(failure.message for failure in refusals.values()))
    assert all(failure.status_code == 400 and "\n" not in failure.message for failure in refusals.values())
    assert refusals["three"].message == (
        "No GPU on this hub fits: 0 of 4 ('three' needs 3 GPUs; no node of this hub has that many: "
        "pick another profile or ask the hub admin)")
    assert refusals["h100"].message.startswith("No GPU on this hub fits: 0 of 4 ('h100' needs 1 GPU matching "
                                               "'*H100*'; no node of this hub has that many of that model")
    assert "models: NVIDIA A100-SXM4-80GB" in refusals["h100"].log_message  # the admin learns which models exist
    assert refusals["huge"].message.startswith("No node of this hub can run this server ('huge' needs 64 CPUs")
    assert str(form.value) == refusals["three"].message
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})  # nothing created


async def test_requests_past_the_swarms_gpus_wait_in_the_hubs_queue_and_start_first_come_first_served(
        swarm_bench, servers, tmp_path, capsys):
    holders = [servers.make(f"holder{number}") for number in range(4)]
    await asyncio.gather(*(servers.start(spawner) for spawner in holders))
    placed = [assigned(swarm_bench, spawner) for spawner in holders]
    assert len({gpu for _, gpu in placed}) == 4, placed
    assert sorted(node for node, _ in placed) == ["worker1", "worker1", "worker2", "worker2"]

    fifth, sixth = servers.make("fifth"), servers.make("sixth")
    fifth_start = asyncio.ensure_future(servers.start(fifth))
    fifth_waits = await asyncio.wait_for(until_waiting_for(fifth, "Waiting for a GPU on any node"), 120)
    sixth_start = asyncio.ensure_future(servers.start(sixth))
    sixth_waits = await asyncio.wait_for(until_waiting_for(sixth, "Waiting for a GPU on any node"), 120)
    assert fifth_waits == "Waiting for a GPU on any node: 4 of 4 GPUs are held; you are next"
    assert sixth_waits == "Waiting for a GPU on any node: 4 of 4 GPUs are held; 1 ahead of you"
    assert not fifth_start.done()
    # They wait in the hub, not in Swarm: no service yet, whose task Swarm could place out of turn.
    client = swarm_bench.manager_client()
    assert not client.api.services(filters={"name": fifth.object_name})
    assert [(entry["user"], entry["position"], entry["profile"]) for entry in hub_services(fifth).queue.waiting()] \
        == [("fifth", 0, "gpu"), ("sixth", 1, "gpu")]
    # `condaspawner gpus` with the hub's config: the swarm's view, per node, from the manager.
    config_file = tmp_path / "jupyterhub_config.py"
    config_file.write_text(f'c.JupyterHub.spawner_class = "conda-swarm"\n'
                           f'c.DockerSpawner.client_kwargs = {{"base_url": {swarm_bench.manager.docker_host!r}}}\n')
    capsys.readouterr()
    assert cli.main(["gpus", "--config", str(config_file)]) == 0
    table = capsys.readouterr().out
    print(table)
    for (node, gpu), spawner in zip(placed, holders):
        row = next(line for line in table.splitlines() if gpu in line)
        assert row.split()[:2] == [node, swarm_bench.nodes[node].address] and spawner.user.name in row.split()
    assert "3 nodes, 4 GPUs, 4 held" in table

    await holders[0].stop()  # the first in line gets the freed GPU, the second moves up
    await asyncio.wait_for(fifth_start, 120)
    assert assigned(swarm_bench, fifth) == placed[0]
    assert exported_gpus(swarm_bench, fifth) == placed[0][1]
    await asyncio.wait_for(until_message(sixth, lambda message: message.endswith("held; you are next")), 60)
    assert not sixth_start.done()

    await holders[1].stop()
    await asyncio.wait_for(sixth_start, 120)
    assert assigned(swarm_bench, sixth) == placed[1]


async def test_waiting_ends_at_start_timeout_with_one_line_and_no_service(swarm_bench, servers):
    holders = [servers.make(f"full{number}") for number in range(4)]
    await asyncio.gather(*(servers.start(spawner) for spawner in holders))
    # 10 s for Swarm at the end (start_margin) and 30 s to create and start the service: it waits 5 s at most.
    late = servers.make("late", start_timeout=45, start_margin=10)

    with pytest.raises(StartFailure) as failure:
        await servers.start(late)

    assert failure.value.status_code == 503
    message = failure.value.message
    assert message.startswith("No GPU is free on this hub: 0 of 4 ('gpu' needs 1 GPU matching '*A100*'; try again "
                              "when a server stops) after waiting "), message
    assert message.endswith(" s in the queue (Spawner.start_timeout)"), message
    assert not swarm_bench.manager_client().api.services(filters={"name": late.object_name})


async def test_the_per_user_quota_counts_the_users_servers_in_swarms_tasks(swarm_bench, servers, swarm_config):
    config = copy.deepcopy(swarm_config)
    config.GpuAllocator.per_user_gpu_quota = 1
    first = servers.make("quota-user", config=config)
    await servers.start(first)

    # A new hub process (new services, nothing in memory) knows from Swarm's tasks what the user holds.
    again = copy.deepcopy(config)
    second = servers.make("quota-user", server="second", config=again)
    swarmpull.forget_all()  # the nodes would be asked to pull again: a start over the quota asks none
    with pytest.raises(StartFailure) as refusal:
        await servers.start(second)
    told = await progress_messages(second)
    assert any(message.startswith("Looking up the image") for message in told), told
    assert not [message for message in told if "Pull" in message], told
    with pytest.raises(StartFailure) as too_big:
        servers.make("quota-user", server="big", config=again).apply_choice({"profile": "three"})

    assert (refusal.value.status_code, refusal.value.reason) == (429, "quota")
    assert refusal.value.message == ("quota-user's server 'second' (profile 'gpu') needs 1 GPU, but quota-user "
                                     "already holds 1 of their quota of 1: stop another server first")
    assert too_big.value.status_code == 400 and "more than the per-user quota of 1" in too_big.value.message
    assert id(again) in _services and id(config) in _services
    other = servers.make("someone-else", config=again)
    await servers.start(other)  # the quota is per user


async def test_two_servers_of_one_user_started_at_once_share_a_quota_of_one(servers, swarm_config):
    # The second service is checked just after the first is created, before Swarm has made its task.
    config = copy.deepcopy(swarm_config)
    config.GpuAllocator.per_user_gpu_quota = 1
    starts = [servers.start(servers.make("race-user", server=name, config=config)) for name in ("one", "two")]
    results = await asyncio.gather(*starts, return_exceptions=True)

    refused = [result for result in results if isinstance(result, StartFailure)]
    assert len(refused) == 1 and refused[0].reason == "quota", results
    assert "already holds 1 of their quota of 1: stop another server first" in refused[0].message


async def test_a_killed_workers_server_is_reported_stopped_and_respawns_on_the_other(swarm_bench, servers):
    spawner = servers.make("survivor", gpu_idle_timeout=30)
    await servers.start(spawner)
    culler = hub_services(spawner).culler
    assert ("survivor", "") in culler.watched()  # its GPU is watched for idleness
    victim, _ = assigned(swarm_bench, spawner)
    other = next(node.name for node in swarm_bench.workers if node.name != victim)
    try:
        swarm_bench.kill_node(victim)
        swarm_bench.wait_for_node_state(victim, "down")

        async def stopped():
            for _ in range(300):
                status = await spawner.poll()
                if status is not None:
                    return status
                await asyncio.sleep(0.1)
            pytest.fail("poll never reported the server stopped")

        status = await stopped()
        print("poll:", status)
        assert isinstance(status, str) and status
        # Gone with it: the hub calls stop() only for servers poll says are running.
        assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})
        assert ("survivor", "") not in culler.watched()  # nothing left to cull
        notice = hub_services(spawner).notices.take("survivor", "")  # the user's next spawn page
        assert notice == f"Your server on One GPU stopped: node {victim} is down (start it again: Swarm picks a node that is up)"
        assert await spawner.poll() == 0
        spawner.clear_state()  # what the hub does then

        ip, _ = await servers.start(spawner)
        assert assigned(swarm_bench, spawner)[0] == other
        assert ip == swarm_bench.nodes[other].address
    finally:
        swarm_bench.restart_node(victim)
        swarm_bench.wait_for_node_state(victim, "ready")


async def test_a_node_update_ends_gpu_servers_only_where_swarm_assigned_their_gpus(swarm_bench, servers,
                                                                                  swarm_config):
    # Docker Swarm (20.10 here) ends every task holding a named generic resource when its node is
    # updated, even by a label. With gpu_assignment "swarm" the user learns why; with "hub" (the
    # default) the task holds no generic resource and the server runs on.
    pinned = servers.make("pinned")
    relabelled = servers.make("relabelled", config=swarm_assigned(swarm_config))
    await asyncio.gather(servers.start(pinned), servers.start(relabelled))
    client = swarm_bench.manager_client()
    nodes = {assigned(swarm_bench, spawner)[0] for spawner in (pinned, relabelled)}
    for node_name in nodes:
        node = client.nodes.get(swarm_bench.nodes[node_name].node_id)
        spec = node.attrs["Spec"]
        node.update({**spec, "Labels": {**spec.get("Labels", {}), "io.condaspawner.test": "relabel"}})
    try:
        for _ in range(300):
            status = await relabelled.poll()
            if status is not None:
                break
            await asyncio.sleep(0.1)
        assert status is not None and "assigned node no longer meets constraints" in status
        notice = hub_services(relabelled).notices.take("relabelled", "")
        assert notice is not None and notice.startswith("Your server on One GPU was stopped by Docker Swarm when node ")
        assert notice.endswith(" was updated (Swarm ends GPU servers on any update of their node): start it again")
        # By now Swarm has re-checked both nodes' tasks: the hub-assigned server was left running.
        assert await pinned.poll() is None
        assert task_of(swarm_bench, pinned)["Status"]["State"] == "running"
    finally:
        for node_name in nodes:
            node = client.nodes.get(swarm_bench.nodes[node_name].node_id)
            spec = node.attrs["Spec"]
            spec["Labels"].pop("io.condaspawner.test", None)
            node.update(spec)


async def test_users_with_names_too_long_for_a_service_name_get_one_server_each(swarm_bench, servers):
    # Escaped, these e-mail addresses make 71-character service names; Swarm takes 63.
    names = ["maria.gonzalez-fernandez@physics.example-university.edu",
             "maria.gonzalez-fernandez@physics.example-university.ed"]
    spawners = [servers.make(name) for name in names]
    assert [len(spawner.service_name) for spawner in spawners] == [63, 63]
    assert len({spawner.service_name for spawner in spawners}) == 2
    for spawner in spawners:
        await servers.start(spawner, profile="cpu")
    running = swarm_bench.manager_client().services.list(filters={"label": LABEL_USER})
    assert sorted(service.name for service in running) == sorted(spawner.service_name for spawner in spawners)


async def test_a_node_that_cannot_pull_is_left_for_another_and_the_start_goes_on(swarm_bench, servers,
                                                                                 swarm_config):
    # Without pulls first, the node given the server finds it cannot pull (test_..._before_any_gpu_is_taken:
    # with them).
    blocked, other = (node.name for node in swarm_bench.workers)
    # This start must pull there, and cannot; Swarm's only choice at first: the node that cannot pull.
    with cut_off_from_the_registry(swarm_bench, blocked), paused(swarm_bench, other):
        spawner = servers.make("puller", config=without_pulls_first(swarm_config))
        start = asyncio.ensure_future(servers.start(spawner))
        told = await asyncio.wait_for(until_waiting_for(spawner, f"Node {blocked} could not start"), 300)
        set_availability(swarm_bench, other, "active")
        await asyncio.wait_for(start, 300)
    assert told == f"Node {blocked} could not start your server (it could not pull the image from the registry): " \
                   "trying another node"
    assert assigned(swarm_bench, spawner)[0] == other
    assert len(swarm_bench.manager_client().services.list(filters={"label": LABEL_USER})) == 1  # none left over


async def test_a_stop_while_the_start_waits_for_another_nodes_gpus_ends_it_with_no_service(swarm_bench, servers,
                                                                                         swarm_config):
    # The hub picked a node that cannot pull; the start waits for another node's GPUs (the other is
    # paused) with no service of its own, so stop() has none to remove: the start must still end.
    blocked, other = (node.name for node in swarm_bench.workers)
    with cut_off_from_the_registry(swarm_bench, blocked), paused(swarm_bench, other):
        spawner = servers.make("changed-mind", config=without_pulls_first(swarm_config))
        start = asyncio.ensure_future(servers.start(spawner))
        await asyncio.wait_for(until_waiting_for(spawner, f"Node {blocked} could not start"), 300)
        await spawner.stop()  # the user gives up
        set_availability(swarm_bench, other, "active")  # GPUs free there now
        with pytest.raises(StartFailure) as failure:
            await asyncio.wait_for(start, 300)
    assert failure.value.message == "The start was cancelled while it waited for a GPU or a node"
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})


async def test_a_start_pinned_to_a_node_drained_before_swarm_placed_it_goes_to_another(swarm_bench, servers,
                                                                                       swarm_base):
    # The hub pins 'heavy' (1.5 of a worker's 2 CPUs) to the only active worker, where a service not
    # the hub's reserves the CPUs: it waits in Swarm. That node is drained: the start goes elsewhere.
    pinned, other = (node.name for node in swarm_bench.workers)
    set_availability(swarm_bench, other, "pause")
    try:
        with cpu_blocked(swarm_bench, swarm_base, pinned):
            spawner = servers.make("drained-under")
            start = asyncio.ensure_future(servers.start(spawner, "heavy"))
            await asyncio.wait_for(until_waiting_for(spawner, "Waiting for CPU"), 300)
            set_availability(swarm_bench, other, "active")
            set_availability(swarm_bench, pinned, "drain")
            told = await asyncio.wait_for(until_waiting_for(spawner, f"Node {pinned} could not start"), 300)
            await asyncio.wait_for(start, 300)
    finally:
        set_availability(swarm_bench, other, "active")
        set_availability(swarm_bench, pinned, "active")
    assert told == f"Node {pinned} could not start your server (an admin drained it): trying another node"
    assert assigned(swarm_bench, spawner)[0] == other


async def test_a_stopped_servers_gpu_stays_held_while_its_container_shuts_down(swarm_bench, servers, monkeypatch):
    # The stand-in (PID 1) ignores SIGTERM: with a long grace period its container runs on, GPU and
    # all, after its service was removed. The hub must not hand that GPU out meanwhile.
    monkeypatch.setattr(swarmservice, "STOP_GRACE_NS", 600 * 10**9)
    spawner = servers.make("slow-to-stop")
    await servers.start(spawner)
    node, gpu = assigned(swarm_bench, spawner)
    container = task_of(swarm_bench, spawner)["Status"]["ContainerStatus"]["ContainerID"]
    await spawner.stop()
    try:
        holder = spawner.read_swarm().holders().get(gpu)
    finally:
        swarm_bench.nodes[node].client().containers.get(container).kill()
    assert holder is not None and holder.user == "slow-to-stop"


def remove_pulled_images(bench: SwarmBench, name: str) -> None:
    """The node loses the environment images earlier tests pulled (behind the hub's back: it forgets
    which nodes it saw pull them)."""
    client = bench.nodes[name].client()
    for image in client.images.list():
        if any("condaspawner-swarmtest" in digest for digest in image.attrs.get("RepoDigests") or []):
            client.images.remove(image.id, force=True)
    swarmpull.forget_all()


@contextlib.contextmanager
def cut_off_from_the_registry(bench: SwarmBench, *names: str, answered: bool = True) -> Iterator[None]:
    """Within the block, the nodes have lost the images earlier tests pulled and cannot reach the
    registry (refused, or, not ``answered``, their packets dropped: a pull that hangs)."""
    host, port = bench.registry_address.rsplit(":", 1)
    action = ["REJECT", "--reject-with", "tcp-reset"] if answered else ["DROP"]
    rule = ["OUTPUT", "-p", "tcp", "-d", host, "--dport", port, "-j", *action]
    cut: list[str] = []
    try:
        for name in names:
            remove_pulled_images(bench, name)
            subprocess.run(bench.nsenter(name, "iptables", "-A", *rule), check=True)
            cut.append(name)
        yield
    finally:
        for name in cut:
            subprocess.run(bench.nsenter(name, "iptables", "-D", *rule), check=True)


@contextlib.contextmanager
def paused(bench: SwarmBench, name: str) -> Iterator[None]:
    """Within the block, the node takes no new task (unless the test makes it active again)."""
    set_availability(bench, name, "pause")
    try:
        yield
    finally:
        set_availability(bench, name, "active")


@contextlib.contextmanager
def cpu_blocked(bench: SwarmBench, image: str, name: str) -> Iterator[None]:
    """Within the block, a service not the hub's reserves 1.5 of the node's 2 CPUs ('heavy' asks as much)."""
    blocker = bench.manager_client().services.create(image, ["sleep", "3600"],
                                                     name=f"cpu-blocker-{uuid.uuid4().hex[:6]}",
                                                     constraints=[f"node.hostname=={name}"],
                                                     resources=docker.types.Resources(cpu_reservation=int(1.5e9)))
    try:
        wait_until(lambda: any(task.get("NodeID") for task in blocker.tasks()), "the blocker to be placed")
        yield
    finally:
        blocker.remove()


def set_availability(bench: SwarmBench, name: str, availability: str) -> None:
    node = bench.manager_client().nodes.get(bench.nodes[name].node_id)
    node.update({**node.attrs["Spec"], "Availability": availability})


async def test_the_form_notes_profiles_no_node_could_serve(servers):
    spawner = servers.make("form")

    html = await spawner.render_options_form()

    note = '<span class="text-danger">no node has more than 2 GPU(s)</span>'  # 'three' (3 GPUs); nodes have 2 each
    assert html.count(note) == 1 and html.count('text-danger">no node has more than') == 1
    assert html.count('<span class="text-danger">no node has a H100</span>') == 1  # the start would refuse it too
    assert html.count("cannot start here</span>") == 2  # their badges, not "will build"

    config = copy.deepcopy(servers.config)
    config.GpuAllocator.per_user_gpu_quota = 1
    html = await servers.make("form", config=config).render_options_form()
    assert html.count('<span class="text-danger">more than the 1-GPU quota per user</span>') == 1  # 'two'
    assert html.count("cannot start here</span>") == 3


async def test_a_swarm_spawner_without_a_registry_says_so(swarm_config, servers):
    config = copy.deepcopy(swarm_config)
    config.ImageBuilder.registry = ""
    spawner = servers.make("noreg", config=config)

    with pytest.raises(StartFailure) as failure:
        await servers.start(spawner, profile="cpu")

    assert failure.value.status_code == 500
    assert failure.value.message == (
        "The hub's image settings do not fit together: servers run on several nodes, which pull their images "
        "from a registry (set ImageBuilder.registry); tell the hub admin")


async def test_a_restarted_hub_finds_its_server_through_the_saved_state(swarm_bench, servers, swarm_config):
    before = servers.make("restarts")
    await servers.start(before)
    saved = before.get_state()
    node, gpu = assigned(swarm_bench, before)

    # Another hub process: new shared services, a new spawner given only the database's state.
    after = servers.make("restarts", config=copy.deepcopy(swarm_config))
    after.load_state(saved)

    assert saved["condaspawner"]["gpus"] == [gpu] and saved["condaspawner"]["node"] == node
    assert await after.poll() is None
    assert await after.get_ip_and_port() == (swarm_bench.nodes[node].address, before.port)
    await after.stop()
    assert await after.poll() == 0
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})


async def test_a_server_whose_start_the_hub_never_recorded_is_adopted_from_its_service(swarm_bench, servers,
                                                                                        swarm_config):
    config = copy.deepcopy(swarm_config)
    config.CondaSpawner.gpu_idle_timeout = 30
    before = servers.make("unrecorded", config=config)
    await servers.start(before)
    saved = before.get_state()["condaspawner"]
    node, gpu = assigned(swarm_bench, before)

    # The hub was killed after Swarm ran the task, before JupyterHub saved the state: another hub
    # process has the user's options (saved when the start began) and no state of this server.
    after = servers.make("unrecorded", config=copy.deepcopy(config))
    after.user_options = dict(before.user_options)
    after.load_state({})
    assert "condaspawner" not in after.get_state()
    assert await after.poll() is None

    adopted = after.get_state()["condaspawner"]
    assert adopted == {**saved, "image_id": ""}, (adopted, saved)  # the manager holds no image id
    assert (adopted["gpus"], adopted["node"]) == ([gpu], node)
    assert after.services.culler.watched() == {("unrecorded", ""): 30 * 60}  # its GPU is watched for idleness
    assert await after.get_ip_and_port() == (swarm_bench.nodes[node].address, before.port)

    # A user of that name created again (another identity) adopts nothing of it.
    other = servers.make("unrecorded", config=copy.deepcopy(config))
    other.user.created = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    other.load_state({})
    assert await other.poll() is None
    assert "condaspawner" not in other.get_state()
    await after.stop()
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})


async def test_a_registry_that_cannot_be_reached_fails_the_spawn_in_one_line(swarm_bench, servers, swarm_config):
    config = copy.deepcopy(swarm_config)
    nowhere = f"{swarm_bench.manager.address}:5999"  # nothing listens there
    config.ImageBuilder.registry = f"{nowhere}/condaspawner-swarmtest"
    config.ImageBuilder.insecure_registries = [nowhere]
    spawner = servers.make("noregistry", config=config)

    with pytest.raises(StartFailure) as failure:
        await servers.start(spawner)

    assert (failure.value.status_code, failure.value.reason) == (503, "registry")
    assert failure.value.message == (f"The image registry is unavailable: the registry {nowhere} cannot be reached "
                                     "(connection refused); try again in a minute, or tell the hub admin if it keeps "
                                     "failing")
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})


async def test_a_cpu_server_runs_on_any_node_without_gpus(swarm_bench, servers):
    spawner = servers.make("cpu-only")

    ip, _ = await servers.start(spawner, profile="cpu")

    task = task_of(swarm_bench, spawner)
    assert ip == swarm_bench.node_for_id(task["NodeID"]).address
    assert not task.get("GenericResources")
    assert exported_gpus(swarm_bench, spawner) == ""  # CONDASPAWNER_GPUS is there, and empty
    spec = swarm_bench.manager_client().api.inspect_service(spawner.object_id)["Spec"]["TaskTemplate"]
    assert "GenericResources" not in spec["Resources"]["Reservations"]
    assert not spec.get("Placement", {}).get("Constraints")
    # No GPU task: the NVIDIA runtime reads NVIDIA_VISIBLE_DEVICES, "void" over an image's "all".
    assert "NVIDIA_VISIBLE_DEVICES=void" in spec["ContainerSpec"]["Env"]


async def test_a_two_gpu_server_gets_two_ids_of_one_node_in_condaspawner_gpus(swarm_bench, servers):
    spawner = servers.make("pair")

    await servers.start(spawner, profile="two")

    task = task_of(swarm_bench, spawner)
    gpus = gpus_of(task)
    node = swarm_bench.node_for_id(task["NodeID"])
    assert len(gpus) == 2 and set(gpus) == set(node.gpus)
    assert sorted(exported_gpus(swarm_bench, spawner).split(",")) == sorted(gpus)
    assert sorted(spawner.get_state()["condaspawner"]["gpus"]) == sorted(gpus)
    spec = swarm_bench.manager_client().api.inspect_service(spawner.object_id)["Spec"]["TaskTemplate"]
    assert not any(env.startswith("NVIDIA_VISIBLE_DEVICES=") for env in spec["ContainerSpec"]["Env"])  # Swarm's ids


async def test_a_build_host_that_is_down_fails_the_spawn_in_one_line(swarm_bench, servers, swarm_config, tmp_path):
    config = copy.deepcopy(swarm_config)
    config.ImageBuilder.docker_host = f"unix://{tmp_path}/build-host-is-down.sock"
    spawner = servers.make("nobuild", config=config)

    with pytest.raises(StartFailure) as failure:
        await servers.start(spawner)

    print(failure.value.message, "|", failure.value.log_message)
    assert (failure.value.status_code, failure.value.reason) == (503, "docker-unreachable")
    assert failure.value.message == "The Docker daemon cannot be reached: try again in a minute, or tell the hub admin"
    assert "build-host-is-down.sock" in failure.value.log_message  # the admin learns which daemon
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})


async def test_stopping_a_server_that_waits_for_a_gpu_ends_its_start(swarm_bench, servers):
    holders = [servers.make(f"busy{number}") for number in range(4)]
    await asyncio.gather(*(servers.start(spawner) for spawner in holders))
    waiting = servers.make("impatient")
    start = asyncio.ensure_future(servers.start(waiting))

    async def until_waiting() -> None:
        async for event in waiting.progress():
            if event["message"].startswith("Waiting for a GPU on any node"):
                return

    await asyncio.wait_for(until_waiting(), 120)
    await waiting.stop()  # the user stops the pending server
    with pytest.raises(StartFailure) as failure:
        await asyncio.wait_for(start, 60)

    assert failure.value.message == "The start was cancelled while it waited for a GPU"
    assert not swarm_bench.manager_client().api.services(filters={"name": waiting.object_name})


async def test_a_profile_withdrawn_while_its_server_waits_for_a_gpu_is_refused_when_placed(
        swarm_bench, servers, swarm_config, tmp_path):
    """An admin removes the profile (a course ended) while its server waits for a node: when Swarm
    places it, it is removed again and the start refused in one line, as on one host."""
    config = copy.deepcopy(swarm_config)
    profiles = tmp_path / "profiles"
    shutil.copytree(swarm_config.ProfileCatalog.profiles_dir, profiles)
    config.ProfileCatalog.profiles_dir = str(profiles)
    holders = [servers.make(f"taken{number}") for number in range(4)]
    await asyncio.gather(*(servers.start(spawner) for spawner in holders))
    waiting = servers.make("coursework", config=config)
    start = asyncio.ensure_future(servers.start(waiting))

    await asyncio.wait_for(until_waiting_for(waiting, "Waiting for a GPU on any node"), 120)
    (profiles / "20-gpu.yaml").unlink()
    await holders[0].stop()
    with pytest.raises(StartFailure) as failure:
        await asyncio.wait_for(start, 120)

    assert (failure.value.status_code, failure.value.reason) == (403, "access")
    assert failure.value.message == ("Your access to One GPU was withdrawn while you waited for a GPU: choose "
                                     "another profile, or ask the hub admin")
    assert not swarm_bench.manager_client().api.services(filters={"name": waiting.object_name})


async def until_waiting_for(spawner: CondaSwarmSpawner, prefix: str) -> str:
    return await until_message(spawner, lambda message: message.startswith(prefix))


async def until_message(spawner: CondaSwarmSpawner, wanted: Callable[[str], bool]) -> str:
    """The first message on the server's progress page (from its first) that is ``wanted``."""
    async for event in spawner.progress():
        if wanted(event["message"]):
            return event["message"]
    return ""


async def test_a_request_that_lacks_cpu_beside_a_free_gpu_says_so_while_it_waits(swarm_bench, servers):
    # 'heavy' reserves 1.5 of a worker's 2 CPUs: one per worker, though each has two GPUs.
    first, second = servers.make("heavy1"), servers.make("heavy2")
    await asyncio.gather(servers.start(first, "heavy"), servers.start(second, "heavy"))
    assert {assigned(swarm_bench, spawner)[0] for spawner in (first, second)} == {"worker1", "worker2"}
    third = servers.make("heavy3")
    start = asyncio.ensure_future(servers.start(third, "heavy"))

    async def until_waiting() -> str:
        async for event in third.progress():
            if event["message"].startswith("Waiting for CPU"):
                return event["message"]
        return ""

    message = await asyncio.wait_for(until_waiting(), 120)
    assert message == ("Waiting for CPU or memory on a node that fits: 'heavy' needs 1 GPU, 1.5 CPUs, 0.25 GiB of "
                       "memory, and every such node has less free; your server starts when a server there stops")
    freed_node = assigned(swarm_bench, first)[0]
    await first.stop()
    await asyncio.wait_for(start, 120)
    assert assigned(swarm_bench, third)[0] == freed_node
    notices = hub_services(third).notices
    assert notices.take("heavy3", "") is None  # its wait ended: the restart notice was taken back

    fourth = servers.make("heavy4")  # waits as the third did; then the hub stops under it
    waiting = asyncio.ensure_future(servers.start(fourth, "heavy"))
    await asyncio.wait_for(until_waiting_for(fourth, "Waiting for CPU"), 120)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert notices.take("heavy4", "") == ("Your last start of Heavy was waiting for a GPU when the hub restarted, "
                                          "and did not go on: start it again")


def with_default_limits(swarm_config):
    """The swarm config with the admin's default limits: 2 CPUs, 4 GiB."""
    config = copy.deepcopy(swarm_config)
    config.DockerSpawner.cpu_limit = 2
    config.DockerSpawner.mem_limit = "4G"
    return config


def test_the_admins_default_limits_cap_and_a_profiles_own_limits_are_reserved(swarm_config, servers):
    spawner = servers.make("limits", config=with_default_limits(swarm_config))
    catalog = spawner.services.catalog

    three, two = spawner.service_request(catalog.get("three")), spawner.service_request(catalog.get("two"))

    assert (three.cpu_limit, three.mem_limit, three.cpu_reservation, three.mem_reservation) == (2, 4 * 2**30, None, None)
    assert (two.cpu_limit, two.mem_limit, two.cpu_reservation, two.mem_reservation) == (0.1, 4 * 2**30, 0.1, None)


def test_limits_a_pre_spawn_hook_sets_are_kept_where_the_profile_sets_none(swarm_config, servers):
    spawner = servers.make("hooked", config=with_default_limits(swarm_config))
    catalog = spawner.services.catalog
    spawner.apply_choice({"profile": "two"})
    spawner.cpu_limit, spawner.mem_limit = 0.5, "1G"  # as the admin's pre_spawn_hook, after the options

    two = spawner.service_request(catalog.get("two"))

    assert (two.cpu_limit, two.mem_limit) == (0.1, 2**30)  # the profile's CPU, the hook's memory


async def test_a_start_waiting_while_a_gpu_node_is_drained_counts_only_gpus_it_could_get(swarm_bench, servers):
    # An admin drains a GPU node for maintenance (as the README tells before a node update); the
    # other node's GPUs are all held. The drained node's GPUs are neither held nor free for this start.
    drained, open_node = (node.name for node in swarm_bench.workers)
    set_availability(swarm_bench, drained, "drain")
    try:
        holders = [servers.make(f"open{number}") for number in range(2)]
        await asyncio.gather(*(servers.start(spawner) for spawner in holders))
        assert {assigned(swarm_bench, spawner)[0] for spawner in holders} == {open_node}
        late = servers.make("maintenance", start_timeout=45, start_margin=10)  # waits 5 s in the queue at most
        start = asyncio.ensure_future(servers.start(late))
        waiting = await asyncio.wait_for(until_waiting_for(late, "Waiting for a GPU"), 120)
        with pytest.raises(StartFailure) as failure:
            await start
    finally:
        set_availability(swarm_bench, drained, "active")

    print(waiting, "|", failure.value.message)
    assert waiting == ("Waiting for a GPU on any node: 2 of 2 GPUs are held, and 2 more are on nodes that take no "
                       "new servers now (down, drained or paused); you are next")
    assert failure.value.message.startswith(
        "No GPU is free on this hub: 0 of 2 ('gpu' needs 1 GPU matching '*A100*', and 2 more are on nodes that take "
        "no new servers now (down, drained or paused); try again when a server stops) after waiting "), \
        failure.value.message


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
async def test_a_server_whose_node_is_drained_is_reported_stopped_and_its_user_told_why(swarm_bench, servers,
                                                                                      profile):
    node_name = swarm_bench.workers[0].name
    spawner = servers.make(f"drained-{profile}", extra_placement_spec={"constraints": [f"node.hostname=={node_name}"]})
    await servers.start(spawner, profile=profile)
    set_availability(swarm_bench, node_name, "drain")
    try:
        status = None
        for _ in range(300):
            status = await spawner.poll()
            if status is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        set_availability(swarm_bench, node_name, "active")

    notice = hub_services(spawner).notices.take(spawner.user.name, "")
    print("poll:", status, "| notice:", notice)
    assert isinstance(status, str) and status
    assert not swarm_bench.manager_client().api.services(filters={"name": spawner.object_name})
    what = "cpu" if profile == "cpu" else "One GPU"  # GPU servers keep their profile's display name
    assert notice == (f"Your server on {what} stopped: an admin drained node {node_name} (start it again: Swarm "
                      "picks a node that takes servers)")


async def test_an_admins_placement_constraints_add_to_the_profiles_gpu_model(swarm_bench, servers):
    # A site keeps servers on its worker pool with SwarmSpawner's extra_placement_spec; the profile's
    # GPU model (and CUDA) constraints must stay, or a "*A100*" server could land on any GPU node.
    # Its labels likewise: without the user's label, Swarm's tasks would name no holder for the GPU.
    # Its environment and mounts too: without the hub's, the server cannot reach the hub or has no home;
    # and its resources: the profile's reservations win. The hub picks the node among those the
    # admin's constraints allow (gpu_assignment "hub"), and pins the service to it.
    scratch = docker.types.Mount(target="/scratch", source="/tmp", type="bind", read_only=True)
    spawner = servers.make("pooled", extra_placement_spec={"constraints": ["node.role==worker"],
                                                           "preferences": [("spread", "node.id")]},
                           extra_container_spec={"labels": {"edu.example.cost-centre": "physics"},
                                                 "env": ["EDU_SITE=physics"], "mounts": [scratch]},
                           extra_resources_spec={"mem_reservation": 64 * 2**20})

    await servers.start(spawner)

    spec = swarm_bench.manager_client().api.inspect_service(spawner.object_id)["Spec"]["TaskTemplate"]
    node_id = task_of(swarm_bench, spawner)["NodeID"]  # the node the hub picked, among those the admin's allow
    assert spec["Placement"]["Constraints"] == ["node.labels.nvidia.gpu.product==NVIDIA A100-SXM4-80GB",
                                                f"node.id=={node_id}", "node.role==worker"]
    assert spec["Placement"]["Preferences"] == [{"Spread": {"SpreadDescriptor": "node.id"}}]  # the rest as given
    labels = spec["ContainerSpec"]["Labels"]
    assert labels["edu.example.cost-centre"] == "physics" and labels[LABEL_USER] == "pooled"
    env = spec["ContainerSpec"]["Env"]
    assert "EDU_SITE=physics" in env and any(entry.startswith("JUPYTERHUB_API_TOKEN=") for entry in env)
    assert {mount["Target"] for mount in spec["ContainerSpec"]["Mounts"]} == {"/home/jovyan", "/scratch"}
    reservations = spec["Resources"]["Reservations"]
    assert reservations["MemoryBytes"] == 256 * 2**20  # the profile's (its mem_limit) wins over the admin's
    assert "GenericResources" not in reservations  # the hub gave the GPU (gpu_assignment "hub")
    _, gpu = assigned(swarm_bench, spawner)
    holders = spawner.read_swarm().holders()
    assert holders[gpu].user == "pooled"


async def test_an_admins_constraint_the_hub_cannot_judge_stops_a_gpu_start_with_the_config_line(swarm_bench,
                                                                                                  servers, caplog):
    spawner = servers.make("weighed", extra_placement_spec={"constraints": ["node.labels.pool==jupyter",
                                                                            "node.weight>3"]})
    with pytest.raises(StartFailure) as failure:
        await servers.start(spawner)

    assert (failure.value.status_code, failure.value.reason) == (500, "config")
    assert "extra_placement_spec constraint 'node.weight>3' is not one the hub can judge" in caplog.text
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})


async def test_an_admins_extra_task_spec_that_would_replace_the_gpu_reservation_is_refused(swarm_bench, servers):
    spawner = servers.make("replacing", extra_task_spec={"resources": {"Limits": {"MemoryBytes": 2**30}}})

    with pytest.raises(StartFailure) as refusal:
        await servers.start(spawner)

    assert refusal.value.status_code == 500 and refusal.value.reason == "config"
    assert refusal.value.log_message == ("c.CondaSwarmSpawner.extra_task_spec['resources'] would replace the hub's "
                                         "own: set c.CondaSwarmSpawner.extra_resources_spec, which adds to it")
    assert not swarm_bench.manager_client().api.services(filters={"label": f"{LABEL_USER}=replacing"})


# -- pulls before the GPU ------------------------------------------------------------------------


def created_ns(service_attrs: dict) -> int:
    """A service's CreatedAt (RFC 3339, nanoseconds) in nanoseconds since the epoch."""
    stamp = service_attrs["CreatedAt"].rstrip("Z")
    whole, _, fraction = stamp.partition(".")
    seconds = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc).timestamp()
    return int(seconds) * 10**9 + int((fraction + "000000000")[:9])


def pull_events(bench: SwarmBench, node: str, since: float) -> list[dict]:
    api = bench.nodes[node].client().api
    return list(api.events(since=int(since), until=int(time.time()) + 1, decode=True,
                           filters={"type": "image", "event": "pull"}))


async def until_no_pull_jobs(bench: SwarmBench) -> None:
    """The pull jobs end (pulled, failed, or at prepull_timeout) and are removed."""
    client = bench.manager_client().api
    for _ in range(300):
        if not client.services(filters={"label": swarmpull.LABEL_PULL}):
            return
        await asyncio.sleep(1)
    pytest.fail("pull jobs left behind")


async def test_a_gpu_start_has_the_gpu_nodes_pull_its_image_before_it_takes_a_gpu(swarm_bench, servers):
    for worker in swarm_bench.workers:
        remove_pulled_images(swarm_bench, worker.name)
    began = time.time() - 1
    first = servers.make("first-puller")
    await servers.start(first)
    node, _ = assigned(swarm_bench, first)
    messages = await progress_messages(first)
    pulling = [message for message in messages if "Pull" in message]
    assert pulling[0] == "Pulling the image onto the 2 GPU nodes it may run on, before taking a GPU", messages
    # The first to end (the server may still go to the other, should its pull end before the seat is given)
    assert pulling[1] in (*(f"Pulled the image onto node {worker.name}; 1 more still pulling"
                            for worker in swarm_bench.workers),
                          "Pulled the image onto node worker1, worker2"), messages  # both at once
    assert messages.index(pulling[1]) < next(index for index, message in enumerate(messages)
                                             if message.startswith("Running on node"))
    # The server's node pulled it before its service (and GPU) existed; the other pulls it too.
    service = swarm_bench.manager_client().api.inspect_service(first.object_id)
    pulls = pull_events(swarm_bench, node, began)
    assert pulls and max(event["timeNano"] for event in pulls) < created_ns(service)
    await until_no_pull_jobs(swarm_bench)
    other = next(worker.name for worker in swarm_bench.workers if worker.name != node)
    assert pull_events(swarm_bench, other, began), f"{other} pulled nothing"

    # The next start of that image asks no node again.
    second = servers.make("second-puller")
    await servers.start(second)
    told = await progress_messages(second)
    assert any(message.startswith("Looking up the image") for message in told), told
    assert not [message for message in told if "Pull" in message], told


async def test_a_node_that_cannot_pull_is_left_out_before_any_gpu_is_taken(swarm_bench, servers):
    blocked, other = (node.name for node in swarm_bench.workers)
    remove_pulled_images(swarm_bench, other)
    # The only node asked to pull: the one that cannot.
    with cut_off_from_the_registry(swarm_bench, blocked), paused(swarm_bench, other):
        spawner = servers.make("pulled-elsewhere")
        start = asyncio.ensure_future(servers.start(spawner))
        told = await asyncio.wait_for(until_waiting_for(spawner, f"Node {blocked} could not get"), 300)
        set_availability(swarm_bench, other, "active")  # the start, in the queue, may go there
        await asyncio.wait_for(start, 300)
    assert told == f"Node {blocked} could not get the image (it could not pull the image from the registry): your " \
                   "server will run on another node"
    messages = await progress_messages(spawner)
    assert not [message for message in messages if "could not start your server" in message]  # no service there
    assert assigned(swarm_bench, spawner)[0] == other
    await until_no_pull_jobs(swarm_bench)


async def test_a_start_whose_node_was_drained_waits_for_the_other_nodes_pull_before_taking_its_gpu(
        swarm_bench, servers, swarm_base):
    # As the drained test above, but the other node is still pulling the image (its pull hangs): the
    # start looks for another node with no GPU held there until that node holds the image.
    pinned, pulling = (node.name for node in swarm_bench.workers)
    client = swarm_bench.manager_client()
    try:
        with cpu_blocked(swarm_bench, swarm_base, pinned):
            with cut_off_from_the_registry(swarm_bench, pulling, answered=False):
                spawner = servers.make("waits-for-the-pull", prepull_timeout=600)
                start = asyncio.ensure_future(servers.start(spawner, "heavy"))
                await asyncio.wait_for(until_waiting_for(spawner, "Waiting for CPU"), 300)
                set_availability(swarm_bench, pinned, "drain")
                told = await asyncio.wait_for(until_message(spawner, lambda message: message.startswith(
                    ("Waiting for node", "Running on node"))), 300)
                services_while_pulling = client.api.services(filters={"label": LABEL_USER})
                assert not start.done()
            began = time.time() - 1
            await asyncio.wait_for(start, 300)  # the rule is gone: the pull ends, and the start goes there
    finally:
        set_availability(swarm_bench, pinned, "active")
    assert told == f"Waiting for node {pulling} to finish pulling the image before taking its GPU"
    assert not services_while_pulling  # the drained node's service removed, none on the pulling node yet
    assert assigned(swarm_bench, spawner)[0] == pulling
    service = client.api.inspect_service(spawner.object_id)
    pulls = pull_events(swarm_bench, pulling, began)
    assert pulls and max(event["timeNano"] for event in pulls) < created_ns(service)
    await until_no_pull_jobs(swarm_bench)


async def test_with_swarm_assignment_the_service_is_not_placed_on_a_node_still_pulling_its_image(
        swarm_bench, servers, swarm_config, swarm_base):
    hanging, other = (node.name for node in swarm_bench.workers)
    client = swarm_bench.manager_client()
    # Swarm spreads a new service onto the node with fewer tasks: the other node runs three more (nothing
    # reserved), so left to itself Swarm would place the server on the node still pulling.
    fillers = [client.services.create(swarm_base, ["sleep", "3600"], name=f"filler-{uuid.uuid4().hex[:6]}",
                                      constraints=[f"node.hostname=={other}"]) for _ in range(3)]
    try:
        wait_until(lambda: all(task["Status"]["State"] == "running" for filler in fillers for task in filler.tasks()),
                   "the fillers to run", attempts=600)
        remove_pulled_images(swarm_bench, other)
        with cut_off_from_the_registry(swarm_bench, hanging, answered=False):
            spawner = servers.make("kept-off-the-puller", config=swarm_assigned(swarm_config), prepull_timeout=600,
                                   start_timeout=120)
            await asyncio.wait_for(servers.start(spawner), 300)
            placed = assigned(swarm_bench, spawner)[0]
            constraints = client.api.inspect_service(spawner.object_id)["Spec"]["TaskTemplate"]["Placement"]
    finally:
        for filler in fillers:
            filler.remove()
    assert placed == other
    assert f"node.id!={swarm_bench.nodes[hanging].node_id}" in constraints["Constraints"]
    messages = await progress_messages(spawner)
    assert not [message for message in messages if "could not start" in message], messages  # placed there at once
    await until_no_pull_jobs(swarm_bench)


async def test_with_swarm_assignment_a_start_swarm_cannot_place_goes_to_the_kept_off_node_once_it_pulled(
        swarm_bench, servers, swarm_config, swarm_base):
    # The seat counts the busy node's free GPUs, but a service not the hub's holds its CPUs there: Swarm
    # cannot place the server, and the other node is kept off while it pulls. Its pull ends: it goes there.
    busy, pulling = (node.name for node in swarm_bench.workers)
    with cpu_blocked(swarm_bench, swarm_base, busy):
        with cut_off_from_the_registry(swarm_bench, pulling, answered=False):
            spawner = servers.make("placed-once-pulled", config=swarm_assigned(swarm_config), prepull_timeout=600,
                                   start_timeout=240)
            start = asyncio.ensure_future(servers.start(spawner, "heavy"))
            waiting = await asyncio.wait_for(until_message(spawner, lambda message: message.startswith(
                ("Waiting for CPU", "Waiting for a node that fits", "Waiting for a GPU on any node: "))), 300)
            assert not start.done(), waiting
        await asyncio.wait_for(start, 300)  # the rule is gone: the pull ends, and the server goes there
    assert assigned(swarm_bench, spawner)[0] == pulling
    messages = await progress_messages(spawner)
    assert not [message for message in messages if "could not start" in message], messages
    await until_no_pull_jobs(swarm_bench)


async def test_a_node_whose_pull_hangs_does_not_hold_up_a_start_another_node_can_take(swarm_bench, servers):
    hanging, other = (node.name for node in swarm_bench.workers)
    remove_pulled_images(swarm_bench, other)
    with cut_off_from_the_registry(swarm_bench, hanging, answered=False):
        spawner = servers.make("not-held-up", prepull_timeout=600)
        await asyncio.wait_for(servers.start(spawner), 300)
        # Its server runs, on the node that got the image, while the other's pull still hangs.
        still_pulling = swarm_bench.manager_client().api.services(filters={"label": swarmpull.LABEL_PULL})
    assert assigned(swarm_bench, spawner)[0] == other
    assert [service["Spec"]["Labels"][swarmpull.LABEL_PULL] for service in still_pulling] == \
        [swarm_bench.nodes[hanging].node_id]
    messages = await progress_messages(spawner)
    assert f"Pulled the image onto node {other}; 1 more still pulling" in messages, messages
    await until_no_pull_jobs(swarm_bench)  # the rule gone, its pull ends too


async def test_a_start_waits_for_a_gpu_of_a_node_holding_its_image_while_another_node_still_pulls(
        swarm_bench, servers):
    hanging, other = (node.name for node in swarm_bench.workers)
    remove_pulled_images(swarm_bench, other)
    with cut_off_from_the_registry(swarm_bench, hanging, answered=False):
        holders = [servers.make(f"on-{other}-{number}") for number in range(2)]
        for spawner in holders:  # both of the other node's GPUs
            await asyncio.wait_for(servers.start(spawner), 300)
        third = servers.make("third-in-line")
        start = asyncio.ensure_future(servers.start(third))
        told = await asyncio.wait_for(until_waiting_for(third, "Waiting for a GPU on a node"), 300)
        assert not start.done()  # the hanging node's GPUs are free, and not its
        await holders[0].stop()
        await asyncio.wait_for(start, 300)
    assert told == (f"Waiting for a GPU on a node that holds the image: 2 of 4 GPUs are held; still pulling it: "
                    f"{hanging}; you are next")
    assert all(assigned(swarm_bench, spawner)[0] == other for spawner in (holders[1], third))
    await until_no_pull_jobs(swarm_bench)


async def test_a_gpu_start_no_node_can_pull_for_fails_in_one_line_with_no_service(swarm_bench, servers):
    workers = [node.name for node in swarm_bench.workers]
    with cut_off_from_the_registry(swarm_bench, *workers):
        spawner = servers.make("nowhere-to-pull")
        with pytest.raises(StartFailure) as failure:
            await asyncio.wait_for(servers.start(spawner), 300)
    assert failure.value.status_code == 503
    message = failure.value.message
    lead, tail = "Docker Swarm could not start your server: ", "; try again later, or tell the hub admin (those " \
                                                              "nodes' Docker logs say why)"
    assert message.startswith(lead) and message.endswith(tail), message
    assert sorted(message[len(lead):-len(tail)].split("; ")) == [  # in the order the pulls failed
        f"node {name}: it could not pull the image from the registry" for name in sorted(workers)]
    client = swarm_bench.manager_client().api
    assert not client.services(filters={"label": LABEL_USER}) and not client.services(
        filters={"label": swarmpull.LABEL_PULL})


async def test_a_stop_while_the_nodes_pull_ends_the_start_and_the_pull_jobs_end_by_themselves(swarm_bench, servers):
    workers = [node.name for node in swarm_bench.workers]
    with cut_off_from_the_registry(swarm_bench, *workers, answered=False):  # pulls hang
        spawner = servers.make("gave-up-pulling", prepull_timeout=120)
        start = asyncio.ensure_future(servers.start(spawner))
        await asyncio.wait_for(until_waiting_for(spawner, "Pulling the image onto the 2 GPU nodes"), 300)
        await spawner.stop()  # the user gives up
        with pytest.raises(StartFailure) as failure:
            await asyncio.wait_for(start, 60)
    assert failure.value.message == "The start was cancelled while it waited for a GPU or a node"
    client = swarm_bench.manager_client().api
    assert not client.services(filters={"label": LABEL_USER})
    # Other starts may share the jobs: they go on, end (pulled now, or at prepull_timeout) and are removed.
    await until_no_pull_jobs(swarm_bench)


def pull_job(bench: SwarmBench, image: str, node: str, command: list[str]) -> str:
    """A job service labelled as the hub's pull jobs are, as one a hub process stopped mid-pull leaves."""
    node_id = bench.nodes[node].node_id
    task = docker.types.TaskTemplate(container_spec=docker.types.ContainerSpec(image, command=command),
                                     restart_policy=docker.types.RestartPolicy(condition="none"),
                                     placement=docker.types.Placement(constraints=[f"node.id=={node_id}"]))
    created = bench.manager_client().api.create_service(
        task, name=f"leftover-pull-{uuid.uuid4().hex[:6]}", labels={swarmpull.LABEL_PULL: node_id},
        mode=docker.types.ServiceMode("replicated-job", replicas=1))
    return str(created["ID"])


async def test_a_new_hub_process_removes_the_ended_pull_jobs_an_earlier_one_left_and_no_other(
        swarm_bench, servers, swarm_base, monkeypatch):
    client = swarm_bench.manager_client().api
    worker = swarm_bench.workers[0].name
    ended = pull_job(swarm_bench, swarm_base, worker, ["true"])
    # Another hub's pull, still going on when the start sweeps (it ends by itself soon after).
    going_on = pull_job(swarm_bench, swarm_base, worker, ["sleep", "30"])
    try:
        def states(service_id: str) -> set:
            return {task["Status"]["State"] for task in client.tasks(filters={"service": service_id})}

        wait_until(lambda: states(ended) == {"complete"} and states(going_on) == {"running"}, "the jobs to run",
                   attempts=600)
        monkeypatch.setattr(swarmpull, "_swept", False)  # a new hub process
        for node in swarm_bench.workers:
            remove_pulled_images(swarm_bench, node.name)  # so that the start pulls (and sweeps first)
        await asyncio.wait_for(servers.start(servers.make("sweeper")), 300)
        left = {service["ID"] for service in client.services(filters={"label": swarmpull.LABEL_PULL})}
        assert ended not in left and going_on in left
    finally:
        for service_id in (ended, going_on):
            with contextlib.suppress(docker.errors.NotFound):
                client.remove_service(service_id)
    await until_no_pull_jobs(swarm_bench)
