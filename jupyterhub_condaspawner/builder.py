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

The builder holds every admin setting, the daemon, keys and lookups; buildrun.py runs
the builds (one per key, a few at a time, each under a file lock); the work is done by
staging.py (solve, install), buildcontext.py (the image's files and labels),
layeredbuild.py and dockerbuild.py (the two routes), imagepush.py (registry push and
pull), buildrecords.py (each key's status, log, lock, last use) and imagegc.py (gc).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import docker.tls
from jupyterhub.traitlets import ByteSpecification
from traitlets import Bool, Dict, Instance, Integer, List, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from . import imagegc, metrics, staging
from .builderrors import BuildError, daemon_call, registry_call
from .buildmodel import LABEL_KEY, RECIPE_VERSION, Build, BuildRequest, ImageInfo, request_for_profile
from .buildrecords import BuildRecord, BuildRecords
from .buildrun import BuildRuns
from .dockerbuild import StepTracker as _StepTracker  # noqa: F401  (tests import it from here)
from .dockerclient import daemon_settings
from .imagegc import GcResult
from .imagepush import RegistryTransfer
from .imagepush import transfer_failure as _transfer_failure  # noqa: F401  (tests import it from here)
from .profiles import Profile
from .registry import ARCHITECTURES, RegistryClient, RemoteImage, Repository
from .resolve import Lock, Resolver
from .traittypes import FiniteFloat

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
    registry_timeout = FiniteFloat(
        30,
        min=1,
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
        help="""Folder for build logs, locks, last-use times and staging (survives hub restarts),
        and for what is not a cache: who started which environment (usage/, the environments
        page), users' notices (notices/) and the home volumes' owner ledger (volumes/). Keep it
        across upgrades. "" (the default): ~/.cache/condaspawner of the hub's user.

        c.ImageBuilder.cache_dir = "/var/cache/condaspawner"
        """,
    )
    build_network_mode = Unicode(
        "default",
        config=True,
        help="""Docker network mode of build steps: only a pip section uses it, to reach the
        package index (pip_config). "default" is Docker's own for builds (its bridge). "host"
        lets the build code of a user's pip packages connect to everything listening on the
        hub host, loopback included; use it only where the index is on loopback and the
        daemon has no bridge (the test bench). pip runs without capabilities either way.

        c.ImageBuilder.build_network_mode = "default"
        """,
    )
    build_memory_limit = ByteSpecification(
        None,
        allow_none=True,
        config=True,
        help="""Memory limit of each container a build runs: the compile container and each
        docker build step (a pip section's). The solve and the conda install run in the hub's
        own processes, outside it. None: no limit.

        c.ImageBuilder.build_memory_limit = "4G"
        """,
    )
    build_cpuset_cpus = Unicode(
        "",
        config=True,
        help="""CPUs the containers a build runs may use (the compile container and each docker
        build step), in docker's cpuset syntax ("" = all). The solve and the conda install run
        in the hub's own processes, outside it.

        c.ImageBuilder.build_cpuset_cpus = "0-3"
        """,
    )
    max_concurrent_builds = Integer(
        2,
        min=1,  # 0 would queue every build for ever, without a word
        config=True,
        help="""Builds run at once in this hub; further requests wait in a queue.

        c.ImageBuilder.max_concurrent_builds = 4
        """,
    )
    max_concurrent_presolves = Integer(
        2,
        min=1,
        config=True,
        help="""Solves of users' own environments run at once in this hub, before a spawn (the
        pre-check) and for the spawn form's Check button; further ones wait for a slot, within
        SpecPolicy.precheck_timeout (past it the spawn goes on and its build solves). A solve of a
        large environment takes a CPU and hundreds of MB. A Check of a file checked in the last
        10 minutes (same solve) answers from its kept lock without solving.

        c.ImageBuilder.max_concurrent_presolves = 4
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
        min=0,
        config=True,
        help="""`gc` keeps at most this many environment images (0 = no count limit).

        c.ImageBuilder.max_images = 200
        """,
    )
    disk_budget = ByteSpecification(
        "100G",
        config=True,
        help="""`gc` removes least-recently-used environment images until they fit in this size: the
        bytes they add to the base image, each layer counted once (layers images share, once; the base, never);
        0 = no size limit.

        c.ImageBuilder.disk_budget = "500G"
        """,
    )
    build_timeout = FiniteFloat(
        3600,
        min=1,
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
        self._base_id: tuple[str, float] = ("", 0.0)
        self._registry_client: RegistryClient | None = None
        self.runs = BuildRuns(self)

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

    def base_of(self, build: Build) -> str:
        """The base image's id ``build`` builds on: the one its key was made with."""
        return build.base_id or self.base_image_id()

    def build_key(self, request: BuildRequest, base_image_id: str | None = None) -> str:
        """sha256 over everything that changes the image."""
        parts = {
            "spec": request.spec.normalized(),
            "base": base_image_id or self.base_image_id(),
            "platform": self.resolver.platform,
            "cuda": request.cuda,
            "env_name": request.env_name,  # not the display name: the server gets it at start
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
        info = self.cached_info(self.build_key(request), request, time.monotonic())
        metrics.record_cache_lookup(info is not None)
        return info

    def cached_info(self, key: str, request: BuildRequest, started: float) -> ImageInfo | None:
        """The key's image (the registry's, with a registry), marked used; None if there is none."""
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

    def ensure(self, request: BuildRequest, rebuild: bool = False) -> Build:
        """Start (or join) the build of ``request``'s image; await ``.result()``, follow ``.follow()``.

        ``rebuild``: build it again (a fresh solve: newer packages) though its image exists. The
        old image serves new servers until the new one is tagged, and stays if the build fails.
        """
        key = self.build_key(request)
        # The base id build_key just read (cached): the build uses it for FROM and its labels too,
        # so that they agree with the key though the base tag moves meanwhile.
        return self.runs.ensure(request, key, rebuild, self._base_id[0])

    async def get_image(self, request: BuildRequest) -> ImageInfo:
        """Build or reuse the image; raise BuildError on failure."""
        return await self.ensure(request).result()

    async def presolve(self, request: BuildRequest) -> Lock:
        """Solve ``request`` as its build will (ResolveError if it cannot be solved), at most
        ``max_concurrent_presolves`` at a time; the build of the same request within
        buildrun.PRESOLVED_SECONDS takes this lock instead of solving (and a pre-solve of the same
        solve within that time answers with it)."""
        return await self.runs.presolved.solve(self.resolver, request)

    def in_progress(self) -> list[Build]:
        """The builds this process is running or waiting to run (a slot), oldest first."""
        return list(self.runs.running.values())

    @property
    def builds_started(self) -> int:
        """How many builds this process ran (not cache hits, not joined builds)."""
        return self.runs.started

    def build_estimate(self) -> str:
        """"about N min" (or "under a minute") from this process's builds, for the user."""
        seconds = self.runs.typical_seconds()
        return "under a minute" if seconds < 60 else f"about {round(seconds / 60)} min"

    async def finish_removals(self) -> None:
        """Wait until the staging folders of finished builds are gone (a command, before it exits)."""
        await self.runs.finish_removals()

    async def no_space_error(self, request: BuildRequest, lock: Lock | None, error: BaseException) -> BuildError:
        """The one-line error of a build that ran out of disk space (what to remove, how much it needs)."""
        return await staging.no_space_error(self.resolver, Path(self.cache_dir), request, lock, error, self.log)

    # -- the registry: push and pull (imagepush.py) ------------------------------------------

    def transfers(self) -> RegistryTransfer:
        """Push and pull between the build daemon and the registry."""
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
        await self.transfers().pull(api, info, publish)
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

    def gc_plan(self, keep: dict[str, str] | None = None) -> GcResult:
        """What `gc` would remove, and why some are kept (see imagegc.gc_plan); ``keep``: build key ->
        whose current image it is (a profile's), never removed."""
        return imagegc.gc_plan(self, keep)

    def gc(self, dry_run: bool = False, keep: dict[str, str] | None = None) -> GcResult:
        """Remove the images of :meth:`gc_plan` and what failed or killed builds left, unless
        ``dry_run`` (see imagegc.gc); what was removed, and notes."""
        return imagegc.gc(self, dry_run, keep)

    def profile_images(self, profiles: list[Profile]) -> dict[str, str]:
        """Build key -> "profile SLUG" (or "profiles A, B") for the current image of each profile
        with an environment of its own: what gc keeps, however long ago a class started it."""
        slugs: dict[str, list[str]] = {}
        for profile in profiles:
            if profile.environment is not None:
                slugs.setdefault(self.build_key(request_for_profile(profile)), []).append(profile.slug)
        return {key: ("profile " if len(names) == 1 else "profiles ") + ", ".join(names) for key, names in slugs.items()}
