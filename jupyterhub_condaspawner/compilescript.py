"""The compile container's program: its text (layers.COMPILE_SCRIPT) runs as
``python -s -S -c <text> BATCHES_JSON DONE_FOLDER WAIT_SECONDS``; keep it to Python 3.9 and its
standard library. The hub never imports it.

Run by the base image's Python (never the environment's: a package could replace a module
of its standard library, and code it ran could write the staged files, which are hard links
into the shared package cache), with -s -S (no site-packages, no .pth), in a container
(compilerun.py). It refuses an environment whose Python is another minor release (the
Dockerfile compiles then). Workers that live for the whole run adopt and borrow byte code
(below: they make none, so nothing depends on what a process did before); what is left of a
batch is compiled in a new process of its own, so that a file's byte code does not depend on
what one process compiled before (marshal's output does), with PYTHONHASHSEED fixed by the
caller. (A new process per batch for everything cost ~7 ms of CPU per batch, fork and exit:
a data-science environment has ~60 batches, nearly all adopted or borrowed.) Byte code a package ships
(conda-build compiles every package that is not noarch) is adopted, not compiled again:
checked by its source's mtime and size, it stays valid as shipped (a package's files keep
their mtimes in the layers); checked by its source's hash, it is rewritten as unchecked-hash
byte code of the same code object (Python would hash the source at every import). Byte code
that does not match its source is compiled over. A file whose ``__pycache__`` is not where it
seems (a symlink in it or above it, below the plan's "root") is neither read nor written: a
package's symlinked ``__pycache__`` would have its byte code written into another package's folder.
Byte code it rewrites goes to a new file of a random name (O_EXCL) first: a package's symlink at a
name it would pick (".m.cpython-39.pyc.x7k2.partial") would have it written into another package's
file, a hard link into the shared package cache, that every later environment links.
A source byte-identical to one at the same place below the plan's "borrow_from" (the base
image's own environment, whose packages pip compiled when the image was built: the server's
stack, which every environment's ipykernel shares much of) takes that file's byte code when
it is valid for it (by its mtime and size, or its hash), as it is under a new header
(unchecked-hash, the staged source's hash): its code objects keep the base image's file name,
which importlib replaces with the file it imports from (``_fix_co_filename``, as for every
environment imported through its /opt/conda/envs/<env> symlink), so tracebacks and debuggers
name the environment's file. (Renaming them here, unmarshal and marshal, cost ~0.15 ms a file.)
That byte code goes into one file per batch, its pack (``<batch>.pack`` beside the markers), not a
file each: a new file cost 0.3-1 ms of CPU on the bench's disk, and the ~1,800 files of
ipykernel's stack took two CPU-seconds; the build writes each slice into its source's layer.
The base image's files are trusted; one that resolves into the staged folder is not used, and
byte code whose body is no code object (a damaged file) is compiled over.
Each batch's marker holds the hash of each source it compiled (importlib.util.source_hash, which
depends on the Python release: the hub's may differ), by which bytecode.py checks what it keeps,
and the slice of its pack that holds each .pyc it took from the base image.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import py_compile
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from typing import BinaryIO

UNCHECKED_HASH = (1).to_bytes(4, "little")
CODE = ord("c")  # marshal's type of a code object (its top bit: FLAG_REF)
UMASK = 0o022  # the process's, read at the start (new files get its mode bits)
root = real_root = "/"  # the plan's root (the staged environment, as mounted), and where it resolves to
borrow_from = None  # the base image's environment, whose byte code a byte-identical source may take
checked: dict[str, bool] = {}  # each batch runs in a process of its own: its folders only
resolved: dict[str, str] = {}  # the base image's folders, each resolved once (a batch's files share a few)


def beside(cached: str) -> bool:
    folder = os.path.dirname(cached)
    if folder not in checked:
        checked[folder] = os.path.realpath(folder) == os.path.join(real_root, os.path.relpath(folder, root))
    return checked[folder]


def source_hash_of(path: str) -> bytes:
    with open(path, "rb") as file:
        return importlib.util.source_hash(file.read())


def adopt(path: str, cached: str) -> bool:
    try:
        with open(cached, "rb") as file:
            shipped = file.read(16)  # the header: the rest is read only to rewrite it
            flags = int.from_bytes(shipped[4:8], "little")
            if flags == 3:
                shipped += file.read()
        status = os.stat(path)
        if not valid_for(shipped, status, lambda: source_hash_of(path)):
            return False
    except OSError:
        return False
    if flags == 3:
        try:  # a new file: the shipped one is linked from the package cache
            write_new(cached, shipped[:4] + UNCHECKED_HASH + shipped[8:], 0o666 & ~UMASK)
        except OSError:
            return False
    return True


def write_new(cached: str, data: bytes, mode: int) -> None:
    # ``data`` as a new file at ``cached``, written under a name no file of a package has (O_EXCL):
    # a package's symlink at a name this script would choose (into another package's file, a hard
    # link into the shared package cache) is never written through
    folder, name = os.path.split(cached)
    handle, partial = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=folder)
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(partial, cached)
    except BaseException:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise


def valid_for(pyc: bytes, status: os.stat_result, digest: Callable[[], bytes]) -> bool:
    # whether byte code (its header at least) is its source's: by its mtime and size, or by its
    # hash (``digest()``, computed only then)
    flags = int.from_bytes(pyc[4:8], "little")
    if len(pyc) < 16 or pyc[:4] != importlib.util.MAGIC_NUMBER or flags not in (0, 1, 3):
        return False
    if flags == 0:
        return (int.from_bytes(pyc[8:12], "little") == int(status.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(pyc[12:16], "little") == status.st_size & 0xFFFFFFFF)
    return pyc[8:16] == digest()


class Pack:
    # the byte code a batch takes from the base image, in one file (each file made costs far more
    # than its bytes): the build writes each slice into its layer as the .pyc beside its source
    def __init__(self, index: int) -> None:
        self.path = os.path.join(sys.argv[2], f"{index}.pack")
        self.file: BinaryIO | None = None
        self.slices: dict[str, list[int]] = {}
        self.end = 0
        self.broken = False  # a write failed: what follows it would not be where the slices say
    def add(self, path: str, data: bytes) -> None:
        if self.broken:
            raise OSError("the pack could not be written")
        try:
            if self.file is None:
                self.file = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb")
            self.file.write(data)
            self.file.flush()
        except OSError:
            self.broken = True
            raise
        self.slices[path] = [self.end, len(data)]
        self.end += len(data)
    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                if not self.broken:
                    raise
                # the failed write's bytes, still buffered: past every slice, and the file is closed


def resolve_in_base(twin: str) -> tuple[str, os.stat_result]:
    # where the base image's file ``twin`` resolves to, and its status
    status = os.lstat(twin)
    if stat.S_ISLNK(status.st_mode):
        return os.path.realpath(twin), os.stat(twin)
    folder, name = os.path.split(twin)
    if folder not in resolved:
        resolved[folder] = os.path.realpath(folder)
    return os.path.join(resolved[folder], name), status


def borrow(path: str, cached: str, source: bytes, digest: bytes, pack: Pack) -> bool:
    if not borrow_from:
        return False
    inside = path[len(root):].lstrip("/") if path.startswith(root.rstrip("/") + "/") else os.path.relpath(path, root)
    twin = os.path.join(borrow_from, inside)
    try:
        real, status = resolve_in_base(twin)
        if not stat.S_ISREG(status.st_mode) or status.st_size != len(source) or real.startswith(real_root + os.sep):
            return False
        with open(twin, "rb") as file:
            if file.read() != source:
                return False
        with open(importlib.util.cache_from_source(twin), "rb") as file:
            pyc = file.read()
        if not valid_for(pyc, status, lambda: digest) or len(pyc) < 17 or pyc[16] & 0x7F != CODE:
            return False  # not its byte code, or a header fit for it and no code object behind it
    except OSError:
        return False
    pack.add(cached, importlib.util.MAGIC_NUMBER + UNCHECKED_HASH + digest + pyc[16:])
    return True


def finished(index: int, hashes: dict[str, str], packed: dict[str, list[int]]) -> None:
    # ``packed``: the byte code in the batch's pack (the .pyc paths), by the slice that holds it
    marker = os.path.join(sys.argv[2], str(index))  # the loader waits for this batch's files
    with open(marker + ".partial", "w") as file:
        json.dump({"hashes": hashes, "packed": packed}, file)
    os.replace(marker + ".partial", marker)


def scan(job: tuple[int, list[str]]) -> tuple[int, tuple[int, int, int], dict[str, str], list[tuple[str, str]],
                                            dict[str, list[int]]]:
    # in a long-lived worker: what needs no compiler; the batch is finished here if nothing is left
    index, paths = job
    adopted = failed = borrowed = 0
    hashes, left = {}, []
    pack = Pack(index)
    for path in paths:
        cached = importlib.util.cache_from_source(path)
        if not beside(cached):
            failed += 1
            continue
        if adopt(path, cached):
            adopted += 1
            continue
        try:
            with open(path, "rb") as file:
                source = file.read()
        except OSError:
            failed += 1
            continue
        digest = importlib.util.source_hash(source)
        try:
            borrowed_it = borrow(path, cached, source, digest, pack)
        except OSError:  # its pack could not be written (nor can the next ones be): compiled instead
            borrowed_it = False
        if borrowed_it:
            borrowed += 1
            hashes[path] = digest.hex()
        else:
            left.append((path, digest.hex()))
    pack.close()
    if not left:
        finished(index, hashes, pack.slices)
    return index, (adopted, failed, borrowed), hashes, left, pack.slices


def compile_left(job: tuple[int, dict[str, str], list[tuple[str, str]], dict[str, list[int]]]) -> int:
    # in a new process of its own: the batch's files no byte code was found for
    index, hashes, left, packed = job
    failed = 0
    for path, digest in left:
        try:
            py_compile.compile(path, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            hashes[path] = digest
        except Exception:
            failed += 1
    finished(index, hashes, packed)
    return failed


if __name__ == "__main__":
    UMASK = os.umask(0o022)
    os.umask(UMASK)
    mine = "%d.%d" % sys.version_info[:2]
    said = os.path.join(os.path.dirname(sys.argv[1]), "python")  # for the build to check, whole when it appears
    with open(said + ".partial", "w") as file:
        file.write(mine)
    os.replace(said + ".partial", said)
    give_up = time.monotonic() + float(sys.argv[3])  # started while the build plans: the batches come after
    while not os.path.exists(sys.argv[1]):
        if time.monotonic() > give_up:
            sys.exit("no batches came: the build that started this container has ended")
        time.sleep(0.01)
    plan = json.load(open(sys.argv[1]))
    batches, wanted = (plan["batches"], plan.get("python")) if isinstance(plan, dict) else (plan, None)
    if wanted and wanted != mine:
        sys.exit(f"the base image's Python {mine} does not compile for the environment's Python {wanted}")
    root = plan.get("root", "/") if isinstance(plan, dict) else "/"
    real_root = os.path.realpath(root)
    borrow_from = plan.get("borrow_from") if isinstance(plan, dict) else None
    totals, compiling = [0, 0, 0], []
    with multiprocessing.Pool() as scanning, multiprocessing.Pool(maxtasksperchild=1) as compilers:
        for index, counts, hashes, left, packed in scanning.imap_unordered(scan, list(enumerate(batches)), chunksize=1):
            totals = [total + count for total, count in zip(totals, counts)]
            if left:
                compiling.append(compilers.apply_async(compile_left, ((index, hashes, left, packed),)))
        totals[1] += sum(result.get() for result in compiling)
    adopted, failed, borrowed = totals
    print(f"compiled {sum(map(len, batches)) - adopted - failed - borrowed} files, took the base image's byte code of "
          f"{borrowed} identical ones, adopted the byte code of {adopted} from their packages ({failed} did not compile)")
