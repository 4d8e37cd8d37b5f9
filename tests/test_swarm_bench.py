"""The multi-node bench, and the Swarm facts the conda-swarm spawner builds on, on a real swarm.

Three dockerds in network namespaces (condaspawner_bench.swarm): GPU reservations as
generic resources, pending when none is free, a dead node Down within seconds, host
networking, images through the registry. Nothing here leaves the namespaces the
bench creates: every address is on its private subnet.
"""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest
from fixtures_swarm import require_swarm_prerequisites

from condaspawner_bench.dockerd import mounts_under
from condaspawner_bench.netns import is_running, pids_in_namespace
from condaspawner_bench.swarm import (
    FAKE_GPU_MODEL,
    GPU_MODEL_LABEL,
    GPU_RESOURCE,
    HEARTBEAT_S,
    NodeSpec,
    SwarmBench,
    busybox_rootfs_tar,
    cgroup_dirs,
)

pytestmark = pytest.mark.swarm

GPU_ENV = f"DOCKER_RESOURCE_{GPU_RESOURCE}"
SLEEP = ["sleep", "600"]
# Tasks stop at once on removal: tini (init) passes SIGTERM on to sleep.
STOP_GRACE_NS = 1_000_000_000
HTTP_PORT = 18080


# --- helpers --------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` is truthy; fails the test after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - started


def create_service(bench: SwarmBench, gpus: int = 0, command: list[str] | None = None,
                   **kwargs: Any) -> docker.models.services.Service:
    resources = docker.types.Resources(generic_resources={GPU_RESOURCE: gpus}) if gpus else None
    return bench.manager.client().services.create(
        bench.tiny_image, command or SLEEP, name=f"t-{uuid.uuid4().hex[:8]}",
        resources=resources, init=True, stop_grace_period=STOP_GRACE_NS, **kwargs,
    )


def current_task(service: docker.models.services.Service) -> dict[str, Any] | None:
    """The service's latest task (a replacement is newer than the task it replaces), or None yet."""
    tasks = service.tasks()
    return max(tasks, key=lambda task: task["CreatedAt"]) if tasks else None


def task_state(service: docker.models.services.Service) -> str:
    task = current_task(service)
    return task["Status"]["State"] if task else "none"


def container_env(bench: SwarmBench, task: dict[str, Any]) -> dict[str, str]:
    """The environment ``docker exec env`` shows in a task's container, on its node."""
    node = bench.node_for_id(task["NodeID"])
    container = node.client().containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
    output = container.exec_run(["env"]).output.decode()
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def task_gpu(bench: SwarmBench, service: docker.models.services.Service) -> tuple[str, str]:
    """(node name, GPU id) of a running GPU task."""
    task = current_task(service)
    assert task is not None
    return bench.node_for_id(task["NodeID"]).name, container_env(bench, task)[GPU_ENV]


@pytest.fixture
def services(swarm_bench: SwarmBench) -> Iterator[list[docker.models.services.Service]]:
    """Services a test creates (append them); removed after it, their containers gone."""
    created: list[docker.models.services.Service] = []
    yield created
    for service in created:
        service.remove()
    wait_for(lambda: not any(node.client().containers.list(ignore_removed=True) for node in swarm_bench.nodes.values()
                             if node.answers()),
             30, "the removed services' containers to stop")


# --- the bench itself -------------------------------------------------------------


def test_nodes_are_separate_engines_on_a_private_subnet_with_no_route_out(swarm_bench):
    infos = {name: node.client().info() for name, node in swarm_bench.nodes.items()}

    assert len({info["ID"] for info in infos.values()}) == 3, "each node must be its own engine"
    assert {info["Name"] for info in infos.values()} == {"manager", "worker1", "worker2"}
    for name, node in swarm_bench.nodes.items():
        assert infos[name]["Swarm"]["NodeAddr"] == node.address
        assert not swarm_bench.network.can_route_out(name), f"{name} has a route out"
        route = subprocess.run(swarm_bench.nsenter(name, "ip", "route", "get", "8.8.8.8"),
                               capture_output=True, text=True)
        assert route.returncode != 0
    assert all(address in swarm_bench.network.subnet for address in swarm_bench.network.nodes.values())


def test_workers_declare_fake_gpus_and_their_model(swarm_bench):
    nodes = {node.attrs["Description"]["Hostname"]: node.attrs
             for node in swarm_bench.manager.client().nodes.list()}

    assert nodes["manager"]["Spec"]["Role"] == "manager"
    for worker in swarm_bench.workers:
        resources = nodes[worker.name]["Description"]["Resources"]["GenericResources"]
        declared = {item["NamedResourceSpec"]["Value"] for item in resources}
        assert declared == set(worker.gpus) and len(declared) == 2
        assert nodes[worker.name]["Spec"]["Labels"][GPU_MODEL_LABEL] == FAKE_GPU_MODEL


