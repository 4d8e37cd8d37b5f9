"""Bench fixtures: a real Docker daemon and the Debian rootfs image built on it.

The daemon is the one ``DOCKER_HOST`` points at, or a private dockerd started
under the bench directory (``<repo>/.bench``, or ``$CONDASPAWNER_BENCH_DIR``),
which later runs reuse. Without a daemon the tests that need one are skipped,
except under CI (``CI=true``), where they fail: CI must not pass by skipping.

The set-up itself starts as soon as the tests are collected, in another process
(``python -m condaspawner_bench setup``: the independent parts at once), while the
tests that need no bench run first; a test that needs it waits for it, then its
fixtures find everything cached (or retry a failed part and say why). The summary
at the end of the run says how long each set-up phase took.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from condaspawner_bench.dockerd import (
    BenchDaemonError,
    BenchPaths,
    DaemonHandle,
    ensure_daemon,
)
from condaspawner_bench.offlinebase import (
    ROOTFS_TAG,
    build_offline_base,
    build_rootfs_image,
)
from condaspawner_bench.phases import PhaseLog
from jupyterhub_condaspawner.baseimage import BASE_TAG, ImageBuildError
from jupyterhub_condaspawner.resolve import Resolver

REPO = Path(__file__).resolve().parents[1]
# The bench part each fixture stands on (a test needs the union over its fixture closure).
BENCH_FIXTURES = {
    "docker_daemon": ("daemon",),
    "rootfs_image": ("rootfs",),
    "base_image": ("base",),
    "dev_channel": ("channel",),
    "dev_python_channel": ("channel",),
    "hub": ("base", "channel", "proxy"),
    "chromium": ("browser",),
}


def bench_dir() -> Path:
    return Path(os.environ.get("CONDASPAWNER_BENCH_DIR") or REPO / ".bench")


def bench_unavailable(reason: str) -> None:
    """Skip for want of the bench, or fail under CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the bench is required)", pytrace=False)
    pytest.skip(reason)


# -- the set-up, started at collection in its own process ---------------------------------------


def bench_parts(item: pytest.Item) -> set[str]:
    return {part for name in getattr(item, "fixturenames", ()) for part in BENCH_FIXTURES.get(name, ())}


class BenchSetup:
    """``python -m condaspawner_bench setup`` running beside the tests that need no bench.

    A process of its own: unit tests that monkeypatch the bench's modules or the
    environment (PYENV_ROOT, DOCKER_HOST, apt sources) cannot disturb it.
    """

    def __init__(self, parts: set[str], tests_before: int):
        self.parts = [name for name in ("daemon", "rootfs", "channel", "base", "proxy", "browser") if name in parts]
        self.tests_before = tests_before
        self.folder = Path(tempfile.mkdtemp(prefix="condaspawner-bench-setup-"))
        self.report_path = self.folder / "report.json"
        self.log_path = self.folder / "setup.log"
        self.waited = 0.0
        self.daemon_claimed = False
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "condaspawner_bench", "setup", "--bench-dir", str(bench_dir()),
                 "--parts", ",".join(self.parts), "--report", str(self.report_path)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self._report: dict | None = None

    def wait(self) -> dict:
        """The set-up's report, once it is done (its errors are for the fixtures to meet again)."""
        if self._report is None:
            started = time.monotonic()
            self.process.wait()
            self.waited += time.monotonic() - started
            try:
                self._report = json.loads(self.report_path.read_text())
            except (OSError, json.JSONDecodeError):
                log = self.log_path.read_text(errors="replace").strip().splitlines()
                self._report = {"errors": [f"the set-up exited with {self.process.returncode}: "
                                           + " | ".join(log[-5:])]}
        return self._report

    def started_daemon(self) -> str | None:
        """The DOCKER_HOST of a daemon the set-up started (this session then owns it), else None."""
        daemon = self.wait().get("daemon") or {}
        return daemon.get("docker_host") if daemon.get("started") else None

    def summary(self) -> list[str]:
        report = self.wait()
        lines = [f"python -m condaspawner_bench setup ({', '.join(self.parts)}) ran beside the first "
                 f"{self.tests_before} tests, which need no bench; the tests then waited {self.waited:.1f} s for it"]
        lines += PhaseLog.from_json(report).summary() if report.get("phases") is not None else []
        lines += [f"error: {error}" for error in report.get("errors", [])]
        lines.append(f"its log: {self.log_path}")
        return lines


