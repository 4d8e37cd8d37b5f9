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
:meth:`ImageBuilder.ensure_present` pulls it onto a daemon that lacks it (imagepush.py).

The builder is the orchestrator and holds every admin setting; the work is done by
staging.py (solve, install), buildcontext.py (the image's files and labels),
layeredbuild.py and dockerbuild.py (the two routes), imagepush.py (registry push and
pull), buildrecords.py (each key's status, log, lock, last use) and imagegc.py (gc).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import docker.tls
from jupyterhub.traitlets import ByteSpecification
from traitlets import Bool, Dict, Float, Instance, Integer, List, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from . import buildcontext, imagegc, layeredbuild, layers, leftovers, metrics, staging
from .builderrors import BuildError, daemon_call, one_line, registry_call
from .buildmodel import LABEL_KEY, RECIPE_VERSION, Build, BuildRequest, ImageInfo
from .buildrecords import BuildRecord, BuildRecords, file_lock, now
from .dockerbuild import StepTracker as _StepTracker  # noqa: F401  (tests import it from here)
from .dockerbuild import docker_build
from .dockerclient import daemon_settings
from .imagegc import GcResult
from .imagepush import RegistryTransfer
from .imagepush import transfer_failure as _transfer_failure  # noqa: F401  (tests import it from here)
from .registry import ARCHITECTURES, RegistryClient, RemoteImage, Repository
from .resolve import Lock, Resolver, is_no_space

# How long the lock of a spawn's pre-check (ImageBuilder.presolve) stays good for its build.
PRESOLVED_SECONDS = 600
# A rebuilt base is noticed within this many seconds; lookups skip a daemon round trip.
BASE_ID_TTL_S = 10.0


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
        self._removals: set[asyncio.Future] = set()  # staging folders of built images, being removed

    @property
    def client(self) -> docker.DockerClient:
        """The daemon images are built on: docker_host, else the servers' daemon (daemon_settings)."""
        if self.docker_client is None:
            with self.daemon_call("connecting"):
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

    def daemon_call(self, what: str) -> contextlib.AbstractContextManager:
        """A block of calls on the build daemon: failing to reach it, or a refusal, is a one-line BuildError."""
        return daemon_call(what, self.daemon_url)

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
            with self.daemon_call("looking up the base image"):
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
            with self.daemon_call("looking up the image"):
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
        with registry_call(f"looking up {registry.repository}:{tag}"):
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

    # -- build records (buildrecords.py) ---------------------------------------------------

    @property
    def records(self) -> BuildRecords:
        """The builds recorded in cache_dir (status, log, lock, last use of each key)."""
        return BuildRecords(self.cache_dir)

    def key_dir(self, key: str) -> Path:
        return self.records.key_dir(key)

    def mark_used(self, key: str) -> None:
        """Record a use of the key's image (the file's mtime survives hub restarts)."""
        self.records.mark_used(key)

    def last_used(self, key: str) -> float:
        return self.records.last_used(key)

    def build_record(self, key: str) -> BuildRecord | None:
        """The key's recorded build (from its cache folder), or None if it was never built here."""
        return self.records.build_record(key)

    def builds(self) -> list[BuildRecord]:
        """Every build recorded in the cache folder, the latest first (no daemon needed)."""
        return self.records.builds()

    def in_progress(self) -> list[Build]:
        """The builds this process is running or waiting to run (a slot), oldest first."""
        return list(self._builds.values())

    def failed_builds(self) -> list[BuildRecord]:
        """Builds whose last attempt failed or was interrupted, the latest first."""
        return self.records.failed_builds()

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
                self.records.record_failure(build.key, timeout)
            raise timeout from None
        except BuildError as error:
            error.key = error.key or build.key
            self.log.warning("%s", error.summary())
            if build.started_here:
                self.records.record_failure(build.key, error)
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
            async with file_lock(self.key_dir(key) / "build.lock"):
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
                    info = await self._transfers().push(self.client.api, build, info)
                return info

    def _remove_replaced(self, key: str, image_id: str) -> None:
        """Remove the image a rebuild replaced (its tag moved to the new one), unless a server runs it."""
        try:
            with self.daemon_call("removing the replaced image"):
                self.client.images.remove(image_id, noprune=False)
            self.records.write_log(key, f"removed the replaced image {image_id}\n")
        except (BuildError, docker.errors.APIError) as error:  # a server still runs it: it stays, untagged
            self.log.info("Rebuild of %s kept the replaced image %s: %s", key[:16], image_id, one_line(error))
            self.records.write_log(key, f"kept the replaced image {image_id}: {one_line(error)}\n")

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
        spec = staging.with_kernel_package(request.spec)
        parts = {"spec": spec.normalized(), "cuda": request.cuda, "platform": self.resolver.platform,
                 "channels": self.resolver.channel_urls_for(spec)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    async def presolve(self, request: BuildRequest) -> Lock:
        """Solve ``request`` as its build will (ResolveError if it cannot be solved).

        The lock is kept for PRESOLVED_SECONDS: the build of the same request takes it
        instead of solving again.
        """
        lock = await self.resolver.solve(staging.with_kernel_package(request.spec), cuda=request.cuda)
        solved_at = time.monotonic()
        self._presolved = {key: kept for key, kept in self._presolved.items()
                           if solved_at - kept[0] < PRESOLVED_SECONDS}
        self._presolved[self._solve_key(request)] = (solved_at, lock)
        return lock

    def _take_presolved(self, request: BuildRequest) -> Lock | None:
        kept = self._presolved.pop(self._solve_key(request), None)
        return kept[1] if kept is not None and time.monotonic() - kept[0] < PRESOLVED_SECONDS else None

    async def _resolve(self, build: Build, request: BuildRequest, build_log: io.TextIOBase) -> Lock:
        return await staging.solve(self.resolver, build, request, build_log, self.key_dir(build.key),
                                   presolved=self._take_presolved(request))

    # -- one build's work ---------------------------------------------------------------

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
            self.records.record(key, status="building", name=request.display_name, phase="", cause="",
                                started=now(), finished="", env_name=request.env_name)
            # Removing a staged env is thousands of unlinks: keep them off the hub's event loop.
            await asyncio.to_thread(shutil.rmtree, context, True)
            # Line-buffered: a build process killed mid-build still leaves every line it had written.
            with log_path.open("w", buffering=1) as build_log:
                failed = True
                try:
                    build_log.write(f"build {key} of {request.display_name} ({request.env_name}) started {now()} "
                                    f"(pid {os.getpid()})\n")
                    lock = await self._resolve(build, request, build_log)
                    layered = self.layered_images and await asyncio.to_thread(layeredbuild.daemon_can_load_layers,
                                                                              self)
                    prefix = layers.SHARED_PREFIX if layered else request.prefix
                    env_size = await staging.install(self.resolver, build, lock, context, build_log, prefix)
                    buildcontext.write_context(context, request, lock, self.pip_config)
                    labels = buildcontext.image_labels(build.key, request, lock, self.base_image_id())
                    if layered:
                        image_id = await layeredbuild.build_layered(self, build, request, context, build_log, labels)
                    else:
                        await build.publish("build", 45, "Writing the image")
                        image_id = await docker_build(self, build, request, context, build_log, env_size, labels)
                    failed = False
                finally:
                    if failed:
                        await staging.remove_staging(context, context.exists(), self.log)
                    else:  # the image is ready: its spawns need not wait for the unlinks
                        self._remove_later(staging.set_aside(context))
        except Exception as error:  # a full disk: an OSError, rattler's IoError, or an install's ResolveError
            if isinstance(error, BuildError) or not (is_no_space(error) or getattr(error, "no_space", False)):
                raise
            raise await self._no_space_error(request, lock, error) from None
        self.mark_used(key)
        self.records.record(key, status="built", finished=now())
        image = self.client.images.get(image_id)
        seconds = time.monotonic() - started
        self.build_seconds.append(seconds)
        return ImageInfo(key, self.tag_for(key), image_id, request.env_name, False, seconds, image.attrs.get("Size", 0))

    def _remove_later(self, folder: Path) -> None:
        removal = asyncio.ensure_future(asyncio.to_thread(shutil.rmtree, folder, True))
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)

    async def finish_removals(self) -> None:
        """Wait until the staging folders of finished builds are gone (a command, before it exits)."""
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    async def _no_space_error(self, request: BuildRequest, lock: Lock | None, error: BaseException) -> BuildError:
        return await staging.no_space_error(self.resolver, Path(self.cache_dir), request, lock, error, self.log)

    # -- the registry: push and pull (imagepush.py) ------------------------------------------

    def _transfers(self) -> RegistryTransfer:
        registry = self.registry_client
        assert registry is not None
        return RegistryTransfer(registry, self.daemon_url, self.records, self.log)

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
        with self.daemon_call("looking up the image"):
            try:
                await asyncio.to_thread(api.inspect_image, info.reference)
                return False
            except docker.errors.ImageNotFound:
                pass
        await self._transfers().pull(api, info, publish)
        return True

    # -- cache management (imagegc.py) ---------------------------------------------------------

    def images(self) -> list[docker.models.images.Image]:
        """This builder's environment images on its daemon: in ``repository``, labelled with a key."""
        return imagegc.images(self)

    def layer_sizes(self, image: docker.models.images.Image) -> dict[str, int]:
        """The image's layers that hold bytes, as {layer key: bytes} (see imagegc.layer_sizes)."""
        return imagegc.layer_sizes(self, image)

    def own_layers(self, images: list[docker.models.images.Image]) -> dict[str, dict[str, int]]:
        """Each image's layers (by id) less the base image's: the bytes an environment image adds."""
        return imagegc.own_layers(self, images)

    def gc_plan(self) -> GcResult:
        """What `gc` would remove, and why some are kept (see imagegc.gc_plan)."""
        return imagegc.gc_plan(self)

    def gc(self, dry_run: bool = False) -> GcResult:
        """Remove the images of :meth:`gc_plan` and what failed or killed builds left, unless
        ``dry_run`` (see imagegc.gc); what was removed, and notes."""
        return imagegc.gc(self, dry_run)
