"""The leftovers sweep's decisions that need no daemon: staging folders and the build locks.

What it finds and removes on the daemon is tested on the bench (test_build_faults.py, test_builder.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from jupyterhub_condaspawner import bytecode, leftovers, madeids, staging
from jupyterhub_condaspawner.builder import ImageBuilder
from jupyterhub_condaspawner.builderrors import BuildError
from jupyterhub_condaspawner.buildrecords import file_lock, lock_held
from jupyterhub_condaspawner.layeredbuild import check_installed
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.stagedenv import StagedEnvironment

KEY, OTHER = "ab" * 32, "cd" * 32


@pytest.fixture
def builder(tmp_path):
    """A builder of a cache folder of its own; no daemon (none of these sweeps asks one)."""
    return ImageBuilder(resolver=Resolver(package_cache_dir=str(tmp_path / "pkgs")), cache_dir=str(tmp_path / "cache"),
                        bytecode_cache_dir=str(tmp_path / "bytecode"))


def killed_build(builder: ImageBuilder, key: str) -> Path:
    """The staging folder and lock file a build of ``key`` killed mid-install left."""
    context = Path(builder.cache_dir) / "staging" / key
    (context / "env" / "half-installed").mkdir(parents=True)
    builder.key_dir(key).mkdir(parents=True)
    (builder.key_dir(key) / "build.lock").touch()
    return context


async def test_a_sweep_leaves_the_staging_folder_of_a_build_that_started_after_it_looked(builder):
    context = killed_build(builder, KEY)
    found = leftovers.find(builder, own_key=OTHER)  # another key's build starts: its sweep looks ...
    assert list(found.staging) == [context]
    async with file_lock(builder.key_dir(KEY) / "build.lock"):  # ... meanwhile KEY's build starts and installs
        shutil.rmtree(context)
        (context / "env" / "conda-meta").mkdir(parents=True)
        (context / "env" / "conda-meta" / "numpy-1.0-0.json").write_text("{}")
        assert lock_held(builder.key_dir(KEY) / "build.lock")
        gone = leftovers.remove(builder, found)  # ... then the sweep removes what it found
        assert (context / "env" / "conda-meta" / "numpy-1.0-0.json").exists()
        assert not gone.staging and not (builder.key_dir(KEY) / leftovers.SWEPT).exists()
    # once that build has ended (killed, say), the next sweep removes the folder
    assert list(leftovers.remove(builder, leftovers.find(builder)).staging) == [context]
    assert not context.exists()


async def test_a_builds_own_sweep_removes_its_keys_old_staging_folder_under_the_lock_it_holds(builder):
    context = killed_build(builder, KEY)
    async with file_lock(builder.key_dir(KEY) / "build.lock"):
        assert list(leftovers.sweep(builder, own_key=KEY).staging) == [context]
        assert not context.exists()


def test_what_a_sweep_removed_is_logged_where_the_hub_logs(tmp_path):
    hub_log = logging.Logger("JupyterHub")  # no parent: only its own handler sees a record
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    hub_log.addHandler(handler)
    builder = ImageBuilder(resolver=Resolver(package_cache_dir=str(tmp_path / "pkgs")), cache_dir=str(tmp_path / "cache"),
                           bytecode_cache_dir=str(tmp_path / "bytecode"), log=hub_log)
    killed_build(builder, KEY)
    assert leftovers.sweep(builder).staging
    assert lines == ["Removed what earlier builds left: 1 staging folder(s)"]


def test_a_sweep_leaves_folders_in_staging_that_no_build_made(builder):
    stranger = Path(builder.cache_dir) / "staging" / "not-a-key"
    stranger.mkdir(parents=True)
    assert not leftovers.sweep(builder).staging and stranger.exists()


def set_aside_folder(builder: ImageBuilder, key: str) -> Path:
    """A finished build's staging folder, set aside for removal (by this process: its id in the name)."""
    context = Path(builder.cache_dir) / "staging" / key
    (context / "env" / "lib").mkdir(parents=True)
    (context / "env" / "lib" / "file").write_bytes(b"x" * 1000)
    return staging.set_aside(context)


def test_a_set_aside_folder_is_a_leftover_once_no_process_holds_its_lock(builder):
    # A hub killed mid-removal, restarted with the same process id (as in a container): its
    # folder, named with that id, is a leftover all the same.
    aside = set_aside_folder(builder, KEY)
    assert str(os.getpid()) in aside.name and list(leftovers.find(builder).staging) == [aside]
    with (aside / staging.SET_ASIDE_LOCK).open("a") as remover:  # a process removing it now
        fcntl.flock(remover, fcntl.LOCK_EX)
        assert not leftovers.find(builder).staging
        assert not staging.remove_set_aside(aside) and (aside / "env" / "lib" / "file").exists()
        found = leftovers.Leftovers(staging={aside: 1000})  # found before that process took its lock
        assert not leftovers.remove(builder, found).staging and aside.exists()
    assert list(leftovers.remove(builder, leftovers.find(builder)).staging) == [aside]
    assert not aside.exists()


