"""What failed or killed builds of THIS installation left behind, found and removed.

A build that fails or is killed (its process, or the Docker daemon under it) can leave
stopped build-step containers, untagged step images (or the image the layered route
loaded, before its tag), its staging folder, ``.pkg-*`` temporaries in the package
cache, and (a daemon killed mid-step) a step's process still running under an orphaned
containerd shim. The daemon and the package cache may be shared
with other hubs and test runs, so nothing is chosen by its look alone:

- containers and images: only those the builder kept in this cache folder's made.json files
  (madeids.py: what it learnt from Docker, never from a build log, which a package's build
  code writes into) of keys whose build no process runs now (nobody holds the key's lock): a
  step container once it stopped or is older than ``build_timeout``, a compile container
  once it stopped, or running if it carries the key's label; images untagged and unused, and
  the old image a rebuild replaced while a server ran it once no container uses it (a key's
  made.json is read again until then);
- staging folders: this cache folder's, of keys nobody holds the lock of, and those a
  finished build set aside for removal that no process is removing (holds the flock of);
- ``.pkg-*`` temporaries in the package cache and ``.tmp-*`` entries in the byte-code cache:
  older than ``build_timeout`` (no install or build still writes them);
- processes: a shim whose container id a made.json names, once its container is gone.

A key's containers, images, processes and staging folder go only while :func:`remove` holds
the key's build lock (never waiting for it): a build of the key that started after
:func:`find` looked keeps them.

:func:`sweep` runs when a build starts (it never fails the build); ``ImageBuilder.gc`` uses
:func:`find` and :func:`remove` and reports what went.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker.errors
import psutil

from . import bytecode, madeids, staging
from .buildrecords import lock_held, lock_if_free

if TYPE_CHECKING:
    from .builder import ImageBuilder


SWEPT = "swept"  # in a key's cache folder: what its made.json names is gone (mtime: when)
PACKAGE_TEMPORARY = ".pkg-*"


@dataclass
class Leftovers:
    """What :func:`find` found: ``containers`` and ``images`` by id (full ids, images without
    ``sha256:``), ``staging`` and ``temporaries`` with their bytes, ``processes`` (pid -> container id)."""

    containers: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    staging: dict[Path, int] = field(default_factory=dict)
    temporaries: dict[Path, int] = field(default_factory=dict)
    processes: dict[int, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # whose made.json was read (marked swept once all went)
    busy_keys: set[str] = field(default_factory=set)  # a container still uses one of their images: read again
    notes: list[str] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)  # container or image id -> the key whose build made it
    own_key: str = ""  # find's: a key whose lock the caller holds

    def __bool__(self) -> bool:
        return bool(self.containers or self.images or self.staging or self.temporaries or self.processes)


def _unused_keys(builder: ImageBuilder, own_key: str) -> list[str]:
    """Keys with a made.json not yet swept, whose build no process runs now (``own_key``: ours)."""
    keys = []
    for path in sorted((Path(builder.cache_dir) / "builds").glob(f"*/{madeids.MADE}")):
        key_dir = path.parent
        with contextlib.suppress(OSError):
            swept = key_dir / SWEPT
            if swept.exists() and swept.stat().st_mtime >= path.stat().st_mtime:
                continue
            if key_dir.name == own_key or not lock_held(key_dir / "build.lock"):
                keys.append(key_dir.name)
    return keys


def find(builder: ImageBuilder, own_key: str = "") -> Leftovers:
    """What earlier builds of this installation left (see the module docstring); ``own_key``: a key
    whose lock this process holds, about to be built again."""
    found = Leftovers(own_key=own_key)
    cutoff = time.time() - builder.build_timeout
    made = {}
    for key in _unused_keys(builder, own_key):
        found.keys.append(key)
        made[key] = madeids.read(builder.key_dir(key))
    if any(made.values()):
        _find_on_daemon(builder, made, cutoff, found)  # the daemon is asked only when a made.json names something
    for folder in _unused_staging(builder, own_key):
        found.staging[folder] = _tree_size(folder)
    package_cache = Path(builder.resolver.package_cache_dir)
    bytecode_cache = bytecode.cache_directory(builder.bytecode_cache_dir, builder.resolver.package_cache_dir)
    for temporary in [*package_cache.glob(PACKAGE_TEMPORARY), *bytecode_cache.glob(bytecode.PARTIAL)]:
        with contextlib.suppress(OSError):
            if temporary.lstat().st_mtime < cutoff:
                found.temporaries[temporary] = _tree_size(temporary)
    return found


def _find_on_daemon(builder: ImageBuilder, made: dict[str, madeids.Made], cutoff: float, found: Leftovers) -> None:
    """The containers, images and orphaned step processes of the keys' ``made`` that are leftovers."""
    client = builder.client
    base_id = ""
    with contextlib.suppress(docker.errors.DockerException):
        base_id = client.images.get(builder.base_image).id
    # a step image something is built on, or a container runs, is no leftover (yet): removing the
    # step above it prunes it
    parents = {image.get("ParentId") for image in client.api.images(all=True)}
    used = {container.get("ImageID") for container in client.api.containers(all=True)}
    local = str(builder.daemon_url).startswith(("unix://", "the default socket"))
    for key, ids in made.items():
        found.owners.update({item: key for item in [*ids.containers, *ids.compilers, *ids.images, *ids.replaced]})
        for container in [*ids.containers, *ids.compilers]:
            try:
                attrs = client.api.inspect_container(container)
            except docker.errors.NotFound:
                if local:  # only a daemon on this host has its shims in our /proc
                    found.processes.update({pid: container for pid in orphan_processes(container)})
                continue
            if _left_running(attrs, key, container in ids.compilers, cutoff):
                found.containers.append(container)
                if local and not attrs.get("State", {}).get("Running"):
                    # A daemon killed mid-step comes back with the step "exited" and its shim still
                    # running it: removing the container leaves that process behind.
                    found.processes.update({pid: container for pid in orphan_processes(container)})
        for image in dict.fromkeys([*ids.images, *ids.replaced]):
            if image in ids.removed:
                continue
            try:
                attrs = client.api.inspect_image(image)
            except docker.errors.NotFound:
                continue
            if attrs.get("RepoTags") or attrs.get("Id") in (parents | {base_id}):
                continue
            if attrs.get("Id") not in used or any(attrs.get("Id") == _image_of(client, c) for c in found.containers):
                found.images.append(image)
            else:
                found.busy_keys.add(key)


