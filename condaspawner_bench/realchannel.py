"""Real packages for the bench: PyPI's manylinux wheels for CPython 3.9 as conda packages.

Opt-in, beside the small dev channel the tests use. A *real channel* is the dev
channel's packages (``python``, ipykernel's closure, the synthetic ``cs-*``) plus one
of two sets of real wheels, converted with devchannel's wheel-to-conda conversion:

- ``datascience``: numpy, pandas, matplotlib and their closure (~60 MB of wheels);
- ``full``: that, plus scipy, scikit-learn, pillow, and PyTorch (PyPI's CUDA build of
  torch for cp39) with the NVIDIA CUDA library wheels it depends on (~2.8 GB of wheels).

Each lives in its own folder (``<bench>/channel-<set>``). Wheels are downloaded once
into ``<bench>/wheels``; converted packages are kept in ``<bench>/converted`` (keyed
by wheel and recipe), so a rebuild of a channel converts only what changed. The real
packages are written as ``.conda`` (zstd), as conda-forge serves them: bz2 would take
minutes to write and again to extract the CUDA libraries. Conversion is deterministic
(fixed timestamps, owners, order), so every package's sha256 is stable.

The ``full`` channel also holds a second python patch release (cpython.py), for the
benchmark of layers shared across environments on two python releases.

The ``nvidia-*-cuXX`` packages depend on ``__cuda >=XX``, as conda-forge's CUDA packages
need a driver: a torch environment then solves only for a profile that says its
``cuda`` version (or on a GPU host), like a real one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from . import cpython, devchannel
from .devchannel import ChannelInfo, PythonSource, read_channel_info
from .dockerd import BenchDaemonError, ensure_debian_packages
from .phases import PhaseLog

# Bump whenever the way real packages are chosen or written changes.
REAL_RECIPE_VERSION = 2  # 2: linux-64 packages ship their byte code
REAL_SETS_ENV = "CONDASPAWNER_BENCH_REAL_SET"  # "datascience", "full" or "none"
NO_REAL_SET = "none"

# The closures for CPython 3.9 on manylinux x86_64, pinned, without what the dev
# channel already pins (python-dateutil, six, tzdata, packaging, zipp, ...). Computed with
# `uv pip compile --python-version 3.9.18 --python-platform x86_64-manylinux_2_28
# --only-binary :all: -c <the dev pins>`: it evaluates markers for the target, pip doesn't.
DATASCIENCE_PINS: tuple[str, ...] = (
    "numpy==2.0.2",
    "pandas==2.3.3",
    "matplotlib==3.9.4",
    "contourpy==1.3.0",
    "cycler==0.12.1",
    "fonttools==4.60.2",
    "importlib-resources==6.5.2",
    "kiwisolver==1.4.7",
    "pillow==11.3.0",
    "pyparsing==3.3.3",
    "pytz==2026.6",
)
# torch 2.4.1: the newest PyPI torch whose CUDA libraries come to ~3 GB (2.8.0's are ~4 GB)
# and built against numpy 2.
FULL_EXTRA_PINS: tuple[str, ...] = (
    "scipy==1.13.1",
    "scikit-learn==1.6.1",
    "joblib==1.5.3",
    "threadpoolctl==3.7.0",
    "torch==2.4.1",
    "triton==3.0.0",
    "filelock==3.19.1",
    "fsspec==2025.10.0",
    "jinja2==3.1.6",
    "markupsafe==3.0.4",
    "networkx==3.2.1",
    "sympy==1.14.0",
    "mpmath==1.3.0",
    "nvidia-cublas-cu12==12.1.3.1",
    "nvidia-cuda-cupti-cu12==12.1.105",
    "nvidia-cuda-nvrtc-cu12==12.1.105",
    "nvidia-cuda-runtime-cu12==12.1.105",
    "nvidia-cudnn-cu12==9.1.0.70",
    "nvidia-cufft-cu12==11.0.2.54",
    "nvidia-curand-cu12==10.3.2.106",
    "nvidia-cusolver-cu12==11.4.5.107",
    "nvidia-cusparse-cu12==12.1.0.106",
    "nvidia-nccl-cu12==2.20.5",
    "nvidia-nvjitlink-cu12==12.9.86",
    "nvidia-nvtx-cu12==12.1.105",
)
REAL_SETS: dict[str, tuple[str, ...]] = {
    "datascience": DATASCIENCE_PINS,
    "full": DATASCIENCE_PINS + FULL_EXTRA_PINS,
}
# What a user puts in an environment.yml to get each set's headline packages.
REAL_SET_TOP_LEVEL: dict[str, tuple[str, ...]] = {
    "datascience": ("numpy", "pandas", "matplotlib"),
    "full": ("numpy", "pandas", "matplotlib", "scipy", "scikit-learn", "pillow", "torch"),
}
SECOND_PYTHON_SETS = {"full"}  # sets whose channel also has cpython.VERSION
ZSTD_PACKAGES = {"zstd": "zstd"}  # command -> Debian package, installed when missing (root)
_CUDA_LIBRARY = re.compile(r"nvidia-.+-cu(\d+)")


def real_channel_dir(bench_dir: Path, real_set: str) -> Path:
    """Where the channel of ``real_set`` lives in the bench folder."""
    _check_set(real_set)
    return Path(bench_dir) / f"channel-{real_set}"


def real_set_from_env(default: str | None = None) -> str | None:
    """``$CONDASPAWNER_BENCH_REAL_SET`` (``none``: no real set), else ``default``."""
    value = os.environ.get(REAL_SETS_ENV, "").strip() or default
    if value in (None, NO_REAL_SET):
        return None
    _check_set(value)
    return value


def extra_depends(name: str) -> list[str]:
    """What a converted package needs beyond its wheel's requirements: a CUDA driver
    for NVIDIA's ``-cuXX`` libraries."""
    cuda = _CUDA_LIBRARY.fullmatch(canonicalize_name(name))
    return [f"__cuda >={cuda.group(1)}"] if cuda else []


