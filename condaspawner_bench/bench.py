"""The bench: everything the demo hub and the end-to-end tests need on a bare machine.

A Docker daemon (dockerd.py), the local conda channel (devchannel.py), the offline
base image (offlinebase.py) and JupyterHub's configurable-http-proxy (from npm), all
cached under one folder (``.bench`` by default). In production none of this is used:
the admin's Docker, conda-forge and the production base image take its place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import subprocess
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import docker

from jupyterhub_condaspawner.baseimage import BASE_TAG
from jupyterhub_condaspawner.resolve import Resolver

from .basewheels import download_singleuser_wheels
from .devchannel import ChannelInfo, build_dev_channel, read_channel_info
from .dockerd import (
    DOCKERD_PACKAGES,
    ROOTFS_TOOL_PACKAGES,
    DaemonHandle,
    daemon_answers,
    ensure_daemon,
    ensure_debian_packages,
)
from .offlinebase import build_offline_base, build_rootfs_image, rootfs_tree_is_current
from .phases import Phase, PhaseLog
from .realchannel import build_real_channel, real_channel_dir
from .registry import HTPASSWD_PACKAGES, REGISTRY_PACKAGES
from .swarm import SWARM_PACKAGES

T = TypeVar("T")
PROXY_PACKAGE = "configurable-http-proxy@5.3.0"
PROXY_BIN = Path("proxy/node_modules/.bin/configurable-http-proxy")  # under the bench folder
SETUP_LOCK = ".setup.lock"  # under the bench folder: one set-up of it at a time
BENCH_DIR_ENV = "CONDASPAWNER_BENCH_DIR"
# The screenshot test drives Debian's chromium; the set-up installs it alongside the rest.
BROWSER_PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}
# Parts that are only Debian packages, for fixtures that start their own processes (the
# registry, the swarm): installed while the Docker chain runs, in one apt-get call.
PACKAGE_PARTS = {
    "browser": BROWSER_PACKAGES,
    "registry": {**REGISTRY_PACKAGES, **HTPASSWD_PACKAGES},
    "swarm": SWARM_PACKAGES,
}


class BenchError(RuntimeError):
    """A part of the bench could not be set up."""


@dataclass
class Bench:
    directory: Path
    daemon: DaemonHandle
    channel: ChannelInfo
    base_image: str
    proxy_command: list[str]
    real_channel: ChannelInfo | None = None  # the dev channel plus real packages (the demo's)

    def resolver(self) -> Resolver:
        """A resolver whose `conda-forge` is the local channel, with the bench's package cache."""
        return Resolver(channel_urls={"conda-forge": self.channel.url},
                        package_cache_dir=str(self.directory / "pkgs"))


def default_bench_dir() -> Path:
    """``$CONDASPAWNER_BENCH_DIR``, else ``.bench`` in the current directory."""
    return Path(os.environ.get(BENCH_DIR_ENV) or ".bench").resolve()


def ensure_proxy(bench_dir: Path) -> list[str]:
    """configurable-http-proxy: on PATH, else installed from npm into the bench folder."""
    found = shutil.which("configurable-http-proxy")
    if found:
        return [found]
    prefix = bench_dir / "proxy"
    command = bench_dir / PROXY_BIN
    if not command.exists():
        if shutil.which("npm") is None:
            raise BenchError("configurable-http-proxy needs Node.js and npm (apt-get install nodejs npm)")
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix), PROXY_PACKAGE],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise BenchError(f"npm install {PROXY_PACKAGE} failed: {result.stderr.strip()[-300:]}")
    return [str(command)]


