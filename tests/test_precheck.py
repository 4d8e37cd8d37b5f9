""""Will it solve?" before the spawn is accepted: real py-rattler solves on the dev channel.

The spawner's pre-check (CondaSpawner.precheck_solve, run from apply_user_options for the
form and REST alike), the builder's reuse of its lock, and `condaspawner validate --solve`.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import pytest
from gated_channel import GatedChannel
from test_spawner_failures import spawner_for
from throwaway_channel import write_channel

from condaspawner_bench.devchannel import CondaPackage
from jupyterhub_condaspawner.builder import Build, BuildError, BuildRequest, ImageBuilder
from jupyterhub_condaspawner.buildrun import PresolvedLocks
from jupyterhub_condaspawner.failures import StartFailure
from jupyterhub_condaspawner.resolve import ResolveError, Resolver
from jupyterhub_condaspawner.spec import SpecPolicy

REPO = Path(__file__).resolve().parents[1]
TYPO = "channels: [conda-forge]\ndependencies: [python=3.9, cs-gamaa]\n"
GOOD = "channels: [conda-forge]\ndependencies: [python=3.9, cs-gamma]\n"


def builder_for(tmp_path: Path, channel_url: str) -> ImageBuilder:
    builder = ImageBuilder(cache_dir=str(tmp_path / "builder"))
    builder.resolver.channel_urls = {"conda-forge": channel_url}
    return builder


async def test_an_unsolvable_spec_is_refused_before_the_spawn_with_a_near_name(tmp_path, dev_python_channel):
    spawner = spawner_for(tmp_path, dev_python_channel.url)
    with pytest.raises(StartFailure) as refusal:
        await spawner._run_apply_user_options({"profile": "py", "environment": TYPO})
    assert refusal.value.status_code == 400
    assert refusal.value.message == (
        "Your environment cannot be solved: No candidates were found for cs-gamaa *. "
        "(nothing provides cs-gamaa; did you mean cs-gamma?); check your environment.yml")
    # the hub's log (and JupyterHub's "Not starting ..." line) says that nothing was built
    assert refusal.value.log_message.startswith("the solve pre-check refused the environment (nothing built): "
                                                "No candidates were found for cs-gamaa *."), refusal.value.log_message


async def test_a_conflict_is_refused_with_the_solvers_reason_in_one_line(tmp_path, dev_python_channel):
    spawner = spawner_for(tmp_path, dev_python_channel.url)
    with pytest.raises(StartFailure) as refusal:
        await spawner._run_apply_user_options(
            {"profile": "py", "environment": "dependencies: [python=3.9, cs-conflict]\n"})
    message = refusal.value.message
    assert message.startswith("Your environment cannot be solved: ") and "cs-conflict" in message
    assert "\n" not in message and "nothing provides" not in message  # every name exists
    # The cause (the solver's tree ends with it) and the advice are not cut off.
    assert "which conflicts with the versions reported above" in message, message
    assert message.endswith("; check your environment.yml"), message


async def test_the_build_reuses_the_lock_of_the_pre_check(tmp_path, dev_python_channel):
    channel = tmp_path / "channel"
    channel.symlink_to(Path(dev_python_channel.url.removeprefix("file://")))
    spawner = spawner_for(tmp_path, channel.as_uri())
    await spawner._run_apply_user_options({"profile": "py", "environment": GOOD})  # accepted
    profile, custom = spawner._choice
    builder = spawner.services.builder
    # The channel goes away: only the kept lock can make the build's solve step succeed.
    channel.unlink()
    request = BuildRequest(custom, cuda=profile.cuda, env_name="custom", kernel_display_name="My environment")
    build = Build(key="0" * 64)
    for key in ("0" * 64, "1" * 64):
        builder.key_dir(key).mkdir(parents=True)  # what the build made before its solve step
    lock = await builder.runs.resolve(build, request, io.StringIO())
    assert {p["name"] for p in lock.packages()} >= {"cs-gamma", "cs-alpha", "python", "ipykernel"}
    (event,) = build.events  # no "Solving ..."
    assert event["message"].startswith("Solved: ") and event["message"].endswith(" (solved before the start)")
    assert (builder.key_dir(build.key) / "lock.json").exists()
    with pytest.raises(BuildError, match="a channel cannot be reached"):  # taken once: the next build solves
        await builder.runs.resolve(Build(key="1" * 64), request, io.StringIO())


async def test_a_pre_check_past_its_timeout_lets_the_spawn_go_on(tmp_path, dev_python_channel):
    spawner = spawner_for(tmp_path, dev_python_channel.url, SpecPolicy__precheck_timeout=0.0001)
    await spawner._run_apply_user_options({"profile": "py", "environment": TYPO})  # not refused: the build will
    assert spawner._choice is not None
    off = spawner_for(tmp_path / "off", dev_python_channel.url, SpecPolicy__precheck_timeout=0)
    await off._run_apply_user_options({"profile": "py", "environment": TYPO})


async def test_an_unreachable_channel_is_left_to_the_build(tmp_path):
    spawner = spawner_for(tmp_path, "https://127.0.0.1:9/nothing-listens-here")
    await spawner._run_apply_user_options({"profile": "py", "environment": GOOD})  # not refused


async def test_a_profiles_own_environment_is_not_pre_checked(tmp_path):
    spawner = spawner_for(tmp_path, (tmp_path / "gone").as_uri())
    await spawner._run_apply_user_options({"profile": "py"})  # the admin's: prebuilt, or the build reports


async def test_the_pre_check_solves_for_the_profiles_cuda(tmp_path, dev_python_channel):
    builder = builder_for(tmp_path, dev_python_channel.url)
    spec = SpecPolicy().parse("dependencies: [python=3.9, cs-cuda-kernels]\n")
    lock = await builder.presolve(BuildRequest(spec, cuda="12.4"))
    assert "cs-cuda-kernels" in {p["name"] for p in lock.packages()}
    with pytest.raises(ResolveError, match="needs a CUDA GPU"):
        await builder.presolve(BuildRequest(spec))


# -- how many pre-solves run at once, and which locks are kept (a channel of a few packages) ------------


def small_channel(directory: Path) -> Path:
    """ipykernel (every solve adds it) and cs-one ... cs-four, noarch and without dependencies."""
    names = ("ipykernel", "cs-one", "cs-two", "cs-three", "cs-four")
    write_channel(directory, [CondaPackage(name, "1.0", "0", "noarch") for name in names])
    return directory


def request_of(package: str) -> BuildRequest:
    return BuildRequest(SpecPolicy().parse(f"channels: [conda-forge]\ndependencies: [{package}]\n"))


def names(lock) -> set[str]:
    return {package["name"] for package in lock.packages()}


async def test_pre_solves_beyond_max_concurrent_presolves_wait_for_a_slot(tmp_path):
    with GatedChannel(small_channel(tmp_path / "channel")) as channel:
        builder = ImageBuilder(cache_dir=str(tmp_path / "builder"), max_concurrent_presolves=1)
        builder.resolver.channel_urls = {"conda-forge": channel.url}
        presolved = builder.runs.presolved
        first = asyncio.ensure_future(builder.presolve(request_of("cs-one")))
        second = asyncio.ensure_future(builder.presolve(request_of("cs-two")))
        await asyncio.to_thread(channel.asked.wait)  # the first solve waits on the channel

        assert (presolved.solving, presolved.waiting) == (1, 1)
        channel.gate.set()
        one, two = await asyncio.gather(first, second)
    assert names(one) == {"cs-one", "ipykernel"} and names(two) == {"cs-two", "ipykernel"}
    assert (presolved.solving, presolved.waiting, presolved.count) == (0, 0, 2)


async def test_a_pre_solve_of_a_solve_kept_answers_with_its_lock_without_solving(tmp_path):
    channel = tmp_path / "channel"
    channel.symlink_to(small_channel(tmp_path / "packages"))
    builder = builder_for(tmp_path, channel.as_uri())
    lock = await builder.presolve(request_of("cs-one"))
    channel.unlink()  # a solve now fails: only the kept lock can answer

    assert await builder.presolve(request_of("cs-one")) is lock
    assert builder.runs.presolved.take(builder.resolver, request_of("cs-one")) is lock  # the build's, once
    with pytest.raises(ResolveError):
        await builder.presolve(request_of("cs-one"))


async def test_kept_locks_are_capped_by_count_the_oldest_going_first(tmp_path):
    resolver = Resolver(channel_urls={"conda-forge": small_channel(tmp_path / "channel").as_uri()},
                        package_cache_dir=str(tmp_path / "pkgs"))
    presolved = PresolvedLocks(slots=1, kept=2)
    for package in ("cs-one", "cs-two", "cs-three"):
        await presolved.solve(resolver, request_of(package))

    assert presolved.count == 2
    assert presolved.take(resolver, request_of("cs-one")) is None
    assert names(presolved.take(resolver, request_of("cs-three"))) == {"cs-three", "ipykernel"}


def validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", "validate", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_validate_solve_from_the_command_line(tmp_path, dev_python_channel):
    config = tmp_path / "c.py"
    config.write_text(f"c = get_config()\nc.Resolver.channel_urls = {{'conda-forge': {dev_python_channel.url!r}}}\n")
    good, typo, cuda = tmp_path / "good.yml", tmp_path / "typo.yml", tmp_path / "cuda.yml"
    good.write_text(GOOD)
    typo.write_text(TYPO)
    cuda.write_text("dependencies: [python=3.9, cs-cuda-kernels]\n")
    result = validate("--solve", "--config", str(config), str(good), str(typo))
    assert result.returncode == 1 and result.stderr == ""
    ok, error = result.stdout.splitlines()
    assert ok.startswith(f"{good}: ok ") and ok.endswith(" packages)") and "(solved: " in ok
    assert error == (f"{typo}: error: cannot solve: No candidates were found for cs-gamaa *. "
                     "(nothing provides cs-gamaa; did you mean cs-gamma?)")
    assert validate("--solve", "--config", str(config), str(cuda)).returncode == 1
    assert validate("--solve", "--cuda", "12.4", "--config", str(config), str(cuda)).returncode == 0
    assert validate("--config", str(config), str(typo)).returncode == 0  # without --solve: the checks only
    alone = validate("--strict", "--config", str(config), str(typo))
    assert alone.returncode == 1 and alone.stderr.strip() == (
        "error: --strict goes with --solve: without a solve, nothing can fail to be solved")




def test_validate_solve_strict_counts_a_solve_past_the_timeout_as_an_error(tmp_path, dev_python_channel):
    config = tmp_path / "c.py"
    config.write_text(f"c = get_config()\nc.Resolver.channel_urls = {{'conda-forge': {dev_python_channel.url!r}}}\n"
                      "c.SpecPolicy.precheck_timeout = 0.001\n")  # no solve ends within a millisecond
    good = tmp_path / "good.yml"
    good.write_text(GOOD)
    lenient = validate("--solve", "--config", str(config), str(good))
    assert lenient.returncode == 0 and "(not solved within 0.001 s (SpecPolicy.precheck_timeout); the build will)" in lenient.stdout
    strict = validate("--solve", "--strict", "--config", str(config), str(good))
    assert strict.returncode == 1
    assert strict.stdout == (f"{good}: error: not solved within 0.001 s (SpecPolicy.precheck_timeout) (--strict: run it "
                             "where the channels answer, or raise SpecPolicy.precheck_timeout)\n")


def test_validate_solve_leaves_an_unreachable_channel_to_the_build_as_the_spawn_does(tmp_path):
    config = tmp_path / "c.py"
    config.write_text("c = get_config()\nc.Resolver.channel_urls = {'conda-forge': 'https://127.0.0.1:9/nothing'}\n")
    good = tmp_path / "good.yml"
    good.write_text(GOOD)
    result = validate("--solve", "--config", str(config), str(good))
    assert result.returncode == 0, result.stdout
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{good}: ok ") and "(not solved: a channel cannot be reached: " in line
    assert line.endswith("; the build will)")
    strict = validate("--solve", "--strict", "--config", str(config), str(good))  # for CI that must know it solves
    assert strict.returncode == 1 and strict.stderr == ""
    (line,) = strict.stdout.splitlines()
    assert line.startswith(f"{good}: error: not solved: a channel cannot be reached: ")
    assert line.endswith(" (--strict: run it where the channels answer, or raise SpecPolicy.precheck_timeout)")
