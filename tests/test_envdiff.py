"""What changed between two locks, the exact environment.yml, and the usage log (no bench needed)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import yaml

from jupyterhub_condaspawner.envdiff import diff, exact_environment_yml, spec_changes
from jupyterhub_condaspawner.specmodel import EnvironmentSpec
from jupyterhub_condaspawner.usage import UsageLog


def package(name: str, version: str, build: str = "h_0") -> dict[str, str]:
    return {"name": name, "version": version, "build": build, "url": f"file:///c/noarch/{name}-{version}-{build}.conda",
            "sha256": "0" * 64}


def test_added_removed_upgraded_downgraded_and_rebuilt_in_conda_version_order():
    old = [package("numpy", "1.9"), package("scipy", "1.10.1"), package("six", "1.16"), package("zlib", "1.2", "h_0")]
    new = [package("numpy", "1.10"), package("scipy", "1.9.3"), package("rich", "13.7"), package("zlib", "1.2", "h_1")]

    changes = diff(old, new)

    assert changes.upgraded == [{"name": "numpy", "from": "1.9", "to": "1.10"}]  # not string order
    assert changes.downgraded == [{"name": "scipy", "from": "1.10.1", "to": "1.9.3"}]
    assert changes.added == [{"name": "rich", "version": "13.7"}]
    assert changes.removed == [{"name": "six", "version": "1.16"}]
    assert changes.rebuilt == [{"name": "zlib", "from": "1.2 h_0", "to": "1.2 h_1"}]
    assert changes.summary() == ("1 added (rich 13.7); 1 removed (six 1.16); 1 upgraded (numpy 1.9 -> 1.10); "
                                 "1 downgraded (scipy 1.10.1 -> 1.9.3); 1 rebuilt (zlib 1.2 h_0 -> 1.2 h_1)")


def test_the_same_lock_changes_nothing_and_long_lists_are_cut():
    same = [package("numpy", "1.26")]
    assert diff(same, same).empty and diff(same, same).summary() == "no package changed"
    many = diff([], [package(f"p{i}", "1") for i in range(6)])
    assert many.summary(limit=2) == "6 added (p0 1, p1 1, 4 more)"


def spec(pip: list[str] | None = None, variables: dict[str, str] | None = None) -> EnvironmentSpec:
    return EnvironmentSpec.from_normalized({"channels": [], "conda": ["pip", "python=3.9"], "pip": pip or [],
                                            "variables": variables or {}})


def test_the_pip_section_and_the_variables_count_too():
    """Neither is in the conda lock: a pip-only change said "no package changed"."""
    same = [package("python", "3.9.18"), package("pip", "24.0")]
    old = spec(pip=["requests==2.31"], variables={"A": "1", "B": "2"})
    new = spec(pip=["rich==13.7", "six"], variables={"A": "1", "B": "3", "C": "4"})
    changes = spec_changes(diff(same, same), old, new)
    assert (changes.pip_added, changes.pip_removed, changes.variables) == (["rich==13.7", "six"], ["requests==2.31"],
                                                                           ["B", "C"])
    assert not changes.empty
    assert changes.summary() == "pip: 2 added (rich==13.7, six), 1 removed (requests==2.31); variables changed (B, C)"
    assert spec_changes(diff(same, same), old, old).summary() == "no package changed"
    hashed = spec(pip=[f"six==1.16.0 --hash=sha256:{'b' * 64}"])
    assert spec_changes(diff(same, same), spec(), hashed).pip_added == ["six==1.16.0"]  # no 64 hex digits
    upgraded = spec_changes(diff(same, [package("python", "3.9.18"), package("pip", "24.1")]), old,
                            spec(variables={"A": "1", "B": "2"}))
    assert upgraded.summary() == "1 upgraded (pip 24.0 -> 24.1); pip: 1 removed (requests==2.31)"


def test_the_exact_environment_yml_pins_every_package_and_keeps_the_pip_section():
    lock = {"channels": ["file:///c"], "packages": [package("python", "3.9.18", "h_cs_0"), package("numpy", "1.26.4")]}
    spec = "name: x\nchannels: [conda-forge]\ndependencies:\n  - python=3.9\n  - numpy\n  - pip:\n    - rich==13.7\n"

    exact = yaml.safe_load(exact_environment_yml(lock, spec, name="my-env"))

    assert exact == {"name": "my-env", "channels": ["conda-forge"],
                     "dependencies": ["python=3.9.18=h_cs_0", "numpy=1.26.4=h_0", {"pip": ["rich==13.7"]}]}
    # A spec without channels was solved on the hub's default channels: their names, never the
    # hub's own URLs (a mirror, a local folder, a token in a URL).
    bare = "dependencies: [python=3.9]\n"
    assert yaml.safe_load(exact_environment_yml(lock, bare, default_channels=["conda-forge"]))["channels"] == [
        "conda-forge"]
    assert yaml.safe_load(exact_environment_yml(lock))["channels"] == ["file:///c"]  # nothing else known


def test_the_exact_environment_yml_keeps_the_variables_and_survives_a_damaged_record():
    lock = {"channels": ["file:///c"], "packages": [package("python", "3.9.18", "h_cs_0")]}
    spec = "channels: [conda-forge]\ndependencies: [python=3.9]\nvariables: {OMP_NUM_THREADS: '4'}\n"
    assert yaml.safe_load(exact_environment_yml(lock, spec))["variables"] == {"OMP_NUM_THREADS": "4"}
    # a usage record whose spec is not YAML (damaged by hand): the lock's packages, nothing more
    assert yaml.safe_load(exact_environment_yml(lock, "dependencies: [python\n  - : :")) == {
        "channels": ["file:///c"], "dependencies": ["python=3.9.18=h_cs_0"]}


def test_the_usage_log_keeps_each_users_environments_apart(tmp_path):
    log = UsageLog(tmp_path)
    log.record("alice", "a" * 64, profile="python39", own=True, name="Mine", spec="dependencies: [x]\n")
    log.record("alice", "b" * 64, profile="python39", own=True, name="Mine 2", spec="dependencies: [y]\n")
    log.record("alice", "c" * 64, profile="course", own=False, name="Course", spec="dependencies: [z]\n")
    log.record("../bob", "d" * 64, profile="python39", own=True, name="Bob's", spec="dependencies: [w]\n")
    first = log.uses("alice")[-1].first_used
    log.record("alice", "a" * 64, profile="python39", own=True, name="Mine", spec="dependencies: [x]\n")

    assert [use.key[0] for use in log.uses("alice")] == ["a", "c", "b"]  # the latest start first
    assert next(use for use in log.uses("alice") if use.key[0] == "a").first_used == first  # kept
    assert [use.key[0] for use in log.uses("../bob")] == ["d"]
    assert sorted(path.parent for path in tmp_path.rglob("*.json")) == [tmp_path] * 2  # names are hashes
    assert log.previous_own("alice", "b" * 64).key == "a" * 64
    assert log.previous_own("alice", "a" * 64) is None  # her first own environment
    assert log.previous_own("alice", "c" * 64) is None  # a profile's: compared with the profile's builds
    assert {use.user for use in log.all_uses()} == {"alice", "../bob"}


def test_a_users_servers_starting_at_once_lose_no_entry_of_the_usage_log(tmp_path):
    # One user's named servers start together: the hub records each from its own thread, and
    # a second hub process on the same cache folder records too.
    log = UsageLog(tmp_path)
    script = ("import sys; from jupyterhub_condaspawner.usage import UsageLog; log = UsageLog(sys.argv[1])\n"
              "for n in range(20): log.record('ann', f'proc{n}', profile='p', own=False, name='n', spec='')")
    other = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])

    def record(thread: int) -> None:
        for n in range(20):
            log.record("ann", f"thread{thread}-{n}", profile="p", own=False, name="n", spec="")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(record, range(8)))
    assert other.wait(60) == 0
    assert len(log.uses("ann")) == 8 * 20 + 20
    assert sorted(path.name for path in tmp_path.iterdir() if not path.name.endswith((".json", ".lock"))) == [".since"]


def test_a_new_user_of_an_old_name_sees_none_of_the_old_users_environments(tmp_path):
    log = UsageLog(tmp_path)
    log.record("ann", "a" * 64, profile="p", own=True, name="Old", spec="x\n", identity="1@2020")
    log.record("ann", "b" * 64, profile="p", own=True, name="New", spec="y\n", identity="1@2024")  # id reused
    assert [use.key[0] for use in log.uses("ann", "1@2024")] == ["b"]
    assert [use.key[0] for use in log.uses("ann", "1@2020")] == ["a"]  # kept, only for its own user
    assert log.previous_own("ann", "b" * 64, "1@2024") is None
    log.forget("ann")  # the hub deleted the user
    assert log.uses("ann") == [] and not list(tmp_path.glob("*.json"))
