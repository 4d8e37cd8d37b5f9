"""The local dev channel, end to end against real py-rattler: build, index, solve, install, run."""

from __future__ import annotations

import json
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
from kernel_script import kernel_round_trip
from rattler import (
    BuildString,
    GenericVirtualPackage,
    PackageName,
    Version,
    install,
    solve,
)
from rattler.exceptions import SolverError

from condaspawner_bench import devchannel
from condaspawner_bench.devchannel import (
    PREFIX_PLACEHOLDER,
    SYNTHETIC_VERSIONS,
    SyntheticPackage,
    build_dev_channel,
    conda_dependency,
    read_channel_info,
    relocate_elf_runpath,
    target_marker_environment,
    wheel_to_conda_package,
)

# Until conftest.py registers it for the whole suite.

PLATFORMS = ["linux-64", "noarch"]
CUDA_12 = GenericVirtualPackage(PackageName("__cuda"), Version("12.4"), BuildString("0"))


async def solve_names(url: str, specs: list[str], virtual_packages=()) -> dict[str, str]:
    records = await solve(
        [url], specs, platforms=PLATFORMS, virtual_packages=list(virtual_packages)
    )
    return {record.name.normalized: str(record.version) for record in records}


async def install_specs(url: str, specs: list[str], prefix: Path, cache: Path, **options) -> None:
    records = await solve([url], specs, platforms=PLATFORMS, virtual_packages=[])
    await install(
        records,
        target_prefix=prefix,
        cache_dir=cache,
        execute_link_scripts=False,
        show_progress=False,
        **options,
    )


def build_synthetic_only(directory: Path) -> str:
    return build_dev_channel(directory, include_python=False, include_wheels=False)


# ---------------------------------------------------------------- build and cache


def test_second_build_with_same_recipe_is_a_no_op(dev_channel):
    # A rebuild rewrites the info file and the index (whatever it took: never timed here).
    written = {path: path.stat().st_mtime_ns for path in (dev_channel.path / devchannel.INFO_FILE,
                                                           dev_channel.path / "noarch" / "repodata.json")}
    url = build_dev_channel(dev_channel.path)
    assert url == dev_channel.url
    assert {path: path.stat().st_mtime_ns for path in written} == written


async def test_changed_recipe_rebuilds(tmp_path, monkeypatch):
    url = build_synthetic_only(tmp_path)
    recipe = read_channel_info(tmp_path).recipe
    extra = SyntheticPackage("cs-delta", "3.0", ("cs-alpha 1.0",))
    monkeypatch.setattr(devchannel, "SYNTHETIC_PACKAGES", devchannel.SYNTHETIC_PACKAGES + (extra,))

    assert build_synthetic_only(tmp_path) == url
    assert read_channel_info(tmp_path).recipe != recipe
    assert await solve_names(url, ["cs-delta"]) == {"cs-delta": "3.0", "cs-alpha": "1.0"}


def test_missing_shared_python_is_recorded_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "no-pyenv"))
    build_dev_channel(tmp_path / "channel", include_wheels=False)
    info = read_channel_info(tmp_path / "channel")
    assert not info.python_available
    assert "no CPython 3.9.x" in info.python_skip_reason


def test_channel_has_the_advertised_synthetic_versions(dev_channel):
    repodata = json.loads((dev_channel.path / "noarch" / "repodata.json").read_text())
    indexed: dict[str, set[str]] = {}
    for record in repodata["packages"].values():
        indexed.setdefault(record["name"], set()).add(record["version"])
    for name, versions in SYNTHETIC_VERSIONS.items():
        assert indexed[name] == set(versions)


# ---------------------------------------------------------------- synthetic packages


async def test_solver_honours_synthetic_dependencies(dev_channel):
    assert await solve_names(dev_channel.url, ["cs-gamma"]) == {
        "cs-gamma": "0.5",
        "cs-beta": "1.0",
        "cs-alpha": "1.1",  # cs-beta pins cs-alpha >=1.1,<2
    }
    assert (await solve_names(dev_channel.url, ["cs-alpha"]))["cs-alpha"] == "2.0"


async def test_unsatisfiable_package_fails_to_solve(dev_channel):
    with pytest.raises(SolverError, match="cs-conflict"):
        await solve_names(dev_channel.url, ["cs-conflict"])


async def test_cuda_package_needs_a_cuda_virtual_package(dev_channel):
    with pytest.raises(SolverError, match="__cuda"):
        await solve_names(dev_channel.url, ["cs-cuda-kernels"])
    old_cuda = GenericVirtualPackage(PackageName("__cuda"), Version("11.8"), BuildString("0"))
    with pytest.raises(SolverError, match="__cuda"):
        await solve_names(dev_channel.url, ["cs-cuda-kernels"], [old_cuda])
    assert await solve_names(dev_channel.url, ["cs-cuda-kernels"], [CUDA_12]) == {
        "cs-cuda-kernels": "1.0"
    }


