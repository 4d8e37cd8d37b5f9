"""CondaSwarmSpawner (``spawner_class = "conda-swarm"``): each server is a Docker Swarm service.

Glue over CondaSpawner (profiles, spec, builder, failures, progress) and DockerSpawner's
SwarmSpawner (services on the manager); the Swarm concepts are in swarm.py. A spawn:
the choice is validated and checked against the swarm's nodes (a request no node could
ever meet is refused at once) -> the image is looked up in the registry or built and
pushed there (every node pulls it from there) -> a GPU start has the nodes that could run it
pull the image (swarmpull.py), then waits its turn in the hub's GPU queue for a node's GPUs
(swarmseat.py, swarmqueue.py) -> a service is created, pinned to that node with those GPU ids
(or, with gpu_assignment "swarm", reserving GPUs as a generic resource), with CPU and memory
limits and reservations, host networking and a port of its own (swarmservice.py) -> Swarm
places and runs it (swarmtask.py) -> the hub reaches the server at its node's address.
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
from traitlets import Dict, Enum, Unicode, default

from . import swarm, swarmgpus
from .builderrors import BuildError, one_line
from .buildmodel import LABEL_KEY, ImageInfo
from .failures import explain
from .gpus import (
    ENV_NVIDIA_VISIBLE_DEVICES,
    NO_GPUS,
    Allocation,
    GpuOverQuota,
    GpuUnavailable,
)
from .hubservices import GpuSample, HubServices
from .owners import server_labels
from .profiles import Profile
from .spawner import CondaSpawner
from .swarm import LABEL_GPU_REQUEST, ServiceRequest, SwarmState
from .swarmpull import SwarmPullMixin
from .swarmseat import SwarmSeatMixin
from .swarmservice import SwarmServiceMixin
from .swarmtask import SwarmTaskMixin
from .traittypes import FiniteFloat

# Swarm's limit on a service's name (a DNS label: servers are reached by it with dnsrr).
MAX_SERVICE_NAME = 63
# How old a read of the swarm the checks on the event loop (form, options) may judge by.
SWARM_STATE_FRESH_S = 60.0
SWARM_CHECK_READ_S = 10.0  # how long the options' check waits for the manager
_last_read: dict[int, tuple[float, SwarmState]] = {}  # per hub (its config): when, and what
_shared_ids_told: dict[int, dict[str, tuple[str, ...]]] = {}  # per hub: the GPU ids several nodes declare, as logged


class CondaSwarmSpawner(SwarmSeatMixin, SwarmPullMixin, SwarmTaskMixin, SwarmServiceMixin, CondaSpawner,
                        SwarmSpawner):
    """Spawn JupyterLab as a Docker Swarm service: GPU starts wait their turn in the hub's queue,
    which gives them a node's GPUs (gpu_assignment); Swarm places and runs the service."""

    gpu_resource = Unicode(
        swarm.GPU_RESOURCE,
        config=True,
        help="""The Swarm generic resource that GPU nodes declare in their daemon.json
        ("node-generic-resources": ["NVIDIA-GPU=GPU-5d6f...", ...]); a profile's gpus: N
        reserves N of it.

        c.CondaSwarmSpawner.gpu_resource = "NVIDIA-GPU"
        """,
    )

    gpu_assignment = Enum(
        ["hub", "swarm"],
        default_value="hub",
        config=True,
        help="""Who picks a GPU server's node and GPU ids. "hub": the hub, from the GPUs the nodes
        declare and the ones its servers hold (service labels); the service is pinned to that node
        and given those ids in DOCKER_RESOURCE_<gpu_resource>, which the NVIDIA runtime reads as
        it reads Swarm's own assignment. Swarm then knows nothing of GPUs, so its servers live
        through node updates and manager restarts; no other Swarm service may reserve the nodes'
        gpu_resource (Swarm would hand out a GPU the hub gave). "swarm": a generic-resource
        reservation, Swarm's scheduler picks; Swarm ends those servers whenever their node is
        updated (a label, drain and activate, a manager restart).

        c.CondaSwarmSpawner.gpu_assignment = "hub"
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

    start_margin = FiniteFloat(
        10.0,
        min=0.0,
        config=True,
        help="""Seconds before start_timeout at which a server still waiting for a GPU (or a
        node) gives up with one line and its service is removed, before the hub's own timeout
        cuts the start short.

        c.CondaSwarmSpawner.start_margin = 10
        """,
    )

    prepull_timeout = FiniteFloat(
        600.0,
        min=0.0,
        config=True,
        help="""How long the nodes that could run a GPU start and lack its image (a job service
        pinned to each pulls it; a node the hub saw pull that image is not asked again) are kept
        out of the start's GPU seat while they pull: the GPU is not held, idle, while a node pulls
        a multi-GB CUDA image. The start waits until one such node holds the image, then takes its
        turn in the queue among the nodes that hold it; a node that cannot pull is left out of that
        start. Past this (or start_timeout), a node still pulling may take the start, whose server
        waits there for the pull. 0: no pulls first (the node given the server pulls with its GPU held).

        c.CondaSwarmSpawner.prepull_timeout = 600
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
        self._seated_off: tuple[str, ...] = ()  # nodes still pulling when the start got its seat (swarmseat.py)
        self._pinned: tuple[str, tuple[str, ...]] = ("", ())  # gpu_assignment "hub": (node ID, GPU ids)
        self._stop_asked = False  # stop() came during this start (maybe between two of its services)
        self._init_pulls()

    # -- the swarm, as the manager reports it ---------------------------------------------

    def read_swarm(self, service_id: str | None = None) -> SwarmState:
        """Nodes and conda-swarm tasks now (blocking: a few manager API calls; the hub's GPU
        sampler makes one every gpu_sample_interval, which keeps the checks' view fresh)."""
        state = swarm.read_swarm(self.client, self.gpu_resource, self.gpu_model_label, service_id, self.cuda_label)
        _last_read[id(self.config)] = (time.monotonic(), state)
        shared = state.shared_gpu_ids()
        if _shared_ids_told.get(id(self.config), {}) != shared:  # said once per change, not on every read
            _shared_ids_told[id(self.config)] = shared
            if shared:
                self.log.error(swarm.shared_gpu_ids_line(shared))
        return state

    async def _read_swarm(self, service_id: str | None = None) -> SwarmState:
        return await asyncio.wrap_future(self.executor.submit(self.read_swarm, service_id))

    def service_request(self, profile: Profile) -> ServiceRequest:
        """The profile's GPUs, model, limits and reservations.

        Limits: the profile's, else the spawner's (the admin's cpu_limit and mem_limit, or what a
        pre_spawn_hook set). Reservations:
        the admin's guarantees (cpu_guarantee, mem_guarantee), else what the profile itself
        limits: a profile that says 8 CPUs gets 8 CPUs; the admin's default limits stay caps.
        """
        cpu_limit, mem_limit = self.limits_for(profile)
        return ServiceRequest(
            gpus=profile.gpus,
            gpu_model=profile.gpu_model if profile.gpus else None,
            cpu_limit=cpu_limit,
            mem_limit=mem_limit,
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
        try:
            self._refuse_infeasible(self.service_request(profile))
        except GpuUnavailable as error:
            raise explain(error, custom_spec=False) from None

    def _refuse_infeasible(self, request: ServiceRequest) -> None:
        """GpuOverQuota for more GPUs than one user may hold, SwarmInfeasible (SwarmCudaIncompatible)
        when no node of the swarm as last read (if lately: :meth:`_fresh_state`) could run it."""
        quota = self.services.allocator.per_user_gpu_quota
        swarm.check_quota(SwarmState((), ()), self.user.name, self.name, request.gpus, quota,  # alone
                          request.profile)
        state = self._fresh_state()
        if state is not None:
            swarm.check_feasible(state, request)

    def _fresh_state(self) -> SwarmState | None:
        """The swarm as this hub last read it, if at most SWARM_STATE_FRESH_S ago."""
        read_at, state = _last_read.get(id(self.config), (0.0, None))
        return state if state is not None and time.monotonic() - read_at <= SWARM_STATE_FRESH_S else None

    async def ready_gpu_view(self) -> None:
        """Nothing to read first: the checks on the event loop judge by the swarm's last read, if any."""

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
        """The card's note when ``profile`` could never start on this swarm, else "": as the start
        would refuse it (more GPUs than any node has or than the per-user quota, no node of its
        model, every fitting node's driver too old for its CUDA), judged by the read
        :meth:`form_gpu_count` just made."""
        if not profile.gpus:
            return ""
        if profile.gpus > gpu_count:
            return "no node has a GPU" if gpu_count == 0 else f"no node has more than {gpu_count} GPU(s)"
        request = self.service_request(profile)
        try:  # the start's own checks (the nodes' only when the swarm was read lately)
            self._refuse_infeasible(request)
        except GpuOverQuota:
            return f"more than the {self.services.allocator.per_user_gpu_quota}-GPU quota per user"
        except swarm.SwarmCudaIncompatible:
            return f"every fitting node's GPU driver is too old for CUDA {profile.cuda}"
        except swarm.SwarmInfeasible:
            model = (profile.gpu_model or "").strip("*")
            nodes = state.nodes if (state := self._fresh_state()) is not None else ()
            most = max((len(node.gpus) for node in nodes if request.model_matches(node)), default=0)
            if model and not most:
                return f"no node has a {model}"
            if most < profile.gpus:
                return f"no node has {profile.gpus} {model} GPUs"
            return "no node with its GPUs has the CPUs and memory it asks for"
        return ""

    async def start(self) -> tuple[str, int]:
        self._deadline = time.monotonic() + max(self.start_timeout - self.start_margin, 0)
        self._assigned, self._node = (), ""
        self._failed_nodes, self._seated_off = {}, ()
        self._stop_asked = False
        try:
            return await super().start()
        finally:
            self._stop_following_pulls()
            self._leave_gpu_seat()

    async def stop(self, now: bool = False) -> None:
        # JupyterHub does not cancel start() itself: a start between two services (its node could not
        # start it, _pin_to_another_node waits for another) has none for stop() to remove.
        self._stop_asked = True
        await super().stop(now=now)

    async def _ensure_image(self, request: Any) -> ImageInfo:
        self._check_home_settings()  # the admin's settings, before anything is built
        self.claim_user_volumes_in_ledger()  # no one gets an earlier user's home on a node
        if not self.services.builder.registry:
            raise BuildError("the conda-swarm spawner needs ImageBuilder.registry", phase="config",
                             cause="servers run on several nodes, which pull their images from a registry "
                                   "(set ImageBuilder.registry)")
        return await super()._ensure_image(request)

    def mount_templates(self) -> list[str]:
        """None: a service's mounts are made from ``volumes`` alone (swarmservice.py)."""
        return []

    async def orphan_user_volumes(self) -> None:
        """The nodes hold the volumes, out of the hub's sight: the ledger records them orphaned."""
        self.orphan_user_volumes_in_ledger()

    async def _pull_if_missing(self, info: ImageInfo, low: int, high: int) -> None:
        """Nothing to pull here: the node Swarm picks pulls the pinned reference itself."""

    def _prepare_container(self, info: ImageInfo, allocation: Allocation | None) -> None:
        self._extra_labels = {**server_labels(self.user, self.name), LABEL_KEY: info.key,
                              LABEL_GPU_REQUEST: str(self._request.gpus)}
        # A GPU task's GPUs come from DOCKER_RESOURCE_* (the runtime's swarm-resource), set by Swarm
        # or, as Swarm would, by the hub; without one the runtime reads NVIDIA_VISIBLE_DEVICES:
        # "void" over an admin's or an image's "all".
        self._extra_env = {} if self._request.gpus else {ENV_NVIDIA_VISIBLE_DEVICES: NO_GPUS}
        self._label_pinned_gpus()
        self._device_requests = []
        self.ip = "0.0.0.0"  # the node's every address; the hub connects to the one Swarm reports

    async def _replace_if_changed(self, info: ImageInfo) -> None:
        """A leftover service is removed by DockerSpawner.start (services are never kept)."""

    async def _refuse_if_another_user_runs_here(self) -> None:
        """Swarm holds the GPUs (no allocation by name to hand back): nothing to check here."""

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


class _NoReadings:
    """gpu_metrics_url is "": no GPU is ever read as idle."""

    def read(self, nodes: Sequence[swarm.NodeInfo]) -> dict[str, swarmgpus.GpuReading]:
        return {}
