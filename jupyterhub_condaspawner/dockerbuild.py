"""The Dockerfile route: a docker build of a context, its "Step N/M" lines turned into
the phases a user understands, and a failed step into one line.

It writes whole images (env.Dockerfile), and, on the layered route, the pip section and
any compiling the builder could not do (layered.Dockerfile on the loaded layers).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import requests

from . import madeids
from .builderrors import BuildError, megabytes, one_line, plural
from .buildmodel import Build, BuildRequest
from .dockerclient import thread_stream

if TYPE_CHECKING:
    from .builder import ImageBuilder

_STEP = re.compile(r"^Step (\d+)/(\d+) :")
# Which of env.Dockerfile's steps does what, found by what the instruction runs.
_PIP_STEP = re.compile(r"-m pip install ")
_STEP_PHASES = (
    (re.compile(r"^COPY env "), "image"),
    (re.compile(r"-m compileall "), "compile"),
    (_PIP_STEP, "pip"),
    (re.compile(r"^COPY kernel "), "kernel"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Docker's lines on a step (the classic builder's): the container it runs in, the image it made.
_RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")
_STEP_IMAGE = re.compile(r"^ ---> (?:sha256:)?([0-9a-f]{12,64})\s*$")
_USING_CACHE = "---> Using cache"
_DOCKER_NOISE = (" ---> ", "Removing intermediate container", "Successfully ")
# A step's output kept for its failure's one line: its last lines (pip prints a build's whole
# output when it fails), each cut to a length; the build log has the rest.
OUTPUT_LINES = 200
OUTPUT_LINE_CHARS = 2000
_UNREACHABLE_MARKERS = ("NewConnectionError", "Failed to establish a new connection", "Could not fetch URL",
                        "Temporary failure in name resolution", "Connection refused")


async def docker_build(builder: ImageBuilder, build: Build, request: BuildRequest, context: Path,
                       build_log: io.TextIOBase, env_size: int, labels: dict[str, str],
                       from_image: str | None = None, compile_step: bool = True) -> str:
    """A docker build of ``context`` (its Dockerfile) on ``from_image`` (the loaded layers of
    the layered route), else on the base image; ``compile_step``: whether it byte-compiles."""
    start = from_image or builder.base_of(build)
    kwargs = dict(
        path=str(context), tag=builder.tag_for(build.key), labels=labels, rm=True, forcerm=True,
        network_mode=builder.build_network_mode, decode=True,
        buildargs={"BASE_IMAGE": start, "ENV_NAME": request.env_name,
                   **({"COMPILE": "1" if compile_step else "0"} if from_image else {})},
        container_limits=container_limits(builder),
    )
    steps = StepTracker(request, env_size, compiling=compile_step)
    made = StepIds(builder.client.api, builder.key_dir(build.key), start, start_is_ours=from_image is not None)
    image_id, failure, daemon_failure = None, "", ""
    # A timeout or a cancel stops reading at the next line, and closing the stream makes the daemon
    # cancel the build; a step that prints nothing (pip waiting on its index) is stopped at once.
    async with contextlib.aclosing(thread_stream(lambda: builder.client.api.build(**kwargs))) as chunks, \
            _stopping_steps(made):
        async for chunk in chunks:
            if "daemon_error" in chunk:  # the daemon went away
                daemon_failure = chunk["daemon_error"]
                build_log.write(f"docker: {daemon_failure}\n")
                continue
            if "error" in chunk:  # inside the stream, or the daemon refused the build
                failure = strip_ansi(chunk["error"]).strip()
                build_log.write(failure + "\n")
                continue
            if chunk.get("aux", {}).get("ID"):  # Docker's own field: no step's output is in it
                image_id = chunk["aux"]["ID"]
                madeids.add(builder.key_dir(build.key), images=[image_id])
            for line in strip_ansi(chunk.get("stream", "")).splitlines():
                if line.strip():
                    if StepIds.names_an_id(line):  # kept before it is logged: a build killed then leaves it
                        await asyncio.to_thread(made.feed, line)
                    build_log.write(line + "\n")
                    message = steps.feed(line)
                    if message:
                        await build.publish(steps.phase, steps.progress(), message)
    if "no space left on device" in "\n".join([daemon_failure, failure, *steps.output]).lower():
        raise daemon_disk_full(builder, env_size)
    if daemon_failure:
        # docker-py's words ("Connection broken: IncompleteRead(0 bytes read)") stay in the build log
        cause = f"the Docker daemon at {builder.daemon_url} went away while writing the image"
        raise BuildError(cause, phase="daemon", cause=cause)
    if failure or image_id is None:
        raise steps.failure(failure or "docker gave no image")
    await build.publish("tag", 98, f"Tagged {builder.tag_for(build.key)}")
    return image_id


@contextlib.asynccontextmanager
async def _stopping_steps(made: StepIds) -> AsyncIterator[None]:
    """Remove the build's step containers when the block ends by an exception (a timeout, a cancel)."""
    try:
        yield
    except BaseException:
        await asyncio.shield(asyncio.to_thread(made.remove_containers))
        raise


