"""What differs from node to node of a swarm (tests/fixtures_swarm.py): homes that follow a server
to another node, drivers too old for a profile's CUDA, and the layers a node pulls.

Spawners run in-process against the manager, as in test_swarm_spawner.py (its fixtures).
"""

from __future__ import annotations

import copy
import io
import random
import tarfile
from types import SimpleNamespace

import pytest
import test_swarm_spawner
from test_swarm_spawner import task_of, wait_until

from condaspawner_bench.swarm import CUDA_LABEL, FAKE_CUDA_VERSION, SwarmBench
from jupyterhub_condaspawner.failures import StartFailure
from jupyterhub_condaspawner.gpus import LABEL_USER

pytestmark = [pytest.mark.swarm, pytest.mark.docker]

# test_swarm_spawner's fixtures, under their own names (pytest finds fixtures by module attribute).
swarm_config = test_swarm_spawner.swarm_config
servers = test_swarm_spawner.servers
fresh_client = test_swarm_spawner.fresh_client

HOME_VOLUME = "csw-shared-home-{username}"
# Reads what an earlier server left in the home, then leaves its own line there.
HOME_STAND_IN = ["sh", "-c", 'cat /home/jovyan/note > /tmp/seen 2>/dev/null; echo "written on $(hostname)" '
                 ">> /home/jovyan/note; exec sleep 3600", "stand-in"]


def container_of(bench: SwarmBench, spawner):
    task = task_of(bench, spawner)
    node = bench.node_for_id(task["NodeID"])
    return node.name, node.client().containers.get(task["Status"]["ContainerStatus"]["ContainerID"])


def read_in(container, path: str) -> str:
    def read() -> tuple[str] | None:
        result = container.exec_run(["cat", path])
        return (result.output.decode(),) if result.exit_code == 0 else None

    return wait_until(read, f"{path} in the server's container")[0]


# -- homes across nodes ------------------------------------------------------------------------


async def test_a_home_outside_the_node_follows_the_server_to_another_node(swarm_bench, servers, swarm_config,
                                                                        tmp_path):
    # Stands in for an NFS export: a folder of the host every node's dockerd sees, bound by the
    # local driver exactly as `type: nfs` would mount it. The per-user path is the escaped name.
    shared = tmp_path / "export-home"
    (shared / "ann-2elee").mkdir(parents=True)
    (shared / "ann-2elee").chmod(0o777)
    config = copy.deepcopy(swarm_config)
    config.CondaSwarmSpawner.volumes = {HOME_VOLUME: "/home/jovyan"}
    config.CondaSwarmSpawner.volume_driver = "local"
    config.CondaSwarmSpawner.volume_driver_options = {"type": "none", "o": "bind", "device": f"{shared}/{{username}}"}
    config.Spawner.cmd = HOME_STAND_IN
    volume = "csw-shared-home-ann-2elee"
    try:
        first = servers.make("ann.lee", config=config,
                             extra_placement_spec={"constraints": ["node.hostname==worker1"]})
        await servers.start(first, profile="cpu")
        node, container = container_of(swarm_bench, first)
        assert node == "worker1"
        wait_until(lambda: (shared / "ann-2elee" / "note").exists(), "the first server to write its note")
        mount = swarm_bench.manager_client().api.inspect_service(first.object_id)[
            "Spec"]["TaskTemplate"]["ContainerSpec"]["Mounts"][0]
        assert mount["Source"] == volume  # the escaped name, never the raw one
        assert mount["VolumeOptions"]["DriverConfig"] == {
            "Name": "local", "Options": {"type": "none", "o": "bind", "device": f"{shared}/ann-2elee"}}
        assert mount["VolumeOptions"]["Labels"] == {LABEL_USER: "ann.lee"}
        await first.stop()
        first.clear_state()

        second = servers.make("ann.lee", config=config,
                              extra_placement_spec={"constraints": ["node.hostname==worker2"]})
        await servers.start(second, profile="cpu")
        node, container = container_of(swarm_bench, second)

        assert node == "worker2"
        assert read_in(container, "/tmp/seen") == "written on worker1\n"  # what the server on worker1 wrote
        worker2_volume = swarm_bench.nodes["worker2"].client().volumes.get(volume).attrs
        assert worker2_volume["Options"]["device"] == f"{shared}/ann-2elee"
        assert worker2_volume["Labels"] == {LABEL_USER: "ann.lee"}
        wait_until(lambda: (shared / "ann-2elee" / "note").read_text().count("\n") == 2, "the second note")
        assert (shared / "ann-2elee" / "note").read_text() == "written on worker1\nwritten on worker2\n"
    finally:
        for service in swarm_bench.manager_client().services.list(filters={"label": LABEL_USER}):
            service.remove()
        for name in ("worker1", "worker2"):
            client = swarm_bench.nodes[name].client()
            wait_until(lambda client=client: not client.containers.list(ignore_removed=True, all=True, filters={"volume": volume}),
                       f"{name}'s servers with the home to go")
            for leftover in client.volumes.list(filters={"name": volume}):
                leftover.remove()


