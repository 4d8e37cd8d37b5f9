"""A package from an allowed channel is third-party content: building an environment with it
runs none of its code on the hub host or in a container that can touch what other builds use,
and the hub never reads or writes through a symlink a package installs.

The packages here are written by the test into a channel of its own, beside the dev channel.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_docker import remove_repo_images

from condaspawner_bench import devchannel
from condaspawner_bench.devchannel import CondaPackage, PackageFile
from jupyterhub_condaspawner.builder import BuildRequest, ImageBuilder
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.spec import SpecPolicy
from jupyterhub_condaspawner.stagedenv import RealFolders

SESSION = uuid.uuid4().hex[:8]
SITE = "lib/python3.9/site-packages"
SECRET = b"HOST SECRET of the hub machine"
MARKER = "package-code-ran"
EVIL = b"EVIL: cs-zzevil's code"


def package(name: str, files: list[PackageFile], depends: tuple[str, ...] = ("python 3.9.*",)) -> CondaPackage:
    return CondaPackage(name=name, version="1.0", build="0", subdir="linux-64", depends=list(depends), files=files)


def hostile_packages(host_folder: Path) -> list[CondaPackage]:
    marker = f"/opt/conda/envs/_shared/{MARKER}"
    victim = f"/opt/conda/envs/_shared/{SITE}/cs_victim.py"  # a hard link into the shared package cache
    run_code = f"open({marker!r}, 'w').close(); open({victim!r}, 'a').write('POISONED = True')\n"
    return [
        # Code Python would run at start-up (a .pth) and a module of the standard library replaced
        # (the compiler imports py_compile): neither may run while the environment is compiled.
        package("cs-startup-code", [
            PackageFile(f"{SITE}/cs_startup.pth", f"import os; {run_code}".encode()),
            PackageFile(f"{SITE}/cs_startup/__init__.py", b"VALUE = 1\n"),
            PackageFile("lib/python3.9/py_compile.py", run_code.encode()),
        ], depends=("python 3.9.*", "cs-shared-victim")),
        package("cs-shared-victim", [PackageFile(f"{SITE}/cs_victim.py", b"SAFE = True\n")]),
        # __pycache__ as a symlink to a folder of the hub host.
        package("cs-pycache-out", [
            PackageFile(f"{SITE}/cs_out/__init__.py", b"OUT = 1\n"),
            PackageFile(f"{SITE}/cs_out/__pycache__", link_target=str(host_folder)),
        ]),
        # Another package's __pycache__ redirected to the host: the byte-code cache must not
        # write its byte code there.
        package("cs-benign", [PackageFile(f"{SITE}/cs_benign/__init__.py", b"BENIGN = 1\n"),
                              PackageFile(f"{SITE}/cs_benign/zzmod.py", b"Z = 1\n")]),
        package("cs-redirect", [PackageFile(f"{SITE}/cs_benign/__pycache__", link_target=str(host_folder))],
                depends=("python 3.9.*", "cs-benign")),
        # cs-zzevil's __pycache__ points into cs-target's: its byte code would be cs-target's.
        package("cs-target", [PackageFile(f"{SITE}/cs_target/__init__.py", b""),
                              PackageFile(f"{SITE}/cs_target/m.py", b"WHO = 'target'\n")]),
        package("cs-zzevil", [PackageFile(f"{SITE}/cs_zzevil/__init__.py", b""),
                              PackageFile(f"{SITE}/cs_zzevil/m.py", f"WHO = {EVIL.decode()!r}\n".encode()),
                              PackageFile(f"{SITE}/cs_zzevil/__pycache__", link_target="../cs_target/__pycache__")]),
        # Another Python release than the base image's (its interpreter borrowed from the base).
        CondaPackage(name="python", version="3.10.0", build="0", subdir="linux-64", files=[
            PackageFile("bin/python", link_target="/opt/conda/bin/python"),
            PackageFile("lib/python3.10/site-packages/cs_other/__init__.py", b"OTHER = 1\n")]),
        CondaPackage(name="pip", version="99.0", build="0", subdir="linux-64",
                     files=[PackageFile("lib/python3.10/site-packages/pip/__init__.py", b"FAKE = 1\n")]),
        CondaPackage(name="ipykernel", version="99.0", build="0", subdir="linux-64", depends=["python 3.10.*"],
                     files=[PackageFile("lib/python3.10/site-packages/ipykernel/__init__.py", b"FAKE = 1\n")]),
    ]


@pytest.fixture
def hostile_channel(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    host_folder = tmp_path / "hub-host-folder"
    host_folder.mkdir()
    (host_folder / "__init__.cpython-39.pyc").write_bytes(SECRET)
    (host_folder / "zzmod.cpython-39.pyc").write_bytes(SECRET)
    channel = tmp_path / "lab-channel"
    for subdir in ("linux-64", "noarch"):
        (channel / subdir).mkdir(parents=True)
    for hostile in hostile_packages(host_folder):
        devchannel.write_conda_package(hostile, channel)
    devchannel.run_blocking(devchannel.index_channel(channel))
    yield channel.as_uri(), host_folder


def request(packages: str, name: str) -> BuildRequest:
    text = f"channels: [conda-forge, lab]\ndependencies: [python=3.9, ipykernel, {packages}]\n"
    policy = SpecPolicy(allowed_channels=["conda-forge", "lab"])
    return BuildRequest(policy.parse(textwrap.dedent(text)), env_name=name)


def env_files(api, image: str, prefix: str = "opt/conda/envs/_shared") -> dict[str, bytes]:
    """The environment's regular files (under ``prefix``) in each of the image's layers (Docker's
    overlay2 folders on this host), by path in the image; a path in several layers: the highest's."""
    driver = api.inspect_image(image)["GraphDriver"]["Data"]
    folders = [driver["UpperDir"], *reversed((driver.get("LowerDir") or "").split(":"))]
    files: dict[str, bytes] = {}
    for folder in reversed(folders):  # the lowest first: a higher layer's file replaces it
        top = Path(folder) / prefix
        for directory, _, names in os.walk(top):
            for name in names:
                path = Path(directory) / name
                if path.is_file() and not path.is_symlink():
                    files[str(path.relative_to(folder))] = path.read_bytes()
    return files


