"""Environment images written layer by layer, so that images share their large packages.

Docker stores a layer once per *chain* (the layers below it plus its own content), and a
layer is the same only if its tar is byte-identical. So every environment is installed
at one in-image prefix (:data:`SHARED_PREFIX`; ``/opt/conda/envs/<name>`` is a symlink to
it), each large package's files become a deterministic tar of their own (sorted paths,
fixed owners, normalised modes, the package's own mtimes and a fixed one for the rest),
and those layers are stacked on the base image in a fixed order, by package name, with
python's above the packages whose bytes do not depend on its release
(:func:`large_package_order`). Above them: the small packages, a few layers of them
(:func:`small_package_chunks`), then a small one with what is particular to this environment
(``conda-meta``, the name's symlink). Two environments that share PyTorch and CUDA's libraries then share
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
import re
import stat
import tarfile
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .stagedenv import PackageKey, StagedEnvironment, TreeStats, source_of

SHARED_PREFIX = "/opt/conda/envs/_shared"  # no profile slug can be "_shared"
LAYER_MTIME = 1_700_000_000  # fixed: the same files give the same tar (a package's own files keep their package's)
LAYER_RECIPE = "5"  # bump when the way a layer's tar is written changes (2: with the package's .pyc; 3: adopted;
# 4: a package's files keep their mtimes; 5: python's layer above the large packages it compiles nothing of)
CHUNK = 1 << 20
HISTORY_PREFIX = "condaspawner layer: "  # how a loaded layer's history entry begins
# What the installer leaves at the prefix's top that no image should carry: rattler's cache tag
# (backup tools that honour it would skip the whole environment).
NOT_IN_IMAGES = frozenset({"CACHEDIR.TAG"})
SMALL_PACKAGES, ENVIRONMENT = "small packages", "environment"  # the layers above the large packages'
SMALL_LAYER_BYTES = 32 * 1024 * 1024  # the small packages' layers: each holds about this much...
SMALL_LAYERS_MAX = 8  # ...or more, where it would make more layers than this
# Dockerfile instructions that never add a layer, as a history entry's created_by names them
# (the classic builder's "/bin/sh -c #(nop)  ENV ...", BuildKit's "ENV ...").
_METADATA_ONLY = re.compile(r"^(?:/bin/sh -c #\(nop\)\s+)?(?:ARG|ENV|LABEL|USER|WORKDIR|CMD|ENTRYPOINT|EXPOSE|"
                            r"VOLUME|STOPSIGNAL|HEALTHCHECK|SHELL|ONBUILD|MAINTAINER)\b")


@dataclass(frozen=True)
class Entry:
    """One file of a layer: its path in the image (no leading slash), and a host file to
    copy or a symlink to create. ``keep_mtime``: a file a package lists, not byte code, which
    keeps its mtime (its package's: staging.settle_mtimes), so that the byte code the package
    ships, checked by its source's mtime, stays valid; every other file gets LAYER_MTIME (byte
    code's own mtime is never checked, and it may have been compiled here)."""

    path: str
    source: str | Path | None = None
    link: str | None = None
    keep_mtime: bool = False
    # A slice of ``source`` (``length`` bytes from ``offset``) as a file of mode 644: byte code the
    # compile container packed into one file (compilerun.py), not made a file of its own.
    offset: int = 0
    length: int | None = None


@dataclass(frozen=True)
class Layer:
    name: str  # what it holds, for logs: "pytorch-2.3.1-py39_0", "small packages", ...
    entries: tuple[Entry, ...]
    # the same identity, the same bytes: a package's (content_identities), or the small packages' together
    identity: str = ""


class LayerMemo:
    """The diff id and size of each package layer (and small-packages layer) written once, by identity, so that
    a layer Docker already holds is recognised without reading its files again.

    A layer's identity leaves its byte code out (it follows the sources), so the layers sent
    without it (a Dockerfile step compiles then) are remembered apart: a build that counted on one
    of them for its byte code would compile none and send an image without it."""

    def __init__(self, directory: Path | None, *, byte_code: bool = True):
        self.directory = directory
        self.byte_code = byte_code

    def without_byte_code(self) -> LayerMemo:
        """The memo of the layers sent without the byte code compiled here."""
        return LayerMemo(self.directory, byte_code=False)

    def get(self, layer: Layer) -> tuple[str, int] | None:
        path = self._path(layer)
        try:
            entry = json.loads(path.read_text()) if path is not None else None
            return (str(entry["diff_id"]), int(entry["size"])) if entry else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, layer: Layer, diff_id: str, size: int) -> None:
        path = self._path(layer)
        if path is None:
            return
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp")
            partial.write_text(json.dumps({"diff_id": diff_id, "size": size, "layer": layer.name}))
            os.replace(partial, path)

    def _path(self, layer: Layer) -> Path | None:
        if self.directory is None or not layer.identity:
            return None
        kind = "with byte code" if self.byte_code else "without byte code"  # entries without it were either
        key = hashlib.sha256(f"{LAYER_RECIPE}\0{SHARED_PREFIX}\0{kind}\0{layer.identity}".encode()).hexdigest()
        return self.directory / f"{key}.json"


