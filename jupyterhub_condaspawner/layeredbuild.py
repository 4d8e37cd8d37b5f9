"""The layered route: the staged environment written as image layers and loaded into
Docker directly (layers.py), byte-compiled meanwhile in a container of the base image
(compilerun.py), with the kernel spec and settings on top; a docker build follows only for a pip section, or
to compile where the builder could not (a remote daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker

from . import imageload, layers, madeids
from .buildcontext import settings_files
from .builderrors import BuildError, megabytes, one_line, plural
from .buildmodel import ENVS_ROOT, Build, BuildRequest
from .bytecode import BytecodeCache, Restored, cache_directory
from .compilerun import CompileRun, layer_preparer, remove_container, remove_in_background
from .dockerbuild import daemon_disk_full, docker_build
from .stagedenv import StagedEnvironment, TreeStats
from .staging import drop_host_paths, settle_mtimes

if TYPE_CHECKING:
    from .builder import ImageBuilder

# The loaded-layers route's only Dockerfile: pip sections, and compiling where the builder could not.
LAYERED_DOCKERFILE = Path(__file__).parent / "images" / "layered.Dockerfile"
# The compiler: the base image's own Python, which no package of the environment can replace.
BASE_PREFIX = "/opt/conda"
BASE_PYTHON = f"{BASE_PREFIX}/bin/python"
MAX_PACKAGE_LAYERS = 80  # Docker refuses ~127 layers: the base's and the Dockerfile's count too
DOCKER_LAYER_LIMIT = 125  # Docker's most layers in an image (127 on overlay2, less on some drivers)
LAYERS_ABOVE_PACKAGES = 2  # the small packages', the environment's (with the kernel and settings)
DOCKERFILE_STEPS = 2  # layered.Dockerfile's RUN steps (compile, pip), when it runs


def daemon_can_load_layers(builder: ImageBuilder) -> bool:
    """Whether the build daemon's image store takes loaded layers (else: the Dockerfile route)."""
    with builder.daemon_call("reading the daemon's image store"):
        able = layers.supports_layered_images(builder.client.api)
    if not able:
        builder.log.warning("ImageBuilder.layered_images: the Docker daemon uses the containerd image store; "
                            "building with the Dockerfile route")
    return able


def _daemon_is_local(builder: ImageBuilder) -> bool:
    """Whether the build daemon is on this host's socket, so that it can mount a staged folder."""
    return str(builder.client.api.base_url) == "http+docker://localhost"


def _launch_compile(builder: ImageBuilder, build: Build, context: Path, build_log: io.TextIOBase
                    ) -> asyncio.Future | None:
    """Start the compile container while the build plans its layers (the start takes about half a
    second of the daemon's): it byte-compiles the staged environment with the base image's Python
    (no package's code runs: layers.COMPILE_SCRIPT), in a container of the base image with the
    staging folder mounted at the shared prefix, no network and no capabilities (nothing runs on
    the host), so that each package's .pyc travel in its layer; it waits for its batches
    (:func:`_hand_over`). None on a remote daemon (it cannot mount the folder): the Dockerfile
    compiles then. Labelled with the build's key and kept in made.json: leftovers.py removes it, running
    or not, should the build be killed."""
    if not _daemon_is_local(builder):
        build_log.write("compile: the Docker daemon is not on this host: compiling in the Dockerfile\n")
        return None
    (context / "compile" / "done").mkdir(parents=True)
    limits: dict[str, Any] = {"mem_limit": int(builder.build_memory_limit)} if builder.build_memory_limit else {}
    if builder.build_cpuset_cpus:
        limits["cpuset_cpus"] = builder.build_cpuset_cpus
    command = [BASE_PYTHON, "-s", "-S", "-c", layers.COMPILE_SCRIPT, "/condaspawner-compile/batches.json",
               "/condaspawner-compile/done", str(layers.COMPILE_WAIT_S)]

    def start() -> Any:
        # Created, recorded, then started: a container Docker cannot start is removed at once, and
        # one whose build is killed before it is recorded is no longer beyond leftovers.py's reach.
        with builder.daemon_call("byte-compiling the environment"):
            container = builder.client.containers.create(
                builder.base_of(build), command, network_mode="none", user=f"{os.getuid()}:{os.getgid()}",
                cap_drop=["ALL"], security_opt=["no-new-privileges"], labels={madeids.COMPILE_LABEL: build.key},
                entrypoint=[], working_dir="/", environment={"PYTHONHASHSEED": "0"},
                volumes={str((context / "env").resolve()): {"bind": layers.SHARED_PREFIX, "mode": "rw"},
                         str((context / "compile").resolve()): {"bind": "/condaspawner-compile", "mode": "rw"}},
                **limits)
        try:
            madeids.add(builder.key_dir(build.key), compilers=[container.id])
            build_log.write(f"compile container {container.id}\n")
            with builder.daemon_call("byte-compiling the environment"):
                container.start()
        except BaseException:
            remove_container(container)
            raise
        return container

    return asyncio.ensure_future(asyncio.to_thread(start))


