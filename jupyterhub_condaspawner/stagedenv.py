"""A staged environment as its installer left it: each package's files, identity and
package-cache copy, read from ``conda-meta`` once per build.

Every step of the layered route needs them (settling mtimes, planning the layers, the
byte-code cache, the compile batches, placing byte code in layers), and ``conda-meta`` does
not change after the install: compiling adds ``.pyc`` files, never a package record.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

PackageKey = tuple[str, str, str]  # (name, version, build)
# A compiled file and the source it belongs to: dir/__pycache__/name.cpython-39[.opt-1].pyc -> dir/name.py
_PYC = re.compile(r"^(?:(.*)/)?__pycache__/([^/]+?)\.[^./]+(?:\.opt-\d+)?\.pyc$")


def source_of(path: str) -> str | None:
    """The source a compiled file was compiled from (``dir/__pycache__/m.cpython-39.pyc`` ->
    ``dir/m.py``), or None for any other file."""
    if not path.endswith(".pyc"):  # asked of every file of an environment, several times a build
        return None
    match = _PYC.match(path)
    if match is None:
        return None
    directory, stem = match.groups()
    return f"{directory}/{stem}.py" if directory else f"{stem}.py"


@dataclass(frozen=True)
class StagedPackage:
    """One installed package: the files it lists (relative to the prefix), its sha256 ("" when
    unknown) and its folder in the package cache ("" when unknown)."""
    files: tuple[str, ...]
    sha256: str
    extracted: str


@dataclass
class StagedEnvironment:
    """The packages installed in ``root`` (the staging prefix), by (name, version, build)."""
    root: Path
    packages: dict[PackageKey, StagedPackage]

    @classmethod
    def read(cls, root: Path) -> StagedEnvironment:
        packages = {}
        for path in sorted((root / "conda-meta").glob("*.json")):
            record = json.loads(path.read_text())
            key = (str(record["name"]), str(record["version"]), str(record["build"]))
            packages[key] = StagedPackage(tuple(str(file) for file in record.get("files", [])),
                                          str(record.get("sha256") or ""),
                                          str(record.get("extracted_package_dir") or ""))
        return cls(root, packages)

    @cached_property
    def files(self) -> dict[PackageKey, list[str]]:
        """Each package's listed files."""
        return {key: list(package.files) for key, package in self.packages.items()}

    @cached_property
    def listed(self) -> frozenset[str]:
        """Every file some package lists."""
        return frozenset(path for package in self.packages.values() for path in package.files)

    @cached_property
    def source_owners(self) -> dict[str, PackageKey]:
        """The package that lists each Python source (``.py``), by path: whose byte code it is."""
        return {path: key for key, package in self.packages.items() for path in package.files if path.endswith(".py")}

    @cached_property
    def compiled_here(self) -> frozenset[PackageKey]:
        """The packages with Python files under ``lib/`` whose byte code they do not ship (conda
        ships none for ``noarch`` packages): the environment's python compiles it, so their
        layers' bytes are that python's. A package that ships its byte code is the same bytes
        whichever python release it is installed beside."""
        shipped = {source_of(path) for path in self.listed}
        return frozenset(key for key, package in self.packages.items()
                         if any(path.startswith("lib/") and path.endswith(".py") and path not in shipped
                                for path in package.files))

    @cached_property
    def python_release(self) -> str:
        """The environment's Python as major.minor ("3.9"), or "" without one."""
        version = next((key[1] for key in self.packages if key[0] == "python"), "")
        return ".".join(version.split(".")[:2])

    @cached_property
    def folders(self) -> RealFolders:
        """The real folders of its tree (a package's symlinks are never gone through)."""
        return RealFolders(self.root)

    @cached_property
    def identities(self) -> dict[PackageKey, str]:
        """Each package's identity: its sha256, with the python's for a package compiled here
        (its .pyc are that python's), or "" (unknown)."""
        python = next((package.sha256 for key, package in self.packages.items() if key[0] == "python"), "")
        return {key: (f"{package.sha256}+{python}" if package.sha256 and key in self.compiled_here else package.sha256)
                for key, package in self.packages.items()}


class TreeStats:
    """``os.lstat`` of a staged tree's paths (relative), each asked of the disk once; None: absent.
    One planning pass's view (settling mtimes, planning the layers, the compile batches): a path
    changed since is :meth:`forget`-ten, or read again in a new one."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = os.fspath(root)
        self.known: dict[str, os.stat_result | None] = {}

    def __call__(self, path: str) -> os.stat_result | None:
        if path in self.known:
            return self.known[path]
        try:
            status: os.stat_result | None = os.lstat(f"{self.root}/{path}")
        except OSError:
            status = None
        self.known[path] = status
        return status

    def forget(self, path: str) -> None:
        self.known.pop(path, None)


class RealFolders:
    """Which folders below a staged environment's root are real folders all the way down.

    A package may install a symlink to anywhere (``site-packages/x/__pycache__ -> /etc``); the
    hub reads and writes the staged tree on its own host, so it never goes through one: a path
    is used only if every folder above it, below the root, is a real folder. Only what stays
    true is remembered (a real folder, a symlink); a missing folder may appear later.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = os.fspath(root)
        self.known: dict[str, bool] = {"": True}

    def holds(self, folder: str) -> bool:
        """Whether ``folder`` (relative, "" for the root) is a real folder chain below the root."""
        known = self.known.get(folder)
        if known is not None:
            return known
        if not self.holds(os.path.dirname(folder)):
            return False
        try:
            real = stat.S_ISDIR(os.lstat(f"{self.root}/{folder}").st_mode)
        except FileNotFoundError:
            return False
        self.known[folder] = real
        return real

    def holds_parent_of(self, path: str) -> bool:
        """Whether every folder above ``path`` (relative) is real."""
        return self.holds(path.rpartition("/")[0])  # os.path.dirname's answer for a relative path, faster

    def can_hold(self, folder: str) -> bool:
        """Whether ``folder`` (relative) is a real folder chain below the root, or is missing below
        one (a folder made there is real); not if it, or a folder above it, is a symlink or a file."""
        if self.holds(folder):
            return True
        return self.holds_parent_of(folder) and not os.path.lexists(f"{self.root}/{folder}")

    def make(self, folder: str) -> None:
        """Create ``folder`` and the folders above it as real folders; OSError if one of them is
        a symlink or a file."""
        if self.holds(folder):
            return
        self.make(os.path.dirname(folder))
        os.mkdir(f"{self.root}/{folder}")  # FileExistsError: a symlink or a file is in the way
        self.known[folder] = True
