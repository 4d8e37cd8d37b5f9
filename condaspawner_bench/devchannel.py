"""A real local conda channel, built offline, for tests, the demo and CI.

No conda channel is reachable here, so this module writes one: synthetic
``cs-*`` packages for fast solver tests, a relocatable ``python`` made from the
machine's pyenv CPython (built with ``--enable-shared``), and ``pip``,
``setuptools``, ``wheel`` and ``ipykernel``'s closure converted from PyPI wheels.
The channel is indexed with py-rattler and is usable by ``rattler.solve`` and
``rattler.install`` like any other channel. realchannel.py reuses the wheel conversion
and the writer (its large packages as ``.conda``) for opt-in channels of real packages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import configparser
import contextlib
import fcntl
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from email.parser import HeaderParser
from pathlib import Path
from typing import IO

import rattler.index
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from .phases import PhaseLog

# Bump whenever the way packages are written changes: it invalidates built channels.
RECIPE_VERSION = 3  # 2: linux-64 packages (python too) ship their byte code; 3: dated apart from the layers' mtime

PREFIX_PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"
TARGET_PYTHON = "3.9"
PYTHON_BUILD = "h_cs_0"
PYTHON_ABI_BUILD = "0_cp39"
INFO_FILE = "channel-info.json"
# Fixed so that the same recipe writes byte-identical packages (stable sha256); not the
# product's fixed layer mtime (layers.LAYER_MTIME): a package's files keep their own in an
# image, and the tests would not see it if the two were the same, as real packages' are not.
PACKAGE_TIMESTAMP = 1_650_000_000


@dataclass(frozen=True)
class SyntheticPackage:
    """A tiny ``noarch: generic`` package that installs ``share/<name>/VERSION``."""

    name: str
    version: str
    depends: tuple[str, ...] = ()


SYNTHETIC_PACKAGES: tuple[SyntheticPackage, ...] = (
    SyntheticPackage("cs-alpha", "1.0"),
    SyntheticPackage("cs-alpha", "1.1"),
    SyntheticPackage("cs-alpha", "2.0"),
    SyntheticPackage("cs-beta", "1.0", ("cs-alpha >=1.1,<2",)),
    SyntheticPackage("cs-gamma", "0.5", ("cs-alpha", "cs-beta")),
    SyntheticPackage("cs-cuda-kernels", "1.0", ("__cuda >=12",)),
    SyntheticPackage("cs-conflict", "1.0", ("cs-alpha <1.1", "cs-beta")),
)
SYNTHETIC_VERSIONS: dict[str, tuple[str, ...]] = {
    name: tuple(p.version for p in SYNTHETIC_PACKAGES if p.name == name)
    for name in dict.fromkeys(p.name for p in SYNTHETIC_PACKAGES)
}

# The full closure for Python 3.9 on linux-64, pinned. pip cannot compute it:
# `pip download --python-version` still evaluates markers for the running
# interpreter, which drops e.g. exceptiongroup and importlib-metadata.
WHEEL_PINS: tuple[str, ...] = (
    "pip==26.0.1",
    "setuptools==82.0.1",
    "wheel==0.48.0",
    "ipykernel==6.31.0",
    "asttokens==3.0.2",
    "comm==0.2.3",
    "debugpy==1.8.21",
    "decorator==5.3.1",
    "exceptiongroup==1.3.2",
    "executing==2.3.0",
    "importlib-metadata==8.7.1",
    "ipython==8.18.1",
    "jedi==0.19.2",
    "jupyter-client==8.6.3",
    "jupyter-core==5.8.1",
    "matplotlib-inline==0.2.2",
    "nest-asyncio==1.6.0",
    "packaging==26.3",
    "parso==0.8.7",
    "pexpect==4.9.0",
    "platformdirs==4.4.0",
    "prompt-toolkit==3.0.52",
    "psutil==7.2.2",
    "ptyprocess==0.7.0",
    "pure-eval==0.2.4",
    "pygments==2.21.0",
    "python-dateutil==3.0.0",
    "pyzmq==27.3.0",
    "six==1.17.0",
    "stack-data==0.6.3",
    "tornado==6.5.10",
    "traitlets==5.15.1",
    "typing-extensions==4.16.0",
    "tzdata==2026.6",
    "wcwidth==0.9.4",
    "zipp==3.23.1",
)
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")

# Trimmed from the stdlib: tests, IDLE and demos are a third of its size.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"__pycache__", "test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages"}
)
STDLIB_EXCLUDED_FILE = re.compile(r"libpython.*\.a|_(ctypes_)?test.*\.so|_xxtestfuzz.*\.so")


class PythonUnavailable(Exception):
    """No CPython of the target version built with --enable-shared was found."""


@dataclass(frozen=True)
class PythonSource:
    """A local CPython installation a ``python`` conda package can be made from."""

    prefix: Path
    version: str


@dataclass(frozen=True)
class ChannelInfo:
    """What a built channel holds; read back with :func:`read_channel_info`."""

    url: str
    path: Path
    recipe: str
    python_version: str | None
    python_skip_reason: str | None
    packages: tuple[str, ...]

    @property
    def python_available(self) -> bool:
        return self.python_version is not None


@dataclass
class PackageFile:
    """One file (or symlink) inside a conda package, path relative to the prefix."""

    path: str
    data: bytes = b""
    executable: bool = False
    link_target: str | None = None
    prefix_placeholder: str | None = None


@dataclass
class CondaPackage:
    name: str
    version: str
    build: str
    subdir: str
    depends: list[str] = field(default_factory=list)
    constrains: list[str] = field(default_factory=list)
    noarch: str | None = None
    entry_points: list[str] = field(default_factory=list)
    files: list[PackageFile] = field(default_factory=list)
    # "tar.bz2" (small packages), or "conda" (zstd: for packages of hundreds of MB, where
    # bz2 takes minutes to write and to extract)
    archive: str = "tar.bz2"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.build}.{self.archive}"


# ---------------------------------------------------------------- public API


def build_dev_channel(
    directory: Path,
    *,
    include_python: bool = True,
    include_wheels: bool = True,
    progress: Callable[[str], None] | None = None,
    download_dir: Path | None = None,
    phases: PhaseLog | None = None,
) -> str:
    """Build (or reuse) the dev channel in ``directory``; return its file:// URL.

    Rebuilds only when the recipe changed. Wheels are cached in
    ``download_dir`` (default ``directory/.downloads``) across rebuilds.
    ``phases`` records how long the wheel downloads took.
    """
    say = progress or (lambda message: None)
    phases = phases or PhaseLog()
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    python = find_python_or_reason() if include_python else "python not requested"
    recipe = _recipe_hash(python, include_python=include_python, include_wheels=include_wheels)

    if is_built(directory, recipe):
        return directory.as_uri()
    with exclusive_lock(directory / ".lock"):
        if is_built(directory, recipe):
            return directory.as_uri()
        started = time.monotonic()
        packages = dev_packages(
            python, include_wheels, download_dir or directory / ".downloads", say, phases
        )
        _write_channel(directory, packages, say)
        write_channel_info(directory, recipe, python, [package_path(package) for package in packages])
        say(f"dev channel: built {len(packages)} packages in {time.monotonic() - started:.1f} s")
    return directory.as_uri()


def read_channel_info(directory: Path) -> ChannelInfo | None:
    """The description of the channel built in ``directory``, or None if none is."""
    directory = Path(directory).resolve()
    try:
        raw = json.loads((directory / INFO_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return ChannelInfo(
        url=directory.as_uri(),
        path=directory,
        recipe=raw["recipe"],
        python_version=raw["python_version"],
        python_skip_reason=raw["python_skip_reason"],
        packages=tuple(raw["packages"]),
    )


def find_shared_python(minor: str = TARGET_PYTHON) -> PythonSource:
    """The newest pyenv CPython ``minor``.x that has a shared libpython.

    Raises :class:`PythonUnavailable` with the reason when there is none.
    """
    versions_dir = _pyenv_root() / "versions"
    pattern = re.compile(rf"{re.escape(minor)}\.\d+")
    candidates = sorted(
        (entry for entry in _list_dir(versions_dir) if pattern.fullmatch(entry)),
        key=Version,
        reverse=True,
    )
    if not candidates:
        raise PythonUnavailable(f"pyenv has no CPython {minor}.x in {versions_dir}")
    prefix = versions_dir / candidates[0]
    if not (prefix / "lib" / f"libpython{minor}.so").exists():
        raise PythonUnavailable(
            f"pyenv CPython {candidates[0]} at {prefix} was built without --enable-shared "
            f"(no lib/libpython{minor}.so)"
        )
    return PythonSource(prefix=prefix, version=candidates[0])


# ---------------------------------------------------------------- orchestration


def find_python_or_reason() -> PythonSource | str:
    """The pyenv CPython the ``python`` package is made from, or why there is none."""
    try:
        return find_shared_python()
    except PythonUnavailable as unavailable:
        return str(unavailable)


def _recipe_hash(python: PythonSource | str, *, include_python: bool, include_wheels: bool) -> str:
    recipe = {
        "recipe_version": RECIPE_VERSION,
        "synthetic": [asdict(package) for package in SYNTHETIC_PACKAGES],
        "wheels": list(WHEEL_PINS) if include_wheels else None,
        "include_python": include_python,
        "python": asdict(python) if isinstance(python, PythonSource) else python,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def is_built(directory: Path, recipe: str) -> bool:
    """Whether ``directory`` holds an indexed channel built from ``recipe``."""
    info = read_channel_info(directory)
    indexed = (directory / "noarch" / "repodata.json").exists()
    return indexed and info is not None and info.recipe == recipe


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def dev_packages(
    python: PythonSource | str,
    include_wheels: bool,
    download_dir: Path,
    say: Callable[[str], None],
    phases: PhaseLog,
) -> list[CondaPackage]:
    """The dev channel's packages: synthetic ones, python (if found), ipykernel's closure."""
    packages = [_synthetic_package(spec) for spec in SYNTHETIC_PACKAGES]
    if isinstance(python, PythonSource):
        say(f"dev channel: packaging python {python.version} from {python.prefix}")
        packages += [python_package(python), _python_abi_package()]
    else:
        say(f"dev channel: skipping the python package: {python}")
    if include_wheels:
        wheels = download_wheels(WHEEL_PINS, download_dir, say, phases)
        say(f"dev channel: converting {len(wheels)} wheels")
        full_version = target_python_version(python)
        compiler = python_interpreter(python) if isinstance(python, PythonSource) else None
        packages += [wheel_to_conda_package(wheel, full_version, compile_with=compiler) for wheel in wheels]
    return packages


def python_interpreter(python: PythonSource) -> Path:
    """The interpreter of a pyenv CPython."""
    return python.prefix / "bin" / f"python{TARGET_PYTHON}"


def target_python_version(python: PythonSource | str) -> str:
    """The full Python version wheels are converted for (markers evaluated against)."""
    return python.version if isinstance(python, PythonSource) else f"{TARGET_PYTHON}.0"


def package_path(package: CondaPackage) -> str:
    """``<subdir>/<filename>``: where ``package`` lies in its channel."""
    return f"{package.subdir}/{package.filename}"


def _write_channel(
    directory: Path, packages: list[CondaPackage], say: Callable[[str], None]
) -> None:
    (directory / INFO_FILE).unlink(missing_ok=True)
    for subdir in ("noarch", "linux-64"):
        shutil.rmtree(directory / subdir, ignore_errors=True)
        (directory / subdir).mkdir()
    say(f"dev channel: writing {len(packages)} packages")
    # bz2 dominates the build time and releases the GIL: threads use both cores.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(lambda package: write_conda_package(package, directory), packages))
    say("dev channel: indexing")
    run_blocking(index_channel(directory))


def write_channel_info(
    directory: Path, recipe: str, python: PythonSource | str, package_paths: list[str]
) -> None:
    """Record what the channel in ``directory`` holds (read back by :func:`read_channel_info`)."""
    info = {
        "recipe": recipe,
        "python_version": python.version if isinstance(python, PythonSource) else None,
        "python_skip_reason": None if isinstance(python, PythonSource) else python,
        "packages": sorted(package_paths),
    }
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


async def index_channel(directory: Path) -> None:
    """Index a channel directory with py-rattler (repodata.json per subdir)."""
    await rattler.index.index_fs(directory, write_zst=False, write_shards=False, force=True)
    with contextlib.suppress(OSError):
        (directory / ".tmp").rmdir()  # the indexer's staging folder, left empty


def run_blocking(coroutine) -> None:
    """Run ``coroutine`` to completion, even when called from inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coroutine).result()


