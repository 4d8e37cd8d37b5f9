"""swarm.py without a swarm: node and task records as the manager's API gives them, feasibility,
placement constraints, the GPU launcher, the `condaspawner gpus` table, the entry point.

The same functions run against a real swarm in test_swarm_spawner.py; here the inputs are
the shapes the manager returned there (docker 20.10, API 1.41), including the odd ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from jupyterhub_condaspawner import swarm, swarmservice
from jupyterhub_condaspawner.gpus import LABEL_SERVER, LABEL_USER, CudaIncompatible, GpuInfeasible, GpuQuotaExceeded
from jupyterhub_condaspawner.swarm import ServiceRequest, SwarmInfeasible, SwarmState


def node_attrs(name: str, address: str = "10.0.0.2", gpus: tuple[str, ...] = (), model: str | None = None,
               state: str = "ready", cpus: int = 8, memory: int = 64 * 2**30, **extra) -> dict:
    labels = {swarm.GPU_MODEL_LABEL: model} if model else {}
    return {
        "ID": f"id-{name}",
        "Spec": {"Labels": labels, "Role": "worker", "Availability": "active"},
        "Description": {"Hostname": name, "Resources": {
            "NanoCPUs": cpus * 10**9, "MemoryBytes": memory,
            "GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": gpu}} for gpu in gpus]}},
        "Status": {"State": state, "Addr": address},
        **extra,
    }


def task(service: str, user: str, node: str = "", gpus: tuple[str, ...] = (), requested: int = 0,
         state: str = "running", desired: str = "running", server: str = "", port: int = 0, err: str = "") -> dict:
    labels = {"io.condaspawner.user": user, "io.condaspawner.server": server}
    if port:
        labels[swarm.LABEL_PORT] = str(port)
    reservations = {"GenericResources": [{"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": requested}}]} \
        if requested else {}
    return {
        "ID": f"task-{service}", "ServiceID": service, "NodeID": f"id-{node}" if node else "",
        "CreatedAt": "2026-11-30T15:00:02.489672914Z", "DesiredState": desired,
        "Spec": {"ContainerSpec": {"Labels": labels}, "Resources": {"Reservations": reservations}},
        "Status": {"State": state, "Message": state, "Err": err},
        "GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": gpu}} for gpu in gpus],
    }


class FakeApi:
    """The two manager API calls read_swarm makes."""

    def __init__(self, nodes: list[dict], tasks: list[dict]):
        self._nodes, self._tasks = nodes, tasks

    def nodes(self) -> list[dict]:
        return self._nodes

    def tasks(self, filters: dict | None = None) -> list[dict]:
        if filters is None:
            return self._tasks
        if "service" in filters:
            return [t for t in self._tasks if t["ServiceID"] == filters["service"]]
        return [t for t in self._tasks if t["DesiredState"] == filters["desired-state"]]


REPO = Path(__file__).resolve().parents[1]
SWARM_SECTION = "# -- Several GPU hosts in a Docker Swarm"
A100, H100, L4 = "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA L4"


def cluster() -> SwarmState:
    nodes = [node_attrs("manager", "0.0.0.0", ManagerStatus={"Addr": "10.0.0.1:2377"}),
             node_attrs("a1", "10.0.0.2", ("GPU-a1-0", "GPU-a1-1"), A100),
             node_attrs("h1", "10.0.0.3", ("GPU-h1-0", "GPU-h1-1", "GPU-h1-2", "GPU-h1-3"), H100, state="down"),
             node_attrs("l1", "10.0.0.4", ("GPU-l1-0",), L4),
             node_attrs("bare", "10.0.0.5", ("GPU-bare-0",))]  # GPUs, but no model label
    tasks = [task("s1", "ada", "a1", ("GPU-a1-0",), 1, port=40001),
             task("s2", "ada", "", (), 2, state="pending", server="big", port=40002,
                  err="no suitable node (insufficient resources on 5 nodes)"),
             task("s3", "bob", "a1", ("GPU-a1-1",), 1, state="rejected", desired="shutdown"),
             task("s4", "cy", "l1", (), 0, port=40003)]
    tasks.append({**task("other", "x"), "Spec": {"ContainerSpec": {"Labels": {}}}})  # not ours
    return swarm.read_swarm(FakeApi(nodes, tasks))


def test_nodes_and_holders_come_from_the_managers_records():
    state = cluster()

    assert [node.address for node in state.nodes] == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]
    assert state.total_gpus == 8
    assert state.holders().keys() == {"GPU-a1-0"}  # a rejected task holds nothing
    assert sorted(t.service_id for t in state.tasks) == ["s1", "s2", "s4"]  # conda-swarm tasks Swarm wants running
    assert state.user_gpus("ada") == 3 and state.user_gpus("ada", except_server="big") == 1  # pending counts
    assert state.user_gpus("bob") == 0
    assert state.ports == {40001, 40002, 40003}


@pytest.mark.parametrize(("request_", "user_message"), [
    (ServiceRequest(gpus=5, profile="five"),
     "No GPU on this hub fits: 0 of 8 ('five' needs 5 GPUs; no node of this hub has that many: "
     "pick another profile or ask the hub admin)"),
    (ServiceRequest(gpus=3, gpu_model="*A100*", profile="a3"),
     "No GPU on this hub fits: 0 of 8 ('a3' needs 3 GPUs matching '*A100*'; no node of this hub has that many "
     "of that model: pick another profile or ask the hub admin)"),
    (ServiceRequest(gpus=1, gpu_model="*V100*", profile="v"),
     "No GPU on this hub fits: 0 of 8 ('v' needs 1 GPU matching '*V100*'; no node of this hub has that many "
     "of that model: pick another profile or ask the hub admin)"),
    (ServiceRequest(cpu_reservation=9, profile="cpu9"),
     "No node of this hub can run this server ('cpu9' needs 9 CPUs; the largest node has 8 CPUs and 64 GiB): "
     "pick another profile or ask the hub admin"),
    (ServiceRequest(gpus=1, mem_reservation=65 * 2**30, profile="mem"),
     "No node of this hub can run this server ('mem' needs 1 GPU, 65 GiB of memory; the largest node has 8 CPUs "
     "and 64 GiB): pick another profile or ask the hub admin"),
])
def test_what_no_node_could_ever_run_is_refused_in_one_line(request_, user_message):
    with pytest.raises(SwarmInfeasible) as refusal:
        swarm.check_feasible(cluster(), request_)

    assert refusal.value.user_message == user_message
    assert isinstance(refusal.value, GpuInfeasible)  # a 400, as on one host


def test_a_node_that_is_down_still_counts_it_may_come_back():
    swarm.check_feasible(cluster(), ServiceRequest(gpus=4, gpu_model="*H100*"))  # only h1 (down) has 4


def test_gpu_ids_several_nodes_declare_are_named_in_one_line_for_the_admin():
    # Index ids ("0", "1") on every node: the hub tells GPUs apart by id, so it must say so.
    state = swarm.read_swarm(FakeApi([node_attrs("gpu-a", gpus=("0", "1")), node_attrs("gpu-b", gpus=("0", "1")),
                                      node_attrs("gpu-c", gpus=("GPU-5d6f",))],
                                     [task("s1", "alice", node="gpu-a", gpus=("0",), requested=1)]))
    assert state.shared_gpu_ids() == {"0": ("gpu-a", "gpu-b"), "1": ("gpu-a", "gpu-b")}
    assert state.open_gpus() == (2, 5)  # gpu-b's "0" counts as held with gpu-a's: what the line warns of
    line = swarm.shared_gpu_ids_line(state.shared_gpu_ids())
    assert line.startswith("Swarm nodes declare the same GPU ids ('0' on gpu-a, gpu-b; '1' on gpu-a, gpu-b): ")
    assert line.endswith("Declare each GPU by its UUID (nvidia-smi -L) in the nodes' node-generic-resources")
    assert "\n" not in line
    unique = swarm.read_swarm(FakeApi([node_attrs("gpu-a", gpus=("GPU-1",)), node_attrs("gpu-b", gpus=("GPU-2",))], []))
    assert unique.shared_gpu_ids() == {} and swarm.shared_gpu_ids_line({}) == ""


def test_model_globs_become_constraints_swarm_understands():
    state = cluster()

    def constraints(glob: str) -> list[str]:
        return swarm.placement_constraints(state, ServiceRequest(gpus=1, gpu_model=glob))

    assert constraints("*A100*") == [f"node.labels.nvidia.gpu.product=={A100}"]
    # Swarm has no "or": two matching models become "not" every other model.
    assert constraints("NVIDIA [AH]100*") == [f"node.labels.nvidia.gpu.product!={L4}"]
    assert constraints("*") == []
    assert swarm.placement_constraints(state, ServiceRequest(gpus=0, gpu_model="*A100*")) == []


def test_the_quota_counts_services_whose_task_swarm_has_not_made_yet():
    def service(user: str, server: str, gpus: str) -> dict:
        return {"ID": f"{user}-{server}", "Spec": {"Labels": {LABEL_USER: user, LABEL_SERVER: server,
                                                             swarm.LABEL_GPU_REQUEST: gpus}}}

    services = [service("ada", "a", "1"), service("ada", "b", "2"), service("bob", "", "1"), service("ada", "c", "x"),
                {"ID": "not-ours", "Spec": {"Labels": {}}}]
    assert swarm.requested_gpus(services, "ada", except_server="") == 3
    assert swarm.requested_gpus(services, "ada", except_server="b") == 1  # its own, restarted, not twice
    # ada's server "a" was just created: no task yet, so Swarm's tasks say she holds nothing.
    state = SwarmState((), ())
    swarm.check_quota(state, "ada", "d", 1, quota=1)
    with pytest.raises(GpuQuotaExceeded, match="ada's server 'd' needs 1 GPU, but ada already holds 1 of their quota"):
        swarm.check_quota(state, "ada", "d", 1, quota=1, held=swarm.requested_gpus(services[:1], "ada", "d"))


def test_a_port_is_never_given_twice_while_a_server_starts_or_runs(monkeypatch):
    """Two users' starts read the swarm at the same moment: neither's service is listed yet, so
    the hub remembers the ports it gave until their service is removed."""
    services = [{"ID": "s1", "Spec": {"Labels": {swarm.LABEL_PORT: "40001"}}},  # no task yet
                {"ID": "s2", "Spec": {"Labels": {swarm.LABEL_PORT: "x"}}}, {"ID": "not-ours", "Spec": {}}]
    assert swarm.service_ports(services) == {40001}

    draws = iter([40001, 40001, 40002, 40002, 40001, 40003])
    monkeypatch.setattr(swarmservice, "random_port", lambda: next(draws))
    monkeypatch.setattr(swarmservice, "_claimed_ports", set())
    taken = cluster().ports | swarm.service_ports(services)  # 40001-40003, from tasks and services
    first = swarmservice._claim_port(frozenset())
    assert first == 40001
    assert swarmservice._claim_port(frozenset()) == 40002  # 40001 is the first start's
    swarmservice._claimed_ports.discard(first)  # its service removed
    assert swarmservice._claim_port(taken - {40003}) == 40003  # 40001 still runs, as the swarm says
    assert swarmservice._claimed_ports == {40002, 40003}


def test_the_quota_counts_live_tasks_and_a_request_over_it_alone_is_infeasible():
    state = cluster()

    swarm.check_quota(state, "ada", "", 1, quota=3, profile="gpu")  # 2 (big) + 1: the restarted '' not twice
    with pytest.raises(GpuQuotaExceeded, match="ada's server 'second' .* already holds 3 of their quota of 3"):
        swarm.check_quota(state, "ada", "second", 1, quota=3)
    with pytest.raises(GpuInfeasible, match="more than the per-user quota of 2: pick a smaller profile"):
        swarm.check_quota(state, "bob", "", 3, quota=2)
    swarm.check_quota(state, "bob", "", 2, quota=2)
    swarm.check_quota(state, "ada", "x", 9, quota=0)  # no quota


def test_the_launcher_exports_swarms_gpu_ids_without_a_shell():
    args = swarm.launcher_args([sys.executable, "-c", "import os; print(repr(os.environ['CONDASPAWNER_GPUS']))"],
                               python=sys.executable)
    env = {"PATH": os.environ["PATH"], "DOCKER_RESOURCE_NVIDIA-GPU": "GPU-a,GPU-b"}

    with_gpus = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    without = subprocess.run(args, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60)

    assert with_gpus.stdout.strip() == "'GPU-a,GPU-b'", with_gpus.stderr
    assert without.stdout.strip() == "''", without.stderr
    assert args[:2] == [sys.executable, "-c"] and "GPU-a" not in " ".join(args)


def test_the_gpus_table_shows_each_node_its_gpus_and_who_waits():
    report = swarm.status_report(cluster())
    table = swarm.format_status(report)
    print(table)

    lines = table.splitlines()
    assert lines[0].split() == ["NODE", "ADDRESS", "STATE", "GPU", "MODEL", "HOLDER", "SINCE"]
    assert any(line.split()[:4] == ["a1", "10.0.0.2", "ready", "GPU-a1-0"] and "ada" in line for line in lines)
    assert any(line.startswith("a1") and "GPU-a1-1" in line and "free" in line for line in lines)
    assert any(line.startswith("h1") and " down " in line for line in lines)
    assert "5 nodes, 8 GPUs, 1 held" in lines
    assert lines[-1] == "waiting: ada/big for 2 GPU(s): no suitable node (insufficient resources on 5 nodes)"


def test_the_conda_swarm_entry_point_is_installed():
    names = {ep.name: ep.value for ep in entry_points(group="jupyterhub.spawners")}

    assert names["conda-swarm"] == "jupyterhub_condaspawner.swarmspawner:CondaSwarmSpawner"
    assert names["conda"] == "jupyterhub_condaspawner.spawner:CondaSpawner"


def test_a_pending_request_knows_whether_it_lacks_a_gpu_or_the_cpu_beside_one():
    state = cluster()
    a100 = ServiceRequest(gpus=1, gpu_model="*A100*")

    assert state.waiting_for(a100) == "CPU or memory"  # a1 has GPU-a1-1 free (bob's task was rejected)
    assert state.free_on(state.nodes[1])[0] == 1
    assert state.waiting_for(ServiceRequest(gpus=2, gpu_model="*A100*")) == "a GPU"
    assert state.waiting_for(ServiceRequest(gpus=4, gpu_model="*H100*")) == "a GPU"  # h1 is down


def cuda_cluster(versions: dict[str, str | None]) -> SwarmState:
    """Three A100 nodes whose CUDA labels are ``versions`` (None: no label)."""
    nodes = []
    for number, (name, version) in enumerate(versions.items()):
        attrs = node_attrs(name, f"10.0.1.{number + 2}", (f"GPU-{name}-0", f"GPU-{name}-1"), A100)
        if version:
            attrs["Spec"]["Labels"][swarm.CUDA_LABEL] = version
        nodes.append(attrs)
    return swarm.read_swarm(FakeApi(nodes, []))


def test_a_profiles_cuda_keeps_its_servers_off_nodes_whose_driver_is_older():
    state = cuda_cluster({"old": "11.8", "mid": "12.2", "new": "12.4"})
    request = ServiceRequest(gpus=1, gpu_model="*A100*", cuda="12.4", profile="torch")

    swarm.check_feasible(state, request)
    assert swarm.placement_constraints(state, request) == [
        f"node.labels.nvidia.gpu.product=={A100}",
        "node.labels.nvidia.cuda.version!=11.8", "node.labels.nvidia.cuda.version!=12.2"]
    assert swarm.placement_constraints(state, ServiceRequest(gpus=1, cuda="12.2")) == [
        "node.labels.nvidia.cuda.version!=11.8"]
    assert swarm.placement_constraints(state, ServiceRequest(gpus=1, cuda="11.8")) == []
    assert swarm.placement_constraints(state, ServiceRequest(gpus=0, cuda="13.0")) == []  # CPU servers: no driver
    assert swarm.placement_constraints(state, ServiceRequest(gpus=1, cuda="12.4.1")) == [  # 12.4.1 needs 12.4
        "node.labels.nvidia.cuda.version!=11.8", "node.labels.nvidia.cuda.version!=12.2"]
    # Only one node is new enough: a pending server there waits for a GPU, not for "CPU or memory".
    busy = SwarmState(state.nodes, tuple(swarm.task_info(t) for t in [
        task("s1", "ada", "new", ("GPU-new-0",), 1), task("s2", "bob", "new", ("GPU-new-1",), 1)]))
    assert busy.waiting_for(request) == "a GPU"


def test_a_profile_whose_cuda_no_driver_supports_is_refused_at_once_in_one_line():
    state = cuda_cluster({"old": "11.8", "mid": "12.2", "h100": None})
    state = SwarmState(tuple(node for node in state.nodes if node.hostname != "h100"), ())

    with pytest.raises(SwarmInfeasible) as refusal:
        swarm.check_feasible(state, ServiceRequest(gpus=1, cuda="12.4", profile="torch"))

    assert isinstance(refusal.value, CudaIncompatible)  # a 400, as on one host
    assert refusal.value.user_message == (
        "'torch' was built for CUDA 12.4, but the NVIDIA driver of every node with a fitting GPU supports CUDA up "
        "to 12.2 at most: pick a profile built for CUDA 12.2 or older, or ask an admin to update the drivers")
    assert refusal.value.detail.endswith("(nodes' nvidia.cuda.version: mid 12.2, old 11.8)")
    # A node without the label is not checked (as a host whose driver NVML cannot read).
    swarm.check_feasible(cuda_cluster({"old": "11.8", "unlabelled": None}), ServiceRequest(gpus=1, cuda="12.4"))
    # Too few GPUs anywhere is said as such, whatever the drivers.
    with pytest.raises(SwarmInfeasible) as too_many:
        swarm.check_feasible(state, ServiceRequest(gpus=3, cuda="12.4", profile="torch"))
    assert not isinstance(too_many.value, CudaIncompatible)


def test_every_setting_of_the_swarm_spawner_says_what_it_does_with_a_config_example():
    from jupyterhub_condaspawner.swarmspawner import CondaSwarmSpawner

    own = CondaSwarmSpawner.class_own_traits(config=True)
    assert {"volume_driver", "volume_driver_options", "cuda_label", "gpu_metrics_url"} <= set(own)
    for name, trait in own.items():
        assert f"c.CondaSwarmSpawner.{name} = " in (trait.help or ""), name


def test_the_example_configs_swarm_section_uncommented_wins_over_its_one_host_network(tmp_path):
    """An admin uncomments the example's Swarm section: servers get host networking and the hub's
    address every node reaches, not the one-host "jupyterhub" network set further up the file."""
    from jupyterhub.objects import Hub
    from stand_in_user import StandInUser
    from traitlets.config import PyFileConfigLoader

    from jupyterhub_condaspawner.cli import uses_swarm
    from jupyterhub_condaspawner.swarmspawner import CondaSwarmSpawner

    example = (REPO / "jupyterhub_config.example.py").read_text()
    one_host, swarm_section = example.split(SWARM_SECTION)
    # "# c.X.y = ..." and the continuation lines of a setting, whose "#" is followed by indentation
    uncommented = re.sub(r"^# (?=c\.|\s{3,})", "", swarm_section, flags=re.MULTILINE)
    (tmp_path / "jupyterhub_config.py").write_text(one_host + SWARM_SECTION + uncommented)

    config = PyFileConfigLoader("jupyterhub_config.py", str(tmp_path)).load_config()
    spawner = CondaSwarmSpawner(user=StandInUser("erin"), hub=Hub(), config=config)

    assert uses_swarm(config)
    assert config.JupyterHub.hub_connect_ip == "hub.example.edu"
    assert spawner.network_name == "host"
    assert spawner.volume_driver == "local"
    assert spawner.volumes == {"home-{username}": "/home/jovyan"}


def test_condaspawner_gpus_reads_the_swarm_for_a_subclass_of_the_swarm_spawner_the_config_defines(tmp_path):
    from traitlets.config import PyFileConfigLoader

    from jupyterhub_condaspawner.cli import uses_swarm
    from jupyterhub_condaspawner.spawner import CondaSpawner

    (tmp_path / "jupyterhub_config.py").write_text(
        "from jupyterhub_condaspawner.swarmspawner import CondaSwarmSpawner\n\n"
        "class LabSpawner(CondaSwarmSpawner):\n"
        "    pass\n\n"
        "c.JupyterHub.spawner_class = LabSpawner\n")

    config = PyFileConfigLoader("jupyterhub_config.py", str(tmp_path)).load_config()
    one_host = PyFileConfigLoader("jupyterhub_config.py", str(tmp_path)).load_config()
    one_host.JupyterHub.spawner_class = CondaSpawner

    assert uses_swarm(config)
    assert not uses_swarm(one_host)


def test_gpus_a_waiting_start_could_get_leave_out_nodes_that_take_no_new_servers():
    state = cluster()  # h1's 4 GPUs are on a node that is down

    assert state.open_gpus() == (1, 4)  # a1's 2 (one held), l1's and bare's
    assert (state.held_gpus(), state.total_gpus) == (1, 8)


def test_an_admins_extra_resources_fill_what_the_profile_leaves_and_add_to_the_gpus():
    request = ServiceRequest(gpus=2, mem_limit=2**30, mem_reservation=2**30)
    extra = {"mem_limit": 2**20, "cpu_reservation": 250_000_000, "generic_resources": {"FPGA": 1}}

    resources = swarm.resources(request, "NVIDIA-GPU", extra)

    assert resources["Limits"] == {"MemoryBytes": 2**30}  # the profile's wins
    assert resources["Reservations"] == {
        "MemoryBytes": 2**30, "NanoCPUs": 250_000_000,  # the admin's, where the profile sets none
        "GenericResources": [{"DiscreteResourceSpec": {"Kind": "FPGA", "Value": 1}},
                             {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}}],
    }