def build_real_channel(
    directory: Path,
    real_set: str,
    *,
    download_dir: Path | None = None,
    converted_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    phases: PhaseLog | None = None,
) -> ChannelInfo:
    """Build (or reuse) the dev channel plus ``real_set`` in ``directory``; describe it.

    ``download_dir`` (default ``<directory>/../wheels``) caches the wheels and
    ``converted_dir`` (default ``<directory>/../converted``) the converted packages,
    for every real channel of the bench. Rebuilds only when the recipe changed.
    """
    pins = REAL_SETS[_check_set(real_set)]
    say = progress or (lambda message: None)
    phases = phases or PhaseLog()
    directory = Path(directory).resolve()
    download_dir = Path(download_dir or directory.parent / "wheels")
    converted_dir = Path(converted_dir or directory.parent / "converted")
    directory.mkdir(parents=True, exist_ok=True)
    python = devchannel.find_python_or_reason()
    # the full set's PyTorch environments share layers across a python patch release too
    second = None
    if real_set in SECOND_PYTHON_SETS:
        with phases(f"real channel: CPython {cpython.VERSION}"):
            second = cpython.second_python(directory.parent, say)
    recipe = _recipe_hash(python, pins, second)
    info = read_channel_info(directory)
    if devchannel.is_built(directory, recipe) and info is not None:
        return info
    with devchannel.exclusive_lock(directory / ".lock"):
        if not devchannel.is_built(directory, recipe):
            started = time.monotonic()
            _build(directory, recipe, python, pins, download_dir, converted_dir, say, phases, second)
            say(f"{real_set} channel: built in {time.monotonic() - started:.1f} s")
    info = read_channel_info(directory)
    assert info is not None
    return info


# ---------------------------------------------------------------- building


def _check_set(real_set: str) -> str:
    if real_set not in REAL_SETS:
        raise ValueError(f"unknown real package set {real_set!r}: choose {', '.join(REAL_SETS)} or {NO_REAL_SET}")
    return real_set


