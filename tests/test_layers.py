"""Layered environment images: deterministic layers, and two images storing a shared package once."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import io
import json
import marshal
import os
import py_compile
import re
import subprocess
import sys
import tarfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from fixtures_docker import bench_dir, remove_repo_images
from kernel_script import kernel_round_trip
from throwaway_channel import write_channel

from condaspawner_bench.devchannel import CondaPackage, PackageFile
from jupyterhub_condaspawner import imageload, layeredbuild, layers, madeids, staging
from jupyterhub_condaspawner.builder import BuildRequest, ImageBuilder
from jupyterhub_condaspawner.builderrors import BuildError
from jupyterhub_condaspawner.bytecode import BytecodeCache
from jupyterhub_condaspawner.resolve import Resolver
from jupyterhub_condaspawner.spec import SpecPolicy
from jupyterhub_condaspawner.stagedenv import StagedEnvironment

SESSION = uuid.uuid4().hex[:8]
MB = 1024 * 1024


def stage(root: Path, packages: dict[str, dict[str, bytes]], mtime: float | None = None,
          records: dict[str, dict] | None = None) -> Path:
    """A staged prefix as rattler leaves it: each package's files plus conda-meta/<pkg>.json
    (with the fields ``records`` gives a package: its version, sha256, ...)."""
    (root / "conda-meta").mkdir(parents=True)
    for name, files in packages.items():
        for path, data in files.items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            if mtime is not None:
                os.utime(target, (mtime, mtime))
        record = {"name": name, "version": "1.0", "build": "0", "files": sorted(files),
                  "requested_spec": f"{name} {uuid.uuid4().hex}",  # differs per environment, as in life
                  **(records or {}).get(name, {})}
        (root / "conda-meta" / f"{name}-1.0-0.json").write_text(json.dumps(record))
    return root


def read(staged: Path) -> StagedEnvironment:
    """The staged environment as the layered route reads it, once its install is done."""
    return StagedEnvironment.read(staged)


def compile_batches(staging: Path, plan: list[layers.Layer], skip: set[str], done=()) -> list[list[str]]:
    """layers.compile_plan's batches, without the layer each belongs to."""
    return [paths for _, paths in layers.compile_plan(read(staging), plan, skip, done)]


def compiled(source: bytes, code: bytes = b"code") -> bytes:
    """Unchecked-hash byte code of ``source`` as the compile container writes it: its header (magic
    number, flags, the source's hash), then the code (any bytes: nothing here runs it)."""
    return importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little") + importlib.util.source_hash(source) + code


def source_hashes(staged: Path, *sources: str) -> dict[str, bytes]:
    """The hashes the compile container reports for the staged ``sources`` it compiled."""
    return {source: importlib.util.source_hash((staged / source).read_bytes()) for source in sources}


BIG = {"lib/libbig.so": b"\x7fELF" + b"x" * (2 * MB), "lib/big/__init__.py": b"VALUE = 1\n"}


def test_a_large_package_gets_its_own_layer_the_rest_share_and_conda_meta_is_on_top(tmp_path):
    staged = stage(tmp_path / "env", {"big": BIG, "small": {"lib/small.py": b"x = 1\n"},
                                      "tiny": {"bin/tool": b"#!/bin/sh\n"}}, mtime=1_234_567_890)
    (staged / "bin" / "tool").chmod(0o755)
    plan = layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)
    assert [layer.name for layer in plan] == ["big-1.0-0", "small packages", "environment"]
    prefix = layers.SHARED_PREFIX.lstrip("/")
    assert {e.path for e in plan[0].entries} == {f"{prefix}/lib/libbig.so", f"{prefix}/lib/big/__init__.py"}
    assert {e.path for e in plan[1].entries} == {f"{prefix}/lib/small.py", f"{prefix}/bin/tool"}
    top = {e.path: e.link for e in plan[2].entries}
    assert top["opt/conda/envs/demo"] == "_shared"
    assert all(path.startswith(f"{prefix}/conda-meta/") for path in top if path != "opt/conda/envs/demo")

    tar = io.BytesIO()
    layers.write_tar(plan[1].entries, tar)
    tar.seek(0)
    with tarfile.open(fileobj=tar) as archive:
        members = {m.name: m for m in archive.getmembers()}
    assert members[f"{prefix}/bin/tool"].mode == 0o755 and members[f"{prefix}/lib/small.py"].mode == 0o644
    assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}
    # a package's files keep its mtimes (the byte code it ships is checked by them), folders get the fixed one
    assert {m.name: m.mtime for m in members.values() if m.isfile()} == {
        f"{prefix}/bin/tool": 1_234_567_890, f"{prefix}/lib/small.py": 1_234_567_890}
    assert members[f"{prefix}/lib"].isdir() and members[f"{prefix}/lib"].mtime == layers.LAYER_MTIME
    tar = io.BytesIO()
    layers.write_tar(plan[2].entries, tar)  # conda-meta, written at install: the fixed mtime
    tar.seek(0)
    with tarfile.open(fileobj=tar) as archive:
        assert {m.mtime for m in archive.getmembers()} == {layers.LAYER_MTIME}


def test_python_sits_above_the_large_packages_it_compiles_nothing_of_so_a_patch_release_shares_them(tmp_path):
    """Docker shares a layer only on the same layers below it. A package that ships its byte code
    (or has no Python files) is the same bytes beside any python release: its layer goes below
    python's, so that an environment on another python patch release shares it. A package
    whose byte code the environment's python compiles goes above, its identity with python's."""
    big = b"\x7fELF" + b"x" * (2 * MB)
    packages = {
        "aaa-noarch": {"lib/python3.9/site-packages/aaa/__init__.py": b"A = 1\n", "share/aaa.dat": big},
        "python": {"bin/python3.9": big, "lib/python3.9/os.py": b"import sys\n",
                   "lib/python3.9/__pycache__/os.cpython-39.pyc": b"shipped"},
        "torch": {"lib/python3.9/site-packages/torch/__init__.py": b"T = 1\n",
                  "lib/python3.9/site-packages/torch/__pycache__/__init__.cpython-39.pyc": b"shipped",
                  "lib/python3.9/site-packages/torch/lib/libtorch.so": big},
        "cudnn": {"lib/libcudnn.so": big},
    }
    plans = []
    for python in ("3.9.18", "3.9.2"):
        release = {**packages, "python": {**packages["python"], "bin/python3.9": big + python.encode()}}
        records = {name: {"sha256": hashlib.sha256(f"{name}-{python if name == 'python' else ''}".encode()).hexdigest()}
                   for name in packages}
        records["python"]["version"] = python
        staged = read(stage(tmp_path / python, release, mtime=1_234_567_890, records=records))
        assert staged.compiled_here == {("aaa-noarch", "1.0", "0")}
        plans.append(layers.plan_layers(staged, "demo", min_bytes=MB, max_layers=10))
    new, old = plans
    assert [layer.name for layer in new] == ["cudnn-1.0-0", "torch-1.0-0", "python-3.9.18-0", "aaa-noarch-1.0-0",
                                             "small packages", "environment"]
    assert [layer.name for layer in old][:4] == ["cudnn-1.0-0", "torch-1.0-0", "python-3.9.2-0", "aaa-noarch-1.0-0"]
    for below in range(2):  # the same files and identities: the same layers, stored and pushed once
        assert [e.path for e in new[below].entries] == [e.path for e in old[below].entries]
        assert new[below].identity == old[below].identity and "+" not in new[below].identity
        tars = [io.BytesIO(), io.BytesIO()]
        for plan, tar in zip(plans, tars):
            layers.write_tar(plan[below].entries, tar)
        assert tars[0].getvalue() == tars[1].getvalue()
    assert new[3].identity != old[3].identity  # compiled by another python
    assert new[3].identity.startswith(hashlib.sha256(b"aaa-noarch-").hexdigest() + "+")


def test_a_file_a_package_lists_twice_is_written_once(tmp_path):
    staged = stage(tmp_path / "env", {"big": BIG})
    record = staged / "conda-meta" / "big-1.0-0.json"
    listed = json.loads(record.read_text())
    record.write_text(json.dumps({**listed, "files": [*listed["files"], "lib/big/__init__.py"]}))
    (big,) = [layer for layer in layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10) if layer.name == "big-1.0-0"]
    tar = io.BytesIO()
    layers.write_tar(big.entries, tar)
    tar.seek(0)
    with tarfile.open(fileobj=tar) as archive:
        names = archive.getnames()
    assert names.count(f"{layers.SHARED_PREFIX.lstrip('/')}/lib/big/__init__.py") == 1


def test_compiled_files_travel_with_the_package_of_their_source(tmp_path):
    staged = stage(tmp_path / "env", {"big": BIG, "python": {"lib/python3.9/os.py": b"sep = '/'\n",
                                                             "bin/python3.9": b"\x7fELF"},
                                      "small": {"lib/small.py": b"x = 1\n"}})
    pycs = ["lib/big/__pycache__/__init__.cpython-39.pyc", "lib/python3.9/__pycache__/os.cpython-39.opt-1.pyc",
            "lib/__pycache__/small.cpython-39.pyc", "lib/__pycache__/orphan.cpython-39.pyc"]
    for path in pycs:
        (staged / path).parent.mkdir(parents=True, exist_ok=True)
        (staged / path).write_bytes(b"compiled")
    plan = {layer.name: {entry.path.removeprefix(layers.SHARED_PREFIX[1:] + "/") for entry in layer.entries}
            for layer in layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)}
    assert pycs[0] in plan["big-1.0-0"]
    assert {pycs[1], pycs[2]} <= plan["small packages"]
    assert pycs[3] in plan["environment"]  # a file no package's source explains stays with the environment


def test_byte_code_compiled_after_planning_joins_the_layers_as_planning_afterwards_would(tmp_path):
    """Layers are planned before compiling and each gets its byte code when its turn comes
    (compilerun.layer_preparer): the same layers as planning the compiled tree."""
    staged = stage(tmp_path / "env", {"big": BIG, "python": {"lib/python3.9/os.py": b"sep = '/'\n",
                                                             "lib/python3.9/__pycache__/os.cpython-39.pyc": b"shipped"},
                                      "small": {"lib/small.py": b"x = 1\n", "lib/pkg/mod.py": b"y = 2\n"}})
    (staged / "lib" / "loose.py").write_bytes(b"z = 3\n")  # no package's: the environment's layer
    before = layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)
    for path in ("lib/big/__pycache__/__init__.cpython-39.pyc", "lib/__pycache__/small.cpython-39.pyc",
                 "lib/pkg/__pycache__/mod.cpython-39.pyc", "lib/__pycache__/loose.cpython-39.pyc"):
        (staged / path).parent.mkdir(parents=True, exist_ok=True)
        (staged / path).write_bytes(b"compiled")
    placer = layers.ByteCodePlacer(read(staged))
    after = layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)
    assert [placer.layer_with_byte_code(layer) for layer in before] == after
    prefix = layers.SHARED_PREFIX.lstrip("/") + "/"
    assert prefix + "lib/__pycache__/loose.cpython-39.pyc" in {entry.path for entry in after[-1].entries}


