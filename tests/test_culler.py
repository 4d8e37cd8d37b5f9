"""GPU-aware idle culling: utilization traces replayed through the real allocator and culler.

The fake NVML plays each GPU's utilization sample by sample; a simulated clock makes a
30-minute timeout a few lines. Browser activity plays no part: only GPU readings do.
"""

from __future__ import annotations

import asyncio

import pytest
from fake_nvml import GPU_IS_LOST, FakeGpu, FakeNvml, fake_uuid
from stand_in_user import StandInUser

from jupyterhub_condaspawner.buildmodel import ImageInfo
from jupyterhub_condaspawner.culler import Cull, GpuIdleCuller
from jupyterhub_condaspawner.gpus import Allocation, ContainerRecord, GpuAllocator, GpuInventory, static_gpu

MINUTE = 60.0
SAMPLE = 30.0  # seconds between samples, GpuAllocator.gpu_sample_interval's default


class Bench:
    """Four fake A100s, an allocator and a culler on one simulated clock."""

    def __init__(self, gpus: int = 4, idle_utilization: float = 5.0):
        self.now = 1_000_000.0
        self.nvml = FakeNvml([FakeGpu(fake_uuid(i)) for i in range(gpus)])
        self.allocator = GpuAllocator(inventory=GpuInventory(nvml=self.nvml), clock=lambda: self.now,
                                      idle_utilization=idle_utilization, rescan_interval=0)
        self.culler = GpuIdleCuller(self.allocator, clock=lambda: self.now)
        self.stopped: list[Cull] = []

    async def stop(self, cull: Cull) -> None:
        self.stopped.append(cull)
        self.allocator.release(cull.user, cull.server_name)
        self.culler.forget(cull.user, cull.server_name)

    def start(self, user: str, gpus: int = 1, timeout_minutes: float = 30, server: str = "") -> tuple[str, ...]:
        allocation = self.allocator.allocate(user, server, gpus)
        self.culler.watch(user, server, timeout_minutes=timeout_minutes, profile="PyTorch GPU", stop=self.stop)
        return allocation.uuids

    def utilization(self, uuid: str, percent: int) -> None:
        next(gpu for gpu in self.nvml.gpus if gpu.uuid == uuid).utilization_gpu = percent

    def sample(self, seconds: float = SAMPLE) -> list[Cull]:
        """Advance the clock, sample as the hub does, run the stops that fall due."""
        self.now += seconds
        scan = self.allocator.sample()
        due = self.culler.observe(self.allocator.gpu_states(scan))
        for cull, stop in due:
            asyncio.run(stop(cull))
        return [cull for cull, _ in due]

    def replay(self, uuid: str, trace: list[tuple[float, int]]) -> list[Cull]:
        """(minutes, utilization) steps, sampled every SAMPLE seconds; every cull that fell due."""
        culls = []
        for minutes, percent in trace:
            self.utilization(uuid, percent)
            for _ in range(round(minutes * MINUTE / SAMPLE)):
                culls += self.sample()
        return culls


def test_a_server_idle_for_its_timeout_is_stopped_once_and_its_gpu_freed():
    bench = Bench()
    (uuid,) = bench.start("alice", timeout_minutes=30)
    culls = bench.replay(uuid, [(20, 90), (29, 0)])  # 20 min training, then 29 idle: not yet
    assert culls == []
    culls = bench.replay(uuid, [(5, 0)])
    assert [(c.user, c.server_name, c.profile) for c in culls] == [("alice", "", "PyTorch GPU")]
    assert 30 * MINUTE <= culls[0].idle_seconds <= 30 * MINUTE + SAMPLE
    assert bench.allocator.allocation("alice", "") is None
    assert bench.allocator.gpu_states()[uuid] == "free"
    assert bench.replay(uuid, [(60, 0)]) == []  # never twice


def test_any_busy_sample_restarts_the_idle_stretch():
    bench = Bench()
    (uuid,) = bench.start("alice", timeout_minutes=30)
    # Idle stretches of 25 minutes between short bursts: each burst resets the count.
    trace = [(25, 1), (0.5, 70)] * 4
    assert bench.replay(uuid, trace) == []
    assert bench.culler.idle_for("alice", "") is None  # busy at the last sample