async def test_synthetic_install_writes_files_and_rewrites_the_prefix(dev_channel, tmp_path):
    prefix = tmp_path / "env"
    await install_specs(dev_channel.url, ["cs-gamma"], prefix, tmp_path / "pkgs")
    assert (prefix / "share/cs-alpha/VERSION").read_text() == "1.1\n"
    assert (prefix / "share/cs-gamma/VERSION").read_text() == "0.5\n"
    assert (prefix / "share/cs-beta/PREFIX").read_text() == f"{prefix}\n"

    staged = tmp_path / "staged"
    await install_specs(
        dev_channel.url,
        ["cs-alpha"],
        staged,
        tmp_path / "pkgs",
        alternative_target_prefix="/opt/conda/envs/demo",
    )
    assert (staged / "share/cs-alpha/PREFIX").read_text() == "/opt/conda/envs/demo\n"


# ---------------------------------------------------------------- wheel conversion


def test_markers_are_evaluated_for_python_39_on_linux():
    env = target_marker_environment("3.9.18")
    typing_extensions = 'typing-extensions; python_version < "3.10"'
    assert conda_dependency(typing_extensions, env) == "typing-extensions"
    assert conda_dependency('exceptiongroup; python_version < "3.11"', env) == "exceptiongroup"
    assert conda_dependency('tomli; python_version >= "3.11"', env) is None
    assert conda_dependency('pywin32; sys_platform == "win32"', env) is None
    assert conda_dependency('pytest>=6; extra == "test"', env) is None
    assert conda_dependency("Jupyter_Core!=5.0.*,>=4.12", env) == "jupyter-core !=5.0.*,>=4.12"
    assert conda_dependency("requests[socks]>=2", env) == "requests >=2"


def make_wheel(directory: Path, name: str, *, purelib: bool, files: dict[str, str], **meta) -> Path:
    tag = "py3-none-any" if purelib else "cp39-cp39-manylinux2014_x86_64"
    dist_info = f"{name}-1.0.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\nRequires-Python: >=3.8\n"
    for requirement in meta.get("requires", []):
        metadata += f"Requires-Dist: {requirement}\n"
    path = directory / f"{name}-1.0-{tag}.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, content in files.items():
            wheel.writestr(member, content)
        wheel.writestr(f"{dist_info}/METADATA", metadata)
        wheel_info = f"Root-Is-Purelib: {str(purelib).lower()}\nTag: {tag}\n"
        wheel.writestr(f"{dist_info}/WHEEL", wheel_info)
        wheel.writestr(f"{dist_info}/entry_points.txt", meta.get("entry_points", ""))
        wheel.writestr(f"{dist_info}/RECORD", "")
    return path


def test_pure_wheel_becomes_noarch_python(tmp_path):
    wheel = make_wheel(
        tmp_path,
        "Demo_Pkg",
        purelib=True,
        files={
            "demo_pkg/__init__.py": "",
            "Demo_Pkg-1.0.data/data/share/demo/kernel.json": "{}",
            "Demo_Pkg-1.0.data/scripts/demo-tool": "#!python\nprint(1)\n",
        },
        requires=['typing-extensions; python_version < "3.10"', 'pytest; extra == "test"'],
        entry_points="[console_scripts]\ndemo = demo_pkg.cli:Main.run\n",
    )
    package = wheel_to_conda_package(wheel, "3.9.18")
    paths = {file.path: file for file in package.files}
    assert (package.name, package.subdir, package.noarch) == ("demo-pkg", "noarch", "python")
    assert package.depends == ["python >=3.8", "typing-extensions"]
    assert package.entry_points == ["demo = demo_pkg.cli:Main.run"]
    assert "site-packages/demo_pkg/__init__.py" in paths
    assert "site-packages/Demo_Pkg-1.0.dist-info/INSTALLER" in paths
    assert "share/demo/kernel.json" in paths
    script = paths["python-scripts/demo-tool"]
    assert script.data.startswith(f"#!{PREFIX_PLACEHOLDER}/bin/python\n".encode())
    assert script.prefix_placeholder == PREFIX_PLACEHOLDER and script.executable


