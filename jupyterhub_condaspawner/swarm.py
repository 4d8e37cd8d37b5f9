"""Docker Swarm: what the conda-swarm spawner knows about a swarm, and how a profile becomes a service.

Swarm does the placing; this module only reads and translates:

- **GPUs are generic resources.** Each GPU node declares its GPUs in its daemon.json
  (``"node-generic-resources": ["NVIDIA-GPU=GPU-5d6f...", ...]``) and carries its model as
  a node label (``nvidia.gpu.product``: Swarm refuses a ``/`` in constraint keys). A
  profile's ``gpu_model`` glob becomes a placement constraint on that label; its
  ``cpu_limit``/``mem_limit`` limits and reservations. Its ``gpus: N`` becomes either N GPU
  ids the hub picked (swarmqueue.py; ``gpu_assignment = "hub"``): a ``node.id`` constraint,
  the ids in the service's ``io.condaspawner.gpus`` label and in ``DOCKER_RESOURCE_NVIDIA-GPU``
  (:func:`pinned_gpus_env`); or a reservation of N ``NVIDIA-GPU``, whose ids Swarm's scheduler
  picks and hands to the task (``task["GenericResources"]``, and the same variable). The
  container's launcher (:func:`launcher_args`) copies that variable into ``CONDASPAWNER_GPUS``.
- **Who holds which GPU** is read from the manager's task state (:func:`read_swarm`: the
  label, or Swarm's assignment): restart-safe, and nothing kept only in the hub's memory.
- **CUDA against the drivers**: a GPU node carries the newest CUDA its driver supports as
  a node label (``nvidia.cuda.version``, "CUDA Version" of ``nvidia-smi``), as it carries its
  model. A profile's ``cuda`` keeps its servers off nodes whose label is older (a ``!=``
  constraint per such version: Swarm compares labels only for equality); nodes without the
  label are not checked, like a host whose driver NVML cannot read.
- **Feasibility** (:func:`check_feasible`): a request no node of the swarm could ever meet
  (too many GPUs, a model no node has, drivers too old for its CUDA, more CPU or memory
  than any node) is refused at once; one that only has to wait for a GPU waits in the hub's
  GPU queue (swarmqueue.py) until a node has one free, and only then becomes a service.

Nothing here holds state between calls: every answer comes from the manager's API.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import docker.types

from . import swarmplacement
from .gpus import (
    ENV_GPUS,
    LABEL_GPUS,
    LABEL_SERVER,
    LABEL_USER,
    CudaIncompatible,
    GpuInfeasible,
    GpuOverQuota,
    GpuQuotaExceeded,
    cuda_supported,
)
from .gputable import parse_uuids

GPU_RESOURCE = "NVIDIA-GPU"
GPU_MODEL_LABEL = "nvidia.gpu.product"
CUDA_LABEL = "nvidia.cuda.version"  # the newest CUDA the node's driver supports, "12.4"
LABEL_PORT = "io.condaspawner.port"  # the server's port on its node (host networking)
LABEL_GPU_REQUEST = "io.condaspawner.gpus.requested"  # how many GPUs the service reserves

# Task states (docker/swarmkit api/types.proto) before "running", and after it.
WAITING_STATES = frozenset({"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"})
LIVE_STATES = WAITING_STATES | {"running"}
# States of a task whose container may exist on its node: it holds its GPUs (and port) whatever
# Swarm now wants of it, until it has ended (a stopped server's container gets its grace period).
ON_NODE_STATES = frozenset({"assigned", "accepted", "preparing", "ready", "starting", "running"})
ENDED_STATES = frozenset({"complete", "shutdown", "failed", "rejected", "remove", "orphaned"})

# Copies Swarm's GPU assignment into CONDASPAWNER_GPUS, then runs the server. A shell would not
# do: the variable's name has a hyphen, which POSIX shells drop from their environment.
_LAUNCHER = (
    "import os, sys\n"
    "os.environ[sys.argv[1]] = os.environ.get(sys.argv[2], '')\n"
    "os.execvp(sys.argv[3], sys.argv[3:])\n"
)


class SwarmInfeasible(GpuInfeasible):
    """No node of the swarm could ever run this request (GPUs, model, CPU or memory)."""


class SwarmCudaIncompatible(SwarmInfeasible, CudaIncompatible):
    """Every node with the GPUs a request needs has a driver too old for its CUDA."""


@dataclass(frozen=True)
class NodeInfo:
    """One swarm node as the manager reports it."""

    id: str
    hostname: str
    address: str
    state: str  # ready, down, unknown, disconnected
    availability: str  # active, pause, drain
    role: str
    gpus: tuple[str, ...]
    gpu_model: str | None
    nano_cpus: int
    memory: int
    cuda_version: str | None = None  # the CUDA label: the newest CUDA its driver supports
    attributes: tuple[tuple[str, str], ...] = ()  # what placement constraints judge (swarmplacement.py)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def schedulable(self) -> bool:
        return self.ready and self.availability == "active"


@dataclass(frozen=True)
class TaskInfo:
    """The task of one conda-swarm server (a service has one task at a time)."""

    id: str
    service_id: str
    node_id: str
    state: str
    desired_state: str
    message: str
    error: str
    user: str
    server_name: str
    gpus_requested: int
    gpus: tuple[str, ...]  # assigned by Swarm; empty while pending
    created: str
    nano_cpus: int = 0  # reserved
    memory: int = 0  # reserved, bytes
    updated: str = ""  # when its state last changed (RFC 3339)

    @property
    def live(self) -> bool:
        """Holding (or about to hold) its resources: Swarm wants it running and it has not ended."""
        return self.desired_state in ("running", "ready", "accepted") and self.state in LIVE_STATES

    @property
    def holding(self) -> bool:
        """Holding its GPUs: live, or being shut down (its server stopped, its service removed) while
        its container may still run on its node, as Swarm's scheduler counts it."""
        return self.live or self.state in ON_NODE_STATES

    @property
    def reason(self) -> str:
        return self.error or self.message