@pytest.mark.parametrize("settings", [
    {"volume_driver": "local", "volume_driver_options": {"device": ":/export/home/{raw_username}"}},
    {"volumes": {"home-{raw_username}": "/home/jovyan"}},
    {"volume_driver": "local", "volume_driver_options": {"device": ":/export/{user.name}"}},
])
async def test_home_settings_that_would_put_raw_user_text_in_a_path_are_refused(swarm_bench, servers, swarm_config,
                                                                               settings):
    config = copy.deepcopy(swarm_config)
    for name, value in settings.items():
        setattr(config.CondaSwarmSpawner, name, value)
    spawner = servers.make("raw", config=config)

    with pytest.raises(StartFailure) as failure:
        await servers.start(spawner, profile="cpu")

    print(failure.value.message)
    assert (failure.value.status_code, failure.value.reason) == (500, "config")
    assert failure.value.message.startswith("The hub's home volume settings are refused (")
    assert "only {username} and {servername} (escaped names) may name a home" in failure.value.message
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})


async def test_a_volume_named_without_the_fields_its_driver_options_use_is_refused(swarm_bench, servers, swarm_config):
    """Every named volume gets the driver's options: a shared one would be created on a node with the
    first user's home path and mounted by every later server there."""
    config = copy.deepcopy(swarm_config)
    config.CondaSwarmSpawner.volumes = {HOME_VOLUME: "/home/jovyan"}
    config.CondaSwarmSpawner.read_only_volumes = {"csw-datasets": "/data"}
    config.CondaSwarmSpawner.volume_driver = "local"
    config.CondaSwarmSpawner.volume_driver_options = {"type": "nfs", "device": ":/export/home/{username}"}
    spawner = servers.make("shared", config=config)

    with pytest.raises(StartFailure) as failure:
        await servers.start(spawner, profile="cpu")

    assert (failure.value.status_code, failure.value.reason) == (500, "config")
    assert failure.value.message == (
        "The hub's home volume settings are refused (volumes['csw-datasets']: volume_driver_options name {username} "
        "but this volume's name does not, so each node would give every server the first one's; name it with "
        "{username} too, or mount shared data from a path on the nodes); tell the hub admin")
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})


async def test_a_deleted_users_name_given_again_is_refused_the_home_the_nodes_keep(swarm_bench, servers):
    """The nodes create the home volumes, out of the hub's sight: the hub's ledger remembers which
    user identity each home's name served."""
    first = servers.make("rita")
    await servers.start(first, profile="cpu")
    await first.stop()
    again = servers.make("rita")  # the same user, another day
    again.user.orm_user = SimpleNamespace(orm_spawners={})
    await servers.start(again, profile="cpu")
    await again.stop()
    await again.delete_forever()  # as the hub deletes the user: the nodes keep the home's data

    recycled = servers.make("rita")
    recycled.user.id = 2  # a new user under the old name
    with pytest.raises(StartFailure) as refusal:
        await servers.start(recycled, profile="cpu")

    assert (refusal.value.status_code, refusal.value.reason) == (500, "refused")
    assert refusal.value.message == (
        "volume csw-test-home-rita belongs to an earlier user of your name (deleted or renamed): an admin must "
        "check whose it is and hand it over or remove it as the README's Isolation section says")
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})
    other = servers.make("rita2")  # a name of its own: its own home
    await servers.start(other, profile="cpu")


