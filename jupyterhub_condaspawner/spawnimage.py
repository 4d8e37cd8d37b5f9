"""A server's image: looked up in the cache, or built with the build's phases on the
spawn's progress page (and what changed since the last build), pulled onto the servers'
daemon when it was built elsewhere. Mixed into CondaSpawner by :class:`SpawnImageMixin`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import docker.errors

from . import environments
from .builderrors import BuildError
from .buildmodel import CUSTOM_ENV_NAME, LABEL_KEY, Build, BuildRequest, EventStream, ImageInfo
from .failures import StartFailure
from .hubservices import HubServices
from .owners import user_identity

_BUILD_INTERRUPTED = ("Your last start of {} was building its environment when the hub restarted, and did not go "
                      "on: start it again (the build starts over)")
# progress() ranges: image 1-85, GPUs 86-89, container 90-100.
_IMAGE_SHARE = 83


class SpawnImageMixin:
    """The image of a start; the host class is a CondaSpawner."""

    if TYPE_CHECKING:  # provided by CondaSpawner, the class this is mixed into
        user: Any
        log: Any
        client: Any
        _feed: EventStream
        _profile_slug: str
        _image_pins: contextlib.ExitStack
        _image_info: ImageInfo | None

        async def docker(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

        @property
        def services(self) -> HubServices: ...

        def _post_restart_notice(self, text: str) -> None: ...

        def _restart_notice_kept_if_cancelled(self) -> contextlib.AbstractContextManager[None]: ...

    async def _ensure_image(self, request: BuildRequest) -> ImageInfo:
        builder = self.services.builder
        if builder.docker_host and not builder.registry:
            raise BuildError("ImageBuilder.docker_host without ImageBuilder.registry", phase="config",
                             cause=f"images built on {builder.docker_host} (ImageBuilder.docker_host) can reach "
                                   "the servers only through a registry (ImageBuilder.registry)")
        await self._feed.publish("image", 1, f"Looking up the image of {request.display_name}")
        # Threads get plain values: the hub's User reads its database row, from the loop only.
        who = (self.user.name, user_identity(self.user))
        key = await asyncio.to_thread(_record_use, self.services, who, self._profile_slug, request, self.log)
        # gc keeps the image until this start ends (its container runs, or the start failed).
        self._image_pins.enter_context(await asyncio.to_thread(builder.records.pin, key))
        cached = await asyncio.to_thread(builder.lookup, request)
        if cached is not None:
            await self._pull_if_missing(cached, 2, 84)
            await self._feed.publish("image", 85, f"Image ready: {cached.tag} (cached)")
            return cached
        await self._feed.publish("image", 2, f"First build of this environment, {builder.build_estimate()}")
        build = builder.ensure(request)
        with self._restart_notice_kept_if_cancelled():
            self._post_restart_notice(_BUILD_INTERRUPTED.format(request.display_name))
            info = await self._follow_build(build, key, request)
        await self._pull_if_missing(info, 85, 85)  # built on a build host: this daemon pulls it
        return info

    async def _follow_build(self, build: Build, key: str, request: BuildRequest) -> ImageInfo:
        """The build's phases on this spawn's progress page (and what changed since the last
        build, once solved); its image."""
        told_changes, who = False, (self.user.name, user_identity(self.user))
        async for event in build.follow():
            if event["phase"] == "error":
                continue  # the failure itself reaches the user once, from start()
            progress = 2 + event["progress"] * _IMAGE_SHARE // 100
            await self._feed.publish(event["phase"], progress, event["message"])
            if event["phase"] == "solve" and event["progress"] >= 15 and not told_changes:  # the lock is written
                told_changes = True
                changes = await asyncio.to_thread(_changes_line, self.services, who, key, request)
                if changes:
                    await self._feed.publish("solve", progress, changes)
        return await build.result()

    async def _pull_if_missing(self, info: ImageInfo, low: int, high: int) -> None:
        """Pull a registry image onto the servers' daemon if it lacks it, with progress in [low, high]."""
        if not info.reference:
            return

        async def publish(phase: str, progress: int, message: str) -> None:
            await self._feed.publish(phase, low + (high - low) * progress // 100, message)

        api = await asyncio.to_thread(lambda: self.client)
        await self.services.builder.ensure_present(info, api, publish)

    async def pull_image(self, image: str) -> None:
        # A reference pinned by digest was pulled by _ensure_image, with progress; DockerSpawner's
        # own pull splits "name:tag@sha256:..." at the last colon and would ask for a wrong tag.
        if "@" in image:
            return
        if self._image_info is not None and image == self._image_info.tag and not self.services.builder.registry:
            # This daemon's own build, nowhere else: never asked of Docker Hub.
            try:
                await self.docker("inspect_image", image)
            except docker.errors.NotFound:
                raise StartFailure(f"The image of your environment ({image}) was removed from the Docker host while "
                                   "your server started: start it again (it is built again)", reason="image-removed",
                                   status_code=503) from None
            return
        await super().pull_image(image)  # type: ignore[misc]  # DockerSpawner's, after this mixin


def _record_use(services: HubServices, who: tuple[str, str], profile: str, request: BuildRequest, log: Any) -> str:
    """Record that ``who`` (name, identity) started ``request``'s environment (the environments page); its key."""
    key, (user, identity) = services.builder.build_key(request), who
    try:
        services.usage.record(user, key, profile=profile, own=request.env_name == CUSTOM_ENV_NAME,
                              name=request.display_name, spec=request.spec.to_yaml(), identity=identity)
    except OSError as error:  # the page misses one entry; the spawn goes on
        log.warning("Could not record the environment %s of %s: %s", key, user, error)
    return key


def _changes_line(services: HubServices, who: tuple[str, str], key: str, request: BuildRequest) -> str:
    """The progress line saying what a rebuild changed against the previous build, or ""."""
    user, identity = who
    previous = environments.previous_key(services.builder, services.usage, user, key, request.env_name, identity)
    diff = environments.change(services.builder, previous, key)
    if diff is None:
        return ""
    against = "your previous environment" if request.env_name == CUSTOM_ENV_NAME else "the previous build"
    return f"What changed since {against}: {diff.summary()}"


def image_of_unsaved_start(labels: Mapping[str, str], image: str, image_id: str, env: Iterable[str]) -> ImageInfo | None:
    """The image of a server whose start JupyterHub never recorded (the hub was killed after its
    container or service started, before its state was saved), as that container or service says:
    its key label, the image it runs (a registry reference pinned by digest, or the local tag) and
    its CONDASPAWNER_ENV. None without a key label."""
    key = labels.get(LABEL_KEY, "")
    if not key:
        return None
    folder = next((item.split("=", 1)[1] for item in env if item.startswith("CONDASPAWNER_ENV=")), "")
    reference = image if "@sha256:" in image else ""
    return ImageInfo(key, image.split("@", 1)[0], image_id, PurePosixPath(folder).name, cached=True,
                     reference=reference)