@dataclass(frozen=True)
class SwarmState:
    """Nodes and conda-swarm tasks, read at one moment from the manager."""

    nodes: tuple[NodeInfo, ...]
    tasks: tuple[TaskInfo, ...]
    ports: frozenset[int] = frozenset()  # the node ports live conda-swarm servers listen on

    def node(self, node_id: str) -> NodeInfo | None:
        return next((node for node in self.nodes if node.id == node_id), None)

    @property
    def total_gpus(self) -> int:
        return sum(len(node.gpus) for node in self.nodes)

    def holders(self) -> dict[str, TaskInfo]:
        """GPU id -> the task holding it (TaskInfo.holding): a live one before one being shut down."""
        holding = sorted((task for task in self.tasks if task.holding), key=lambda task: task.live)
        return {gpu: task for task in holding for gpu in task.gpus}

    def held_gpus(self) -> int:
        return len(self.holders())

    def shared_gpu_ids(self) -> dict[str, tuple[str, ...]]:
        """GPU ids more than one node declares (id -> those nodes' hostnames). The hub tells GPUs apart
        by id across the swarm, so while one node's GPU of such an id is held, the others count as held."""
        nodes: dict[str, list[str]] = {}
        for node in self.nodes:
            for gpu in dict.fromkeys(node.gpus):
                nodes.setdefault(gpu, []).append(node.hostname)
        return {gpu: tuple(names) for gpu, names in sorted(nodes.items()) if len(names) > 1}

    def open_gpus(self) -> tuple[int, int]:
        """(held, all) GPUs of the nodes that take new servers now (ready and active): a start that
        waits can get only these, not those of nodes that are down, drained or paused."""
        holders = self.holders()
        gpus = [gpu for node in self.nodes if node.schedulable for gpu in node.gpus]
        return sum(1 for gpu in gpus if gpu in holders), len(gpus)

    def user_gpus(self, user: str, except_server: str | None = None) -> int:
        """GPUs the user's live servers reserve (pending ones included: they get them when placed)."""
        return sum(task.gpus_requested for task in self.tasks
                   if task.live and task.user == user and task.server_name != except_server)

    def free_on(self, node: NodeInfo) -> tuple[int, int, int]:
        """(GPUs, nano-CPUs, memory bytes) of ``node`` that no live conda-swarm task reserves.

        Other services' reservations are not counted: only Swarm knows the whole picture.
        """
        placed = [task for task in self.tasks if task.live and task.node_id == node.id]
        # By id, not by node: the hub's own assignment holds its GPUs before Swarm has placed the task.
        held = set(self.holders())
        return (len([gpu for gpu in node.gpus if gpu not in held]),
                node.nano_cpus - sum(task.nano_cpus for task in placed),
                node.memory - sum(task.memory for task in placed))

    def waiting_for(self, request: ServiceRequest, own: TaskInfo | None = None) -> str:
        """What a pending request lacks: "a GPU" when no up node has enough free GPUs of its kind,
        else "CPU or memory" (a node has the GPUs, but not the CPU or memory reserved beside them).
        ``own``: the request's task, whose GPUs (the hub's assignment, held from its label) are its own."""
        if not request.gpus:
            return "CPU or memory"
        held = set(self.holders()) - set(own.gpus if own is not None else ())
        with_gpus = [node for node in self.nodes if node.schedulable and request.model_matches(node)
                     and request.cuda_matches(node) and sum(gpu not in held for gpu in node.gpus) >= request.gpus]
        return "CPU or memory" if with_gpus else "a GPU"

    def task_for(self, service_id: str) -> TaskInfo | None:
        """The newest task of a service, or None."""
        tasks = [task for task in self.tasks if task.service_id == service_id]
        return max(tasks, key=lambda task: task.created) if tasks else None