def test_the_threshold_is_inclusive_and_configurable():
    bench = Bench(idle_utilization=10)
    (uuid,) = bench.start("alice", timeout_minutes=10)
    assert bench.replay(uuid, [(30, 11)]) == []  # above 10 %: computing
    assert len(bench.replay(uuid, [(11, 10)])) == 1  # at 10 %: idle


def test_a_multi_gpu_server_is_idle_only_when_every_gpu_is():
    bench = Bench()
    first, second = bench.start("bob", gpus=2, timeout_minutes=15)
    bench.utilization(second, 50)
    assert bench.replay(first, [(60, 0)]) == []
    bench.utilization(second, 0)
    culls = bench.replay(first, [(16, 0)])
    assert [c.user for c in culls] == ["bob"]
    assert set(bench.allocator.gpu_states().values()) == {"free"}


@pytest.mark.parametrize("fails", ["off the bus", "lost after its handle was found"])
def test_a_gpu_that_failed_does_not_keep_the_servers_healthy_idle_gpu_held(fails):
    bench = Bench()
    first, second = bench.start("bob", gpus=2, timeout_minutes=15)
    broken = next(gpu for gpu in bench.nvml.gpus if gpu.uuid == second)
    if fails == "off the bus":  # its UUID cannot be read either
        bench.nvml.lose(bench.nvml.gpus.index(broken))
    else:
        broken.failures["nvmlDeviceGetName"] = GPU_IS_LOST
    culls = bench.replay(first, [(16, 0)])
    assert [c.user for c in culls] == ["bob"]


def test_a_server_whose_only_gpu_failed_is_not_judged():
    bench = Bench(gpus=1)
    (uuid,) = bench.start("alice", timeout_minutes=15)
    bench.nvml.lose(0)
    assert bench.replay(uuid, [(120, 0)]) == []


def test_an_idle_server_time_sharing_a_busy_gpu_is_not_culled():
    # A known limit (README): utilization is per GPU, so a busy neighbour keeps an idle server.
    bench = Bench(gpus=1)
    bench.allocator.max_servers_per_gpu = 2
    (shared,) = bench.start("busy", timeout_minutes=15)
    bench.start("idle", timeout_minutes=15)
    assert bench.replay(shared, [(120, 90)]) == []


def test_each_server_has_its_own_timeout_and_others_keep_their_gpus():
    bench = Bench()
    (alice,) = bench.start("alice", timeout_minutes=10)
    (bob,) = bench.start("bob", timeout_minutes=60)
    (carol,) = bench.start("carol", timeout_minutes=10)
    bench.utilization(bob, 0)
    bench.utilization(carol, 80)
    culls = bench.replay(alice, [(11, 0)])
    assert [c.user for c in culls] == ["alice"]
    assert bench.allocator.allocation("bob", "") is not None
    assert bench.allocator.allocation("carol", "") is not None
    culls = bench.replay(alice, [(50, 0)])
    assert [c.user for c in culls] == ["bob"]


def test_timeout_zero_means_never_culled():
    bench = Bench()
    (uuid,) = bench.start("alice", timeout_minutes=0)
    assert bench.culler.watched() == {}
    assert bench.replay(uuid, [(24 * 60, 0)]) == []
    assert bench.allocator.allocation("alice", "") is not None


def test_a_gpu_without_a_utilization_reading_never_counts_as_idle():
    nvml_less = GpuAllocator(inventory=GpuInventory(static_gpus=[{"uuid": fake_uuid(9)}]), rescan_interval=0)
    assert static_gpu(0, {"uuid": fake_uuid(9)}).utilization is None
    culler = GpuIdleCuller(nvml_less)
    nvml_less.allocate("alice", "", 1)

    async def never(cull: Cull) -> None:
        raise AssertionError("culled a GPU nobody could read")

    culler.watch("alice", "", timeout_minutes=0.0001, profile="static", stop=never)
    for _ in range(3):
        assert culler.observe(nvml_less.gpu_states(nvml_less.sample())) == []


def test_a_stopped_server_is_forgotten_and_its_gpu_reused_without_inheriting_idle_time():
    bench = Bench(gpus=1)
    (uuid,) = bench.start("alice", timeout_minutes=30)
    bench.replay(uuid, [(25, 0)])
    bench.allocator.release("alice", "")
    bench.culler.forget("alice", "")
    assert bench.start("bob", timeout_minutes=30) == (uuid,)
    assert bench.replay(uuid, [(25, 0)]) == []  # bob's own 25 minutes, not alice's 50
    assert [c.user for c in bench.replay(uuid, [(6, 0)])] == ["bob"]