def test_binary_wheel_becomes_linux_64_for_python_39(tmp_path):
    wheel = make_wheel(
        tmp_path,
        "fastthing",
        purelib=False,
        files={"fastthing/_speed.cpython-39-x86_64-linux-gnu.so": "ELF"},
        entry_points="[console_scripts]\nfast = fastthing:main\n",
    )
    package = wheel_to_conda_package(wheel, "3.9.18")
    paths = {file.path: file for file in package.files}
    assert (package.subdir, package.noarch) == ("linux-64", None)
    assert package.depends == ["python >=3.9,<3.10.0a0", "python_abi 3.9.* *_cp39"]
    assert "lib/python3.9/site-packages/fastthing/_speed.cpython-39-x86_64-linux-gnu.so" in paths
    script = paths["bin/fast"]
    assert script.data.startswith(f"#!{PREFIX_PLACEHOLDER}/bin/python3.9\n".encode())
    assert b"from fastthing import main" in script.data


def test_a_binary_wheel_ships_byte_code_as_conda_build_makes_it(tmp_path, dev_python_channel):
    """Like conda-forge's packages that are not noarch: a timestamp-checked .pyc for each
    source outside bin/ (none for one that does not compile), the same bytes every time."""
    files = {"fastthing/__init__.py": "VALUE = {'a', 'b'}\n", "fastthing/broken.py": "def (:\n",
             "fastthing/_speed.cpython-39-x86_64-linux-gnu.so": "ELF",
             "fastthing/shipped.py": "", "fastthing/__pycache__/shipped.cpython-39.pyc": "the wheel's own"}
    wheel = make_wheel(tmp_path, "fastthing", purelib=False, files=files)
    python = devchannel.python_interpreter(devchannel.find_shared_python())
    package = wheel_to_conda_package(wheel, "3.9.18", compile_with=python)
    site = "lib/python3.9/site-packages/fastthing"
    byte_code = {file.path: file.data for file in package.files if file.path.endswith(".pyc")}
    assert byte_code.keys() == {f"{site}/__pycache__/__init__.cpython-39.pyc", f"{site}/__pycache__/shipped.cpython-39.pyc"}
    assert byte_code[f"{site}/__pycache__/shipped.cpython-39.pyc"] == b"the wheel's own"  # not compiled again
    pyc = byte_code[f"{site}/__pycache__/__init__.cpython-39.pyc"]
    flags, mtime, size = struct.unpack("<III", pyc[4:16])
    assert (flags, mtime, size) == (0, devchannel.PACKAGE_TIMESTAMP, len(files["fastthing/__init__.py"]))
    again = wheel_to_conda_package(wheel, "3.9.18", compile_with=python)
    assert [(f.path, f.data) for f in again.files] == [(f.path, f.data) for f in package.files]
    pure = make_wheel(tmp_path, "purething", purelib=True, files={"purething/__init__.py": ""})
    assert not [f for f in wheel_to_conda_package(pure, "3.9.18", compile_with=python).files if ".pyc" in f.path]


# ---------------------------------------------------------------- python from pyenv


def test_runpath_is_rewritten_in_place_relative_to_origin(dev_python_channel):
    python = devchannel.find_shared_python()
    binary = (python.prefix / "bin/python3.9").read_bytes()
    old_runpath = f"{python.prefix}/lib\0".encode()
    assert old_runpath in binary

    relocated = relocate_elf_runpath(binary, str(python.prefix), "bin")
    assert len(relocated) == len(binary)
    assert old_runpath not in relocated
    assert b"$ORIGIN/../lib\0" in relocated
    assert relocate_elf_runpath(b"#!/bin/sh\n", str(python.prefix), "bin") == b"#!/bin/sh\n"


async def test_python_env_imports_stdlib_and_runs_a_kernel(dev_python_channel, tmp_path):
    prefix = tmp_path / "env"
    records = await solve(
        [dev_python_channel.url], ["python=3.9", "ipykernel", "pip"], platforms=PLATFORMS
    )
    names = {record.name.normalized for record in records}
    # Only needed on Python < 3.10/3.11: present if markers were evaluated for 3.9.
    assert {"python_abi", "exceptiongroup", "importlib-metadata", "typing-extensions"} <= names
    await install(
        records,
        target_prefix=prefix,
        cache_dir=tmp_path / "pkgs",
        execute_link_scripts=False,
        show_progress=False,
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{prefix}/bin:/usr/bin:/bin", "HOME": str(home)}

    def run(*command: str) -> str:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    imports = "import ssl, sqlite3, ctypes, ipykernel, sys, sysconfig; print(6*7)"
    assert run(f"{prefix}/bin/python", "-c", imports).strip() == "42"
    probe = "import sys, sysconfig; print(sys.prefix); print(sysconfig.get_config_var('prefix'))"
    assert run(f"{prefix}/bin/python", "-c", probe).split() == [str(prefix), str(prefix)]
    assert "python3" in run(f"{prefix}/bin/jupyter-kernelspec", "list")
    assert "pip 26" in run(f"{prefix}/bin/python", "-m", "pip", "--version")
    assert run(f"{prefix}/bin/python", "-c", kernel_round_trip("6*7")).strip().endswith("ok 42")


