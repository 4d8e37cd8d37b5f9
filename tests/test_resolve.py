"""The resolver against the real local conda channel: solve, lock, install, reinstall."""

from __future__ import annotations

import asyncio
import errno
import json
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from throwaway_channel import write_channel

from condaspawner_bench.devchannel import CondaPackage, PackageFile
from jupyterhub_condaspawner import installer, packagepaths, resolve
from jupyterhub_condaspawner.resolve import Lock, ResolveError, Resolver, is_no_space
from jupyterhub_condaspawner.spec import SpecPolicy
from jupyterhub_condaspawner.staging import tree_size

TARGET = "/opt/conda/envs/demo"


def spec(text: str):
    return SpecPolicy().parse(text)


@pytest.fixture
def resolver(dev_channel, tmp_path_factory) -> Resolver:
    return Resolver(
        channel_urls={"conda-forge": dev_channel.url},
        package_cache_dir=str(tmp_path_factory.getbasetemp() / "pkgs"),
    )


def conda_meta(prefix: Path) -> dict[str, dict]:
    """conda-meta records without fields that legitimately differ between installs."""
    records = {}
    for path in sorted((prefix / "conda-meta").glob("*.json")):
        record = json.loads(path.read_text())
        for volatile in ("extracted_package_dir", "package_tarball_full_path", "link"):
            record.pop(volatile, None)
        records[path.name] = record
    return records


def test_channel_names_map_to_urls(resolver, dev_channel):
    environment = spec("channels: [conda-forge, nodefaults]\ndependencies: [bioconda::x, y]")
    resolver.channel_alias = "https://mirror.example/"
    assert resolver.channel_urls_for(environment) == [dev_channel.url, "https://mirror.example/bioconda"]
    assert resolver.channel_urls_for(spec("dependencies: [y]")) == [dev_channel.url]
    assert resolver.channel_url("defaults") == "https://repo.anaconda.com/pkgs/main"


async def test_solve_picks_versions_and_dependencies(resolver):
    lock = await resolver.solve(spec("channels: [conda-forge]\ndependencies: [cs-gamma]"))
    versions = {p["name"]: p["version"] for p in lock.packages()}
    assert versions == {"cs-alpha": "1.1", "cs-beta": "1.0", "cs-gamma": "0.5"}
    for package in lock.packages():
        assert package["url"].startswith("file://") and len(package["sha256"]) == 64
    again = await resolver.solve(spec("channels: [conda-forge]\ndependencies: [cs-gamma]"))
    assert again.digest() == lock.digest()


async def test_channel_qualified_spec_uses_the_configured_url(resolver):
    lock = await resolver.solve(spec("dependencies: ['conda-forge::cs-alpha=1.0']"))
    assert [(p["name"], p["version"]) for p in lock.packages()] == [("cs-alpha", "1.0")]


async def test_a_channel_qualified_spec_that_cannot_solve_names_its_channel_not_the_hubs_url(resolver, dev_channel):
    with pytest.raises(ResolveError) as info:
        await resolver.solve(spec("dependencies: ['conda-forge::cs-gamaa', 'conda-forge/noarch::cs-alpha>=9']"))
    assert dev_channel.url.rstrip("/") not in str(info.value)
    assert str(info.value).startswith('cannot solve: No candidates were found for cs-alpha >=9[channel="conda-forge", '
                                      'subdir="noarch"]. (')


async def test_a_version_written_into_the_name_is_hinted_as_a_spec(resolver):
    # `cs-alpha-1.0` (a package file's name) asks for a package of that name
    with pytest.raises(ResolveError) as info:
        await resolver.solve(spec("channels: [conda-forge]\ndependencies: [cs-alpha-1.0]"))
    assert str(info.value).endswith("(nothing provides cs-alpha-1.0; did you mean cs-alpha=1.0?)")


async def test_unsatisfiable_spec_names_what_is_missing(resolver):
    with pytest.raises(ResolveError) as info:
        await resolver.solve(spec("channels: [conda-forge]\ndependencies: [cs-conflict]"))
    assert str(info.value).startswith("cannot solve: ") and "\n" not in str(info.value)
    with pytest.raises(ResolveError, match="cs-does-not-exist"):
        await resolver.solve(spec("channels: [conda-forge]\ndependencies: [cs-does-not-exist]"))


