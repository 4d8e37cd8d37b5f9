"""Environment images written layer by layer, so that images share their large packages.

Docker stores a layer once per *chain* (the layers below it plus its own content), and a
layer is the same only if its tar is byte-identical. So every environment is installed
at one in-image prefix (:data:`SHARED_PREFIX`; ``/opt/conda/envs/<name>`` is a symlink to
it), each large package's files become a deterministic tar of their own (sorted paths,
fixed times and owners, normalised modes), and those layers are stacked on the base
image in a fixed order, by package name. Above them: one layer with the small packages,
then a small one with what is particular to this environment (``conda-meta``, the
name's symlink). Two environments that share PyTorch and CUDA's libraries then share
those layers on disk and in a registry; renaming a profile re-stores none of them.

The image reaches Docker as a ``docker load`` archive streamed from the staged files:
no build context, no ``COPY``. Layers whose chain Docker already holds (the base image's,
another environment's) travel as empty placeholders: Docker's graph-driver store does
not read a layer it has. Docker's containerd image store reads every layer, so this
route needs the graph-driver store (:func:`supports_layered_images`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import queue
import stat
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

SHARED_PREFIX = "/opt/conda/envs/_shared"  # no profile slug can be "_shared"
LAYER_MTIME = 1_700_000_000  # fixed: the same files give the same tar
CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One file of a layer: its path in the image (no leading slash), and a host file to
    copy or a symlink to create."""

    path: str
    source: Path | None = None
    link: str | None = None


@dataclass(frozen=True)
class Layer:
    name: str  # what it holds, for logs: "pytorch-2.3.1-py39_0", "small packages", ...
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class LayerFile:
    """A layer as written: its uncompressed digest (Docker's diff id) and size."""

    name: str
    diff_id: str
    size: int
    entries: tuple[Entry, ...]


def plan_layers(staging: Path, env_name: str, *, min_bytes: int, max_layers: int) -> list[Layer]:
    """The layers of an environment installed in ``staging`` for :data:`SHARED_PREFIX`.

    Packages of at least ``min_bytes`` get a layer each (the ``max_layers`` largest, if
    more), ordered by name, version and build; then the other packages' files; then
    ``conda-meta``, anything no package claims, and the ``env_name`` symlink.
    """
    records = _package_records(staging)
    sizes = {key: sum(_size(staging / path) for path in files) for key, files in records.items()}
    large = sorted((key for key in records if sizes[key] >= min_bytes), key=lambda key: -sizes[key])[:max_layers]
    prefix = SHARED_PREFIX.lstrip("/")
    layers = []
    claimed: set[str] = set()
    for key in sorted(large):
        files = sorted(path for path in records[key] if _exists(staging / path))
        claimed.update(files)
        layers.append(Layer("-".join(key), tuple(Entry(f"{prefix}/{path}", staging / path) for path in files)))
    small = sorted({path for key, files in records.items() if key not in large for path in files
                    if _exists(staging / path)} - claimed)
    claimed.update(small)
    layers.append(Layer("small packages", tuple(Entry(f"{prefix}/{path}", staging / path) for path in small)))
    rest = sorted(path for path in tree_paths(staging) if path not in claimed)
    top = [Entry(f"{prefix}/{path}", staging / path) for path in rest]
    top.append(Entry(f"{Path(SHARED_PREFIX).parent.as_posix().lstrip('/')}/{env_name}", link=Path(SHARED_PREFIX).name))
    layers.append(Layer("environment", tuple(top)))
    return layers


def measure(layer: Layer) -> LayerFile:
    """Write the layer's tar to nowhere: its digest and size."""
    sink = _DigestSink()
    write_tar(layer.entries, sink)
    return LayerFile(layer.name, "sha256:" + sink.sha256.hexdigest(), sink.size, layer.entries)


def write_tar(entries: Iterable[Entry], out: Any) -> None:
    """A deterministic tar of ``entries`` (and their parent directories) to ``out``."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for member, content in _members(entries):
            if content is None:
                tar.addfile(member)
            else:
                with content:
                    tar.addfile(member, content)


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """Docker's chain id of each layer: the identity of it together with every layer below."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chain = diff_id if not chains else "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
        chains.append(chain)
    return chains


def image_config(base: dict[str, Any], layers: list[LayerFile], labels: dict[str, str]) -> dict[str, Any]:
    """The image config: the base image's (``docker inspect`` of it), plus the layers and labels."""
    config = dict(base.get("Config") or {})
    config["Labels"] = {**(config.get("Labels") or {}), **labels}
    return {
        "architecture": base.get("Architecture", "amd64"),
        "os": base.get("Os", "linux"),
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [*base["RootFS"]["Layers"], *(layer.diff_id for layer in layers)]},
    }