def test_idle_time_counts_from_the_allocation_not_from_before_it():
    bench = Bench(gpus=1)
    bench.replay(fake_uuid(0), [(120, 0)])  # the free GPU idles for two hours first
    (uuid,) = bench.start("alice", timeout_minutes=30)
    assert bench.replay(uuid, [(29, 0)]) == []
    assert len(bench.replay(uuid, [(1.5, 0)])) == 1


def test_after_a_hub_restart_idle_time_starts_again_from_the_first_sample():
    bench = Bench(gpus=1)
    (uuid,) = bench.start("alice", timeout_minutes=30)
    bench.replay(uuid, [(25, 0)])
    # A new hub process: the table comes back from container labels, the culler starts empty.
    record = ContainerRecord(name="jupyter-alice", running=True, created=bench.now - 1500,
                             labels=bench.allocator.allocation("alice", "").labels())
    bench.allocator = GpuAllocator(inventory=GpuInventory(nvml=bench.nvml), clock=lambda: bench.now, rescan_interval=0)
    bench.allocator.rebuild([record])
    bench.culler = GpuIdleCuller(bench.allocator, clock=lambda: bench.now)
    bench.culler.watch("alice", "", timeout_minutes=30, profile="PyTorch GPU", stop=bench.stop)
    assert bench.replay(uuid, [(29.5, 0)]) == []  # not 25 + 29.5: the new hub saw no more than this
    assert len(bench.replay(uuid, [(1, 0)])) == 1


def test_a_failed_stop_is_tried_again_at_a_later_sample():
    bench = Bench(gpus=1)
    attempts = []

    async def flaky(cull: Cull) -> None:
        attempts.append(cull)
        if len(attempts) == 1:
            bench.culler.rearm(cull.user, cull.server_name)  # what the hub's runner does on an error
            return
        await bench.stop(cull)

    bench.allocator.allocate("alice", "", 1)
    bench.culler.watch("alice", "", timeout_minutes=5, profile="PyTorch GPU", stop=flaky)
    bench.replay(fake_uuid(0), [(6, 0)])
    assert len(attempts) == 2
    assert bench.allocator.allocation("alice", "") is None


def test_a_server_not_ready_when_its_cull_falls_due_gets_a_whole_timeout_once_ready():
    # The GPUs are allocated before the server boots; a slow boot outlasts a short timeout.
    bench = Bench(gpus=1)
    booting = []

    async def stop_unless_booting(cull: Cull) -> None:
        if not booting:
            booting.append(cull)  # what the spawner does while its server is not ready
            bench.culler.rearm(cull.user, cull.server_name, from_now=True)
            return
        await bench.stop(cull)

    bench.allocator.allocate("alice", "", 1)
    bench.culler.watch("alice", "", timeout_minutes=1, profile="PyTorch GPU", stop=stop_unless_booting)
    assert bench.replay(fake_uuid(0), [(1.5, 0)]) and len(booting) == 1  # due mid-boot: skipped
    assert bench.allocator.allocation("alice", "") is not None
    assert not bench.replay(fake_uuid(0), [(0.5, 0)])  # the next sample: its idle time starts again
    assert bench.replay(fake_uuid(0), [(0.5, 0)])  # a whole timeout after the skipped cull: culled
    assert bench.allocator.allocation("alice", "") is None


@pytest.mark.parametrize(("seconds", "shown"), [(30 * MINUTE + 12, "30 min"), (45, "45 s"), (3 * 3600, "180 min")])
def test_the_notice_names_the_profile_and_the_idle_time(seconds, shown):
    cull = Cull("alice", "", "PyTorch GPU (1x A100)", seconds, 1800)
    assert cull.notice.startswith(f"Your server on PyTorch GPU (1x A100) was stopped after {shown} with its GPU idle")


# -- the spawner's side: which timeout a server gets -------------------------------------------