async def test_cuda_package_needs_the_override(resolver):
    environment = spec("channels: [conda-forge]\ndependencies: [cs-cuda-kernels]")
    with pytest.raises(ResolveError) as info:
        await resolver.solve(environment)
    assert "__cuda" in str(info.value) and "pick a GPU profile" in str(info.value)
    with pytest.raises(ResolveError):
        await resolver.solve(environment, cuda="11.8")  # the package needs __cuda >=12
    lock = await resolver.solve(environment, cuda="12.4")
    assert "__cuda=12.4=0" in lock.virtual_packages
    assert [p["name"] for p in lock.packages()] == ["cs-cuda-kernels"]


async def test_unreachable_channel_is_one_line(resolver, tmp_path):
    resolver.channel_urls = {"conda-forge": (tmp_path / "no-channel-here").as_uri()}
    with pytest.raises(ResolveError) as info:
        await resolver.solve(spec("dependencies: [cs-alpha]"))
    assert str(info.value).startswith("a channel cannot be reached: could not find subdir")
    assert "No such file or directory" in str(info.value) and "\n" not in str(info.value)


async def test_install_lock_reinstall_gives_identical_conda_meta(resolver, tmp_path):
    lock = await resolver.solve(spec("channels: [conda-forge]\ndependencies: [cs-gamma]"))
    await resolver.install(lock, tmp_path / "first", TARGET)
    assert (tmp_path / "first" / "share" / "cs-gamma" / "VERSION").read_text().strip() == "0.5"

    lock.write(tmp_path / "env.lock")
    reread = Lock.read(tmp_path / "env.lock")
    assert reread.digest() == lock.digest() and reread.channels == lock.channels
    await resolver.install(reread, tmp_path / "second", TARGET)
    assert conda_meta(tmp_path / "first") == conda_meta(tmp_path / "second")
    assert len(conda_meta(tmp_path / "first")) == 3


async def test_installed_files_are_world_readable(resolver, tmp_path):
    lock = await resolver.solve(spec("dependencies: [cs-alpha]"))
    await resolver.install(lock, tmp_path / "env", TARGET)
    for path in (tmp_path / "env" / "conda-meta").iterdir():
        assert path.stat().st_mode & stat.S_IROTH, path


async def test_an_install_tells_the_bytes_it_installed_each_hard_linked_file_once(resolver, tmp_path):
    lock = await resolver.solve(spec("channels: [conda-forge]\ndependencies: [cs-gamma]"))
    installed = await resolver.install(lock, tmp_path / "env", TARGET)
    assert installed == tree_size(tmp_path / "env") > 0


def test_reading_a_bad_lock_file_is_one_line(tmp_path):
    (tmp_path / "bad.lock").write_text("not: [a lock")
    with pytest.raises(ResolveError, match="not a lock file"):
        Lock.read(tmp_path / "bad.lock")


async def test_python_env_installs_at_its_image_path(resolver, dev_python_channel, tmp_path):
    lock = await resolver.solve(spec("channels: [conda-forge]\ndependencies: [python=3.9, ipykernel]"))
    names = {p["name"] for p in lock.packages()}
    assert {"python", "ipykernel", "pip", "jupyter-client"} <= names
    staging = tmp_path / "env"
    await resolver.install(lock, staging, TARGET)
    # Shebangs and sysconfig name the in-image prefix, never the staging path.
    shebang = (staging / "bin" / "pip").read_text().splitlines()[0]
    assert shebang == f"#!{TARGET}/bin/python3.9"
    assert not any(str(staging) in p.read_text(errors="ignore") for p in (staging / "bin").iterdir() if p.is_file())
    # The staged interpreter runs from the host too (its RUNPATH is relative).
    out = subprocess.run(
        [str(staging / "bin" / "python3.9"), "-c", "import ssl, sqlite3, ctypes, ipykernel; print(6*7)"],
        capture_output=True, text=True, env={**os.environ, "PYTHONNOUSERSITE": "1"},
    )
    assert out.stdout.strip() == "42", out.stderr