# ---------------------------------------------------------------- conda package writer


def write_conda_package(package: CondaPackage, channel_dir: Path) -> Path:
    """Write ``package`` into ``channel_dir/<subdir>/`` as its ``archive`` says.

    ``.tar.bz2``: one bz2 tar. ``.conda``: a stored zip of ``metadata.json`` and two
    zstd tars (``pkg-*``, then ``info-*``), compressed by the ``zstd`` command (no zstd
    module is installed). Both are deterministic: fixed mtimes, owners and order.
    """
    target = Path(channel_dir) / package.subdir / package.filename
    info_files = _info_files(package)
    payload = sorted(package.files, key=lambda f: f.path)
    if package.archive == "tar.bz2":
        with tarfile.open(target, "w:bz2") as archive:
            for member in info_files + payload:
                archive.addfile(*_tar_entry(member))
        return target
    if package.archive != "conda":
        raise ValueError(f"unknown conda package archive format: {package.archive}")
    stem = package.filename.removesuffix(".conda")
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
        metadata = json.dumps({"conda_pkg_format_version": 2}).encode()
        archive.writestr(_zip_entry("metadata.json", len(metadata)), metadata)
        for kind, members in (("pkg", payload), ("info", info_files)):
            with tempfile.TemporaryFile(dir=target.parent) as compressed:
                _write_zstd_tar(members, compressed)
                size = compressed.seek(0, os.SEEK_END)
                compressed.seek(0)
                with archive.open(_zip_entry(f"{kind}-{stem}.tar.zst", size), "w") as entry:
                    shutil.copyfileobj(compressed, entry, 1 << 20)
    partial.replace(target)
    return target