def test_layers_docker_holds_with_their_byte_code_are_not_compiled_again(tmp_path):
    staged = stage(tmp_path / "env", {"big": BIG, "python": {"lib/python3.9/os.py": b"sep = '/'\n"},
                                      "small": {"lib/small.py": b"x = 1\n"}})
    for name, sha in (("big", "ab" * 32), ("python", "cd" * 32)):
        record = staged / "conda-meta" / f"{name}-1.0-0.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": sha}))
    plan = layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)
    base = {"RootFS": {"Layers": ["sha256:" + "b" * 64]}}
    memo = layers.LayerMemo(tmp_path / "memo")
    # its byte code is python's: python is in its identity; and so are the files it holds here
    assert plan[0].identity.startswith("ab" * 32 + "+" + "cd" * 32 + ":")
    memo.put(plan[0], "sha256:" + "c" * 64, 10)
    chains = layers.chain_ids([*base["RootFS"]["Layers"], "sha256:" + "c" * 64])
    assert layers.stored_layers(base, plan, set(chains), memo) == {"big-1.0-0"}
    assert layers.stored_layers(base, plan, set(), memo) == set()  # remembered, but not on this base
    prefix = layers.SHARED_PREFIX
    # a batch per package: its byte code does not depend on which packages share its layer
    assert compile_batches(staged, plan, {"big-1.0-0"}) == [[f"{prefix}/lib/python3.9/os.py"],
                                                                   [f"{prefix}/lib/small.py"]]
    assert [f"{prefix}/lib/big/__init__.py"] in compile_batches(staged, plan, set())
    assert compile_batches(staged, plan, set(), done={"lib/small.py", "lib/big/__init__.py"}) == [
        [f"{prefix}/lib/python3.9/os.py"]]


def test_byte_code_is_kept_by_package_and_linked_into_the_next_environment(tmp_path):
    def staged_env(name: str, packages: dict) -> Path:
        staged = stage(tmp_path / name, packages)
        for package in packages:
            record = staged / "conda-meta" / f"{package}-1.0-0.json"
            record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": package[0] * 64}))
        return staged

    python = {"lib/python3.9/os.py": b"sep = '/'\n"}
    first = staged_env("one", {"python": python, "small": {"lib/small.py": b"x = 1\n"}})
    pyc = "lib/__pycache__/small.cpython-39.pyc"
    (first / pyc).parent.mkdir(parents=True)
    (first / pyc).write_bytes(compiled(b"x = 1\n"))
    cache = BytecodeCache(tmp_path / "bytecode")
    cache.keep(read(first), source_hashes(first, "lib/small.py"))
    assert cache.restore(read(first)).done == {"lib/small.py"}  # python's os.py was not compiled: nothing kept for it

    second = staged_env("two", {"python": python, "small": {"lib/small.py": b"x = 1\n"}, "other": {"lib/o.py": b""}})
    assert cache.restore(read(second)).done == {"lib/small.py"} and (second / pyc).read_bytes() == compiled(b"x = 1\n")
    plan = layers.plan_layers(read(second), "demo", min_bytes=MB, max_layers=10)
    assert [f"{layers.SHARED_PREFIX}/lib/small.py"] not in compile_batches(second, plan, set(), {"lib/small.py"})
    # another python, another identity: nothing restored
    third = staged_env("three", {"python": {"lib/python3.9/os.py": b"sep = '\\\\'\n"}, "small": {"lib/small.py": b"x = 1\n"}})
    record = third / "conda-meta" / "python-1.0-0.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "f" * 64}))
    assert cache.restore(read(third)).done == set()


def test_byte_code_taken_from_the_base_image_is_written_from_its_pack_over_any_stale_file(tmp_path):
    """The compile container packs the byte code it takes from the base image into one file per
    batch (no file each: on some disks each file made costs more than its bytes): the layer of its
    source holds each slice as the .pyc beside that source (mode 644, the fixed mtime), in place of
    a stale one the package ships; a slice for a source of another layer, or under a package's
    symlinked __pycache__, is left out."""
    staged = stage(tmp_path / "env", {"mine": {"lib/m.py": b"M = 1\n", "lib/__pycache__/m.cpython-39.pyc": b"stale",
                                               "lib/linked/n.py": b"N = 1\n"},
                                      "other": {"lib/o.py": b"O = 1\n"}})
    (staged / "lib" / "linked" / "__pycache__").symlink_to(tmp_path)
    pack = tmp_path / "0.pack"
    pack.write_bytes(b"for o" + compiled(b"M = 1\n", b"taken") + b"for n")
    packed = {"lib/__pycache__/m.cpython-39.pyc": (pack, 5, 16 + 5), "lib/__pycache__/o.cpython-39.pyc": (pack, 0, 5),
              "lib/linked/__pycache__/n.cpython-39.pyc": (pack, 26, 5)}
    prefix = layers.SHARED_PREFIX.lstrip("/")
    layer = layers.Layer("mine", tuple(layers.Entry(f"{prefix}/{path}", staged / path)
                                       for path in ("lib/m.py", "lib/__pycache__/m.cpython-39.pyc", "lib/linked/n.py")))
    placed = layers.ByteCodePlacer(read(staged)).layer_with_byte_code(layer, packed)
    tar = io.BytesIO()
    layers.write_tar(placed.entries, tar)
    tar.seek(0)
    with tarfile.open(fileobj=tar) as archive:
        files = {member.name: (member.mode, member.mtime, archive.extractfile(member).read())
                 for member in archive.getmembers() if member.isfile()}
    assert files == {f"{prefix}/lib/m.py": (0o644, layers.LAYER_MTIME, b"M = 1\n"),
                     f"{prefix}/lib/__pycache__/m.cpython-39.pyc": (0o644, layers.LAYER_MTIME, compiled(b"M = 1\n", b"taken")),
                     f"{prefix}/lib/linked/n.py": (0o644, layers.LAYER_MTIME, b"N = 1\n")}
    assert layers.tar_size(placed.entries) == len(tar.getvalue())


def packed_environment(root: Path, packages: dict[str, dict[str, bytes]]) -> Path:
    staged = stage(root, packages, records={name: {"sha256": name[0] * 64} for name in packages})
    (staged / "lib" / "__pycache__").mkdir(exist_ok=True)
    return staged


def test_byte_code_taken_from_the_base_image_is_kept_in_one_pack_and_written_from_it_into_the_next_image(tmp_path):
    """The byte code taken from the base image comes in the compile container's packs, not as files:
    the cache keeps it as it came, one pack per package's entry (a file each costs some disks more than
    its bytes), and a later build's layers hold each slice as the .pyc beside its source, with the
    byte code compiled before linked: nothing of that package is compiled or taken again."""
    packages = {"half": {"lib/a.py": b"A = 1\n", "lib/b.py": b"B = 1\n"}, "whole": {"lib/c.py": b"C = 1\n"},
                "none": {"lib/d.py": b"D = 1\n"}}
    staged = packed_environment(tmp_path / "env", packages)
    (staged / "lib" / "__pycache__" / "a.cpython-39.pyc").write_bytes(compiled(b"A = 1\n"))
    pack = tmp_path / "0.pack"
    taken = {"b": compiled(b"B = 1\n", b"from the base"), "c": compiled(b"C = 1\n", b"from it too")}
    pack.write_bytes(taken["b"] + taken["c"])
    packed = {"lib/__pycache__/b.cpython-39.pyc": (pack, 0, len(taken["b"])),
              "lib/__pycache__/c.cpython-39.pyc": (pack, len(taken["b"]), len(taken["c"]))}
    cache = BytecodeCache(tmp_path / "bytecode")
    cache.keep(read(staged), source_hashes(staged, "lib/a.py", "lib/b.py", "lib/c.py"), packed)
    assert len(list((tmp_path / "bytecode").iterdir())) == 2  # "none" had nothing compiled nor taken
    pack.unlink()  # the compile container's folder goes with its build

    again = packed_environment(tmp_path / "again", packages)
    restored = cache.restore(read(again))
    assert restored.done == {"lib/a.py", "lib/b.py", "lib/c.py"}
    assert sorted(path.name for path in (again / "lib" / "__pycache__").iterdir()) == ["a.cpython-39.pyc"]
    plan = layers.plan_layers(read(again), "demo", min_bytes=MB, max_layers=10)
    assert compile_batches(again, plan, set(), restored.done) == [[f"{layers.SHARED_PREFIX}/lib/d.py"]]
    placer = layers.ByteCodePlacer(read(again))
    prefix = layers.SHARED_PREFIX.lstrip("/")
    held = {}
    for layer in plan:
        tar = io.BytesIO()
        layers.write_tar(placer.layer_with_byte_code(layer, restored.packed).entries, tar)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as archive:
            held.update({member.name.removeprefix(f"{prefix}/"): archive.extractfile(member).read()
                         for member in archive.getmembers() if member.name.endswith(".pyc")})
    assert held == {"lib/__pycache__/a.cpython-39.pyc": compiled(b"A = 1\n"),
                    "lib/__pycache__/b.cpython-39.pyc": taken["b"], "lib/__pycache__/c.cpython-39.pyc": taken["c"]}


def test_a_packed_slice_that_is_not_its_sources_byte_code_or_is_damaged_is_neither_kept_nor_restored(tmp_path):
    """A slice whose header names another source is not kept; a kept pack cut short drops its entry."""
    packages = {"whole": {"lib/c.py": b"C = 1\n"}}
    staged = packed_environment(tmp_path / "env", packages)
    pack = tmp_path / "0.pack"
    pack.write_bytes(compiled(b"C = 2\n"))
    cache = BytecodeCache(tmp_path / "bytecode")
    slices = {"lib/__pycache__/c.cpython-39.pyc": (pack, 0, pack.stat().st_size)}
    cache.keep(read(staged), source_hashes(staged, "lib/c.py"), slices)
    assert not list((tmp_path / "bytecode").iterdir())

    pack.write_bytes(compiled(b"C = 1\n"))
    cache.keep(read(staged), source_hashes(staged, "lib/c.py"), slices)
    (entry,) = (tmp_path / "bytecode").iterdir()
    kept = entry / "from-base-image.pack"
    kept.write_bytes(kept.read_bytes()[:-1])
    again = packed_environment(tmp_path / "again", packages)
    restored = cache.restore(read(again))
    assert restored.done == set() and restored.packed == {} and not entry.exists()


def test_a_damaged_byte_code_entry_is_dropped_not_linked(tmp_path):
    """A cached .pyc cut short (a disk error, a bad copy of the folder) would break every later
    image with its package: each file's digest is checked first, and the entry removed."""
    staged = stage(tmp_path / "one", {"small": {"lib/small.py": b"x = 1\n"}})
    record = staged / "conda-meta" / "small-1.0-0.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "a" * 64}))
    pyc = "lib/__pycache__/small.cpython-39.pyc"
    (staged / pyc).parent.mkdir(parents=True)
    (staged / pyc).write_bytes(compiled(b"x = 1\n", b"byte code, whole"))
    cache = BytecodeCache(tmp_path / "bytecode")
    cache.keep(read(staged), source_hashes(staged, "lib/small.py"))
    (entry,) = (tmp_path / "bytecode").iterdir()
    (staged / pyc).unlink()
    (entry / pyc).write_bytes(b"byte")  # truncated in the cache
    again = stage(tmp_path / "two", {"small": {"lib/small.py": b"x = 1\n"}})
    (again / "conda-meta" / "small-1.0-0.json").write_text(record.read_text())
    assert cache.restore(read(again)).done == set()  # compiled again
    assert not (again / pyc).exists() and not entry.exists()