def _left_running(attrs: dict[str, Any], key: str, compiler: bool, cutoff: float) -> bool:
    """Whether a container of ``key``'s builds is a leftover: stopped; or a compile container that
    carries the key's label (of use only to its build, which no process runs now: it waits up to
    COMPILE_WAIT_S for batches that never come); or a step container older than ``build_timeout``."""
    if not attrs.get("State", {}).get("Running"):
        return True
    if compiler:
        return (attrs.get("Config", {}).get("Labels") or {}).get(madeids.COMPILE_LABEL) == key
    return (_created(attrs) or time.time()) < cutoff


def _unused_staging(builder: ImageBuilder, own_key: str) -> list[Path]:
    """Staging folders of keys nobody builds now, and those a finished build set aside that no
    process is removing (it stopped before it had removed them)."""
    unused = []
    for path in sorted((Path(builder.cache_dir) / "staging").glob("*")):
        if staging.is_set_aside(path):
            if not staging.being_removed(path):
                unused.append(path)
        elif not _is_key(path.name):
            continue  # not a build's: not ours to remove
        elif path.name == own_key or not lock_held(builder.key_dir(path.name) / "build.lock"):
            unused.append(path)
    return unused


def remove(builder: ImageBuilder, found: Leftovers) -> Leftovers:
    """Remove what :func:`find` found; what went (notes say what stayed and why). A key's
    containers, images and staging folder go under its build lock, or stay if a build holds it."""
    gone = Leftovers(keys=found.keys, busy_keys=found.busy_keys, owners=found.owners, own_key=found.own_key)
    building = set()
    for key in _keys_of(found):
        with _build_lock(builder, key, found.own_key) as free:
            if not free:  # a build of the key started since find looked: all of it is that build's
                building.add(key)
                continue
            _remove_of_key(builder, found, key, gone)
    for folder, size in found.staging.items():
        if staging.is_set_aside(folder) and staging.remove_set_aside(folder):  # no key's: nobody builds in it
            gone.staging[folder] = size
    for temporary, size in found.temporaries.items():
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        if not temporary.exists():
            gone.temporaries[temporary] = size
    if not gone.notes:
        for key in set(found.keys) - found.busy_keys - building:
            with contextlib.suppress(OSError):
                (builder.key_dir(key) / SWEPT).touch()
    return gone


def _keys_of(found: Leftovers) -> list[str]:
    """The keys whose builds made something :func:`find` found (staging folders included)."""
    keys = dict.fromkeys(found.owners[item] for item in [*found.containers, *found.images] if item in found.owners)
    keys.update(dict.fromkeys(found.owners[c] for c in found.processes.values() if c in found.owners))
    keys.update(dict.fromkeys(key for folder in found.staging if (key := _key_of_folder(folder)) is not None))
    return list(keys)