# zstd's level 3 (its default) writes ~100+ MB/s on one slow core; one thread each, so the
# bytes are the same on every machine with this zstd (its multi-threaded frames differ).
ZSTD_COMMAND = ("zstd", "-3", "-T1", "-q", "-c")


def _write_zstd_tar(members: list[PackageFile], output: IO[bytes]) -> None:
    if shutil.which(ZSTD_COMMAND[0]) is None:
        raise RuntimeError("writing .conda packages needs the zstd command (apt-get install zstd)")
    with subprocess.Popen(ZSTD_COMMAND, stdin=subprocess.PIPE, stdout=output) as zstd:
        assert zstd.stdin is not None
        with tarfile.open(fileobj=zstd.stdin, mode="w|") as archive:
            for member in members:
                archive.addfile(*_tar_entry(member))
        zstd.stdin.close()
    if zstd.returncode != 0:
        raise RuntimeError(f"zstd failed with exit status {zstd.returncode}")


def _zip_entry(name: str, size: int) -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(name, date_time=time.gmtime(PACKAGE_TIMESTAMP)[:6])
    entry.compress_type = zipfile.ZIP_STORED
    entry.external_attr = 0o644 << 16
    entry.file_size = size
    return entry


def _info_files(package: CondaPackage) -> list[PackageFile]:
    index = {
        "name": package.name,
        "version": package.version,
        "build": package.build,
        "build_number": 0,
        "depends": package.depends,
        "constrains": package.constrains,
        "subdir": package.subdir,
        "timestamp": PACKAGE_TIMESTAMP * 1000,
        "license": "see upstream",
    }
    if package.noarch:
        index["noarch"] = package.noarch
    else:
        index.update(platform="linux", arch="x86_64")
    files = [
        _json_file("info/index.json", index),
        _json_file("info/paths.json", {"paths": _paths_entries(package), "paths_version": 1}),
        PackageFile("info/files", "".join(f"{f.path}\n" for f in package.files).encode()),
    ]
    prefixed = [f for f in package.files if f.prefix_placeholder]
    if prefixed:
        lines = "".join(f"{f.prefix_placeholder} text {f.path}\n" for f in prefixed)
        files.append(PackageFile("info/has_prefix", lines.encode()))
    if package.noarch == "python":
        link = {
            "noarch": {"type": "python", "entry_points": package.entry_points},
            "package_metadata_version": 1,
        }
        files.append(_json_file("info/link.json", link))
    return files