def zzevil_environment(root: Path) -> Path:
    """The shape of a hostile package: cs-zzevil's ``__pycache__`` is a symlink into cs-target's, so
    the byte code of its m.py, compiled there, would be cs-target's m.py's."""
    site = "lib/python3.9/site-packages"
    staged = stage(root, {"cs-target": {f"{site}/cs_target/__init__.py": b"", f"{site}/cs_target/m.py": b"WHO = 'target'\n"},
                          "cs-zzevil": {f"{site}/cs_zzevil/__init__.py": b"", f"{site}/cs_zzevil/m.py": b"WHO = 'EVIL'\n"}},
                   records={"cs-target": {"sha256": "a" * 64}, "cs-zzevil": {"sha256": "b" * 64}})
    (staged / site / "cs_zzevil" / "__pycache__").symlink_to("../cs_target/__pycache__")
    record = staged / "conda-meta" / "cs-zzevil-1.0-0.json"
    listed = json.loads(record.read_text())
    record.write_text(json.dumps({**listed, "files": [*listed["files"], f"{site}/cs_zzevil/__pycache__"]}))
    (staged / site / "cs_target" / "__pycache__").mkdir()
    return staged


TARGET, EVIL = "lib/python3.9/site-packages/cs_target/m.py", "lib/python3.9/site-packages/cs_zzevil/m.py"
TARGET_PYC = "lib/python3.9/site-packages/cs_target/__pycache__/m.cpython-39.pyc"


def test_a_source_whose_pycache_is_a_symlink_is_not_compiled(tmp_path):
    staged = zzevil_environment(tmp_path / "env")
    plan = layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)
    prefix = layers.SHARED_PREFIX
    assert compile_batches(staged, plan, set()) == [[f"{prefix}/lib/python3.9/site-packages/cs_target/__init__.py",
                                                     f"{prefix}/{TARGET}"]]


def test_the_compile_script_writes_no_byte_code_through_a_symlinked_pycache(tmp_path):
    """Should such a source be in a batch all the same, the compiler neither reads nor writes its byte code,
    and reports the hash of each source it compiled. (Run here by this Python: in a build, the base image's.)"""
    staged = zzevil_environment(tmp_path / "env")
    site = staged / "lib/python3.9/site-packages"
    work = tmp_path / "compile"
    (work / "done").mkdir(parents=True)
    batches = [[str(site / "cs_target/__init__.py"), str(site / "cs_target/m.py")],
               [str(site / "cs_zzevil/__init__.py"), str(site / "cs_zzevil/m.py")]]  # after cs-target's: it would win
    (work / "batches.json").write_text(json.dumps({"python": None, "root": str(staged), "batches": batches}))
    output = subprocess.run([sys.executable, "-s", "-S", "-c", layers.COMPILE_SCRIPT, str(work / "batches.json"),
                             str(work / "done"), "5"], capture_output=True, text=True, check=True).stdout
    assert output.strip() == ("compiled 2 files, took the base image's byte code of 0 identical ones, "
                              "adopted the byte code of 0 from their packages (2 did not compile)")
    pyc = importlib.util.cache_from_source(str(site / "cs_target/m.py"))
    assert Path(pyc).read_bytes()[8:16] == importlib.util.source_hash(b"WHO = 'target'\n")
    reported = [json.loads((work / "done" / str(index)).read_text()) for index in range(2)]
    assert reported == [{"hashes": {path: importlib.util.source_hash(Path(path).read_bytes()).hex() for path in batches[0]},
                         "packed": {}}, {"hashes": {}, "packed": {}}]


def import_from(path: str, name: str) -> Any:
    """The module at ``path`` as an import loads it: from its byte code, which must be valid for it
    (the loader raises on a body that is not byte code, and it would recompile a stale one)."""
    loader = importlib.machinery.SourceFileLoader(name, path)
    assert loader.get_code(name) is not None
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def compile_script_run(work: Path, root: Path, batches: list[list[str]], borrow_from: Path,
                       preexec_fn: Any = None) -> subprocess.CompletedProcess[str]:
    """The compile script run here on ``batches``, its markers in ``work``/done (``preexec_fn``: the
    process's set-up)."""
    (work / "done").mkdir(parents=True, exist_ok=True)
    (work / "batches.json").write_text(json.dumps({"python": None, "root": str(root), "borrow_from": str(borrow_from),
                                                   "batches": batches}))
    return subprocess.run([sys.executable, "-s", "-S", "-c", layers.COMPILE_SCRIPT, str(work / "batches.json"),
                           str(work / "done"), "5"], capture_output=True, text=True, preexec_fn=preexec_fn)


