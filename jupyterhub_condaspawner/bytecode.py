"""Each package's byte code, compiled once per host and reused by every later build.

An environment image carries ``.pyc`` files (its server's user cannot write
``__pycache__``), compiled by the environment's own Python at the shared in-image prefix
(layers.py). A package's byte code depends only on the package, the compiling Python and
that prefix, and each package is compiled in batches of its own files: so it is the same in
every environment that installs the package. This cache keeps it by the package's identity
(``StagedEnvironment.identities``), beside the package cache, and links it into the next
staged environment that installs the package, which then compiles only what is new.

Only byte code compiled from the source it is filed under is kept, and linked back only beside
that same source: a package can install a symlinked ``__pycache__`` that points into another
package's folder, and unchecked-hash byte code is never checked against its source by Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from . import layers
from .stagedenv import StagedEnvironment, source_of

COMPLETE = "complete"  # in an entry: written last, so that an entry with it is whole; its files' sha256
# 2: ``complete`` holds each file's sha256, checked before the entry is linked; 3: and its source's sha256,
# the source the byte code's header says it was compiled from (entries of 2 could hold another source's);
# 4: ``complete`` is {"files": those records, "from_base_image": the sources whose byte code the build
# took from the base image (not kept: taken from there again)}
ENTRY_FORMAT = "4"
PARTIAL = ".tmp-*"  # an entry keep() is writing: a killed build leaves it (leftovers.py removes old ones)


def cache_directory(bytecode_cache_dir: str, package_cache_dir: str) -> Path:
    """The cache's folder: ``ImageBuilder.bytecode_cache_dir``, else ``condaspawner-bytecode`` in the
    package cache."""
    return Path(bytecode_cache_dir or Path(package_cache_dir) / "condaspawner-bytecode")


class BytecodeCache:
    """Compiled files by package identity under ``directory`` (None: no cache)."""

    def __init__(self, directory: Path | None):
        self.directory = directory

    def restore(self, staged: StagedEnvironment) -> set[str]:
        """Link the cached byte code of the packages ``staged`` into its folder: the staged
        paths of the Python files whose byte code is now there (not to compile again)."""
        done: set[str] = set()
        staging = staged.root
        for key, files in staged.files.items():
            entry = self._entry(staged.identities[key])
            if entry is None:
                continue
            intact = _intact(entry)
            if intact is None:
                continue
            digests, from_base_image = intact
            if not all(_source_digest(staged, path) == record["source"] for path, record in digests.items()):
                continue  # the sources here are not those it was compiled from (another package clobbered one)
            try:
                for cached in digests:
                    staged.folders.make(os.path.dirname(cached))  # never through a package's symlink
                    _replace_with_link(f"{entry}/{cached}", f"{staging}/{cached}")
            except OSError:
                continue  # a partial restore is compiled over
            # The byte code a package ships is not cached: the compile container adopts it, and takes
            # again the base image's byte code of the sources it took it for.
            left = {source_of(path) for path in files} | from_base_image
            done.update(path for path in files if path.endswith(".py") and path not in left)
        return done

    def keep(self, staged: StagedEnvironment, source_hashes: Mapping[str, bytes], packed: Collection[str] = ()
             ) -> None:
        """Keep the byte code compiled in ``staged``'s folder of each package the cache lacks, if each
        of its files' headers has the hash of the source it is filed under: ``source_hashes``, each
        compiled source's (staged path), as the compiling Python hashed it (importlib.util.source_hash,
        which depends on that Python's release: the compile container reports them). The byte code
        in ``packed`` (staged .pyc paths: taken from the base image into a pack, not beside their
        sources) is not kept; each entry names those of its package's sources, which a later build
        leaves to the compile container (it takes their byte code from the base image again)."""
        staging = staged.root
        packed_sources = {source for path in packed if (source := source_of(path)) is not None}
        for key, compiled in layers.compiled_files(staged).items():
            entry = self._entry(staged.identities.get(key, ""))
            if entry is None or entry.exists():
                continue
            partial = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
            try:
                made: set[str] = set()
                digests = {}
                for path in compiled:
                    _link(f"{staging}/{path}", f"{partial}/{path}", made)
                    digests[path] = _checked_record(staged, path, _read(partial / path), source_hashes)
                from_base_image = sorted(packed_sources.intersection(staged.files.get(key, ())))
                (partial / COMPLETE).write_text(json.dumps({"files": digests, "from_base_image": from_base_image},
                                                           sort_keys=True))
                os.rename(partial, entry)  # another build may have kept it first: then ours goes
            except OSError:
                pass
            finally:
                shutil.rmtree(partial, ignore_errors=True)

    def _entry(self, identity: str) -> Path | None:
        if self.directory is None or not identity:
            return None
        key = hashlib.sha256(f"{layers.LAYER_RECIPE}\0{ENTRY_FORMAT}\0{layers.SHARED_PREFIX}\0{identity}".encode()
                             ).hexdigest()
        return self.directory / key


class _NotItsByteCode(OSError):
    """A compiled file's header names another source than the one it is filed under."""


