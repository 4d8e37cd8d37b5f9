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
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from condaspawner_bench.bench import BenchParts
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
    "demo_bench": ("base", "channel", "proxy"),
    "chromium": ("browser",),
    "registry_server": ("registry",),  # the fixture starts it; the set-up installs its packages
    "auth_registry_server": ("registry",),
    "swarm_bench": ("swarm",),  # likewise
}


def bench_dir() -> Path:
    return Path(os.environ.get("CONDASPAWNER_BENCH_DIR") or REPO / ".bench")


def bench_unavailable(reason: str) -> None:
    """Skip for want of the bench, or fail under CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the bench is required)", pytrace=False)
    pytest.skip(reason)


# -- the set-up, started at collection in its own process ---------------------------------------

SETUP_DIR_ENV = "CONDASPAWNER_TEST_BENCH_SETUP"  # the run's set-up folder, shared with xdist workers


def bench_parts(item: pytest.Item) -> set[str]:
    return {part for name in getattr(item, "fixturenames", ()) for part in BENCH_FIXTURES.get(name, ())}


def _is_xdist_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


class BenchSetup:
    """``python -m condaspawner_bench setup``, started once per test run beside the tests
    that need no bench.

    A process of its own: unit tests that monkeypatch the bench's modules or the
    environment (PYENV_ROOT, DOCKER_HOST, apt sources) cannot disturb it. Under
    pytest-xdist the first worker to collect starts it (a lock in the run's folder)
    and every worker waits for the parts its tests need; the controller owns the daemon
    the set-up started and stops it at the end.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.report_path = folder / "report.json"
        self.ready_dir = folder / "ready"  # the set-up writes ready/PART as each part is done
        self.log_path = folder / "setup.log"
        self.started_path = folder / "started.json"
        self.process: subprocess.Popen | None = None
        self.waited = 0.0
        self.daemon_claimed = False
        self._report: dict | None = None

    def start(self, parts: set[str], tests_without_bench: int) -> None:
        """Start the set-up of ``parts``, unless another process of this run already did."""
        with open(self.folder / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.started_path.exists():
                return
            names = [name for name in BenchParts.NAMES if name in parts]
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "condaspawner_bench", "setup", "--bench-dir", str(bench_dir()),
                     "--parts", ",".join(names), "--report", str(self.report_path),
                     "--ready-dir", str(self.ready_dir)],
                    cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            self.started_path.write_text(json.dumps(
                {"pid": self.process.pid, "parts": names, "tests_without_bench": tests_without_bench}))

    def started(self) -> dict | None:
        try:
            return json.loads(self.started_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def wait_for(self, parts: set[str]) -> None:
        """Until ``parts`` are done (or the whole set-up is): a test needing only the daemon or
        the channel runs while mmdebstrap and the base image are still under way."""
        if self._report is not None or not parts:
            return
        started = time.monotonic()
        pid = (self.started() or {}).get("pid")
        while not all((self.ready_dir / part).exists() for part in parts):
            if self.report_path.exists() or not pid or not _alive(pid):
                break
            time.sleep(0.2)
        self.waited += time.monotonic() - started
        if self.report_path.exists():
            self.wait()

    def wait(self) -> dict:
        """The set-up's report, once it is done (its errors are for the fixtures to meet again)."""
        if self._report is None:
            started = time.monotonic()
            if self.process is not None:
                self.process.wait()
            else:  # another worker's child: wait for its report, or for it to be gone
                pid = (self.started() or {}).get("pid")
                while not self.report_path.exists() and pid and _alive(pid):
                    time.sleep(0.2)
            self.waited += time.monotonic() - started
            try:
                self._report = json.loads(self.report_path.read_text())
            except (OSError, json.JSONDecodeError):
                log = self.log_path.read_text(errors="replace").strip().splitlines()
                self._report = {"errors": ["the set-up ended without a report: " + " | ".join(log[-5:])]}
        return self._report

    def started_daemon(self) -> str | None:
        """The DOCKER_HOST of a daemon the set-up started (the session owns it), else None."""
        self.wait_for({"daemon"})
        try:
            daemon = json.loads((self.ready_dir / "daemon").read_text()) or {}
        except (OSError, json.JSONDecodeError):
            daemon = self.wait().get("daemon") or {}
        return daemon.get("docker_host") if daemon.get("started") else None

    def summary(self, waits: list[float]) -> list[str]:
        started, report = self.started() or {}, self.wait()
        waited = ", ".join(f"{seconds:.1f} s" for seconds in waits) or "0 s"
        lines = [f"python -m condaspawner_bench setup ({', '.join(started.get('parts', []))}) ran beside the "
                 f"{started.get('tests_without_bench', 0)} tests that need no bench; then the tests waited "
                 f"{waited} for it ({len(waits) or 1} process{'es' if len(waits) > 1 else ''})"]
        lines += PhaseLog.from_json(report).summary() if report.get("phases") is not None else []
        lines += [f"error: {error}" for error in report.get("errors", [])]
        if report.get("errors"):
            lines.append(f"its log: {self.log_path}")
        return lines


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


_SETUP: BenchSetup | None = None
_WORKER_WAITS: list[float] = []


def pytest_configure(config: pytest.Config) -> None:
    global _SETUP
    if _is_xdist_worker():
        if os.environ.get(SETUP_DIR_ENV):
            _SETUP = BenchSetup(Path(os.environ[SETUP_DIR_ENV]))
        return
    folder = Path(tempfile.mkdtemp(prefix="condaspawner-bench-setup-"))
    os.environ[SETUP_DIR_ENV] = str(folder)  # xdist's workers inherit it
    _SETUP = BenchSetup(folder)


def _parts_needed(parts: set[str]) -> set[str]:
    """With what the parts stand on: the base image needs the rootfs and the channel, ..."""
    needed = set(parts)
    if "base" in needed:
        needed |= {"rootfs", "channel"}
    if "rootfs" in needed:
        needed.add("daemon")
    return needed


# When the set-up has each part ready (the Docker chain is the long one).
_STAGE = {"channel": 1, "daemon": 1, "proxy": 1, "rootfs": 2, "browser": 2, "registry": 2, "swarm": 2, "base": 3}


# Seconds each long group took in one process (--durations=0 summed per group, warm bench,
# 2026-12-01). Only an order: the groups that use the base image start longest first, so
# that under xdist the last to start is a short one. A stale figure costs balance, never
# a result; a group not named here counts as short.
_GROUP_SECONDS = {
    "swarm": 258, "tests/test_builder.py": 150, "tests/test_build_faults.py": 130,
    "tests/test_e2e_failures.py": 110, "tests/test_e2e_envpage.py": 84, "tests/test_e2e.py": 74,
    "tests/test_cli_builder.py": 69, "tests/test_e2e_culling.py": 50, "tests/test_envpage_screenshots.py": 50,
    "tests/test_e2e_isolation.py": 49, "registry": 75,
}


def _run_order(items: list[pytest.Item]) -> dict[str, tuple[int, int]]:
    """A rank for each group of tests (see _xdist_group), in the order they should start.

    Groups that need no bench first: they run while it is set up. Then those that need
    only parts that are ready early (the daemon, the channel), then the rootfs. Then the
    users of the base image (the hub's tests among them), the longest first.
    """
    stages: dict[str, int] = {}
    for item in items:
        stage = max((_STAGE[part] for part in bench_parts(item)), default=0)
        group = _xdist_group(item)
        stages[group] = max(stages.get(group, 0), stage)
    return {group: (stage, -_GROUP_SECONDS.get(group, 0) if stage >= _STAGE["base"] else 0)
            for group, stage in stages.items()}


def _xdist_group(item: pytest.Item) -> str:
    """Under xdist, a group runs in one worker: a module (its module fixtures, a hub among
    them, are set up once), or every test on the multi-node bench (each worker would start
    its own swarm bench in the one state folder, .swarm-bench, and a bench starting there
    kills what an earlier one left). Hubs of two workers may run at once on one daemon:
    each process has its own fake GPU and home volume prefix (fixtures_hub). The tests of the
    session registry share one process too, so that one registry holds the base image's
    layers: a second repository then mounts them instead of docker compressing and
    uploading the 0.4 GB again (about 18 CPU-seconds)."""
    fixtures = set(getattr(item, "fixturenames", ()))
    if "swarm_bench" in fixtures:
        return "swarm"
    return "registry" if "registry_server" in fixtures else item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ranks = _run_order(items)
    items.sort(key=lambda item: ranks[_xdist_group(item)])  # stable: a group keeps pytest's order
    if _is_xdist_worker() and _SETUP is not None:  # for the controller's scheduler
        groups = {item.nodeid: _xdist_group(item) for item in items}
        partial = _SETUP.folder / f"groups.{os.environ['PYTEST_XDIST_WORKER']}.json"
        partial.write_text(json.dumps(groups))
        partial.replace(_SETUP.folder / "groups.json")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` by :func:`_xdist_group`: xdist 3.8 marks groups by suffixing
    node ids, which pytest 9's node ids ignore, so the workers write the groups down."""
    if config.getoption("dist") != "loadgroup" or _SETUP is None:
        return None
    from xdist.scheduler import LoadScopeScheduling

    folder = _SETUP.folder

    class GroupScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # every worker has collected (and written) by now
                try:
                    self.groups = json.loads((folder / "groups.json").read_text())
                except (OSError, json.JSONDecodeError):
                    self.groups = {}  # then by module
            return self.groups.get(nodeid) or nodeid.split("::")[0]

    return GroupScheduling(config, log)


def pytest_collection_finish(session: pytest.Session) -> None:
    if _SETUP is None or session.config.option.collectonly or not session.items:
        return
    parts = set().union(*(bench_parts(item) for item in session.items))
    if parts:
        _SETUP.start(parts, sum(1 for item in session.items if not bench_parts(item)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if _SETUP is not None and bench_parts(item) and _SETUP.started():
        _SETUP.wait_for(_parts_needed(bench_parts(item)))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _SETUP is not None and hasattr(session.config, "workeroutput"):
        session.config.workeroutput["bench_setup_waited"] = _SETUP.waited


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:  # xdist, in the controller
    waited = getattr(node, "workeroutput", {}).get("bench_setup_waited")
    if waited is not None:
        _WORKER_WAITS.append(waited)


def pytest_terminal_summary(terminalreporter) -> None:
    if _SETUP is not None and not _is_xdist_worker() and _SETUP.started():
        terminalreporter.write_sep("-", "bench set-up")
        for line in _SETUP.summary(_WORKER_WAITS or [_SETUP.waited]):
            terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SETUP is None:
        return
    # Reaps our child, or waits for a set-up still running (an interrupted run).
    report = _SETUP.wait() if _SETUP.started() else {}
    if _is_xdist_worker():
        return
    host = _SETUP.started_daemon() if report else None
    if host and not _SETUP.daemon_claimed:  # the set-up started it for this run: stop it as a run does
        paths = BenchPaths.for_bench_dir(bench_dir())
        if paths.docker_host == host:
            DaemonHandle(host, owned=True, paths=paths).stop()
    if not report.get("errors"):  # its log stays when it failed (the summary names it)
        shutil.rmtree(_SETUP.folder, ignore_errors=True)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DaemonHandle]:
    """A Docker daemon that answers; ``DOCKER_HOST`` points at it for the session."""
    try:
        handle = ensure_daemon(bench_dir())
    except BenchDaemonError as error:
        bench_unavailable(f"no Docker daemon for the bench: {error}")
    if _SETUP is not None and not _is_xdist_worker() and _SETUP.started() \
            and _SETUP.started_daemon() == handle.docker_host:
        handle.owned = _SETUP.daemon_claimed = True  # started for this session: stopped at its end
        # (under xdist no worker owns it: the controller stops it when all are done)
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
    except (ImageBuildError, BenchDaemonError) as error:  # mmdebstrap missing, non-root
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


@pytest.fixture(scope="session")
def demo_bench(base_image: str) -> Path:
    """The bench folder once every part the demo sets up is ready (its proxy too): a command that
    sets the demo's bench up itself then finds each part built, and never builds one beside the
    run's own set-up."""
    return bench_dir()


_DEFERRED_REPOS: list[str] = []


def remove_repo_images(client, repo: str) -> None:
    """Delete a test module's environment images at the end of the session, so repeated runs
    don't fill the bench's disk.

    Not at once: while they exist, their layers stay in Docker's store, so a later
    module that builds the same conda environment (each hub builds python39, say)
    stores none of its package layers again.
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