def run_compile_script(work: Path, root: Path, batches: list[list[str]], borrow_from: Path,
                       preexec_fn: Any = None) -> str:
    """The compile script's summary line, run here on ``batches``: it must succeed."""
    run = compile_script_run(work, root, batches, borrow_from, preexec_fn)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def base_twin(base: Path, relative: str, source: bytes) -> Path:
    """A file of the "base image" at ``relative``, with the byte code pip leaves (checked by mtime and size)."""
    twin = base / relative
    twin.parent.mkdir(parents=True, exist_ok=True)
    twin.write_bytes(source)
    py_compile.compile(str(twin), doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return twin


def test_a_source_identical_to_the_base_images_takes_its_byte_code_and_imports_under_its_own_path(tmp_path):
    """The base image's environment holds the server's stack, compiled when the image was built: a
    staged source byte-identical to one at the same place there is not compiled again. Its byte code
    is the twin's code under an unchecked-hash header of its own source; imported, every code object
    names the staged file (importlib renames them as it loads them), and it runs. A source that
    differs by a byte, or whose twin's byte code is stale, is compiled."""
    env, base = tmp_path / "env", tmp_path / "base"
    site = "lib/python3.9/site-packages/cs_shared"
    same = b"def where():\n    return lambda: 'shared'\n"
    for relative, source in [(f"{site}/same.py", same), (f"{site}/other.py", b"X = 1\n"),
                             (f"{site}/stale.py", b"Y = 2\n")]:
        (env / relative).parent.mkdir(parents=True, exist_ok=True)
        (env / relative).write_bytes(source)
    base_twin(base, f"{site}/same.py", same)
    base_twin(base, f"{site}/other.py", b"X = 2\n")
    stale = base_twin(base, f"{site}/stale.py", b"Y = 2\n")
    os.utime(stale, (1, 1))  # its byte code was compiled from another version of it
    paths = [str(env / site / name) for name in ("same.py", "other.py", "stale.py")]
    output = run_compile_script(tmp_path / "compile", env, [paths], base)
    assert output == ("compiled 2 files, took the base image's byte code of 1 identical ones, "
                      "adopted the byte code of 0 from their packages (0 did not compile)")
    # The byte code taken is packed: no file of its own in the staged environment (each file made costs)
    cached = importlib.util.cache_from_source(paths[0])
    reported = json.loads((tmp_path / "compile" / "done" / "0").read_text())
    offset, size = reported["packed"][cached]
    assert not os.path.exists(cached) and list(reported["packed"]) == [cached]
    pyc = (tmp_path / "compile" / "done" / "0.pack").read_bytes()[offset:offset + size]
    Path(cached).write_bytes(pyc)  # where the layer puts it, to be imported below
    twin_pyc = Path(importlib.util.cache_from_source(str(base / site / "same.py"))).read_bytes()
    assert pyc[:16] == compiled(same, b"") and pyc[16:] == twin_pyc[16:]  # taken as it is: nothing compiled
    assert marshal.loads(pyc[16:]).co_filename == str(base / site / "same.py")  # until it is imported
    module = import_from(paths[0], "cs_shared_same")
    inner = module.where()
    assert (module.where.__code__.co_filename, inner.__code__.co_filename, inner()) == (paths[0], paths[0], "shared")
    for path, source in zip(paths[1:], (b"X = 1\n", b"Y = 2\n")):
        assert marshal.loads(Path(importlib.util.cache_from_source(path)).read_bytes()[16:]).co_filename == path
        assert Path(importlib.util.cache_from_source(path)).read_bytes()[:16] == compiled(source, b"")
    assert reported["hashes"] == {path: importlib.util.source_hash(Path(path).read_bytes()).hex() for path in paths}


def test_a_pack_that_cannot_grow_mid_batch_keeps_its_whole_slices_and_the_rest_is_compiled(tmp_path):
    """The pack is one file per batch: a write that fails half-way (a full disk, a file-size
    limit) must not leave a slice naming bytes that are not there, nor lose a file's byte code.
    Here the second file taken from the base image would make the pack larger than the process may
    write: the first keeps its whole slice, the second and every later one are compiled instead."""
    env, base = tmp_path / "env", tmp_path / "base"
    site = "lib/python3.9/site-packages/cs_shared"
    paths = []
    for name in ("a.py", "b.py", "c.py"):
        # byte code of ~2 kB: more than the batch's marker, which the same limit holds to, and less
        # than the pack's write buffer, as most files' (a failed write leaves its bytes buffered)
        source = "".join([f"def {name[0]}():\n    return {name!r}\n", *(f"V{i} = {i} * {i}\n" for i in range(80))]).encode()
        (env / site).mkdir(parents=True, exist_ok=True)
        (env / site / name).write_bytes(source)
        base_twin(base, f"{site}/{name}", source)
        paths.append(str(env / site / name))
    first_pyc = Path(importlib.util.cache_from_source(str(base / site / "a.py"))).read_bytes()
    limit = len(first_pyc) + 8  # the first slice fits; the second would pass the limit half-way

    def limited() -> None:  # EFBIG from the write that passes the limit, not the signal that kills
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    work = tmp_path / "compile"
    output = run_compile_script(work, env, [paths], base, preexec_fn=limited)
    assert output == ("compiled 2 files, took the base image's byte code of 1 identical ones, "
                      "adopted the byte code of 0 from their packages (0 did not compile)")
    reported = json.loads((work / "done" / "0").read_text())
    first = importlib.util.cache_from_source(paths[0])
    assert list(reported["packed"]) == [first]
    offset, size = reported["packed"][first]
    pack = (work / "done" / "0.pack").read_bytes()
    assert len(pack) >= offset + size and pack[offset + 16:offset + size] == first_pyc[16:]
    for path in paths[1:]:  # compiled beside their sources, under their own names
        pyc = Path(importlib.util.cache_from_source(path)).read_bytes()
        assert marshal.loads(pyc[16:]).co_filename == path
    assert reported["hashes"] == {path: importlib.util.source_hash(Path(path).read_bytes()).hex() for path in paths}


def test_a_batch_whose_marker_cannot_be_written_fails_the_compile_run_and_no_marker_claims_it(tmp_path):
    """The build takes a batch's byte code only once its marker is there. A marker that cannot be
    written (a full disk; here its temporary name is taken by a folder, which stops root too) must
    not leave the run looking done: the script exits non-zero (the build then compiles in the
    Dockerfile, test_a_compile_container_that_dies_midway_...) and no marker names that batch. The
    other batch, whose shipped byte code was adopted, was finished before: its marker is whole."""
    env = tmp_path / "env"
    site = env / "lib/python3.9/site-packages"
    for name, source in (("cs_one", "ONE = 1\n"), ("cs_two", "TWO = 2\n")):
        (site / name).mkdir(parents=True)
        (site / name / "m.py").write_text(source)
    py_compile.compile(str(site / "cs_one" / "m.py"), doraise=True,  # as its package ships it
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    work = tmp_path / "compile"
    (work / "done" / "1.partial").mkdir(parents=True)
    run = compile_script_run(work, env, [[str(site / "cs_one" / "m.py")], [str(site / "cs_two" / "m.py")]],
                             tmp_path / "none")
    assert run.returncode != 0 and "compiled " not in run.stdout
    assert not (work / "done" / "1").exists()
    assert json.loads((work / "done" / "0").read_text()) == {"hashes": {}, "packed": {}}


def test_a_source_whose_twins_byte_code_holds_no_code_object_is_compiled(tmp_path):
    """Byte code of the base image's with a header fit for its source and no code object behind it (a
    damaged file, a tool's leftover) is not the staged source's: that source is compiled, not left
    without byte code as one that "did not compile"."""
    env, base = tmp_path / "env", tmp_path / "base"
    site = "lib/python3.9/site-packages/cs_shared"
    paths = []
    for name, behind in [("none.py", marshal.dumps(None)), ("pair.py", marshal.dumps((1, 2)))]:
        source = f"WHO = {name!r}\n".encode()
        (env / site).mkdir(parents=True, exist_ok=True)
        (env / site / name).write_bytes(source)
        twin = base_twin(base, f"{site}/{name}", source)
        pyc = Path(importlib.util.cache_from_source(str(twin)))
        pyc.write_bytes(pyc.read_bytes()[:16] + behind)
        paths.append(str(env / site / name))
    output = run_compile_script(tmp_path / "compile", env, [paths], base)
    assert output == ("compiled 2 files, took the base image's byte code of 0 identical ones, "
                      "adopted the byte code of 0 from their packages (0 did not compile)")
    for path in paths:
        namespace: dict = {}
        exec(marshal.loads(Path(importlib.util.cache_from_source(path)).read_bytes()[16:]), namespace)
        assert namespace["WHO"] == os.path.basename(path)


def test_the_base_images_byte_code_is_not_taken_from_within_the_staged_environment(tmp_path):
    """In the container the staged environment is mounted inside the base image's prefix: a package's
    file at envs/_shared/... below the environment has its twin in the environment itself, a
    package's file, not the base image's. Its source is compiled, whatever byte code lies there."""
    base = tmp_path / "base"
    root = base / "envs" / "_shared"
    source = b"WHO = 'mine'\n"
    inner = "lib/python3.9/site-packages/cs_pkg/m.py"
    base_twin(root, inner, source)  # a package's source, and byte code it shipped
    nested = root / "envs" / "_shared" / inner
    nested.parent.mkdir(parents=True)
    nested.write_bytes(source)
    output = run_compile_script(tmp_path / "compile", root, [[str(nested)]], base)
    assert output.startswith("compiled 1 files, took the base image's byte code of 0 identical ones")


def test_byte_code_not_compiled_from_the_source_it_is_filed_under_is_neither_kept_nor_restored(tmp_path):
    """cs-zzevil's byte code written as cs-target's (through its symlinked __pycache__) would be kept by
    cs-target's identity and linked into every later environment with cs-target, never checked by Python."""
    staged = zzevil_environment(tmp_path / "env")
    (staged / TARGET_PYC).write_bytes(compiled(b"WHO = 'EVIL'\n"))
    reported = source_hashes(staged, TARGET, EVIL)  # what the compiler hashed: each source's own
    cache = BytecodeCache(tmp_path / "bytecode")
    cache.keep(read(staged), reported)
    assert not list((tmp_path / "bytecode").iterdir())  # not even a partial entry

    (staged / TARGET_PYC).write_bytes(compiled(b"WHO = 'target'\n"))
    cache.keep(read(staged), {})  # no hash reported: not compiled here
    assert not list((tmp_path / "bytecode").iterdir())
    cache.keep(read(staged), reported)
    assert len(list((tmp_path / "bytecode").iterdir())) == 1

    clean = stage(tmp_path / "clean", {"cs-target": {"lib/python3.9/site-packages/cs_target/__init__.py": b"",
                                                     TARGET: b"WHO = 'target'\n"}},
                  records={"cs-target": {"sha256": "a" * 64}})
    assert cache.restore(read(clean)).done == {TARGET, "lib/python3.9/site-packages/cs_target/__init__.py"}
    assert (clean / TARGET_PYC).read_bytes() == compiled(b"WHO = 'target'\n")
    # the same package, its m.py another's here (clobbered): its byte code is not this source's
    other = stage(tmp_path / "other", {"cs-target": {"lib/python3.9/site-packages/cs_target/__init__.py": b"",
                                                     TARGET: b"WHO = 'clobbered'\n"}},
                  records={"cs-target": {"sha256": "a" * 64}})
    assert cache.restore(read(other)).done == set() and not (other / TARGET_PYC).exists()


def digest(layer: layers.Layer) -> str:
    out = io.BytesIO()
    layers.write_tar(layer.entries, out)
    return hashlib.sha256(out.getvalue()).hexdigest()


def test_the_tar_size_is_known_from_metadata_alone(tmp_path):
    deep = "lib/" + "/".join(["a-rather-long-directory-name"] * 5) + "/module_with_a_long_name.py"
    staged = stage(tmp_path / "env", {"big": BIG, "deep": {deep: b"x = 1\n" * 100, "share/empty": b""}})
    (staged / "bin").mkdir()
    (staged / "bin" / "link").symlink_to("../" + deep)
    plan = layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)
    for layer in plan:
        out = io.BytesIO()
        layers.write_tar(layer.entries, out)
        assert layers.tar_size(layer.entries) == len(out.getvalue()), layer.name
        assert b"".join(layers.stream_tar(layer, len(out.getvalue()))) == out.getvalue()


def test_layer_tars_are_what_tarfile_writes_and_a_changed_file_is_an_error(tmp_path):
    """The writer skips tarfile's per-file machinery, not its format: the bytes are tarfile's own
    for the same members, so layers written before and after are the same layers."""
    deep = "lib/" + "/".join(["a-rather-long-directory-name"] * 5) + "/module_with_a_long_name.py"
    staged = stage(tmp_path / "env", {"big": BIG, "deep": {deep: b"x = 1\n" * 100, "bin/tool": b"#!/bin/sh\n"}})
    (staged / "bin" / "link").symlink_to("tool")
    (staged / "bin" / "tool").chmod(0o755)
    for layer in layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10):
        reference = io.BytesIO()
        with tarfile.open(fileobj=reference, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for member, source, _ in layers._members(layer.entries):
                with open(source, "rb") if source else contextlib.nullcontext() as content:
                    tar.addfile(member, content)
        out = io.BytesIO()
        layers.write_tar(layer.entries, out)
        assert out.getvalue() == reference.getvalue(), layer.name
    big = next(layer for layer in layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)
               if layer.name.startswith("big"))
    members = layers.tar_members(big.entries)
    victim = next(member.source for member in members if member.source is not None and member.size)
    Path(victim).write_bytes(b"shorter")
    with pytest.raises(OSError, match="shorter than when its layer was planned"):
        layers.write_members(members, io.BytesIO())


def test_the_small_packages_layer_is_known_by_its_packages_so_it_is_written_once(tmp_path):
    def small_layer(name: str, packages: dict[str, dict[str, bytes]], known: bool = True) -> layers.Layer:
        # the packages' files as extracted, with their archive's mtimes: the same in every environment
        staged = stage(tmp_path / name, packages, mtime=1_600_000_000)
        for record in (staged / "conda-meta").glob("*.json"):  # rattler records each package's sha256
            data = json.loads(record.read_text())
            content = repr(sorted(packages[data["name"]].items())).encode()
            data["sha256"] = hashlib.sha256(content).hexdigest() if known or data["name"] != "small" else ""
            record.write_text(json.dumps(data))
        plan = layers.plan_layers(read(staged), name, min_bytes=MB, max_layers=10)
        return next(layer for layer in plan if layer.name == "small packages")

    first = small_layer("first", {"big": BIG, "small": {"lib/small.py": b"x = 1\n"}})
    again = small_layer("again", {"big": BIG, "small": {"lib/small.py": b"x = 1\n"}})
    assert first.identity and first.identity == again.identity  # another environment, the same packages
    assert digest(first) == digest(again)  # and so the same bytes, which the memo may stand for
    other_small = small_layer("other-small", {"big": BIG, "small": {"lib/small.py": b"x = 2\n"}})
    other_below = small_layer("other-below", {"big": {**BIG, "lib/libbig.so": b"y" * 2 * MB},
                                              "small": {"lib/small.py": b"x = 1\n"}})
    all_small = small_layer("all-small", {"big": {"lib/big/__init__.py": b"VALUE = 1\n"},
                                          "small": {"lib/small.py": b"x = 1\n"}})
    identities = {first.identity, other_small.identity, other_below.identity, all_small.identity}
    assert len(identities) == 4  # a package changed, or which packages have layers of their own
    assert small_layer("unknown", {"big": BIG, "small": {"lib/small.py": b"x = 1\n"}}, known=False).identity == ""


async def test_a_package_whose_files_another_package_clobbers_is_another_layer(tmp_path):
    """cs-clobbered and cs-clobberer both ship share/conflict.txt: installed together, the installer
    moves cs-clobbered's copy under __clobbers__. Its layer then holds other files than when it is
    installed alone, so it may not stand for that one in the memo (the image would lack a file)."""
    conflict = PackageFile("share/conflict.txt", b"mine\n")
    url = write_channel(tmp_path / "chan", [
        CondaPackage("cs-clobbered", "1.0", "0", "noarch", files=[conflict, PackageFile("lib/big.bin", b"b" * 2 * MB)]),
        CondaPackage("cs-clobberer", "1.0", "0", "noarch", depends=["cs-clobbered"],
                     files=[PackageFile("share/conflict.txt", b"theirs\n")])])
    resolver = Resolver(channel_urls={"conda-forge": url}, package_cache_dir=str(tmp_path / "pkgs"))

    async def clobbered_layers(name: str, dependency: str) -> list[layers.Layer]:
        lock = await resolver.solve(SpecPolicy().parse(f"dependencies: [{dependency}]"))
        await resolver.install(lock, tmp_path / name, "/opt/conda/envs/_shared")
        staged = read(tmp_path / name)
        staging.settle_mtimes(staged, layers.LAYER_MTIME)
        return layers.plan_layers(staged, name, min_bytes=MB, max_layers=10)

    together = await clobbered_layers("together", "cs-clobberer")
    alone = await clobbered_layers("alone", "cs-clobbered")
    assert [layer.name for layer in alone] == ["cs-clobbered-1.0-0", "small packages", "environment"]
    prefix = layers.SHARED_PREFIX.lstrip("/")
    assert f"{prefix}/share/conflict.txt" in {entry.path for entry in alone[0].entries}
    assert f"{prefix}/share/conflict.txt" not in {entry.path for entry in together[0].entries}
    assert together[0].identity and alone[0].identity and together[0].identity != alone[0].identity
    memo = layers.LayerMemo(tmp_path / "memo")
    memo.put(together[0], "sha256:" + "c" * 64, 1234)
    assert memo.get(alone[0]) is None
    again = await clobbered_layers("again", "cs-clobbered")  # the same files: the same layer, remembered
    assert again[0].identity == alone[0].identity and digest(again[0]) == digest(alone[0])
    assert again[1].identity == alone[1].identity


