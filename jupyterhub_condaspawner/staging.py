"""A build's staging folder: the environment solved (py-rattler), installed into
``<cache_dir>/staging/<key>/env`` for the image, removed after; and, when a disk fills
up, which folder and about how much the install needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path

from packaging.requirements import Requirement
from rattler import MatchSpec

from .builderrors import BuildError, megabytes, one_line, plural
from .buildmodel import Build, BuildRequest
from .resolve import Lock, ResolveError, Resolver
from .spec import EnvironmentSpec, pip_requirement_text
from .stagedenv import StagedEnvironment, TreeStats


async def solve(resolver: Resolver, build: Build, request: BuildRequest, build_log: io.TextIOBase, key_dir: Path,
                presolved: Lock | None = None) -> Lock:
    """Solve ``request`` (unless the spawn's pre-check did: ``presolved``) and keep its lock in ``key_dir``."""
    if presolved is not None:
        build_log.write("solve: the lock of the pre-check before the spawn\n")
        return await _keep_lock(build, presolved, build_log, key_dir, " (solved before the start)")
    await build.publish("solve", 5, f"Solving {plural(len(request.spec.conda), 'conda dependency')}")
    spec = with_kernel_package(request.spec)
    try:
        lock = await resolver.solve(spec, cuda=request.cuda)
    except ResolveError as error:
        build_log.write(f"solve failed: {error}\n")
        if error.details:  # the solver's explanation as it wrote it: a conflict is a tree
            build_log.write(error.details.rstrip() + "\n")
        raise BuildError(f"solve: {error}", phase="solve", cause=str(error).removeprefix("cannot solve: "),
                         unreachable=error.unreachable) from None
    return await _keep_lock(build, lock, build_log, key_dir)


async def _keep_lock(build: Build, lock: Lock, build_log: io.TextIOBase, key_dir: Path, note: str = "") -> Lock:
    lock.write(key_dir / "environment.lock")
    (key_dir / "lock.json").write_text(lock.to_json())
    build_log.write(f"solved: {len(lock.records)} packages, lock digest {lock.digest()}\n")
    await build.publish("solve", 15, f"Solved: {plural(len(lock.records), 'package')}{note}")
    return lock


async def install(resolver: Resolver, build: Build, lock: Lock, context: Path, build_log: io.TextIOBase,
                  prefix: str) -> int:
    """Install ``lock`` into ``context``/env for ``prefix`` in the image; the bytes it holds."""
    missing = resolver.not_in_cache(lock)
    download = sum(record.size or 0 for record in missing)
    await build.publish("install", 20, (f"Downloading {plural(len(missing), 'package')} ({megabytes(download)})"
                                        f" and installing {len(lock.records)}") if missing
                        else f"Installing {plural(len(lock.records), 'package')} from the package cache")
    try:
        size = await resolver.install(lock, context / "env", prefix)
    except ResolveError as error:
        build_log.write(f"install failed: {error}\n")
        if error.no_space:
            raise  # the builder says which folder is full (no_space_error)
        raise BuildError(f"install: {error}", phase="install", cause=str(error).removeprefix("install failed: "),
                         unreachable=error.unreachable) from None
    build_log.write(f"installed into the staging prefix: {size} bytes\n")
    await build.publish("install", 40, f"Installed the conda environment ({megabytes(size)})")
    return size


def settle_mtimes(staged: StagedEnvironment, fallback: int, stats: TreeStats | None = None) -> int:
    """Give each installed file of a package its mtime in the package cache (the package's own,
    as extracted), where the installer copied or rewrote it: so that the byte code a package
    ships, checked by its source's mtime, stays valid, and a package's files are the same bytes
    in a layer whether they were linked or copied. ``fallback`` where the cache's copy is gone.
    How many files it changed. ``stats``: the tree's, for this planning pass (the changed files forgotten)."""
    changed = 0
    root = os.fspath(staged.root)  # str paths: thousands of files, pathlib's joins cost more than the lstat
    lstat = stats if stats is not None else TreeStats(root)
    for package in staged.packages.values():
        for path in package.files:
            if not staged.folders.holds_parent_of(path):
                continue  # never through a package's symlink: the layers leave such a path out too
            status = lstat(path)
            if status is None or not stat.S_ISREG(status.st_mode) or status.st_nlink > 1:
                continue  # a hard link shares the cache's mtime
            try:
                mtime = int(os.lstat(f"{package.extracted}/{path}").st_mtime) if package.extracted else fallback
            except OSError:
                mtime = fallback
            if int(status.st_mtime) != mtime:
                os.utime(f"{root}/{path}", (mtime, mtime), follow_symlinks=False)
                lstat.forget(path)
                changed += 1
    return changed


# What an installed package's conda-meta record says of the hub's own disk: the package-cache
# folder it was linked from. No image needs it, and it would show users the hub's layout and make
# two hubs with different cache folders write different environment layers.
HOST_PATH_FIELDS = ("extracted_package_dir", "package_tarball_full_path", "link")


def drop_host_paths(staged: StagedEnvironment) -> int:
    """Remove :data:`HOST_PATH_FIELDS` from each conda-meta record of ``staged`` (once its
    package-cache folders are no longer needed: after :func:`settle_mtimes`). How many changed."""
    changed = 0
    if not staged.folders.holds("conda-meta"):
        return 0
    for path in sorted((staged.root / "conda-meta").glob("*.json")):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            continue
        record = json.loads(path.read_text())
        kept = {field: value for field, value in record.items() if field not in HOST_PATH_FIELDS}
        if kept != record:
            partial = path.with_name(f".{path.name}.partial")
            partial.write_text(json.dumps(kept))  # compact: indented, json encodes in Python (3x slower)
            os.replace(partial, path)  # replaces a symlink itself, never where it points
            changed += 1
    return changed


SET_ASIDE = ".removing-"  # a built key's staging folder, renamed away while it is removed
# In a set-aside folder: flocked by the process removing it. Not a process id in the name: a hub
# restarted in a container has the same one, and would keep a killed removal's folder forever.
SET_ASIDE_LOCK = ".removing.lock"


def set_aside(context: Path) -> Path:
    """Rename a finished build's staging folder out of its key's way, for removal off the build's
    critical path (thousands of unlinks: about half a second for a data-science environment) by
    :func:`remove_set_aside`. ``context`` itself when it could not be renamed."""
    aside = context.with_name(f"{SET_ASIDE}{os.getpid()}-{time.monotonic_ns()}-{context.name}")  # unique
    try:
        context.rename(aside)
    except OSError:
        return context
    return aside


def is_set_aside(folder: Path) -> bool:
    return folder.name.startswith(SET_ASIDE)


def remove_set_aside(folder: Path) -> bool:
    """Remove a folder :func:`set_aside` renamed, holding its lock file's flock meanwhile (so that
    leftovers.py leaves it to us), the lock file last; False, and nothing removed, when another
    process holds it (it is removing the folder). Whether the folder is gone."""
    lock = folder / SET_ASIDE_LOCK
    try:
        handle = lock.open("a")
    except FileNotFoundError:
        return not folder.exists()
    except OSError:  # not a folder, or not ours to write
        shutil.rmtree(folder, ignore_errors=True)
        return not folder.exists()
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        for entry in os.scandir(folder):
            if entry.name == SET_ASIDE_LOCK:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        lock.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: a sweep took a new lock file since (it removes it)
            folder.rmdir()
    return not folder.exists()


def being_removed(folder: Path) -> bool:
    """Whether a process holds a set-aside folder's lock now (it is removing the folder)."""
    try:  # opened for writing (an exclusive flock over NFS needs it), never created
        descriptor = os.open(folder / SET_ASIDE_LOCK, os.O_WRONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


async def remove_staging(context: Path, settle: bool, log: logging.Logger | logging.LoggerAdapter) -> None:
    """Remove the staging folder. After a failure (``settle``) the installer may still be finishing
    files it had started: remove, then watch until nothing reappears for a second (at most a minute)."""
    deadline = time.monotonic() + 60
    while True:
        await asyncio.to_thread(shutil.rmtree, context, True)
        if not settle:
            return
        await asyncio.sleep(1.0)
        if not context.exists():
            return
        if time.monotonic() > deadline:
            log.warning("Staging folder %s keeps being written to: left behind", context)
            return


async def no_space_error(resolver: Resolver, cache_dir: Path, request: BuildRequest, lock: Lock | None,
                         error: BaseException, log: logging.Logger | logging.LoggerAdapter) -> BuildError:
    """A full disk as the one-line BuildError "no space left in FOLDER (needs about N MB)"."""
    folders = [cache_dir, Path(resolver.package_cache_dir)]
    folder = min(folders, key=free_bytes)  # the fuller of the two (the one that filled up)
    if lock is None:  # full before the solve wrote the lock: solve again for the estimate
        with contextlib.suppress(Exception):
            lock = await resolver.solve(with_kernel_package(request.spec), cuda=request.cuda)
    needed = await asyncio.to_thread(space_needed, resolver, lock, folder, cache_dir) if lock is not None else 0
    cause = f"no space left in {folder}" + (f" (needs about {megabytes(needed)})" if needed else "")
    log.warning("Build of %s: %s: %s", request.display_name, cause, one_line(error))
    return BuildError(cause, phase="disk", cause=cause)


def space_needed(resolver: Resolver, lock: Lock, folder: Path, cache_dir: Path) -> int:
    """About how many bytes an install of ``lock`` writes on ``folder``'s filesystem: downloads and
    unpacked packages in the package cache, and the staged environment (hard links on one filesystem)."""
    cache = Path(resolver.package_cache_dir)
    missing = {id(record) for record in resolver.not_in_cache(lock)}
    downloads = unpacked_missing = unpacked = 0
    for record in lock.records:
        if id(record) in missing:
            downloads += record.size or 0
            unpacked_missing += 3 * (record.size or 0)  # typical unpacked / compressed
            unpacked += 3 * (record.size or 0)
        else:
            unpacked += tree_size(cache / f"{record.name.normalized}-{record.version}-{record.build}")
    folder_device = device(folder)
    needed = 0
    if folder_device == device(cache):
        needed += downloads + unpacked_missing
    if folder_device == device(cache_dir) and device(cache_dir) != device(cache):
        needed += unpacked  # staging on another filesystem than the package cache: copies, not links
    return max(needed, 1_000_000)


def with_kernel_package(spec: EnvironmentSpec) -> EnvironmentSpec:
    """The spec plus ipykernel when neither section has it: every env must run a kernel."""
    names = {MatchSpec(text).name.normalized for text in spec.conda}
    names |= {Requirement(pip_requirement_text(text)).name for text in spec.pip}  # already canonical
    if "ipykernel" in names:
        return spec
    return dataclasses.replace(spec, conda=tuple(sorted((*spec.conda, "ipykernel"))))


def free_bytes(folder: Path) -> int:
    """Free bytes on ``folder``'s filesystem (of its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return 0


def device(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        with contextlib.suppress(OSError):
            return candidate.stat().st_dev
    return -1


def tree_size(root: Path) -> int:
    """Bytes under ``root``, each hard-linked file counted once (staged envs link into the cache)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            info = os.lstat(os.path.join(directory, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total
