"""The builds one hub process runs: each key built once, at most ``max_concurrent_builds`` at
a time, each under its key's file lock (several hub processes on one daemon), within
``build_timeout``, its outcome recorded and published as progress events.

:class:`BuildRuns` is what :meth:`ImageBuilder.ensure` starts builds with; the builder
keeps the settings, the daemon, keys and lookups. A build's steps are staging.py (solve,
install), buildcontext.py (files, labels), then layeredbuild.py or dockerbuild.py.
:class:`PresolvedLocks` runs the pre-checks' solves (a few at a time) and keeps their locks for the builds.
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
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import docker

from . import buildcontext, layeredbuild, layers, leftovers, madeids, metrics, staging
from .builderrors import BuildError, one_line
from .buildlog import CappedLog
from .buildmodel import CUSTOM_ENV_NAME, Build, BuildRequest, ImageInfo
from .buildrecords import BuildRecord, file_lock, now
from .dockerbuild import docker_build
from .resolve import Lock, Resolver, is_no_space
from .stagedenv import StagedEnvironment

if TYPE_CHECKING:
    from .builder import ImageBuilder

TYPICAL_OF = 20  # the latest builds whose median duration the "about N min" notices give
# How long the lock of a spawn's pre-check (ImageBuilder.presolve) stays good for its build.
PRESOLVED_SECONDS = 600
# The most locks kept at once (the oldest go first): each Check of a new file keeps one.
PRESOLVED_KEPT = 64


class PresolvedLocks:
    """Locks solved by spawns' pre-checks and the form's Check, at most ``slots`` solves at a
    time; each lock is reused by a pre-check of the same solve and taken (once) by the build
    of the same request within PRESOLVED_SECONDS, so that a spawn does not solve twice."""

    def __init__(self, slots: int, kept: int = PRESOLVED_KEPT) -> None:
        self._locks: dict[str, tuple[float, Lock]] = {}  # solve key -> (when, lock), oldest first
        self._slots = asyncio.Semaphore(slots)
        self.kept = kept
        self.solving = 0  # solves running now
        self.waiting = 0  # pre-solves waiting for a slot

    @staticmethod
    def _solve_key(resolver: Resolver, request: BuildRequest) -> str:
        """What a solve depends on: the spec the build solves, the CUDA version, the platform, the channels."""
        spec = staging.with_kernel_package(request.spec)
        parts = {"spec": spec.normalized(), "cuda": request.cuda, "platform": resolver.platform,
                 "channels": resolver.channel_urls_for(spec)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    async def solve(self, resolver: Resolver, request: BuildRequest) -> Lock:
        """Solve ``request`` as its build will (ResolveError if it cannot be solved), and keep the
        lock; a lock kept for the same solve is the answer without solving again."""
        key = self._solve_key(resolver, request)
        lock = self._recent(key)
        if lock is not None:
            return lock
        async with self._slot():
            lock = self._recent(key)  # solved by another pre-solve while this one waited
            if lock is None:
                lock = await resolver.solve(staging.with_kernel_package(request.spec), cuda=request.cuda)
                self._keep(key, lock)
        return lock

    def take(self, resolver: Resolver, request: BuildRequest) -> Lock | None:
        """The kept lock of ``request``, if still good (it is then forgotten), else None."""
        key = self._solve_key(resolver, request)
        lock = self._recent(key)
        self._locks.pop(key, None)
        return lock

    @property
    def count(self) -> int:
        """How many locks are kept now."""
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.solving += 1
        try:
            yield
        finally:
            self.solving -= 1
            self._slots.release()

    def _recent(self, key: str) -> Lock | None:
        kept = self._locks.get(key)
        return kept[1] if kept is not None and time.monotonic() - kept[0] < PRESOLVED_SECONDS else None

    def _keep(self, key: str, lock: Lock) -> None:
        solved_at = time.monotonic()
        self._locks = {other: kept for other, kept in self._locks.items()
                       if other != key and solved_at - kept[0] < PRESOLVED_SECONDS}
        self._locks[key] = (solved_at, lock)
        while len(self._locks) > self.kept:
            del self._locks[next(iter(self._locks))]


def recorded_seconds(records: list[BuildRecord]) -> list[float]:
    """How long each of the ``records`` that built took (from their times), oldest first."""
    seconds = []
    for record in reversed(records):
        with contextlib.suppress(ValueError):
            if record.status == "built" and record.started and record.finished:
                took = (datetime.fromisoformat(record.finished) - datetime.fromisoformat(record.started)).total_seconds()
                if took >= 0:
                    seconds.append(took)
    return seconds


class BuildRuns:
    """The builds this process runs or waits to run, and what they took."""

    def __init__(self, builder: ImageBuilder):
        self.builder = builder
        self.presolved = PresolvedLocks(builder.max_concurrent_presolves)
        self.running: dict[str, Build] = {}
        self.started = 0  # builds that did build (not cache hits, not joins)
        self.seconds: list[float] = []  # how long each took
        self._seeded = False  # with the durations the cache folder recorded (typical_seconds)
        self._slots = asyncio.Semaphore(builder.max_concurrent_builds)
        self._waiting = 0
        self._removals: set[asyncio.Future] = set()  # staging folders of built images, being removed
        self.changes = 0  # builds started or ended so far
        self._watchers: set[asyncio.Future] = set()  # next_change's

    def ensure(self, request: BuildRequest, key: str, rebuild: bool = False, base_id: str = "") -> Build:
        """Start (or join) the build of ``request``, whose key is ``key`` (made with the base ``base_id``)."""
        build = self.running.get(key)
        if build is not None:
            return build
        build = Build(key=key, name=request.display_name, env_name=request.env_name, rebuild=rebuild,
                      base_id=base_id)
        build.task = asyncio.ensure_future(self._run(build, request))
        build.task.add_done_callback(metrics.build_done(time.monotonic(), time.monotonic))
        self.running[key] = build
        self._changed()
        return build

    def next_change(self) -> asyncio.Future:
        """Done when the next build starts or ends (the admin's live builds table waits on it)."""
        watcher = asyncio.get_running_loop().create_future()
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return watcher

    def _changed(self) -> None:
        self.changes += 1
        for watcher in list(self._watchers):
            if not watcher.done():
                watcher.set_result(None)

    def typical_seconds(self, default: float = 120.0) -> float:
        """The median duration of the latest builds, for "about N min" notices: this process's,
        after those the cache folder recorded before it started (a restarted hub's first
        estimate is not a guess)."""
        if not self._seeded:
            self._seeded = True
            self.seconds[:0] = recorded_seconds(self.builder.records.builds()[:TYPICAL_OF])
        if not self.seconds:
            return default
        return statistics.median(self.seconds[-TYPICAL_OF:])

    async def finish_removals(self) -> None:
        """Wait until the staging folders of finished builds are gone (a command, before it exits)."""
        while self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)

    async def _run(self, build: Build, request: BuildRequest) -> ImageInfo:
        started = time.monotonic()
        builder = self.builder
        try:
            info = await asyncio.wait_for(self.build_once(build, request, started), builder.build_timeout)
            await build.publish("ready", 100, f"image {info.tag} ready" + (" (cached)" if info.cached else ""))
            return info
        except asyncio.TimeoutError:
            message = f"build took longer than {builder.build_timeout:g} s (ImageBuilder.build_timeout)"
            await build.publish("error", 100, message)
            timeout = BuildError(message, phase="timeout", key=build.key)
            builder.log.warning("%s", timeout.summary())
            if build.started_here:
                builder.records.record_failure(build.key, timeout)
            raise timeout from None
        except BuildError as error:
            await self._fail(build, error)
            raise
        except Exception as error:  # a defect, or a failure nobody foresaw: a failed build all the same
            builder.log.error("Build %s failed unexpectedly", build.key, exc_info=True)
            failure = BuildError(f"unexpected {type(error).__name__}: {one_line(error)}", phase="internal")
            await self._fail(build, failure)
            raise failure from error
        finally:
            self.running.pop(build.key, None)
            self._changed()
            await build.finish()

    async def _fail(self, build: Build, error: BuildError) -> None:
        """Record ``error`` as the build's failure (when this process built it) and tell its followers."""
        error.key = error.key or build.key
        self.builder.log.warning("%s", error.summary())
        if build.started_here:
            self.builder.records.record_failure(build.key, error)
        await build.publish("error", 100, str(error))

    async def build_once(self, build: Build, request: BuildRequest, started: float) -> ImageInfo:
        """The image of ``build``: found (here, in the registry, or built meanwhile by another
        process) or built, then pushed when there is a registry."""
        key, builder = build.key, self.builder
        cached = None if build.rebuild else await asyncio.to_thread(builder.cached_info, key, request, started)
        if cached:
            return cached
        async with self._slot(build):
            try:
                builder.key_dir(key).mkdir(parents=True, exist_ok=True)
                (builder.key_dir(key) / "build.lock").touch()
            except OSError as error:
                if not is_no_space(error):
                    raise
                raise await builder.no_space_error(request, None, error) from None
            async def waiting() -> None:
                await build.publish("queued", 1, "waiting for the build of this environment already under way "
                                                 "elsewhere (an admin's prebuild, or another hub process)")

            async with file_lock(builder.key_dir(key) / "build.lock", on_wait=waiting):
                # Another hub process may have built it while we waited for the lock.
                cached = None if build.rebuild else await asyncio.to_thread(builder.cached_info, key, request, started)
                if cached:
                    return cached
                # With a registry: built here before, but never pushed (a failed push, a new registry).
                local = builder.find_image(key) if builder.registry and not build.rebuild else None
                replaced = builder.find_image(key) if build.rebuild else None
                if local is not None:
                    builder.log.info("Image %s is on the build daemon but not in the registry: pushing it",
                                     builder.tag_for(key))
                    info = ImageInfo(key, builder.tag_for(key), local.id, request.env_name, True,
                                     time.monotonic() - started, local.attrs.get("Size", 0))
                else:
                    self.started += 1
                    builder.log.info("Building image %s (%s) for %s", builder.tag_for(key), key, request.display_name)
                    info = await self._build(build, request, started)
                    if replaced is not None and replaced.id != info.image_id:
                        await asyncio.to_thread(self._remove_replaced, key, replaced.id)
                if builder.registry:
                    info = await builder.transfers().push(builder.client.api, build, info)
                return info

    def _remove_replaced(self, key: str, image_id: str) -> None:
        """Remove the image a rebuild replaced (its tag moved to the new one), unless a server runs
        it or is starting with it (its pin, as gc and delete honour: with a registry, a start
        waiting for a GPU runs the very image it looked up, by digest)."""
        builder = self.builder
        with contextlib.suppress(OSError):  # leftovers.py removes it should it stay
            madeids.add(builder.key_dir(key), replaced=[image_id])
        with builder.records.unpinned(key) as free:
            if not free:
                self._keep_replaced(key, image_id, "a server is starting with it")
                return
            try:
                with builder.daemon_call("removing the replaced image"):
                    builder.client.images.remove(image_id, noprune=False)
                builder.records.write_log(key, f"removed the replaced image {image_id}\n")
            except (BuildError, docker.errors.APIError) as error:  # a server still runs it: it stays, untagged
                self._keep_replaced(key, image_id, one_line(error))

    def _keep_replaced(self, key: str, image_id: str, why: str) -> None:
        """The replaced image stays, untagged: leftovers.py removes it once nothing uses it."""
        self.builder.log.info("Rebuild of %s kept the replaced image %s: %s", key[:16], image_id, why)
        self.builder.records.write_log(key, f"kept the replaced image {image_id}: {why}\n")

    @contextlib.asynccontextmanager
    async def _slot(self, build: Build) -> AsyncIterator[None]:
        if self._slots.locked():
            self._waiting += 1
            await build.publish("queued", 1, f"waiting for {self.builder.max_concurrent_builds} running builds "
                                             f"to finish ({self._waiting} in the queue)")
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

    async def resolve(self, build: Build, request: BuildRequest, build_log: io.TextIOBase) -> Lock:
        """The build's solve: the pre-check's lock when there is one, else a solve now."""
        return await staging.solve(self.builder.resolver, build, request, build_log, self.builder.key_dir(build.key),
                                   presolved=self.presolved.take(self.builder.resolver, request))

    async def _build(self, build: Build, request: BuildRequest, started: float) -> ImageInfo:
        key, builder = build.key, self.builder
        key_dir = builder.key_dir(key)
        context = Path(builder.cache_dir) / "staging" / key
        build.started_here = True
        lock: Lock | None = None
        try:
            key_dir.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(leftovers.sweep, builder, key)  # before this key's made.json starts over
            madeids.start(key_dir)
            builder.records.record(key, status="building", name=request.display_name, phase="", cause="",
                                   started=now(), finished="", env_name=request.env_name,
                                   spec=request.spec.normalized_json(), cuda=request.cuda or "")
            # Removing a staged env is thousands of unlinks: keep them off the hub's event loop.
            await asyncio.to_thread(shutil.rmtree, context, True)
            # Each line reaches the file as it is written: a build process killed mid-build leaves
            # the log's head and its recent lines (buildlog.py).
            with CappedLog(key_dir / "build.log") as build_log:
                failed = True
                try:
                    build_log.write(f"build {key} of {_logged_name(request)} started {now()} (pid {os.getpid()})\n")
                    lock = await self.resolve(build, request, build_log)
                    image_id = await self._write_image(build, request, lock, context, build_log)
                    failed = False
                finally:
                    if failed:
                        await staging.remove_staging(context, context.exists(), builder.log)
                    else:  # the image is ready: its spawns need not wait for the unlinks
                        self._remove_later(staging.set_aside(context))
        except Exception as error:  # a full disk: an OSError, rattler's IoError, or an install's ResolveError
            if isinstance(error, BuildError) or not (is_no_space(error) or getattr(error, "no_space", False)):
                raise
            raise await builder.no_space_error(request, lock, error) from None
        builder.mark_used(key)
        builder.records.record(key, status="built", finished=now())
        image = builder.client.images.get(image_id)
        seconds = time.monotonic() - started
        self.seconds.append(seconds)
        return ImageInfo(key, builder.tag_for(key), image_id, request.env_name, False, seconds,
                         image.attrs.get("Size", 0))

    async def _write_image(self, build: Build, request: BuildRequest, lock: Lock, context: Path,
                           build_log: io.TextIOBase) -> str:
        """Install ``lock`` into ``context`` and write the image by the layered route or the
        Dockerfile route; the image's id."""
        builder = self.builder
        layered = builder.layered_images and await asyncio.to_thread(layeredbuild.daemon_can_load_layers, builder)
        prefix = layers.SHARED_PREFIX if layered else request.prefix
        env_size = await staging.install(builder.resolver, build, lock, context, build_log, prefix)
        buildcontext.write_context(context, request, lock, builder.pip_config)
        labels = buildcontext.image_labels(build.key, request, lock, builder.base_of(build))
        if layered:
            return await layeredbuild.build_layered(builder, build, request, context, build_log, labels)
        await asyncio.to_thread(_as_layered_writes_it, context / "env")
        await build.publish("build", 45, "Writing the image")
        return await docker_build(builder, build, request, context, build_log, env_size, labels)

    def _remove_later(self, folder: Path) -> None:
        removal = asyncio.ensure_future(asyncio.to_thread(staging.remove_set_aside, folder))
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)


def _as_layered_writes_it(env: Path) -> None:
    """The staged environment ``env`` as the Dockerfile route's COPY is to take it, and as the
    layered route writes its layers: no conda-meta record names the hub's package-cache folders,
    and nothing of layers.NOT_IN_IMAGES is at its top."""
    staging.drop_host_paths(StagedEnvironment.read(env))
    for name in layers.NOT_IN_IMAGES:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):  # a package's own folder stays
            (env / name).unlink()


def _logged_name(request: BuildRequest) -> str:
    """The build's name in its log, which every user of the same spec may read: a user's own
    environment's ``name:`` is free text of the first user's, and stays out of it."""
    if request.env_name == CUSTOM_ENV_NAME:
        return "a user's own environment (custom)"
    return f"{request.display_name} ({request.env_name})"
