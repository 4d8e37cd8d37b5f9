"""The packaging test: the wheel is the product, and works without the checkout.

The wheel is built offline from a copy of the checkout, installed into a fresh venv
(its dependencies come from the test venv through a .pth file, so nothing is
downloaded), and the `condaspawner` command is run from there, outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "corpus"
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".bench", ".swarm-bench", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", ".mypy_cache", ".ruff_cache", "test-artifacts", "node_modules",
)
PRODUCTION_RECIPE = (
    "jupyterhub_condaspawner/images/miniconda-py39/Dockerfile",
    "jupyterhub_condaspawner/images/singleuser-requirements.txt",
    "jupyterhub_condaspawner/images/env.Dockerfile",
)
BENCH_MODULES = {"bench.py", "dockerd.py", "devchannel.py", "offlinebase.py"}


@dataclass
class Installed:
    wheel: Path
    venv: Path
    workdir: Path

    def run(self, *command: str) -> subprocess.CompletedProcess:
        """``command`` with the venv's bin first on PATH, from a folder outside the checkout."""
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return subprocess.run(command, capture_output=True, text=True, cwd=self.workdir, env=env, timeout=120)

    def condaspawner(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(str(self.venv / "bin" / "condaspawner"), *args)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(root / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (root / "dist").glob("jupyterhub_condaspawner-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    # Only now, so pip saw an empty venv: the dependencies, from the test venv's site-packages.
    # A path line, not `import site`: the test venv's own .pth files (its editable
    # install of the checkout) stay unprocessed.
    (_site_packages(venv) / "test-venv-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    workdir = root / "elsewhere"
    workdir.mkdir()
    yield Installed(wheel, venv, workdir)


def _site_packages(venv: Path) -> Path:
    (site_packages,) = (venv / "lib").glob("python*/site-packages")
    return site_packages


def test_the_wheel_ships_the_production_recipe_and_no_bench(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert set(PRODUCTION_RECIPE) <= set(names)
    assert any(name.startswith("jupyterhub_condaspawner/templates/") for name in names)
    assert [name for name in names if name.startswith("condaspawner_bench/") or Path(name).name in BENCH_MODULES] == []
    assert {name.split("/")[0] for name in names} == {
        "jupyterhub_condaspawner", next(name.split("/")[0] for name in names if ".dist-info/" in name)
    }
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    assert "conda = jupyterhub_condaspawner.spawner:CondaSpawner" in text
    assert "condaspawner = jupyterhub_condaspawner.cli:main" in text


def test_the_installed_package_is_the_wheel_and_finds_its_recipe(installed):
    probe = (
        "import importlib.util, jupyterhub_condaspawner as p\n"
        "from jupyterhub_condaspawner.baseimage import IMAGES_DIR, PRODUCTION_DOCKERFILE, singleuser_pins\n"
        "print(p.__file__)\n"
        "print((IMAGES_DIR / PRODUCTION_DOCKERFILE).is_file(), singleuser_pins()['jupyterhub'])\n"
        "print(importlib.util.find_spec('condaspawner_bench'))\n"
    )
    result = installed.run(str(installed.venv / "bin" / "python"), "-c", probe)
    assert result.returncode == 0, result.stderr
    package_file, recipe, bench = result.stdout.splitlines()
    assert Path(package_file).is_relative_to(installed.venv)
    assert recipe == "True 5.5.4"
    assert bench == "None"


def test_help_lists_the_product_commands_only(installed):
    result = installed.condaspawner("--help")
    assert result.returncode == 0, result.stderr
    for command in ("validate", "profiles", "build", "base", "gpus", "gc"):
        assert command in result.stdout
    assert "demo" not in result.stdout and "dev-channel" not in result.stdout


def test_validate_a_good_and_a_bad_file(installed):
    good, bad = CORPUS / "good" / "variables.yml", CORPUS / "hostile" / "pip-editable.yml"
    result = installed.condaspawner("validate", str(good), str(bad))
    assert result.returncode == 1
    ok_line, error_line = result.stdout.splitlines()
    assert ok_line.startswith(f"{good}: ok ") and len(ok_line.rsplit(" ", 1)[1]) == 64
    assert error_line.startswith(f"{bad}: error: ") and "pip options" in error_line
    assert result.stderr == ""


def test_profiles_of_a_directory(installed):
    result = installed.condaspawner("profiles", str(REPO / "profiles"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].split() == ["SLUG", "NAME", "GPUS", "ACCESS", "SPEC", "KEY"]
    assert "datascience-cpu *" in result.stdout


def test_base_help(installed):
    result = installed.condaspawner("base", "--help")
    assert result.returncode == 0, result.stderr
    assert "--tag" in result.stdout and "--offline" not in result.stdout