def test_the_memo_remembers_only_layers_with_an_identity(tmp_path):
    memo = layers.LayerMemo(tmp_path / "memo")
    package = layers.Layer("big-1.0-0", (), identity="ab" * 32)
    per_environment = layers.Layer("small packages", ())
    memo.put(package, "sha256:" + "c" * 64, 1234)
    memo.put(per_environment, "sha256:" + "d" * 64, 1)
    assert memo.get(package) == ("sha256:" + "c" * 64, 1234)
    assert memo.get(per_environment) is None and memo.get(layers.Layer("big-1.0-0", (), identity="ef" * 32)) is None
    assert layers.LayerMemo(None).get(package) is None


def test_a_layer_sent_without_its_byte_code_is_never_counted_on_for_it(tmp_path):
    """When the compile container ends early, or cannot compile, the layers go without their byte code
    and a Dockerfile step compiles: a later build that took such a layer as stored would compile
    nothing of its package, and its image would have no byte code for it."""
    staged = stage(tmp_path / "env", {"big": BIG}, records={"big": {"sha256": "ab" * 32}})
    plan = layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)
    base = {"RootFS": {"Layers": ["sha256:" + "b" * 64]}}
    without = "sha256:" + "c" * 64
    chains = set(layers.chain_ids([*base["RootFS"]["Layers"], without]))
    memo = layers.LayerMemo(tmp_path / "memo")
    memo.without_byte_code().put(plan[0], without, 10)
    assert memo.get(plan[0]) is None and memo.without_byte_code().get(plan[0]) == (without, 10)
    assert layers.stored_layers(base, plan, chains, memo) == set()
    assert [f"{layers.SHARED_PREFIX}/lib/big/__init__.py"] in compile_batches(staged, plan, set())


def test_the_same_package_staged_twice_gives_the_same_layer(tmp_path):
    """Another environment, staged elsewhere at another time, with other packages beside it: its
    package's files linked from the package cache, or copied (new mtimes) and given the cache's
    mtimes back, make the same layer. Byte code the package lists gets the fixed mtime: it may
    have been compiled over in one environment and not the other."""
    pyc = "lib/big/__pycache__/__init__.cpython-39.pyc"
    package = {**BIG, pyc: b"shipped byte code"}
    extracted = stage(tmp_path / "pkgs" / "big-1.0-0", {"big": package}, mtime=1_500_000_000)
    first = stage(tmp_path / "one", {"big": package, "small": {"lib/small.py": b"x = 1\n"}}, mtime=1_000)
    second = stage(tmp_path / "two", {"big": package, "other": {"lib/other.py": b"y = 2\n"}}, mtime=2_000_000)
    for path in package:  # the first environment's are hard links to the cache's files
        (first / path).unlink()
        os.link(extracted / path, first / path)
    for staged in (first, second):
        record = staged / "conda-meta" / "big-1.0-0.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "extracted_package_dir": str(extracted)}))
    assert staging.settle_mtimes(read(first), layers.LAYER_MTIME) == 1  # small's file (no cache recorded): the fixed mtime
    assert staging.settle_mtimes(read(second), layers.LAYER_MTIME) == len(package) + 1
    assert (second / "lib" / "libbig.so").stat().st_mtime == 1_500_000_000
    os.utime(second / pyc, (3_000_000, 3_000_000))  # compiled over here
    one, two = (layers.plan_layers(read(staged), name, min_bytes=MB, max_layers=10)
                for staged, name in ((first, "course"), (second, "lab")))
    assert digest(one[0]) == digest(two[0])
    assert digest(one[1]) != digest(two[1])
    (second / "conda-meta" / "other-1.0-0.json").unlink()
    record = second / "conda-meta" / "big-1.0-0.json"  # the package cache's copy is gone: the fixed mtime
    record.write_text(json.dumps({**json.loads(record.read_text()), "extracted_package_dir": str(tmp_path / "gone")}))
    assert staging.settle_mtimes(read(second), layers.LAYER_MTIME) == len(package)
    assert (second / "lib" / "libbig.so").stat().st_mtime == layers.LAYER_MTIME
    assert (extracted / "lib" / "libbig.so").stat().st_mtime == 1_500_000_000


def test_only_the_largest_packages_get_layers_when_there_are_too_many(tmp_path):
    packages = {f"p{i}": {f"lib/p{i}.bin": b"z" * (MB + i * 1000)} for i in range(5)}
    plan = layers.plan_layers(read(stage(tmp_path / "env", packages)), "demo", min_bytes=MB, max_layers=2)
    assert [layer.name for layer in plan] == ["p3-1.0-0", "p4-1.0-0", "small packages", "environment"]


def small_layers(plan: list[layers.Layer]) -> list[layers.Layer]:
    return [layer for layer in plan if layer.name.startswith(layers.SMALL_PACKAGES)]


def test_the_small_packages_are_cut_into_layers_that_docker_registers_one_after_another(tmp_path, monkeypatch):
    """Docker registers a layer only once all its bytes are in: one layer of every small package
    kept the load going long after its last byte. They go in layers of about SMALL_LAYER_BYTES,
    each package whole, in the packages' order; every file in exactly one of them."""
    monkeypatch.setattr(layers, "SMALL_LAYER_BYTES", 3 * 100_000)
    packages = {f"s{i}": {f"lib/s{i}.bin": b"z" * 100_000, f"lib/s{i}/__init__.py": b"X = 1\n"} for i in range(8)}
    packages["big"] = BIG

    def staged_of(folder: Path, packages: dict[str, Any]) -> StagedEnvironment:
        return read(stage(folder, packages,
                          records={name: {"sha256": hashlib.sha256(name.encode()).hexdigest()} for name in packages}))

    staged = staged_of(tmp_path / "env", packages)
    plan = layers.plan_layers(staged, "demo", min_bytes=MB, max_layers=10)
    assert [layer.name for layer in plan] == ["big-1.0-0", "small packages 1 of 3", "small packages 2 of 3",
                                              "small packages 3 of 3", "environment"]
    prefix = layers.SHARED_PREFIX.lstrip("/")

    def held(plan: list[layers.Layer]) -> list[set[str]]:
        return [{entry.path.removeprefix(f"{prefix}/lib/").split("/")[0].removesuffix(".bin")
                 for entry in layer.entries} for layer in small_layers(plan)]

    assert held(plan) == [{"s0", "s1", "s2"}, {"s3", "s4", "s5"}, {"s6", "s7"}]
    assert len({layer.identity for layer in plan[1:4]}) == 3 and all(layer.identity for layer in plan[1:4])
    # each package's byte code is compiled in a batch named after the layer its sources are in
    batches = layers.compile_plan(staged, plan, set())
    assert {name for name, _ in batches} == {"big-1.0-0", *(layer.name for layer in small_layers(plan))}

    # a last layer of less than half the size joins the one before (each layer costs Docker ~0.1 s)
    seven = {name: files for name, files in packages.items() if name != "s7"}
    plan = layers.plan_layers(staged_of(tmp_path / "fewer", seven), "demo", min_bytes=MB, max_layers=10)
    assert held(plan) == [{"s0", "s1", "s2"}, {"s3", "s4", "s5", "s6"}]

    monkeypatch.setattr(layers, "SMALL_LAYERS_MAX", 2)  # the layers grow rather than outnumber the limit
    plan = layers.plan_layers(staged, "demo", min_bytes=MB, max_layers=10)
    assert [layer.name for layer in small_layers(plan)] == ["small packages 1 of 2", "small packages 2 of 2"]


def test_environments_that_differ_in_a_late_small_package_share_the_small_layers_before_it(tmp_path, monkeypatch):
    """A small layer's packages and files depend only on the packages before it: the same
    bytes and identity in both environments, so Docker and a registry store it once."""
    monkeypatch.setattr(layers, "SMALL_LAYER_BYTES", 2 * 100_000)
    common = {f"s{i}": {f"lib/s{i}.bin": b"z" * 100_000, "share/both.txt": b"shared path\n"} for i in range(4)}
    plans = []
    for last in (b"one", b"two"):
        packages = {**common, "zz-late": {"lib/late.bin": last * 40_000}}  # no less than half a layer
        staged = stage(tmp_path / last.decode(), packages, mtime=1_234_567_890,
                       records={name: {"sha256": hashlib.sha256(name.encode() + (last if name == "zz-late" else b"")
                                                                ).hexdigest()} for name in packages})
        plans.append(small_layers(layers.plan_layers(read(staged), "demo", min_bytes=MB, max_layers=10)))
    one, two = plans
    assert [layer.name for layer in one] == ["small packages 1 of 3", "small packages 2 of 3", "small packages 3 of 3"]
    for same_one, same_two in zip(one[:2], two[:2]):
        assert same_one.identity == same_two.identity and digest(same_one) == digest(same_two)
    assert one[2].identity != two[2].identity and digest(one[2]) != digest(two[2])
    # a path two packages list goes in the first layer that holds one of them
    both = [layer.name for layer in one for entry in layer.entries if entry.path.endswith("share/both.txt")]
    assert both == ["small packages 1 of 3"]


def test_the_package_layers_fit_dockers_layer_limit_on_a_deep_base(tmp_path):
    assert layeredbuild.package_layer_cap(10) == layeredbuild.MAX_PACKAGE_LAYERS
    cap = layeredbuild.package_layer_cap(45)  # docker-stacks' images have about that many
    assert cap == 125 - 45 - layeredbuild.LAYERS_ABOVE_PACKAGES - 2
    assert 45 + cap + layeredbuild.LAYERS_ABOVE_PACKAGES + layeredbuild.DOCKERFILE_STEPS <= 125
    assert layeredbuild.package_layer_cap(124) == 0
    packages = {f"p{i}": {f"lib/p{i}.bin": b"z" * (MB + i * 1000)} for i in range(3)}
    plan = layers.plan_layers(read(stage(tmp_path / "env", packages)), "demo", min_bytes=MB, max_layers=0)
    assert [layer.name for layer in plan] == ["small packages", "environment"]
    assert len(plan[0].entries) == 3


def test_chain_ids_follow_dockers_definition():
    first, second = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert layers.chain_ids([first, second]) == [
        first, "sha256:" + hashlib.sha256(f"{first} {second}".encode()).hexdigest()]


# -- on the real daemon ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def layered_builder(docker_daemon, base_image, dev_python_channel, tmp_path_factory):
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url}, package_cache_dir=str(bench_dir() / "pkgs"))
    yield ImageBuilder(
        resolver=resolver, docker_client=docker_daemon.client(), base_image=base_image,
        cache_dir=str(tmp_path_factory.mktemp("layered-cache")), image_repo=f"condaspawner-layers-{SESSION}",
        layered_images=True, shared_layer_min_size=8 * MB,  # python's package gets a layer of its own
    )
    remove_repo_images(docker_daemon.client(), f"condaspawner-layers-{SESSION}")


def env_request(extra: str, name: str) -> BuildRequest:
    text = f"channels: [conda-forge]\ndependencies: [python=3.9, ipykernel, {extra}]\n"
    return BuildRequest(SpecPolicy().parse(textwrap.dedent(text)), env_name=name)