def _paths_entries(package: CondaPackage) -> list[dict]:
    entries = []
    for member in sorted(package.files, key=lambda f: f.path):
        if member.link_target is not None:
            entries.append({"_path": member.path, "path_type": "softlink"})
            continue
        entry = {
            "_path": member.path,
            "path_type": "hardlink",
            "sha256": hashlib.sha256(member.data).hexdigest(),
            "size_in_bytes": len(member.data),
        }
        if member.prefix_placeholder:
            entry.update(prefix_placeholder=member.prefix_placeholder, file_mode="text")
        entries.append(entry)
    return entries


def _json_file(path: str, content: dict) -> PackageFile:
    return PackageFile(path, (json.dumps(content, indent=2, sort_keys=True) + "\n").encode())


def _tar_entry(member: PackageFile) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    entry = tarfile.TarInfo(member.path)
    entry.mtime = PACKAGE_TIMESTAMP
    if member.link_target is not None:
        entry.type = tarfile.SYMTYPE
        entry.linkname = member.link_target
        entry.mode = 0o777
        return entry, None
    entry.size = len(member.data)
    entry.mode = 0o755 if member.executable else 0o644
    return entry, io.BytesIO(member.data)


# ---------------------------------------------------------------- synthetic packages


def _synthetic_package(spec: SyntheticPackage) -> CondaPackage:
    share = f"share/{spec.name}"
    return CondaPackage(
        name=spec.name,
        version=spec.version,
        build="h_cs_0",
        subdir="noarch",
        noarch="generic",
        depends=list(spec.depends),
        files=[
            PackageFile(f"{share}/VERSION", f"{spec.version}\n".encode()),
            # Rewritten to the install prefix: lets tests check prefix relocation.
            PackageFile(
                f"{share}/PREFIX",
                f"{PREFIX_PLACEHOLDER}\n".encode(),
                prefix_placeholder=PREFIX_PLACEHOLDER,
            ),
        ],
    )