def _recipe_hash(python: PythonSource | str, pins: Sequence[str], second: PythonSource | None = None) -> str:
    recipe = {
        "dev": devchannel.RECIPE_VERSION,
        "real": REAL_RECIPE_VERSION,
        "dev_pins": list(devchannel.WHEEL_PINS),
        "synthetic": [repr(package) for package in devchannel.SYNTHETIC_PACKAGES],
        "pins": list(pins),
        "python": repr(python),
        **({"second_python": repr(second)} if second is not None else {}),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _build(
    directory: Path,
    recipe: str,
    python: PythonSource | str,
    pins: Sequence[str],
    download_dir: Path,
    converted_dir: Path,
    say: Callable[[str], None],
    phases: PhaseLog,
    second: PythonSource | None = None,
) -> None:
    if not isinstance(python, PythonSource):
        raise RuntimeError(f"a real channel needs the python package: {python}")
    try:  # .conda packages are compressed by the zstd command
        ensure_debian_packages(ZSTD_PACKAGES)
    except BenchDaemonError as error:
        raise RuntimeError(str(error)) from None
    (directory / devchannel.INFO_FILE).unlink(missing_ok=True)
    for subdir in ("noarch", "linux-64"):
        shutil.rmtree(directory / subdir, ignore_errors=True)
        (directory / subdir).mkdir()
    dev = devchannel.dev_packages(python, True, download_dir, say, phases)
    if second is not None:
        dev.append(devchannel.python_package(second))
    wheels = devchannel.download_wheels(pins, download_dir, say, phases, "real channel: pip download")
    with phases("real channel: write packages") as phase:
        paths = _write_packages(directory, dev, wheels, python, converted_dir)
        phase.note = f"{len(dev)} dev packages, {len(wheels)} converted wheels"
    with phases("real channel: index"):
        devchannel.run_blocking(devchannel.index_channel(directory))
    devchannel.write_channel_info(directory, recipe, python, paths)


def _write_packages(
    directory: Path,
    dev: list[devchannel.CondaPackage],
    wheels: list[Path],
    python: PythonSource,
    converted_dir: Path,
) -> list[str]:
    """Write the dev packages and the converted wheels (largest first, from the
    conversion cache when they are there) into ``directory``; their channel paths."""

    def write_dev(package: devchannel.CondaPackage) -> str:
        devchannel.write_conda_package(package, directory)
        return devchannel.package_path(package)

    def convert(wheel: Path) -> str:
        return _converted_package(wheel, python, converted_dir, directory)

    # One package per core: a big wheel's files are held in memory while it is written.
    by_size = sorted(wheels, key=lambda wheel: wheel.stat().st_size, reverse=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        converted = list(pool.map(convert, by_size))
        written = list(pool.map(write_dev, dev))
    return written + converted


def _converted_package(wheel: Path, python: PythonSource, converted_dir: Path, channel: Path) -> str:
    """Link the conda package made from ``wheel`` into ``channel``, converting it first
    unless the cache has it; its path in the channel."""
    name, _version, _build, _tags = parse_wheel_filename(wheel.name)
    depends = extra_depends(name)
    python_version = devchannel.target_python_version(python)
    key = hashlib.sha256(json.dumps({
        "wheel": wheel.name, "size": wheel.stat().st_size, "python": python_version,
        "dev": devchannel.RECIPE_VERSION, "real": REAL_RECIPE_VERSION, "depends": depends,
    }, sort_keys=True).encode()).hexdigest()[:16]
    cache = converted_dir / key  # holds <subdir>/<file>, complete or not at all
    if not cache.is_dir():
        package = devchannel.wheel_to_conda_package(wheel, python_version, extra_depends=depends, archive="conda",
                                                    compile_with=devchannel.python_interpreter(python))
        # Another process may convert the same wheel meanwhile (two channels being built).
        partial = converted_dir / f".{key}.{os.getpid()}.{threading.get_ident()}.partial"
        (partial / package.subdir).mkdir(parents=True)
        devchannel.write_conda_package(package, partial)
        del package  # its files' bytes: a torch is ~1.5 GB
        try:
            partial.rename(cache)
        except OSError:  # the other one was first: same bytes
            shutil.rmtree(partial)
    (source,) = cache.glob("*/*")
    target = channel / source.parent.name / source.name
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return f"{source.parent.name}/{source.name}"