def test_a_gpu_service_runs_on_a_worker_with_a_gpu_id_in_its_env(swarm_bench, services):
    service = create_service(swarm_bench, gpus=1)
    services.append(service)

    seconds = wait_for(lambda: task_state(service) == "running", 30, "the GPU task to run")
    node, gpu = task_gpu(swarm_bench, service)

    print(f"GPU service running after {seconds:.1f} s on {node} with {gpu}")
    assert node in {"worker1", "worker2"}
    assert gpu in swarm_bench.nodes[node].gpus
    # Config.Env has it too: that is what docker inspect (and a spawner) reads.
    task = current_task(service)
    container = swarm_bench.node_for_id(task["NodeID"]).client().containers.get(
        task["Status"]["ContainerStatus"]["ContainerID"])
    assert f"{GPU_ENV}={gpu}" in container.attrs["Config"]["Env"]


def test_too_many_gpu_requests_wait_and_start_when_one_is_freed(swarm_bench, services):
    holders = [create_service(swarm_bench, gpus=1) for _ in range(4)]
    services.extend(holders)
    wait_for(lambda: all(task_state(service) == "running" for service in holders), 60,
             "four GPU tasks to run")
    placed = [task_gpu(swarm_bench, service) for service in holders]
    assert len({gpu for _, gpu in placed}) == 4, f"GPU ids must be distinct: {placed}"
    assert sorted(node for node, _ in placed) == ["worker1", "worker1", "worker2", "worker2"]

    waiting = create_service(swarm_bench, gpus=1)
    services.append(waiting)
    wait_for(lambda: "insufficient resources" in (current_task(waiting) or {}).get("Status", {}).get("Err", ""),
             30, "the fifth request to be pending for want of resources")
    assert task_state(waiting) == "pending"
    print("pending:", current_task(waiting)["Status"]["Err"])

    freed_node, freed_gpu = placed[0]
    holders[0].remove()
    services.remove(holders[0])
    seconds = wait_for(lambda: task_state(waiting) == "running", 30, "the waiting task to start")

    print(f"the waiting GPU task started {seconds:.1f} s after a GPU was freed")
    assert task_gpu(swarm_bench, waiting) == (freed_node, freed_gpu)


def test_a_gpu_model_constraint_on_the_node_label_places_or_waits(swarm_bench, services):
    fitting = create_service(swarm_bench, gpus=1,
                             constraints=[f"node.labels.{GPU_MODEL_LABEL}=={FAKE_GPU_MODEL}"])
    missing = create_service(swarm_bench, gpus=1,
                             constraints=[f"node.labels.{GPU_MODEL_LABEL}==NVIDIA H100 80GB HBM3"])
    services.extend([fitting, missing])

    wait_for(lambda: task_state(fitting) == "running", 30, "the task on the right model to run")
    wait_for(lambda: (current_task(missing) or {}).get("Status", {}).get("Err"), 30,
             "the task on a missing model to say why it waits")
    assert task_state(missing) == "pending"
    assert "constraint" in current_task(missing)["Status"]["Err"]


def test_host_networking_tasks_answer_at_their_nodes_address(swarm_bench, services):
    script = (f"mkdir -p /tmp/www && hostname > /tmp/www/index.html && "
              f"exec httpd -f -p {HTTP_PORT} -h /tmp/www")
    service = create_service(swarm_bench, command=["sh", "-c", script], networks=["host"],
                             constraints=["node.role==worker"])
    services.append(service)
    wait_for(lambda: task_state(service) == "running", 30, "the web task to run")
    node = swarm_bench.node_for_id(current_task(service)["NodeID"])

    def answer() -> str | None:
        try:
            with urllib.request.urlopen(f"http://{node.address}:{HTTP_PORT}/", timeout=2) as response:
                return response.read().decode().strip()
        except OSError:
            return None

    wait_for(answer, 15, f"the task to answer at {node.address}:{HTTP_PORT}")
    assert answer() == node.name  # host networking: the node's own hostname and address


