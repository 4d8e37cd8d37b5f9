"""Real PyPI packages as conda packages, end to end against real py-rattler: convert, index,
solve, install, import; and the demo's data-science profile against that channel."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from rattler import install, solve

from condaspawner_bench import devchannel, realchannel
from condaspawner_bench.realchannel import REAL_SETS, extra_depends, real_set_from_env
from jupyterhub_condaspawner.profiles import ProfileCatalog
from jupyterhub_condaspawner.resolve import Resolver

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ["linux-64", "noarch"]


def run_python(prefix: Path, home: Path, code: str, timeout: float = 300) -> str:
    """``code`` run by the installed environment's own python, as a user would."""
    home.mkdir(exist_ok=True)
    env = {"PATH": f"{prefix}/bin:/usr/bin:/bin", "HOME": str(home), "MPLBACKEND": "Agg"}
    result = subprocess.run([f"{prefix}/bin/python", "-c", code], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


async def solve_and_install(url: str, specs: list[str], prefix: Path, cache: Path, virtual=()) -> dict[str, str]:
    records = await solve([url], specs, platforms=PLATFORMS, virtual_packages=list(virtual))
    await install(records, target_prefix=prefix, cache_dir=cache, execute_link_scripts=False, show_progress=False)
    return {record.name.normalized: str(record.version) for record in records}


# ---------------------------------------------------------------- without downloads


def test_cuda_libraries_need_a_driver_of_their_major_version():
    assert extra_depends("nvidia-cublas-cu12") == ["__cuda >=12"]
    assert extra_depends("nvidia_cudnn_cu11") == ["__cuda >=11"]
    assert extra_depends("numpy") == [] and extra_depends("torch") == []


def test_a_wheel_tagged_for_a_platform_is_linux_64_even_if_it_says_purelib(tmp_path):
    path = tmp_path / "nvidia_fake_cu12-1.0-py3-none-manylinux1_x86_64.whl"  # as NVIDIA's are
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("nvidia/fake/lib/libfake.so.12", "ELF")
        wheel.writestr("nvidia_fake_cu12-1.0.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: nvidia-fake-cu12\nVersion: 1.0\n")
        wheel.writestr("nvidia_fake_cu12-1.0.dist-info/WHEEL", "Root-Is-Purelib: true\nTag: py3-none-manylinux1_x86_64\n")
        wheel.writestr("nvidia_fake_cu12-1.0.dist-info/RECORD", "")
    package = devchannel.wheel_to_conda_package(path, "3.9.18", extra_depends=extra_depends("nvidia-fake-cu12"),
                                                archive="conda")
    assert (package.subdir, package.noarch) == ("linux-64", None)
    assert package.filename == "nvidia-fake-cu12-1.0-py39h_cs_0.conda"
    assert package.depends == ["__cuda >=12", "python >=3.9,<3.10.0a0", "python_abi 3.9.* *_cp39"]
    assert "lib/python3.9/site-packages/nvidia/fake/lib/libfake.so.12" in {file.path for file in package.files}


def test_sets_are_pinned_and_the_full_set_extends_the_small_one():
    for pins in REAL_SETS.values():
        assert all("==" in pin for pin in pins)
    assert set(REAL_SETS["datascience"]) < set(REAL_SETS["full"])
    names = {pin.split("==")[0] for pin in REAL_SETS["full"]}
    assert {"torch", "scipy", "scikit-learn", "pillow", "nvidia-cudnn-cu12", "nvidia-cuda-runtime-cu12"} <= names
    # Nothing the dev channel pins is pinned twice (one version per package in a channel).
    assert not names & {pin.split("==")[0] for pin in devchannel.WHEEL_PINS}


def test_real_set_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(realchannel.REAL_SETS_ENV, raising=False)
    assert real_set_from_env() is None and real_set_from_env("datascience") == "datascience"
    monkeypatch.setenv(realchannel.REAL_SETS_ENV, "full")
    assert real_set_from_env("datascience") == "full"
    monkeypatch.setenv(realchannel.REAL_SETS_ENV, "none")
    assert real_set_from_env("datascience") is None
    monkeypatch.setenv(realchannel.REAL_SETS_ENV, "everything")
    with pytest.raises(ValueError, match="unknown real package set 'everything'"):
        real_set_from_env()


# ---------------------------------------------------------------- the data-science set


def test_datascience_channel_holds_the_set_as_conda_packages(datascience_channel):
    repodata = json.loads((datascience_channel.path / "linux-64" / "repodata.json").read_text())
    real = {record["name"]: (filename, record) for filename, record in repodata["packages.conda"].items()}
    assert {name: real[name][1]["version"] for name in ("numpy", "pandas", "matplotlib")} == {
        "numpy": "2.0.2", "pandas": "2.3.3", "matplotlib": "3.9.4"}
    assert "python_abi 3.9.* *_cp39" in real["numpy"][1]["depends"]
    assert "numpy >=1.22.4" in real["pandas"][1]["depends"]  # from the wheel's Requires-Dist
    # The dev channel's packages are there too (python, ipykernel), as .tar.bz2.
    assert {record["name"] for record in repodata["packages"].values()} >= {"python", "pyzmq", "python_abi"}


def test_conversion_is_deterministic(datascience_channel, tmp_path):
    (wheel,) = (datascience_channel.path.parent / "wheels").glob("kiwisolver-1.4.7-*.whl")
    digests = set()
    python = devchannel.python_interpreter(devchannel.find_shared_python())
    for attempt in ("a", "b"):  # its byte code included
        package = devchannel.wheel_to_conda_package(wheel, "3.9.18", archive="conda", compile_with=python)
        (tmp_path / attempt / package.subdir).mkdir(parents=True)
        written = devchannel.write_conda_package(package, tmp_path / attempt)
        digests.add(hashlib.sha256(written.read_bytes()).hexdigest())
    repodata = json.loads((datascience_channel.path / "linux-64" / "repodata.json").read_text())
    assert digests == {repodata["packages.conda"][written.name]["sha256"]}


async def test_datascience_env_solves_installs_and_imports(datascience_channel, tmp_path):
    prefix = tmp_path / "env"
    versions = await solve_and_install(datascience_channel.url, ["python=3.9", "numpy", "pandas", "matplotlib"],
                                       prefix, tmp_path / "pkgs")
    assert {"numpy", "pandas", "matplotlib", "pillow", "contourpy", "kiwisolver", "fonttools", "pyparsing",
            "cycler", "python-dateutil", "pytz", "tzdata", "importlib-resources"} <= set(versions)
    code = (
        "import numpy, pandas, matplotlib, matplotlib.pyplot as plt\n"
        "frame = pandas.DataFrame({'x': numpy.arange(5), 'y': numpy.arange(5) ** 2})\n"
        "plt.plot(frame.x, frame.y); plt.savefig('plot.png')\n"
        "print(numpy.__version__, pandas.__version__, matplotlib.__version__, int(frame.y.sum()),"
        " matplotlib.get_backend())\n"
    )
    home = tmp_path / "home"
    assert run_python(prefix, home, f"import os; os.chdir({str(home)!r})\n" + code).split() == [
        "2.0.2", "2.3.3", "3.9.4", "30", "Agg"]
    assert (home / "plot.png").read_bytes().startswith(b"\x89PNG")


async def test_demo_datascience_profile_loads_and_solves(datascience_channel, tmp_path):
    catalog = ProfileCatalog(profiles_dir=str(REPO / "demo" / "profiles"))
    catalog.load()
    profile = catalog.get("datascience")
    assert profile.display_name == "Data science (numpy, pandas, matplotlib)"
    assert profile.gpus == 0 and profile.allow_custom_environment and profile.environment is not None
    resolver = Resolver(channel_urls={"conda-forge": datascience_channel.url},
                        package_cache_dir=str(tmp_path / "pkgs"))
    lock = await resolver.solve(profile.environment, profile.cuda)
    versions = {package["name"]: package["version"] for package in lock.packages()}
    assert {"python", "ipykernel", "numpy", "pandas", "matplotlib", "pip"} <= set(versions)
    assert versions["numpy"] == "2.0.2" and versions["python"].startswith("3.9.")


def test_bench_command_builds_a_real_channel_on_request(datascience_channel):
    def bench(*args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "condaspawner_bench", *args], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, **env}, timeout=120)

    chosen = bench("dev-channel", str(datascience_channel.path), "--real-set", "datascience")
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() == datascience_channel.url  # built: cached, not rebuilt
    from_env = bench("dev-channel", str(datascience_channel.path), CONDASPAWNER_BENCH_REAL_SET="datascience")
    assert from_env.stdout.strip() == datascience_channel.url
    refused = bench("dev-channel", str(datascience_channel.path), CONDASPAWNER_BENCH_REAL_SET="everything")
    assert refused.returncode == 1 and "unknown real package set 'everything'" in refused.stderr