# -- CUDA against the nodes' drivers -----------------------------------------------------------


def label_cuda(bench: SwarmBench, versions: dict[str, str]) -> None:
    """Give nodes the CUDA label a site sets from `nvidia-smi` ("CUDA Version")."""
    client = bench.manager_client()
    for name, version in versions.items():
        node = client.nodes.get(bench.nodes[name].node_id)
        spec = node.attrs["Spec"]
        spec["Labels"] = {**spec.get("Labels", {}), CUDA_LABEL: version}
        node.update(spec)


@pytest.fixture
def cuda_labels(swarm_bench):
    """Set the workers' CUDA labels in a test; the bench's own afterwards."""
    yield lambda **versions: label_cuda(swarm_bench, versions)
    label_cuda(swarm_bench, {node.name: FAKE_CUDA_VERSION for node in swarm_bench.workers})


async def test_a_profiles_cuda_lands_only_on_nodes_whose_driver_supports_it(swarm_bench, servers, cuda_labels):
    cuda_labels(worker1="11.8", worker2="12.4")  # the 'gpu' profile is built for CUDA 12.4
    first, second = servers.make("cuda1"), servers.make("cuda2")

    await servers.start(first)
    await servers.start(second)

    for spawner in (first, second):
        assert bench_node(swarm_bench, spawner) == "worker2"
        constraints = swarm_bench.manager_client().api.inspect_service(spawner.object_id)[
            "Spec"]["TaskTemplate"]["Placement"]["Constraints"]
        assert f"node.labels.{CUDA_LABEL}!=11.8" in constraints
    # worker2's two GPUs are taken; worker1 has two free, but its driver is too old: a third waits.
    third = servers.make("cuda3", start_timeout=12, start_margin=10)
    with pytest.raises(StartFailure) as failure:
        await servers.start(third)
    assert failure.value.status_code == 503 and failure.value.message.startswith("No GPU is free on this hub")


async def test_a_profile_whose_cuda_no_nodes_driver_supports_is_refused_at_once(swarm_bench, servers, cuda_labels):
    cuda_labels(worker1="11.8", worker2="12.2")
    spawner = servers.make("oldcuda")

    with pytest.raises(StartFailure) as refusal:  # REST: JupyterHub applies the options first
        await spawner._run_apply_user_options({"profile": "gpu"})
    await spawner.render_options_form()  # the form, as the user sees it before submitting
    with pytest.raises(ValueError) as form:
        await spawner.options_from_form_data({"profile": ["gpu"]})

    assert (refusal.value.status_code, refusal.value.reason) == (400, "gpu-infeasible")
    assert refusal.value.message == (
        "'gpu' was built for CUDA 12.4, but the NVIDIA driver of every node with a fitting GPU supports CUDA up to "
        "12.2 at most: pick a profile built for CUDA 12.2 or older, or ask an admin to update the drivers")
    assert "worker1 11.8, worker2 12.2" in refusal.value.log_message
    assert str(form.value) == refusal.value.message
    assert not swarm_bench.manager_client().api.services(filters={"label": LABEL_USER})  # nothing created
    spawner.apply_choice({"profile": "two"})  # a profile without cuda is not checked


def bench_node(bench: SwarmBench, spawner) -> str:
    return bench.node_for_id(task_of(bench, spawner)["NodeID"]).name


# -- a node pulls only the layers it lacks -----------------------------------------------------


