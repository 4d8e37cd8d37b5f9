"""A server's GPUs: allocated last (after the image), through the fair queue, with the
queue's place on the progress page; released when the server stops; watched by the hub's
GPU-aware culler, which stops a server whose GPUs idle past its timeout. Mixed into
CondaSpawner by :class:`GpuBindingMixin`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import docker
from tornado import web

from . import metrics
from .builderrors import one_line
from .buildmodel import EventStream, ImageInfo
from .culler import REASON_GPU_IDLE, Cull
from .dockerclient import daemon_settings
from .failures import StartFailure
from .gpuqueue import GpuQueue
from .gpus import LABEL_GPUS, Allocation, GpuAllocator
from .hubservices import GpuSample, HubServices, host_gpu_sampler, hub_services
from .owners import labels_name_server
from .profiles import Profile
from .spawnimage import image_of_unsaved_start

if TYPE_CHECKING:
    from .spawner import CondaSpawner

# Seconds the GPU table's restore waits for the daemon when the hub starts.
RESTORE_TIMEOUT_S = 10.0
# Seconds between looks at the container of a server whose stop failed: its GPUs are freed once it is seen stopped.
FAILED_STOP_RECHECK_S = 15.0
# What a start keeps of its start_timeout for creating and starting its container after its GPUs.
CONTAINER_START_S = 30.0
QUEUE_INTERRUPTED = "Your last start of {} was waiting for a GPU when the hub restarted, and did not go on: start it again"


class GpuBindingMixin:
    """Allocation, release and idle culling of a server's GPUs; the host class is a CondaSpawner."""

    if TYPE_CHECKING:  # provided by CondaSpawner, the class this is mixed into
        user: Any
        name: str
        ready: bool
        user_options: dict[str, Any]
        gpu_idle_timeout: float
        start_timeout: int
        _start_began: float
        _feed: EventStream
        _allocation: Allocation | None
        _image_info: ImageInfo | None
        _gpu_key: tuple[str, str] | None
        _not_adoptable: tuple[str, tuple[str, str]] | None
        object_id: str
        tls_config: dict[str, Any]
        client_kwargs: dict[str, Any]
        _idle_watch: dict[str, Any]
        _stop_pending: bool
        client: Any
        log: Any
        _log_name: str

        @property
        def services(self) -> HubServices: ...

        def _post_restart_notice(self, text: str) -> None: ...

        def docker(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

        def _take_back_restart_notice(self) -> None: ...

        def _restart_notice_kept_if_cancelled(self) -> contextlib.AbstractContextManager[None]: ...

        def allowed_profile(self, slug: str) -> Profile: ...

        async def get_object(self) -> Any: ...

    async def _allocate_gpus(self, profile: Profile) -> Allocation | None:
        if not profile.gpus:
            return None
        services = self.services
        await self._feed.publish("gpus", 86, f"Allocating {profile.gpus} GPU(s)")
        if not services.allocator.restored:  # the daemon did not answer when the hub started
            await self._restore_gpu_table(services)
        # JupyterHub ends a start past start_timeout with no word: the queue ends it first, in one line.
        time_left = self.start_timeout - (time.monotonic() - self._start_began) - CONTAINER_START_S
        allocation = await self._wait_in_gpu_queue(profile, time_left)
        await self._feed.publish("gpus", 89, "GPUs: " + ", ".join(allocation.uuids))
        return allocation

    async def _wait_in_gpu_queue(self, profile: Profile, time_left: float) -> Allocation:
        """The server's GPUs from the hub's queue, waiting its turn for at most ``time_left``
        seconds (and GpuAllocator.queue_timeout), with its place on the progress page."""
        async def waiting(ahead: int, waited: float) -> None:
            # Taken back when the spawn leaves the queue; only a hub that stops under a
            # waiting spawn leaves it for the next spawn page.
            self._post_restart_notice(QUEUE_INTERRUPTED.format(profile.display_name))
            await self._feed.publish("gpus", 87, self._queue_message(ahead))

        with self._restart_notice_kept_if_cancelled():
            self._gpu_key = (self.user.name, self.name)  # a rename must not change the key before release
            allocation = await self.services.queue.allocate(
                *self._gpu_key, profile.gpus, profile.gpu_model, cuda=profile.cuda,
                profile=profile.slug, waiting=waiting, time_left=(time_left, "Spawner.start_timeout"))
        self._refuse_if_access_withdrawn(profile)  # the GPUs are released with the failed start
        return allocation

    def _queue_message(self, ahead: int) -> str:
        """The progress page's line while the start waits in the GPU queue."""
        return "Waiting for a GPU: " + ("you are next" if not ahead else f"{ahead} ahead of you")

    def gpu_queue(self, allocator: GpuAllocator) -> GpuQueue:
        """The hub's GPU queue (made once per hub): in front of this host's allocator."""
        return GpuQueue(allocator)

    def _refuse_if_access_withdrawn(self, profile: Profile, waited_for: str = "a GPU") -> None:
        """A start may wait for a GPU (or, on a swarm, a node) for minutes; meanwhile an admin may
        take the profile away (its file removed) or the user out of its groups (a course ends):
        checked again when the GPUs come, as when the start was asked for."""
        try:
            self.allowed_profile(profile.slug)
        except web.HTTPError:
            raise StartFailure(f"Your access to {profile.display_name} was withdrawn while you waited for "
                               f"{waited_for}: choose another profile, or ask the hub admin", reason="access",
                               status_code=403) from None

    async def _restore_gpu_table(self, services: HubServices) -> None:
        """Rebuild the GPU table from the servers' containers before the first GPU is handed
        out: a running server's GPUs must never look free. Starts that come meanwhile wait for
        this one's restore, and make none of their own if it succeeded."""
        async with services.restoring:
            if not services.allocator.restored:
                await self._restore_gpu_table_now(services)

    async def _restore_gpu_table_now(self, services: HubServices) -> None:
        try:
            problems = await asyncio.to_thread(lambda: services.allocator.rebuild_from_containers(self.client))
        except Exception as error:
            raise StartFailure(f"The hub cannot tell yet which GPUs its servers hold (Docker: {one_line(error)}): "
                               "try again in a minute, or tell the hub admin", reason="gpu-table",
                               status_code=503) from None
        for problem in problems:
            self.log.warning("GPU allocations after restart: %s", problem)

    def restore_gpu_table(self, allocator: GpuAllocator) -> None:
        """Rebuild the GPU table from the servers' containers, as the hub (re)starts.

        Before the hub's servers are loaded, in a thread (the daemon and NVML may hang), waited
        for RESTORE_TIMEOUT_S at most: past that the hub goes on, the restore finishes when it
        can, and meanwhile the first GPU start restores the table itself.
        """
        settings = daemon_settings(self.tls_config, self.client_kwargs)
        settings["timeout"] = min(float(settings.get("timeout") or RESTORE_TIMEOUT_S), RESTORE_TIMEOUT_S)
        failures: list[Exception] = []
        restore = threading.Thread(target=self._restore_in_thread, args=(allocator, settings, failures),
                                   name="gpu-table-restore", daemon=True)
        restore.start()
        restore.join(RESTORE_TIMEOUT_S)
        if restore.is_alive():
            raise TimeoutError(f"the daemon or NVML did not answer within {RESTORE_TIMEOUT_S:g} s")
        if failures:
            raise failures[0]

    def _restore_in_thread(self, allocator: GpuAllocator, settings: dict[str, Any], failures: list[Exception]) -> None:
        try:
            client = docker.DockerClient(**settings)
            try:
                for problem in allocator.rebuild_from_containers(client):
                    self.log.warning("GPU allocations after restart: %s", problem)
            finally:
                client.close()
        except Exception as error:
            failures.append(error)

    async def _adopt_unsaved_start(self) -> None:
        """A start the hub was stopped or killed under after its container started, before
        JupyterHub saved its state: nothing here says what the server runs, and the table
        (rebuilt from the container's labels) may hold GPUs under its name. Its container's labels
        say both, when they name this user's server (never a renamed user's of this name): its
        image, for the state, the environments page and the next restart; its GPUs, so that
        stopping it releases them and the culler watches it."""
        key = (self.user.name, self.name)
        held = hub_services(cast("CondaSpawner", self)).allocator.allocation(*key)
        unclaimed = held if self._gpu_key is None and held is not None and held.active else None
        if self._image_info is not None and unclaimed is None:
            return
        # Polled every few seconds while a renamed user's server holds GPUs under this name: a
        # container's labels never change, so the daemon is asked about each container once.
        if self.object_id and self._not_adoptable == (self.object_id, key):
            return
        container = await self.get_object()
        if container is None or not container["State"].get("Running"):
            return
        config = container["Config"]
        labels = config.get("Labels") or {}
        if not labels_name_server(labels, self.user, self.name):
            self._not_adoptable = (container["Id"], key)
            return
        if self._image_info is None:
            self._image_info = image_of_unsaved_start(labels, str(config.get("Image", "")),
                                                      str(container.get("Image", "")), config.get("Env") or [])
            if self._image_info is not None:
                self.image = self._image_info.image  # as load_state sets it from a saved start
        if unclaimed is None:
            return
        if not labels.get(LABEL_GPUS):  # the GPUs held under its name are another container's
            self._not_adoptable = (container["Id"], key)
            return
        self.log.info("Adopting the GPUs of %s, whose start the hub did not record: %s", self._log_name,
                      ",".join(unclaimed.uuids))
        self._gpu_key, self._allocation = key, unclaimed
        self._watch_gpu_idleness(self._profile_of_saved_options())

    def _release_gpus(self) -> None:
        services = hub_services(cast("CondaSpawner", self))
        held = self._gpu_key or (self._allocation and (self._allocation.user, self._allocation.server_name))
        self._allocation, self._gpu_key = None, None
        if held:  # only what this server holds: never GPUs held under its name by another (a renamed user's)
            services.culler.forget(*held)
            services.allocator.release(*held)

    def _keep_gpus_of_failed_stop(self, container_id: str, error: BaseException) -> None:
        """A stop that failed (Docker did not answer, or refused): JupyterHub forgets the server
        anyway, but its container may run on with its GPUs. They stay held, never handed to
        another server, until the container is seen stopped or gone (or the same server starts
        again and gets them back)."""
        held, key = self._allocation, self.gpu_key
        self._allocation, self._gpu_key = None, None
        if held is None:
            return
        self.log.error("Stopping %s failed (%s): its container %s may still run, so its GPUs (%s) stay held until "
                       "it is seen stopped", self._log_name, one_line(error), container_id[:12], ",".join(held.uuids))
        services = hub_services(cast("CondaSpawner", self))
        services.culler.forget(*key)  # JupyterHub has no server left to stop
        asyncio.ensure_future(self._release_once_stopped(services, key, held, container_id))

    async def _release_once_stopped(self, services: HubServices, key: tuple[str, str], held: Allocation,
                                    container_id: str) -> None:
        allocator = services.allocator
        while allocator.allocation(*key) is held:  # not taken back by a new start of the server meanwhile
            await asyncio.sleep(FAILED_STOP_RECHECK_S)
            try:
                container = await self.docker("inspect_container", container_id)
            except docker.errors.NotFound:
                container = None
            except Exception:  # Docker still does not answer: look again later
                continue
            if container is not None and container["State"].get("Running"):
                continue
            if allocator.allocation(*key) is held:
                self.log.info("The container of %s has stopped: its GPUs (%s) are free", self._log_name,
                              ",".join(held.uuids))
                allocator.release(*key)
            return

    @property
    def gpu_key(self) -> tuple[str, str]:
        """The (user name, server) this server's GPUs are held under: the name it had when they
        were allocated, so that a user renamed while the server runs still releases them."""
        return self._gpu_key or (self.user.name, self.name)

    # -- GPU-aware idle culling ----------------------------------------------------------------

    def gpu_sampler(self, services: HubServices) -> Callable[[], GpuSample]:
        """What the hub's GPU sampler calls: this host's NVML, through the allocator."""
        return host_gpu_sampler(services.allocator)

    def _holds_gpus(self) -> bool:
        return self._allocation is not None and bool(self._allocation.uuids)

    def _watch_gpu_idleness(self, profile: Profile | None, saved: Mapping[str, Any] | None = None) -> None:
        """Have the hub's culler stop this server once its GPUs idle for the profile's timeout.

        ``profile``: the server's profile, None when the catalog lost it (renamed or removed
        since the server started: ``saved`` then holds the timeout and name it started with).
        """
        if not self._holds_gpus():
            return
        timeout, name = self.gpu_idle_timeout, (self.user_options or {}).get("profile", "a GPU profile")
        if profile is not None:
            name = profile.display_name
            if profile.gpu_idle_timeout is not None:
                timeout = profile.gpu_idle_timeout
        elif saved and saved.get("gpu_idle_timeout") is not None:
            timeout, name = float(saved["gpu_idle_timeout"]), str(saved.get("profile_name") or name)
        self._idle_watch = {"gpu_idle_timeout": timeout, "profile_name": name}
        services = hub_services(cast("CondaSpawner", self))
        if timeout > 0 and not services.allocator.gpu_sample_interval and not services.warned_unsampled:
            # The culler judges servers at the GPU samples only: without them it never stops one.
            services.warned_unsampled = True
            self.log.warning("GPU idle culling is off: c.GpuAllocator.gpu_sample_interval = 0 turns the hub's GPU "
                             "samples off, so %s (gpu_idle_timeout %g min) and every other GPU server are never "
                             "stopped for idle GPUs (set gpu_sample_interval, e.g. to 30)", self._log_name, timeout)
        services.culler.watch(*self.gpu_key, timeout_minutes=timeout, profile=name, stop=self._stop_idle_server)

    async def _stop_idle_server(self, cull: Cull) -> None:
        """Stop this server the way the hub stops one (route, server, database), then say why."""
        if not self.ready:  # a start still booting (a stop under way forgets the watch)
            self.services.culler.rearm(*self.gpu_key, from_now=True)
            return
        hub = _running_hub()
        if hub is None:
            raise RuntimeError("no running JupyterHub to stop the server through")
        # Set before anything async, as the hub's own stop does, so that no start slips in.
        self._stop_pending = True
        try:
            await hub.proxy.delete_user(self.user, self.name)
        finally:
            await self.user.stop(self.name)
        self.services.notices.post(self.user.name, self.name, cull.notice)
        metrics.record_cull(REASON_GPU_IDLE)

    def _profile_of_saved_options(self) -> Profile | None:
        """The profile a restored server was started with, if the catalog still has it."""
        slug = (self.user_options or {}).get("profile")
        try:
            return self.services.catalog.get(slug) if isinstance(slug, str) else None
        except (KeyError, StartFailure):
            return None


def _running_hub() -> Any:
    """The JupyterHub application of this process, or None outside a hub."""
    from jupyterhub.app import JupyterHub

    return JupyterHub.instance() if JupyterHub.initialized() else None