def closed_gpus_note(state: SwarmState, open_gpus: int) -> str:
    """", and 2 more are on nodes that take no new servers now (...)", or "" when every GPU node takes them
    (``open_gpus``: the GPUs of the nodes that do, from SwarmState.open_gpus)."""
    closed = state.total_gpus - open_gpus
    return f", and {closed} more are on nodes that take no new servers now (down, drained or paused)" if closed else ""


# -- reading the swarm ----------------------------------------------------------------------


def node_address(attrs: Mapping[str, Any]) -> str:
    """Where a node's host-networked servers listen: the address it joined the swarm with.

    Managers sometimes report ``0.0.0.0`` as their status address; their manager address
    (``host:2377``) then says it.
    """
    address = str((attrs.get("Status") or {}).get("Addr") or "")
    if address in ("", "0.0.0.0"):
        manager = str((attrs.get("ManagerStatus") or {}).get("Addr") or "")
        address = manager.rpartition(":")[0] or manager
    return address


def node_info(attrs: Mapping[str, Any], resource: str = GPU_RESOURCE, model_label: str = GPU_MODEL_LABEL,
              cuda_label: str = CUDA_LABEL) -> NodeInfo:
    description = attrs.get("Description") or {}
    resources = description.get("Resources") or {}
    spec = attrs.get("Spec") or {}
    labels = spec.get("Labels") or {}
    return NodeInfo(
        id=str(attrs.get("ID", "")),
        hostname=str(description.get("Hostname", "")),
        address=node_address(attrs),
        state=str((attrs.get("Status") or {}).get("State", "unknown")),
        availability=str(spec.get("Availability", "active")),
        role=str(spec.get("Role", "worker")),
        gpus=tuple(named_resources(resources.get("GenericResources"), resource)),
        gpu_model=labels.get(model_label) or None,
        nano_cpus=int(resources.get("NanoCPUs") or 0),
        memory=int(resources.get("MemoryBytes") or 0),
        cuda_version=labels.get(cuda_label) or None,
        attributes=swarmplacement.node_attributes(attrs),
    )


def named_resources(items: Iterable[Mapping[str, Any]] | None, resource: str = GPU_RESOURCE) -> list[str]:
    """The ids in a generic-resources list (``{"NamedResourceSpec": {"Kind", "Value"}}``) of one kind."""
    return [str(item["NamedResourceSpec"]["Value"]) for item in items or ()
            if (item.get("NamedResourceSpec") or {}).get("Kind") == resource]


def requested_count(items: Iterable[Mapping[str, Any]] | None, resource: str = GPU_RESOURCE) -> int:
    """How many of a kind a reservation asks for (``{"DiscreteResourceSpec": {"Kind", "Value"}}``)."""
    return sum(int(item["DiscreteResourceSpec"]["Value"]) for item in items or ()
               if (item.get("DiscreteResourceSpec") or {}).get("Kind") == resource)