def plan_layers(staged: StagedEnvironment, env_name: str, *, min_bytes: int, max_layers: int,
                stats: TreeStats | None = None) -> list[Layer]:
    """The layers of an environment ``staged`` for :data:`SHARED_PREFIX`.

    Packages of at least ``min_bytes`` get a layer each (the ``max_layers`` largest, if
    more), ordered by name, version and build, those whose byte code python compiles here
    above python's and the rest below it (:func:`large_package_order`); then the other
    packages' files, in a few layers (:func:`small_package_chunks`); then ``conda-meta``, anything no package claims, and the ``env_name``
    symlink. ``stats``: the tree's, when this planning pass has read some already.
    """
    root = os.fspath(staged.root)
    lstat = stats if stats is not None else TreeStats(root)  # each of thousands of files asked of the disk once: sizes, presence, identities
    records, identities = dict(staged.files), content_identities(staged, lstat)
    keep_mtime = {path for path in staged.listed if source_of(path) is None}
    # before the compiled files join them: the plan is the same before and after compiling
    sizes = {key: sum(status.st_size for path in files if (status := lstat(path)) is not None)
             for key, files in records.items()}
    paths = list(tree_paths(staged.root))  # walked once: thousands of folders
    for key, files in _compiled_files(paths, staged).items():
        records[key] = [*records[key], *files]
    large = sorted((key for key in records if sizes[key] >= min_bytes), key=lambda key: -sizes[key])[:max_layers]
    prefix = SHARED_PREFIX.lstrip("/")
    layers = []
    claimed: set[str] = set()
    def present(path: str) -> bool:
        status = lstat(path)
        return (status is not None and (stat.S_ISLNK(status.st_mode) or not stat.S_ISDIR(status.st_mode))
                and staged.folders.holds_parent_of(path))

    for key in sorted(large, key=lambda key: large_package_order(staged, key)):
        files = sorted({path for path in records[key] if present(path)})  # Docker refuses a path twice
        claimed.update(files)
        layers.append(Layer("-".join(key), tuple(Entry(f"{prefix}/{path}", f"{root}/{path}", keep_mtime=path in keep_mtime)
                                                 for path in files),
                            identities[key]))
    chunks = small_package_chunks(sorted(key for key in records if key not in large), sizes)
    for index, chunk in enumerate(chunks):
        small = sorted({path for key in chunk for path in records[key] if present(path)} - claimed)
        claimed.update(small)
        name = SMALL_PACKAGES if len(chunks) == 1 else f"{SMALL_PACKAGES} {index + 1} of {len(chunks)}"
        below = [key for earlier in chunks[:index + 1] for key in earlier]
        layers.append(Layer(name, tuple(Entry(f"{prefix}/{path}", f"{root}/{path}", keep_mtime=path in keep_mtime)
                                        for path in small),
                            _small_packages_identity(identities, set(large), below)))
    rest = sorted(path for path in paths if path not in claimed and path not in NOT_IN_IMAGES)
    top = [Entry(f"{prefix}/{path}", f"{root}/{path}") for path in rest]
    top.append(Entry(f"{Path(SHARED_PREFIX).parent.as_posix().lstrip('/')}/{env_name}", link=Path(SHARED_PREFIX).name))
    layers.append(Layer(ENVIRONMENT, tuple(top)))
    return layers