def hostile_builder(docker_daemon, base_image, dev_python_channel, hostile_channel, tmp_path, layered: bool
                    ) -> Iterator[ImageBuilder]:
    """A builder of the dev channel and the hostile packages' ``lab`` channel, by the layered
    route or the Dockerfile route (as with a daemon that keeps images in the containerd store)."""
    url, _ = hostile_channel
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url, "lab": url},
                        package_cache_dir=str(tmp_path / "pkgs"))
    repo = f"condaspawner-hostile-{SESSION}" if layered else f"condaspawner-hostile-dockerfile-{SESSION}"
    yield ImageBuilder(resolver=resolver, docker_client=docker_daemon.client(), base_image=base_image,
                       cache_dir=str(tmp_path / ("cache" if layered else "dockerfile-cache")),
                       bytecode_cache_dir=str(tmp_path / "bytecode"), image_repo=repo, layered_images=layered)
    remove_repo_images(docker_daemon.client(), repo)


@pytest.fixture
def builder(docker_daemon, base_image, dev_python_channel, hostile_channel, tmp_path) -> Iterator[ImageBuilder]:
    yield from hostile_builder(docker_daemon, base_image, dev_python_channel, hostile_channel, tmp_path, layered=True)


@pytest.fixture
def dockerfile_builder(docker_daemon, base_image, dev_python_channel, hostile_channel, tmp_path
                       ) -> Iterator[ImageBuilder]:
    yield from hostile_builder(docker_daemon, base_image, dev_python_channel, hostile_channel, tmp_path, layered=False)


@pytest.mark.docker
async def test_no_code_of_a_package_runs_while_its_environment_is_compiled(builder, docker_daemon, tmp_path):
    info = await builder.get_image(request("cs-startup-code", "startup"))
    log = (Path(builder.key_dir(info.key)) / "build.log").read_text()
    assert "compiling in the Dockerfile" not in log, log  # compiled by the compile container
    files = env_files(docker_daemon.client().api, info.tag)
    prefix = f"opt/conda/envs/_shared/{SITE}"
    assert f"{prefix}/cs_startup/__pycache__/__init__.cpython-39.pyc" in files  # it did compile
    assert f"{prefix}/__pycache__/cs_victim.cpython-39.pyc" in files
    assert f"opt/conda/envs/_shared/{MARKER}" not in files
    assert files[f"{prefix}/cs_victim.py"] == b"SAFE = True\n"
    (victim,) = (tmp_path / "pkgs").glob(f"cs-shared-victim-*/{SITE}/cs_victim.py")
    assert victim.read_bytes() == b"SAFE = True\n"  # the package cache every later build links from