def daemon_disk_full(builder: ImageBuilder, env_size: int | None) -> BuildError:
    """The build daemon's disk filled up while writing the image (its data root, on its host);
    ``env_size``: the environment's bytes, when known."""
    root = "its data root"
    with contextlib.suppress(Exception):
        root = str(builder.client.info().get("DockerRootDir") or root)
    # the context sent, the COPY layer and the compiled files: about twice the environment
    needs = f" (needs about {megabytes(2 * env_size)})" if env_size is not None else ""
    cause = (f"no space left in {root} on the Docker host {builder.daemon_url}{needs}: free space there "
             "(docker system prune, condaspawner gc) and build again")
    return BuildError(cause, phase="disk", cause=cause)


def container_limits(builder: ImageBuilder) -> dict[str, Any]:
    """Each build step's limits (build_memory_limit, build_cpuset_cpus), as docker build takes them."""
    limits: dict[str, Any] = {}
    if builder.build_memory_limit:
        limits["memory"] = int(builder.build_memory_limit)
    if builder.build_cpuset_cpus:
        limits["cpusetcpus"] = builder.build_cpuset_cpus
    return limits


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class StepIds:
    """The step containers and images a docker build makes, kept in made.json (madeids.py).

    The stream names them in lines that a step's output can forge (the pip step's is a
    package's build code), so an id is kept only once the daemon confirms it is this build's:
    a step image whose parent is the image of the step before (at first ``start``, the one it
    builds on), a step container made from that image when the build made it (``start`` too
    when ``start_is_ours``: the layered route's loaded image). A cached step's image is the
    next step's start, but not the build's to remove (another build made it)."""

    def __init__(self, api: Any, key_dir: Path, start: str, start_is_ours: bool):
        self.api, self.key_dir = api, key_dir
        self.head, self.head_is_ours = madeids.bare(start), start_is_ours  # the image the next step runs on
        self.cached = False  # the next step image is a cached one
        self.containers: list[str] = []  # the step containers kept
        # Set by remove_containers: a feed still checking a container when the build was cancelled
        # (its thread outlives the cancel) removes that container itself, else its step ran on.
        self.stopped = False
        self._lock = threading.Lock()

    @staticmethod
    def names_an_id(line: str) -> bool:
        return line.strip() == _USING_CACHE or bool(_RUNNING_IN.match(line) or _STEP_IMAGE.match(line))

    def feed(self, line: str) -> None:
        """Check the id ``line`` names with the daemon and keep it if it is this build's (blocking)."""
        if line.strip() == _USING_CACHE:
            self.cached = True
        elif match := _RUNNING_IN.match(line):
            attrs = self._inspect(self.api.inspect_container, match.group(1))
            if self.head_is_ours and madeids.bare(str(attrs.get("Image", ""))) == self.head:
                madeids.add(self.key_dir, containers=[attrs["Id"]])
                with self._lock:
                    self.containers.append(attrs["Id"])
                    late = self.stopped
                if late:
                    self._remove(attrs["Id"])
        elif match := _STEP_IMAGE.match(line):
            cached, self.cached = self.cached, False
            attrs = self._inspect(self.api.inspect_image, match.group(1))
            if self.head and madeids.bare(str(attrs.get("Parent", ""))) == self.head:
                self.head, self.head_is_ours = madeids.bare(attrs["Id"]), not cached
                if not cached:
                    madeids.add(self.key_dir, images=[attrs["Id"]])

    def remove_containers(self) -> None:
        """Remove the step containers kept, running or not (blocking), and any a feed still under
        way keeps from now on; the daemon's build then ends."""
        with self._lock:
            self.stopped = True
            containers = list(self.containers)
        for container in containers:
            self._remove(container)

    def _remove(self, container: str) -> None:
        with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
            self.api.remove_container(container, force=True)

    @staticmethod
    def _inspect(inspect: Any, short: str) -> dict[str, Any]:
        """What the daemon says of ``short``; nothing if it is gone (a short step's container) or
        the daemon is (the build's stream says so)."""
        try:
            return dict(inspect(short))
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return {}