@dataclass(frozen=True)
class BenchParts:
    """Which parts of the bench to set up: the tests ask only for what they use."""

    daemon: bool = True
    rootfs: bool = True  # the bootstrapped Debian image (needs the daemon)
    channel: bool = True
    base: bool = True  # the offline base image (needs the rootfs and the channel)
    proxy: bool = True
    browser: bool = False  # Debian's chromium + chromedriver, for the screenshot test
    registry: bool = False  # Debian's docker-registry (and htpasswd), for the registry fixtures
    swarm: bool = False  # what the multi-node bench needs from Debian

    NAMES = ("daemon", "rootfs", "channel", "base", "proxy", "browser", "registry", "swarm")

    @classmethod
    def of(cls, names: Iterable[str]) -> BenchParts:
        names = set(names)
        unknown = names.difference(cls.NAMES)
        if unknown:
            raise ValueError(f"unknown bench parts: {', '.join(sorted(unknown))}")
        base = "base" in names
        rootfs = base or "rootfs" in names
        return cls(daemon=rootfs or "daemon" in names, rootfs=rootfs, channel=base or "channel" in names,
                   base=base, proxy="proxy" in names, browser="browser" in names,
                   registry="registry" in names, swarm="swarm" in names)

    def names(self) -> list[str]:
        return [name for name in self.NAMES if getattr(self, name)]


@dataclass
class BenchSetup:
    """What :func:`set_up_bench` got: each part, or its error in ``errors``."""

    directory: Path
    phases: PhaseLog
    daemon: DaemonHandle | None = None
    channel: ChannelInfo | None = None
    real_channel: ChannelInfo | None = None  # the dev channel plus a set of real packages, if asked for
    base_image_id: str | None = None
    proxy_command: list[str] | None = None
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def step(self, phase_name: str, function: Callable[[Phase], T]) -> T | None:
        """``function(phase)`` timed as ``phase_name``; on failure None, the error recorded.

        A set-up never stops at one part: the tests that need a failed part say why
        (or fail, under CI) when their fixtures try again.
        """
        try:
            with self.phases(phase_name) as phase:
                return function(phase)
        except Exception as error:  # apt, mmdebstrap, network, docker: each says what failed
            with self._lock:
                self.errors.append(f"{phase_name}: {' '.join(str(error).split()) or type(error).__name__}")
            return None

    def report(self) -> dict[str, Any]:
        """JSON for whoever started the set-up in another process (the test session)."""
        daemon = None
        if self.daemon is not None:
            daemon = {"docker_host": self.daemon.docker_host, "started": self.daemon.owned}
        return {**self.phases.to_json(), "errors": self.errors, "daemon": daemon}


def set_up_bench(
    bench_dir: Path | None = None,
    parts: BenchParts = BenchParts(),
    say: Callable[[str], None] | None = None,
    ready: Callable[[str, BenchSetup], None] | None = None,
    real_set: str | None = None,
) -> BenchSetup:
    """Set up (or find cached) the bench's ``parts``, overlapping the independent ones.

    The Docker chain (apt-get, dockerd, mmdebstrap, import, base image) runs here;
    the conda channel, the proxy's npm install and the apt-get install of the
    package-only parts (browser, registry, swarm) run meanwhile in threads (the base image waits for the channel). Every phase is
    timed in ``.phases``. A part that fails is recorded in ``.errors``, not raised.
    ``ready(part, setup)`` hears of each part (a ``BenchParts`` name) as soon as it is
    done (or failed), so that whoever needs only that part can go on. ``real_set``
    (``datascience`` or ``full``, see realchannel.py) also builds that real channel,
    beside the rest, into ``.real_channel``.
    """
    directory = Path(bench_dir or default_bench_dir()).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with one_setup_at_a_time(directory, say):
        return _set_up(directory, parts, say, ready, real_set)