_SETUP: BenchSetup | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that need no bench first (stable otherwise): they run while it is set up.
    items.sort(key=lambda item: bool(bench_parts(item)))


def pytest_collection_finish(session: pytest.Session) -> None:
    global _SETUP
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    parts = set().union(*(bench_parts(item) for item in session.items)) if session.items else set()
    if parts:
        _SETUP = BenchSetup(parts, sum(1 for item in session.items if not bench_parts(item)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _SETUP is not None and bench_parts(item):
        _SETUP.wait()


def pytest_terminal_summary(terminalreporter) -> None:
    if _SETUP is not None:
        terminalreporter.write_sep("-", "bench set-up")
        for line in _SETUP.summary():
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SETUP is None:
        return
    host = _SETUP.started_daemon()  # waits for a set-up still running (an interrupted session)
    if host and not _SETUP.daemon_claimed:  # no test took it over: stop it as a session would have
        paths = BenchPaths.for_bench_dir(bench_dir())
        if paths.docker_host == host:
            DaemonHandle(host, owned=True, paths=paths).stop()


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DaemonHandle]:
    """A Docker daemon that answers; ``DOCKER_HOST`` points at it for the session."""
    try:
        handle = ensure_daemon(bench_dir())
    except BenchDaemonError as error:
        bench_unavailable(f"no Docker daemon for the bench: {error}")
    if _SETUP is not None and _SETUP.started_daemon() == handle.docker_host:
        handle.owned = _SETUP.daemon_claimed = True  # started for this session: stopped at its end
    previous_host = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = handle.docker_host
    try:
        yield handle
    finally:
        _remove_deferred_images(handle)
        _restore_env("DOCKER_HOST", previous_host)
        if handle.owned:
            handle.stop()


@pytest.fixture(scope="session")
def rootfs_image(docker_daemon: DaemonHandle) -> str:
    """The tag of the Debian bookworm rootfs image (built once, then cached)."""
    try:
        build_rootfs_image(docker_daemon.client(), bench_dir(), tag=ROOTFS_TAG)
    except (ImageBuildError, BenchDaemonError) as error:  # debootstrap missing, non-root
        bench_unavailable(f"cannot build the rootfs image: {error}")
    return ROOTFS_TAG


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@pytest.fixture(scope="session")
def base_image(docker_daemon: DaemonHandle, rootfs_image: str, dev_python_channel) -> str:
    """The offline base image (conda Python 3.9 + the single-user server), built once, then cached."""
    resolver = Resolver(
        channel_urls={"conda-forge": dev_python_channel.url},
        package_cache_dir=str(bench_dir() / "pkgs"),
    )
    asyncio.run(build_offline_base(docker_daemon.client(), bench_dir(), resolver))
    return BASE_TAG


_DEFERRED_REPOS: list[str] = []


def remove_repo_images(client, repo: str) -> None:
    """Delete a test module's environment images at the end of the session, so repeated runs
    don't fill the bench's disk.

    Not at once: while they exist, their layers are docker's build cache, so a later
    module that builds the same conda environment (each hub builds python39, say)
    reuses its COPY and compileall layers instead of redoing them.
    """
    if repo not in _DEFERRED_REPOS:
        _DEFERRED_REPOS.append(repo)


def _remove_deferred_images(daemon: DaemonHandle) -> None:
    if not _DEFERRED_REPOS:
        return
    client = daemon.client()
    for repo in _DEFERRED_REPOS:
        for image in client.images.list(name=repo):
            try:
                client.images.remove(image.id, force=True)
            except docker.errors.APIError:  # still used by a container someone kept: leave it
                pass
    _DEFERRED_REPOS.clear()