def test_cli_resolve_prints_the_lock_and_one_line_errors(dev_channel, tmp_path):
    from test_cli import condaspawner

    alias = tmp_path / "alias"
    alias.mkdir()
    (alias / "conda-forge").symlink_to(dev_channel.path)
    env = tmp_path / "env.yml"
    env.write_text("channels: [conda-forge]\ndependencies: [cs-beta]\n")
    result = condaspawner("resolve", str(env), "--channel-alias", alias.as_uri(), "--lock-file", str(tmp_path / "l"))
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.decode().splitlines()]
    assert [(name, version) for name, version, *_ in lines] == [("cs-alpha", "1.1"), ("cs-beta", "1.0")]
    assert all(len(fields) == 5 and fields[3].startswith(alias.as_uri()) for fields in lines)
    assert Lock.read(tmp_path / "l").packages()[1]["sha256"] == lines[1][4]

    config = tmp_path / "config.py"
    config.write_text(f"c = get_config()\nc.Resolver.channel_urls = {{'conda-forge': {dev_channel.url!r}}}\n")
    env.write_text("dependencies: [cs-cuda-kernels]\n")
    refused = condaspawner("resolve", "--config", str(config), str(env))
    assert refused.returncode == 1 and refused.stdout == b""
    (line,) = refused.stderr.decode().splitlines()
    assert line.startswith("error: cannot solve:") and "pick a GPU profile" in line
    solved = condaspawner("resolve", "--config", str(config), str(env), "--cuda", "12.4", "--json")
    assert json.loads(solved.stdout)["packages"][0]["name"] == "cs-cuda-kernels"


async def test_a_label_of_a_mirrored_channel_is_looked_up_on_the_mirror(resolver, dev_channel, tmp_path):
    # conda-forge is mirrored here: its labels must be too, never fetched from anaconda.org.
    assert resolver.channel_url("conda-forge/label/dev") == f"{dev_channel.url.rstrip('/')}/label/dev"
    assert resolver.channel_url("bioconda/label/x") == "https://conda.anaconda.org/bioconda/label/x"  # not mirrored

    # The mirror has no such label: the user's to fix (400), not "try again later".
    with pytest.raises(ResolveError) as info:
        await resolver.solve(spec("channels: [conda-forge/label/dev]\ndependencies: [cs-alpha]"))
    assert not info.value.unreachable
    assert str(info.value) == ("cannot solve: the channel 'conda-forge/label/dev' does not exist on this hub (it has "
                               "no noarch packages): remove it from channels")
    assert dev_channel.url not in str(info.value)

    # Named in a `channel::package` spec only: the spec is what to change, not the channels.
    with pytest.raises(ResolveError) as info:
        await resolver.solve(spec("channels: [conda-forge]\ndependencies: [cs-alpha, 'conda-forge/label/dev::cs-beta']"))
    assert str(info.value) == ("cannot solve: the channel 'conda-forge/label/dev' does not exist on this hub (it has "
                               "no noarch packages): write 'cs-beta' instead of 'conda-forge/label/dev::cs-beta'")

    # A mirror that has the label: used.
    mirror = tmp_path / "mirror"
    shutil.copytree(dev_channel.url.removeprefix("file://"), mirror)
    shutil.copytree(mirror, mirror / "label" / "dev", ignore=shutil.ignore_patterns("label"))
    resolver.channel_urls = {"conda-forge": mirror.as_uri()}
    lock = await resolver.solve(spec("channels: [conda-forge/label/dev]\ndependencies: [cs-alpha]"))
    assert [package["url"].startswith(f"{mirror.as_uri()}/label/dev/") for package in lock.packages()] == [True]


def hostile_channel(directory: Path, path: str) -> str:
    """A throwaway channel with ``cs-hostile``, whose one file (in its tar and info/paths.json) is ``path``."""
    return write_channel(directory, [CondaPackage("cs-hostile", "1.0", "0", "noarch",
                                                  files=[PackageFile(path, b"outside\n")])])