def _checked_record(staged: StagedEnvironment, path: str, pyc: bytes, source_hashes: Mapping[str, bytes]
                    ) -> dict[str, str]:
    """What an entry records of the compiled file ``path`` (staged) whose bytes are ``pyc``: its sha256
    and its source's; _NotItsByteCode if ``pyc`` was not compiled from that source."""
    digest = source_hashes.get(source_of(path) or "")
    source = _read_source(staged, path)
    if digest is None or source is None or not hashed_from(pyc, digest):
        raise _NotItsByteCode(f"{path} was not compiled from its source")
    return {"sha256": hashlib.sha256(pyc).hexdigest(), "source": hashlib.sha256(source).hexdigest()}


def hashed_from(pyc: bytes, digest: bytes) -> bool:
    """Whether ``pyc`` is hash-based byte code of a source whose hash is ``digest``: its 16-byte header
    is the magic number, the flags (1: unchecked-hash, what the compile container writes; 3: checked)
    and that hash."""
    return len(pyc) >= 16 and int.from_bytes(pyc[4:8], "little") in (1, 3) and pyc[8:16] == digest


def _read_source(staged: StagedEnvironment, compiled: str) -> bytes | None:
    """The staged source of the compiled file ``compiled``, or None (none, or not a file in real folders)."""
    source = source_of(compiled)
    if source is None or not staged.folders.holds_parent_of(source):
        return None
    try:
        return _read(staged.root / source)
    except OSError:
        return None


def _source_digest(staged: StagedEnvironment, compiled: str) -> str:
    source = _read_source(staged, compiled)
    return hashlib.sha256(source).hexdigest() if source is not None else ""


def _read(path: Path) -> bytes:
    """The file at ``path``, never through a symlink."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as file:
        return file.read()


def _intact(entry: Path) -> tuple[dict[str, dict[str, str]], set[str]] | None:
    """An entry's files and their records (their sha256 and their sources'), if it is whole and every
    file still has its digest, and the sources it left to the base image; None otherwise. A damaged
    entry (a disk error, a bad copy of the folder) is removed, so that the next build compiles the
    package and keeps it again: never linked into an image."""
    try:
        complete = json.loads((entry / COMPLETE).read_text())
    except FileNotFoundError:
        return None  # not kept yet, or being kept
    except (OSError, ValueError):
        complete = None
    digests = complete.get("files") if isinstance(complete, dict) else None
    from_base_image = complete.get("from_base_image") if isinstance(complete, dict) else None
    if (isinstance(digests, dict) and isinstance(from_base_image, list)
            and all(isinstance(source, str) for source in from_base_image) and set(digests) == set(_files(entry))
            and all(_well_formed(record) and _digest(entry / path) == record["sha256"]
                    for path, record in digests.items())):
        return digests, set(from_base_image)
    shutil.rmtree(entry, ignore_errors=True)
    return None


def _well_formed(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("sha256"), str) and isinstance(record.get("source"), str)


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(_read(path)).hexdigest()  # byte code: kilobytes a file
    except OSError:
        return ""


def _files(entry: Path) -> list[str]:
    return [path for path in layers.tree_paths(entry) if path != COMPLETE]


def _link(source: str, target: str, made: set[str]) -> None:
    """Hard-link ``source`` at ``target`` (replacing it); ``made``: folders known to exist."""
    folder = os.path.dirname(target)
    if folder not in made:
        os.makedirs(folder, exist_ok=True)
        made.add(folder)
    _replace_with_link(source, target)


def _replace_with_link(source: str, target: str) -> None:
    """Hard-link ``source`` at ``target``, replacing what is there (a symlink itself, not where it points)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copyfile(source, target)