async def _hand_over(launched: asyncio.Future, build: Build, context: Path, staged: StagedEnvironment,
                     jobs: list[tuple[str, list[str]]], build_log: io.TextIOBase) -> CompileRun | None:
    """Give the launched compile container its batches (``jobs``: layers.compile_plan's; none
    lets it exit at once). None when it could not start: the Dockerfile compiles then."""
    try:
        container = await asyncio.shield(launched)  # a cancelled build still learns which container to remove
    except (BuildError, docker.errors.DockerException) as error:
        build_log.write(f"compile: {one_line(error)}; compiling in the Dockerfile\n")
        return None
    compiler = await asyncio.to_thread(_compiler_release, context / "compile" / "python")
    if jobs and staged.python_release and compiler not in ("", staged.python_release):
        build_log.write(f"compile: the base image's Python {compiler} does not compile for the environment's "
                        f"Python {staged.python_release}; compiling in the Dockerfile\n")
        remove_in_background(container)
        return None
    if jobs:
        await build.publish("compile", 41, f"Compiling the environment's Python files "
                                           f"({sum(len(p) for _, p in jobs)}) while its layers are written")
    partial = context / "compile" / "batches.json.partial"
    partial.write_text(json.dumps({"python": staged.python_release, "root": layers.SHARED_PREFIX,
                                   "borrow_from": BASE_PREFIX, "batches": [paths for _, paths in jobs]}))
    partial.replace(context / "compile" / "batches.json")  # whole when the container sees it
    return CompileRun(container, context / "compile" / "done", jobs)