def gpu_spawner(tmp_path, default_minutes: float, user: str = "alice"):
    from jupyterhub.objects import Hub
    from traitlets.config import Config

    from jupyterhub_condaspawner.spawner import CondaSpawner

    profiles = tmp_path / "profiles"
    (profiles / "envs").mkdir(parents=True, exist_ok=True)
    (profiles / "envs" / "py.yml").write_text("channels: [conda-forge]\ndependencies: [python=3.9]\n")
    (profiles / "10-own.yaml").write_text(
        "display_name: Own timeout\nslug: own\nenvironment: envs/py.yml\ngpus: 1\ngpu_idle_timeout: 45\n")
    (profiles / "20-default.yaml").write_text("display_name: Hub default\nslug: default\nenvironment: envs/py.yml\ngpus: 1\n")
    (profiles / "30-off.yaml").write_text(
        "display_name: Never\nslug: never\nenvironment: envs/py.yml\ngpus: 1\ngpu_idle_timeout: 0\n")
    config = Config()
    config.ProfileCatalog.profiles_dir = str(profiles)
    config.ImageBuilder.cache_dir = str(tmp_path / "builder")
    config.GpuInventory.static_gpus = [{"uuid": fake_uuid(i)} for i in range(3)]
    config.CondaSpawner.gpu_idle_timeout = default_minutes
    # No daemon answers (whatever DOCKER_HOST the bench set in this process): none is needed here.
    config.DockerSpawner.client_kwargs = {"base_url": "unix:///nonexistent/docker.sock"}
    return lambda name=user: CondaSpawner(user=StandInUser(name), hub=Hub(), config=config)


@pytest.mark.parametrize(("slug", "minutes"), [("own", 45), ("default", 30), ("never", None)])
def test_a_profiles_timeout_wins_over_the_hubs_default(tmp_path, slug, minutes):
    spawner = gpu_spawner(tmp_path, default_minutes=30)()
    profile = spawner.services.catalog.get(slug)
    spawner._allocation = spawner.services.allocator.allocate("alice", "", 1)
    spawner._watch_gpu_idleness(profile)
    expected = {} if minutes is None else {("alice", ""): minutes * 60.0}
    assert spawner.services.culler.watched() == expected
    spawner._release_gpus()
    assert spawner.services.culler.watched() == {}


def test_gpu_sampling_turned_off_says_once_that_idle_gpu_servers_are_never_stopped(tmp_path, caplog):
    # The culler judges servers at the hub's GPU samples: with none, a gpu_idle_timeout does nothing.
    make = gpu_spawner(tmp_path, default_minutes=30)
    first = make()
    first.config.GpuAllocator.gpu_sample_interval = 0.0
    for name in ("alice", "bob"):
        spawner = first if name == "alice" else make(name)
        spawner._allocation = spawner.services.allocator.allocate(name, "", 1)
        spawner._watch_gpu_idleness(spawner.services.catalog.get("own"))
    warnings = [record.getMessage() for record in caplog.records if "GPU idle culling is off" in record.getMessage()]
    assert warnings == ["GPU idle culling is off: c.GpuAllocator.gpu_sample_interval = 0 turns the hub's GPU samples "
                        "off, so alice (gpu_idle_timeout 45 min) and every other GPU server are never stopped for idle "
                        "GPUs (set gpu_sample_interval, e.g. to 30)"]


def test_gpu_sampling_on_or_culling_off_says_nothing_of_it(tmp_path, caplog):
    sampled = gpu_spawner(tmp_path, default_minutes=30)()
    sampled._allocation = sampled.services.allocator.allocate("alice", "", 1)
    sampled._watch_gpu_idleness(sampled.services.catalog.get("own"))
    unsampled = gpu_spawner(tmp_path / "off", default_minutes=0)()
    unsampled.config.GpuAllocator.gpu_sample_interval = 0.0
    unsampled._allocation = unsampled.services.allocator.allocate("alice", "", 1)
    unsampled._watch_gpu_idleness(unsampled.services.catalog.get("never"))
    assert "GPU idle culling is off" not in caplog.text


