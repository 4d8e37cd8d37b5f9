"""What the builder takes and gives: a BuildRequest, a Build in progress with its
progress events, the ImageInfo of a ready image, and the labels every image carries."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .profiles import Profile
from .spec import EnvironmentSpec

# Bump when the Dockerfile or the context layout changes: it changes every build key.
# 6: the server settings as an extension of our own, not the base's jupyter_server_config.py/.json
RECIPE_VERSION = "6"
ENVS_ROOT = "/opt/conda/envs"
LABEL_PREFIX = "io.condaspawner."
LABEL_KEY = LABEL_PREFIX + "key"
LABEL_SPEC = LABEL_PREFIX + "spec"
LABEL_LOCK_DIGEST = LABEL_PREFIX + "lock-digest"
LABEL_BASE_IMAGE = LABEL_PREFIX + "base-image"
LABEL_BUILDER_VERSION = LABEL_PREFIX + "builder-version"
LABEL_CREATED = LABEL_PREFIX + "created"
LABEL_ENV_NAME = LABEL_PREFIX + "env-name"
ENV_NAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
CUSTOM_ENV_NAME = "custom"
CUSTOM_KERNEL_NAME = "My environment"  # the kernel of every user's own file (not its name:, user text)


@dataclass(frozen=True)
class BuildRequest:
    """What to build: the environment and how it is presented in JupyterLab.

    ``env_name`` names the folder under /opt/conda/envs and the kernel: a profile's
    slug, or ``custom`` for a user's own file (never user text). ``kernel_display_name``
    is the kernel's name in JupyterLab: a profile's display name, or "My environment" for
    every user's own file. It is not in the image (nor its key): the spawner hands it to the
    server at start (buildcontext.KERNEL_DISPLAY_NAME_VARIABLE), so a renamed profile
    keeps its image.
    """

    spec: EnvironmentSpec
    cuda: str | None = None
    env_name: str = CUSTOM_ENV_NAME
    kernel_display_name: str = ""

    def __post_init__(self) -> None:
        if not ENV_NAME_PATTERN.match(self.env_name):
            raise ValueError(f"env_name {self.env_name!r} must be a slug (lowercase letters, digits, dashes)")

    @property
    def display_name(self) -> str:
        """How progress lines, logs and the environments page name it: a user's own file by its
        ``name:``, a profile's environment by the profile's display name."""
        if self.env_name == CUSTOM_ENV_NAME and self.spec.name:
            return self.spec.name
        return self.kernel_display_name or self.spec.name or self.env_name

    @property
    def kernel_name(self) -> str:
        return self.kernel_display_name or self.display_name

    @property
    def prefix(self) -> str:
        return f"{ENVS_ROOT}/{self.env_name}"


def request_for_profile(profile: Profile, custom_spec: EnvironmentSpec | None = None) -> BuildRequest:
    """The build of a profile's environment, or of a user's own spec on the profile's hardware."""
    if custom_spec is not None:
        return BuildRequest(custom_spec, cuda=profile.cuda, env_name=CUSTOM_ENV_NAME,
                            kernel_display_name=CUSTOM_KERNEL_NAME)
    if profile.environment is None:
        raise ValueError(f"profile {profile.slug} has no environment of its own")
    return BuildRequest(profile.environment, cuda=profile.cuda, env_name=profile.slug,
                        kernel_display_name=profile.display_name)


@dataclass(frozen=True)
class ImageInfo:
    """A ready image.

    ``reference``: with a registry, the image there pinned by digest
    (``<registry>:<tag>@sha256:...``), what servers run; "" without one.
    ``pushed_bytes``: compressed bytes this build uploaded to the registry (None: no push).
    ``size``: bytes on the daemon, or (found in the registry) its compressed layers.
    """

    key: str
    tag: str
    image_id: str
    env_name: str
    cached: bool
    seconds: float = 0.0
    size: int = 0
    reference: str = ""
    pushed_bytes: int | None = None

    @property
    def image(self) -> str:
        """What a container runs: the pinned registry reference, else the local tag."""
        return self.reference or self.tag



@dataclass
class EventStream:
    """Progress events ``{"phase", "progress", "message"}`` that any number of readers follow."""

    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    done: bool = False

    async def publish(self, phase: str, progress: int, message: str) -> None:
        event = {"phase": phase, "progress": progress, "message": message}
        async with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    async def finish(self) -> None:
        async with self.changed:
            self.done = True
            self.changed.notify_all()

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        """Every event, from the first, until the stream is finished."""
        sent = 0
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.events) > sent or self.done)
                pending = self.events[sent:]
                finished = self.done
            for event in pending:
                yield event
            sent += len(pending)
            if finished and sent == len(self.events):
                return


@dataclass
class Build(EventStream):
    """One build in progress: its events, and the task computing its image."""

    key: str = ""
    task: asyncio.Task | None = None
    name: str = ""  # the request's display name
    env_name: str = ""
    since: float = field(default_factory=time.time)  # epoch seconds: when it was asked for
    started_here: bool = False  # this process ran the build (its status is this process's to record)
    rebuild: bool = False  # build again though the key's image exists (a fresh solve)
    base_id: str = ""  # the base image's id the key was made with: every step of the build uses it

    async def result(self) -> ImageInfo:
        assert self.task is not None
        return await asyncio.shield(self.task)

