"""Check the paths a conda package will link before py-rattler's installer sees them.

py-rattler 0.28's installer panics on a package whose ``info/paths.json`` holds an absolute
path ("All inserted paths must be relative"), in a rayon worker, and rayon aborts the whole
process: the hub, for every user. So every locked package's file list is read first (from the
shared package cache when it is there, else from the package's archive: a few range requests
for a ``.conda``) and a path that is absolute, climbs out with ``..`` or holds a NUL refuses the
package with one line, before anything is linked.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

from rattler import RepoDataRecord
from rattler.networking import Client
from rattler.package_streaming import PackageArchive

# Archives opened at once for the packages the cache lacks.
_CONCURRENT_READS = 8
# How much of a refused path the message shows.
_PATH_CHARS = 120
# The package cache's file lists found safe, by their files' identity (device, inode, size, mtime):
# each is read once per hub process, not before every install (~0.05 s for an environment of
# 47 packages on the bench), and read again once it is another file or was written since.
_SAFE_LISTS: set[tuple[tuple[int, int, int, int], ...]] = set()


class UnsafePackageError(Exception):
    """A package that lists a path outside its prefix: ``str(error)`` is one line for the user."""


class UnreadablePackageError(Exception):
    """A package whose file list could not be read (a channel that stopped answering, a damaged archive)."""


def path_problem(path: str) -> str | None:
    """Why ``path`` (a ``_path`` of info/paths.json) may not be linked, or None when it may."""
    if not path:
        return "an empty path"
    if "\0" in path:
        return "a path with a NUL character"
    if path.startswith(("/", "\\")):
        return "an absolute path"
    if ".." in path.replace("\\", "/").split("/"):
        return "a path with a '..' component"
    return None


def listed_paths(paths_json: bytes | None, files: bytes | None) -> list[str]:
    """The paths a package links: info/paths.json's ``_path``s, else (old packages) info/files' lines."""
    if paths_json is not None:
        return [str(entry.get("_path", "")) for entry in json.loads(paths_json).get("paths", [])]
    return [line for line in (files or b"").decode("utf-8", "replace").splitlines() if line]


def record_label(record: RepoDataRecord) -> str:
    return f"{record.name.normalized}-{record.version}-{record.build}"


async def check_records(records: list[RepoDataRecord], cache_dir: Path) -> None:
    """Raise UnsafePackageError for the first package (by name) that lists an unsafe path;
    UnreadablePackageError when a package's file list cannot be read."""
    gate = asyncio.Semaphore(_CONCURRENT_READS)

    async def problem(record: RepoDataRecord) -> str | None:
        async with gate:
            paths = await _record_paths(record, cache_dir)
        for path in paths:
            reason = path_problem(path)
            if reason is not None:
                return (f"package {record_label(record)} lists {reason}, {path[:_PATH_CHARS]!r}, which would be "
                        "written outside the environment: remove it from the environment file (and the hub admin "
                        f"from its channel, {record.channel or record.url})")
        return None

    ordered = sorted(records, key=lambda record: record.name.normalized)
    for message in await asyncio.gather(*(problem(record) for record in ordered)):
        if message is not None:
            raise UnsafePackageError(message)


async def _record_paths(record: RepoDataRecord, cache_dir: Path) -> list[str]:
    """The paths ``record`` links, as its file list in the package cache or its archive says; none
    for a list in the cache found safe before (:data:`_SAFE_LISTS`)."""
    cached = cache_dir / record_label(record) / "info"
    if (cached / "paths.json").is_file() or (cached / "files").is_file():
        return await asyncio.to_thread(_cached_paths, cached)
    try:
        archive = await _open(record.url)
        found = await archive.read_files(["info/paths.json", "info/files"])
        return listed_paths(found["info/paths.json"], found["info/files"])
    except (OSError, ValueError) as error:  # rattler's network and archive errors are OSErrors
        raise UnreadablePackageError(f"cannot read the file list of {record_label(record)} ({record.url}): "
                                     f"{error}") from None


def _cached_paths(info: Path) -> list[str]:
    paths_json, files = info / "paths.json", info / "files"
    identity = _identity(paths_json, files)
    if identity in _SAFE_LISTS:
        return []
    paths = listed_paths(paths_json.read_bytes() if paths_json.is_file() else None,
                         files.read_bytes() if files.is_file() else None)
    if identity and all(path_problem(path) is None for path in paths) and identity == _identity(paths_json, files):
        _SAFE_LISTS.add(identity)  # unchanged while it was read
    return paths


def _identity(*paths: Path) -> tuple[tuple[int, int, int, int], ...]:
    """Which files ``paths`` are, as they are now (empty when one cannot be read)."""
    identity = []
    for path in paths:
        try:
            status = path.stat()
        except FileNotFoundError:
            status = None
        except OSError:
            return ()
        identity.append((status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns) if status else (0, 0, 0, 0))
    return tuple(identity)


async def _open(url: str) -> PackageArchive:
    parsed = urlparse(url)
    if parsed.scheme == "file":  # rattler's archive reader fetches only over http(s)
        return await PackageArchive.from_path(unquote(parsed.path))
    return await PackageArchive.from_url(Client(), url)
