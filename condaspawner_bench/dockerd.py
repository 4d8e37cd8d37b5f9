"""The bench Docker daemon: use the one that answers, or run a private one.

Tests, demos and benchmarks need a real Docker daemon. ``ensure_daemon`` uses
the daemon that ``DOCKER_HOST`` (or the default socket) points at; where none
answers it starts a private ``dockerd`` as root, with its socket, data and
state under a bench directory, no bridge and no iptables rules (containers and
builds use host networking), so it touches nothing else on the machine.

    handle = ensure_daemon(Path(".bench"))
    client = handle.client()
    ...
    handle.stop()  # only if you want it gone; it otherwise outlives this process
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.errors import DockerException

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
PING_TIMEOUT_S = 5
# unix socket paths are limited to 108 bytes; containerd puts its own sockets a
# few levels below the exec-root, so keep the runtime dir well under that.
MAX_RUNTIME_DIR_LEN = 48
LOG_TAIL_LINES = 30

# Debian package that provides each command the bench needs.
DOCKERD_PACKAGES = {"dockerd": "docker.io"}
ROOTFS_TOOL_PACKAGES = {"mmdebstrap": "mmdebstrap"}  # makes the rootfs (offlinebase.py)
BENCH_PACKAGES = {**DOCKERD_PACKAGES, **ROOTFS_TOOL_PACKAGES}


class BenchDaemonError(RuntimeError):
    """No Docker daemon could be found or started."""


@dataclass(frozen=True)
class BenchPaths:
    """Where a private dockerd keeps its files for one bench directory."""

    bench_dir: Path
    runtime_dir: Path

    @classmethod
    def for_bench_dir(cls, bench_dir: Path) -> BenchPaths:
        bench_dir = Path(bench_dir).resolve()
        return cls(bench_dir, _runtime_dir_for(bench_dir))

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "docker.sock"

    @property
    def exec_root(self) -> Path:
        return self.runtime_dir / "exec"

    @property
    def pidfile(self) -> Path:
        return self.runtime_dir / "dockerd.pid"

    @property
    def data_root(self) -> Path:
        return self.bench_dir / "docker"

    @property
    def log_file(self) -> Path:
        return self.bench_dir / "dockerd.log"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"


def _runtime_dir_for(bench_dir: Path) -> Path:
    runtime_dir = bench_dir / "run"
    if len(str(runtime_dir)) <= MAX_RUNTIME_DIR_LEN:
        return runtime_dir
    digest = hashlib.sha256(str(bench_dir).encode()).hexdigest()[:12]
    return Path("/tmp") / f"condaspawner-{digest}"


@dataclass
class DaemonHandle:
    """A Docker daemon that answers. ``owned``: this process started it.

    ``paths`` is set for a bench daemon (started here or earlier from the same
    bench directory) and None for a daemon somebody else runs; ``stop()`` only
    ever stops a bench daemon.
    """

    docker_host: str
    owned: bool = False
    paths: BenchPaths | None = None
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def client(self, timeout: int = 120) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)

    @property
    def pid(self) -> int | None:
        if self._process is not None:
            return self._process.pid
        return bench_daemon_pid(self.paths) if self.paths else None

    def stop(self) -> None:
        """Stop a bench daemon and unmount what it left, so its folders can be deleted.

        Does nothing for a daemon that was not started from a bench directory.
        """
        if self.paths is None:
            return
        pid = self.pid
        if pid is not None:
            _terminate(pid, self._process)
        for root in (self.paths.exec_root, self.paths.data_root):
            unmount_under(root)
        if not self.paths.runtime_dir.is_relative_to(self.paths.bench_dir):
            # Our own short-path dir in /tmp: nothing in it outlives the daemon.
            shutil.rmtree(self.paths.runtime_dir, ignore_errors=True)


def ensure_daemon(bench_dir: Path, *, use_external: bool = True) -> DaemonHandle:
    """Return a Docker daemon that answers, starting a private one under ``bench_dir`` if needed.

    Order: ``DOCKER_HOST`` (or the default socket when it is unset), then a
    daemon already started from ``bench_dir``, then a new one (root only).
    ``use_external=False`` skips the first step (a test wanting its own daemon).
    """
    paths = BenchPaths.for_bench_dir(bench_dir)
    if use_external:
        external = _external_docker_host()
        if _answers(external):
            is_bench = external == paths.docker_host
            return DaemonHandle(external, paths=paths if is_bench else None)
    if _answers(paths.docker_host):
        log.info("reusing the bench dockerd at %s", paths.docker_host)
        return DaemonHandle(paths.docker_host, paths=paths)
    return _start_private_daemon(paths)


def daemon_answers(bench_dir: Path) -> bool:
    """Would :func:`ensure_daemon` find a running daemon (so that none has to be installed)?"""
    return _answers(_external_docker_host()) or _answers(BenchPaths.for_bench_dir(bench_dir).docker_host)


def _external_docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET


def _answers(docker_host: str) -> bool:
    try:
        client = docker.DockerClient(base_url=docker_host, timeout=PING_TIMEOUT_S)
    except (DockerException, OSError):
        return False
    try:
        return bool(client.ping())
    except (DockerException, OSError):
        return False
    finally:
        client.close()


def _start_private_daemon(paths: BenchPaths) -> DaemonHandle:
    if os.geteuid() != 0:
        raise BenchDaemonError(
            f"No Docker daemon answers at {_external_docker_host()}, and starting a private "
            "bench dockerd needs root. Start Docker and export DOCKER_HOST (e.g. "
            "DOCKER_HOST=unix:///run/user/$UID/docker.sock for rootless Docker), or run as root."
        )
    ensure_debian_packages(DOCKERD_PACKAGES)
    _stop_unreachable_daemon(paths)
    _prepare_dirs(paths)
    started = time.monotonic()
    process = _spawn_dockerd(paths)
    handle = DaemonHandle(paths.docker_host, owned=True, paths=paths, _process=process)
    try:
        _wait_until_ready(handle, process)
    except BaseException:
        handle.stop()
        raise
    log.info("bench dockerd up at %s in %.1f s", paths.docker_host, time.monotonic() - started)
    return handle


def _stop_unreachable_daemon(paths: BenchPaths) -> None:
    """Stop a dockerd of this bench that no longer answers (its socket was deleted, say)."""
    stale = DaemonHandle(paths.docker_host, paths=paths)
    if stale.pid is not None:
        log.warning("stopping the bench dockerd %d: it does not answer", stale.pid)
    stale.stop()


def _prepare_dirs(paths: BenchPaths) -> None:
    for directory in (paths.bench_dir, paths.runtime_dir, paths.data_root, paths.exec_root):
        directory.mkdir(parents=True, exist_ok=True)
    paths.runtime_dir.chmod(0o700)
    # A dead daemon's socket and pidfile would make the new one refuse to start.
    paths.socket.unlink(missing_ok=True)
    paths.pidfile.unlink(missing_ok=True)


def _spawn_dockerd(paths: BenchPaths) -> subprocess.Popen:
    command = [
        "dockerd",
        f"--host={paths.docker_host}",
        f"--data-root={paths.data_root}",
        f"--exec-root={paths.exec_root}",
        f"--pidfile={paths.pidfile}",
        # No bridge, NAT or forwarding: nothing on the host's network changes, and
        # containers reach the outside only through host networking.
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-masq=false",
        "--ip-forward=false",
    ]
    with open(paths.log_file, "ab") as log_file:
        # Its own session: the daemon outlives the test run or demo that started it.
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_until_ready(handle: DaemonHandle, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchDaemonError(
                f"dockerd exited with status {process.returncode} before answering.\n"
                + log_tail(handle.paths.log_file)
            )
        if _answers(handle.docker_host):
            return
        time.sleep(0.1)
    raise BenchDaemonError(
        f"dockerd did not answer at {handle.docker_host} within {START_TIMEOUT_S:.0f} s.\n"
        + log_tail(handle.paths.log_file)
    )


def log_tail(log_file: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, for an error message."""
    try:
        tail = log_file.read_text(errors="replace").splitlines()[-lines:]
    except OSError as error:
        return f"(no log at {log_file}: {error})"
    return f"Last lines of {log_file}:\n" + "\n".join(tail)