# ---------------------------------------------------------------- python from pyenv


def _pyenv_root() -> Path:
    if os.environ.get("PYENV_ROOT"):
        return Path(os.environ["PYENV_ROOT"])
    if shutil.which("pyenv") is None:
        raise PythonUnavailable("pyenv is not on PATH and PYENV_ROOT is not set")
    result = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PythonUnavailable(f"`pyenv root` failed: {result.stderr.strip()}")
    return Path(result.stdout.strip())


def _list_dir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


def python_package(python: PythonSource) -> CondaPackage:
    """The ``python`` package of a shared-library CPython build (relocated: runpaths, prefixes)."""
    minor = ".".join(python.version.split(".")[:2])
    old_prefix = str(python.prefix)
    sources = [
        f"bin/python{minor}",
        "bin/python3",
        "bin/python",
        f"lib/libpython{minor}.so",
        f"lib/libpython{minor}.so.1.0",
        "lib/libpython3.so",
        *_tree_files(python.prefix, f"lib/python{minor}"),
        *_tree_files(python.prefix, "include"),
        *_tree_files(python.prefix, "lib/pkgconfig"),
    ]
    files = [_relocatable_file(python.prefix, path, old_prefix) for path in sources]
    files.append(PackageFile(f"lib/python{minor}/site-packages/README.txt", b"site-packages\n"))
    present = [f for f in files if f is not None]
    return CondaPackage(
        name="python",
        version=python.version,
        build=PYTHON_BUILD,
        subdir="linux-64",
        files=present + shipped_byte_code(present, python_interpreter(python)),  # conda-forge's ships the stdlib's
    )


def _python_abi_package() -> CondaPackage:
    return CondaPackage(
        name="python_abi",
        version=TARGET_PYTHON,
        build=PYTHON_ABI_BUILD,
        subdir="linux-64",
        constrains=[f"python {TARGET_PYTHON}.*"],
    )


