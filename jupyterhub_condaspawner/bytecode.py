"""Each package's byte code, compiled once per host and reused by every later build.

An environment image carries ``.pyc`` files (its server's user cannot write
``__pycache__``), compiled by the environment's own Python at the shared in-image prefix
(layers.py). A package's byte code depends only on the package, the compiling Python and
that prefix, and each package is compiled in batches of its own files: so it is the same in
every environment that installs the package. This cache keeps it by the package's identity
(``StagedEnvironment.identities``), beside the package cache, and links it into the next
staged environment that installs the package, which then compiles only what is new.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from . import layers
from .stagedenv import StagedEnvironment, source_of

COMPLETE = "complete"  # in an entry: written last, so that an entry with it is whole; its files' sha256
ENTRY_FORMAT = "2"  # 2: ``complete`` holds each file's sha256, checked before the entry is linked


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
            digests = _intact(entry)
            if digests is None:
                continue
            try:
                for cached in digests:
                    staged.folders.make(os.path.dirname(cached))  # never through a package's symlink
                    _replace_with_link(f"{entry}/{cached}", f"{staging}/{cached}")
            except OSError:
                continue  # a partial restore is compiled over
            # The byte code a package ships is not cached: the compile container adopts it.
            shipped = {source_of(path) for path in files}
            done.update(path for path in files if path.endswith(".py") and path not in shipped)
        return done

    def keep(self, staged: StagedEnvironment) -> None:
        """Keep the byte code compiled in ``staged``'s folder of each package the cache lacks."""
        staging = staged.root
        for key, compiled in layers.compiled_files(staged).items():
            entry = self._entry(staged.identities.get(key, ""))
            if entry is None or entry.exists():
                continue
            partial = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
            try:
                made: set[str] = set()
                for path in compiled:
                    _link(f"{staging}/{path}", f"{partial}/{path}", made)
                digests = {path: _digest(partial / path) for path in compiled}
                (partial / COMPLETE).write_text(json.dumps(digests, sort_keys=True))
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


def _intact(entry: Path) -> dict[str, str] | None:
    """An entry's files and their sha256, if it is whole and every file still has its digest;
    None otherwise. A damaged entry (a disk error, a bad copy of the folder) is removed, so
    that the next build compiles the package and keeps it again: never linked into an image."""
    try:
        digests = json.loads((entry / COMPLETE).read_text())
    except FileNotFoundError:
        return None  # not kept yet, or being kept
    except (OSError, ValueError):
        digests = None
    if (isinstance(digests, dict) and set(digests) == set(_files(entry))
            and all(_digest(entry / path) == digest for path, digest in digests.items())):
        return digests
    shutil.rmtree(entry, ignore_errors=True)
    return None


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()  # byte code: kilobytes a file
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