@contextlib.contextmanager
def one_setup_at_a_time(directory: Path, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the bench folder's set-up lock for the block, waiting (and saying so) while another
    process sets the same folder up: two would run mmdebstrap into one rootfs folder (a second
    `make demo` started during the first's set-up, or a command beside a test run's own)."""
    with (directory / SETUP_LOCK).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say is not None:
                say(f"another process is setting up {directory}: waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # released as the file closes


def _set_up(directory: Path, parts: BenchParts, say: Callable[[str], None] | None,
            ready: Callable[[str, BenchSetup], None] | None, real_set: str | None) -> BenchSetup:
    setup = BenchSetup(directory, PhaseLog(say))

    def announce(part: str) -> None:
        if ready is not None:
            ready(part, setup)

    apt_done = threading.Event()  # the Docker chain's apt-get goes first: it is on the critical path

    def then_announce(part: str, function: Callable[[], T]) -> T:
        try:
            return function()
        finally:
            announce(part)

    with concurrent.futures.ThreadPoolExecutor(max_workers=5, thread_name_prefix="bench-setup") as pool:
        real_channel = pool.submit(setup.step, f"real channel ({real_set})", lambda phase: _set_up_real_channel(
            directory, real_set, setup.phases, phase)) if real_set else None
        channel = pool.submit(then_announce, "channel", lambda: setup.step(
            "conda channel", lambda phase: _set_up_channel(directory, setup.phases, phase))) \
            if parts.channel else None
        if parts.proxy:
            pool.submit(then_announce, "proxy", lambda: setup.step(
                "configurable-http-proxy", lambda phase: _set_up_proxy(setup, phase)))
        wheels = pool.submit(_fetch_base_wheels, directory, setup.phases) if parts.base else None
        package_parts = [part for part in PACKAGE_PARTS if getattr(parts, part)]
        if package_parts:
            pool.submit(_set_up_packages, setup, package_parts, apt_done, announce)
        try:
            _set_up_docker_chain(setup, parts, channel, wheels, apt_done, announce)
        finally:
            apt_done.set()
            for part in ("daemon", "rootfs", "base"):  # done, or never to be (a step before failed)
                announce(part)
        if channel is not None:
            setup.channel = channel.result()
        if real_channel is not None:
            setup.real_channel = real_channel.result()
    setup.phases.finish()
    return setup


def _set_up_docker_chain(setup: BenchSetup, parts: BenchParts, channel: Future | None, wheels: Future | None,
                         apt_done: threading.Event, announce: Callable[[str], None]) -> None:
    directory = setup.directory
    if not parts.daemon:
        return
    packages = _missing_debian_packages(directory, parts)
    if packages:
        setup.step(f"apt-get install {' '.join(sorted(set(packages.values())))}",
                   lambda phase: ensure_debian_packages(packages))
    apt_done.set()
    setup.daemon = setup.step("dockerd", lambda phase: _set_up_daemon(directory, phase))
    announce("daemon")
    if setup.daemon is None or not parts.rootfs:
        return
    client = setup.daemon.client()
    # Its phases (mmdebstrap, import) are timed inside; a cached image takes no time.
    rootfs = setup.step("rootfs image", lambda phase: build_rootfs_image(client, directory, phases=setup.phases))
    announce("rootfs")
    if rootfs is None:
        return
    if not parts.base:
        return
    info = channel.result() if channel is not None else None
    if info is None:
        setup.errors.append("base image: not built, the conda channel failed")
        return
    folder = wheels.result() if wheels is not None else None
    setup.base_image_id = setup.step("base image", lambda phase: _set_up_base(client, directory, info, folder, setup,
                                                                               phase))


def _missing_debian_packages(directory: Path, parts: BenchParts) -> dict[str, str]:
    """The Debian packages the Docker chain will need and lacks: installed up front, in one go."""
    wanted = {}
    if parts.daemon and not daemon_answers(directory):
        wanted.update(DOCKERD_PACKAGES)
    if parts.rootfs and not rootfs_tree_is_current(directory):
        wanted.update(ROOTFS_TOOL_PACKAGES)
    return {command: package for command, package in wanted.items() if shutil.which(command) is None}


def _set_up_daemon(directory: Path, phase: Phase) -> DaemonHandle:
    daemon = ensure_daemon(directory)
    phase.note = f"{'started' if daemon.owned else 'found'} at {daemon.docker_host}"
    return daemon


def _set_up_channel(directory: Path, phases: PhaseLog, phase: Phase) -> ChannelInfo:
    before = read_channel_info(directory / "channel")
    build_dev_channel(directory / "channel", phases=phases)
    info = read_channel_info(directory / "channel")
    phase.note = "cached" if before is not None and before == info else "built"
    if info is None or not info.python_available:
        reason = info.python_skip_reason if info else "not built"
        raise BenchError(f"the local conda channel has no python 3.9: {reason}")
    return info


def _set_up_real_channel(directory: Path, real_set: str, phases: PhaseLog, phase: Phase) -> ChannelInfo:
    channel_dir = real_channel_dir(directory, real_set)
    before = read_channel_info(channel_dir)
    info = build_real_channel(channel_dir, real_set, phases=phases)
    phase.note = "cached" if before is not None and before == info else "built"
    return info


def _fetch_base_wheels(directory: Path, phases: PhaseLog) -> Path | None:
    """The single-user server's wheels, fetched while mmdebstrap runs (basewheels.py); None when
    that failed: the base image's build fetches them itself then, as it did before."""
    with phases("base image: single-user wheels (pip download)") as phase:
        try:
            folder, cached = download_singleuser_wheels(directory)
        except Exception as error:  # no pyenv CPython 3.9, PyPI unreachable: the build's pip tries
            phase.note = f"failed, the build fetches them: {' '.join(str(error).split())[:200]}"
            return None
        phase.note = "cached" if cached else f"{len(list(folder.glob('*.whl')))} wheels from PyPI"
        return folder


def _set_up_base(client: docker.DockerClient, directory: Path, channel: ChannelInfo, wheels: Path | None,
                 setup: BenchSetup, phase: Phase) -> str:
    resolver = Resolver(channel_urls={"conda-forge": channel.url}, package_cache_dir=str(directory / "pkgs"))
    before = _image_id(client, BASE_TAG)
    image_id = asyncio.run(build_offline_base(client, directory, resolver, phases=setup.phases, wheels=wheels))
    phase.note = "cached" if image_id == before else "built"
    return image_id


def _set_up_proxy(setup: BenchSetup, phase: Phase) -> list[str]:
    cached = shutil.which("configurable-http-proxy") or (setup.directory / PROXY_BIN).exists()
    setup.proxy_command = ensure_proxy(setup.directory)
    phase.note = "cached" if cached else f"npm install {PROXY_PACKAGE}"
    return setup.proxy_command


def _set_up_packages(setup: BenchSetup, parts: list[str], apt_done: threading.Event,
                     announce: Callable[[str], None]) -> None:
    """One apt-get for every package-only part, once the Docker chain's own is done."""
    apt_done.wait()
    wanted = {command: package for part in parts for command, package in PACKAGE_PARTS[part].items()}
    missing = sorted({package for command, package in wanted.items() if shutil.which(command) is None})
    try:
        if missing:
            setup.step(f"apt-get install {' '.join(missing)}", lambda phase: ensure_debian_packages(wanted))
    finally:
        for part in parts:
            announce(part)


def _image_id(client: docker.DockerClient, tag: str) -> str | None:
    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def ensure_bench(bench_dir: Path | None = None, say: Callable[[str], None] = print,
                 real_set: str | None = None) -> Bench:
    """Bring up (or reuse) the daemon, channel, base image and proxy; export DOCKER_HOST.

    ``real_set`` also builds that real channel (see realchannel.py) into ``.real_channel``.
    """
    directory = Path(bench_dir or default_bench_dir()).resolve()
    say(f"bench: {directory} (the first time: mmdebstrap, wheels and pip, about 2 minutes)")
    setup = set_up_bench(directory, BenchParts(), say=lambda line: say(f"bench: {line}"), real_set=real_set)
    if setup.errors:
        raise BenchError("; ".join(setup.errors))
    assert setup.daemon and setup.channel and setup.proxy_command
    os.environ["DOCKER_HOST"] = setup.daemon.docker_host
    channel = setup.real_channel or setup.channel
    say(f"bench: ready in {setup.phases.wall:.0f} s; Docker at {setup.daemon.docker_host}, "
        f"channel {channel.url}, proxy {setup.proxy_command[0]}")
    return Bench(directory, setup.daemon, setup.channel, BASE_TAG, setup.proxy_command, setup.real_channel)