def task_info(task: Mapping[str, Any], resource: str = GPU_RESOURCE) -> TaskInfo | None:
    """A conda-swarm task (its container carries the user label), or None for any other task."""
    spec = task.get("Spec") or {}
    labels = (spec.get("ContainerSpec") or {}).get("Labels") or {}
    if LABEL_USER not in labels:
        return None
    status = task.get("Status") or {}
    reservations = (spec.get("Resources") or {}).get("Reservations") or {}
    pinned = parse_uuids(str(labels.get(LABEL_GPUS, "")))  # GPUs the hub assigned (gpu_assignment "hub")
    return TaskInfo(
        id=str(task.get("ID", "")),
        service_id=str(task.get("ServiceID", "")),
        node_id=str(task.get("NodeID") or ""),
        state=str(status.get("State", "new")),
        desired_state=str(task.get("DesiredState", "")),
        message=str(status.get("Message") or ""),
        error=str(status.get("Err") or ""),
        user=labels[LABEL_USER],
        server_name=labels.get(LABEL_SERVER, ""),
        gpus_requested=requested_count(reservations.get("GenericResources"), resource) or len(pinned),
        gpus=tuple(named_resources(task.get("GenericResources"), resource)) or pinned,
        created=str(task.get("CreatedAt", "")),
        nano_cpus=int(reservations.get("NanoCPUs") or 0),
        memory=int(reservations.get("MemoryBytes") or 0),
        updated=str(status.get("Timestamp") or ""),
    )


def read_swarm(api: Any, resource: str = GPU_RESOURCE, model_label: str = GPU_MODEL_LABEL,
               service_id: str | None = None, cuda_label: str = CUDA_LABEL) -> SwarmState:
    """Nodes and conda-swarm tasks from the manager (a docker ``APIClient``, or a ``DockerClient``).

    Every live task is read, and every task being shut down whose container may still run (their
    GPUs and ports are what others cannot have: a removed service's tasks are listed by no
    desired-state filter); with ``service_id``, that service's ended tasks too (what became of a server).
    """
    api = getattr(api, "api", api)
    nodes = tuple(node_info(attrs, resource, model_label, cuda_label) for attrs in api.nodes())
    raw = [task for task in api.tasks() if task.get("DesiredState") in ("running", "ready", "accepted")
           or (task.get("Status") or {}).get("State") in ON_NODE_STATES]
    if service_id:
        seen = {task["ID"] for task in raw}
        raw += [task for task in api.tasks(filters={"service": service_id}) if task["ID"] not in seen]
    tasks = tuple(info for info in (task_info(task, resource) for task in raw) if info is not None)
    ports = frozenset(int(port) for task in raw if (task.get("DesiredState") == "running"
                                                    or (task.get("Status") or {}).get("State") in ON_NODE_STATES)
                      and str(port := _container_labels(task).get(LABEL_PORT, "")).isdigit())
    return SwarmState(nodes, tasks, ports)


def shared_gpu_ids_line(shared: Mapping[str, tuple[str, ...]]) -> str:
    """The admin's one line on GPU ids several nodes declare (SwarmState.shared_gpu_ids), or ""."""
    if not shared:
        return ""
    listed = "; ".join(f"{gpu!r} on {', '.join(names)}" for gpu, names in list(shared.items())[:4])
    more = f" and {len(shared) - 4} more" if len(shared) > 4 else ""
    return (f"Swarm nodes declare the same GPU ids ({listed}{more}): the hub tells GPUs apart by id across the "
            "swarm, so while one of them is held the others count as held and stay idle. Declare each GPU by its "
            "UUID (nvidia-smi -L) in the nodes' node-generic-resources")