def _terminate(pid: int, process: subprocess.Popen | None) -> None:
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    if process is not None:
        try:
            process.wait(STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return
    _wait_for_exit(pid)


def _wait_for_exit(pid: int) -> None:
    """Wait for a process that is not our child (a daemon started by an earlier run)."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _is_running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            deadline = time.monotonic() + STOP_TIMEOUT_S
        time.sleep(0.1)


def _is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie has exited; whoever started it just hasn't reaped it.
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


def bench_daemon_pid(paths: BenchPaths) -> int | None:
    """The pid of the dockerd running for this bench, from its pidfile or its command line."""
    pid = _read_pid(paths.pidfile)
    if pid is not None and _is_running(pid):
        return pid
    return _find_dockerd(f"--exec-root={paths.exec_root}")


def _find_dockerd(argument: str) -> int | None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if Path(argv[0]).name == "dockerd" and argument in argv:
            pid = int(cmdline.parent.name)
            if _is_running(pid):
                return pid
    return None


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


# --- mounts -------------------------------------------------------------------

MNT_DETACH = 2


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root``, deepest first (the order to unmount them)."""
    root = Path(root).resolve()
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mount_point = Path(_unescape_mount_field(line.split()[1]))
        if mount_point == root or root in mount_point.parents:
            found.append(mount_point)
    return sorted(set(found), key=lambda path: len(path.parts), reverse=True)


def unmount_under(root: Path) -> None:
    """Unmount everything at or below ``root`` (lazily, if it is still busy)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for mount_point in mounts_under(root):
        target = os.fsencode(mount_point)
        if libc.umount2(target, 0) != 0 and libc.umount2(target, MNT_DETACH) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"cannot unmount {mount_point}: {os.strerror(errno)}")


def _unescape_mount_field(field_text: str) -> str:
    # /proc/self/mounts writes space, tab, newline and backslash as octal escapes.
    for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field_text = field_text.replace(escaped, plain)
    return field_text


# --- host packages ------------------------------------------------------------


# apt-get takes one caller at a time: the set-up's threads, and the processes of a test run
# (pytest-xdist's workers, the set-up's own process) through a lock file.
_APT_LOCK = threading.Lock()
_APT_LOCK_FILE = Path(tempfile.gettempdir()) / "condaspawner-bench-apt.lock"
_APT_UPDATED_STAMP = Path(tempfile.gettempdir()) / "condaspawner-bench-apt.updated"
APT_LISTS_FRESH_S = 3600  # package lists this recent are used as they are (a failed install updates them)


def ensure_debian_packages(packages_by_command: dict[str, str]) -> None:
    """Install, with apt-get, the Debian packages whose commands are missing (root only)."""
    with _APT_LOCK:
        missing = sorted({pkg for cmd, pkg in packages_by_command.items() if not shutil.which(cmd)})
        if not missing:
            return
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise BenchDaemonError(
                f"The bench needs {', '.join(missing)}; install them (apt-get install "
                f"{' '.join(missing)}) or run as root on Debian/Ubuntu so they are installed for you."
            )
        with open(_APT_LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            missing = sorted({pkg for cmd, pkg in packages_by_command.items() if not shutil.which(cmd)})
            if missing:
                _apt_install(missing)


def _apt_install(packages: list[str]) -> None:
    log.info("installing %s with apt-get", " ".join(packages))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *packages]
    if not _apt_lists_are_fresh():
        _apt_update(env)
        _run_apt(install, env)
        return
    try:
        _run_apt(install, env)
    except BenchDaemonError:  # lists another caller updated a while ago: update once, retry
        _apt_update(env)
        _run_apt(install, env)


def _apt_lists_are_fresh() -> bool:
    try:
        return time.time() - _APT_UPDATED_STAMP.stat().st_mtime < APT_LISTS_FRESH_S
    except OSError:
        return False


def _apt_update(env: dict[str, str]) -> None:
    _run_apt(["apt-get", "update"], env)
    _APT_UPDATED_STAMP.touch()


def _run_apt(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:]
        raise BenchDaemonError(f"{' '.join(command)} failed:\n" + "\n".join(output))
