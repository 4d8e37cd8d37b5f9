"""A conda-swarm server's service: its spec (image pinned by digest, launcher, GPUs as a
generic-resource reservation, placement, limits, mounts, host networking and a port of its
own), created under the user's quota, removed, and the address the hub reaches it at.
Mixed into CondaSwarmSpawner by :class:`SwarmServiceMixin`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import docker.errors
import docker.types
from jupyterhub.utils import random_port

from . import homes, swarm
from .failures import StartFailure, config_failure
from .gpus import LABEL_USER
from .spawncontainer import evaluated_setting
from .swarm import LABEL_PORT, ServiceRequest, SwarmState

# Swarm's default: a removed task gets SIGTERM, then SIGKILL this much later.
STOP_GRACE_NS = 10_000_000_000
_user_locks: dict[str, asyncio.Lock] = {}
# Ports this hub gave its servers, until their service is removed: two users' starts read the
# swarm at the same moment, and neither sees the other's service yet.
_claimed_ports: set[int] = set()
# Parts of a service's task the hub fills, and the setting through which an admin adds to each.
_TASK_KEYS_WITH_SETTINGS = {"container_spec": "extra_container_spec", "resources": "extra_resources_spec",
                            "placement": "extra_placement_spec"}


if TYPE_CHECKING:  # what the mixin is mixed into, for the type checker
    from .spawner import CondaSpawner as _SpawnerBase
else:
    _SpawnerBase = object


class SwarmServiceMixin(_SpawnerBase):
    """The service of a server; the host class is a CondaSwarmSpawner."""

    if TYPE_CHECKING:  # CondaSwarmSpawner's own, and SwarmSpawner's
        service_name: str
        volume_driver: str
        volume_driver_options: dict[str, str]
        extra_container_spec: dict[str, Any]
        extra_resources_spec: dict[str, Any]
        extra_placement_spec: dict[str, Any]
        extra_task_spec: dict[str, Any]
        extra_endpoint_spec: dict[str, Any]
        gpu_resource: str
        gpu_model_label: str
        cuda_label: str
        launcher_python: str
        _request: ServiceRequest
        _constraints: list[str]
        _failed_nodes: dict[str, str]
        _seated_off: tuple[str, ...]
        _pinned: tuple[str, tuple[str, ...]]

        async def _read_swarm(self, service_id: str | None = None) -> SwarmState: ...

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
            if self.volume_driver:
                homes.check_options_fit_volumes(self.volume_driver_options, [*self.volumes, *self.read_only_volumes])
        except homes.HomeSettingsError as error:
            raise StartFailure(f"The hub's home volume settings are refused ({error}); tell the hub admin",
                               reason="config", status_code=500) from None

    async def create_object(self) -> dict[str, Any]:
        """Create the service: the quota is checked against the user's services under a per-user lock."""
        lock = _user_locks.setdefault(self.user.name, asyncio.Lock())
        async with lock:
            state = await self._read_swarm()
            quota = self.services.allocator.per_user_gpu_quota
            held = None
            if quota and self._request.gpus:
                services = await self.docker("services", filters={"label": [swarm.LABEL_GPU_REQUEST]})
                held = swarm.requested_gpus(services, self.user.name, except_server=self.name)
            swarm.check_quota(state, self.user.name, self.name, self._request.gpus, quota, self._request.profile,
                              held=held)
            swarm.check_feasible(state, self._request)  # the nodes may have changed since the form
            self._constraints = swarm.placement_constraints(state, self._request, self.gpu_model_label,
                                                            self.cuda_label)
            self._constraints += [f"node.id!={node_id}" for node_id in self._failed_nodes]
            pinned_node = self._pinned[0]
            if pinned_node:  # the hub gave it that node's GPUs
                self._constraints.append(f"node.id=={pinned_node}")
            else:  # Swarm picks: not a node whose GPUs the seat did not count (it still pulls the image)
                self._constraints += [f"node.id!={node_id}" for node_id in self._seated_off]
            services = await self.docker("services", filters={"label": [LABEL_PORT]})
            self.port = _claim_port(state.ports | swarm.service_ports(services))
            labels = {**self._extra_labels, LABEL_PORT: str(self.port)}
            try:
                await self.reload_registry_credentials()
                return await self.docker("create_service", **(await self._service_kwargs(labels)))
            except BaseException:
                _claimed_ports.discard(self.port)
                raise

    async def reload_registry_credentials(self) -> None:
        """Read Docker's config again for the service's X-Registry-Auth: DockerSpawner's client read
        it once, and after a `docker login` rotates a password or token the nodes could not pull."""
        client = await asyncio.to_thread(lambda: self.client)
        await asyncio.to_thread(client.reload_config)

    async def _service_kwargs(self, labels: dict[str, str]) -> dict[str, Any]:
        self._check_extra_task_spec()
        container = dict(
            image=self.image,
            args=swarm.launcher_args(await self.get_command(), self.gpu_resource, self.launcher_python),
            env=self.get_env(),
            labels=labels,
            mounts=self.mounts,
            cap_drop=list(self.cap_drop) or None,
            stop_grace_period=STOP_GRACE_NS,
        )
        extra = self.extra_container_spec
        container.update(extra)
        # The admin's labels, environment and mounts add to ours: without the user's label Swarm's
        # tasks name no GPU holder; without the hub's environment the server cannot reach the hub;
        # without the hub's mounts the user has no home.
        container["labels"] = {**(extra.get("labels") or {}), **labels}
        container["env"] = {**_env_dict(extra.get("env")), **self.get_env()}
        container["mounts"] = [*self.mounts, *(extra.get("mounts") or [])]
        # The admin's constraints (a node pool) add to the profile's GPU model and CUDA and to the
        # nodes this start left: replacing them would put a GPU profile on any node.
        placement = {**self.extra_placement_spec,
                     "constraints": [*self._constraints, *(self.extra_placement_spec.get("constraints") or [])] or None}
        task = dict(
            container_spec=docker.types.ContainerSpec(**container),
            resources=swarm.resources(self._request, self.gpu_resource, self.extra_resources_spec,
                                      reserve_gpus=not self._pinned[1]),
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

    def _check_extra_task_spec(self) -> None:
        """extra_task_spec may not carry what the hub builds from its own settings and the profile:
        replacing the resources would drop the GPU reservation (Swarm would hand the GPU out twice)."""
        for key, setting in _TASK_KEYS_WITH_SETTINGS.items():
            if key in self.extra_task_spec:
                raise config_failure(f"c.{type(self).__name__}.extra_task_spec['{key}'] would replace the hub's "
                                     f"own: set c.{type(self).__name__}.{setting}, which adds to it")

    async def remove_object(self) -> None:
        if not self.object_id:
            return
        self.log.info("Removing service %s (%s)", self.service_name, self.object_id[:7])
        try:
            await self.docker("remove_service", self.object_id)
        except docker.errors.NotFound:
            pass
        _claimed_ports.discard(self.port)

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


def _claim_port(taken: frozenset[int]) -> int:
    """A port for a server on its node, used by no other conda-swarm server of the swarm
    (``taken``) and given by this hub to no other server still starting, now claimed."""
    while True:
        port = random_port()
        if port not in taken and port not in _claimed_ports:
            _claimed_ports.add(port)
            return port


def _env_dict(env: Mapping[str, Any] | Sequence[str] | None) -> dict[str, str]:
    """ContainerSpec's ``env``, given as a mapping or as ``NAME=value`` strings, as a mapping."""
    if not env:
        return {}
    if isinstance(env, Mapping):
        return {str(name): str(value) for name, value in env.items()}
    return dict(entry.partition("=")[::2] for entry in env)
