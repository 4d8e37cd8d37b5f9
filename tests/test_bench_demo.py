"""The demo: `python -m condaspawner_bench demo` refuses, in one line and before it sets up the
bench, to start on a port something already listens on (another demo hub, say); and its config
lets users ask only for the channel it serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from traitlets.config import PyFileConfigLoader

from condaspawner_bench.ports import free_port
from jupyterhub_condaspawner.profiles import ProfileCatalog
from jupyterhub_condaspawner.spec import SpecError, SpecPolicy

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def listening(port: int) -> Iterator[None]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        yield


def demo(tmp_path: Path, *ports: int, **environment: str) -> subprocess.CompletedProcess:
    public, hub, api = ports
    bench = tmp_path / "bench"
    env = {**os.environ, "CONDASPAWNER_DEMO_STATE": str(tmp_path / "state"), **environment}
    result = subprocess.run([sys.executable, "-m", "condaspawner_bench", "demo", "--bench-dir", str(bench),
                             "--port", str(public), "--hub-port", str(hub), "--proxy-api-port", str(api)],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert not bench.exists()  # refused before the bench's set-up
    return result


def test_a_taken_port_is_named_in_one_line_with_the_option_that_moves_it(tmp_path):
    public, hub, api = free_port(), free_port(), free_port()
    with listening(hub):
        refused = demo(tmp_path, public, hub, api)
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"error: cannot start the demo hub: already in use: 127.0.0.1:{hub} (the hub's own port, --hub-port); "
        "another JupyterHub (a demo?) may be running: stop it, or choose free ports with --hub-port"]
    with listening(public), listening(api):
        refused = demo(tmp_path, public, hub, api)
    assert refused.returncode == 1
    assert f"127.0.0.1:{public} (the demo's address, --port); 127.0.0.1:{api} (the proxy's API port" in refused.stderr


def test_a_settings_file_that_is_not_there_is_refused_not_loaded_as_nothing(tmp_path):
    """traitlets' load_subconfig loads a missing file as nothing: the demo would run without the settings."""
    refused = demo(tmp_path, free_port(), free_port(), free_port(), CONDASPAWNER_DEMO_EXTRA_CONFIG="extra.py")
    assert refused.returncode == 1
    assert refused.stderr.splitlines() == [
        f"error: CONDASPAWNER_DEMO_EXTRA_CONFIG=extra.py: no such file ({REPO / 'extra.py'})"]


def test_one_port_given_for_two_of_the_demos_servers_is_refused(tmp_path):
    port = free_port()
    refused = demo(tmp_path, port, port, free_port())
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: cannot start the demo hub: its three ports must differ: "
                                     f"--port {port}, --hub-port {port}, --proxy-api-port ")


def test_the_ports_of_the_proxy_a_previous_demo_left_are_not_refused(tmp_path):
    # The hub stops the proxy its pid file names before starting its own: those ports free up.
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "proxy.pid").write_text(str(os.getpid()))
    public, hub, api = free_port(), free_port(), free_port()
    with listening(public), listening(api), listening(hub):
        refused = demo(tmp_path, public, hub, api)
    assert refused.returncode == 1 and f"127.0.0.1:{hub} (the hub's own port" in refused.stderr
    assert f":{public} " not in refused.stderr and f":{api} " not in refused.stderr
    # Its proxy runs and its hub's port is taken: that demo is likely running. Another --hub-port
    # would have the new hub stop the running demo's proxy: it is told to stop that demo instead.
    assert "and the proxy of this bench's demo runs: that demo hub is likely running: stop it first" in refused.stderr
    assert "choose free ports with --hub-port" not in refused.stderr


def test_the_demo_offers_users_only_the_channel_it_serves_and_keeps_its_pytorch_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDASPAWNER_BENCH_DIR", str(tmp_path / "bench"))
    monkeypatch.setenv("CONDASPAWNER_PROXY_COMMAND", "configurable-http-proxy")
    monkeypatch.setenv("CONDASPAWNER_DEMO_STATE", str(tmp_path / "state"))
    for name in ("CONDASPAWNER_DEMO_PROFILES", "CONDASPAWNER_DEMO_EXTRA_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    config = PyFileConfigLoader("jupyterhub_config.py", str(REPO / "demo")).load_config()

    with pytest.raises(SpecError) as refused:
        SpecPolicy(config=config).parse("channels: [pytorch]\ndependencies: [python=3.9]\n")
    assert "'pytorch' is not an allowed channel; allowed channels: conda-forge, nodefaults" in str(refused.value)
    SpecPolicy(config=config).parse("channels: [conda-forge]\ndependencies: [python=3.9]\n")
    profiles = {profile.slug: profile for profile in ProfileCatalog(config=config).load()}
    assert profiles.keys() == {"python39", "datascience", "course-hw1", "pytorch-gpu"}
    assert profiles["pytorch-gpu"].environment is not None
    assert profiles["pytorch-gpu"].environment.channels[:2] == ("pytorch", "nvidia")


def test_demo_admin_runs_condaspawner_with_the_demo_hubs_config_on_its_bench(demo_bench, tmp_path):
    """Without it, `condaspawner build --config demo/jupyterhub_config.py` (what the course
    profile's description suggests) stops at the environment variables `make demo` sets."""
    env = {**os.environ, "CONDASPAWNER_DEMO_STATE": str(tmp_path / "state"),
           "CONDASPAWNER_DEMO_IMAGE_REPO": f"cs-demo-admin-{tmp_path.name.lower()}"}

    def demo_admin(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "condaspawner_bench", "demo-admin", "--bench-dir", str(demo_bench),
                               "--real-set", "none", *arguments], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=300)

    profiles = demo_admin("profiles")
    assert profiles.returncode == 0, profiles.stderr
    assert [line.split()[0] for line in profiles.stdout.splitlines()[1:]] == [
        "python39", "datascience", "course-hw1", "pytorch-gpu"]
    images = demo_admin("ls")
    assert images.returncode == 0, images.stderr
    assert images.stdout.splitlines()[-1].startswith("0 image(s)")  # the demo's repository: none built in it yet
    refused = demo_admin()
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == ("error: name a condaspawner command, e.g. build, ls or profiles "
                                               "(condaspawner --help)")