def build_on_manager(bench: SwarmBench, base: str, files: dict[str, bytes], tag: str) -> str:
    """An image of ``base`` plus one layer holding ``files``, built on the manager and pushed; its reference."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        dockerfile = f"FROM {base}\nCOPY {' '.join(files)} /data/\n".encode()
        for name, data in {"Dockerfile": dockerfile, **files}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    repository = bench.image("csw-layers")
    client = bench.manager_client()
    client.images.build(fileobj=context, custom_context=True, tag=f"{repository}:{tag}", network_mode="host", rm=True)
    for line in client.api.push(repository, tag=tag, stream=True, decode=True):
        assert "error" not in line, line
    return f"{repository}:{tag}"


def pull_report(client, reference: str) -> tuple[dict[str, str], int]:
    """Pull on a node: (short layer id -> its last status, bytes of the layers it downloaded), from the
    daemon's stream."""
    repository, tag = reference.rsplit(":", 1)
    statuses: dict[str, str] = {}
    downloaded: dict[str, int] = {}
    for line in client.api.pull(repository, tag=tag, stream=True, decode=True):
        assert "error" not in line, line
        layer = line.get("id")
        if not layer or layer == tag:
            continue
        statuses[layer] = line.get("status", "")
        if line.get("status") == "Downloading":
            downloaded[layer] = int(line.get("progressDetail", {}).get("total", 0))  # the compressed layer
    return statuses, sum(downloaded.values())


def layer_ids(bench: SwarmBench, reference: str) -> list[str]:
    """The short ids (what a pull prints) of the layers the registry's manifest lists, base first."""
    repository, tag = reference.rsplit(":", 1)
    assert bench.registry is not None
    manifest = bench.registry.manifest(repository.split("/", 1)[1], tag)
    assert manifest is not None, reference
    return [layer["digest"].split(":")[1][:12] for layer in manifest["layers"]]


def test_a_node_pulls_only_the_layers_it_lacks(swarm_bench):
    data = random.Random(10)  # the same layers every run: the registry (kept between runs) stores them once
    first = build_on_manager(swarm_bench, swarm_bench.tiny_image, {"first.bin": data.randbytes(2 << 20)}, "first")
    second = build_on_manager(swarm_bench, first, {"second.bin": data.randbytes(1 << 20)}, "second")
    first_layers, second_layers = layer_ids(swarm_bench, first), layer_ids(swarm_bench, second)
    assert second_layers[:-1] == first_layers and len(second_layers) == len(first_layers) + 1  # shared below
    worker = swarm_bench.nodes["worker1"].client()
    for repository in (swarm_bench.tiny_image.rsplit(":", 1)[0], swarm_bench.image("csw-layers")):
        for image in worker.images.list(name=repository):
            # The base layer stays where another test's container on this node still uses it.
            worker.images.remove(image.id, force=True)

    first_pull, first_bytes = pull_report(worker, first)
    second_pull, second_bytes = pull_report(worker, second)

    print("first pull:", first_pull, first_bytes, "bytes; second pull:", second_pull, second_bytes, "bytes")
    fetched_first = [layer for layer in first_layers if first_pull[layer] == "Pull complete"]
    assert first_layers[-1] in fetched_first, first_pull  # the 2 MiB layer no other image has
    assert {layer: second_pull[layer] for layer in first_layers} == dict.fromkeys(first_layers, "Already exists")
    assert second_pull[second_layers[-1]] == "Pull complete"
    # The bytes fetched are the new layer's (its 1 MiB of random data), not the 2 MiB below it.
    assert swarm_bench.registry is not None
    sizes = [layer["size"] for layer in swarm_bench.registry.manifest("csw-layers", "second")["layers"]]
    assert second_bytes == sizes[-1] and 1 << 20 < second_bytes < 2 << 20
    assert first_bytes == sum(size for layer, size in zip(first_layers, sizes) if layer in fetched_first) > 2 << 20