@pytest.mark.docker
async def test_two_environments_store_their_shared_packages_once(layered_builder, docker_daemon):
    first = await layered_builder.get_image(env_request("cs-alpha", "course"))
    second = await layered_builder.get_image(env_request("cs-beta", "lab"))
    api = docker_daemon.client().api
    one, two = (api.inspect_image(info.image_id)["RootFS"]["Layers"] for info in (first, second))
    shared = 0
    for chain_one, chain_two in zip(layers.chain_ids(one), layers.chain_ids(two)):
        if chain_one != chain_two:
            break
        shared += 1
    base_layers = len(api.inspect_image(layered_builder.base_image_id())["RootFS"]["Layers"])
    assert shared > base_layers  # at least python's layer sits, identical, on the same layers
    # Docker keeps one copy per chain: the shared layers exist once in its layer store.
    layerdb = bench_dir() / "docker" / "image" / "overlay2" / "layerdb" / "sha256"
    for chain in layers.chain_ids(one)[base_layers:shared]:
        assert (layerdb / chain.removeprefix("sha256:")).is_dir()
    log = (Path(layered_builder.key_dir(second.key)) / "build.log").read_text()
    assert "already stored" in log and "python-3.9" in log

    client = docker_daemon.client()
    script = kernel_round_trip("import sys, os; (sys.prefix, os.path.realpath(sys.prefix), sys.version_info[:2])", "lab")
    output = client.containers.run(second.tag, ["python", "-c", script], network_mode="host", remove=True)
    assert output.decode().strip().splitlines()[-1] == "ok ('/opt/conda/envs/lab', '/opt/conda/envs/_shared', (3, 9))"


@pytest.mark.docker
async def test_another_environment_of_the_same_packages_writes_only_its_own_top_layer(layered_builder):
    """A renamed profile, or one that differs in its variables only: every package layer, the
    small packages' one included, is already stored; nothing is compiled or sent again."""
    await layered_builder.get_image(env_request("cs-gamma", "before"))
    renamed = await layered_builder.get_image(env_request("cs-gamma", "after"))
    log = (Path(layered_builder.key_dir(renamed.key)) / "build.log").read_text()
    written = [line.split(":")[0].removeprefix("layer ") for line in log.splitlines()
               if line.startswith("layer ") and line.endswith(", written")]
    assert written == ["environment"], log  # with the kernel spec and settings
    assert re.search(r"^layer small packages: .* already stored$", log, re.M)
    assert re.search(r"^byte code of \d+ Python files from the cache, 0 compiled$", log, re.M), log


@pytest.mark.docker
async def test_small_packages_in_several_layers_load_run_and_are_stored_once(layered_builder, docker_daemon, monkeypatch):
    """The small packages cut into several layers (each waiting for its own packages' byte code):
    the image runs its kernel with every package's byte code in place, and a renamed profile
    stores none of those layers again."""
    monkeypatch.setattr(layers, "SMALL_LAYER_BYTES", 2 * MB)
    first = await layered_builder.get_image(env_request("cs-beta", "several"))
    renamed = await layered_builder.get_image(env_request("cs-beta", "several-renamed"))
    logs = [(Path(layered_builder.key_dir(info.key)) / "build.log").read_text() for info in (first, renamed)]
    small = re.findall(r"^layer (small packages \d+ of \d+): .*, (written|already stored)$", logs[0], re.M)
    assert len(small) >= 3 and {how for _, how in small} == {"written"}, logs[0]
    assert re.findall(r"^layer (small packages \d+ of \d+): .*, already stored$", logs[1], re.M) == [
        name for name, _ in small], logs[1]
    script = kernel_round_trip("import traitlets, jedi, sys, os; (sys.prefix, os.path.exists(traitlets.__cached__))",
                               "several")
    output = docker_daemon.client().containers.run(first.tag, ["python", "-c", script], network_mode="host",
                                                   remove=True)
    assert output.decode().strip().splitlines()[-1] == "ok ('/opt/conda/envs/several', True)"
    listing = docker_daemon.client().containers.run(
        first.tag, ["sh", "-c", f"find {layers.SHARED_PREFIX}/lib/python3.9/site-packages/traitlets "
                                "-name '*.pyc' | wc -l"], remove=True)
    assert int(listing.decode()) > 10  # compiled here, in the layer of its own package


@pytest.mark.docker
async def test_a_staged_file_gone_during_the_load_is_the_staging_folders_fault_not_dockers(
        layered_builder, docker_daemon, monkeypatch):
    """Something outside the build deletes a staged file while its layer is written (the load
    tries every layer again, and it is still gone): one line naming the staging folder and the
    file, not "cannot reach the Docker daemon"; no image is tagged."""
    streamed = imageload.stream_tar
    removed: list[str] = []

    def stream_without_a_file(layer, size, members=None):
        if not removed:  # the first layer sent (others may be stored); its staged files come first
            source = next(str(entry.source) for entry in layer.entries
                          if entry.source is not None and os.path.isfile(entry.source))
            os.unlink(source)
            removed.append(source)
        return streamed(layer, size, members)

    monkeypatch.setattr(imageload, "stream_tar", stream_without_a_file)
    request = env_request("cs-gamma", "vanishing")
    with pytest.raises(BuildError) as failed:
        await layered_builder.get_image(request)
    message = str(failed.value)
    assert "changed during the build" in message and removed[0] in message and "\n" not in message
    assert "Docker daemon" not in message and failed.value.phase == "install"
    assert layered_builder.find_image(layered_builder.build_key(request)) is None


@pytest.mark.docker
async def test_a_compile_container_that_dies_midway_leaves_the_byte_code_to_the_dockerfile(
        docker_daemon, base_image, dev_python_channel, tmp_path, monkeypatch):
    """Layers are written while the compile container works; if it ends before a batch a layer
    waits for, the image is loaded again without byte code and compiled by a Dockerfile step; no
    later build counts on those layers for their byte code."""
    script = layers.COMPILE_SCRIPT.replace("    with multiprocessing.Pool",
                                           "    batches = batches[:1]\n    with multiprocessing.Pool")  # then it exits
    assert script != layers.COMPILE_SCRIPT
    monkeypatch.setattr(layers, "COMPILE_SCRIPT", script)
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url}, package_cache_dir=str(bench_dir() / "pkgs"))
    repo = f"condaspawner-compile-dies-{SESSION}"
    builder = ImageBuilder(resolver=resolver, docker_client=docker_daemon.client(), base_image=base_image,
                           cache_dir=str(tmp_path / "cache"), bytecode_cache_dir=str(tmp_path / "bytecode"),
                           image_repo=repo, layered_images=True, shared_layer_min_size=8 * MB)
    try:
        info = await builder.get_image(env_request("cs-alpha", "dies"))
        log = (Path(builder.key_dir(info.key)) / "build.log").read_text()
        assert re.search(r"^compile: the compile container ended \(status 0\) before batch \d+ of \d+; "
                         r"compiling in the Dockerfile$", log, re.M), log
        client = docker_daemon.client()
        script = ("python -c 'import ipykernel.kernelapp' && "
                  "ls /opt/conda/envs/_shared/lib/python3.9/__pycache__/os.cpython-39.pyc")
        output = client.containers.run(info.tag, ["sh", "-c", script], network_mode="none", remove=True)
        assert output.decode().strip().endswith("os.cpython-39.pyc")  # compiled by the Dockerfile's step
        assert not list((tmp_path / "bytecode").glob("*"))  # nothing half-compiled kept for later builds
        # The next build of these packages counts on no layer sent without its byte code: it compiles
        # them, and its layers hold their byte code (there is no Dockerfile step to compile it).
        monkeypatch.undo()
        again = await builder.get_image(env_request("cs-alpha", "diesagain"))
        log = (Path(builder.key_dir(again.key)) / "build.log").read_text()
        assert "compiling in the Dockerfile" not in log and not re.search(r"^byte code .*, 0 compiled$", log, re.M), log
        site = "/opt/conda/envs/_shared/lib/python3.9"
        listing = f"ls {site}/__pycache__/os.cpython-39.pyc {site}/site-packages/ipykernel/__pycache__/kernelapp.cpython-39.pyc"
        client.containers.run(again.tag, ["sh", "-c", listing], network_mode="none", remove=True)  # ls fails otherwise
    finally:
        remove_repo_images(docker_daemon.client(), repo)


@pytest.mark.docker
async def test_a_build_that_fails_while_planning_removes_the_compile_container_it_started(
        docker_daemon, base_image, dev_python_channel, tmp_path, monkeypatch):
    """The compile container starts before the build has planned its layers: a build that fails
    in between (here: the daemon refusing the base's history) does not leave it waiting."""
    def refused(*args, **kwargs):
        raise docker.errors.APIError("the daemon refused (injected)")

    monkeypatch.setattr(layers, "base_history", refused)
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url}, package_cache_dir=str(bench_dir() / "pkgs"))
    builder = ImageBuilder(resolver=resolver, docker_client=docker_daemon.client(), base_image=base_image,
                           cache_dir=str(tmp_path / "cache"), bytecode_cache_dir=str(tmp_path / "bytecode"),
                           image_repo=f"condaspawner-plan-fails-{SESSION}", layered_images=True)
    request = env_request("cs-alpha", "planfails")
    with pytest.raises(BuildError, match=r" refused loading the environment's layers: the daemon refused \(injected\)$"):
        await builder.get_image(request)
    log = (Path(builder.key_dir(builder.build_key(request))) / "build.log").read_text()
    (container,) = re.findall(r"^compile container ([0-9a-f]{64})$", log, re.M)
    client = docker_daemon.client()
    deadline = time.monotonic() + 60
    while True:  # removed by a thread of its own: the failure does not wait for it
        try:
            client.api.inspect_container(container)
        except docker.errors.NotFound:
            break
        assert time.monotonic() < deadline, "the compile container stayed"
        time.sleep(0.2)
    assert not list((tmp_path / "cache" / "staging").glob("*"))


@pytest.mark.docker
def test_the_compile_container_waits_for_its_batches_and_gives_up_when_none_come(docker_daemon, base_image, tmp_path):
    """It starts while the build plans: it compiles the batches written after its start, and a
    container whose build ended before writing them exits on its own, saying why."""
    work = tmp_path / "work"
    (work / "lib").mkdir(parents=True)
    (work / "done").mkdir()
    (work / "lib" / "late.py").write_text("L = 1\n")
    client = docker_daemon.client()
    user = f"{os.getuid()}:{os.getgid()}"
    command = ["/opt/conda/bin/python", "-c", layers.COMPILE_SCRIPT, "/work/batches.json", "/work/done"]
    volumes = {str(work): {"bind": "/work", "mode": "rw"}}
    waiting = client.containers.run(base_image, [*command, "60"], volumes=volumes, user=user, network_mode="none",
                                    detach=True)
    try:
        time.sleep(1.0)
        waiting.reload()
        assert waiting.status == "running" and not (work / "done" / "0").exists()
        # whole when the container sees it, as the build writes it: the container polls for the file
        (work / "batches.json.partial").write_text(json.dumps([["/work/lib/late.py"]]))
        (work / "batches.json.partial").replace(work / "batches.json")
        assert waiting.wait(timeout=60)["StatusCode"] == 0
        assert (work / "done" / "0").exists() and (work / "lib" / "__pycache__" / "late.cpython-39.pyc").exists()
    finally:
        waiting.remove(force=True)

    (work / "batches.json").unlink()
    abandoned = client.containers.run(base_image, [*command, "1"], volumes=volumes, user=user, network_mode="none",
                                      detach=True)
    try:
        assert abandoned.wait(timeout=60)["StatusCode"] == 1
        assert abandoned.logs().decode().strip() == "no batches came: the build that started this container has ended"
    finally:
        abandoned.remove(force=True)


