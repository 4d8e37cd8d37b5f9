"""py-rattler's install, run in child processes of the hub.

The installer links thousands of files natively; a crash in it (a Rust panic that aborts,
as a package listing a path outside its prefix once made it do) would otherwise end the
hub itself, and every spawn with it. Here a crash ends only the child: the build that was
installing fails in one line, and the next install gets a new child.

A child is started with the ``spawn`` method (never a fork of the hub's threads and event
loop; as with any ``spawn``, a program started from a script of its own must guard its start
with ``if __name__ == "__main__":``, as the ``jupyterhub`` command does), installs one lock
at a time, and after an install that succeeded is kept for the next one (its start, Python
and py-rattler imported, takes about a second on a slow machine); after one that failed it
is stopped, since a panic may be answered as an error while the child is aborting. A build that ends while its
install runs (a timeout, a cancel) kills its child, so nothing writes into a staging folder
the build is removing.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection

KEEP_IDLE = 2  # children kept for later installs; more run while more builds install at once
_STOP_WAIT_S = 5.0


@dataclass(frozen=True)
class InstallJob:
    """What a child installs: a rattler lock file (``Lock.write``'s), into ``staging_prefix``
    as if it lived at ``target_prefix``, through the package cache ``cache_dir``."""

    lock_path: str
    staging_prefix: str
    cache_dir: str
    target_prefix: str


@dataclass(frozen=True)
class InstallOutcome:
    """A child's answer: ``error`` is "" when the environment is installed, in ``size`` bytes."""

    error: str = ""
    no_space: bool = False
    size: int = 0


class InstallerCrashed(Exception):
    """The child ended without answering (it crashed, or was killed)."""


class Installers:
    """The children that install, one job each at a time; idle ones wait for the next job."""

    def __init__(self, keep_idle: int = KEEP_IDLE):
        self.keep_idle = keep_idle
        self._idle: list[_Child] = []
        self._guard = threading.Lock()

    async def run(self, job: InstallJob) -> InstallOutcome:
        """Install ``job`` in a child; :class:`InstallerCrashed` if it dies first."""
        child = self._take()  # at most a process start: a cancel cannot come between it and the try
        try:
            outcome = await asyncio.to_thread(child.run, job)
        except BaseException:
            child.kill()  # crashed, or the build ended: never handed another job
            raise
        if outcome.error:
            # A failed install may leave its child dying: py-rattler's panic in one thread is
            # answered as an error while another thread of its pool aborts the process.
            child.kill()
        else:
            self._give_back(child)
        return outcome

    def close(self) -> None:
        """Stop the idle children."""
        with self._guard:
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()

    def _take(self) -> _Child:
        with self._guard:
            while self._idle:
                child = self._idle.pop()
                if child.alive():
                    return child
                child.kill()
        return _Child()

    def _give_back(self, child: _Child) -> None:
        with self._guard:
            if len(self._idle) < self.keep_idle:
                self._idle.append(child)
                return
        child.kill()


class _Child:
    """One child process and the pipe to it."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs,), name="condaspawner-install", daemon=True)
        self.process.start()
        theirs.close()

    def alive(self) -> bool:
        return self.process.is_alive()

    def run(self, job: InstallJob) -> InstallOutcome:
        try:
            self.connection.send(job)
            outcome = self.connection.recv()
        except (EOFError, OSError):
            self.process.join(_STOP_WAIT_S)
            raise InstallerCrashed(f"the installer process ended unexpectedly (exit code {self.process.exitcode}): "
                                   "the hub's log may say why") from None
        if not isinstance(outcome, InstallOutcome):
            raise InstallerCrashed(f"the installer process answered {type(outcome).__name__}")
        return outcome

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.join(_STOP_WAIT_S)
        with contextlib.suppress(Exception):
            self.connection.close()


# -- in the child ------------------------------------------------------------------------


def _serve(connection: Connection) -> None:
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return  # the hub closed the pipe or ended
        connection.send(asyncio.run(_install(job)))


async def _install(job: InstallJob) -> InstallOutcome:
    # Imported here, in the child: resolve.py uses this module.
    from pathlib import Path

    import rattler

    from .resolve import Lock, install_error, make_world_readable

    try:
        lock = Lock.read(Path(job.lock_path))
        await rattler.install(lock.records, target_prefix=Path(job.staging_prefix), cache_dir=Path(job.cache_dir),
                              alternative_target_prefix=job.target_prefix, execute_link_scripts=False,
                              show_progress=False)
        size = make_world_readable(Path(job.staging_prefix))
    except Exception as error:  # download, checksum, link or disk failures
        message, no_space = install_error(error)
        return InstallOutcome(message, no_space)
    return InstallOutcome(size=size)


_shared: Installers | None = None
_shared_guard = threading.Lock()


def shared_installers() -> Installers:
    """The hub process's installers (every Resolver's)."""
    global _shared
    with _shared_guard:
        if _shared is None:
            _shared = Installers()
        return _shared
