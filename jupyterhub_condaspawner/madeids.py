"""What a key's builds made on the Docker daemon, as the builder learnt it from Docker:
``builds/<key>/made.json``, the only source leftovers.py removes containers and images by.

Not the build log: it carries a pip step's output verbatim, which a package's build code
writes, and so could name any container (the hub's own). The builder adds each id as soon
as it knows it, so that a killed build leaves what it had; each write is whole (a temporary
file renamed over the last).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

MADE = "made.json"
COMPILE_LABEL = "io.condaspawner.compile"  # on a compile container: the key of the build that started it


@dataclass(frozen=True)
class Made:
    """Full ids (images without ``sha256:``) of what a key's builds made."""

    containers: tuple[str, ...] = ()  # the docker build's step containers, each made from an image of the build
    compilers: tuple[str, ...] = ()  # the layered route's compile containers (labelled COMPILE_LABEL=key)
    images: tuple[str, ...] = ()  # step images, the loaded image and its stages' images
    removed: tuple[str, ...] = ()  # stages' images the load removed itself
    replaced: tuple[str, ...] = ()  # the image a rebuild replaced (kept while a server ran it)

    def __bool__(self) -> bool:
        return any(astuple(self))


KINDS = tuple(kind.name for kind in fields(Made))
_writing = threading.Lock()  # a build adds from several threads (the compile start, the load's stages)


def read(key_dir: Path) -> Made:
    """What ``key_dir``'s made.json lists (nothing if it is missing or unreadable)."""
    try:
        data = json.loads((key_dir / MADE).read_text())
    except (OSError, ValueError):
        return Made()
    if not isinstance(data, dict):
        return Made()
    lists = {kind: data.get(kind) for kind in KINDS}
    return Made(**{kind: tuple(item for item in value if isinstance(item, str))
                   for kind, value in lists.items() if isinstance(value, list)})


def add(key_dir: Path, **ids: Iterable[str]) -> None:
    """Add ids of the kinds named (``images=[...]``, see :class:`Made`) to ``key_dir``'s made.json."""
    unknown = set(ids) - set(KINDS)
    if unknown:
        raise ValueError(f"not a kind of made.json: {sorted(unknown)}")
    new = {kind: [bare(item) for item in ids.get(kind, ())] for kind in KINDS}
    if not any(new.values()):
        return
    with _writing:
        made = read(key_dir)
        _write(key_dir, {kind: list(dict.fromkeys([*getattr(made, kind), *new[kind]])) for kind in KINDS})


def start(key_dir: Path) -> None:
    """A new build of the key: what the last one made is forgotten (the sweep before it removed
    what it could), but for a replaced image, which goes once no server runs it."""
    with _writing:
        _write(key_dir, {"replaced": list(read(key_dir).replaced)})


def bare(docker_id: str) -> str:
    """An image id without ``sha256:`` (as container ids are)."""
    return docker_id.removeprefix("sha256:")


def _write(key_dir: Path, data: dict[str, list[str]]) -> None:
    handle, temporary = tempfile.mkstemp(dir=key_dir, prefix=f".{MADE}.")
    try:
        with os.fdopen(handle, "w") as out:
            os.fchmod(out.fileno(), 0o644)  # as written directly: the admin's `condaspawner gc` reads it too
            out.write(json.dumps({kind: ids for kind, ids in data.items() if ids}, indent=1) + "\n")
        os.replace(temporary, key_dir / MADE)
    finally:
        Path(temporary).unlink(missing_ok=True)  # a full disk: no half-written file stays