@pytest.mark.docker
def test_the_compile_container_adopts_the_byte_code_a_package_ships_and_compiles_the_rest(
        docker_daemon, base_image, tmp_path):
    """conda-build ships byte code checked by the source's mtime, which the layers keep: it is
    used as shipped, not compiled nor written again. Byte code checked by the source's hash is
    rewritten as unchecked-hash (Python would hash the source at each import); byte code that
    belongs to another source is compiled over; the package cache's copies are left as they were."""
    work = tmp_path / "work"
    (work / "lib").mkdir(parents=True)
    sources = {"shipped": "A = 1\n", "hashed": "H = 1\n", "stale": "B = 2\n", "bare": "C = 3\n", "broken": "def (:\n"}
    for name, text in {**sources, "stale": "B = 22222\n"}.items():  # stale's byte code: another source
        (work / "lib" / f"{name}.py").write_text(text)
        os.utime(work / "lib" / f"{name}.py", (1_234_567_890, 1_234_567_890))  # the package's mtime, not the layers'
    client = docker_daemon.client()
    volumes = {str(work): {"bind": "/work", "mode": "rw"}}
    ship = ("import py_compile\nfrom py_compile import PycInvalidationMode as Mode\n"
            "for name, mode in (('shipped', Mode.TIMESTAMP), ('stale', Mode.TIMESTAMP), ('hashed', Mode.CHECKED_HASH)):\n"
            "    py_compile.compile(f'/work/lib/{name}.py', dfile=f'lib/{name}.py', invalidation_mode=mode)\n")
    user = f"{os.getuid()}:{os.getgid()}"
    client.containers.run(base_image, ["/opt/conda/bin/python", "-c", ship], volumes=volumes, user=user,
                          network_mode="none", remove=True)
    (work / "lib" / "stale.py").write_text(sources["stale"])
    pycache = work / "lib" / "__pycache__"
    shipped_bytes = (pycache / "shipped.cpython-39.pyc").read_bytes()
    for name in ("shipped", "hashed"):
        os.link(pycache / f"{name}.cpython-39.pyc", work / f"package-cache-copy-{name}.pyc")
    (work / "done").mkdir()
    (work / "batches.json").write_text(json.dumps([[f"/work/lib/{name}.py" for name in sources]]))
    output = client.containers.run(
        base_image, ["/opt/conda/bin/python", "-c", layers.COMPILE_SCRIPT, "/work/batches.json", "/work/done", "5"],
        volumes=volumes, user=user, network_mode="none", environment={"PYTHONHASHSEED": "0"}, remove=True)
    assert output.decode().strip() == ("compiled 2 files, took the base image's byte code of 0 identical ones, "
                                       "adopted the byte code of 2 from their packages (1 did not compile)")
    assert (work / "done" / "0").exists()

    def header(name: str) -> tuple[int, bytes]:
        data = (pycache / f"{name}.cpython-39.pyc").read_bytes()
        return int.from_bytes(data[4:8], "little"), data
    assert header("shipped") == (0, shipped_bytes)  # as shipped: still the package cache's file
    assert (pycache / "shipped.cpython-39.pyc").stat().st_ino == (work / "package-cache-copy-shipped.pyc").stat().st_ino
    flags, adopted = header("hashed")
    assert flags == 1 and b"lib/hashed.py" in adopted and b"/work/lib/hashed.py" not in adopted  # the shipped code
    assert (work / "package-cache-copy-hashed.pyc").read_bytes()[4:8] == (3).to_bytes(4, "little")  # still checked
    for name in ("stale", "bare"):
        flags, compiled = header(name)
        assert flags == 1 and f"/work/lib/{name}.py".encode() in compiled
    # it reports the hash of each source it compiled, as its Python hashes it (the byte-code cache checks by them)
    assert json.loads((work / "done" / "0").read_text())["hashes"] == {
        f"/work/lib/{name}.py": header(name)[1][8:16].hex() for name in ("stale", "bare")}
    assert not (pycache / "broken.cpython-39.pyc").exists()
    # Python 3.9 runs the shipped byte code: the source's mtime and size are what it was compiled from.
    (work / "lib" / "shipped.py").write_text("A = 7\n")
    os.utime(work / "lib" / "shipped.py", (1_234_567_890, 1_234_567_890))
    check = "import sys; sys.path.insert(0, '/work/lib'); sys.dont_write_bytecode = True; import shipped; print(shipped.A)"
    output = client.containers.run(base_image, ["/opt/conda/bin/python", "-c", check], volumes=volumes, user=user,
                                   network_mode="none", remove=True)
    assert output.decode().strip() == "1"


@pytest.mark.docker
async def test_the_shared_layers_hold_the_byte_code_and_the_kernel_writes_none(layered_builder, docker_daemon):
    await layered_builder.get_image(env_request("cs-alpha", "course"))
    second = await layered_builder.get_image(env_request("cs-beta", "lab"))
    log = (Path(layered_builder.key_dir(second.key)) / "build.log").read_text()
    # the small packages' layer differs (cs-beta), but ipykernel's byte code is not compiled again: kept by
    # package, or taken from the base image again
    kept = int(re.search(r"^byte code of (\d+) Python files from the cache", log, re.M).group(1))
    taken = int(re.search(r"took the base image's byte code of (\d+) identical ones", log).group(1))
    assert kept + taken > 100, log
    python_layer = next(line for line in log.splitlines() if line.startswith("layer python-3.9"))
    assert python_layer.endswith("already stored")  # compiled files included: the same bytes in both images
    client = docker_daemon.client()
    # As root, so that Python could write any .pyc it found missing or stale: it finds none to write.
    script = ("touch /tmp/before && sleep 1 && python -c 'import ipykernel.kernelapp, jupyter_client' && "
              "find /opt/conda/envs/_shared -newer /tmp/before -name '*.pyc' | head -5 && "
              "ls /opt/conda/envs/_shared/lib/python3.9/__pycache__/os.cpython-39.pyc")
    output = client.containers.run(second.tag, ["sh", "-c", script], user="root", network_mode="none", remove=True)
    assert output.decode().strip().splitlines() == ["/opt/conda/envs/_shared/lib/python3.9/__pycache__/os.cpython-39.pyc"]
    # tornado (linux-64) ships its byte code, as conda-build makes it: used as shipped, its source
    # keeping the mtime it was compiled against (Python wrote none above)
    pyc = "/opt/conda/envs/_shared/lib/python3.9/site-packages/tornado/__pycache__/web.cpython-39.pyc"
    source = pyc.replace("__pycache__/", "").replace(".cpython-39.pyc", ".py")
    data = client.containers.run(second.tag, ["cat", pyc], network_mode="none", remove=True)
    # (the log stream is text: the header's numbers come through od)
    fields = client.containers.run(second.tag, ["sh", "-c", f"od -An -tu4 -j4 -N8 {pyc}; stat -c %Y {source}"],
                                   network_mode="none", remove=True).decode().split()
    assert fields[0] == "0" and fields[1] == fields[2], fields  # timestamp-checked, by the source's mtime
    assert b"lib/python3.9/site-packages/tornado/web.py" in data and b"/opt/conda/envs/" not in data
    assert re.search(r"^compiled \d+ files, took the base image's byte code of \d+ identical ones, adopted the byte code "
                     r"of [1-9]\d* from their packages", log, re.M) or (
        "0 compiled" in log)


@pytest.mark.docker
async def test_a_first_build_takes_the_base_images_byte_code_of_the_servers_stack(docker_daemon, base_image,
                                                                                 dev_python_channel, tmp_path):
    """A hub's first build (no byte code kept yet) compiles little of ipykernel's stack: the base image
    holds the single-user server, compiled when it was built, and the environment's identical sources
    take its byte code. Imported in the image (the kernel's Python, through the env's symlink), every
    function of the environment's modules names the environment's own file, never the base image's.
    The next environment with that stack has its byte code from the cache (kept in packs), the same
    bytes, and takes nothing from the base image again."""
    repository = f"condaspawner-layers-{SESSION}-first"
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url}, package_cache_dir=str(bench_dir() / "pkgs"))
    builder = ImageBuilder(resolver=resolver, docker_client=docker_daemon.client(), base_image=base_image,
                           cache_dir=str(tmp_path / "cache"), bytecode_cache_dir=str(tmp_path / "bytecode"),
                           image_repo=repository, layered_images=True)
    client = docker_daemon.client()
    kernelapp = f"{layers.SHARED_PREFIX}/lib/python3.9/site-packages/ipykernel/__pycache__/kernelapp.cpython-39.pyc"
    try:
        info = await builder.get_image(env_request("cs-gamma", "first"))
        log = (Path(builder.key_dir(info.key)) / "build.log").read_text()
        assert re.search(r"^byte code of 0 Python files from the cache", log, re.M)
        assert int(re.search(r"took the base image's byte code of (\d+) identical ones", log).group(1)) > 100
        assert imported_function_files(client, info.tag, "first") == "all the environment's own"

        second = await builder.get_image(env_request("cs-alpha", "second"))
        log = (Path(builder.key_dir(second.key)) / "build.log").read_text()
        assert int(re.search(r"^byte code of (\d+) Python files from the cache", log, re.M).group(1)) > 100
        assert re.findall(r"took the base image's byte code of (\d+) identical ones", log) in ([], ["0"])
        taken = client.containers.run(info.tag, ["sha256sum", kernelapp], network_mode="none", remove=True)
        assert client.containers.run(second.tag, ["sha256sum", kernelapp], network_mode="none", remove=True) == taken
        assert imported_function_files(client, second.tag, "second") == "all the environment's own"
    finally:
        remove_repo_images(client, repository)


def imported_function_files(client: docker.DockerClient, tag: str, env: str) -> str:
    """Whose files the functions of ipykernel's stack name, imported in image ``tag`` by the kernel's
    Python: "all the environment's own", or the counts (functions, the environment's, the base image's)."""
    script = ("import sys, types, ipykernel.kernelapp, jupyter_client, traitlets, tornado.web\n"
              "names = [value.__code__.co_filename for module in list(sys.modules.values())\n"
              "         if (getattr(module, '__file__', None) or '').startswith('/opt/conda/envs/')\n"
              "         for value in vars(module).values() if isinstance(value, types.FunctionType)\n"
              "         and value.__code__.co_filename.startswith('/')]  # not exec's '<string>'\n"
              f"print(len(names), sum(n.startswith('/opt/conda/envs/{env}/') for n in names),\n"
              "      sum(n.startswith('/opt/conda/lib/') for n in names))\n")
    output = client.containers.run(tag, [f"/opt/conda/envs/{env}/bin/python", "-c", script], network_mode="none",
                                   remove=True)
    functions, own, base = map(int, output.decode().split())
    return "all the environment's own" if functions > 100 and own == functions and base == 0 else str((functions, own, base))