def content_identities(staged: StagedEnvironment, lstat: TreeStats) -> dict[PackageKey, str]:
    """Each package's identity (``staged.identities``) with a digest of the files it holds here, or ""
    (unknown). A package's files depend on the environment: where two packages ship one path, the
    installer moves one's copy under ``__clobbers__`` and rewrites its file list; a layer known by the
    package's sha256 alone would stand for another environment's files."""
    return {key: f"{identity}:{_listing_digest(lstat, staged.files[key])}" if identity else ""
            for key, identity in staged.identities.items()}


def _listing_digest(lstat: TreeStats, files: Iterable[str]) -> str:
    """sha256 of each file's path, type, mode, size, mtime and link target (lstat only: no file is read)."""
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        digest.update(_listing_line(lstat, path).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _listing_line(lstat: TreeStats, path: str) -> str:
    if source_of(path) is not None:  # byte code follows its source; compiling may rewrite it, with the fixed mtime
        return f"{path}\0byte code\n"
    status = lstat(path)
    try:
        link = os.readlink(f"{lstat.root}/{path}") if status is not None and stat.S_ISLNK(status.st_mode) else ""
    except OSError:
        status = None
    if status is None:
        return f"{path}\0absent\n"
    return f"{path}\0{status.st_mode:o}\0{status.st_size}\0{int(status.st_mtime)}\0{link}\n"


def large_package_order(staged: StagedEnvironment, key: PackageKey) -> tuple[int, PackageKey]:
    """Where a large package's layer goes: Docker shares a layer only on the same layers below,
    so python's sits above the packages whose bytes do not depend on it (those that ship
    their byte code, or have no Python files): a new python patch release then stores those
    again only from python's layer up. The packages compiled here, whose byte code is that
    python's, sit above it."""
    rank = 1 if key[0] == "python" else 2 if key in staged.compiled_here else 0
    return rank, key


def small_package_chunks(keys: list[PackageKey], sizes: dict[PackageKey, int]) -> list[list[PackageKey]]:
    """The small packages (``keys``, in order) cut into the layers that hold them: each closes
    once it holds :data:`SMALL_LAYER_BYTES` (more where that would make more than
    :data:`SMALL_LAYERS_MAX`). Docker registers one layer after another, and the last only once
    its bytes are all in: one layer of every small package kept the load going ~1.4 s after its
    last byte (169 MB in the data-science environment). But each layer also costs Docker a
    fixed ~0.1 s (20.10 starts a process to unpack each): a last one of less than half the
    size joins the one before. A layer's packages depend only on the packages before it (and,
    for the last two, on whether so little follows), so two environments that differ in a
    late small package share the earlier small layers too (on the same layers below)."""
    limit = max(SMALL_LAYER_BYTES, sum(sizes[key] for key in keys) // SMALL_LAYERS_MAX + 1)
    chunks: list[list[PackageKey]] = [[]]
    held = 0
    for key in keys:
        if held >= limit:
            chunks.append([])
            held = 0
        chunks[-1].append(key)
        held += sizes[key]
    if len(chunks) > 1 and held < limit // 2:
        chunks[-2].extend(chunks.pop())
    return chunks


def _small_packages_identity(identities: dict[tuple[str, str, str], str], large: set[tuple[str, str, str]],
                             small_keys: Iterable[PackageKey]) -> str:
    """What a small packages' shared layer holds, as one identity: the small packages' up to its own
    (``small_keys``: those before it decide which of its files an earlier one holds), and the
    large ones' (which files they claim; the layer sits on theirs anyway), or "" when a package's
    is unknown. The same packages give the same bytes, so the layer is written once, not per build."""
    if not all(identities.values()):
        return ""
    small = sorted(identities[key] for key in small_keys)
    below = sorted(identities[key] for key in large)
    return "small packages:" + hashlib.sha256("\n".join([*small, "|", *below]).encode()).hexdigest()


# The compile container's program, as the text its Python runs with -c (compilescript.py says what
# it does and why; the hub never imports it).
COMPILE_SCRIPT = (Path(__file__).parent / "compilescript.py").read_text()
COMPILE_BATCH = 400  # files: a large package compiles on every core, in batches fixed by its files
COMPILE_WAIT_S = 600  # how long a compile container waits for its batches before it gives up


def stored_layers(base: dict[str, Any], plan: list[Layer], known_chains: set[str], memo: LayerMemo) -> set[str]:
    """The names of the layers :func:`imageload.load_image` will not send: the memo knows them and
    Docker holds them on the same layers below."""
    chain = chain_ids(base["RootFS"]["Layers"])[-1] if base["RootFS"]["Layers"] else ""
    have = known_chains | set(chain_ids(base["RootFS"]["Layers"]))
    stored = set()
    for layer in plan:
        remembered = memo.get(layer)
        if remembered is None or next_chain(chain, remembered[0]) not in have:
            break  # the layers above sit on a new chain
        stored.add(layer.name)
        chain = next_chain(chain, remembered[0])
    return stored


def compile_plan(staged: StagedEnvironment, plan: list[Layer], skip: set[str], done: Collection[str] = (),
                 stats: TreeStats | None = None) -> list[tuple[str, list[str]]]:
    """The in-image paths of the Python files under ``lib/`` to byte-compile, in batches of one
    package's files each (so that a package's byte code does not depend on which packages share
    its layer), each with the name of the layer that holds them, in the order of the layers:
    every layer's but those named in ``skip`` (stored already, with their byte code), less the
    staged paths in ``done`` (byte code from the cache, bytecode.py), and less the sources whose
    ``__pycache__`` is no real folder of theirs: a package's symlinked ``__pycache__`` (or a folder
    above it) could point into another package's folder, whose byte code would then be this one's.
    ``stats``: the tree's, as this planning pass read it."""
    prefix = SHARED_PREFIX.lstrip("/")
    lstat = stats if stats is not None else TreeStats(staged.root)
    owner = {path: "-".join(key) for key, files in staged.files.items() for path in files}
    skipped = set(done)
    jobs: list[tuple[str, list[str]]] = []
    for layer in plan:
        if layer.name in skip:
            continue
        by_package: dict[str, set[str]] = {}
        for entry in layer.entries:
            path = entry.path.removeprefix(prefix + "/")
            if (entry.source is None or path in skipped or not path.startswith("lib/") or not path.endswith(".py")
                    or _is_link(lstat(path))
                    or not staged.folders.can_hold(os.path.join(os.path.dirname(path), "__pycache__"))):
                continue
            by_package.setdefault(owner.get(path, ""), set()).add(f"/{prefix}/{path}")
        for _, paths in sorted(by_package.items()):
            files = sorted(paths)
            jobs.extend((layer.name, files[start:start + COMPILE_BATCH]) for start in range(0, len(files), COMPILE_BATCH))
    return jobs


class ByteCodePlacer:
    """Adds to a package's layer the byte code compiled for its Python files since the layer was
    planned, where :func:`plan_layers` would put it once everything is compiled: so that a
    layer can be written as soon as its own package is compiled."""

    def __init__(self, staged: StagedEnvironment):
        self.root = os.fspath(staged.root)
        self.listed = staged.listed
        self.folders = staged.folders

    def layer_with_byte_code(self, layer: Layer, packed: Mapping[str, tuple[Path, int, int]] | None = None) -> Layer:
        """``layer`` with the byte code of its sources: the files compiled beside them, and the slices
        of ``packed`` (compilerun.CompileRun.packed's: by staged .pyc path), which stand for any file
        at the same path (a package's stale one: the compiler would have replaced it)."""
        prefix = SHARED_PREFIX.lstrip("/") + "/"
        sources = {entry.path.removeprefix(prefix) for entry in layer.entries if entry.path.endswith(".py")}
        slices = {path: place for path, place in (packed or {}).items()
                  if source_of(path) in sources and self.folders.can_hold(os.path.dirname(path))}
        kept = [entry for entry in layer.entries if entry.path.removeprefix(prefix) not in slices]
        have = {entry.path for entry in kept}
        added = [Entry(prefix + path, pack, offset=offset, length=size) for path, (pack, offset, size) in slices.items()]
        for directory in sorted({os.path.dirname(path) for path in sources}):
            cache = f"{directory}/__pycache__" if directory else "__pycache__"
            if not self.folders.holds(cache):  # none yet, or a package's symlink to who knows where
                continue
            try:
                names = os.listdir(f"{self.root}/{cache}")
            except OSError:
                continue
            for name in names:
                path = f"{cache}/{name}"
                if (path not in self.listed and path not in slices and prefix + path not in have
                        and source_of(path) in sources and _is_file(f"{self.root}/{path}")):
                    added.append(Entry(prefix + path, f"{self.root}/{path}"))
        if not added:
            return layer
        return Layer(layer.name, tuple(sorted([*kept, *added], key=lambda entry: entry.path)), layer.identity)


@dataclass(frozen=True)
class TarMember:
    """One member of a layer's tar: its header (as tarfile writes it), and the host file
    whose first ``size`` bytes follow it (None: a directory or a symlink)."""

    header: bytes
    source: str | Path | None = None
    size: int = 0
    offset: int = 0  # where in ``source`` its bytes start


def tar_members(entries: Iterable[Entry]) -> list[TarMember]:
    """The members of :func:`write_tar`'s output, read from the files' metadata once: the tar's
    size and its bytes both come from them."""
    members = []
    for info, source, offset in _members(entries):
        header = info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")
        members.append(TarMember(header, source, info.size if source is not None else 0, offset))
    return members


def members_size(members: Iterable[TarMember]) -> int:
    """The size of the tar of ``members`` (tarfile's layout: blocks, then two empty ones, padded to a record)."""
    size = sum(len(member.header) + member.size + (-member.size % tarfile.BLOCKSIZE) for member in members)
    size += 2 * tarfile.BLOCKSIZE
    return size + (-size % tarfile.RECORDSIZE)


def tar_size(entries: Iterable[Entry]) -> int:
    """The size of :func:`write_tar`'s output, from the files' metadata alone."""
    return members_size(tar_members(entries))


def write_tar(entries: Iterable[Entry], out: Any) -> None:
    """A deterministic tar of ``entries`` (and their parent directories) to ``out``."""
    write_members(tar_members(entries), out)


def write_members(members: Iterable[TarMember], out: Any) -> None:
    """The tar of ``members`` to ``out``, byte for byte what tarfile writes for them; OSError
    if a file is shorter than its header says (it changed since)."""
    written = 0
    for member in members:
        out.write(member.header)
        written += len(member.header)
        if member.source is None:
            continue
        # O_NOFOLLOW: a file planned as a file is never read through a symlink put in its place.
        # Unbuffered reads: most files are small, and a buffered reader for each costs more than them.
        handle = os.open(member.source, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            at, end = member.offset, member.offset + member.size
            while at < end:
                data = os.pread(handle, min(end - at, CHUNK), at)
                if not data:
                    raise OSError(f"{member.source} is shorter than when its layer was planned")
                out.write(data)
                at += len(data)
        finally:
            os.close(handle)
        padding = -member.size % tarfile.BLOCKSIZE
        out.write(b"\0" * padding)
        written += member.size + padding
    end = written + 2 * tarfile.BLOCKSIZE
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """Docker's chain id of each layer: the identity of it together with every layer below."""
    chains: list[str] = []
    for diff_id in diff_ids:
        chain = diff_id if not chains else "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
        chains.append(chain)
    return chains


def files_layer(name: str, files: dict[str, Path]) -> Layer:
    """A layer of ``files`` (path in the image -> host file), owned by root like a Dockerfile's COPY."""
    return Layer(name, tuple(Entry(path.lstrip("/"), source) for path, source in sorted(files.items())))


def with_files(layer: Layer, files: dict[str, Path]) -> Layer:
    """``layer`` with ``files`` added, as :func:`files_layer` writes them; with no identity (the memo
    knows it by what it held before)."""
    return Layer(layer.name, (*layer.entries, *files_layer(layer.name, files).entries))


def image_config(base: dict[str, Any], diff_ids: list[str], labels: dict[str, str], names: list[str] | None = None,
                 base_history: list[dict[str, Any]] | None = None, env: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """The image config: the base image's (``docker inspect`` of it), with these layers, labels and
    environment variables (``env``, set as a Dockerfile's ENV would).

    Its history is the base's (``base_history``, from the base's own config) and one entry per
    layer naming it and its diff id: Docker's per-layer sizes (``docker history``) come from
    the history, and two images' entries are the same exactly when their layers are.
    """
    config = dict(base.get("Config") or {})
    config["Labels"] = {**(config.get("Labels") or {}), **labels}
    if env:
        kept = [line for line in config.get("Env") or [] if line.split("=", 1)[0] not in env]
        config["Env"] = [*kept, *(f"{name}={value}" for name, value in env.items())]
    created = datetime.fromtimestamp(LAYER_MTIME, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    names = names or ["layer"] * len(diff_ids)
    image = {
        "architecture": base.get("Architecture", "amd64"),
        "os": base.get("Os", "linux"),
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [*base["RootFS"]["Layers"], *diff_ids]},
    }
    if base_history is not None:
        image["created"] = created
        image["history"] = [*base_history, *({"created": created, "created_by": f"{HISTORY_PREFIX}{name} {diff_id}"}
                                             for name, diff_id in zip(names, diff_ids))]
    return image


def next_chain(chain: str, diff_id: str) -> str:
    """The chain id of a layer ``diff_id`` on the chain ``chain`` ("": on nothing)."""
    return "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest() if chain else diff_id


# -- inside ------------------------------------------------------------------------------


def compiled_files(staged: StagedEnvironment) -> dict[PackageKey, list[str]]:
    """The byte code compiled in ``staged`` that no package lists, by the package of its source."""
    return _compiled_files(tree_paths(staged.root), staged)


def _compiled_files(paths: Iterable[str], staged: StagedEnvironment) -> dict[PackageKey, list[str]]:
    """The compiled files among ``paths`` (a staged tree's) that no package lists, by the package
    whose source they were compiled from."""
    compiled: dict[PackageKey, list[str]] = {}
    for path in paths:
        source = source_of(path) if path not in staged.listed else None
        owner = staged.source_owners.get(source) if source is not None else None
        if owner is not None:
            compiled.setdefault(owner, []).append(path)
    return compiled


def _is_link(status: os.stat_result | None) -> bool:
    return status is not None and stat.S_ISLNK(status.st_mode)


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def tree_paths(root: Path) -> Iterator[str]:
    """Every file and symlink under ``root``, relative, as POSIX paths."""
    top = os.fspath(root)
    for directory, dirnames, filenames in os.walk(top):
        relative = directory[len(top) + 1:] if directory != top else ""
        for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(directory, d)))]:
            yield f"{relative}/{name}" if relative else name


def _members(entries: Iterable[Entry]) -> Iterator[tuple[tarfile.TarInfo, str | Path | None, int]]:
    seen_dirs: set[str] = set()
    for entry in sorted(entries, key=lambda e: e.path):
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in seen_dirs:
                seen_dirs.add(parent)
                yield _info(parent, tarfile.DIRTYPE, 0o755), None, 0
        if entry.link is not None:
            info = _info(entry.path, tarfile.SYMTYPE, 0o777)
            info.linkname = entry.link
            yield info, None, 0
            continue
        assert entry.source is not None
        if entry.length is not None:
            info = _info(entry.path, tarfile.REGTYPE, 0o644)
            info.size = entry.length
            yield info, entry.source, entry.offset
            continue
        status = os.lstat(entry.source)
        mode = status.st_mode
        if stat.S_ISLNK(mode):
            info = _info(entry.path, tarfile.SYMTYPE, 0o777)
            info.linkname = os.readlink(entry.source)
            yield info, None, 0
            continue
        info = _info(entry.path, tarfile.REGTYPE, 0o755 if mode & stat.S_IXUSR else 0o644)
        info.size = status.st_size if stat.S_ISREG(mode) else os.stat(entry.source).st_size
        if entry.keep_mtime and stat.S_ISREG(mode):
            info.mtime = int(status.st_mtime)
        yield info, entry.source, 0


def _info(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.mtime = kind, mode, LAYER_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


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
        if len(data) >= CHUNK and not self.buffer.tell():
            self.chunks.put(bytes(data))  # a large file's block: no copy through the buffer
            return len(data)
        self.buffer.write(data)
        if self.buffer.tell() >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buffer.tell():
            self.chunks.put(self.buffer.getvalue())
            self.buffer = io.BytesIO()


def stream_tar(layer: Layer, size: int, members: list[TarMember] | None = None) -> Iterator[bytes]:
    """``write_tar`` of the layer (of its ``members``, when known) as chunks; OSError if it is not
    ``size`` bytes."""
    chunks: queue.Queue = queue.Queue(maxsize=8)
    failure: list[BaseException] = []
    abandoned = threading.Event()

    def produce() -> None:
        sink = _QueueSink(chunks, abandoned)
        try:
            write_members(members if members is not None else tar_members(layer.entries), sink)
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
    if written != size:  # a staged file changed while it was written
        raise OSError(f"layer {layer.name} changed while it was written ({written} != {size} bytes)")


# -- Docker ------------------------------------------------------------------------------


def supports_layered_images(api: Any) -> bool:
    """Whether the daemon keeps images in a graph-driver store (overlay2, ...), which loads
    an archive without reading the layers it already has."""
    info = api.info()
    status = dict(tuple(pair) for pair in info.get("DriverStatus") or [] if len(pair) == 2)
    return "containerd" not in str(status.get("driver-type", "")) and info.get("Driver") != "vfs"


def known_chains(images: Iterable[Mapping[str, Any]]) -> set[str]:
    """The chain ids of every layer of ``images`` (their ``docker inspect`` attributes, as listing
    them gave: not asked of the daemon again, image by image)."""
    return {chain for attrs in images for chain in chain_ids(attrs["RootFS"]["Layers"])}


def base_history(api: Any, base_id: str, cache: Path | None) -> list[dict[str, Any]]:
    """The history in the config of image ``base_id``, kept in ``cache`` (by image id: an image's
    config never changes): rebuilt from Docker's history API when its entries match the image's
    layers one to one, else read from ``docker save`` (which exports every layer first: seconds)."""
    kept = cache / f"base-{base_id.removeprefix('sha256:')}.json" if cache is not None else None
    with contextlib.suppress(OSError, ValueError):
        if kept is not None:
            return list(json.loads(kept.read_text()))
    history = history_from_api(api, base_id)
    if history is None:
        history = list(_saved_config(api, base_id).get("history") or [])
    if kept is not None:
        with contextlib.suppress(OSError):
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.with_suffix(".tmp").write_text(json.dumps(history))
            os.replace(kept.with_suffix(".tmp"), kept)
    return history


def history_from_api(api: Any, image_id: str) -> list[dict[str, Any]] | None:
    """The config history of ``image_id`` as Docker's history API shows it (times to the second),
    or None when which entries hold a layer is unclear: an entry holds one if it has bytes or is
    no metadata-only instruction, and that must give as many entries as the image has layers.
    Docker's history of an image built on it then shows the same entries, sizes included."""
    layer_count = len(api.inspect_image(image_id)["RootFS"]["Layers"])
    history = []
    for item in reversed(api.history(image_id)):  # the API lists the newest first
        created_by = str(item.get("CreatedBy") or "")
        entry: dict[str, Any] = {"created": datetime.fromtimestamp(int(item["Created"]), timezone.utc)
                                 .strftime("%Y-%m-%dT%H:%M:%SZ")}
        if created_by:
            entry["created_by"] = created_by
        if item.get("Comment"):
            entry["comment"] = str(item["Comment"])
        if not item.get("Size") and _METADATA_ONLY.search(created_by):
            entry["empty_layer"] = True
        history.append(entry)
    return history if sum(not entry.get("empty_layer") for entry in history) == layer_count else None


def _saved_config(api: Any, image_id: str) -> dict[str, Any]:
    """The config blob of ``image_id`` from ``docker save``, read until it comes by."""
    hexdigest = image_id.removeprefix("sha256:")
    names = {f"blobs/sha256/{hexdigest}", f"{hexdigest}.json"}
    stream = api.get_image(image_id, chunk_size=CHUNK)
    try:
        with tarfile.open(fileobj=_ChunkReader(iter(stream)), mode="r|") as archive:
            for member in archive:
                if member.isreg() and member.name in names:
                    content = archive.extractfile(member)
                    assert content is not None
                    data = content.read()
                    if hashlib.sha256(data).hexdigest() == hexdigest:
                        return dict(json.loads(data))
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    raise OSError(f"docker save of {image_id} holds no config")


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.rest = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.rest:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.rest = memoryview(chunk)
        size = min(len(buffer), len(self.rest))
        buffer[:size] = self.rest[:size]
        self.rest = self.rest[size:]
        return size