@pytest.mark.docker
async def test_a_pycache_symlink_to_the_hub_host_is_never_read_nor_written(builder, docker_daemon, hostile_channel):
    _, host_folder = hostile_channel
    before = {path.name: path.read_bytes() for path in host_folder.iterdir()}
    api = docker_daemon.client().api
    first = await builder.get_image(request("cs-pycache-out, cs-benign", "out"))  # cs-benign's byte code kept
    second = await builder.get_image(request("cs-redirect", "redirect"))  # its byte code would land on the host
    for info in (first, second):
        assert not [path for path, data in env_files(api, info.tag).items() if SECRET in data]
    assert {path.name: path.read_bytes() for path in host_folder.iterdir()} == before


@pytest.mark.docker
async def test_a_pycache_symlink_into_another_package_poisons_neither_its_byte_code_nor_the_cache(
        builder, docker_daemon, tmp_path):
    """Unchecked-hash byte code is never checked against its source: cs-zzevil's written as cs-target's
    would run at every import of cs_target.m, and the byte-code cache would link it into every later
    environment with cs-target."""
    client = docker_daemon.client()
    both = await builder.get_image(request("cs-target, cs-zzevil", "zzevil"))
    alone = await builder.get_image(request("cs-target", "target"))  # cs-target's byte code from the cache
    log = (Path(builder.key_dir(alone.key)) / "build.log").read_text()
    assert re.search(r"^byte code of [1-9]\d* Python files from the cache", log, re.M), log
    pyc = f"opt/conda/envs/_shared/{SITE}/cs_target/__pycache__/m.cpython-39.pyc"
    for info, name in ((both, "zzevil"), (alone, "target")):
        files = env_files(client.api, info.tag)
        assert pyc in files and EVIL not in files[pyc]
        output = client.containers.run(info.tag, [f"/opt/conda/envs/{name}/bin/python", "-c",
                                                  "import cs_target.m; print(cs_target.m.WHO)"],
                                       network_mode="none", remove=True)
        assert output.decode().strip() == "target"
    cached = [path for path in (tmp_path / "bytecode").rglob("*") if path.is_file() and EVIL in path.read_bytes()]
    assert not cached


@pytest.mark.docker
async def test_an_environment_of_another_python_release_is_compiled_in_its_own_image(builder):
    """The compiler is the base image's Python: for another release it hands the batches to no
    one, and the Dockerfile compiles in the environment's own image (no layer sent twice)."""
    text = "channels: [lab]\ndependencies: [python=3.10]\n"
    policy = SpecPolicy(allowed_channels=["conda-forge", "lab"])
    info = await builder.get_image(BuildRequest(policy.parse(text), env_name="other"))
    log = (Path(builder.key_dir(info.key)) / "build.log").read_text()
    assert ("compile: the base image's Python 3.9 does not compile for the environment's Python 3.10; "
            "compiling in the Dockerfile") in log
    assert "layered load failed" not in log and "compile container ended" not in log


@pytest.mark.docker
@pytest.mark.parametrize("route", ["layered", "dockerfile"])
async def test_an_image_names_no_folder_of_the_hub_host(route, builder, dockerfile_builder, docker_daemon, tmp_path):
    """conda-meta records name the package-cache folder each package was linked from: they are
    left out of the image (users would see the hub's layout; two hubs would write two layers)."""
    chosen = builder if route == "layered" else dockerfile_builder
    info = await chosen.get_image(request("cs-shared-victim", "meta"))
    prefix = "opt/conda/envs/_shared" if route == "layered" else "opt/conda/envs/meta"
    files = env_files(docker_daemon.client().api, info.tag, prefix)
    records = {path: data for path, data in files.items() if "/conda-meta/" in path and path.endswith(".json")}
    assert any("/conda-meta/cs-shared-victim-" in path for path in records)
    for path, data in records.items():
        record = json.loads(data)
        assert not {"extracted_package_dir", "link", "package_tarball_full_path"} & set(record), path
        assert str(tmp_path / "pkgs").encode() not in data, path  # the package cache (its channel URL stays)
    assert f"{prefix}/CACHEDIR.TAG" not in files