class StepTracker:
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
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES)  # the current step's last lines

    def feed(self, line: str) -> str | None:
        """Take one line of docker's output; return a progress message when a phase starts."""
        match = _STEP.match(line)
        if not match:
            self.output.append(line[:OUTPUT_LINE_CHARS])
            return None
        self.step, self.steps = int(match.group(1)), int(match.group(2))
        self.instruction = line[match.end():].strip()
        self.output.clear()
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
            return f"Writing the environment into the image ({megabytes(self.env_size)})"
        if phase == "compile":
            return "Compiling the environment's Python files"
        if phase == "pip":
            pip = self.request.spec.pip
            return f"Installing {plural(len(pip), 'pip package')} in a container" if pip else None
        return "Registering the kernel"

    def failure(self, error: str) -> BuildError:
        """The failed step as one line: what it was for, and the cause without docker's noise.
        ``error`` is the daemon's (it names the command that failed): the pip step's output can
        forge a "Step N/M : COPY kernel ..." line, which would blame the image, not the pip: section."""
        if _PIP_STEP.search(self.instruction) or _PIP_STEP.search(error):
            return self._pip_failure()
        what = {"image": "writing the environment into the image", "compile": "compiling Python files",
                "kernel": "registering the kernel"}.get(self.phase, "writing the image")
        detail = next((line.strip() for line in reversed(self.output) if line.strip()
                       and not line.startswith(_DOCKER_NOISE)), "")
        cause = one_line(f"{what}: {detail or error}")
        return BuildError(f"writing the image failed at {what}: {detail or error}", phase="build", cause=cause)

    def _pip_failure(self) -> BuildError:
        own = pips_own_lines(self.output)
        if any(marker in line for line in own for marker in _UNREACHABLE_MARKERS):
            cause = "the package index could not be reached"
            return BuildError(f"pip: {cause}", phase="pip", cause=cause, unreachable=True)
        errors = [line.strip().removeprefix("ERROR: ") for line in own if line.strip().startswith("ERROR:")]
        cause = one_line(errors[-1] if errors else _failed_package(own) or "pip exited with an error (see the build log)")
        return BuildError(f"pip: {cause}", phase="pip", cause=cause)


_OUTPUT_START = re.compile(r"\[\d+ lines? of output\]\s*$")
_OUTPUT_END = "[end of output]"


def pips_own_lines(output: Iterable[str]) -> list[str]:
    """pip's own lines of a step's output, less what a package's build code printed: pip shows
    that between "[N lines of output]" and "[end of output]" (a block whose start was cut off
    from the lines kept too). A package that cannot download what its build wants ("Connection
    refused") did not find the index unreachable, and its "ERROR:" lines are not pip's."""
    own: list[str] = []
    inside = False
    for line in reversed(list(output)):
        if line.strip() == _OUTPUT_END:
            inside = True
            continue
        if inside and _OUTPUT_START.search(line):
            inside = False
        if not inside:
            own.append(line)
    return own[::-1]


def _failed_package(own: list[str]) -> str:
    """pip's words on a package whose build failed, from its last "× what" and the "╰─> package"
    under it (pip 25.1 and later print no "ERROR:" line then): "what (package)", or ""."""
    for index in range(len(own) - 1, -1, -1):
        what = own[index].strip()
        if what.startswith("×"):
            what = what.removeprefix("×").strip().rstrip(".")
            below = next((line.strip() for line in own[index + 1:] if line.strip().startswith("╰─>")), "")
            package = below.removeprefix("╰─>").strip()
            return f"{what} ({package})" if package and not _OUTPUT_START.search(below) else what
    return ""
