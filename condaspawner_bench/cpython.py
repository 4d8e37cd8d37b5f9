"""A second CPython 3.9 patch release for the real ``full`` channel.

Issue 12 measures five PyTorch environments that share layers, one of them on another
python patch release. The dev channel's python is the newest pyenv CPython 3.9 of this
machine; the other release is built here from the upstream source tarball as Debian's
archive carries it (``deb.debian.org`` is reachable from these machines; python.org is
not), checked by its sha256, with a shared libpython and a runpath under its prefix as
pyenv builds it, so that ``devchannel``'s python package recipe applies to it unchanged.
Built once per bench folder (about ten minutes on two cores) and only for the ``full`` set.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .devchannel import PythonSource
from .dockerd import ensure_debian_packages

VERSION = "3.9.2"
SOURCE_URL = "http://deb.debian.org/debian/pool/main/p/python3.9/python3.9_3.9.2.orig.tar.xz"
SOURCE_SHA256 = "3c2034c54f811448f516668dce09d24008a0716c3a794dd8639b5388cbde247d"
BUILT = ".condaspawner-built"  # in the prefix: written last, so that a prefix with it is whole
BUILD_TOOLS = {"gcc": "gcc", "make": "make"}  # command -> Debian package


def second_python(bench_dir: Path, say: Callable[[str], None]) -> PythonSource:
    """The second CPython release, built under ``bench_dir`` unless it is there already."""
    prefix = Path(bench_dir).resolve() / f"cpython-{VERSION}"
    if not (prefix / BUILT).exists():
        ensure_debian_packages(BUILD_TOOLS)
        source = _download(Path(bench_dir) / ".downloads", say)
        shutil.rmtree(prefix, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="cpython-", dir=bench_dir) as work:
            say(f"CPython {VERSION}: building from {source.name} (once per bench folder, about ten minutes)")
            _build(source, Path(work), prefix)
    return PythonSource(prefix=prefix, version=VERSION)


def _download(directory: Path, say: Callable[[str], None]) -> Path:
    target = directory / SOURCE_URL.rsplit("/", 1)[1]
    if target.exists() and _sha256(target) == SOURCE_SHA256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    say(f"CPython {VERSION}: downloading {SOURCE_URL}")
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    with urllib.request.urlopen(SOURCE_URL, timeout=120) as response, partial.open("wb") as out:
        shutil.copyfileobj(response, out)
    digest = _sha256(partial)
    if digest != SOURCE_SHA256:
        partial.unlink()
        raise RuntimeError(f"{SOURCE_URL}: sha256 {digest}, expected {SOURCE_SHA256}")
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _build(source: Path, work: Path, prefix: Path) -> None:
    with tarfile.open(source) as archive:
        archive.extractall(work, filter="data")
    (tree,) = [path for path in work.iterdir() if path.is_dir()]
    log = work / "build.log"

    def run(*command: str) -> None:
        with log.open("a") as out:
            result = subprocess.run(command, cwd=tree, stdout=out, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"CPython {VERSION}: {' '.join(command[:2])} failed:\n" + "\n".join(tail))

    run("./configure", f"--prefix={prefix}", "--enable-shared", f"LDFLAGS=-Wl,-rpath,{prefix}/lib")
    run("make", f"-j{os.cpu_count() or 2}")
    run("make", "install")
    if not (prefix / "bin" / "python").exists():  # pyenv's layout, which the python package lists
        (prefix / "bin" / "python").symlink_to("python3.9")
    (prefix / BUILT).write_text(VERSION + "\n")
