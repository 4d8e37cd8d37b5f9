"""Byte-compiling a staged environment in a container while its layers load.

The container (the base image, the staging folder mounted at the shared prefix, no network)
compiles batch after batch in the order of the layers and leaves a marker file for each one
done. The loader writes a package's layer as soon as that package's batches are done, so
compiling the next packages overlaps with Docker writing this one: compiling is CPU work,
writing a layer is mostly the disk's.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from . import layers
from .stagedenv import StagedEnvironment

POLL_S = 0.02


class CompileFailed(OSError):
    """The compile container ended before compiling a batch a layer waits for."""


class CompileRun:
    """A started compile container and its batches: ``jobs`` is :func:`layers.compile_plan`'s list,
    its markers appear in ``done_dir`` (one per batch, named by its index)."""

    def __init__(self, container: Any, done_dir: Path, jobs: list[tuple[str, list[str]]]):
        self.container = container
        self.done_dir = done_dir
        self.count = len(jobs)
        self.batches_of: dict[str, list[int]] = {}
        for index, (layer_name, _) in enumerate(jobs):
            self.batches_of.setdefault(layer_name, []).append(index)
        self.status: dict[str, Any] = {}
        self.markers: dict[int, dict[str, Any]] = {}  # each done batch's marker, once read
        self.failed: CompileFailed | None = None  # why a layer could not wait for its batches
        self.complete = False  # it exited with every batch done
        self.exited = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        try:
            self.status = dict(self.container.wait())
        except Exception as error:  # the daemon went away: the loader stops waiting
            self.status = {"StatusCode": -1, "Error": str(error)}
        self.complete = self.status.get("StatusCode") == 0 and all(
            (self.done_dir / str(index)).exists() for index in range(self.count))
        self.exited.set()

    def wait_for(self, indices: Iterable[int]) -> None:
        for index in indices:
            marker = self.done_dir / str(index)
            while not marker.exists():
                if self.exited.is_set() and not marker.exists():
                    self.failed = CompileFailed(f"the compile container ended (status {self.status.get('StatusCode')}) "
                                                f"before batch {index} of {self.count}")
                    raise self.failed
                time.sleep(POLL_S)

    def source_hashes(self) -> dict[str, bytes]:
        """The hash of each source compiled (as its Python hashed it, by staged path: below the shared
        prefix), from the batches' markers; those of a marker that cannot be read are left out."""
        hashes: dict[str, bytes] = {}
        for index in range(self.count):
            reported = self._marker(index).get("hashes")
            if isinstance(reported, dict):
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    hashes.update({staged: bytes.fromhex(digest) for path, digest in reported.items()
                                   if (staged := _staged_path(path)) is not None})
        return hashes

    def packed(self, indices: Iterable[int]) -> dict[str, tuple[Path, int, int]]:
        """The byte code the batches ``indices`` (done) packed, taken from the base image: by staged
        path of each .pyc, its pack and the slice of it (offset, size) that holds its bytes."""
        packed: dict[str, tuple[Path, int, int]] = {}
        for index in indices:
            slices = self._marker(index).get("packed")
            if not isinstance(slices, dict):
                continue
            for path, place in slices.items():
                staged = _staged_path(path)
                if (staged is not None and isinstance(place, list) and len(place) == 2
                        and all(isinstance(number, int) and number >= 0 for number in place)):
                    packed[staged] = (self.done_dir / f"{index}.pack", place[0], place[1])
        return packed

    def every_packed(self) -> dict[str, tuple[Path, int, int]] | None:
        """:meth:`packed` of every batch; None if a marker cannot be read (it may have packed some)."""
        if any(not self._marker(index) for index in range(self.count)):
            return None
        return self.packed(range(self.count))

    def _marker(self, index: int) -> dict[str, Any]:
        """What a done batch's marker says ({} if it cannot be read), remembered once read: the
        folder goes with the compile's end, and the byte-code cache asks after that."""
        if index in self.markers:
            return self.markers[index]
        try:
            reported = json.loads((self.done_dir / str(index)).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(reported, dict):
            return {}
        self.markers[index] = reported
        return reported

    def abandon(self) -> None:
        """Stop and remove the container in the background: the build that started it has ended."""
        remove_in_background(self.container)

    def finish(self) -> tuple[dict[str, Any], str]:
        """Its exit status and output, once it ended; the container is removed."""
        try:
            self.exited.wait()
            return self.status, self.container.logs().decode(errors="replace")
        finally:
            self._remove()

    def _remove(self) -> None:
        remove_container(self.container)


def _staged_path(path: str) -> str | None:
    """A path the compile container names (in the image) as a staged one, if below the shared prefix."""
    prefix = layers.SHARED_PREFIX + "/"
    return path.removeprefix(prefix) if path.startswith(prefix) else None


def remove_container(container: Any) -> None:
    """Remove a compile container, running or not; nothing if it is gone already (or its daemon)."""
    try:
        container.remove(force=True)
    except Exception:  # gone already, or with its daemon: nothing left to remove
        pass


def remove_in_background(container: Any) -> None:
    """:func:`remove_container` in a thread of its own: a failed build does not wait for it."""
    threading.Thread(target=remove_container, args=(container,), daemon=True).start()


def layer_preparer(run: CompileRun, staged: StagedEnvironment, plan: list[layers.Layer],
                   cached: Mapping[str, tuple[Path, int, int]] | None = None) -> Callable[[layers.Layer], layers.Layer]:
    """What :func:`imageload.load_image` calls before writing each layer (planned before compiling):
    a package's layer, or a small packages' one, waits for its own batches, the environment's
    (which holds what no package claims) for every batch; each then gets the byte code
    compiled (or restored from the cache: linked, or ``cached``'s slices) for its own sources."""
    placer = layers.ByteCodePlacer(staged)
    planned = {layer.name for layer in plan}

    def prepare(layer: layers.Layer) -> layers.Layer:
        if layer.name not in planned:
            return layer  # the kernel's files
        batches = range(run.count) if layer.name == layers.ENVIRONMENT else run.batches_of.get(layer.name, [])
        run.wait_for(batches)
        return placer.layer_with_byte_code(layer, {**(cached or {}), **run.packed(batches)})

    return prepare