@pytest.mark.parametrize("path", ["/tmp/cs-hostile-outside/abs.txt", "share/../../cs-hostile-outside.txt"])
async def test_a_package_with_a_path_outside_its_prefix_is_refused_before_linking(tmp_path, path):
    # Without the check, py-rattler's installer panics on the absolute path and aborts this process.
    resolver = Resolver(channel_urls={"conda-forge": hostile_channel(tmp_path / "chan", path)},
                        package_cache_dir=str(tmp_path / "pkgs"))
    lock = await resolver.solve(spec("dependencies: [cs-hostile]"))
    for attempt in ("from the channel", "from the package cache"):
        with pytest.raises(ResolveError) as info:
            await resolver.install(lock, tmp_path / "env", TARGET)
        message = str(info.value)
        assert message.startswith("install failed: package cs-hostile-1.0-0 lists "), (attempt, message)
        assert repr(path) in message and "remove it from the environment file" in message and "\n" not in message
        assert not (tmp_path / "env" / "conda-meta").exists()
        assert not Path("/tmp/cs-hostile-outside").exists() and not (tmp_path / "cs-hostile-outside.txt").exists()
        with tarfile.open(tmp_path / "chan" / "noarch" / "cs-hostile-1.0-0.tar.bz2") as archive:  # as cached
            info = [member for member in archive.getmembers() if member.name.startswith("info/")]
            archive.extractall(tmp_path / "pkgs" / "cs-hostile-1.0-0", members=info, filter="data")


async def test_a_cached_file_list_found_safe_is_read_once_and_again_once_it_changes(tmp_path, monkeypatch):
    """The path check reads a package's file list in the package cache once per hub process,
    not before every install; a list written since (another file, or the same one changed) is
    read and checked again."""
    resolver = Resolver(channel_urls={"conda-forge": hostile_channel(tmp_path / "chan", "share/cs-fine.txt")},
                        package_cache_dir=str(tmp_path / "pkgs"))
    lock = await resolver.solve(spec("dependencies: [cs-hostile]"))
    await resolver.install(lock, tmp_path / "first", TARGET)  # checked from the archive, then cached
    listed = packagepaths.listed_paths
    reads: list[int] = []
    monkeypatch.setattr(packagepaths, "listed_paths", lambda *lists: reads.append(1) or listed(*lists))
    for name in ("second", "third"):
        await resolver.install(lock, tmp_path / name, TARGET)
    assert len(reads) == 1 and (tmp_path / "third" / "share" / "cs-fine.txt").is_file()

    listing = tmp_path / "pkgs" / "cs-hostile-1.0-0" / "info" / "paths.json"
    record = json.loads(listing.read_text())
    record["paths"][0]["_path"] = "/tmp/cs-changed-outside/abs.txt"
    listing.write_text(json.dumps(record))
    with pytest.raises(ResolveError) as refused:
        await resolver.install(lock, tmp_path / "fourth", TARGET)
    assert str(refused.value).startswith("install failed: package cs-hostile-1.0-0 lists an absolute path")
    assert len(reads) == 2 and not (tmp_path / "fourth" / "conda-meta").exists()
    assert not Path("/tmp/cs-changed-outside").exists()


async def test_an_installer_that_crashes_fails_its_install_in_one_line_and_the_hub_process_goes_on(
        tmp_path, monkeypatch, resolver):
    """The install runs in a child process: the crash the path check prevents (py-rattler's
    installer aborts on an absolute path), let through here, ends only that child."""
    async def unchecked(records, cache):
        return None

    monkeypatch.setattr(resolve, "check_records", unchecked)
    hostile = Resolver(channel_urls={"conda-forge": hostile_channel(tmp_path / "chan", "/tmp/cs-crash-outside/abs.txt")},
                       package_cache_dir=str(tmp_path / "pkgs"))
    lock = await hostile.solve(spec("dependencies: [cs-hostile]"))
    with pytest.raises(ResolveError) as crashed:  # rattler's panic aborts its process, or ends its install
        await hostile.install(lock, tmp_path / "env", TARGET)
    message = str(crashed.value)
    assert message.startswith("install failed: ") and "\n" not in message
    shutil.rmtree("/tmp/cs-crash-outside", ignore_errors=True)

    fine = await resolver.solve(spec("dependencies: [cs-alpha]"))
    await resolver.install(fine, tmp_path / "after", TARGET)  # a new child installs the next one
    assert list((tmp_path / "after" / "conda-meta").glob("cs-alpha-*.json"))


