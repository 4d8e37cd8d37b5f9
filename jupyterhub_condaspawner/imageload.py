"""Loading an environment's layers into Docker as ``docker load`` archives, in stages.

Docker's graph-driver store loads an archive in two passes: it unpacks the whole archive
into a temporary folder first, and only when the archive has ended does it register its
layers, one after another. In one archive, registering (about as long as writing the
bytes once) would wait for the last layer to be sent. So the layers go in *stages*, each
its own archive: stage k carries the layers sent since stage k-1 (placeholders for the
ones below), and its end (config and manifest) is held back until stage k-1's load has
finished, so that Docker finds those layers registered and reads only stage k's. Docker
registers stage k-1 while stage k's bytes arrive. Each stage but the last makes an image
of the layers so far (with a label of its own, so that no two builds share it), which is
removed once the whole image is loaded; the last stage makes the image.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import threading
import uuid
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .layers import Layer, LayerMemo, chain_ids, image_config, members_size, next_chain, stream_tar, tar_members

# A stage ends after a sent layer at least this big: a smaller one costs Docker less to
# register than a load's own overhead saves.
STAGE_MIN_BYTES = 16 * 1024 * 1024
PARTIAL_LABEL = "org.jupyter.condaspawner.partial"  # an image of the layers so far, removed after the load


@dataclass
class LoadResult:
    """What loading an image did: its id, and each layer's diff id, size and whether it was sent."""

    image_id: str = ""
    layers: list[tuple[str, str, int, bool]] = field(default_factory=list)  # name, diff id, size, sent
    partial_images: list[str] = field(default_factory=list)  # the stages' images (removed at the end)
    removed: list[str] = field(default_factory=list)  # those of them removed


class LoadStopped(OSError):
    """The load was told to stop (its build ended) before its image was whole."""


class SourceUnreadable(OSError):
    """A staged file a layer holds could not be read whole (gone, or changed while it was written):
    the hub's side of the load failed, not Docker."""


class LoadRefused(Exception):
    """Docker's error answer to a ``docker load`` of the archive: ``str(error)`` is its message."""

    @property
    def missing_layer(self) -> bool:
        """Whether Docker lacked a layer the archive counted on it holding (worth sending every layer)."""
        return _MISSING_LAYER.search(str(self)) is not None

    @property
    def no_space(self) -> bool:
        return "no space left on device" in str(self).lower()


def load_image(api: Any, base: str, layers: list[Layer], labels: dict[str, str], known: set[str],
               memo: LayerMemo, history: list[dict[str, Any]] | None = None,
               env: dict[str, str] | None = None,
               on_image_id: Callable[[str], None] | None = None,
               prepare: Callable[[Layer], Layer] | None = None,
               stop: threading.Event | None = None,
               sent: threading.Event | None = None) -> LoadResult:
    """Load an image made of ``base`` plus ``layers`` into Docker, with ``labels`` and ``env``
    (environment variables) added to the base's config. ``known``: chain ids the daemon holds
    (layers the memo recognises there are not sent); ``history``: the base's
    (:func:`layers.base_history`), so that the image's history names every layer; ``on_image_id``:
    told each stage's image id before Docker gets the end of its archive (a build killed from
    then on leaves an image Docker may still finish loading: its log can name it); ``prepare``
    gives each layer to be sent as it is to be written, when it is its turn (it may wait for
    its files: byte code being compiled meanwhile); ``stop``: once set (the build was cancelled or
    timed out), no more bytes are sent and the load raises :class:`LoadStopped`; ``sent``: set
    once every layer's bytes are on their way (Docker registers the last ones then). Raises
    :class:`LoadRefused` with Docker's answer."""
    base_attrs = api.inspect_image(base)
    loading = _StagedLoad(api, base_attrs, layers, memo, known | set(chain_ids(base_attrs["RootFS"]["Layers"])),
                          prepare, on_image_id, stop or threading.Event(), sent or threading.Event())
    try:
        return loading.run(labels, history, env)
    except Exception as error:
        # the body's failure reaches requests, which says the connection broke: name the file instead
        if loading.unreadable is not None and not isinstance(error, (LoadRefused, LoadStopped)):
            raise SourceUnreadable(str(loading.unreadable)) from None
        raise
    finally:
        for image_id in loading.result.partial_images:
            try:
                api.remove_image(image_id)  # the image keeps their layers
                loading.result.removed.append(image_id)
            except Exception:  # never loaded, or a leftover for the sweep (the build's log names it)
                pass


# -- inside ------------------------------------------------------------------------------

# Docker's answers to a load whose empty placeholder stood for a layer it no longer holds (removed
# since the build looked): the archive sent again with every layer loads.
_MISSING_LAYER = re.compile(r"invalid diffid|layer does not exist|unexpected eof|layer not known", re.IGNORECASE)


