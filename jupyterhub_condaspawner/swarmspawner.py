"""CondaSwarmSpawner (``spawner_class = "conda-swarm"``): each server is a Docker Swarm service.

Glue over CondaSpawner (profiles, spec, builder, failures, progress) and DockerSpawner's
SwarmSpawner (services on the manager); the Swarm concepts are in swarm.py. A spawn:
the choice is validated and checked against the swarm's nodes (a request no node could
ever meet is refused at once) -> the image is looked up in the registry or built and
pushed there (every node pulls it from there) -> a service is created with the GPUs as a
generic-resource reservation, the model as a placement constraint, CPU and memory
limits and reservations, host networking and a port of its own -> Swarm places it and
assigns GPU ids (a request that must wait says "Waiting for a GPU on any node" until
``start_timeout``) -> the hub reaches the server at its node's address.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import docker.errors
import docker.types
import requests
from dockerspawner import SwarmSpawner
from jupyterhub.utils import random_port
from traitlets import Dict, Float, Unicode, default

from . import homes, swarm, swarmgpus
from .builderrors import BuildError, one_line
from .buildmodel import LABEL_KEY, ImageInfo
from .failures import StartFailure, explain
from .gpuqueue import QueueCancelled
from .gpus import LABEL_SERVER, LABEL_USER, Allocation, GpuUnavailable
from .hubservices import GpuSample, HubServices, hub_services
from .profiles import Profile
from .spawncontainer import evaluated_setting
from .spawner import CondaSpawner
from .spawngpus import QUEUE_INTERRUPTED
from .swarm import LABEL_GPU_REQUEST, LABEL_PORT, ServiceRequest, SwarmState

# How often a starting server's task is read (the progress page follows it).
TASK_POLL_S = 1.0
# Swarm's default: a removed task gets SIGTERM, then SIGKILL this much later.
STOP_GRACE_NS = 10_000_000_000
_user_locks: dict[str, asyncio.Lock] = {}
_NODE_WAIT_INTERRUPTED = ("Your last start of {} was waiting for Docker Swarm to place it when the hub restarted, "
                          "and did not go on: start it again")
# Swarm's reason when it ends a task whose node was updated (relabelled, drained and made active,
# a manager restart): with GPUs as named generic resources, every GPU task on that node.
_NODE_UPDATE_REJECTION = "assigned node no longer meets constraints"
# Swarm's limit on a service's name (a DNS label: servers are reached by it with dnsrr).
MAX_SERVICE_NAME = 63
# How old a read of the swarm the checks on the event loop (form, options) may judge by.
SWARM_STATE_FRESH_S = 60.0
SWARM_CHECK_READ_S = 10.0  # how long the options' check waits for the manager
_last_read: dict[int, tuple[float, SwarmState]] = {}  # per hub (its config): when, and what


class CondaSwarmSpawner(CondaSpawner, SwarmSpawner):
    """Spawn JupyterLab as a Docker Swarm service; Swarm places it and assigns its GPUs."""

    gpu_resource = Unicode(
        swarm.GPU_RESOURCE,
        config=True,
        help="""The Swarm generic resource that GPU nodes declare in their daemon.json
        ("node-generic-resources": ["NVIDIA-GPU=GPU-5d6f...", ...]); a profile's gpus: N
        reserves N of it.

        c.CondaSwarmSpawner.gpu_resource = "NVIDIA-GPU"
        """,
    )

    gpu_model_label = Unicode(
        swarm.GPU_MODEL_LABEL,
        config=True,
        help="""The node label holding a GPU node's model (`docker node update --label-add
        nvidia.gpu.product="NVIDIA A100-SXM4-80GB" NODE`); a profile's gpu_model glob becomes a
        placement constraint on it. Swarm refuses '/' in constraint keys, hence not Kubernetes'
        nvidia.com/gpu.product.

        c.CondaSwarmSpawner.gpu_model_label = "nvidia.gpu.product"
        """,
    )

    cuda_label = Unicode(
        swarm.CUDA_LABEL,
        config=True,
        help="""The node label holding the newest CUDA version a GPU node's driver supports
        ("CUDA Version" in nvidia-smi: `docker node update --label-add nvidia.cuda.version=12.4
        NODE`). A profile's cuda keeps its servers off nodes labelled older, and is refused at
        once when every node with fitting GPUs is older. Nodes without it are not checked.

        c.CondaSwarmSpawner.cuda_label = "nvidia.cuda.version"
        """,
    )

    gpu_metrics_url = Unicode(
        swarmgpus.DEFAULT_URL,
        config=True,
        help="""Where the hub reads each GPU node's GPU utilization (for the GPU metrics and
        GPU-aware idle culling): NVIDIA's dcgm-exporter, run on every GPU node (e.g. as a
        global Swarm service with host networking). {address} is the node's swarm address,
        {hostname} its name. "" turns reading off: held GPUs then count as busy, never idle.

        c.CondaSwarmSpawner.gpu_metrics_url = "http://{address}:9400/metrics"
        """,
    )

    launcher_python = Unicode(
        "python3",
        config=True,
        help="""The image's Python, which starts the server after copying Swarm's GPU ids
        (DOCKER_RESOURCE_<gpu_resource>) into CONDASPAWNER_GPUS. Found on the image's PATH
        unless it is a path.

        c.CondaSwarmSpawner.launcher_python = "/opt/conda/bin/python3"
        """,
    )

    start_margin = Float(
        10.0,
        min=0.0,
        config=True,
        help="""Seconds before start_timeout at which a server still waiting for a GPU (or a
        node) gives up with one line and its service is removed, before the hub's own timeout
        cuts the start short.

        c.CondaSwarmSpawner.start_margin = 10
        """,
    )

    volume_driver = Unicode(
        "",
        config=True,
        help="""The volume driver of the servers' named volumes (homes), for the node that runs the
        server to create them with: "local" with NFS options (volume_driver_options) or a
        multi-host volume plugin, so that a server finds its home on any node. "" (the default):
        Docker's local volumes, a separate home on each node.

        c.CondaSwarmSpawner.volume_driver = "local"
        """,
    )

    volume_driver_options = Dict(
        value_trait=Unicode(),
        config=True,
        help="""Options of volume_driver (docker volume create --opt). Values are templates with
        {username} and {servername}, the escaped names ([a-z0-9-], one per user), as in volume
        names; raw user text ({raw_username}) is refused. NFS through the local driver:

        c.CondaSwarmSpawner.volume_driver_options = {"type": "nfs",
            "o": "addr=nfs.example.edu,rw,nfsvers=4", "device": ":/export/home/{username}"}
        """,
    )

    @default("network_name")
    def _default_swarm_network_name(self) -> str:
        # Swarm's virtual IPs and routing mesh need IPVS; host networking needs neither.
        return "host"

    @default("object_name")
    def _object_name_default(self) -> str:
        """name_template's service name, or, past Swarm's 63 characters (an e-mail address as the
        user name), its start and a digest of the user's and server's names: one per server."""
        name = super()._object_name_default()
        if len(name) <= MAX_SERVICE_NAME:
            return name
        digest = hashlib.sha256(f"{self.user.name}\0{self.name}".encode()).hexdigest()[:16]
        return f"{name[:MAX_SERVICE_NAME - len(digest) - 1].rstrip('-')}-{digest}"

    @default("cmd")
    def _default_swarm_cmd(self) -> list[str]:
        # The base recipe's CMD (the manager may not have the image to read it from).
        return ["jupyterhub-singleuser"]

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._deadline = 0.0
        self._request = ServiceRequest()
        self._constraints: list[str] = []
        self._assigned: tuple[str, ...] = ()
        self._node = ""
        self._failed_nodes: dict[str, str] = {}  # node ID -> why this start's task ended there

    # -- the swarm, as the manager reports it ---------------------------------------------

    def read_swarm(self, service_id: str | None = None) -> SwarmState:
        """Nodes and conda-swarm tasks now (blocking: a few manager API calls)."""
        return swarm.read_swarm(self.client, self.gpu_resource, self.gpu_model_label, service_id, self.cuda_label)

    async def _read_swarm(self, service_id: str | None = None) -> SwarmState:
        state = await asyncio.wrap_future(self.executor.submit(self.read_swarm, service_id))
        _last_read[id(self.config)] = (time.monotonic(), state)
        return state

    def service_request(self, profile: Profile) -> ServiceRequest:
        """The profile's GPUs, model, limits and reservations.

        Limits: the profile's, else the admin's defaults (cpu_limit, mem_limit). Reservations:
        the admin's guarantees (cpu_guarantee, mem_guarantee), else what the profile itself
        limits: a profile that says 8 CPUs gets 8 CPUs; the admin's default limits stay caps.
        """
        configured_cpu, configured_mem = self._configured_limits
        return ServiceRequest(
            gpus=profile.gpus,
            gpu_model=profile.gpu_model if profile.gpus else None,
            cpu_limit=profile.cpu_limit or configured_cpu,
            mem_limit=profile.mem_limit or configured_mem,
            cpu_reservation=self.cpu_guarantee or profile.cpu_limit,
            mem_reservation=self.mem_guarantee or profile.mem_limit,
            profile=profile.slug,
            cuda=profile.cuda if profile.gpus else None,
        )

    # -- CondaSpawner's hooks ---------------------------------------------------------------

    def gpu_sampler(self, services: HubServices) -> Callable[[], GpuSample]:
        """Swarm's task state for the holders, the nodes' dcgm-exporters for the utilization."""
        sampler = swarmgpus.SwarmGpuSampler(self.read_swarm, self.utilization_source(),
                                            services.allocator.idle_utilization)
        return sampler.sample

    def utilization_source(self) -> swarmgpus.UtilizationSource:
        """Where the nodes' GPU readings come from (the environments page's GPU map reads it too)."""
        if self.gpu_metrics_url:
            return swarmgpus.DcgmExporterSource(self.gpu_metrics_url, log=self.log)
        return _NoReadings()

    def _holds_gpus(self) -> bool:
        return bool(self._request.gpus or self._assigned)

    def check_gpus_feasible(self, profile: Profile) -> None:
        """Refuse at once what no node could ever run, or more GPUs than the per-user quota.

        Called on the hub's event loop (the form, the REST options): it reads no manager, which
        may hang, but judges by the swarm as last read (at most SWARM_STATE_FRESH_S ago; not
        at all before a first read). The start checks again, on a fresh read.
        """
        request = self.service_request(profile)
        quota = self.services.allocator.per_user_gpu_quota
        try:
            swarm.check_quota(SwarmState((), ()), self.user.name, self.name, request.gpus, quota,  # alone
                              request.profile)
            read_at, state = _last_read.get(id(self.config), (0.0, None))
            if state is not None and time.monotonic() - read_at <= SWARM_STATE_FRESH_S:
                swarm.check_feasible(state, request)
        except GpuUnavailable as error:
            raise explain(error, custom_spec=False) from None

    async def refresh_gpu_view(self) -> None:
        """Read the swarm for the options' check (off the loop; a manager that does not answer
        within SWARM_CHECK_READ_S leaves the check to the start)."""
        try:
            await asyncio.wait_for(self._read_swarm(), SWARM_CHECK_READ_S)
        except (asyncio.TimeoutError, docker.errors.DockerException, requests.RequestException) as error:
            self.log.warning("Cannot read the swarm to check %s's options: %s", self._log_name, one_line(error))

    async def check_gpus_feasible_now(self, profile: Profile) -> None:
        """The start's check, on the swarm as the manager reports it now (off the event loop)."""
        if self.service_request(profile).gpus:
            await self._read_swarm()
        self.check_gpus_feasible(profile)

    def restore_gpu_table(self, allocator: Any) -> None:
        """Nothing to restore: Swarm's task state says who holds which GPU, not the hub's table."""

    async def form_gpu_count(self) -> int:
        try:
            state = await self._read_swarm()
        except (docker.errors.DockerException, requests.RequestException):
            return 0
        return max((len(node.gpus) for node in state.nodes), default=0)

    def form_gpu_note(self, profile: Profile, gpu_count: int) -> str:
        if profile.gpus <= gpu_count:
            return ""
        return "no node has a GPU" if gpu_count == 0 else f"no node has more than {gpu_count} GPU(s)"

    async def start(self) -> tuple[str, int]:
        self._deadline = time.monotonic() + max(self.start_timeout - self.start_margin, 0)
        self._assigned, self._node = (), ""
        self._failed_nodes = {}
        return await super().start()

    async def _ensure_image(self, request: Any) -> ImageInfo:
        self._check_home_settings()  # the admin's settings, before anything is built
        if not self.services.builder.registry:
            raise BuildError("the conda-swarm spawner needs ImageBuilder.registry", phase="config",
                             cause="servers run on several nodes, which pull their images from a registry "
                                   "(set ImageBuilder.registry)")
        return await super()._ensure_image(request)

    async def _pull_if_missing(self, info: ImageInfo, low: int, high: int) -> None:
        """Nothing to pull here: the node Swarm picks pulls the pinned reference itself."""

    async def _allocate_gpus(self, profile: Profile) -> Allocation | None:
        """Nothing to allocate: Swarm's scheduler assigns GPUs (the quota is checked at create_object)."""
        self._request = self.service_request(profile)
        return None

    def _prepare_container(self, info: ImageInfo, allocation: Allocation | None) -> None:
        self._extra_labels = {LABEL_USER: self.user.name, LABEL_SERVER: self.name, LABEL_KEY: info.key,
                              LABEL_GPU_REQUEST: str(self._request.gpus)}
        self._extra_env, self._device_requests = {}, []
        self.ip = "0.0.0.0"  # the node's every address; the hub connects to the one Swarm reports

    async def _replace_if_changed(self, info: ImageInfo) -> None:
        """A leftover service is removed by DockerSpawner.start (services are never kept)."""

    # -- the service ------------------------------------------------------------------------

    @property
    def mount_driver_config(self) -> docker.types.DriverConfig | None:
        """volume_driver with its options rendered for this server (escaped names only)."""
        if not self.volume_driver:
            return None
        names = self.template_namespace()
        options = homes.render_driver_options(self.volume_driver_options, names["username"], names["servername"])
        return docker.types.DriverConfig(self.volume_driver, options or None)

    @property
    def mounts(self) -> list[docker.types.Mount]:  # type: ignore[override]
        """``volumes`` as service mounts: a named volume (created by the node, through ``volume_driver``
        when set, labelled with its owner) or, for an absolute path, a bind mount of the node's folder.
        (SwarmSpawner binds both.)"""
        mounts = []
        driver = self.mount_driver_config
        for source, volume in self.volume_binds.items():
            is_path = source.startswith("/")
            mounts.append(docker.types.Mount(target=volume["bind"], source=source, read_only=volume["mode"] == "ro",
                                             type="bind" if is_path else "volume",
                                             driver_config=None if is_path else driver,
                                             labels=None if is_path else {LABEL_USER: self.user.name}))
        return mounts

    def _check_home_settings(self) -> None:
        """Volume names and driver options name escaped names only: refused in one line otherwise."""
        try:
            homes.check_volume_names([*self.volumes, *self.read_only_volumes])
            homes.check_driver_options(self.volume_driver_options)
        except homes.HomeSettingsError as error:
            raise StartFailure(f"The hub's home volume settings are refused ({error}); tell the hub admin",
                               reason="config", status_code=500) from None

    async def create_object(self) -> dict[str, Any]:
        """Create the service: the quota is checked against Swarm's tasks under a per-user lock."""
        lock = _user_locks.setdefault(self.user.name, asyncio.Lock())
        async with lock:
            state = await self._read_swarm()
            quota = self.services.allocator.per_user_gpu_quota
            swarm.check_quota(state, self.user.name, self.name, self._request.gpus, quota, self._request.profile)
            swarm.check_feasible(state, self._request)  # the nodes may have changed since the form
            self._constraints = swarm.placement_constraints(state, self._request, self.gpu_model_label,
                                                            self.cuda_label)
            self._constraints += [f"node.id!={node_id}" for node_id in self._failed_nodes]
            self.port = _free_port(state.ports)
            labels = {**self._extra_labels, LABEL_PORT: str(self.port)}
            await self.reload_registry_credentials()
            return await self.docker("create_service", **(await self._service_kwargs(labels)))

    async def reload_registry_credentials(self) -> None:
        """Read Docker's config again for the service's X-Registry-Auth: DockerSpawner's client read
        it once, and after a `docker login` rotates a password or token the nodes could not pull."""
        client = await asyncio.to_thread(lambda: self.client)
        await asyncio.to_thread(client.reload_config)

    async def _service_kwargs(self, labels: dict[str, str]) -> dict[str, Any]:
        container = dict(
            image=self.image,
            args=swarm.launcher_args(await self.get_command(), self.gpu_resource, self.launcher_python),
            env=self.get_env(),
            labels=labels,
            mounts=self.mounts,
            cap_drop=list(self.cap_drop) or None,
            stop_grace_period=STOP_GRACE_NS,
        )
        container.update(self.extra_container_spec)
        placement = dict(constraints=self._constraints or None)
        placement.update(self.extra_placement_spec)
        task = dict(
            container_spec=docker.types.ContainerSpec(**container),
            resources=swarm.resources(self._request, self.gpu_resource),
            # A server that ends stays ended: the hub notices (poll) and the user starts it again.
            # Restarted elsewhere, it would listen at an address the hub does not know.
            restart_policy=docker.types.RestartPolicy(condition="none"),
            placement=docker.types.Placement(**placement),
            networks=[self.network_name] if self.network_name else [],
        )
        task.update(self.extra_task_spec)
        endpoint: dict[str, Any] = {} if self.network_name == "host" else {"mode": "dnsrr"}
        endpoint.update(self.extra_endpoint_spec)
        kwargs: dict[str, Any] = dict(
            task_template=docker.types.TaskTemplate(**task),
            endpoint_spec=docker.types.EndpointSpec(**endpoint),
            name=self.service_name,
            labels=labels,
        )
        kwargs.update(await evaluated_setting(self, self.extra_create_kwargs) or {})
        return kwargs

    async def start_object(self) -> None:
        """Wait until the task runs, saying where it stands; fail in one line if it cannot.

        While it waits, a hub that stops leaves the user a notice for the next spawn page
        (taken back when the wait ends otherwise), as the single-host GPU queue does.
        """
        what = self._idle_watch.get("profile_name") or (self.user_options or {}).get("profile") or "your server"
        self._post_restart_notice((QUEUE_INTERRUPTED if self._request.gpus else _NODE_WAIT_INTERRUPTED).format(what))
        with self._restart_notice_kept_if_cancelled():
            await self._wait_for_task()

    async def _wait_for_task(self) -> None:
        said, service_id = "", self.object_id
        while True:
            try:
                state = await self._read_swarm(service_id)
            except docker.errors.NotFound:
                if self.object_id:
                    raise
            if not self.object_id:  # stop() removed the service: the user gave up waiting
                message = "The start was cancelled while it waited for a GPU or a node"
                raise QueueCancelled(message, message)
            task = state.task_for(service_id)
            if task is not None and task.state == "running":
                node = state.node(task.node_id)
                self._assigned, self._node = task.gpus, node.hostname if node else task.node_id
                gpus = f" with GPU {', '.join(task.gpus)}" if task.gpus else ""
                await self._feed.publish("start", 92, f"Running on node {self._node}{gpus}")
                return
            if task is not None and (task.state in swarm.ENDED_STATES or not task.live):
                service_id = await self._try_another_node(state, task)
                said = ""
                continue
            message = self._waiting_message(state, task)
            if message != said:
                said = message
                await self._feed.publish("start", 91, message)
            if time.monotonic() >= self._deadline:
                await self._remove_quietly()
                raise self._timed_out(state, task)
            await asyncio.sleep(TASK_POLL_S)

    async def _try_another_node(self, state: SwarmState, task: swarm.TaskInfo) -> str:
        """The task ended before it ran (a node that cannot pull, or went down): a new service
        kept off that node, and its ID; StartFailure when no other node could run it."""
        await self._remove_quietly()
        node = state.node(task.node_id)
        name = node.hostname if node else task.node_id
        cause = _why_task_ended(task, node)
        self._failed_nodes[task.node_id] = f"node {name}: {cause}"
        self.log.warning("Server %s could not start on node %s (%s); %s", self._log_name, name, task.reason,
                         "see that node's Docker log")
        others = [other for other in state.nodes if other.id not in self._failed_nodes and self._request.fits(other)]
        if not others:
            raise StartFailure(f"Docker Swarm could not start your server: {'; '.join(self._failed_nodes.values())}; "
                               "try again later, or tell the hub admin (those nodes' Docker logs say why)",
                               reason="swarm", status_code=503)
        await self._feed.publish("start", 91, f"Node {name} could not start your server ({cause}): trying another node")
        created = await self.create_object()
        self.object_id = created["ID"]
        return self.object_id

    def _waiting_message(self, state: SwarmState, task: swarm.TaskInfo | None) -> str:
        if task is None or task.state in ("new", "allocated", "pending"):
            reason = task.error if task else ""  # why the scheduler has not placed it (none yet at first)
            if "insufficient resources" in reason and state.waiting_for(self._request) == "a GPU":
                return (f"Waiting for a GPU on any node: {state.held_gpus()} of {state.total_gpus} GPUs are held; "
                        "your server starts when one is free")
            if "insufficient resources" in reason:
                return (f"Waiting for CPU or memory on a node that fits: {self._request.describe()}, and every such "
                        "node has less free; your server starts when a server there stops")
            return f"Waiting for a node that fits: {reason}" if reason else "Waiting for Docker Swarm to place it"
        node = state.node(task.node_id)
        where = node.hostname if node else task.node_id
        if task.state in ("assigned", "accepted", "preparing"):
            return f"Starting on node {where} (it pulls the image if it lacks it)"
        return f"Starting on node {where}"

    def _timed_out(self, state: SwarmState, task: swarm.TaskInfo | None) -> GpuUnavailable:
        waited = f"{self.start_timeout:.0f} s" if self.start_timeout < 120 else f"{self.start_timeout / 60:.0f} min"
        reason = task.reason if task else "no task"
        if self._request.gpus and state.waiting_for(self._request) == "a GPU":
            user = (f"No GPU is free on this hub: {state.total_gpus - state.held_gpus()} of {state.total_gpus} "
                    f"({self._request.describe(True)}; no node had one free within {waited}: try again later)")
        else:
            user = (f"No node had the CPU or memory free for your server within {waited} "
                    f"({self._request.describe()}): try again later")
        return GpuUnavailable(f"{self._request.describe()}: not placed within start_timeout ({reason})", user)

    async def _remove_quietly(self) -> None:
        try:
            await self.remove_object()
        except docker.errors.DockerException as error:
            self.log.warning("Could not remove service %s: %s", self.service_name, error)
        self.object_id = ""

    async def remove_object(self) -> None:
        if not self.object_id:
            return
        self.log.info("Removing service %s (%s)", self.service_name, self.object_id[:7])
        try:
            await self.docker("remove_service", self.object_id)
        except docker.errors.NotFound:
            pass

    async def get_ip_and_port(self) -> tuple[str, int]:
        """Host networking: the address of the node the task runs on; otherwise the service's name (dnsrr)."""
        if self.network_name != "host":
            return self.service_name, self.port
        state = await self._read_swarm(self.object_id)
        task = state.task_for(self.object_id)
        node = state.node(task.node_id) if task else None
        if node is None or not node.address:
            raise StartFailure("Docker Swarm did not say which node runs your server; tell the hub admin",
                               reason="swarm", status_code=500)
        return node.address, self.port

    async def poll(self) -> int | str | None:
        """None while the task is on its way or running on a node that is up; else why it is not.

        A server found dead has its service removed here, as a container with auto_remove goes
        by itself: the hub calls stop() only for servers poll says are running, and a service
        left behind would restart its container (and take a GPU) if a dead node came back.
        """
        if self._before_container:  # a start that failed before its service was created
            self._keep_failure_visible()
            return 0
        try:
            service = await self.get_object()
            if not service:
                hub_services(self).culler.forget(self.user.name, self.name)
                return 0
            state = await self._read_swarm(self.object_id)
        except Exception as error:  # the manager does not answer: not a reason to forget the server
            self._unknown_while_unanswered(error)
            return None
        task = state.task_for(self.object_id)
        if task is None:
            return None  # just created: no task yet
        node = state.node(task.node_id)
        where = f" on node {node.hostname}" if node else ""
        # "unknown": what Swarm says of every node for a moment after a leader change.
        if task.state == "running" and node is not None and node.state in ("down", "disconnected"):
            status = f"node {node.hostname} is {node.state}"
        elif not task.live:
            status = f"task {task.state}{where} (desired state {task.desired_state}): {task.reason}"
        else:
            return None
        self.log.warning("Server %s stopped: %s; removing service %s", self._log_name, status, self.service_name)
        await self._remove_quietly()
        services = hub_services(self)
        services.culler.forget(self.user.name, self.name)  # its GPUs are Swarm's again
        services.notices.post(self.user.name, self.name, self._ended_notice(status, task, node))
        return status

    def _ended_notice(self, status: str, task: swarm.TaskInfo, node: swarm.NodeInfo | None) -> str:
        """What the user's next spawn page says of a server Swarm ended (the hub did not stop it)."""
        what = self._idle_watch.get("profile_name") or (self.user_options or {}).get("profile") or "your profile"
        where = f"node {node.hostname}" if node is not None else "its node"
        if node is not None and node.state in ("down", "disconnected"):  # Swarm says "rejected" then too
            return f"Your server on {what} stopped: {where} is {node.state} (start it again: Swarm picks a node that is up)"
        if _NODE_UPDATE_REJECTION in (task.reason or "") and task.gpus:
            return (f"Your server on {what} was stopped by Docker Swarm when {where} was updated (Swarm ends GPU "
                    "servers on any update of their node): start it again")
        return f"Your server on {what} stopped on {where} ({status}): start it again"

    # -- state ------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if "condaspawner" in state:
            state["condaspawner"]["gpus"] = list(self._assigned)
            state["condaspawner"]["node"] = self._node
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        saved = state.get("condaspawner") or {}
        self._assigned, self._node = tuple(saved.get("gpus") or ()), saved.get("node", "")
        self._allocation = None  # Swarm holds the GPUs, not the hub's allocator
        if self._assigned:
            self._watch_gpu_idleness(self._profile_of_saved_options(), saved)


def _why_task_ended(task: swarm.TaskInfo, node: swarm.NodeInfo | None) -> str:
    """A task's end before it ran, in a few words: the node's state, or what its daemon said."""
    if node is not None and node.state in ("down", "disconnected"):
        return f"the node is {node.state}"
    if "No such image" in task.reason or "pull" in task.reason.lower():
        return "it could not pull the image from the registry"
    return task.reason or task.state


class _NoReadings:
    """gpu_metrics_url is "": no GPU is ever read as idle."""

    def read(self, nodes: Sequence[swarm.NodeInfo]) -> dict[str, swarmgpus.GpuReading]:
        return {}


def _free_port(taken: frozenset[int] | set[int]) -> int:
    """A port for a server on its node, not used by any other conda-swarm server of the swarm."""
    while True:
        port = random_port()
        if port not in taken:
            return port