def _container_labels(task: Mapping[str, Any]) -> Mapping[str, str]:
    return ((task.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels") or {}


# -- a request, its feasibility and its placement ---------------------------------------------


@dataclass(frozen=True)
class ServiceRequest:
    """What one server asks of the swarm."""

    gpus: int = 0
    gpu_model: str | None = None  # a glob on the node's GPU model label
    cpu_limit: float | None = None
    mem_limit: int | None = None  # bytes
    cpu_reservation: float | None = None
    mem_reservation: int | None = None
    profile: str | None = None  # for messages
    cuda: str | None = None  # the CUDA the environment was solved for (GPU requests only)

    def fits(self, node: NodeInfo) -> bool:
        """Whether the node could ever run it (nothing held by anyone)."""
        if self.gpus and (len(node.gpus) < self.gpus or not self.model_matches(node) or not self.cuda_matches(node)):
            return False
        if self.cpu_reservation and node.nano_cpus and self.cpu_reservation * 1e9 > node.nano_cpus:
            return False
        return not (self.mem_reservation and node.memory and self.mem_reservation > node.memory)

    def model_matches(self, node: NodeInfo) -> bool:
        if not self.gpu_model:
            return True
        return node.gpu_model is not None and fnmatch.fnmatchcase(node.gpu_model.lower(), self.gpu_model.lower())

    def cuda_matches(self, node: NodeInfo) -> bool:
        """Whether the node's driver runs this CUDA (a node without the CUDA label passes)."""
        return not self.gpus or cuda_supported(self.cuda, node.cuda_version)

    def describe(self, gpus_only: bool = False) -> str:
        """"'pytorch-gpu' needs 2 GPUs matching '*A100*', 8 CPUs, 32 GiB of memory" (``gpus_only``: no CPUs
        and memory)."""
        who = f"{self.profile!r}" if self.profile else "this server"
        parts = []
        if self.gpus:
            parts.append(f"{self.gpus} GPU" + ("s" if self.gpus != 1 else "")
                         + (f" matching {self.gpu_model!r}" if self.gpu_model else ""))
        if self.cpu_reservation and not (gpus_only and self.gpus):
            parts.append(f"{self.cpu_reservation:g} CPUs")
        if self.mem_reservation and not (gpus_only and self.gpus):
            parts.append(f"{self.mem_reservation / 2**30:.3g} GiB of memory")
        return f"{who} needs " + (", ".join(parts) or "nothing")


def check_feasible(state: SwarmState, request: ServiceRequest) -> None:
    """Raise :class:`SwarmInfeasible` when no node could ever run ``request``.

    Every node counts, even one that is down or drained now: it may come back, and a
    request only it fits then waits (until ``start_timeout``) rather than being refused.
    """
    if any(request.fits(node) for node in state.nodes):
        return
    _check_cuda(state, request)
    gpu_nodes = [node for node in state.nodes if node.gpus]
    most = max((len(node.gpus) for node in gpu_nodes if request.model_matches(node)), default=0)
    models = sorted({node.gpu_model for node in gpu_nodes if node.gpu_model})
    facts = [f"{len(state.nodes)} nodes", f"{state.total_gpus} GPUs in all"]
    if request.gpus:
        facts.append(f"at most {most} of a matching model on one node")
        if request.gpu_model:
            facts.append("models: " + (", ".join(models) or "none labelled"))
    biggest_cpu = max((node.nano_cpus for node in state.nodes), default=0) / 1e9
    biggest_mem = max((node.memory for node in state.nodes), default=0) / 2**30
    facts.append(f"the largest node has {biggest_cpu:g} CPUs and {biggest_mem:.3g} GiB")
    detail = f"{request.describe()}, but no node of the swarm can ever run it ({'; '.join(facts)})"
    if request.gpus and most < request.gpus:
        many = "that many of that model" if request.gpu_model else "that many"
        user = (f"No GPU on this hub fits: 0 of {state.total_gpus} ({request.describe(True)}; no node of this hub "
                f"has {many}: pick another profile or ask the hub admin)")
    else:
        user = (f"No node of this hub can run this server ({request.describe()}; the largest node has "
                f"{biggest_cpu:g} CPUs and {biggest_mem:.3g} GiB): pick another profile or ask the hub admin")
    raise SwarmInfeasible(detail, user)


def _check_cuda(state: SwarmState, request: ServiceRequest) -> None:
    """Raise :class:`SwarmCudaIncompatible` when nodes would have the GPUs but every such driver is too old."""
    if not request.gpus or not request.cuda:
        return
    probe = ServiceRequest(gpus=request.gpus, gpu_model=request.gpu_model, cpu_reservation=request.cpu_reservation,
                           mem_reservation=request.mem_reservation)
    able = [node for node in state.nodes if probe.fits(node)]
    if not able or any(request.cuda_matches(node) for node in able):
        return
    newest = max((node.cuda_version for node in able if node.cuda_version), key=_version_key)
    who = f"{request.profile!r}" if request.profile else "this server"
    message = (f"{who} was built for CUDA {request.cuda}, but the NVIDIA driver of every node with a fitting GPU "
               f"supports CUDA up to {newest} at most: pick a profile built for CUDA {newest} or older, or ask an "
               "admin to update the drivers")
    versions = ", ".join(f"{node.hostname} {node.cuda_version}" for node in sorted(able, key=lambda n: n.hostname))
    raise SwarmCudaIncompatible(f"{message} (nodes' {CUDA_LABEL}: {versions})", message)


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def requested_gpus(services: Iterable[Mapping[str, Any]], user: str, except_server: str) -> int:
    """GPUs the user's other conda-swarm services (the manager's ``services()``) ask for.

    Services, not tasks: Swarm makes a service's task after create_service returns, so a second
    server created just after the first would not see the first's task yet.
    """
    total = 0
    for service in services:
        labels = (service.get("Spec") or {}).get("Labels") or {}
        requested = str(labels.get(LABEL_GPU_REQUEST, ""))
        if labels.get(LABEL_USER) == user and labels.get(LABEL_SERVER, "") != except_server and requested.isdigit():
            total += int(requested)
    return total


def service_ports(services: Iterable[Mapping[str, Any]]) -> frozenset[int]:
    """The node ports conda-swarm services (the manager's ``services()``) were given.

    Services, not tasks, for the same reason as :func:`requested_gpus`: a server created a moment
    ago has no task yet, and another server placed on its node must not take its port.
    """
    ports = (str(((service.get("Spec") or {}).get("Labels") or {}).get(LABEL_PORT, "")) for service in services)
    return frozenset(int(port) for port in ports if port.isdigit())


def check_quota(state: SwarmState, user: str, server_name: str, count: int, quota: int,
                profile: str | None = None, held: int | None = None) -> None:
    """Raise :class:`GpuQuotaExceeded` if the user's other live servers plus this one exceed ``quota``
    (:class:`GpuOverQuota` if this one alone does: no waiting or stopping helps). ``held``: what the
    other servers ask for (:func:`requested_gpus`), else what their live tasks in ``state`` do."""
    if not quota or not count:
        return
    server = f"{user}'s server" + (f" {server_name!r}" if server_name else "")
    server += f" (profile {profile!r})" if profile else ""
    need = f"{server} needs {count} GPU" + ("s" if count != 1 else "")
    if count > quota:
        raise GpuOverQuota(f"{need}, more than the per-user quota of {quota}: pick a smaller profile")
    if held is None:
        held = state.user_gpus(user, except_server=server_name)
    if held + count > quota:
        raise GpuQuotaExceeded(f"{need}, but {user} already holds {held} of their quota of {quota}: "
                               "stop another server first")


def placement_constraints(state: SwarmState, request: ServiceRequest, model_label: str = GPU_MODEL_LABEL,
                          cuda_label: str = CUDA_LABEL) -> list[str]:
    """Swarm constraints for the request's GPU model glob and CUDA, from the labels the nodes carry now.

    Swarm compares labels with ``==``/``!=`` only and ANDs constraints: one matching model
    becomes ``==`` it; several become ``!=`` each model that does not match. A CUDA version
    becomes ``!=`` each CUDA label too old for it.
    """
    return _model_constraints(state, request, model_label) + _cuda_constraints(state, request, cuda_label)


def _model_constraints(state: SwarmState, request: ServiceRequest, model_label: str) -> list[str]:
    if not request.gpus or not request.gpu_model:
        return []
    models = sorted({node.gpu_model for node in state.nodes if node.gpu_model})
    matching = [model for model in models if fnmatch.fnmatchcase(model.lower(), request.gpu_model.lower())]
    if len(matching) == 1:
        return [f"node.labels.{model_label}=={matching[0]}"]
    return [f"node.labels.{model_label}!={model}" for model in models if model not in matching]


def _cuda_constraints(state: SwarmState, request: ServiceRequest, cuda_label: str) -> list[str]:
    """``!=`` every CUDA label value, among the nodes now, too old for the request's CUDA."""
    if not request.gpus or not request.cuda:
        return []
    versions = sorted({node.cuda_version for node in state.nodes if node.cuda_version}, key=_version_key)
    return [f"node.labels.{cuda_label}!={version}" for version in versions
            if not cuda_supported(request.cuda, version)]


def resources(request: ServiceRequest, resource: str = GPU_RESOURCE,
              extra: Mapping[str, Any] | None = None, reserve_gpus: bool = True) -> docker.types.Resources:
    """Limits and reservations of the task, the GPUs as a generic-resource reservation (unless
    ``reserve_gpus`` is False: the hub assigned them, see :func:`pinned_gpus_env`).

    ``extra`` (SwarmSpawner.extra_resources_spec): the admin's limits and reservations, where the
    profile sets none; its generic resources (a mapping) add to the GPUs.
    """
    ours = dict(
        cpu_limit=int(request.cpu_limit * 1e9) if request.cpu_limit else None,
        mem_limit=request.mem_limit or None,
        cpu_reservation=int(request.cpu_reservation * 1e9) if request.cpu_reservation else None,
        mem_reservation=request.mem_reservation or None,
    )
    kwargs = {**(extra or {}), **{key: value for key, value in ours.items() if value is not None}}
    gpus = {resource: request.gpus} if request.gpus and reserve_gpus else {}
    generic = {**((extra or {}).get("generic_resources") or {}), **gpus}
    kwargs["generic_resources"] = generic or None
    return docker.types.Resources(**kwargs)


def reservation(request: ServiceRequest, extra: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """(nano-CPUs, memory bytes) a service reserves: the request's, else the admin's (``extra``), as
    :func:`resources` puts them in its task (what the hub's pick of a node must find free)."""
    reserved = resources(request, extra=extra, reserve_gpus=False).get("Reservations") or {}
    return int(reserved.get("NanoCPUs") or 0), int(reserved.get("MemoryBytes") or 0)


def pinned_gpus_env(gpus: Sequence[str], resource: str = GPU_RESOURCE) -> dict[str, str]:
    """The environment that gives a container the GPUs the hub assigned it, as Swarm's own
    assignment would: the NVIDIA runtime (its ``swarm-resource`` setting) reads the same variable."""
    return {f"DOCKER_RESOURCE_{resource}": ",".join(gpus)}


def launcher_args(command: Sequence[str], resource: str = GPU_RESOURCE, python: str = "python3") -> list[str]:
    """``command``, run by the image's Python after copying Swarm's GPU ids into CONDASPAWNER_GPUS."""
    return [python, "-c", _LAUNCHER, ENV_GPUS, f"DOCKER_RESOURCE_{resource}", *command]


def since_text(created: str) -> str:
    """A task's CreatedAt (RFC 3339 with nanoseconds) as ``YYYY-MM-DDTHH:MM:SSZ``."""
    try:
        return datetime.fromisoformat(created[:19]).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return created


# -- the `condaspawner gpus` report on a swarm ------------------------------------------------


def status_report(state: SwarmState) -> dict[str, Any]:
    """Per node, its GPUs and which server Swarm assigned each to; servers waiting for GPUs. JSON-ready."""
    holders = state.holders()
    nodes = []
    for node in sorted(state.nodes, key=lambda node: node.hostname):
        gpus = []
        for gpu in node.gpus:
            task = holders.get(gpu)
            gpus.append({"id": gpu, "holder": None if task is None else {
                "user": task.user, "server": task.server_name, "state": task.state, "since": since_text(task.created)}})
        nodes.append({"hostname": node.hostname, "address": node.address, "state": node.state,
                      "availability": node.availability, "role": node.role, "gpu_model": node.gpu_model,
                      "gpus": gpus})
    waiting = [{"user": task.user, "server": task.server_name, "gpus": task.gpus_requested, "reason": task.reason}
               for task in state.tasks if task.live and task.gpus_requested and not task.gpus]
    return {"summary": f"{len(state.nodes)} nodes, {state.total_gpus} GPUs, {state.held_gpus()} held",
            "nodes": nodes, "waiting": waiting}


def format_status(report: Mapping[str, Any]) -> str:
    """The swarm report as a table (one row per GPU, or per node without GPUs), then waiting servers."""
    header = ("NODE", "ADDRESS", "STATE", "GPU", "MODEL", "HOLDER", "SINCE")
    rows = [header]
    for node in report["nodes"]:
        state = node["state"] + ("" if node["availability"] == "active" else f" ({node['availability']})")
        for gpu in node["gpus"] or [None]:
            holder = (gpu or {}).get("holder")
            who = "-" if gpu is None else "free"
            if holder:
                who = holder["user"] + (f"/{holder['server']}" if holder["server"] else "")
                who += "" if holder["state"] == "running" else f" ({holder['state']})"
            rows.append((node["hostname"], node["address"], state, gpu["id"] if gpu else "-",
                         node["gpu_model"] or "-", who, holder["since"] if holder else "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append(report["summary"])
    for waiter in report["waiting"]:
        who = waiter["user"] + (f"/{waiter['server']}" if waiter["server"] else "")
        lines.append(f"waiting: {who} for {waiter['gpus']} GPU(s): {waiter['reason'] or 'not placed yet'}")
    return "\n".join(lines)