async def test_an_installer_process_that_dies_fails_its_install_in_one_line(tmp_path):
    installers = installer.Installers(keep_idle=1)
    job = installer.InstallJob("/nonexistent.lock", str(tmp_path / "env"), str(tmp_path / "pkgs"), TARGET)
    before = {child for child in multiprocessing.active_children() if child.name == "condaspawner-install"}
    run = asyncio.ensure_future(installers.run(job))
    await asyncio.sleep(0)  # a new child has the job; it is still starting (Python, py-rattler)
    (child,) = {child for child in multiprocessing.active_children() if child.name == "condaspawner-install"} - before
    os.kill(child.pid, signal.SIGKILL)  # as a crash ends it
    with pytest.raises(installer.InstallerCrashed) as crashed:
        await run
    assert str(crashed.value) == ("the installer process ended unexpectedly (exit code -9): the hub's log may say why")
    assert (await installers.run(job)).error.startswith("install failed: ")  # the next job: a new child
    installers.close()


async def test_a_child_whose_install_failed_is_never_given_another(tmp_path):
    """py-rattler may answer a panic as an error while another of its threads aborts the child:
    the next install must not be sent to it."""
    installers = installer.Installers(keep_idle=1)
    job = installer.InstallJob("/nonexistent.lock", str(tmp_path / "env"), str(tmp_path / "pkgs"), TARGET)

    def installing() -> set:
        return {child.pid for child in multiprocessing.active_children() if child.name == "condaspawner-install"}

    before = installing()
    assert (await installers.run(job)).error.startswith("install failed: ")
    assert installing() == before  # its child is gone, not kept idle
    installers.close()


async def test_an_install_whose_build_ends_stops_its_installer(tmp_path):
    """A build that times out or is cancelled mid-install kills the child installing for it."""
    installers = installer.Installers(keep_idle=1)
    job = installer.InstallJob("/nonexistent.lock", str(tmp_path / "env"), str(tmp_path / "pkgs"), TARGET)

    def installing() -> set:
        return {child for child in multiprocessing.active_children() if child.name == "condaspawner-install"}

    before = installing()
    run = asyncio.ensure_future(installers.run(job))
    await asyncio.sleep(0)  # it takes a new child and sends the job
    (child,) = installing() - before
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    child.join(60)  # killed: on a loaded machine its end may take longer than the build waits for it
    assert not child.is_alive()
    outcome = await installers.run(job)  # another child, which answers
    assert outcome.error.startswith("install failed: ") and "nonexistent.lock" in outcome.error
    installers.close()


async def test_a_build_string_with_dots_as_pytorchs_channel_writes_them_solves(tmp_path):
    """`pytorch=2.0.1=py3.10_cuda11.8_cudnn8.7.0_0`: the spec check takes it, and so must the solver
    (a spec string given to it may not hold a dot in its build string)."""
    url = write_channel(tmp_path / "chan", [CondaPackage("cs-dotted", "2.0.1", "py3.9_cuda11.8_0", "noarch")])
    resolver = Resolver(channel_urls={"conda-forge": url}, package_cache_dir=str(tmp_path / "pkgs"))
    lock = await resolver.solve(spec("dependencies: ['cs-dotted=2.0.1=py3.9_cuda11.8_0']"))
    assert [(package["name"], package["build"]) for package in lock.packages()] == [("cs-dotted", "py3.9_cuda11.8_0")]


async def test_a_version_the_channels_lack_is_told_with_the_versions_they_have(resolver):
    with pytest.raises(ResolveError) as refused:
        await resolver.solve(spec("dependencies: [python=3.10]"))
    message = str(refused.value)
    assert message.startswith("cannot solve: No candidates were found for python 3.10.*. (python: the channels have ")
    assert message.endswith(", none matching 'python 3.10.*')") and "3.9." in message and "\n" not in message


