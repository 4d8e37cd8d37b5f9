"""ImageBuilder: turn an EnvironmentSpec into a cached image, once, with progress.

A build request is keyed by everything that changes the image (normalised spec, base
image id, platform, CUDA override, env name, kernel name, recipe version). The image
is tagged ``<repository>:<key[:16]>`` and labelled with the full key, so a cache hit
is one lookup on the daemon. Concurrent requests for one key share one build (in
this process through a shared task, across processes through a file lock), and
every phase is published as progress events.

With a registry (``registry``) the registry is the cache: a lookup asks it for the
key's manifest (the key checked against the image config's label), a build is pushed
there, and :class:`ImageInfo` carries the reference pinned by digest that servers run;
:meth:`ImageBuilder.ensure_present` pulls it onto a daemon that lacks it (registry.py).
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import statistics
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import docker
import docker.tls
import requests.exceptions
from jupyterhub.traitlets import ByteSpecification
from packaging.requirements import Requirement
from rattler import MatchSpec
from traitlets import Bool, Dict, Float, Instance, Integer, List, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from . import layers, leftovers, metrics
from .bytecode import BytecodeCache
from .dockerclient import daemon_settings
from .leftovers import Leftovers
from .profiles import Profile
from .registry import (
    ARCHITECTURES,
    PullTally,
    PushTally,
    RegistryClient,
    RegistryError,
    RemoteImage,
    Repository,
    Throttle,
    connection_problem,
    docker_credentials,
    failure_is_unreachable,
)
from .resolve import Lock, ResolveError, Resolver, is_no_space
from .spec import EnvironmentSpec, pip_requirement_text

log = logging.getLogger(__name__)

# How long the lock of a spawn's pre-check (ImageBuilder.presolve) stays good for its build.
PRESOLVED_SECONDS = 600

# Bump when the Dockerfile or the context layout changes: it changes every build key.
RECIPE_VERSION = "4"
ENV_DOCKERFILE = Path(__file__).parent / "images" / "env.Dockerfile"
# The loaded-layers route's only Dockerfile: pip sections, and compiling where the builder could not.
LAYERED_DOCKERFILE = Path(__file__).parent / "images" / "layered.Dockerfile"
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
# A rebuilt base is noticed within this many seconds; lookups skip a daemon round trip.
BASE_ID_TTL_S = 10.0
MAX_PACKAGE_LAYERS = 80  # Docker refuses ~127 layers: the base's and the Dockerfile's count too
_STEP = re.compile(r"^Step (\d+)/(\d+) :")
# Which of env.Dockerfile's steps does what, found by what the instruction runs.
_STEP_PHASES = (
    (re.compile(r"^COPY env "), "image"),
    (re.compile(r"-m compileall "), "compile"),
    (re.compile(r"-m pip install "), "pip"),
    (re.compile(r"^COPY kernel "), "kernel"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_DOCKER_NOISE = (" ---> ", "Removing intermediate container", "Successfully ")
_UNREACHABLE_MARKERS = ("NewConnectionError", "Failed to establish a new connection", "Could not fetch URL",
                        "Temporary failure in name resolution", "Connection refused")
_MESSAGE_CHARS = 300
BUILD_STATUS = "status.json"  # in a key's cache folder: the last build's status (BuildRecord)


class BuildError(Exception):
    """A failed build: ``str(error)`` is a short reason for the user; the full log is kept.

    ``phase``: where it failed (base-image, daemon, solve, install, build, pip, timeout,
    registry: the registry could not be reached or refused us; config: inconsistent settings;
    disk: a disk filled up: "no space left in FOLDER (needs about N MB)");
    ``cause``: the reason alone, without the phase; ``key``: the build's key, when known;
    ``unreachable``: a channel or index could not be reached (worth a retry).
    """

    def __init__(self, message: str, *, phase: str = "build", cause: str = "", key: str = "",
                 unreachable: bool = False):
        super().__init__(message)
        self.phase = phase
        self.cause = cause or message
        self.key = key
        self.unreachable = unreachable

    def summary(self) -> str:
        """One line for logs and the command line: the build's key, the phase in words, the cause."""
        who = f"build {self.key[:16]}" if self.key else "the build"
        return _one_line(f"{who} failed {PHASE_WORDS.get(self.phase, 'writing the image')}: {self.cause}")


# BuildError.phase in words, after "build KEY failed ...".
PHASE_WORDS = {
    "base-image": "looking up the base image",
    "daemon": "talking to the Docker daemon",
    "solve": "solving the environment",
    "install": "downloading or installing the conda packages",
    "build": "writing the image",
    "pip": "installing the pip: section",
    "timeout": "to finish in time",
    "registry": "at the registry",
    "config": "before it started (the settings do not fit together)",
    "disk": "for want of disk space",
}


@dataclass(frozen=True)
class BuildRequest:
    """What to build: the environment and how it is presented in JupyterLab.

    ``env_name`` names the folder under /opt/conda/envs and the kernel: a profile's
    slug, or ``custom`` for a user's own file (never user text).
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
        return self.kernel_display_name or self.spec.name or self.env_name

    @property
    def prefix(self) -> str:
        return f"{ENVS_ROOT}/{self.env_name}"


def request_for_profile(profile: Profile, custom_spec: EnvironmentSpec | None = None) -> BuildRequest:
    """The build of a profile's environment, or of a user's own spec on the profile's hardware."""
    if custom_spec is not None:
        return BuildRequest(custom_spec, cuda=profile.cuda, env_name=CUSTOM_ENV_NAME,
                            kernel_display_name=custom_spec.name or "My environment")
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


@dataclass(frozen=True)
class BuildRecord:
    """A build as its cache folder records it (``status.json``): read without a daemon.

    ``status``: building, built, failed, or interrupted (recorded as building, but no
    process holds its lock any more: the builder was killed). ``phase`` and ``cause``
    as in :class:`BuildError`; times in UTC, ISO 8601.
    """

    key: str
    status: str
    name: str = ""
    phase: str = ""
    cause: str = ""
    started: str = ""
    finished: str = ""
    env_name: str = ""  # a profile's slug, or "custom" (empty in records older than it)


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

    async def result(self) -> ImageInfo:
        assert self.task is not None
        return await asyncio.shield(self.task)