def _compiler_release(path: Path, wait_s: float = 10.0) -> str:
    """The Python release the compile container runs (it writes it first thing), or "" if it
    says nothing within ``wait_s`` (it then refuses a batch it cannot compile itself)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            return path.read_text().strip()
        time.sleep(0.02)
    return ""


def _abandon_launched(launched: asyncio.Future) -> None:
    """Remove a launched compile container, once started, that the build never handed its
    batches (it failed or was cancelled first)."""
    def remove(future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            remove_in_background(future.result())

    launched.add_done_callback(remove)


async def _keep_once_compiled(run: CompileRun, bytecode: BytecodeCache, staged: StagedEnvironment,
                              sent: threading.Event, stop: threading.Event) -> None:
    """Keep the staged byte code (bytecode.py) once the compile container has done every
    batch and every layer's bytes are sent (before, it would take the CPU and the hub's GIL
    from writing the layers); nothing if it ended before, or if a batch's word of what it packed
    is lost (a package's byte code is kept whole or not at all)."""
    await asyncio.to_thread(run.exited.wait)
    await asyncio.to_thread(_wait_for_either, sent, stop)
    packed = await asyncio.to_thread(run.every_packed)  # the layers read them all: from memory then
    if run.complete and sent.is_set() and packed is not None:
        await asyncio.to_thread(lambda: bytecode.keep(staged, run.source_hashes(), packed))


def _wait_for_either(event: threading.Event, other: threading.Event) -> None:
    while not (event.wait(0.1) or other.is_set()):
        pass


async def _finish_compile(run: CompileRun, context: Path, build_log: io.TextIOBase) -> None:
    """Wait for the compile container's end (every layer waited for its batches: it is done or
    about to be), log its output and remove it."""
    try:
        status, output = await asyncio.to_thread(run.finish)
    finally:
        shutil.rmtree(context / "compile", ignore_errors=True)  # not for the build context
    build_log.write(output)
    if status.get("StatusCode") != 0:
        build_log.write(f"compile: exit status {status.get('StatusCode')} after its last batch\n")


async def build_layered(builder: ImageBuilder, build: Build, request: BuildRequest, context: Path,
                        build_log: io.TextIOBase, labels: dict[str, str]) -> str:
    """The layered route: load the environment as layers with the kernel spec and settings on
    top; a docker build on that image only for a pip section, or to compile where the builder
    could not. The tagged image's id."""
    image_id, compiled = await _load_layers(builder, build, request, context, build_log, labels)
    build_log.write(f"loaded image {image_id}\n")
    await build.publish("kernel", 45, "Registering the kernel")  # its layer is in the loaded image
    if request.spec.pip or not compiled:
        docker_context = context / "docker"
        docker_context.mkdir()
        shutil.copyfile(LAYERED_DOCKERFILE, docker_context / "Dockerfile")
        return await docker_build(builder, build, request, docker_context, build_log, 0, labels,
                                  from_image=image_id, compile_step=not compiled)
    repository, tag = builder.tag_for(build.key).rsplit(":", 1)
    with builder.daemon_call("tagging the image"):
        await asyncio.to_thread(builder.client.api.tag, image_id, repository, tag)
    await build.publish("tag", 98, f"Tagged {builder.tag_for(build.key)}")
    return image_id


def package_layer_cap(base_layers: int) -> int:
    """How many packages may have a layer of their own on a base of ``base_layers`` layers: at most
    MAX_PACKAGE_LAYERS, and so many that the image stays within Docker's layer limit with the
    layers above them and the Dockerfile's steps (0: every package in the small packages' layer)."""
    room = DOCKER_LAYER_LIMIT - base_layers - LAYERS_ABOVE_PACKAGES - DOCKERFILE_STEPS
    return max(0, min(MAX_PACKAGE_LAYERS, room))


@dataclass
class _Planned:
    """A staged environment's layers, planned: what Docker and the byte-code cache hold already,
    and the batches left to compile (layers.compile_plan's)."""
    staged: StagedEnvironment
    plan: list[layers.Layer]
    known: set[str]
    memo: layers.LayerMemo
    base_id: str
    history: list[dict[str, Any]]
    bytecode: BytecodeCache
    restored: Restored
    jobs: list[tuple[str, list[str]]]


async def _plan(builder: ImageBuilder, build: Build, request: BuildRequest, staging: Path,
                build_log: io.TextIOBase) -> _Planned:
    staged = await asyncio.to_thread(StagedEnvironment.read, staging)
    check_installed(staged, staging.parent / "meta" / "condaspawner-lock.json")
    stats = TreeStats(staging)  # this pass's lstat of each file, shared by its steps
    settled = await asyncio.to_thread(settle_mtimes, staged, layers.LAYER_MTIME, stats)
    if settled:
        build_log.write(f"mtimes of their packages given to {plural(settled, 'copied file')}\n")
    memo = layers.LayerMemo(Path(builder.cache_dir) / "layers")
    base_id = builder.base_of(build)
    with builder.daemon_call("loading the environment's layers"):
        history = await asyncio.to_thread(layers.base_history, builder.client.api, base_id, memo.directory)
        known = await asyncio.to_thread(lambda: layers.known_chains(image.attrs for image in builder.images()))
        base_attrs = await asyncio.to_thread(builder.client.api.inspect_image, base_id)
    cap = package_layer_cap(len(base_attrs["RootFS"]["Layers"]))
    if cap < MAX_PACKAGE_LAYERS:
        note = (f"at most {plural(cap, 'package layer')}: the base image has "
                f"{plural(len(base_attrs['RootFS']['Layers']), 'layer')} (Docker's limit is {DOCKER_LAYER_LIMIT}); "
                "the other packages share a layer")
        build_log.write(note + "\n")
        builder.log.info("Build %s: %s", request.env_name, note)
    plan = layers.plan_layers(staged, request.env_name, min_bytes=builder.shared_layer_min_size, max_layers=cap,
                              stats=stats)
    # Layers Docker holds with their byte code already are neither compiled nor sent again,
    # and packages compiled for an earlier build are not compiled again.
    stored = layers.stored_layers(base_attrs, plan, known, memo)
    bytecode = BytecodeCache(cache_directory(builder.bytecode_cache_dir, builder.resolver.package_cache_dir))
    restored = await asyncio.to_thread(bytecode.restore, staged)
    jobs = layers.compile_plan(staged, plan, stored, restored.done, stats)
    build_log.write(f"byte code of {len(restored.done)} Python files from the cache, "
                    f"{sum(len(p) for _, p in jobs)} compiled\n")
    return _Planned(staged, plan, known, memo, base_id, history, bytecode, restored, jobs)


def check_installed(staged: StagedEnvironment, lock_file: Path) -> None:
    """A one-line BuildError when ``staged`` holds fewer packages than the lock (``lock_file``,
    buildcontext's copy) lists: its staging folder was changed under the build, and its image
    would lack them."""
    try:
        listed = len(json.loads(lock_file.read_text())["packages"])
    except (OSError, ValueError, KeyError, TypeError):
        raise _staging_changed(staged, "its copy of the lock is gone") from None
    if len(staged.packages) < listed:
        raise _staging_changed(staged, f"it holds {len(staged.packages)} of the {listed} packages installed into it")


def _staging_changed(staged: StagedEnvironment, what: str) -> BuildError:
    cause = f"the staging folder {staged.root.parent} changed during the build: {what}"
    return BuildError(cause, phase="install", cause=cause)


async def _load_layers(builder: ImageBuilder, build: Build, request: BuildRequest, context: Path,
                       build_log: io.TextIOBase, labels: dict[str, str]) -> tuple[str, bool]:
    """Compile the staged environment (``context``/env) and load it into Docker as layers on
    the base image, with the kernel spec and settings (buildcontext.write_context's files) as its top
    layer: the image's id, and whether its layers hold the compiled files."""
    staging = context / "env"
    launched = _launch_compile(builder, build, context, build_log)
    try:
        await build.publish("plan", 41, "Planning the environment's layers")
        planned = await _plan(builder, build, request, staging, build_log)
        run = (await _hand_over(launched, build, context, planned.staged, planned.jobs, build_log)
               if launched is not None else None)
    except BaseException:
        if launched is not None:
            _abandon_launched(launched)
        raise
    staged, plan, known, memo, jobs = planned.staged, planned.plan, planned.known, planned.memo, planned.jobs
    bytecode, base_id, history = planned.bytecode, planned.base_id, planned.history
    if not jobs:  # said all the same: the phase a user follows does not vanish on a warm cache
        await build.publish("compile", 41, "Python files already compiled: byte code reused from earlier builds")
    compiled = not jobs or run is not None
    load_memo = memo if compiled else memo.without_byte_code()
    cached = planned.restored.packed
    prepare = layer_preparer(run, staged, plan, cached) if run is not None else None
    if compiled and run is None:  # byte code from the cache only: in place already, or in its packs
        placer = layers.ByteCodePlacer(staged)
        plan = [placer.layer_with_byte_code(layer, cached) for layer in plan]
    # The kernel spec and settings join the environment's layer, which every build writes anyway (it
    # names the environment): Docker registers one layer after another, each ~0.1 s beyond its bytes.
    plan[-1] = layers.with_files(plan[-1], settings_files(context, request))
    env = {"CONDASPAWNER_ENV": f"{ENVS_ROOT}/{request.env_name}"}
    await build.publish("build", 42, f"Writing the environment as {plural(len(plan), 'layer')}")

    def loading(image_id: str) -> None:  # for leftovers.py, should the build be killed mid-load
        madeids.add(builder.key_dir(build.key), images=[image_id])
        build_log.write(f"loading image {image_id}\n")

    stop = threading.Event()  # set when the build ends first (a timeout, a cancel): the load sends no more
    sent = threading.Event()  # set once every layer's bytes are on their way

    def load(layer_plan: list[layers.Layer], have: set[str], layer_memo: layers.LayerMemo,
             prepare_layer: Callable[[layers.Layer], layers.Layer] | None) -> imageload.LoadResult:
        return imageload.load_image(builder.client.api, base_id, layer_plan, labels, have, layer_memo, history, env,
                                    loading, _dropping_host_paths(staged, prepare_layer), stop, sent)

    # The byte code is kept while Docker registers the last layers.
    keeping = asyncio.ensure_future(_keep_once_compiled(run, bytecode, staged, sent, stop)) if run is not None else None
    try:
        with builder.daemon_call("loading the environment's layers"):
            try:
                result = await asyncio.to_thread(load, plan, known, load_memo, prepare)
            except imageload.LoadRefused as refused:
                if not refused.missing_layer:
                    raise load_failure(builder, refused, build_log) from None
                build_log.write(f"docker load: {refused}; sending every layer\n")  # removed meanwhile
                result = await _load_every_layer(builder, load, plan, prepare, load_memo, build_log, staged)
            except OSError as error:  # requests passes the compile's failure on as a connection error
                if run is not None and run.failed is not None:  # the layers go without byte code
                    build_log.write(f"compile: {run.failed}; compiling in the Dockerfile\n")
                    compiled, prepare = False, None
                    result = await _load_every_layer(builder, load, plan, None, memo.without_byte_code(), build_log,
                                                    staged)
                else:  # a staged file changed while it was written, or the connection broke: every layer again
                    build_log.write(f"layered load failed ({error}); sending every layer\n")
                    result = await _load_every_layer(builder, load, plan, prepare, load_memo, build_log, staged)
    except BaseException:
        stop.set()
        if run is not None:
            run.abandon()  # a failed or timed-out build does not wait for its compile container
        if keeping is not None:
            keeping.cancel()
        raise
    try:
        if keeping is not None:
            await keeping  # it reads the compile container's packs: before their folder goes
    finally:
        if run is not None:
            await _finish_compile(run, context, build_log)
    madeids.add(builder.key_dir(build.key), removed=result.removed)  # leftovers.py need not look for them
    for image in result.removed:
        build_log.write(f"removed the stage image {image}\n")
    for name, diff_id, size, was_sent in result.layers:
        build_log.write(f"layer {name}: {size} bytes, {diff_id}, {'written' if was_sent else 'already stored'}\n")
    written = [size for _, _, size, was_sent in result.layers if was_sent]
    await build.publish("build", 44, f"Wrote {megabytes(sum(written))} in {plural(len(written), 'layer')} "
                                     f"({len(result.layers) - len(written)} already stored)")
    return result.image_id, compiled


def _dropping_host_paths(staged: StagedEnvironment, prepare: Callable[[layers.Layer], layers.Layer] | None
                         ) -> Callable[[layers.Layer], layers.Layer]:
    """``prepare``, and first, for the environment's layer (the last: Docker is still registering
    the packages' then), its conda-meta records rid of the hub's paths (staging.drop_host_paths):
    a tenth of a second less before the first layer."""
    def before_writing(layer: layers.Layer) -> layers.Layer:
        if layer.name == layers.ENVIRONMENT:
            drop_host_paths(staged)  # nothing to do the second time, when the load is tried again
        return prepare(layer) if prepare is not None else layer

    return before_writing


async def _load_every_layer(builder: ImageBuilder, load: Callable[..., imageload.LoadResult], plan: list[layers.Layer],
                            prepare: Callable[[layers.Layer], layers.Layer] | None, memo: layers.LayerMemo,
                            build_log: io.TextIOBase, staged: StagedEnvironment) -> imageload.LoadResult:
    """The load again, every layer sent whole: none counted on Docker holding it (no chain is known,
    so the memo trusts no entry), and the memo corrected from what Docker got."""
    try:
        return await asyncio.to_thread(load, plan, set(), memo, prepare)
    except imageload.LoadRefused as refused:
        raise load_failure(builder, refused, build_log) from None
    except imageload.SourceUnreadable as unreadable:  # again: something else changes the staged files
        build_log.write(f"layered load failed again: {unreadable}\n")
        raise _staging_changed(staged, one_line(unreadable)) from None


def load_failure(builder: ImageBuilder, refused: imageload.LoadRefused, build_log: io.TextIOBase) -> BuildError:
    """The one-line BuildError of a load Docker refused: its disk full (phase disk, naming the Docker
    host's data root), or its reason (phase load)."""
    build_log.write(f"docker load failed: {refused}\n")
    if refused.no_space:
        return daemon_disk_full(builder, None)
    cause = f"the Docker daemon at {builder.daemon_url} refused the image's layers: {one_line(refused)}"
    return BuildError(cause, phase="load", cause=cause)