class _StagedLoad:
    """One image's layers, loaded stage by stage (see the module's docstring)."""

    def __init__(self, api: Any, base: dict[str, Any], layers: list[Layer], memo: LayerMemo, have: set[str],
                 prepare: Callable[[Layer], Layer] | None, on_image_id: Callable[[str], None] | None,
                 stop: threading.Event, sent: threading.Event):
        self.api, self.base, self.layers, self.memo, self.have = api, base, layers, memo, have
        self.prepare, self.on_image_id, self.stop, self.sent = prepare, on_image_id, stop, sent
        self.result = LoadResult()
        self.diff_ids: list[str] = []  # of the layers written into an archive so far
        self.chain = chain_ids(base["RootFS"]["Layers"])[-1] if base["RootFS"]["Layers"] else ""
        self.partial = uuid.uuid4().hex
        self.failed = threading.Event()  # a stage failed: the others send nothing more
        self.unreadable: OSError | None = None  # a staged file that could not be read whole

    def run(self, labels: dict[str, str], history: list[dict[str, Any]] | None,
            env: dict[str, str] | None) -> LoadResult:
        stages: list[Future] = []
        with ThreadPoolExecutor(max_workers=len(self.layers) + 1, thread_name_prefix="docker-load") as pool:
            while True:
                sent_all = threading.Event()
                stage = pool.submit(self._load, self._stage(stages[-1] if stages else None, sent_all,
                                                            labels, history, env))
                stage.add_done_callback(self._on_stage_done)
                stages.append(stage)
                while not sent_all.wait(0.2) and not (self._ending() or stage.done()):
                    pass
                if self._ending() or not sent_all.is_set() or len(self.diff_ids) == len(self.layers):
                    break  # a stage failed, the load was stopped, or every layer is on its way
        if self.stop.is_set() and any(stage.exception() is not None for stage in stages):
            raise LoadStopped("the build that loaded these layers has ended")  # not Docker's doing
        for stage in stages:  # all done: the first failure is the one that counts (the others follow from it)
            stage.result()
        if self.result.image_id == "":
            raise LoadRefused("the load ended before its layers were sent")
        return self.result

    def _ending(self) -> bool:
        return self.failed.is_set() or self.stop.is_set()

    def _on_stage_done(self, stage: Future) -> None:
        if stage.exception() is not None:
            self.failed.set()  # the stages after it stop sending

    def _stage(self, previous: Future | None, sent_all: threading.Event, labels: dict[str, str],
               history: list[dict[str, Any]] | None, env: dict[str, str] | None) -> Generator[bytes, None, None]:
        """One stage's archive: the layers up to the next big one sent, placeholders below; its end
        only once the previous stage has loaded."""
        bases = len(self.base["RootFS"]["Layers"])
        paths = [f"{index}/layer.tar" for index in range(bases + len(self.layers))]
        for path in paths[:bases + len(self.diff_ids)]:
            yield from _archive_member(path, b"")  # Docker holds these (or will: the previous stage)
        for layer, path in zip(self.layers[len(self.diff_ids):], paths[bases + len(self.diff_ids):]):
            self._check_going_on()
            size = yield from self._layer(layer, path)
            if size >= STAGE_MIN_BYTES and len(self.diff_ids) < len(self.layers):
                break
        diff_ids = list(self.diff_ids)  # this stage's image: later stages add to self.diff_ids meanwhile
        sent_all.set()  # the next stage's layers may go now (a failure ends this stage's load instead)
        if len(diff_ids) == len(self.layers):
            self.sent.set()
        if previous is not None:
            previous.result()  # raises if it failed: this archive then ends unfinished
        final = len(diff_ids) == len(self.layers)
        names = [layer.name for layer in self.layers[:len(diff_ids)]]
        config = json.dumps(image_config(self.base, diff_ids, labels if final else {PARTIAL_LABEL: self.partial},
                                         names, history, env), sort_keys=True).encode()
        image_id = "sha256:" + hashlib.sha256(config).hexdigest()
        if final:
            self.result.image_id = image_id
        else:
            self.result.partial_images.append(image_id)
        if self.on_image_id is not None:
            self.on_image_id(image_id)
        yield from _archive_member("config.json", config)
        manifest = json.dumps([{"Config": "config.json", "RepoTags": None,
                                "Layers": paths[:bases + len(diff_ids)]}]).encode()
        yield from _archive_member("manifest.json", manifest)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)

    def _layer(self, layer: Layer, path: str) -> Generator[bytes, None, int]:
        """The layer's member of the archive (empty if Docker holds it); returns the bytes sent."""
        remembered = self.memo.get(layer)
        if remembered is not None and next_chain(self.chain, remembered[0]) in self.have:
            diff_id, size, sent = remembered[0], remembered[1], False
            yield from _archive_member(path, b"")
        else:
            if self.prepare is not None:
                layer = self.prepare(layer)
            members = self._reading(lambda: tar_members(layer.entries))
            size = members_size(members)
            digest = hashlib.sha256()
            yield _header(path, size)
            chunks = stream_tar(layer, size, members)
            while (chunk := self._reading(lambda: next(chunks, None))) is not None:
                self._check_going_on()
                digest.update(chunk)
                yield chunk
            yield b"\0" * (-size % tarfile.BLOCKSIZE)
            diff_id, sent = "sha256:" + digest.hexdigest(), True
            if remembered != (diff_id, size):  # new, or other bytes than the memo says: what Docker got counts
                self.memo.put(layer, diff_id, size)
        self.chain = next_chain(self.chain, diff_id)
        self.have.add(self.chain)  # the next stages count on it
        self.diff_ids.append(diff_id)
        self.result.layers.append((layer.name, diff_id, size, sent))
        return size if sent else 0

    def _reading(self, read: Callable[[], Any]) -> Any:
        """``read()``, a read of the staged files; its OSError is kept as the load's cause."""
        try:
            return read()
        except OSError as error:
            self.unreadable = self.unreadable or error
            raise

    def _check_going_on(self) -> None:
        if self.stop.is_set():
            raise LoadStopped("the build that loaded these layers has ended")
        if self.failed.is_set():
            raise OSError("an earlier stage of the load failed")

    def _load(self, chunks: Generator[bytes, None, None]) -> None:
        try:
            answer = self.api.load_image(chunks)
            for message in answer or []:
                if "error" in message:
                    raise LoadRefused(" ".join(str(message["error"]).split()))
        finally:
            chunks.close()  # a stage that ended early: its layer's writer thread and file go now


def _header(path: str, size: int) -> bytes:
    info = tarfile.TarInfo(path)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _archive_member(path: str, data: bytes) -> Iterator[bytes]:
    yield _header(path, len(data))
    if data:
        yield data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