def archive_chunks(config: dict[str, Any], layers: list[LayerFile], known_chains: set[str]) -> Iterator[bytes]:
    """A ``docker load`` archive of the image, as a stream of chunks.

    Layers whose chain is in ``known_chains`` (Docker has them) are sent as empty files.
    """
    diff_ids = config["rootfs"]["diff_ids"]
    chains = chain_ids(diff_ids)
    own = {layer.diff_id: layer for layer in layers}
    config_bytes = json.dumps(config, sort_keys=True).encode()
    paths = [f"{index}/layer.tar" for index in range(len(diff_ids))]
    manifest = json.dumps([{"Config": "config.json", "RepoTags": None, "Layers": paths}]).encode()
    yield from _archive_member("config.json", config_bytes)
    yield from _archive_member("manifest.json", manifest)
    for path, diff_id, chain in zip(paths, diff_ids, chains):
        layer = own.get(diff_id)
        if layer is None or chain in known_chains:
            yield from _archive_member(path, b"")
            continue
        yield _header(path, layer.size)
        yield from stream_tar(layer)
        yield b"\0" * (-layer.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


# -- inside ------------------------------------------------------------------------------


def _package_records(staging: Path) -> dict[tuple[str, str, str], list[str]]:
    records = {}
    for path in sorted((staging / "conda-meta").glob("*.json")):
        record = json.loads(path.read_text())
        key = (str(record["name"]), str(record["version"]), str(record["build"]))
        records[key] = [str(file) for file in record.get("files", [])]
    return records


def _exists(path: Path) -> bool:
    return os.path.lexists(path) and not path.is_dir() or path.is_symlink()


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def tree_paths(root: Path) -> Iterator[str]:
    """Every file and symlink under ``root``, relative, as POSIX paths."""
    for directory, dirnames, filenames in os.walk(root):
        for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(directory, d)))]:
            yield Path(os.path.relpath(os.path.join(directory, name), root)).as_posix()


def _members(entries: Iterable[Entry]) -> Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]:
    seen_dirs: set[str] = set()
    for entry in sorted(entries, key=lambda e: e.path):
        parents = Path(entry.path).parents
        for parent in reversed([p.as_posix() for p in parents if p.as_posix() != "."]):
            if parent not in seen_dirs:
                seen_dirs.add(parent)
                yield _info(parent, tarfile.DIRTYPE, 0o755), None
        if entry.link is not None:
            info = _info(entry.path, tarfile.SYMTYPE, 0o777)
            info.linkname = entry.link
            yield info, None
            continue
        assert entry.source is not None
        mode = os.lstat(entry.source).st_mode
        if stat.S_ISLNK(mode):
            info = _info(entry.path, tarfile.SYMTYPE, 0o777)
            info.linkname = os.readlink(entry.source)
            yield info, None
            continue
        info = _info(entry.path, tarfile.REGTYPE, 0o755 if mode & stat.S_IXUSR else 0o644)
        info.size = os.stat(entry.source).st_size
        yield info, open(entry.source, "rb")  # noqa: SIM115  (closed by write_tar)


def _info(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.mtime = kind, mode, LAYER_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _DigestSink:
    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


class _QueueSink:
    """A file-like whose writes come out of :func:`stream_tar` as chunks (bounded: the
    tar writer waits while Docker reads; it stops when the reader is gone)."""

    def __init__(self, chunks: queue.Queue, abandoned: threading.Event):
        self.chunks = chunks
        self.abandoned = abandoned
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> int:
        if self.abandoned.is_set():
            raise OSError("the reader of the layer went away")
        self.buffer.write(data)
        if self.buffer.tell() >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer.tell():
            self.chunks.put(self.buffer.getvalue())
            self.buffer = io.BytesIO()


def stream_tar(layer: LayerFile) -> Iterator[bytes]:
    chunks: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []
    abandoned = threading.Event()

    def produce() -> None:
        sink = _QueueSink(chunks, abandoned)
        try:
            write_tar(layer.entries, sink)
            sink.flush()
        except BaseException as error:  # reported to the reader below
            failure.append(error)
        chunks.put(None)

    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    written = 0
    try:
        while (chunk := chunks.get()) is not None:
            written += len(chunk)
            yield chunk
    finally:
        abandoned.set()
        while writer.is_alive():  # unblock a writer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                chunks.get(timeout=0.1)
    writer.join()
    if failure:
        raise failure[0]
    if written != layer.size:  # a staged file changed between measuring and sending
        raise OSError(f"layer {layer.name} changed while it was written ({written} != {layer.size} bytes)")


def _header(path: str, size: int) -> bytes:
    info = tarfile.TarInfo(path)
    info.size, info.mtime, info.mode = size, LAYER_MTIME, 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _archive_member(path: str, data: bytes) -> Iterator[bytes]:
    yield _header(path, len(data))
    if data:
        yield data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


# -- Docker ------------------------------------------------------------------------------


def supports_layered_images(api: Any) -> bool:
    """Whether the daemon keeps images in a graph-driver store (overlay2, ...), which loads
    an archive without reading the layers it already has."""
    info = api.info()
    status = dict(tuple(pair) for pair in info.get("DriverStatus") or [] if len(pair) == 2)
    return "containerd" not in str(status.get("driver-type", "")) and info.get("Driver") != "vfs"


def known_chains(api: Any, images: Iterable[str]) -> set[str]:
    """The chain ids of every layer of ``images`` (ids or names) on the daemon."""
    chains: set[str] = set()
    for image in images:
        try:
            layers = api.inspect_image(image)["RootFS"]["Layers"]
        except Exception:  # removed meanwhile: its layers are not counted on
            continue
        chains.update(chain_ids(layers))
    return chains


def load_image(api: Any, base: str, layers: list[LayerFile], labels: dict[str, str], known: set[str]) -> str:
    """Load an image made of ``base`` plus ``layers``; its id. ``known``: chain ids the
    daemon has (their layers are not sent)."""
    base_attrs = api.inspect_image(base)
    config = image_config(base_attrs, layers, labels)
    have = known | set(chain_ids(base_attrs["RootFS"]["Layers"]))  # the base is there: never sent
    answer = api.load_image(archive_chunks(config, layers, have))
    expected = "sha256:" + hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    for message in answer or []:
        if "error" in message:
            raise OSError(str(message["error"]).strip())
    api.inspect_image(expected)  # raises if Docker did not load it
    return expected