def _tree_files(prefix: Path, relative_root: str) -> Iterator[str]:
    """Files and symlinks under ``prefix/relative_root``, minus the trimmed stdlib parts."""
    for root, dirs, names in os.walk(prefix / relative_root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        for name in names:
            if not STDLIB_EXCLUDED_FILE.fullmatch(name):
                yield os.path.relpath(os.path.join(root, name), prefix)


def _relocatable_file(prefix: Path, relative: str, old_prefix: str) -> PackageFile | None:
    source = prefix / relative
    if source.is_symlink():
        return PackageFile(relative, link_target=os.readlink(source))
    if not source.exists():
        return None
    data = source.read_bytes()
    executable = os.access(source, os.X_OK)
    if data.startswith(b"\x7fELF"):
        data = relocate_elf_runpath(data, old_prefix, posixpath.dirname(relative))
        return PackageFile(relative, data, executable=executable)
    is_text = b"\0" not in data
    placeholder = old_prefix if is_text and old_prefix.encode() in data else None
    return PackageFile(relative, data, executable=executable, prefix_placeholder=placeholder)


# ---------------------------------------------------------------- ELF RUNPATH rewrite

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 0, 5, 15, 29


def relocate_elf_runpath(data: bytes, old_prefix: str, file_dir: str) -> bytes:
    """Rewrite RPATH/RUNPATH entries under ``old_prefix`` to ``$ORIGIN``-relative ones.

    ``file_dir`` is the file's directory relative to the prefix. The string is
    replaced in place and NUL-padded, so nothing else in the file moves.
    Only 64-bit little-endian ELF files are handled (linux-64).
    """
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        return data
    patched = bytearray(data)
    for offset in _runpath_string_offsets(patched):
        end = patched.index(b"\0", offset)
        old = patched[offset:end].decode()
        new = ":".join(_relative_entry(entry, old_prefix, file_dir) for entry in old.split(":"))
        if len(new) > len(old):
            raise ValueError(f"relocated RUNPATH {new!r} is longer than {old!r}")
        patched[offset:end] = new.encode().ljust(end - offset, b"\0")
    return bytes(patched)


def _relative_entry(entry: str, old_prefix: str, file_dir: str) -> str:
    if entry != old_prefix and not entry.startswith(old_prefix + "/"):
        return entry
    target = entry[len(old_prefix) :].lstrip("/") or "."
    relative = posixpath.relpath(target, file_dir or ".")
    return "$ORIGIN" if relative == "." else f"$ORIGIN/{relative}"


def _runpath_string_offsets(elf: bytearray) -> list[int]:
    (program_headers_offset,) = struct.unpack_from("<Q", elf, 0x20)
    entry_size, entry_count = struct.unpack_from("<HH", elf, 0x36)
    segments = [
        struct.unpack_from("<IIQQQQQQ", elf, program_headers_offset + i * entry_size)
        for i in range(entry_count)
    ]
    dynamic = next((s for s in segments if s[0] == _PT_DYNAMIC), None)
    if dynamic is None:
        return []
    tags: dict[int, list[int]] = {}
    for position in range(dynamic[2], dynamic[2] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", elf, position)
        if tag == _DT_NULL:
            break
        tags.setdefault(tag, []).append(value)
    if _DT_STRTAB not in tags:
        return []
    string_table = _file_offset(segments, tags[_DT_STRTAB][0])
    return [string_table + value for tag in (_DT_RPATH, _DT_RUNPATH) for value in tags.get(tag, [])]


def _file_offset(segments: list[tuple], address: int) -> int:
    for p_type, _flags, offset, vaddr, _paddr, filesz, _memsz, _align in segments:
        if p_type == _PT_LOAD and vaddr <= address < vaddr + filesz:
            return address - vaddr + offset
    raise ValueError(f"address {address:#x} is in no loadable segment")


# ---------------------------------------------------------------- wheels


def download_wheels(
    pins: Sequence[str],
    download_dir: Path,
    say: Callable[[str], None],
    phases: PhaseLog,
    phase_name: str = "conda channel: pip download",
) -> list[Path]:
    """One wheel per pin (``name==version``), from the cache or downloaded for Python 3.9
    linux x86_64. Processes that share ``download_dir`` take turns (a file lock)."""
    download_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(download_dir / ".lock"):
        missing = [pin for pin in pins if _cached_wheel(download_dir, pin) is None]
        if missing:
            say(f"downloading {len(missing)} wheels into {download_dir}")
            with phases(phase_name) as phase:
                phase.note = f"{len(missing)} wheels from PyPI"
                _pip_download(missing, download_dir)
    found = [_cached_wheel(download_dir, pin) for pin in pins]
    absent = [pin for pin, wheel in zip(pins, found, strict=True) if wheel is None]
    if absent:
        raise RuntimeError(f"pip did not download: {', '.join(absent)}")
    return [wheel for wheel in found if wheel is not None]


def _cached_wheel(download_dir: Path, pin: str) -> Path | None:
    requirement = Requirement(pin)
    wanted_name = canonicalize_name(requirement.name)
    for wheel in sorted(download_dir.glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        if name == wanted_name and version in requirement.specifier:
            return wheel
    return None


def _pip_download(pins: Sequence[str], download_dir: Path) -> None:
    platform_args = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    python_tag = TARGET_PYTHON.replace(".", "")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", "--python-version", TARGET_PYTHON,
        "--implementation", "cp", "--abi", f"cp{python_tag}",
        *platform_args, "--dest", str(download_dir), *pins,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip download failed:\n{result.stderr[-3000:]}")


@dataclass
class _Wheel:
    """The parts of a wheel a conda package is made from."""

    name: str
    version: str
    dist_info: str
    purelib: bool
    requires_python: str | None
    requires: list[str]
    scripts: dict[str, str]  # script name -> "module:function"
    members: list[tuple[str, bytes, bool]]  # path in wheel, data, executable


def _read_wheel(path: Path) -> _Wheel:
    with zipfile.ZipFile(path) as archive:
        dist_info = _dist_info_dir(archive)
        metadata = HeaderParser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        wheel_info = HeaderParser().parsestr(archive.read(f"{dist_info}/WHEEL").decode())
        members = [
            (item.filename, archive.read(item), bool((item.external_attr >> 16) & 0o111))
            for item in archive.infolist()
            if not item.is_dir()
        ]
        scripts = _console_scripts(archive, f"{dist_info}/entry_points.txt")
    return _Wheel(
        name=canonicalize_name(metadata["Name"]),
        version=metadata["Version"],
        dist_info=dist_info,
        purelib=wheel_info.get("Root-Is-Purelib", "").strip().lower() == "true",
        requires_python=metadata.get("Requires-Python"),
        requires=metadata.get_all("Requires-Dist") or [],
        scripts=scripts,
        members=members,
    )


def _dist_info_dir(archive: zipfile.ZipFile) -> str:
    # Top-level only: setuptools vendors other projects' .dist-info directories.
    top_level = {name.split("/")[0] for name in archive.namelist() if name.count("/") == 1}
    matches = [d for d in top_level if d.endswith(".dist-info")]
    if len(matches) != 1:
        raise ValueError(f"{archive.filename}: expected one top-level .dist-info, got {matches}")
    return matches[0]


def _console_scripts(archive: zipfile.ZipFile, entry_points_path: str) -> dict[str, str]:
    if entry_points_path not in archive.namelist():
        return {}
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # script names are case-sensitive
    parser.read_string(archive.read(entry_points_path).decode())
    return {
        name: target.strip()
        for section in ("console_scripts", "gui_scripts")
        if parser.has_section(section)
        for name, target in parser.items(section)
    }


def target_marker_environment(python_full_version: str) -> dict[str, str]:
    """PEP 508 marker values for CPython ``python_full_version`` on linux x86_64."""
    environment = default_environment()
    environment.update(
        python_version=".".join(python_full_version.split(".")[:2]),
        python_full_version=python_full_version,
        implementation_name="cpython",
        implementation_version=python_full_version,
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
    )
    return environment


def conda_dependency(requirement: str, environment: dict[str, str]) -> str | None:
    """A PEP 508 requirement as a conda spec, or None if its marker excludes it.

    Extras are dropped: conda packages have none.
    """
    parsed = Requirement(requirement)
    if parsed.url:
        raise ValueError(f"direct URL requirements cannot be converted: {requirement}")
    if parsed.marker is not None and not parsed.marker.evaluate({**environment, "extra": ""}):
        return None
    return _conda_spec(canonicalize_name(parsed.name), parsed.specifier)


def _conda_spec(name: str, specifier: SpecifierSet) -> str:
    clauses = [f"=={spec.version}" if spec.operator == "===" else str(spec) for spec in specifier]
    return f"{name} {','.join(sorted(clauses))}" if clauses else name


def wheel_to_conda_package(
    path: Path, python_full_version: str, *, extra_depends: Sequence[str] = (), archive: str = "tar.bz2",
    compile_with: Path | None = None,
) -> CondaPackage:
    """A conda package from a wheel: ``noarch: python`` if pure, else linux-64 for that Python.

    A wheel tagged for a platform is not pure even when it says ``Root-Is-Purelib``
    (NVIDIA's CUDA library wheels do: ``py3-none-manylinux...``, full of ``.so`` files).
    ``extra_depends`` are added to the wheel's own requirements (``__cuda >=12``, say).
    ``compile_with``: that Python's interpreter, to ship a linux-64 package's byte code as
    conda-build does (:func:`shipped_byte_code`); None ships none.
    """
    wheel = _read_wheel(path)
    environment = target_marker_environment(python_full_version)
    depends = [spec for spec in (conda_dependency(r, environment) for r in wheel.requires) if spec]
    depends += extra_depends
    _name, _version, _build, tags = parse_wheel_filename(path.name)
    if wheel.purelib and all(tag.platform == "any" for tag in tags):
        python_spec = SpecifierSet(wheel.requires_python or "")
        return CondaPackage(
            name=wheel.name,
            version=wheel.version,
            build="pyh_cs_0",
            subdir="noarch",
            noarch="python",
            depends=sorted(set(depends + [_conda_spec("python", python_spec)])),
            entry_points=[f"{name} = {target}" for name, target in sorted(wheel.scripts.items())],
            files=_wheel_files(wheel, "site-packages", "python-scripts"),
            archive=archive,
        )
    minor = ".".join(python_full_version.split(".")[:2])
    next_minor = f"{minor.split('.')[0]}.{int(minor.split('.')[1]) + 1}"
    abi = f"cp{minor.replace('.', '')}"
    files = _wheel_files(wheel, f"lib/python{minor}/site-packages", "bin")
    if compile_with is not None:
        files += shipped_byte_code(files, compile_with)
    return CondaPackage(
        name=wheel.name,
        version=wheel.version,
        build=f"py{minor.replace('.', '')}h_cs_0",
        subdir="linux-64",
        depends=sorted(
            set(depends + [f"python >={minor},<{next_minor}.0a0", f"python_abi {minor}.* *_{abi}"])
        ),
        files=files + [_entry_point_script(name, target, minor) for name, target in wheel.scripts.items()],
        archive=archive,
    )


# Run by the target CPython: compile the relative paths on stdin under argv[1], as conda-build
# does (`python -m py_compile` from the prefix: timestamp-checked, named by the relative path).
_SHIP_BYTE_CODE = """
import os, py_compile, sys
for path in sys.stdin.read().splitlines():
    try:
        py_compile.compile(os.path.join(sys.argv[1], path), dfile=path, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    except py_compile.PyCompileError:
        pass  # conda-build ships no byte code for a file that does not compile either
"""


def shipped_byte_code(files: Sequence[PackageFile], python: Path) -> list[PackageFile]:
    """The byte code conda-build puts in a package that is not noarch: each ``.py`` outside
    ``bin/`` whose byte code is missing, compiled by the package's Python, checked against
    the source's mtime (the package's fixed one, which conda gives the installed file) and size. Deterministic:
    one process, a fixed hash seed."""
    have = {file.path for file in files}
    sources = [file for file in files if file.path.endswith(".py") and not file.path.startswith("bin/")
               and file.link_target is None and _cached_path(file.path) not in have]  # numpy's wheel has one
    if not sources:
        return []
    with tempfile.TemporaryDirectory(prefix="cs-byte-code-") as root:
        for file in sources:
            target = Path(root, file.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.data)
            os.utime(target, (PACKAGE_TIMESTAMP, PACKAGE_TIMESTAMP))
        subprocess.run([str(python), "-s", "-c", _SHIP_BYTE_CODE, root], input="\n".join(f.path for f in sources),
                       text=True, check=True, env={"PYTHONHASHSEED": "0", "PATH": os.environ.get("PATH", "")})
        compiled = sorted(_cached_path(file.path) for file in sources)
        return [PackageFile(path, Path(root, path).read_bytes()) for path in compiled if Path(root, path).exists()]


def _cached_path(source: str) -> str:
    """Where CPython (the target version) keeps the byte code of ``source``."""
    folder, name = posixpath.split(source)
    return posixpath.join(folder, "__pycache__", f"{name[:-3]}.cpython-{TARGET_PYTHON.replace('.', '')}.pyc")


def _wheel_files(wheel: _Wheel, site_packages: str, scripts_dir: str) -> list[PackageFile]:
    data_dir = wheel.dist_info.removesuffix(".dist-info") + ".data/"
    files = []
    for member, data, executable in wheel.members:
        destination, is_script = _wheel_member_destination(
            member, data_dir, site_packages, scripts_dir
        )
        placeholder = None
        if is_script and data.startswith(b"#!python"):
            data = b"#!" + PREFIX_PLACEHOLDER.encode() + b"/bin/python" + data[len(b"#!python") :]
            placeholder = PREFIX_PLACEHOLDER
        files.append(
            PackageFile(destination, data, executable or is_script, prefix_placeholder=placeholder)
        )
    files.append(PackageFile(f"{site_packages}/{wheel.dist_info}/INSTALLER", b"conda\n"))
    return files


def _wheel_member_destination(
    member: str, data_dir: str, site_packages: str, scripts_dir: str
) -> tuple[str, bool]:
    """Where a wheel member goes in the prefix, and whether it is a script."""
    if not member.startswith(data_dir):
        return f"{site_packages}/{member}", False
    scheme, _, rest = member[len(data_dir) :].partition("/")
    if scheme in ("purelib", "platlib"):
        return f"{site_packages}/{rest}", False
    if scheme == "scripts":
        return f"{scripts_dir}/{rest}", True
    if scheme == "headers":
        return f"include/{rest}", False
    return rest, False  # "data": relative to the prefix


def _entry_point_script(name: str, target: str, minor: str) -> PackageFile:
    """A console script for a linux-64 package (conda only makes them for noarch ones)."""
    module, _, function = target.partition(":")
    script = (
        f"#!{PREFIX_PLACEHOLDER}/bin/python{minor}\n"
        "import sys\n"
        f"from {module} import {function.split('.')[0]}\n"
        "if __name__ == '__main__':\n"
        f"    sys.exit({function}())\n"
    )
    return PackageFile(
        f"bin/{name}", script.encode(), executable=True, prefix_placeholder=PREFIX_PLACEHOLDER
    )