def test_a_server_found_again_after_a_hub_restart_is_watched_with_its_profiles_timeout(tmp_path):
    make = gpu_spawner(tmp_path, default_minutes=30, user="bob")
    spawner = make()
    services = spawner.services
    held = services.allocator.allocate("bob", "", 1)
    spawner.user_options = {"profile": "own"}
    spawner.load_state({"condaspawner": {"key": "k", "image": "img:k", "image_id": "sha256:0", "env_name": "e",
                                         "gpus": list(held.uuids), "port": 8888}})
    assert services.culler.watched() == {("bob", ""): 45 * 60.0}
    # A CPU server (nothing held) is never watched.
    cpu = make("carol")
    cpu.user_options = {"profile": "own"}
    cpu.load_state({"condaspawner": {"key": "k", "image": "img:k", "image_id": "sha256:0", "env_name": "e",
                                     "gpus": [], "port": 8889}})
    assert ("carol", "") not in services.culler.watched()


def test_a_server_restored_before_the_gpu_table_is_watched_and_counted_idle_once_the_table_is_rebuilt(tmp_path):
    spawner = gpu_spawner(tmp_path, default_minutes=30, user="bob")()
    services = spawner.services
    assert not services.allocator.restored  # the daemon did not answer when the hub started
    spawner.user_options = {"profile": "own"}
    spawner.load_state({"condaspawner": {"key": "k", "image": "img:k", "image_id": "sha256:0", "env_name": "e",
                                         "gpus": [fake_uuid(0)], "gpu_user": "bob", "port": 8888}})
    assert services.culler.watched() == {("bob", ""): 45 * 60.0}

    # The first GPU start rebuilds the table late, from bob's container; the culler reads it from then on.
    labels = Allocation("bob", "", (fake_uuid(0),), 1_000_000.0).labels()
    services.allocator.rebuild([ContainerRecord("jupyter-bob", labels, running=True)])
    services.culler.observe({fake_uuid(0): "held_idle"})
    assert services.culler.idle_for("bob", "") == 0.0  # its idle time counts from this sample
    spawner._release_gpus()
    assert services.allocator.allocation("bob", "") is None and services.culler.watched() == {}


def test_a_server_whose_profile_was_renamed_keeps_the_timeout_and_name_it_started_with(tmp_path):
    make = gpu_spawner(tmp_path, default_minutes=30, user="dora")
    before = make()
    services = before.services
    before._allocation = services.allocator.allocate("dora", "", 1)
    before.user_options = {"profile": "never"}
    before._watch_gpu_idleness(services.catalog.get("never"))  # started on "Never": never culled
    before._image_info = ImageInfo("k", "img:k", "sha256:0", "e", cached=True)
    before.object_id = "c0ffee"
    saved = before.get_state()
    assert saved["condaspawner"]["gpu_idle_timeout"] == 0 and saved["condaspawner"]["profile_name"] == "Never"

    # The admin renames the profile's slug; the hub restarts: the saved slug finds nothing.
    after = make()
    after.user_options = {"profile": "never-old-slug"}
    after.load_state(saved)
    assert services.culler.watched() == {}  # still never culled, not the hub's 30 min
    assert after._idle_watch == {"gpu_idle_timeout": 0.0, "profile_name": "Never"}


def test_a_server_whose_user_is_renamed_while_it_runs_still_frees_its_gpu(tmp_path):
    import time

    make = gpu_spawner(tmp_path, default_minutes=30, user="gus")
    spawner = make()
    services, profile = spawner.services, spawner.services.catalog.get("default")
    services.allocator.restored = True  # no daemon here: nothing to restore
    spawner._start_began = time.monotonic()
    spawner._allocation = asyncio.run(spawner._allocate_gpus(profile))
    spawner._watch_gpu_idleness(profile)
    spawner._image_info = ImageInfo("k", "img:k", "sha256:0", "e", cached=True)
    spawner.object_id = "c0ffee"
    saved = spawner.get_state()
    spawner.user.name = "gustav"  # an admin renames the user (PATCH /hub/api/users/gus)
    spawner._release_gpus()  # the server stops
    assert services.allocator.allocation("gus", "") is None and services.culler.watched() == {}
    # The same after a hub restart: the saved state says whose name the GPUs are held under.
    held = services.allocator.allocate("gus", "", 1)
    restored = make("gustav")
    restored.user_options = {"profile": "default"}
    restored.load_state(saved)
    assert restored._allocation == held and services.culler.watched() == {("gus", ""): 30 * 60.0}
    restored._release_gpus()
    assert services.allocator.allocation("gus", "") is None
