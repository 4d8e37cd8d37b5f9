"""A server's container: its labels, environment and GPU devices, a kept container
replaced when it no longer matches the start, and the admin's extra_* settings merged
over the hardening defaults. Mixed into CondaSpawner by :class:`SpawnContainerMixin`.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import docker.errors
from dockerspawner import DockerSpawner
from jupyterhub.utils import random_port

from .buildcontext import KERNEL_DISPLAY_NAME_VARIABLE
from .buildmodel import LABEL_KEY, ImageInfo
from .failures import StartFailure
from .gpus import (
    ENV_GPUS,
    ENV_NVIDIA_VISIBLE_DEVICES,
    LABEL_GPUS,
    NO_GPUS,
    Allocation,
    parse_uuids,
)
from .hubservices import HubServices
from .owners import LABEL_IDENTITY, server_labels, user_identity

REMOVAL_TIMEOUT = 60  # seconds Docker may take to remove a stopped container (its layer and anonymous volumes)


class SpawnContainerMixin:
    """The container of a start; the host class is a CondaSpawner."""

    if TYPE_CHECKING:  # provided by CondaSpawner, the class this is mixed into
        user: Any
        name: str
        log: Any
        port: int
        ip: str
        remove: bool
        network_name: str
        object_name: str
        object_id: str
        extra_create_kwargs: Any
        extra_host_config: Any
        replace_changed_containers: bool
        _image_info: ImageInfo | None
        _extra_labels: dict[str, str]
        _extra_env: dict[str, str]
        _kernel_display_name: str
        _device_requests: list

        @property
        def services(self) -> HubServices: ...

        async def get_object(self) -> Any: ...

        async def stop_object(self) -> Any: ...

        async def remove_object(self) -> Any: ...

        async def docker(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

        async def claim_user_volumes(self) -> None: ...

        def hardening_host_config(self, admin: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def _prepare_container(self, info: ImageInfo, allocation: Allocation | None) -> None:
        labels = {**server_labels(self.user, self.name), LABEL_KEY: info.key}
        # No GPUs: "void" hides every GPU under the NVIDIA runtime, over an admin's or a CUDA
        # image's NVIDIA_VISIBLE_DEVICES=all (get_env puts this after the admin's environment).
        self._extra_env, self._device_requests = {ENV_GPUS: "", ENV_NVIDIA_VISIBLE_DEVICES: NO_GPUS}, []
        if allocation is not None:
            options = self.services.allocator.container_options(allocation)
            labels.update(options.labels)
            self._extra_env = dict(options.environment)
            self._device_requests = list(options.device_requests)
        self._extra_labels = labels
        if self.network_name == "host":
            # Host networking: every server needs its own port on loopback.
            self.port = random_port()
            self.ip = "127.0.0.1"

    async def _replace_if_changed(self, info: ImageInfo) -> None:
        """Never restart a kept container whose image or GPUs differ from this start's.

        A container still running here is a leftover (the hub starts only servers it thinks
        stopped): it is stopped first, since Docker refuses to remove a running container
        and DockerSpawner would then quietly restart the stale one.
        """
        container = await self.get_object()
        if container is None:
            return
        labels = container["Config"].get("Labels") or {}
        self._refuse_if_another_users(container, labels)
        reason = self._replacement_reason(container, labels, info)
        if reason is None:
            await self.claim_user_volumes()  # a kept container is restarted as it is: its homes must be this user's
            return
        self.log.info("Replacing container %s: %s", self.object_name, reason)
        if container["State"].get("Running"):
            await self.stop_object()
        await self.remove_object()
        await self._until_removed(container["Id"])
        self.object_id = ""

    async def _until_removed(self, container_id: str) -> None:
        """Wait for Docker to finish removing the container: with DockerSpawner.remove it runs with
        auto_remove, so stopping it starts the daemon's own removal, remove_object() returns on
        Docker's 409 for it while the name is still taken, and the create that follows fails on
        "The container name ... is already in use"."""
        try:
            await self.docker("wait", container_id, condition="removed", timeout=REMOVAL_TIMEOUT)
        except docker.errors.NotFound:  # gone already
            pass

    def _replacement_reason(self, container: dict[str, Any], labels: dict[str, str], info: ImageInfo) -> str | None:
        """Why the kept ``container`` must go before this start, or None to restart it as it is.

        Other GPUs than this start's always replace it, whatever replace_changed_containers
        says: its devices cannot be changed in place, and the allocator may have handed its
        GPUs to another server since it stopped.
        """
        identity = user_identity(self.user)
        if labels.get(LABEL_IDENTITY, identity) != identity:  # a stopped one: never restarted for this user
            return "an earlier user's of this name"
        if self.remove:
            return "a leftover"
        if set(parse_uuids(labels.get(LABEL_GPUS, ""))) != set(parse_uuids(self._extra_labels.get(LABEL_GPUS, ""))):
            return "its GPUs are not this start's"
        stale_labels = {k: v for k, v in self._extra_labels.items() if labels.get(k) != v}
        renamed = (self._kernel_display_name and f"{KERNEL_DISPLAY_NAME_VARIABLE}={self._kernel_display_name}"
                   not in (container["Config"].get("Env") or []))  # the profile's display name changed
        changed = container["Image"] != info.image_id or stale_labels or renamed or self.network_name == "host"
        return "image or labels changed" if self.replace_changed_containers and changed else None

    async def _refuse_if_another_user_runs_here(self) -> None:
        """Before GPUs are allocated: a running container of this name that is another user's
        (renamed while it ran) holds GPUs under this name, which the allocator would hand back
        to this start."""
        container = await self.get_object()
        if container is not None:
            self._refuse_if_another_users(container, container["Config"].get("Labels") or {})

    def _refuse_if_another_users(self, container: dict[str, Any], labels: dict[str, str]) -> None:
        """Never stop a running container of another user (one renamed while it ran, whose old
        name this user now has) as a leftover: one line instead."""
        identity = user_identity(self.user)
        if container["State"].get("Running") and labels.get(LABEL_IDENTITY, identity) != identity:
            raise StartFailure(f"container {self.object_name} still runs another user's server (renamed "
                               "while it ran): the hub admin must stop it first (see the README's Isolation "
                               "section)", reason="container-in-use", status_code=409)

    def get_env(self) -> dict[str, str]:
        env = super().get_env()  # type: ignore[misc]  # DockerSpawner's, after this mixin
        env.update(self._extra_env)
        if self._image_info is not None:
            env["CONDASPAWNER_ENV"] = f"/opt/conda/envs/{self._image_info.env_name}"
        if self._kernel_display_name:
            env[KERNEL_DISPLAY_NAME_VARIABLE] = self._kernel_display_name
        return env

    async def create_object(self) -> Any:
        await self.claim_user_volumes()  # before docker creates them unlabelled for the binds
        admin_kwargs, admin_host = self.extra_create_kwargs, self.extra_host_config
        host = await evaluated_setting(self, admin_host)
        self.extra_create_kwargs = merged_setting(await evaluated_setting(self, admin_kwargs),
                                                  {"labels": self._extra_labels})
        # Hardening defaults first: the admin's own extra_host_config wins, or adds to lists.
        devices = {"device_requests": self._device_requests} if self._device_requests else {}
        self.extra_host_config = merged_setting(merged_setting(self.hardening_host_config(host), host), devices)
        try:
            return await super().create_object()  # type: ignore[misc]  # DockerSpawner's
        finally:
            self.extra_create_kwargs, self.extra_host_config = admin_kwargs, admin_host

    async def get_ip_and_port(self) -> tuple[str, int]:
        if self.network_name == "host":
            return "127.0.0.1", self.port
        return await super().get_ip_and_port()  # type: ignore[misc]  # DockerSpawner's


async def evaluated_setting(spawner: DockerSpawner, value: Any) -> Any:
    """An admin's extra_* setting: a dict, or what its (maybe async) callable returns."""
    value = spawner._eval_if_callable(value)
    return await value if inspect.isawaitable(value) else value


def merged_setting(base: dict | None, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, one level deep for dict values (labels, env)."""
    merged = dict(base or {})
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


