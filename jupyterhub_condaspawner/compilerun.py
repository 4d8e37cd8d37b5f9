"""Byte-compiling a staged environment in a container while its layers load.

The container (the base image, the staging folder mounted at the shared prefix, no network)
compiles batch after batch in the order of the layers and leaves a marker file for each one
done. The loader writes a package's layer as soon as that package's batches are done, so
compiling the next packages overlaps with Docker writing this one: compiling is CPU work,
writing a layer is mostly the disk's.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
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
        prefix = layers.SHARED_PREFIX + "/"
        for index in range(self.count):
            try:
                reported = json.loads((self.done_dir / str(index)).read_text())
                hashes.update({path.removeprefix(prefix): bytes.fromhex(digest) for path, digest in reported.items()
                               if path.startswith(prefix)})
            except (OSError, ValueError, AttributeError, TypeError):
                continue
        return hashes

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


def remove_container(container: Any) -> None:
    """Remove a compile container, running or not; nothing if it is gone already (or its daemon)."""
    try:
        container.remove(force=True)
    except Exception:  # gone already, or with its daemon: nothing left to remove
        pass


def remove_in_background(container: Any) -> None:
    """:func:`remove_container` in a thread of its own: a failed build does not wait for it."""
    threading.Thread(target=remove_container, args=(container,), daemon=True).start()


def layer_preparer(run: CompileRun, staged: StagedEnvironment, plan: list[layers.Layer]
                   ) -> Callable[[layers.Layer], layers.Layer]:
    """What :func:`imageload.load_image` calls before writing each layer (planned before compiling):
    a package's layer, or a small packages' one, waits for its own batches, the environment's
    (which holds what no package claims) for every batch; each then gets the byte code
    compiled (or restored from the cache) for its own sources."""
    placer = layers.ByteCodePlacer(staged)
    planned = {layer.name for layer in plan}

    def prepare(layer: layers.Layer) -> layers.Layer:
        if layer.name not in planned:
            return layer  # the kernel's files
        if layer.name == layers.ENVIRONMENT:
            run.wait_for(range(run.count))
        elif layer.name in run.batches_of:
            run.wait_for(run.batches_of[layer.name])
        return placer.layer_with_byte_code(layer)

    return prepare