@pytest.mark.docker
async def test_gc_counts_a_layered_images_own_bytes_and_shared_layers_once(layered_builder, docker_daemon):
    first = await layered_builder.get_image(env_request("cs-alpha", "course"))
    second = await layered_builder.get_image(env_request("cs-beta", "lab"))
    client = docker_daemon.client()
    base = client.images.get(layered_builder.base_image_id())
    own = layered_builder.own_layers([client.images.get(first.image_id), client.images.get(second.image_id)])
    for info in (first, second):
        # every layer above the base is counted: its bytes are what the image adds to the base
        assert sum(own[info.image_id].values()) == client.images.get(info.image_id).attrs["Size"] - base.attrs["Size"]
    shared = set(own[first.image_id]) & set(own[second.image_id])
    assert sum(own[first.image_id][key] for key in shared) > 8 * MB  # python's layer, at least
    everything = layered_builder.own_layers(layered_builder.images())
    once = {key: size for sizes in everything.values() for key, size in sizes.items()}
    assert layered_builder.gc_plan().total == sum(once.values())
    assert sum(once.values()) < sum(sum(sizes.values()) for sizes in everything.values())


@pytest.mark.docker
async def test_an_environment_without_pip_is_loaded_whole_with_no_docker_build(layered_builder, docker_daemon):
    info = await layered_builder.get_image(env_request("cs-alpha", "course"))
    log = (Path(layered_builder.key_dir(info.key)) / "build.log").read_text()
    assert "Step " not in log and f"loaded image {info.image_id}" in log
    attrs = docker_daemon.client().api.inspect_image(info.tag)
    config = attrs["Config"]
    assert "CONDASPAWNER_ENV=/opt/conda/envs/course" in config["Env"] and config["User"] == "jovyan"
    assert config["Labels"]["io.condaspawner.key"] == info.key
    history = docker_daemon.client().api.history(info.tag)  # newest first: this image's layers, then the base's
    assert history[0]["CreatedBy"].startswith(layers.HISTORY_PREFIX + "environment ")  # with the kernel spec
    # what env.Dockerfile's COPY steps wrote: root's files, readable by the server's user
    enabling = "/opt/conda/etc/jupyter/jupyter_server_config.d/condaspawner_server_settings.json"
    module = "/opt/conda/lib/python3.9/site-packages/condaspawner_server_settings.py"
    script = ("stat -c '%U %a %n' /opt/condaspawner/environment.yml /opt/conda/share/jupyter/kernels/course/kernel.json"
              f" /opt/condaspawner/jupyter_server_settings.json {enabling} {module} && id -un")
    output = docker_daemon.client().containers.run(info.tag, ["sh", "-c", script], network_mode="none", remove=True)
    assert output.decode().split("\n")[:6] == [
        "root 644 /opt/condaspawner/environment.yml", "root 644 /opt/conda/share/jupyter/kernels/course/kernel.json",
        "root 644 /opt/condaspawner/jupyter_server_settings.json", f"root 644 {enabling}", f"root 644 {module}",
        "jovyan"]


@pytest.mark.docker
def test_the_base_history_from_dockers_api_is_its_config_history_to_the_second(docker_daemon, base_image):
    api = docker_daemon.client().api
    saved = layers._saved_config(api, api.inspect_image(base_image)["Id"])["history"]
    rebuilt = layers.history_from_api(api, base_image)
    assert rebuilt is not None and len(rebuilt) == len(saved)
    for ours, theirs in zip(rebuilt, saved):
        assert theirs["created"].startswith(ours["created"].removesuffix("Z"))
        assert {key: value for key, value in ours.items() if key != "created"} == {
            key: value for key, value in theirs.items() if key != "created"}


@pytest.mark.docker
async def test_a_build_killed_mid_load_leaves_an_image_its_made_json_names_and_gc_removes(layered_builder,
                                                                                          docker_daemon):
    # the builder keeps the image's id (made.json) before Docker has the end of the archive
    info = await layered_builder.get_image(env_request("cs-alpha", "course"))
    log = (Path(layered_builder.key_dir(info.key)) / "build.log").read_text()
    assert log.index(f"loading image {info.image_id}") < log.index(f"loaded image {info.image_id}")
    assert madeids.bare(info.image_id) in madeids.read(Path(layered_builder.key_dir(info.key))).images

    # What a build killed once its archive was sent leaves: Docker finished the load, nothing
    # tagged the image, and made.json names it.
    api = docker_daemon.client().api
    key = uuid.uuid4().hex * 2
    told: list[str] = []
    loaded = imageload.load_image(api, layered_builder.base_image_id(), [layers.Layer("leftover", ())],
                               {"io.condaspawner.key": key}, set(), layers.LayerMemo(None), on_image_id=told.append)
    assert told == [loaded.image_id] and api.inspect_image(loaded.image_id)["RepoTags"] == []
    key_dir = Path(layered_builder.key_dir(key))
    key_dir.mkdir(parents=True, exist_ok=True)
    madeids.add(key_dir, images=[loaded.image_id])

    assert loaded.image_id.removeprefix("sha256:") in layered_builder.gc().leftovers.images
    with pytest.raises(docker.errors.ImageNotFound):
        docker_daemon.client().images.get(loaded.image_id)
    assert docker_daemon.client().images.get(info.image_id).tags  # the built one stays


@pytest.mark.docker
def test_a_load_docker_refuses_is_its_answer_and_only_a_missing_layer_is_worth_sending_every_layer(
        docker_daemon, base_image, tmp_path):
    api = docker_daemon.client().api
    (tmp_path / "file").write_text("one\n")
    layer = layers.Layer("cs-gone-1.0-0", (layers.Entry("opt/one.txt", tmp_path / "file"),), identity="cs-gone")
    memo = layers.LayerMemo(tmp_path / "memo")  # remembered, and its chain said to be held: sent as a placeholder
    memo.put(layer, "sha256:" + "e" * 64, 2048)
    chain = layers.chain_ids([*api.inspect_image(base_image)["RootFS"]["Layers"], "sha256:" + "e" * 64])[-1]
    with pytest.raises(imageload.LoadRefused) as missing:
        imageload.load_image(api, base_image, [layer], {}, {chain}, memo)
    assert missing.value.missing_layer and not missing.value.no_space, str(missing.value)
    result = imageload.load_image(api, base_image, [layer], {}, set(), layers.LayerMemo(None))  # every layer sent
    assert result.layers[0][3] and api.inspect_image(result.image_id)
    api.remove_image(result.image_id)
    twice = layers.Layer("twice", (layers.Entry("opt/one.txt", tmp_path / "file"),) * 2)  # Docker refuses a path twice
    with pytest.raises(imageload.LoadRefused) as refused:
        imageload.load_image(api, base_image, [twice], {}, set(), layers.LayerMemo(None))
    assert not refused.value.missing_layer and "\n" not in str(refused.value), str(refused.value)


@pytest.mark.docker
def test_a_refused_load_is_a_one_line_build_error_and_a_full_docker_disk_names_the_docker_host(layered_builder):
    log = io.StringIO()
    refused = layeredbuild.load_failure(layered_builder, imageload.LoadRefused("max depth exceeded"), log)
    assert refused.phase == "load" and str(refused).endswith("refused the image's layers: max depth exceeded")
    full = imageload.LoadRefused("write /var/lib/docker/tmp/docker-import-1/3/layer.tar: no space left on device")
    disk = layeredbuild.load_failure(layered_builder, full, log)
    assert disk.phase == "disk" and f"on the Docker host {layered_builder.daemon_url}: free space there" in str(disk)
    assert "max depth exceeded" in log.getvalue() and "no space left on device" in log.getvalue()


@pytest.mark.docker
async def test_any_failure_of_a_build_is_recorded_and_told_as_one_line(layered_builder, monkeypatch):
    def a_defect(*args, **kwargs):
        raise RuntimeError("a defect\nwith a second line")

    monkeypatch.setattr(layeredbuild, "build_layered", a_defect)  # after the real solve and install
    build = layered_builder.ensure(env_request("cs-alpha", "defect"))
    with pytest.raises(BuildError) as info:
        await build.result()
    assert str(info.value) == "unexpected RuntimeError: a defect with a second line"
    assert build.events[-1] == {"phase": "error", "progress": 100, "message": str(info.value)}
    record = layered_builder.records.build_record(build.key)
    assert record is not None and record.status == "failed" and record.cause == str(info.value)


@pytest.mark.docker
async def test_a_layer_the_memo_wrongly_says_docker_holds_is_sent_again_and_the_memo_corrected(
        docker_daemon, base_image, dev_python_channel, tmp_path, monkeypatch):
    """The memo and Docker disagree (an image removed between the plan and the load, or an entry of
    an older release): Docker refuses the placeholder, every layer is sent again, and the memo is
    corrected from what Docker got, so that the next build counts on the layer rightly."""
    unique = f"cs-unique-{SESSION}"
    url = write_channel(tmp_path / "chan", [CondaPackage(unique, "1.0", "0", "noarch", files=[
        PackageFile(f"share/{unique}.bin", SESSION.encode() * (MB // 4))])])  # 2 MB: a layer of its own
    resolver = Resolver(channel_urls={"conda-forge": dev_python_channel.url, "bioconda": url},
                        package_cache_dir=str(bench_dir() / "pkgs"))
    repo = f"condaspawner-memo-wrong-{SESSION}"
    builder = ImageBuilder(resolver=resolver, docker_client=docker_daemon.client(), base_image=base_image,
                           cache_dir=str(tmp_path / "cache"), bytecode_cache_dir=str(tmp_path / "bytecode"),
                           image_repo=repo, layered_images=True, shared_layer_min_size=MB)

    def request(extra: str, name: str) -> BuildRequest:
        text = f"channels: [conda-forge, bioconda]\ndependencies: [python=3.9, ipykernel, {unique}, {extra}]\n"
        return BuildRequest(SpecPolicy().parse(text), env_name=name)

    def written(info) -> dict[str, tuple[str, str]]:
        log = (Path(builder.key_dir(info.key)) / "build.log").read_text()
        found = re.findall(r"^layer (\S+): \d+ bytes, (sha256:\w+), (written|already stored)$", log, re.M)
        return {name: (diff_id, how) for name, diff_id, how in found}

    api = docker_daemon.client().api
    try:
        first = await builder.get_image(request("cs-alpha", "first"))
        name = f"{unique}-1.0-0"
        real = written(first)[name][0]
        layers_of_first = api.inspect_image(first.image_id)["RootFS"]["Layers"]
        below = layers.chain_ids(layers_of_first)[layers_of_first.index(real) - 1]
        (entry,) = [path for path in (tmp_path / "cache" / "layers").glob("*.json") if not path.name.startswith("base-")
                    if json.loads(path.read_text())["layer"] == name]
        bogus = "sha256:" + "e" * 64
        entry.write_text(json.dumps({**json.loads(entry.read_text()), "diff_id": bogus}))
        known_chains = layers.known_chains  # Docker said, when the build looked, that it holds the bogus layer
        monkeypatch.setattr(layers, "known_chains",
                            lambda *args: known_chains(*args) | {layers.next_chain(below, bogus)})

        second = await builder.get_image(request("cs-beta", "second"))
        log = (Path(builder.key_dir(second.key)) / "build.log").read_text()
        assert "; sending every layer" in log
        assert written(second)[name] == (real, "written")
        assert json.loads(entry.read_text())["diff_id"] == real  # corrected
        monkeypatch.undo()
        third = await builder.get_image(request("cs-gamma", "third"))
        assert written(third)[name] == (real, "already stored")
        assert real in api.inspect_image(third.image_id)["RootFS"]["Layers"]
    finally:
        remove_repo_images(docker_daemon.client(), repo)