@contextlib.contextmanager
def _build_lock(builder: ImageBuilder, key: str, own_key: str) -> Iterator[bool]:
    """The key's build lock held for the block if free (True); ``own_key``'s is the caller's already."""
    if key == own_key:
        yield True
        return
    with lock_if_free(builder.key_dir(key) / "build.lock") as free:
        yield free


def _remove_of_key(builder: ImageBuilder, found: Leftovers, key: str, gone: Leftovers) -> None:
    """Remove what ``key``'s builds left (its build lock held): containers, then images, processes, staging."""
    containers = [container for container in found.containers if found.owners.get(container) == key]
    images = [image for image in found.images if found.owners.get(image) == key]
    if containers or images:
        _remove_on_daemon(builder.client, containers, images, gone)
    for pid, container in found.processes.items():
        if found.owners.get(container) == key:
            _kill_step(pid)
            gone.processes[pid] = container
    for folder, size in found.staging.items():
        if _key_of_folder(folder) == key:
            _remove_folder(folder, size, gone)


def _remove_on_daemon(client: docker.DockerClient, containers: list[str], images: list[str], gone: Leftovers) -> None:
    for container in containers:
        try:
            client.api.remove_container(container, force=True)
            gone.containers.append(container)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as error:
            gone.notes.append(f"kept the build container {container}: {_explain(error)}")
    for image in images:
        try:
            if client.api.inspect_image(image).get("RepoTags"):
                continue  # tagged since find looked: a build of the key made the same image (a layered load)
            client.images.remove(image, noprune=False)
            gone.images.append(image)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError:
            pass  # a later step (or another image) is built on it: removing that prunes this one


def _kill_step(pid: int) -> None:
    """The step's process first (pid 1 of its namespace: the namespace goes with it), then its shim."""
    with contextlib.suppress(psutil.Error):
        shim = psutil.Process(pid)
        for process in [*shim.children(), shim]:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _remove_folder(folder: Path, size: int, gone: Leftovers) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if not folder.exists():
        gone.staging[folder] = size


def _key_of_folder(folder: Path) -> str | None:
    """The key a staging folder belongs to; None for one a finished build set aside."""
    return None if staging.is_set_aside(folder) else folder.name


def _is_key(name: str) -> bool:
    return bool(name) and all(char in "0123456789abcdef" for char in name)


def sweep(builder: ImageBuilder, own_key: str = "") -> Leftovers:
    """Find and remove the leftovers of earlier builds; never raises (a build must not fail for it)."""
    # The builder's log is the hub's: a logger of this module reaches no handler of JupyterHub's.
    try:
        gone = remove(builder, find(builder, own_key))
    except Exception as error:  # the daemon is unreachable: the build says so itself
        builder.log.warning("Could not remove what earlier builds left: %s", error)
        return Leftovers()
    if gone:
        builder.log.info("Removed what earlier builds left: %s", describe(gone))
    return gone


def describe(gone: Leftovers) -> str:
    """One line: how many of each kind."""
    parts = [f"{len(items)} {noun}" for items, noun in (
        (gone.containers, "build container(s)"), (gone.images, "untagged step image(s)"),
        (gone.staging, "staging folder(s)"), (gone.temporaries, "cache temporaries"),
        (gone.processes, "orphaned step process(es)")) if items]
    return ", ".join(parts) or "nothing"


def orphan_processes(container: str) -> list[int]:
    """Shims on this host of a container the daemon no longer knows (it was killed mid-step): their
    pids. A shim names the full container id in its command line (``-id ID``), a log the first 12
    characters."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        words = process.info["cmdline"] or []
        if not words or "containerd-shim" not in words[0]:
            continue
        ids = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-id"]
        if any(value.startswith(container) for value in ids):
            pids.append(process.pid)
    return pids


def _image_of(client: docker.DockerClient, container: str) -> str:
    try:
        return str(client.api.inspect_container(container).get("Image", ""))
    except docker.errors.DockerException:
        return ""


def _created(attrs: dict) -> float | None:
    """When Docker says it created the object (RFC 3339, nanoseconds, "Z"), as a Unix time, or None."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", str(attrs.get("Created", "")))
    if not match:
        return None
    zone = match.group(3) or "Z"
    return datetime.fromisoformat(match.group(1) + ("+00:00" if zone == "Z" else zone)).timestamp()


def _explain(error: docker.errors.APIError) -> str:
    return " ".join(str(error.explanation or error).split())


def _tree_size(root: Path) -> int:
    return staging.tree_size(root) if root.is_dir() else (root.lstat().st_size if root.exists() else 0)
