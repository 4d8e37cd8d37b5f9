"""A staged environment as its installer left it: each package's files, identity and
package-cache copy, read from ``conda-meta`` once per build.

Every step of the layered route needs them (settling mtimes, planning the layers, the
byte-code cache, the compile batches, placing byte code in layers), and ``conda-meta`` does
not change after the install: compiling adds ``.pyc`` files, never a package record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

PackageKey = tuple[str, str, str]  # (name, version, build)


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
    def identities(self) -> dict[PackageKey, str]:
        """Each package's identity: its sha256, with the python's for a package of Python files
        (their .pyc are that python's), or "" (unknown)."""
        python = next((package.sha256 for key, package in self.packages.items() if key[0] == "python"), "")
        return {key: (f"{package.sha256}+{python}" if package.sha256 and any(path.endswith(".py") for path in package.files)
                      else package.sha256)
                for key, package in self.packages.items()}