def test_tasks_reach_the_host_at_host_address(swarm_bench, services):
    """What a server on a node needs to call the hub's API (hub_connect_ip = host_address)."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.client_address[0], self.path))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hub")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer((swarm_bench.host_address, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://{swarm_bench.host_address}:{server.server_port}/hub/api"
        service = create_service(swarm_bench, command=["wget", "-q", "-O", "-", url], networks=["host"],
                                 constraints=["node.hostname==worker2"],
                                 restart_policy=docker.types.RestartPolicy(condition="none"))
        services.append(service)
        wait_for(lambda: task_state(service) in {"complete", "failed"}, 30, "the task to call the host")
    finally:
        server.shutdown()
        server.server_close()

    assert task_state(service) == "complete"
    assert seen == [(swarm_bench.nodes["worker2"].address, "/hub/api")]


def test_a_worker_pulls_an_image_from_the_registry(swarm_bench):
    worker = swarm_bench.nodes["worker2"].client()
    for image in worker.images.list(name=swarm_bench.tiny_image.rsplit(":", 1)[0]):
        worker.images.remove(image.id, force=True)

    image = worker.images.pull(swarm_bench.tiny_image)

    assert swarm_bench.tiny_image in image.tags
    output = worker.containers.run(image.id, ["echo", "pulled"], network_mode="host", remove=True)
    assert output.decode().strip() == "pulled"


def test_an_image_of_the_single_host_bench_is_seeded_into_the_registry(swarm_bench, docker_daemon):
    source = docker_daemon.client()
    name = f"csw-seed-test:{uuid.uuid4().hex[:8]}"
    source.api.import_image_from_data(busybox_rootfs_tar(), repository=name.split(":")[0], tag=name.split(":")[1])
    try:
        started = time.monotonic()
        reference = swarm_bench.seed_image(source, name)
        seconds = time.monotonic() - started
        again = time.monotonic()
        assert swarm_bench.seed_image(source, name) == reference
        cached = time.monotonic() - again
    finally:
        source.images.remove(name, force=True)

    print(f"seeded in {seconds:.2f} s, again (cached) in {cached:.2f} s")
    assert reference == swarm_bench.image(name)
    assert swarm_bench.pull(reference, ["worker1"])
    # one listing call: images.list() inspects each image after, and other tests remove theirs meanwhile
    assert not any(name in tag for image in source.api.images() for tag in image.get("RepoTags") or []
                   if "127.0.0.1" in tag)


@pytest.mark.parametrize("dockerd_only", [False, True], ids=["machine", "dockerd"])
def test_a_killed_worker_is_down_within_seconds_and_its_task_moves(swarm_bench, services, dockerd_only):
    # Swarm restarts a task 5 s after it ends unless told otherwise: here at once
    # (docker-py's RestartPolicy defaults to condition="none": say "any").
    restart_at_once = docker.types.RestartPolicy(condition="any", delay=0)
    service = create_service(swarm_bench, gpus=1, restart_policy=restart_at_once)
    services.append(service)
    wait_for(lambda: task_state(service) == "running", 30, "the GPU task to run")
    victim, _ = task_gpu(swarm_bench, service)
    survivor = next(node.name for node in swarm_bench.workers if node.name != victim)

    swarm_bench.kill_node(victim, dockerd_only=dockerd_only)
    down = swarm_bench.wait_for_node_state(victim, "down", timeout=20)
    moved = wait_for(lambda: task_state(service) == "running"
                     and swarm_bench.node_for_id(current_task(service)["NodeID"]).name == survivor,
                     30, f"the task to be rescheduled on {survivor}")

    what = "its dockerd" if dockerd_only else "the node"
    print(f"{victim} was Down {down:.1f} s after {what} was killed; the task ran on {survivor} {moved:.1f} s later")
    # What makes a dead node Down within seconds (not Swarm's default ~15 s): the bench's heartbeat.
    spec = swarm_bench.manager_client().swarm.attrs["Spec"]
    assert spec["Dispatcher"]["HeartbeatPeriod"] == HEARTBEAT_S * 1_000_000_000
    assert task_gpu(swarm_bench, service)[1] in swarm_bench.nodes[survivor].gpus
    if not dockerd_only:
        assert not pids_in_namespace(swarm_bench.network.path(victim))

    swarm_bench.restart_node(victim)
    back = swarm_bench.wait_for_node_state(victim, "ready", timeout=30)
    assert swarm_bench.nodes[victim].client().info()["Swarm"]["LocalNodeState"] == "active"
    print(f"{victim} was ready again {back:.1f} s after its dockerd restarted")


# --- a bench of its own: start, isolation, teardown ----------------------------------


def test_a_second_bench_runs_beside_and_stops_without_leftovers(swarm_bench, tmp_path_factory):
    require_swarm_prerequisites()
    state = tmp_path_factory.mktemp("swarm2")
    nodes = [NodeSpec("manager", role="manager"), NodeSpec("worker1", gpus=("GPU-fake-solo-0",))]
    # A run that crashed: never stopped. The next start on the same folder cleans it up.
    crashed = SwarmBench.start(state, nodes=nodes, say=print)
    crashed_pids = [node.process.pid for node in crashed.nodes.values() if node.process]

    started = time.monotonic()
    with SwarmBench.start(state, nodes=nodes, say=print) as bench:
        up = time.monotonic() - started
        assert not bench.network.subnet.overlaps(swarm_bench.network.subnet)
        assert len(bench.manager.client().nodes.list()) == 2
        paths = [bench.network.path(name) for name in ("switch", "manager", "worker1")]
        link, runtime_dir, cgroups = bench.network.host_if, bench.runtime_dir, bench.nodes["worker1"].cgroup_parent
        stopping = time.monotonic()
    down = time.monotonic() - stopping

    print(f"second bench up in {up:.1f} s (after a crashed one), down in {down:.1f} s")
    assert not any(is_running(pid) for pid in crashed_pids)
    assert subprocess.run(["ip", "link", "show", link], capture_output=True).returncode != 0
    assert not any(path.exists() for path in paths)
    assert not runtime_dir.exists()
    assert not mounts_under(state)
    assert not cgroup_dirs(cgroups)
    assert sorted(child.name for child in state.iterdir()) == ["cache"]
    # The session's bench is untouched.
    assert swarm_bench.manager.client().ping()