def test_a_finished_builds_staging_folder_is_removed_lock_file_last(builder):
    aside = set_aside_folder(builder, KEY)
    assert aside.parent == Path(builder.cache_dir) / "staging" and aside.name.startswith(staging.SET_ASIDE)
    assert staging.remove_set_aside(aside) and not aside.exists()
    assert staging.remove_set_aside(aside)  # gone already: nothing to do


def test_the_byte_code_caches_temporaries_older_than_the_build_timeout_are_swept(builder):
    cache = bytecode.cache_directory(builder.bytecode_cache_dir, builder.resolver.package_cache_dir)
    old, fresh, entry = cache / ".tmp-0123-4567", cache / ".tmp-89ab-4567", cache / ("ab" * 32)
    for folder in (old, fresh, entry):
        (folder / "lib").mkdir(parents=True)
    stamp = time.time() - builder.build_timeout - 60
    for folder in (old, entry):
        os.utime(folder, (stamp, stamp))
    found = leftovers.find(builder)
    assert list(found.temporaries) == [old]
    assert list(leftovers.remove(builder, found).temporaries) == [old]
    assert not old.exists() and fresh.exists() and entry.exists()  # a keep() may still write the fresh one
    assert bytecode.cache_directory("", "/pkgs") == Path("/pkgs/condaspawner-bytecode")


def test_what_a_build_log_names_is_nothing_the_sweep_removes(builder):
    # a pip step's output is the package's build code's: it could write any of these lines
    container, image = "0123456789ab" * 5 + "0123", "ab" * 32
    key_dir = builder.key_dir(KEY)
    key_dir.mkdir(parents=True)
    (key_dir / "build.log").write_text(
        f"Step 9/19 : RUN pip install\n ---> Running in {container[:12]}\ncompile container {container}\n"
        f" ---> {image[:12]}\nloaded image sha256:{image}\nkept the replaced image sha256:{image}: in use\n")
    found = leftovers.find(builder)  # no made.json: the daemon is not even asked
    assert not found.containers and not found.images and not found.processes and found.keys == []


def test_made_json_keeps_full_ids_as_the_builder_adds_them(tmp_path):
    assert not madeids.read(tmp_path)  # none yet
    madeids.add(tmp_path, images=["sha256:" + "ab" * 32], compilers=["cd" * 32])
    madeids.add(tmp_path, images=["ab" * 32, "ef" * 32], replaced=["sha256:" + "12" * 32])
    made = madeids.read(tmp_path)
    assert made.images == ("ab" * 32, "ef" * 32) and made.compilers == ("cd" * 32,)
    assert oct((tmp_path / madeids.MADE).stat().st_mode & 0o777) == "0o644"  # the admin's gc reads it
    assert [path.name for path in tmp_path.iterdir()] == [madeids.MADE]  # no temporary file stays
    madeids.start(tmp_path)  # the key's next build: only a replaced image a server may still run is kept
    assert madeids.read(tmp_path) == madeids.Made(replaced=("12" * 32,))
    with pytest.raises(ValueError):
        madeids.add(tmp_path, volumes=["x"])
    (tmp_path / madeids.MADE).write_text('{"images": "abc", "containers": [1, "ok"]}')
    assert madeids.read(tmp_path) == madeids.Made(containers=("ok",))
    (tmp_path / madeids.MADE).write_text("not json")
    assert not madeids.read(tmp_path)


def staged_environment(root: Path, packages: list[str], locked: list[str]) -> StagedEnvironment:
    """A staging folder with conda-meta records of ``packages``, and buildcontext's copy of a lock of ``locked``."""
    (root / "env" / "conda-meta").mkdir(parents=True)
    for name in packages:
        record = {"name": name, "version": "1.0", "build": "0", "files": []}
        (root / "env" / "conda-meta" / f"{name}-1.0-0.json").write_text(json.dumps(record))
    (root / "meta").mkdir()
    lock = {"packages": [{"name": name, "version": "1.0", "build": "0"} for name in locked]}
    (root / "meta" / "condaspawner-lock.json").write_text(json.dumps(lock))
    return StagedEnvironment.read(root / "env")


def test_the_layered_route_refuses_a_staged_environment_that_lacks_packages_of_its_lock(tmp_path):
    whole = staged_environment(tmp_path / "whole", ["numpy", "python"], ["numpy", "python"])
    check_installed(whole, tmp_path / "whole" / "meta" / "condaspawner-lock.json")
    emptied = staged_environment(tmp_path / "emptied", [], ["numpy", "python"])
    with pytest.raises(BuildError) as refused:
        check_installed(emptied, tmp_path / "emptied" / "meta" / "condaspawner-lock.json")
    assert refused.value.phase == "install"
    assert str(refused.value) == (f"the staging folder {tmp_path / 'emptied'} changed during the build: it holds 0 "
                                  "of the 2 packages installed into it")
    with pytest.raises(BuildError, match="its copy of the lock is gone$"):
        check_installed(whole, tmp_path / "missing.json")