async def test_a_build_string_from_another_platforms_export_is_told_as_such(resolver):
    # `conda env export` on a Mac pins macOS build strings: the version is there, the build is not.
    with pytest.raises(ResolveError) as refused:
        await resolver.solve(spec("dependencies: [python=3.9, cs-beta=1.0=h8ab2e1a_0]"))
    message = str(refused.value)
    assert ("(cs-beta: the channels have 1.0 only as build h_cs_0, none matching build 'h8ab2e1a_0': a build "
            "string from another platform's export? `conda env export --no-builds` leaves them out)") in message, message
    assert "\n" not in message
    with pytest.raises(ResolveError) as refused:  # a build glob is no export: no export hint
        await resolver.solve(spec("dependencies: [python=3.9, cs-beta=1.0=*special]"))
    assert "(cs-beta: the channels have 1.0 only as build h_cs_0, none matching build '*special')" in str(
        refused.value), refused.value
    with pytest.raises(ResolveError) as refused:  # a version that is not there at all: the versions it has
        await resolver.solve(spec("dependencies: [python=3.9, cs-beta=9.0=h_cs_0]"))
    assert "(cs-beta: the channels have 1.0, none matching 'cs-beta ==9.0 h_cs_0')" in str(refused.value), refused.value


async def test_a_package_listed_twice_is_told_only_for_the_pin_no_version_matches(resolver):
    # cs-alpha=2.0 matches the channel's 2.0; cs-alpha=9 matches nothing: only that one is "none matching".
    with pytest.raises(ResolveError) as refused:
        await resolver.solve(spec("dependencies: [cs-alpha=2.0, cs-alpha=9]"))
    message = str(refused.value)
    assert "none matching 'cs-alpha 9.*'" in message, message
    assert "'cs-alpha 2.0.*'" not in message, message


async def test_a_requirement_the_channels_can_meet_but_the_file_excludes_is_told_so(resolver):
    """The solver says a dependency's requirement has "no candidates" when the file's own pin rules
    them out: a researcher would look for a missing package. The message says which versions the
    channels have for it and which entry of the file excludes them."""
    with pytest.raises(ResolveError) as refused:
        await resolver.solve(spec("dependencies: ['cs-alpha>=2', cs-beta]"))
    message = str(refused.value)
    assert message.endswith("(cs-alpha >=1.1,<2, which cs-beta 1.0 requires: the channels have 1.1, "
                            "which 'cs-alpha >=2' excludes)"), message
    assert "\n" not in message


async def test_a_name_without_its_prefix_is_told_the_prefixed_one(resolver):
    # as 'dateutil' for conda's 'python-dateutil': too unlike by letters for the usual near match
    with pytest.raises(ResolveError) as refused:
        await resolver.solve(spec("dependencies: [beta]"))
    assert "(nothing provides beta; did you mean cs-beta?)" in str(refused.value), refused.value


async def test_many_missing_names_are_hinted_at_up_to_a_few(resolver):
    names = [f"cs-nosuch{index}" for index in range(12)]
    with pytest.raises(ResolveError) as refused:
        await resolver.solve(spec(f"dependencies: [{', '.join(names)}]"))
    message = str(refused.value)
    assert message.count("nothing provides cs-nosuch") <= 8 and message.endswith("and 4 more)"), message


@pytest.mark.parametrize("entry, subdir", [("conda-forge/win-64::cs-alpha", "win-64"),
                                           ("'cs-alpha[subdir=osx-arm64]'", "osx-arm64")])
async def test_a_spec_for_another_platform_is_refused_not_solved_for_this_one(resolver, entry, subdir):
    with pytest.raises(ResolveError) as refused:
        await resolver.solve(spec(f"dependencies: [{entry}]"))
    assert str(refused.value).endswith(f"asks for {subdir} packages, and this hub builds for linux-64: "
                                       f"remove {subdir!r} from it")


def test_a_full_disk_is_recognised_in_go_rust_and_python_words():
    assert is_no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert is_no_space(Exception("write /var/lib/docker/tmp/layer.tar: no space left on device"))  # Docker's (Go)
    assert is_no_space(Exception("failed to write: No space left on device (os error 28)"))
    assert not is_no_space(Exception("max depth exceeded"))
