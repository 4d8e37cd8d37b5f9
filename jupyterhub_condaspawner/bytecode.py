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
The byte code the compile container took from the base image (the server's stack, which most
environments' ipykernel shares) is kept as it came, in one pack per entry: a file each would
cost the disk more than its bytes; the layers hold each slice as the .pyc beside its source.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layers
from .stagedenv import PackageKey, StagedEnvironment, source_of

COMPLETE = "complete"  # in an entry: written last, so that an entry with it is whole; its files' sha256
# 2: ``complete`` holds each file's sha256, checked before the entry is linked; 3: and its source's sha256,
# the source the byte code's header says it was compiled from (entries of 2 could hold another source's);
# 4: ``complete`` is {"files": those records, "from_base_image": the sources whose byte code the build
# took from the base image (not kept: taken from there again)}; 5: {"files": ..., "packed": the records of
# the byte code taken from the base image, each with its slice of the entry's PACK (offset, size)}
ENTRY_FORMAT = "5"
PACK = "from-base-image.pack"  # in an entry: the byte code taken from the base image, one slice each
PARTIAL = ".tmp-*"  # an entry keep() is writing: a killed build leaves it (leftovers.py removes old ones)


def cache_directory(bytecode_cache_dir: str, package_cache_dir: str) -> Path:
    """The cache's folder: ``ImageBuilder.bytecode_cache_dir``, else ``condaspawner-bytecode`` in the
    package cache."""
    return Path(bytecode_cache_dir or Path(package_cache_dir) / "condaspawner-bytecode")


Slice = tuple[Path, int, int]  # byte code in a pack: the pack, where it starts, its size


@dataclass
class Restored:
    """What :meth:`BytecodeCache.restore` gave a staged environment: the staged paths of the Python
    files whose byte code is there (not to compile again), linked beside them or, for the byte code
    taken from the base image, in ``packed``: by staged .pyc path, the slice that holds it (for
    layers.ByteCodePlacer)."""

    done: set[str] = field(default_factory=set)
    packed: dict[str, Slice] = field(default_factory=dict)


class BytecodeCache:
    """Compiled files by package identity under ``directory`` (None: no cache)."""

    def __init__(self, directory: Path | None):
        self.directory = directory

    def restore(self, staged: StagedEnvironment) -> Restored:
        """Link the cached byte code of the packages ``staged`` into its folder, and name the slices
        of the byte code kept packed."""
        restored = Restored()
        staging = staged.root
        for key, files in staged.files.items():
            entry = self._entry(staged.identities[key])
            if entry is None:
                continue
            intact = _intact(entry)
            if intact is None:
                continue
            digests, slices = intact
            if not all(_source_digest(staged, path) == record["source"]
                       for path, record in [*digests.items(), *slices.items()]):
                continue  # the sources here are not those it was compiled from (another package clobbered one)
            if not all(staged.folders.can_hold(os.path.dirname(path)) for path in slices):
                continue  # compiled over: no byte code goes through a package's symlink
            try:
                for cached in digests:
                    staged.folders.make(os.path.dirname(cached))  # never through a package's symlink
                    _replace_with_link(f"{entry}/{cached}", f"{staging}/{cached}")
            except OSError:
                continue  # a partial restore is compiled over
            restored.packed.update({path: (entry / PACK, record["offset"], record["size"])
                                    for path, record in slices.items()})
            # The byte code a package ships is not cached: the compile container adopts it.
            left = {source_of(path) for path in files}
            restored.done.update(path for path in files if path.endswith(".py") and path not in left)
        return restored

    def keep(self, staged: StagedEnvironment, source_hashes: Mapping[str, bytes],
             packed: Mapping[str, Slice] | None = None) -> None:
        """Keep the byte code compiled in ``staged``'s folder of each package the cache lacks, and the
        byte code ``packed`` (compilerun.CompileRun.every_packed's: taken from the base image, by staged
        .pyc path), if each file's header has the hash of the source it is filed under:
        ``source_hashes``, each compiled source's (staged path), as the compiling Python hashed it
        (importlib.util.source_hash, which depends on that Python's release: the compile container
        reports them)."""
        staging = staged.root
        compiled_by_package = layers.compiled_files(staged)
        packed_by_package = _by_package(staged, packed or {})
        for key in sorted({*compiled_by_package, *packed_by_package}):
            entry = self._entry(staged.identities.get(key, ""))
            if entry is None or entry.exists():
                continue
            partial = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
            try:
                partial.mkdir(parents=True)
                made: set[str] = {str(partial)}
                digests = {}
                for path in compiled_by_package.get(key, []):
                    _link(f"{staging}/{path}", f"{partial}/{path}", made)
                    digests[path] = _checked_record(staged, path, _read(partial / path), source_hashes)
                slices = _write_pack(staged, packed_by_package.get(key, {}), partial, source_hashes)
                (partial / COMPLETE).write_text(json.dumps({"files": digests, "packed": slices}, sort_keys=True))
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


def _by_package(staged: StagedEnvironment, packed: Mapping[str, Slice]) -> dict[PackageKey, dict[str, Slice]]:
    """``packed`` by the package of each .pyc's source."""
    grouped: dict[PackageKey, dict[str, Slice]] = {}
    for path, place in packed.items():
        owner = staged.source_owners.get(source_of(path) or "")
        if owner is not None:
            grouped.setdefault(owner, {})[path] = place
    return grouped


def _write_pack(staged: StagedEnvironment, packed: Mapping[str, Slice], partial: Path,
                source_hashes: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    """The slices ``packed`` (one package's) copied into the entry's PACK, in ``partial``: their
    records (_checked_record's, with the offset and size of each slice there); none, no pack."""
    slices: dict[str, dict[str, Any]] = {}
    if not packed:
        return slices
    with open(partial / PACK, "wb") as out:
        for path, (pack, offset, size) in sorted(packed.items()):
            pyc = _read_slice(pack, offset, size)
            slices[path] = {**_checked_record(staged, path, pyc, source_hashes), "offset": out.tell(), "size": size}
            out.write(pyc)
    return slices


def _read_slice(pack: Path, offset: int, size: int) -> bytes:
    """``size`` bytes of ``pack`` from ``offset``; OSError if it holds fewer."""
    handle = os.open(pack, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        data = os.pread(handle, size, offset)
    finally:
        os.close(handle)
    if len(data) != size:
        raise OSError(f"{pack} holds no {size} bytes at {offset}")
    return data


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


def _intact(entry: Path) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, Any]]] | None:
    """An entry's files and their records (their sha256 and their sources'), and its packed byte
    code's (with their slices of its PACK), if it is whole and every file and slice still has its
    digest; None otherwise. A damaged entry (a disk error, a bad copy of the folder) is removed, so
    that the next build compiles the package and keeps it again: never linked into an image."""
    try:
        complete = json.loads((entry / COMPLETE).read_text())
    except FileNotFoundError:
        return None  # not kept yet, or being kept
    except (OSError, ValueError):
        complete = None
    digests = complete.get("files") if isinstance(complete, dict) else None
    slices = complete.get("packed") if isinstance(complete, dict) else None
    if (isinstance(digests, dict) and isinstance(slices, dict) and set(digests) == set(_files(entry))
            and all(_well_formed(record) and _digest(entry / path) == record["sha256"]
                    for path, record in digests.items())
            and _slices_intact(entry, slices)):
        return digests, slices
    shutil.rmtree(entry, ignore_errors=True)
    return None


def _slices_intact(entry: Path, slices: dict[str, Any]) -> bool:
    """Whether each slice's record is well formed and its bytes in the entry's PACK have its digest."""
    if not slices:
        return not (entry / PACK).exists()
    try:
        pack = _read(entry / PACK)
    except OSError:
        return False
    return all(_well_formed(record) and isinstance(record.get("offset"), int) and isinstance(record.get("size"), int)
               and 0 <= record["offset"] and 0 < record["size"] and record["offset"] + record["size"] <= len(pack)
               and hashlib.sha256(pack[record["offset"]:record["offset"] + record["size"]]).hexdigest() == record["sha256"]
               for record in slices.values())


def _well_formed(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("sha256"), str) and isinstance(record.get("source"), str)


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(_read(path)).hexdigest()  # byte code: kilobytes a file
    except OSError:
        return ""


def _files(entry: Path) -> list[str]:
    return [path for path in layers.tree_paths(entry) if path not in (COMPLETE, PACK)]


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