def test_real_folders_never_go_through_a_symlink(tmp_path):
    root = tmp_path / "env"
    (root / "lib" / "pkg").mkdir(parents=True)
    (root / "lib" / "out").symlink_to(tmp_path)
    (root / "lib" / "file").write_text("x")
    folders = RealFolders(root)
    assert folders.holds("") and folders.holds("lib/pkg") and folders.holds_parent_of("lib/pkg/m.py")
    assert not folders.holds("lib/out") and not folders.holds_parent_of("lib/out/anything")
    assert not folders.holds("lib/missing")
    # where the compiler may make a __pycache__: a real one, or none yet below real folders
    assert folders.can_hold("lib/pkg") and folders.can_hold("lib/missing")
    assert not folders.can_hold("lib/out") and not folders.can_hold("lib/out/__pycache__")
    assert not folders.can_hold("lib/file") and not folders.can_hold("lib/file/__pycache__")
    (root / "lib" / "missing").mkdir()  # a folder made later (the compiler's __pycache__) counts then
    assert folders.holds("lib/missing")
    folders.make("lib/pkg/__pycache__")
    assert (root / "lib" / "pkg" / "__pycache__").is_dir()
    for blocked in ("lib/out/__pycache__", "lib/file/__pycache__"):
        with pytest.raises(OSError):
            folders.make(blocked)
    assert not (tmp_path / "__pycache__").exists()


async def test_a_symlink_where_the_compiler_writes_its_partial_byte_code_is_never_written_through(
        docker_daemon, base_image, dev_python_channel, tmp_path):
    """The compile container wrote the byte code it took from the base image (or rewrote a package's)
    to "<pyc>.<pid>.borrowing" ("...adopting"), opened without O_EXCL: a package that ships symlinks
    by those names (pids are small in a container) had it written into the symlink's target, another
    package's file, a hard link into the shared package cache: every later environment with that
    package, any user's, got the bytes. The package cache keeps its bytes, and the build succeeds."""
    client = docker_daemon.client()
    twin_path = f"{SITE}/jupyter_server/_version.py"  # the base image's (the server's stack), not the environment's
    twin = client.containers.run(base_image, ["cat", f"/opt/conda/{twin_path}"], entrypoint=[], network_mode="none",
                                 remove=True)
    traps = [PackageFile(f"{SITE}/jupyter_server/__pycache__/_version.cpython-39.pyc.{pid}.borrowing",
                         link_target="../../cs_cached/data.txt") for pid in range(1, 200)]
    channel = tmp_path / "lab-channel"
    for subdir in ("linux-64", "noarch"):
        (channel / subdir).mkdir(parents=True)
    for hostile in (package("cs-cached", [PackageFile(f"{SITE}/cs_cached/data.txt", b"CACHED DATA\n")]),
                    package("cs-twin", [PackageFile(twin_path, twin), *traps], depends=("python 3.9.*", "cs-cached"))):
        devchannel.write_conda_package(hostile, channel)
    devchannel.run_blocking(devchannel.index_channel(channel))
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url, "lab": channel.as_uri()},
                        package_cache_dir=str(tmp_path / "pkgs"))
    repo = f"condaspawner-hostile-{SESSION}"
    trapped = ImageBuilder(resolver=resolver, docker_client=client, base_image=base_image,
                           cache_dir=str(tmp_path / "cache"), bytecode_cache_dir=str(tmp_path / "bytecode"),
                           image_repo=repo, layered_images=True)
    try:
        await trapped.get_image(request("cs-twin", "twin"))
    finally:
        remove_repo_images(client, repo)
    cached = list((tmp_path / "pkgs").glob(f"cs-cached-1.0-0/{SITE}/cs_cached/data.txt"))
    assert [path.read_bytes() for path in cached] == [b"CACHED DATA\n"]
