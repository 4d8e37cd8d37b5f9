"""Throwaway conda channels of a few hand-made packages, written and indexed for one test."""

from __future__ import annotations

from pathlib import Path

from condaspawner_bench.devchannel import CondaPackage, index_channel, run_blocking, write_conda_package


def write_channel(directory: Path, packages: list[CondaPackage]) -> str:
    """Write ``packages`` into a channel folder, index it, and return its ``file://`` URL."""
    for subdir in ("noarch", "linux-64"):
        (directory / subdir).mkdir(parents=True, exist_ok=True)
    for package in packages:
        write_conda_package(package, directory)
    run_blocking(index_channel(directory))
    return directory.as_uri()