class ImageBuilder(LoggingConfigurable):
    """Build or reuse one image per environment; see the module docstring."""

    image_repo = Unicode(
        "condaspawner-env",
        config=True,
        help="""Repository of environment images on the Docker daemon: each is tagged
        <image_repo>:<key[:16]>. With a `registry`, images are named after the registry instead.

        c.ImageBuilder.image_repo = "condaspawner-env"
        """,
    )
    registry = Unicode(
        "",
        config=True,
        help="""A registry repository that every hub process and build host shares as the one image
        cache ("" = none: images stay on the one Docker daemon). An image is looked up there by key
        (<registry>:<key[:16]>, checked against the image's io.condaspawner.key label), pushed there after
        its build (only the layers the registry lacks), and servers run it pinned by digest
        (<registry>:<tag>@sha256:...), pulled by a daemon that lacks it. Credentials: Docker's config of
        the hub's user (`docker login`, ~/.docker/config.json, or DOCKER_CONFIG).

        c.ImageBuilder.registry = "registry.example.edu:5000/condaspawner-env"
        """,
    )
    insecure_registries = List(
        Unicode(),
        config=True,
        help="""Registries (host:port, as in `registry`) whose API the builder may reach without verified
        TLS (HTTPS without checking the certificate, else plain HTTP). Any other registry must have a
        certificate the hub trusts. The Docker daemons need the same in their own daemon.json
        `insecure-registries` (the admin's setting, not ours).

        c.ImageBuilder.insecure_registries = ["registry.lab.internal:5000"]
        """,
    )
    registry_timeout = Float(
        30,
        config=True,
        help="""Seconds the builder waits for one registry API request (manifest, config, token).

        c.ImageBuilder.registry_timeout = 10
        """,
    )
    docker_host = Unicode(
        "",
        config=True,
        help="""A dedicated build host: the Docker daemon images are built and pushed on ("" = the daemon
        DockerSpawner runs the servers on, with its client_kwargs and tls_config). Needs `registry`: the
        servers' daemon pulls the images from there.

        c.ImageBuilder.docker_host = "tcp://build.example.edu:2376"
        """,
    )
    docker_tls_config = Dict(
        config=True,
        help="""TLS for `docker_host`: docker.tls.TLSConfig's arguments, as in DockerSpawner.tls_config.

        c.ImageBuilder.docker_tls_config = {"client_cert": ("/etc/jupyterhub/build-cert.pem",
            "/etc/jupyterhub/build-key.pem"), "ca_cert": "/etc/jupyterhub/build-ca.pem", "verify": True}
        """,
    )
    # The servers' daemon as DockerSpawner connects to it (set by the spawner), used unless docker_host.
    daemon_settings = Dict()
    base_image = Unicode(
        "condaspawner-base:py39",
        config=True,
        help="""Base image every environment image is built FROM (Miniconda + the single-user server).

        Build it with `condaspawner base` (the test bench: `python -m condaspawner_bench base`).

        c.ImageBuilder.base_image = "condaspawner-base:py39"
        """,
    )
    cache_dir = Unicode(
        config=True,
        help="""Folder for build logs, locks, last-use times and staging (survives hub restarts).

        c.ImageBuilder.cache_dir = "/var/cache/condaspawner"
        """,
    )
    build_network_mode = Unicode(
        "host",
        config=True,
        help="""Docker network mode of build steps (the pip section needs the package index).

        c.ImageBuilder.build_network_mode = "default"
        """,
    )
    build_memory_limit = ByteSpecification(
        None,
        allow_none=True,
        config=True,
        help="""Memory limit of each build step (None: no limit).

        c.ImageBuilder.build_memory_limit = "4G"
        """,
    )
    build_cpuset_cpus = Unicode(
        "",
        config=True,
        help="""CPUs build steps may use, in docker's cpuset syntax ("" = all).

        c.ImageBuilder.build_cpuset_cpus = "0-3"
        """,
    )
    max_concurrent_builds = Integer(
        2,
        config=True,
        help="""Builds run at once in this hub; further requests wait in a queue.

        c.ImageBuilder.max_concurrent_builds = 4
        """,
    )
    pip_config = Dict(
        config=True,
        help="""pip settings for the pip section of every build, written as the [global]
        section of a pip.conf (e.g. an internal mirror). Users can never set these.

        c.ImageBuilder.pip_config = {"index-url": "https://pypi-mirror.example.edu/simple"}
        """,
    )
    max_images = Integer(
        50,
        config=True,
        help="""`gc` keeps at most this many environment images (0 = no count limit).

        c.ImageBuilder.max_images = 200
        """,
    )
    disk_budget = ByteSpecification(
        "100G",
        config=True,
        help="""`gc` removes least-recently-used environment images until they fit in this size: the
        bytes they add to the base image, each layer counted once (layers images share, once; the base, never).

        c.ImageBuilder.disk_budget = "500G"
        """,
    )
    build_timeout = Float(
        3600,
        config=True,
        help="""Seconds a whole build may take before it is abandoned.

        c.ImageBuilder.build_timeout = 7200
        """,
    )
    layered_images = Bool(
        True,
        config=True,
        help="""Write each environment's packages as image layers directly (no build context,
        no COPY), a layer per large package with its byte-compiled files, so that images
        share their large packages on disk and in a registry; the kernel spec and settings
        go in a small top layer, and only a pip section runs a docker build. Needs Docker's graph-driver
        image store (overlay2); with the containerd image store builds fall back to the
        Dockerfile route (False: always that route).

        c.ImageBuilder.layered_images = False
        """,
    )
    shared_layer_min_size = ByteSpecification(
        32 * 1024**2,
        config=True,
        help="""With layered_images: packages at least this large (installed) get an image
        layer of their own, shared by every image that has them; smaller ones share one layer.

        c.ImageBuilder.shared_layer_min_size = "64M"
        """,
    )
    bytecode_cache_dir = Unicode(
        "",
        config=True,
        help="""With layered_images: where each package's byte code is kept once compiled, so that
        later environments with the package compile only what is new (empty: a folder
        ``condaspawner-bytecode`` in the package cache, Resolver.package_cache_dir). It grows
        with the packages built, like the package cache; deleting it is safe.

        c.ImageBuilder.bytecode_cache_dir = "/srv/condaspawner/bytecode"
        """,
    )
    resolver = Instance(Resolver)
    docker_client = Instance(docker.DockerClient, allow_none=True)

    @default("cache_dir")
    def _default_cache_dir(self) -> str:
        return str(Path.home() / ".cache" / "condaspawner")

    @default("resolver")
    def _default_resolver(self) -> Resolver:
        return Resolver(parent=self)

    @validate("registry")
    def _valid_registry(self, proposal: Any) -> str:
        value = proposal["value"].strip().rstrip("/")
        if value:
            try:
                Repository.parse(value)
            except ValueError as error:
                raise TraitError(f"ImageBuilder.registry: {error}") from None
        return value

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._builds: dict[str, Build] = {}
        self._presolved: dict[str, tuple[float, Lock]] = {}  # solve key -> (when, lock): see presolve()
        self._slots = asyncio.Semaphore(self.max_concurrent_builds)
        self._waiting = 0
        self.builds_started = 0
        self.build_seconds: list[float] = []
        self._base_id: tuple[str, float] = ("", 0.0)
        self._registry_client: RegistryClient | None = None

    @property
    def client(self) -> docker.DockerClient:
        """The daemon images are built on: docker_host, else the servers' daemon (daemon_settings)."""
        if self.docker_client is None:
            with self._daemon("connecting"):
                self.docker_client = docker.DockerClient(**self.client_settings())
        return self.docker_client

    def client_settings(self) -> dict[str, Any]:
        """DockerClient arguments of the build daemon (what docker.from_env() would use, without settings)."""
        if self.docker_host:
            settings: dict[str, Any] = {"base_url": self.docker_host, "version": "auto"}
            if self.docker_tls_config:
                settings["tls"] = docker.tls.TLSConfig(**self.docker_tls_config)
            return settings
        return dict(self.daemon_settings) if self.daemon_settings else daemon_settings()

    @property
    def daemon_url(self) -> str:
        """Where the build daemon is, for messages."""
        base_url = self.client_settings().get("base_url")
        return str(base_url or os.environ.get("DOCKER_HOST") or "the default socket")

    def _daemon(self, what: str) -> contextlib.AbstractContextManager:
        return _daemon_call(what, self.daemon_url)

    @property
    def repository(self) -> str:
        """The repository images are tagged in: the registry's when there is one, else image_repo."""
        return self.registry or self.image_repo

    @property
    def registry_client(self) -> RegistryClient | None:
        """The registry's API client, or None without a registry."""
        if not self.registry:
            return None
        repository = Repository.parse(self.registry)
        client = self._registry_client
        if client is None or client.repository != repository:
            client = self._registry_client = RegistryClient(
                repository, insecure=repository.host in self.insecure_registries, timeout=self.registry_timeout,
                architecture=ARCHITECTURES.get(self.resolver.platform, "amd64"))
        return client

    # -- keys and lookup ---------------------------------------------------------------

    def base_image_id(self) -> str:
        """The base image's ID, asked of the daemon at most every few seconds (it is in every key)."""
        cached_id, fetched_at = self._base_id
        if cached_id and time.monotonic() - fetched_at < BASE_ID_TTL_S:
            return cached_id
        try:
            with self._daemon("looking up the base image"):
                base_id = self.client.images.get(self.base_image).id
        except docker.errors.ImageNotFound:
            raise BuildError(f"base image {self.base_image} not found: build it with `condaspawner base`",
                             phase="base-image", cause=f"{self.base_image} is not on the Docker host "
                             "(an admin builds it with `condaspawner base`)") from None
        self._base_id = (base_id, time.monotonic())
        return base_id

    def build_key(self, request: BuildRequest, base_image_id: str | None = None) -> str:
        """sha256 over everything that changes the image."""
        parts = {
            "spec": request.spec.normalized(),
            "base": base_image_id or self.base_image_id(),
            "platform": self.resolver.platform,
            "cuda": request.cuda,
            "env_name": request.env_name,
            "kernel": request.display_name,
            "recipe": RECIPE_VERSION,
            "layered": self.layered_images,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def tag_for(self, key: str) -> str:
        return f"{self.repository}:{key[:16]}"

    def find_image(self, key: str) -> docker.models.images.Image | None:
        """The cached image for ``key``, if the daemon has it (checked by its full-key label)."""
        try:
            with self._daemon("looking up the image"):
                image = self.client.images.get(self.tag_for(key))
        except docker.errors.ImageNotFound:
            return None
        return image if image.labels.get(LABEL_KEY) == key else None

    def find_pushed(self, key: str) -> RemoteImage | None:
        """The key's image in the registry (checked by its config's full-key label), or None.

        Raises BuildError (phase "registry") when the registry cannot be reached or refuses us.
        """
        registry = self.registry_client
        if registry is None:
            return None
        tag = key[:16]
        with _registry_call(f"looking up {registry.repository}:{tag}"):
            remote = registry.image(tag)
        if remote is None:
            return None
        if remote.labels.get(LABEL_KEY) != key:
            self.log.warning("Registry image %s:%s has key %s, not %s: not a cache hit (it will be replaced)",
                             registry.repository, tag, remote.labels.get(LABEL_KEY, "(none)"), key)
            return None
        return remote

    def pushed_reference(self, request: BuildRequest) -> str | None:
        """The registry reference pinned by digest of ``request``'s image, or None.

        None without a registry, or when the image is not (yet) in it; BuildError (phase
        "registry") when the registry cannot be asked. For exports (KubeSpawner profiles):
        ``condaspawner build --push`` first, then this gives each profile's image.
        """
        remote = self.find_pushed(self.build_key(request))
        return remote.reference if remote else None

    def key_dir(self, key: str) -> Path:
        return Path(self.cache_dir) / "builds" / key

    def mark_used(self, key: str) -> None:
        """Record a use of the key's image (the file's mtime survives hub restarts)."""
        path = self.key_dir(key) / "last-used"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def last_used(self, key: str) -> float:
        for name in ("last-used", "build.log"):
            with contextlib.suppress(OSError):
                return (self.key_dir(key) / name).stat().st_mtime
        return 0.0

    def build_record(self, key: str) -> BuildRecord | None:
        """The key's recorded build (from its cache folder), or None if it was never built here."""
        try:
            data = json.loads((self.key_dir(key) / BUILD_STATUS).read_text())
        except (OSError, ValueError):
            return None
        fields = {name: str(data.get(name, "")) for name in ("name", "phase", "cause", "started", "finished",
                                                              "env_name")}
        status = str(data.get("status", ""))
        if status == "building" and not _lock_held(self.key_dir(key) / "build.lock"):
            status = "interrupted"
            fields["cause"] = fields["cause"] or "the build process stopped before the build ended (killed?)"
        return BuildRecord(key=key, status=status, **fields)

    def builds(self) -> list[BuildRecord]:
        """Every build recorded in the cache folder, the latest first (no daemon needed)."""
        records = [self.build_record(path.parent.name)
                   for path in (Path(self.cache_dir) / "builds").glob(f"*/{BUILD_STATUS}")]
        return sorted((r for r in records if r is not None), key=lambda r: r.finished or r.started, reverse=True)

    def in_progress(self) -> list[Build]:
        """The builds this process is running or waiting to run (a slot), oldest first."""
        return list(self._builds.values())

    def failed_builds(self) -> list[BuildRecord]:
        """Builds whose last attempt failed or was interrupted, the latest first."""
        return [record for record in self.builds() if record.status in ("failed", "interrupted")]

    def _record(self, key: str, **fields: str) -> None:
        """Update the key's status.json (written whole, then renamed: readers never see half of it)."""
        path = self.key_dir(key) / BUILD_STATUS
        with contextlib.suppress(OSError):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data.update(fields, key=key)
            temporary = path.with_name(f".{BUILD_STATUS}.{os.getpid()}")
            try:
                temporary.write_text(json.dumps(data, indent=2) + "\n")
                temporary.replace(path)
            finally:
                temporary.unlink(missing_ok=True)  # a full disk: no half-written file stays

    def _record_failure(self, key: str, error: BuildError) -> None:
        self._write_log(key, f"build failed ({error.phase}): {error}\n")
        self._record(key, status="failed", phase=error.phase, cause=error.cause, finished=_now())

    # -- the public entry point ----------------------------------------------------------

    def is_cached(self, request: BuildRequest) -> bool:
        """Whether the image exists (in the registry, if any), without counting as a use (the form's badges)."""
        key = self.build_key(request)
        return (self.find_pushed(key) if self.registry else self.find_image(key)) is not None

    def lookup(self, request: BuildRequest) -> ImageInfo | None:
        """The cached image for ``request`` or None: the fast path of every spawn.

        With a registry the hit is the registry's image (``reference``): the daemon that runs
        the server may still have to pull it (:meth:`ensure_present`).
        """
        info = self._cached_info(self.build_key(request), request, time.monotonic())
        metrics.record_cache_lookup(info is not None)
        return info

    def ensure(self, request: BuildRequest, rebuild: bool = False) -> Build:
        """Start (or join) the build of ``request``'s image; await ``.result()``, follow ``.follow()``.

        ``rebuild``: build it again (a fresh solve: newer packages) though its image exists. The
        old image serves new servers until the new one is tagged, and stays if the build fails.
        """
        key = self.build_key(request)
        build = self._builds.get(key)
        if build is not None:
            return build
        build = Build(key=key, name=request.display_name, env_name=request.env_name, rebuild=rebuild)
        build.task = asyncio.ensure_future(self._run(build, request))
        build.task.add_done_callback(metrics.build_done(time.monotonic(), time.monotonic))
        self._builds[key] = build
        return build

    async def get_image(self, request: BuildRequest) -> ImageInfo:
        """Build or reuse the image; raise BuildError on failure."""
        return await self.ensure(request).result()

    # -- one build ----------------------------------------------------------------------

    async def _run(self, build: Build, request: BuildRequest) -> ImageInfo:
        started = time.monotonic()
        try:
            info = await asyncio.wait_for(self._build_once(build, request, started), self.build_timeout)
            await build.publish("ready", 100, f"image {info.tag} ready" + (" (cached)" if info.cached else ""))
            return info
        except asyncio.TimeoutError:
            message = f"build took longer than {self.build_timeout:g} s (ImageBuilder.build_timeout)"
            await build.publish("error", 100, message)
            timeout = BuildError(message, phase="timeout", key=build.key)
            self.log.warning("%s", timeout.summary())
            if build.started_here:
                self._record_failure(build.key, timeout)
            raise timeout from None
        except BuildError as error:
            error.key = error.key or build.key
            self.log.warning("%s", error.summary())
            if build.started_here:
                self._record_failure(build.key, error)
            await build.publish("error", 100, str(error))
            raise
        finally:
            self._builds.pop(build.key, None)
            await build.finish()

    async def _build_once(self, build: Build, request: BuildRequest, started: float) -> ImageInfo:
        key = build.key
        cached = None if build.rebuild else await asyncio.to_thread(self._cached_info, key, request, started)
        if cached:
            return cached
        async with self._slot(build):
            try:
                self.key_dir(key).mkdir(parents=True, exist_ok=True)
                (self.key_dir(key) / "build.lock").touch()
            except OSError as error:
                if not is_no_space(error):
                    raise
                raise await self._no_space_error(request, None, error) from None
            async with _file_lock(self.key_dir(key) / "build.lock"):
                # Another hub process may have built it while we waited for the lock.
                cached = None if build.rebuild else await asyncio.to_thread(self._cached_info, key, request, started)
                if cached:
                    return cached
                # With a registry: built here before, but never pushed (a failed push, a new registry).
                local = self.find_image(key) if self.registry and not build.rebuild else None
                replaced = self.find_image(key) if build.rebuild else None
                if local is not None:
                    self.log.info("Image %s is on the build daemon but not in the registry: pushing it",
                                  self.tag_for(key))
                    info = ImageInfo(key, self.tag_for(key), local.id, request.env_name, True,
                                     time.monotonic() - started, local.attrs.get("Size", 0))
                else:
                    self.builds_started += 1
                    self.log.info("Building image %s (%s) for %s", self.tag_for(key), key, request.display_name)
                    info = await self._build(build, request, started)
                    if replaced is not None and replaced.id != info.image_id:
                        await asyncio.to_thread(self._remove_replaced, key, replaced.id)
                if self.registry:
                    info = await self._push(build, info)
                return info

    def _remove_replaced(self, key: str, image_id: str) -> None:
        """Remove the image a rebuild replaced (its tag moved to the new one), unless a server runs it."""
        try:
            with self._daemon("removing the replaced image"):
                self.client.images.remove(image_id, noprune=False)
            self._write_log(key, f"removed the replaced image {image_id}\n")
        except (BuildError, docker.errors.APIError) as error:  # a server still runs it: it stays, untagged
            self.log.info("Rebuild of %s kept the replaced image %s: %s", key[:16], image_id, _one_line(error))
            self._write_log(key, f"kept the replaced image {image_id}: {_one_line(error)}\n")

    def _cached_info(self, key: str, request: BuildRequest, started: float) -> ImageInfo | None:
        if self.registry:
            remote = self.find_pushed(key)
            if remote is None:
                return None
            self.mark_used(key)
            return ImageInfo(key, self.tag_for(key), remote.config_digest, request.env_name, True,
                             time.monotonic() - started, remote.size, reference=remote.reference)
        image = self.find_image(key)
        if image is None:
            return None
        self.mark_used(key)
        return ImageInfo(key, self.tag_for(key), image.id, request.env_name, True,
                         time.monotonic() - started, image.attrs.get("Size", 0))

    # -- the registry: push and pull ---------------------------------------------------------

    async def _push(self, build: Build, info: ImageInfo) -> ImageInfo:
        """Push the built image to the registry (only the layers it lacks); the pinned reference."""
        registry = self.registry_client
        assert registry is not None
        host, tag = registry.repository.host, info.key[:16]
        started = time.monotonic()
        with self._daemon("reading the image's layers"):
            attrs = await asyncio.to_thread(self.client.api.inspect_image, info.image_id)
        tally = PushTally(list(attrs["RootFS"]["Layers"]))
        await build.publish("push", 98, f"Pushing the image to the registry {host} (only layers it lacks)")
        with _registry_call(f"reading the credentials for {host}"):
            auth = _daemon_auth(await asyncio.to_thread(docker_credentials, host))
        throttle = Throttle(2.0)
        push = _thread_stream(lambda: self.client.api.push(registry.repository.name, tag, stream=True, decode=True,
                                                           auth_config=auth))
        async with contextlib.aclosing(push) as events:
            async for event in events:
                if "daemon_error" in event:
                    raise self._daemon_gone(event["daemon_error"], "pushing the image", info.key)
                if str(event.get("status", "")).startswith("Retrying in"):
                    await self._fail_if_registry_gone(registry, info.key)
                if tally.feed(event) and throttle():
                    await build.publish("push", 98, f"Pushing to {host}: {tally.done} of {tally.layers} layers "
                                                    f"done, {tally.uploaded} uploaded")
        if tally.error or not tally.digest:
            cause = tally.error or "the daemon reported no digest"
            self._write_log(info.key, f"push to {registry.repository} failed: {cause}\n")
            raise _transfer_failure(f"pushing the image to {host}", host, cause, info.key)
        with _registry_call(f"reading back {registry.repository}:{tag}"):
            remote = await asyncio.to_thread(registry.image, tally.digest)
        if remote is None:
            raise BuildError(f"the registry {host} does not have the image just pushed ({tally.digest})",
                             phase="registry", key=info.key, cause=f"{host} lost the image just pushed")
        remote = dataclasses.replace(remote, tag=tag)
        pushed = tally.bytes_pushed(remote)
        seconds = time.monotonic() - started
        summary = (f"Pushed {_megabytes(pushed)} to {host} in {seconds:.1f} s: {tally.uploaded} of {tally.layers} "
                   f"layers new, {tally.layers - tally.uploaded} already there")
        self._write_log(info.key, f"push: {remote.reference}: {pushed} bytes, {tally.uploaded} of {tally.layers} "
                                  f"layers uploaded, {seconds:.1f} s\n")
        self.log.info("%s (%s)", summary, remote.reference)
        await build.publish("push", 99, summary)
        return dataclasses.replace(info, image_id=remote.config_digest, reference=remote.reference,
                                   pushed_bytes=pushed)

    async def _fail_if_registry_gone(self, registry: RegistryClient, key: str) -> None:
        """Docker retries a layer's upload five times, about 50 s in all, whatever failed: a
        registry that no longer answers at all fails the push now instead."""
        try:
            await asyncio.to_thread(registry.check)
        except RegistryError as error:
            if error.unreachable:
                host = registry.repository.host
                self._write_log(key, f"push to {registry.repository} failed: {error}\n")
                raise BuildError(f"pushing the image to {host} failed: it stopped answering mid-push: {error.problem}",
                                 phase="registry", key=key, cause=str(error), unreachable=True) from None

    def _daemon_gone(self, error: str, what: str, key: str) -> BuildError:
        return BuildError(f"the Docker daemon at {self.daemon_url} went away while {what}: {error}", phase="daemon",
                          key=key, cause=f"the Docker daemon at {self.daemon_url} cannot be reached ({error})")

    def _write_log(self, key: str, text: str) -> None:
        with contextlib.suppress(OSError):
            self.key_dir(key).mkdir(parents=True, exist_ok=True)
            with (self.key_dir(key) / "build.log").open("a") as build_log:
                build_log.write(text)

    async def ensure_present(self, info: ImageInfo, api: docker.APIClient | None = None,
                             publish: Callable[[str, int, str], Awaitable[None]] | None = None) -> bool:
        """Pull ``info``'s registry image onto a daemon that lacks it; True if it pulled.

        ``api``: the daemon that runs the server (default: the build daemon); ``publish(phase,
        progress 0-100, message)`` gets progress in bytes. The image is also tagged
        ``<registry>:<key[:16]>`` there, so ``condaspawner ls`` and ``gc`` see it.
        """
        if not info.reference:
            return False
        api = api or self.client.api
        with self._daemon("looking up the image"):
            try:
                await asyncio.to_thread(api.inspect_image, info.reference)
                return False
            except docker.errors.ImageNotFound:
                pass
        registry = self.registry_client
        assert registry is not None
        host = registry.repository.host
        digest = info.reference.partition("@")[2]
        with _registry_call(f"reading {info.reference}"):
            remote = await asyncio.to_thread(registry.image, digest)
            auth = _daemon_auth(await asyncio.to_thread(docker_credentials, host))
        if remote is None:
            raise BuildError(f"the registry {host} no longer has {info.reference}", phase="registry", key=info.key,
                             cause=f"{host} no longer has the image {info.reference}")
        tally = PullTally(remote.layers)
        throttle = Throttle(1.0)
        say = publish or _no_progress
        await say("pull", 0, f"Pulling the image from {host} ({_megabytes(remote.size)} compressed; "
                            "layers this host has are skipped)")
        pull = _thread_stream(lambda: api.pull(registry.repository.name, tag=digest, stream=True, decode=True,
                                               auth_config=auth))
        async with contextlib.aclosing(pull) as events:
            async for event in events:
                if "daemon_error" in event:
                    raise self._daemon_gone(event["daemon_error"], "pulling the image", info.key)
                tally.feed(event)
                if event.get("status") == "Downloading" and throttle():
                    done = tally.done
                    await say("pull", 100 * done // max(tally.total, 1),
                              f"Pulling the image from {host}: {_megabytes(done)} of {_megabytes(tally.total)}"
                              + (f" ({tally.already} layers already here)" if tally.already else ""))
        if tally.error:
            raise _transfer_failure(f"pulling {info.reference}", host, tally.error, info.key)
        with self._daemon("tagging the pulled image"):
            await asyncio.to_thread(api.tag, info.reference, registry.repository.name, info.key[:16])
        await say("pull", 100, f"Pulled {_megabytes(tally.total)} from {host}"
                  + (f" ({tally.already} layers were already here)" if tally.already else ""))
        return True

    @contextlib.asynccontextmanager
    async def _slot(self, build: Build):
        if self._slots.locked():
            self._waiting += 1
            await build.publish("queued", 1, f"waiting for {self.max_concurrent_builds} running builds to finish"
                                             f" ({self._waiting} in the queue)")
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()

    async def _build(self, build: Build, request: BuildRequest, started: float) -> ImageInfo:
        key = build.key
        key_dir = self.key_dir(key)
        log_path = key_dir / "build.log"
        context = Path(self.cache_dir) / "staging" / key
        build.started_here = True
        lock: Lock | None = None
        try:
            key_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(leftovers.sweep, self, key)  # before this key's old log is overwritten
            self._record(key, status="building", name=request.display_name, phase="", cause="", started=_now(),
                         finished="", env_name=request.env_name)
            # Removing a staged env is thousands of unlinks: keep them off the hub's event loop.
            await asyncio.to_thread(shutil.rmtree, context, True)
            # Line-buffered: a build process killed mid-build still leaves every line it had written.
            with log_path.open("w", buffering=1) as build_log:
                failed = True
                try:
                    build_log.write(f"build {key} of {request.display_name} ({request.env_name}) started {_now()} "
                                    f"(pid {os.getpid()})\n")
                    lock = await self._resolve(build, request, build_log)
                    layered = self.layered_images and await asyncio.to_thread(self._daemon_can_load_layers)
                    prefix = layers.SHARED_PREFIX if layered else request.prefix
                    env_size = await self._install(build, request, lock, context, build_log, prefix)
                    self._write_context(context, request, lock)
                    labels = self._labels(build.key, request, lock)
                    if layered:
                        image_id = await self._build_layered(build, request, context, build_log, labels)
                    else:
                        await build.publish("build", 45, "Writing the image")
                        image_id = await self._docker_build(build, request, context, build_log, env_size, labels)
                    failed = False
                finally:
                    await self._remove_staging(context, settle=failed and context.exists())
        except Exception as error:  # a full disk: an OSError, rattler's IoError, or an install's ResolveError
            if isinstance(error, BuildError) or not (is_no_space(error) or getattr(error, "no_space", False)):
                raise
            raise await self._no_space_error(request, lock, error) from None
        self.mark_used(key)
        self._record(key, status="built", finished=_now())
        image = self.client.images.get(image_id)
        seconds = time.monotonic() - started
        self.build_seconds.append(seconds)
        return ImageInfo(key, self.tag_for(key), image_id, request.env_name, False, seconds, image.attrs.get("Size", 0))

    async def _remove_staging(self, context: Path, settle: bool) -> None:
        """Remove the staging folder. After a failure (``settle``) the installer may still be finishing
        files it had started: remove, then watch until nothing reappears for a second (at most a minute)."""
        deadline = time.monotonic() + 60
        while True:
            await asyncio.to_thread(shutil.rmtree, context, True)
            if not settle:
                return
            await asyncio.sleep(1.0)
            if not context.exists():
                return
            if time.monotonic() > deadline:
                self.log.warning("Staging folder %s keeps being written to: left behind", context)
                return

    async def _no_space_error(self, request: BuildRequest, lock: Lock | None, error: BaseException) -> BuildError:
        """A full disk as the one-line BuildError "no space left in FOLDER (needs about N MB)"."""
        folders = [Path(self.cache_dir), Path(self.resolver.package_cache_dir)]
        folder = min(folders, key=_free_bytes)  # the fuller of the two (the one that filled up)
        if lock is None:  # full before the solve wrote the lock: solve again for the estimate
            with contextlib.suppress(Exception):
                lock = await self.resolver.solve(_with_kernel_package(request.spec), cuda=request.cuda)
        needed = await asyncio.to_thread(self._space_needed, lock, folder) if lock is not None else 0
        cause = f"no space left in {folder}" + (f" (needs about {_megabytes(needed)})" if needed else "")
        self.log.warning("Build of %s: %s: %s", request.display_name, cause, _one_line(error))
        return BuildError(cause, phase="disk", cause=cause)

    def _space_needed(self, lock: Lock, folder: Path) -> int:
        """About how many bytes an install of ``lock`` writes on ``folder``'s filesystem: downloads and
        unpacked packages in the package cache, and the staged environment (hard links on one filesystem)."""
        cache = Path(self.resolver.package_cache_dir)
        missing = {id(record) for record in self.resolver.not_in_cache(lock)}
        downloads = unpacked_missing = unpacked = 0
        for record in lock.records:
            if id(record) in missing:
                downloads += record.size or 0
                unpacked_missing += 3 * (record.size or 0)  # typical unpacked / compressed
                unpacked += 3 * (record.size or 0)
            else:
                unpacked += tree_size(cache / f"{record.name.normalized}-{record.version}-{record.build}")
        device = _device(folder)
        needed = 0
        if device == _device(cache):
            needed += downloads + unpacked_missing
        if device == _device(Path(self.cache_dir)) and _device(Path(self.cache_dir)) != _device(cache):
            needed += unpacked  # staging on another filesystem than the package cache: copies, not links
        return max(needed, 1_000_000)

    def build_estimate(self) -> str:
        """"about N min" (or "under a minute") from this process's builds, for the user."""
        seconds = self.typical_build_seconds()
        return "under a minute" if seconds < 60 else f"about {round(seconds / 60)} min"

    def typical_build_seconds(self, default: float = 120.0) -> float:
        """The median duration of this process's builds, for "about N min" notices."""
        if not self.build_seconds:
            return default
        return statistics.median(self.build_seconds[-20:])

    # -- the pre-check's solve, reused by the build ----------------------------------------------

    def _solve_key(self, request: BuildRequest) -> str:
        """What a solve depends on: the spec the build solves, the CUDA version, the platform, the channels."""
        spec = _with_kernel_package(request.spec)
        parts = {"spec": spec.normalized(), "cuda": request.cuda, "platform": self.resolver.platform,
                 "channels": self.resolver.channel_urls_for(spec)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    async def presolve(self, request: BuildRequest) -> Lock:
        """Solve ``request`` as its build will (ResolveError if it cannot be solved).

        The lock is kept for PRESOLVED_SECONDS: the build of the same request takes it
        instead of solving again.
        """
        lock = await self.resolver.solve(_with_kernel_package(request.spec), cuda=request.cuda)
        now = time.monotonic()
        self._presolved = {key: kept for key, kept in self._presolved.items() if now - kept[0] < PRESOLVED_SECONDS}
        self._presolved[self._solve_key(request)] = (now, lock)
        return lock

    def _take_presolved(self, request: BuildRequest) -> Lock | None:
        kept = self._presolved.pop(self._solve_key(request), None)
        return kept[1] if kept is not None and time.monotonic() - kept[0] < PRESOLVED_SECONDS else None

    async def _resolve(self, build: Build, request: BuildRequest, build_log: io.TextIOBase) -> Lock:
        presolved = self._take_presolved(request)
        if presolved is not None:
            build_log.write("solve: the lock of the pre-check before the spawn\n")
            return await self._keep_lock(build, presolved, build_log, " (solved before the start)")
        await build.publish("solve", 5, f"Solving {_plural(len(request.spec.conda), 'conda dependency')}")
        spec = _with_kernel_package(request.spec)
        try:
            lock = await self.resolver.solve(spec, cuda=request.cuda)
        except ResolveError as error:
            build_log.write(f"solve failed: {error}\n")
            raise BuildError(f"solve: {error}", phase="solve", cause=str(error).removeprefix("cannot solve: "),
                             unreachable=error.unreachable) from None
        return await self._keep_lock(build, lock, build_log)

    async def _keep_lock(self, build: Build, lock: Lock, build_log: io.TextIOBase, note: str = "") -> Lock:
        lock.write(self.key_dir(build.key) / "environment.lock")
        (self.key_dir(build.key) / "lock.json").write_text(lock.to_json())
        build_log.write(f"solved: {len(lock.records)} packages, lock digest {lock.digest()}\n")
        await build.publish("solve", 15, f"Solved: {_plural(len(lock.records), 'package')}{note}")
        return lock

    async def _install(self, build: Build, request: BuildRequest, lock: Lock, context: Path,
                       build_log: io.TextIOBase, prefix: str) -> int:
        missing = self.resolver.not_in_cache(lock)
        download = sum(record.size or 0 for record in missing)
        await build.publish("install", 20, (f"Downloading {_plural(len(missing), 'package')} ({_megabytes(download)})"
                                            f" and installing {len(lock.records)}") if missing
                            else f"Installing {_plural(len(lock.records), 'package')} from the package cache")
        try:
            await self.resolver.install(lock, context / "env", prefix)
        except ResolveError as error:
            build_log.write(f"install failed: {error}\n")
            if error.no_space:
                raise  # _build says which folder is full
            raise BuildError(f"install: {error}", phase="install", cause=str(error).removeprefix("install failed: "),
                             unreachable=error.unreachable) from None
        size = await asyncio.to_thread(tree_size, context / "env")
        build_log.write(f"installed into the staging prefix: {size} bytes\n")
        await build.publish("install", 40, f"Installed the conda environment ({_megabytes(size)})")
        return size

    def _daemon_can_load_layers(self) -> bool:
        with self._daemon("reading the daemon's image store"):
            able = layers.supports_layered_images(self.client.api)
        if not able:
            self.log.warning("ImageBuilder.layered_images: the Docker daemon uses the containerd image store; "
                             "building with the Dockerfile route")
        return able

    def _daemon_is_local(self) -> bool:
        """Whether the build daemon is on this host's socket, so that it can mount a staged folder."""
        return str(self.client.api.base_url) == "http+docker://localhost"

    async def _compile_staged(self, build: Build, context: Path, batches: list[list[str]],
                              build_log: io.TextIOBase) -> bool:
        """Byte-compile ``batches`` of the staged environment with its own Python, in a container
        of the base image with the staging folder mounted at the shared prefix (nothing runs on
        the host), so that each package's .pyc travel in its layer. False when it could not (a
        remote daemon, a failure): the Dockerfile compiles then."""
        if not self._daemon_is_local():
            build_log.write("compile: the Docker daemon is not on this host: compiling in the Dockerfile\n")
            return False
        if not batches:  # said all the same: the phase a user follows does not vanish on a warm cache
            await build.publish("compile", 41, "Python files already compiled: byte code reused from earlier builds")
            return True
        await build.publish("compile", 41, f"Compiling the environment's Python files ({sum(map(len, batches))})")
        (context / "compile").mkdir()
        (context / "compile" / "batches.json").write_text(json.dumps(batches))
        limits: dict[str, Any] = {"mem_limit": int(self.build_memory_limit)} if self.build_memory_limit else {}
        if self.build_cpuset_cpus:
            limits["cpuset_cpus"] = self.build_cpuset_cpus
        command = [f"{layers.SHARED_PREFIX}/bin/python", "-c", layers.COMPILE_SCRIPT, "/condaspawner-compile/batches.json"]
        image = self.base_image_id()

        def run() -> tuple[dict[str, Any], str]:
            # One thread owns the container from start to removal: a build that times out meanwhile
            # stops waiting for it, and the container is removed all the same.
            container = self.client.containers.run(
                image, command, detach=True, network_mode="none", user=f"{os.getuid()}:{os.getgid()}",
                entrypoint=[], working_dir="/", environment={"PYTHONHASHSEED": "0"},
                volumes={str((context / "env").resolve()): {"bind": layers.SHARED_PREFIX, "mode": "rw"},
                         str((context / "compile").resolve()): {"bind": "/condaspawner-compile", "mode": "ro"}},
                **limits)
            try:
                return container.wait(), container.logs().decode(errors="replace")
            finally:
                with contextlib.suppress(Exception):
                    container.remove(force=True)

        try:
            with self._daemon("byte-compiling the environment"):
                status, output = await asyncio.to_thread(run)
        except (BuildError, docker.errors.DockerException) as error:
            build_log.write(f"compile: {_one_line(error)}; compiling in the Dockerfile\n")
            return False
        finally:
            shutil.rmtree(context / "compile", ignore_errors=True)  # not for the build context
        build_log.write(output)
        if status.get("StatusCode") != 0:
            build_log.write(f"compile: exit status {status.get('StatusCode')}; compiling in the Dockerfile\n")
            return False
        return True

    async def _build_layered(self, build: Build, request: BuildRequest, context: Path, build_log: io.TextIOBase,
                             labels: dict[str, str]) -> str:
        """The layered route: load the environment as layers with the kernel spec and settings on
        top; a docker build on that image only for a pip section, or to compile where the builder
        could not. The tagged image's id."""
        image_id, compiled = await self._load_layers(build, request, context, build_log, labels)
        build_log.write(f"loaded image {image_id}\n")  # for leftovers, should the build stop before the tag
        await build.publish("kernel", 45, "Registering the kernel")  # its layer is in the loaded image
        await asyncio.to_thread(shutil.rmtree, context / "env")
        if request.spec.pip or not compiled:
            docker_context = context / "docker"
            docker_context.mkdir()
            shutil.copyfile(LAYERED_DOCKERFILE, docker_context / "Dockerfile")
            return await self._docker_build(build, request, docker_context, build_log, 0, labels,
                                            from_image=image_id, compile_step=not compiled)
        repository, tag = self.tag_for(build.key).rsplit(":", 1)
        with self._daemon("tagging the image"):
            await asyncio.to_thread(self.client.api.tag, image_id, repository, tag)
        await build.publish("tag", 98, f"Tagged {self.tag_for(build.key)}")
        return image_id

    async def _load_layers(self, build: Build, request: BuildRequest, context: Path,
                           build_log: io.TextIOBase, labels: dict[str, str]) -> tuple[str, bool]:
        """Compile the staged environment (``context``/env) and load it into Docker as layers on
        the base image, with the kernel spec and settings (``_write_context``'s files) as its top
        layer: the image's id, and whether its layers hold the compiled files."""
        staging = context / "env"
        plan = layers.plan_layers(staging, request.env_name, min_bytes=self.shared_layer_min_size,
                                  max_layers=MAX_PACKAGE_LAYERS)
        memo = layers.LayerMemo(Path(self.cache_dir) / "layers")
        base_id = self.base_image_id()
        with self._daemon("loading the environment's layers"):
            history = await asyncio.to_thread(layers.base_history, self.client.api, base_id, memo.directory)
            known = await asyncio.to_thread(layers.known_chains, self.client.api, [i.id for i in self.images()])
            base_attrs = await asyncio.to_thread(self.client.api.inspect_image, base_id)
        # Layers Docker holds with their byte code already are neither compiled nor sent again,
        # and packages compiled for an earlier build are not compiled again.
        stored = layers.stored_layers(base_attrs, plan, known, memo)
        bytecode = BytecodeCache(Path(self.bytecode_cache_dir or Path(self.resolver.package_cache_dir)
                                      / "condaspawner-bytecode"))
        done = await asyncio.to_thread(bytecode.restore, staging)
        batches = layers.compile_batches(staging, plan, stored, done)
        compiled = await self._compile_staged(build, context, batches, build_log)
        build_log.write(f"byte code of {len(done)} Python files from the cache, {sum(map(len, batches))} compiled\n")
        if compiled:
            await asyncio.to_thread(bytecode.keep, staging)
            plan = layers.plan_layers(staging, request.env_name, min_bytes=self.shared_layer_min_size,
                                      max_layers=MAX_PACKAGE_LAYERS)  # the same layers, with their .pyc
        plan.append(layers.files_layer("kernel and settings", self._settings_files(context, request)))
        env = {"CONDASPAWNER_ENV": f"{ENVS_ROOT}/{request.env_name}"}
        await build.publish("build", 42, f"Writing the environment as {_plural(len(plan), 'layer')}")
        def loading(image_id: str) -> None:  # for leftovers, should the build be killed mid-load
            build_log.write(f"loading image {image_id}\n")
            build_log.flush()

        with self._daemon("loading the environment's layers"):
            try:
                result = await asyncio.to_thread(layers.load_image, self.client.api, base_id, plan, labels, known,
                                                 memo, history, env, loading)
            except OSError as error:  # a layer counted on was removed meanwhile: send every layer
                build_log.write(f"layered load failed ({error}); sending every layer\n")
                result = await asyncio.to_thread(layers.load_image, self.client.api, base_id, plan, labels, set(),
                                                 layers.LayerMemo(None), history, env, loading)
        for name, diff_id, size, sent in result.layers:
            build_log.write(f"layer {name}: {size} bytes, {diff_id}, {'written' if sent else 'already stored'}\n")
        written = [size for _, _, size, sent in result.layers if sent]
        await build.publish("build", 44, f"Wrote {_megabytes(sum(written))} in {_plural(len(written), 'layer')} "
                                         f"({len(result.layers) - len(written)} already stored)")
        return result.image_id, compiled

    @staticmethod
    def _settings_files(context: Path, request: BuildRequest) -> dict[str, Path]:
        """Where env.Dockerfile's COPY steps put ``_write_context``'s files: path in the image -> file."""
        files = {f"/opt/condaspawner/{path.name}": path for path in (context / "meta").iterdir()}
        files[f"/opt/conda/share/jupyter/kernels/{request.env_name}/kernel.json"] = context / "kernel" / "kernel.json"
        files["/opt/conda/etc/jupyter/jupyter_server_config.json"] = context / "jupyter" / "jupyter_server_config.json"
        return files

    def _labels(self, key: str, request: BuildRequest, lock: Lock) -> dict[str, str]:
        return {
            LABEL_KEY: key,
            LABEL_SPEC: request.spec.normalized_json(),
            LABEL_LOCK_DIGEST: lock.digest(),
            LABEL_BASE_IMAGE: self.base_image_id(),
            LABEL_BUILDER_VERSION: RECIPE_VERSION,
            LABEL_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
            LABEL_ENV_NAME: request.env_name,
        }

    def _write_context(self, context: Path, request: BuildRequest, lock: Lock) -> None:
        shutil.copyfile(ENV_DOCKERFILE, context / "Dockerfile")
        meta = context / "meta"
        meta.mkdir()
        (meta / "environment.yml").write_text(request.spec.to_yaml(name=request.env_name))
        (meta / "condaspawner-lock.json").write_text(lock.to_json())
        (meta / "requirements.txt").write_text("".join(f"{line}\n" for line in request.spec.pip))
        (meta / "pip.conf").write_text(_pip_conf(self.pip_config))
        kernel = context / "kernel"
        kernel.mkdir()
        (kernel / "kernel.json").write_text(json.dumps(_kernel_spec(request), indent=2))
        # Not a jupyter_server_config.d/ file: jupyter_server reads those for extensions only.
        (context / "jupyter").mkdir()
        # The env's kernel is the only one offered: the base's own python3 kernel is hidden.
        (context / "jupyter" / "jupyter_server_config.json").write_text(json.dumps({
            "MultiKernelManager": {"default_kernel_name": request.env_name},
            "KernelSpecManager": {"ensure_native_kernel": False, "allowed_kernelspecs": [request.env_name]},
        }, indent=2))

    async def _docker_build(self, build: Build, request: BuildRequest, context: Path, build_log: io.TextIOBase,
                            env_size: int, labels: dict[str, str], from_image: str | None = None,
                            compile_step: bool = True) -> str:
        """A docker build of ``context`` (its Dockerfile) on ``from_image`` (the loaded layers of
        the layered route), else on the base image; ``compile_step``: whether it byte-compiles."""
        kwargs = dict(
            path=str(context), tag=self.tag_for(build.key), labels=labels, rm=True, forcerm=True,
            network_mode=self.build_network_mode, decode=True,
            buildargs={"BASE_IMAGE": from_image or self.base_image_id(), "ENV_NAME": request.env_name,
                       **({"COMPILE": "1" if compile_step else "0"} if from_image else {})},
            container_limits=self._container_limits(),
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        abandoned = threading.Event()

        def stream() -> None:  # docker-py streams synchronously: read it in a thread
            try:
                for chunk in self.client.api.build(**kwargs):
                    if abandoned.is_set():
                        break  # closing the stream makes the daemon cancel the build
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except Exception as error:  # the daemon went away, context too large, ...
                loop.call_soon_threadsafe(queue.put_nowait, {"daemon_error": _one_line(error)})
            loop.call_soon_threadsafe(queue.put_nowait, None)

        reader = loop.run_in_executor(None, stream)
        steps = _StepTracker(request, env_size, compiling=compile_step)
        image_id, failure, daemon_failure = None, "", ""
        try:
            while (chunk := await queue.get()) is not None:
                if "daemon_error" in chunk:
                    daemon_failure = chunk["daemon_error"]
                    build_log.write(f"docker: {daemon_failure}\n")
                    continue
                if "error" in chunk:
                    failure = _strip_ansi(chunk["error"]).strip()
                    build_log.write(failure + "\n")
                    continue
                image_id = chunk.get("aux", {}).get("ID", image_id)
                for line in _strip_ansi(chunk.get("stream", "")).splitlines():
                    if line.strip():
                        build_log.write(line + "\n")
                        message = steps.feed(line)
                        if message:
                            await build.publish(steps.phase, steps.progress(), message)
        except asyncio.CancelledError:  # build_timeout: stop reading at the next line docker sends
            abandoned.set()
            raise
        await reader
        if "no space left on device" in "\n".join([daemon_failure, failure, *steps.output]).lower():
            raise self._daemon_disk_full(env_size)
        if daemon_failure:
            # docker-py's words ("Connection broken: IncompleteRead(0 bytes read)") stay in the build log
            cause = f"the Docker daemon at {self.daemon_url} went away while writing the image"
            raise BuildError(cause, phase="daemon", cause=cause)
        if failure or image_id is None:
            raise steps.failure(failure or "docker gave no image")
        await build.publish("tag", 98, f"Tagged {self.tag_for(build.key)}")
        return image_id

    def _daemon_disk_full(self, env_size: int) -> BuildError:
        """The build daemon's disk filled up while writing the image (its data root, on its host)."""
        root = "its data root"
        with contextlib.suppress(Exception):
            root = str(self.client.info().get("DockerRootDir") or root)
        # the context sent, the COPY layer and the compiled files: about twice the environment
        cause = f"no space left in {root} on the Docker host {self.daemon_url} (needs about {_megabytes(2 * env_size)})"
        return BuildError(cause, phase="disk", cause=cause)

    def _container_limits(self) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        if self.build_memory_limit:
            limits["memory"] = int(self.build_memory_limit)
        if self.build_cpuset_cpus:
            limits["cpusetcpus"] = self.build_cpuset_cpus
        return limits

    # -- cache management ------------------------------------------------------------------

    def images(self) -> list[docker.models.images.Image]:
        """This builder's environment images on its daemon: in ``repository``, labelled with a key."""
        return [
            image for image in self.client.images.list(name=self.repository, filters={"label": LABEL_KEY})
            if self.tag_for(image.labels[LABEL_KEY]) in image.tags
        ]

    def layer_sizes(self, image: docker.models.images.Image) -> dict[str, int]:
        """The image's layers that hold bytes, as {layer key: bytes}.

        A layer's key is a digest of the image's history up to that layer (docker's history
        entries, oldest first): images built on one base, or reusing one cached step, share
        those entries and so the keys of the layers they share.
        """
        with self._daemon("reading an image's layers"):
            history = self.client.api.history(image.id)  # newest first
        chain = hashlib.sha256()
        sizes: dict[str, int] = {}
        for entry in reversed(history):
            chain.update(json.dumps([entry.get("Created"), entry.get("CreatedBy"), entry.get("Size")]).encode())
            if entry.get("Size"):
                sizes[chain.hexdigest()] = int(entry["Size"])
        return sizes

    def own_layers(self, images: list[docker.models.images.Image]) -> dict[str, dict[str, int]]:
        """Each image's layers (by id) less the base image's: the bytes an environment image adds."""
        try:
            with self._daemon("looking up the base image"):
                base = set(self.layer_sizes(self.client.images.get(self.base_image)))
        except docker.errors.ImageNotFound:
            base = set()
        return {image.id: {key: size for key, size in self.layer_sizes(image).items() if key not in base}
                for image in images}

    def gc_plan(self) -> GcResult:
        """What `gc` would remove: least recently used first, never one a container uses, never one with
        another tag (a note says which), until the images fit ``max_images`` and ``disk_budget``.

        Sizes count each layer once and never the base: an image's ``freed`` bytes are the layers
        no image that stays holds, ``total`` the bytes all environment images add to the base.
        """
        # ignore_removed: on a shared daemon another hub may remove a container between the
        # listing and its inspection.
        in_use = {container.attrs.get("Image")
                  for container in self.client.containers.list(all=True, ignore_removed=True)}
        candidates = sorted(self.images(), key=lambda image: self.last_used(image.labels[LABEL_KEY]))
        layers = self.own_layers(candidates)
        holders: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for image_layers in layers.values():
            for key, size in image_layers.items():
                holders[key] = holders.get(key, 0) + 1
                sizes[key] = size
        result = GcResult(total=sum(sizes.values()))
        total, count = result.total, len(candidates)
        for image in candidates:
            over_count = self.max_images and count > self.max_images
            over_budget = total > int(self.disk_budget)
            if not (over_count or over_budget):
                break
            if image.id in in_use:
                continue
            tag = self.tag_for(image.labels[LABEL_KEY])
            others = [other for other in image.tags if other != tag]
            if others:
                result.notes.append(f"kept {tag}: it is also tagged {', '.join(others)} (`docker rmi {others[0]}` "
                                    "lets gc remove it)")
                continue
            freed = 0
            for key in layers[image.id]:
                holders[key] -= 1
                freed += sizes[key] if holders[key] == 0 else 0
            result.removed.append(image)
            result.freed[image.id] = freed
            count -= 1
            total -= freed
        return result

    def gc(self, dry_run: bool = False) -> GcResult:
        """Remove the images of :meth:`gc_plan` and what failed or killed builds of this installation
        left (leftovers.py), unless ``dry_run``; what was removed, and notes.

        An image docker refuses to remove (tagged or used since the plan) is kept with a note;
        gc goes on with the others.
        """
        result = self.gc_plan()
        found = leftovers.find(self)
        result.leftovers = found if dry_run else leftovers.remove(self, found)
        result.notes.extend(result.leftovers.notes)
        result.staging = {str(folder): size for folder, size in result.leftovers.staging.items()}
        if dry_run:
            return result
        for image in list(result.removed):
            try:
                with self._daemon("removing an image"):
                    self.client.images.remove(image.id, noprune=False)
            except docker.errors.APIError as error:
                result.removed.remove(image)
                result.freed.pop(image.id, None)
                result.notes.append(f"kept {self.tag_for(image.labels[LABEL_KEY])}: docker refused to remove it "
                                    f"({_one_line(error.explanation or error)})")
        return result


@dataclass
class GcResult:
    """What ``gc`` removed (or would): ``removed`` least recently used first; ``freed``: bytes
    each removal frees (layers no kept image or the base holds), by image id; ``total``: bytes
    the environment images held beyond the base before; ``notes``: one line per image kept
    that the budget would have removed; ``staging``: staging folders killed builds left;
    ``leftovers``: everything failed or killed builds of this installation left (leftovers.py)."""

    removed: list[docker.models.images.Image] = field(default_factory=list)
    freed: dict[str, int] = field(default_factory=dict)
    total: int = 0
    notes: list[str] = field(default_factory=list)
    staging: dict[str, int] = field(default_factory=dict)  # leftover staging folder -> its bytes
    leftovers: Leftovers = field(default_factory=Leftovers)

    @property
    def freed_total(self) -> int:
        return sum(self.freed.values())


def _with_kernel_package(spec: EnvironmentSpec) -> EnvironmentSpec:
    """The spec plus ipykernel when neither section has it: every env must run a kernel."""
    names = {MatchSpec(text).name.normalized for text in spec.conda}
    names |= {Requirement(pip_requirement_text(text)).name for text in spec.pip}  # already canonical
    if "ipykernel" in names:
        return spec
    return dataclasses.replace(spec, conda=tuple(sorted((*spec.conda, "ipykernel"))))


def _kernel_spec(request: BuildRequest) -> dict[str, Any]:
    prefix = request.prefix
    env = {
        "CONDA_PREFIX": prefix,
        "CONDA_DEFAULT_ENV": request.env_name,
        "PATH": f"{prefix}/bin:/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        **dict(request.spec.variables),
    }
    return {
        "argv": [f"{prefix}/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": request.display_name,
        "language": "python",
        "env": env,
        "metadata": {"debugger": True, "condaspawner": {"env_name": request.env_name}},
    }


def _pip_conf(settings: dict[str, Any]) -> str:
    parser = configparser.ConfigParser()
    parser["global"] = {str(k): str(v) for k, v in settings.items()}
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


class _StepTracker:
    """Docker's "Step N/M : INSTRUCTION" lines -> the phases a user understands, and failures.

    Raw steps go to the build log only; the progress page says what a step is for.
    """

    def __init__(self, request: BuildRequest, env_size: int, compiling: bool = True):
        self.request = request
        self.env_size = env_size
        # on layers the builder compiled, layered.Dockerfile's compile step does nothing
        self.quiet = set() if compiling else {"compile"}
        self.step, self.steps = 0, 1
        self.instruction = ""
        self.phase = "build"
        self.output: list[str] = []  # the current step's output

    def feed(self, line: str) -> str | None:
        """Take one line of docker's output; return a progress message when a phase starts."""
        match = _STEP.match(line)
        if not match:
            self.output.append(line)
            return None
        self.step, self.steps = int(match.group(1)), int(match.group(2))
        self.instruction = line[match.end():].strip()
        self.output = []
        for pattern, phase in _STEP_PHASES:
            if pattern.search(self.instruction):
                if phase in self.quiet:
                    return None
                self.phase = phase
                return self._message(phase)
        return None

    def progress(self) -> int:
        return 45 + int(50 * self.step / max(self.steps, 1))

    def _message(self, phase: str) -> str | None:
        if phase == "image":
            return f"Writing the environment into the image ({_megabytes(self.env_size)})"
        if phase == "compile":
            return "Compiling the environment's Python files"
        if phase == "pip":
            pip = self.request.spec.pip
            return f"Installing {_plural(len(pip), 'pip package')} in a container" if pip else None
        return "Registering the kernel"

    def failure(self, error: str) -> BuildError:
        """The failed step as one line: what it was for, and the cause without docker's noise."""
        if _STEP_PHASES[2][0].search(self.instruction):  # the pip step
            return self._pip_failure()
        what = {"image": "writing the environment into the image", "compile": "compiling Python files",
                "kernel": "registering the kernel"}.get(self.phase, "writing the image")
        detail = next((line.strip() for line in reversed(self.output) if line.strip()
                       and not line.startswith(_DOCKER_NOISE)), "")
        cause = _one_line(f"{what}: {detail or error}")
        return BuildError(f"writing the image failed at {what}: {detail or error}", phase="build", cause=cause)

    def _pip_failure(self) -> BuildError:
        text = "\n".join(self.output)
        if any(marker in text for marker in _UNREACHABLE_MARKERS):
            cause = "the package index could not be reached"
            return BuildError(f"pip: {cause}", phase="pip", cause=cause, unreachable=True)
        errors = [line.strip().removeprefix("ERROR: ") for line in self.output if line.strip().startswith("ERROR:")]
        cause = _one_line(errors[-1] if errors else "pip exited with an error (see the build log)")
        return BuildError(f"pip: {cause}", phase="pip", cause=cause)


@contextlib.asynccontextmanager
async def _file_lock(path: Path):
    """An exclusive lock across hub processes sharing the cache folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    try:
        await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _lock_held(path: Path) -> bool:
    """Whether some process (this one included) holds ``path``'s build lock now."""
    try:
        handle = path.open("a")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _timestamp(text: str) -> float | None:
    """Docker's RFC 3339 time (nanoseconds, "Z") as a Unix time, or None."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", text or "")
    if not match:
        return None
    zone = match.group(3) or "Z"
    parsed = datetime.fromisoformat(match.group(1) + ("+00:00" if zone == "Z" else zone))
    return parsed.timestamp()


def _free_bytes(folder: Path) -> int:
    """Free bytes on ``folder``'s filesystem (of its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return 0


def _device(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            return candidate.stat().st_dev
    return -1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tree_size(root: Path) -> int:
    """Bytes under ``root``, each hard-linked file counted once (staged envs link into the cache)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            info = os.lstat(os.path.join(directory, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


def _plural(count: int, noun: str) -> str:
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.0f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


@contextlib.contextmanager
def _registry_call(what: str):
    """Registry API calls: a RegistryError becomes the one-line BuildError of phase "registry"."""
    try:
        yield
    except RegistryError as error:
        raise BuildError(f"{what}: {error}", phase="registry", cause=str(error),
                         unreachable=error.unreachable) from None


def _transfer_failure(what: str, host: str, error: str, key: str) -> BuildError:
    """A push or pull the daemon reported failed: unreachable (worth a retry) or refused."""
    if failure_is_unreachable(error):
        cause = f"the registry {host} cannot be reached ({connection_problem(error)})"
        return BuildError(f"{what} failed: {error}", phase="registry", key=key, cause=cause, unreachable=True)
    return BuildError(f"{what} failed: {error}", phase="registry", key=key, cause=f"{what} failed ({error})")


def _daemon_auth(credentials: dict[str, str] | None) -> dict[str, str] | None:
    """Docker's credentials for a registry as docker-py's auth_config (the X-Registry-Auth header)."""
    if not credentials:
        return None
    if "identitytoken" in credentials:
        return {"identitytoken": credentials["identitytoken"]}
    return {"username": credentials["username"], "password": credentials.get("password", "")}


async def _no_progress(phase: str, progress: int, message: str) -> None:
    return None


async def _thread_stream(make: Callable[[], Iterable[dict[str, Any]]]) -> AsyncGenerator[dict[str, Any], None]:
    """A docker-py event stream (synchronous) read in a thread, as an async iterator.

    The daemon's refusals become ``{"error": ...}`` events, like errors inside the stream;
    a daemon that cannot be reached becomes ``{"daemon_error": ...}``. Abandoning the
    iterator (a timeout) stops reading at the next event.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    abandoned = threading.Event()

    def pump() -> None:
        try:
            for item in make():
                if abandoned.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except docker.errors.APIError as error:
            loop.call_soon_threadsafe(queue.put_nowait, {"error": _one_line(error.explanation or error)})
        except Exception as error:  # the daemon went away or cannot be reached
            loop.call_soon_threadsafe(queue.put_nowait, {"daemon_error": _one_line(error)})
        loop.call_soon_threadsafe(queue.put_nowait, None)

    reader = loop.run_in_executor(None, pump)
    try:
        while (item := await queue.get()) is not None:
            yield item
    finally:
        abandoned.set()
    await reader


@contextlib.contextmanager
def _daemon_call(what: str, where: str = ""):
    """Docker calls whose failure to connect is "the daemon cannot be reached", not a bug."""
    try:
        yield
    except docker.errors.NotFound:
        raise
    except docker.errors.APIError as error:  # the daemon answered: it is reachable, and said no
        where = where or os.environ.get("DOCKER_HOST") or "the default socket"
        raise BuildError(f"the Docker daemon at {where} refused {what}: {_one_line(error)}", phase="daemon",
                         cause=f"the Docker daemon at {where} refused {what} ({_one_line(error)})") from None
    except (docker.errors.DockerException, requests.exceptions.ConnectionError) as error:
        where = where or os.environ.get("DOCKER_HOST") or "the default socket"
        raise BuildError(f"cannot reach the Docker daemon at {where} ({what}): {_one_line(error)}", phase="daemon",
                         cause=f"the Docker daemon at {where} cannot be reached ({_one_line(error)})") from None
