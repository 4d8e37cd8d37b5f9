"""The builds a cache folder records, read and written without a daemon.

Each key has a folder ``<cache_dir>/builds/<key>/``: its last build's status
(``status.json``, a :class:`BuildRecord`), its build log, its lock (held while a process
builds it, across hub processes), its last use (a file's mtime: it survives restarts) and
its pin (held, shared, by every start between looking its image up and running its
container: gc removes an image only under the pin's exclusive lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from .builderrors import BuildError

BUILD_STATUS = "status.json"  # in a key's cache folder: the last build's status (BuildRecord)
_PIN = "in-use.lock"


@dataclass(frozen=True)
class BuildRecord:
    """A build as its cache folder records it (``status.json``): read without a daemon.

    ``status``: building, built, failed, or interrupted (recorded as building, but no
    process holds its lock any more: the builder was killed). ``phase`` and ``cause``
    as in :class:`BuildError`; times in UTC, ISO 8601.
    """

    key: str
    status: str
    name: str = ""
    phase: str = ""
    cause: str = ""
    started: str = ""
    finished: str = ""
    env_name: str = ""  # a profile's slug, or "custom" (empty in records older than it)
    # What the key was built from, so that a rebuild builds this key again whatever the profile
    # says now: the spec's normalized JSON and the CUDA ("" in records older than them).
    spec: str = ""
    cuda: str = ""


_HEX_DIGITS = frozenset("0123456789abcdef")


class BuildRecords:
    """The per-key folders under ``<cache_dir>/builds``."""

    def __init__(self, cache_dir: Path | str):
        self.root = Path(cache_dir) / "builds"

    def key_dir(self, key: str) -> Path:
        """The key's folder; ValueError for text that is not a key (hex digits), which never
        becomes a path."""
        if not key or not set(key) <= _HEX_DIGITS:
            raise ValueError(f"not a build key: {key[:80]!r}")
        return self.root / key

    def mark_used(self, key: str) -> None:
        """Record a use of the key's image (the file's mtime survives hub restarts)."""
        path = self.key_dir(key) / "last-used"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def last_used(self, key: str) -> float:
        for name in ("last-used", "build.log"):
            with contextlib.suppress(OSError):
                return (self.key_dir(key) / name).stat().st_mtime
        return 0.0

    def pin(self, key: str) -> IO[str]:
        """Hold the key's image for a start until the returned file is closed: gc keeps it.

        Blocks only while gc removes that image (a lookup after that finds it gone and builds).
        A shared flock: starts of one image never wait for each other, in any hub process.
        """
        path = self.key_dir(key) / _PIN
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)
        except BaseException:
            handle.close()
            raise
        return handle

    @contextlib.contextmanager
    def unpinned(self, key: str) -> Iterator[bool]:
        """True when no start holds the key's image; then none can pin it until the block ends."""
        path = self.key_dir(key) / _PIN
        try:
            handle = path.open("a")
        except OSError:  # no key folder (the image was built by another installation): no start of ours
            yield True
            return
        with _exclusive_if_free(handle) as free:
            yield free

    def build_record(self, key: str) -> BuildRecord | None:
        """The key's recorded build (from its cache folder), or None if it was never built here."""
        try:
            data = json.loads((self.key_dir(key) / BUILD_STATUS).read_text())
        except (OSError, ValueError):
            return None
        fields = {name: str(data.get(name, "")) for name in ("name", "phase", "cause", "started", "finished",
                                                              "env_name", "spec", "cuda")}
        status = str(data.get("status", ""))
        if status == "building" and not lock_held(self.key_dir(key) / "build.lock"):
            status = "interrupted"
            fields["cause"] = fields["cause"] or "the build process stopped before the build ended (killed?)"
        return BuildRecord(key=key, status=status, **fields)

    def builds(self) -> list[BuildRecord]:
        """Every build recorded in the cache folder, the latest first (no daemon needed)."""
        records = [self.build_record(path.parent.name) for path in self.root.glob(f"*/{BUILD_STATUS}")]
        return sorted((r for r in records if r is not None), key=lambda r: r.finished or r.started, reverse=True)

    def failed_builds(self) -> list[BuildRecord]:
        """Builds whose last attempt failed or was interrupted, the latest first."""
        return [record for record in self.builds() if record.status in ("failed", "interrupted")]

    def record(self, key: str, **fields: str) -> None:
        """Update the key's status.json (written whole, then renamed: readers never see half of it)."""
        path = self.key_dir(key) / BUILD_STATUS
        with contextlib.suppress(OSError):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data.update(fields, key=key)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{BUILD_STATUS}.")  # one per writer
            try:
                with os.fdopen(handle, "w") as out:
                    os.fchmod(out.fileno(), 0o644)  # as written directly: the admin's CLI reads it too
                    out.write(json.dumps(data, indent=2) + "\n")
                os.replace(temporary, path)
            finally:
                Path(temporary).unlink(missing_ok=True)  # a full disk: no half-written file stays

    def record_failure(self, key: str, error: BuildError) -> None:
        self.write_log(key, f"build failed ({error.phase}): {error}\n")
        self.record(key, status="failed", phase=error.phase, cause=error.cause, finished=now())

    def write_log(self, key: str, text: str) -> None:
        with contextlib.suppress(OSError):
            self.key_dir(key).mkdir(parents=True, exist_ok=True)
            with (self.key_dir(key) / "build.log").open("a") as build_log:
                build_log.write(text)


@contextlib.asynccontextmanager
async def file_lock(path: Path, on_wait: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[None]:
    """An exclusive lock across hub processes sharing the cache folder; ``on_wait`` is awaited
    first when another process holds it (so that a spawn can say what it waits for)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                await on_wait()
            await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@contextlib.contextmanager
def lock_if_free(path: Path) -> Iterator[bool]:
    """Hold ``path``'s build lock for the block if no process holds it now (True), without
    waiting: False if a build holds it, or it cannot be opened (then nobody can tell)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a")
    except OSError:
        yield False
        return
    with _exclusive_if_free(handle) as free:
        yield free


@contextlib.contextmanager
def _exclusive_if_free(handle: IO[str]) -> Iterator[bool]:
    """``handle``'s exclusive flock for the block if no process holds one now (True), without
    waiting; the handle is closed after the block."""
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_held(path: Path) -> bool:
    """Whether some process (this one included) holds ``path``'s build lock now."""
    try:
        handle = path.open("a")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
