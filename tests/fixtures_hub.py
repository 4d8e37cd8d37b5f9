"""A real JupyterHub (6.x) with a real configurable-http-proxy, running the demo config.

The hub runs as a subprocess from demo/jupyterhub_config.py on the test bench, with
extra settings for the tests: an API token, fake static GPUs, kept containers.
"""

from __future__ import annotations

import contextlib
import html
import http.cookiejar
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from fixtures_docker import REPO, bench_dir, bench_unavailable, remove_repo_images
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from condaspawner_bench.bench import BenchError, ensure_proxy
from condaspawner_bench.ports import free_port

TOKEN = "condaspawner-e2e-" + uuid.uuid4().hex
VOLUME_PREFIX = f"condaspawner-e2e-{uuid.uuid4().hex[:8]}-"
# One per test process: hubs of another process (xdist) on the same daemon never take this
# process's GPU containers for their own, nor remove them.
FAKE_GPU = f"GPU-{uuid.uuid4()}"
EXTRA_CONFIG = f"""
c = get_config()
c.JupyterHub.services = [{{"name": "e2e", "api_token": {TOKEN!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "e2e",
    "scopes": ["admin:users", "admin:servers", "access:servers", "admin:groups", "read:users", "tokens",
               "read:metrics"],
    "services": ["e2e"],
}}]
c.DockerSpawner.remove = False            # kept containers: inspected by the GPU test, replaced on respawn
c.GpuInventory.static_gpus = [{{"uuid": {FAKE_GPU!r}, "name": "NVIDIA A100-SXM4-80GB", "index": 0,
                                 "memory": "80G", "cuda_version": "12.4", "driver_version": "550.54"}}]
c.JupyterHub.allow_named_servers = True
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}  # POST returns at once; progress streams the rest
"""
GPU_PROFILE = """
display_name: "Fake A100 (CUDA 12.4)"
slug: gpu-demo
environment: envs/gpu.yml
gpus: 1
gpu_model: "*A100*"
cuda: "12.4"
allow_custom_environment: true
"""
GPU_ENV = "channels: [conda-forge]\ndependencies: [python=3.9, ipykernel, cs-cuda-kernels]\n"


def metric(samples: dict, name: str, **labels: str) -> float | None:
    """One sample of :meth:`Hub.metrics`, by name and labels."""
    return samples.get((name, tuple(sorted(labels.items()))))


class BrowserSession:
    """What a browser keeps between pages: cookies, and the hub's XSRF token for forms."""

    def __init__(self, url: str):
        self.url = url
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> tuple[int, str, str]:
        """(status, final URL after redirects, the page's text with HTML entities decoded)."""
        return self._open(urllib.request.Request(self.url + path))

    def post(self, path: str, fields: dict[str, str]) -> tuple[int, str, str]:
        """Submit a form as the browser does, with the XSRF token the hub asks for."""
        xsrf = next(cookie.value for cookie in self.jar if cookie.name == "_xsrf")
        data = urllib.parse.urlencode({**fields, "_xsrf": xsrf}).encode()
        return self._open(urllib.request.Request(self.url + path, data=data))

    def _open(self, request: urllib.request.Request) -> tuple[int, str, str]:
        try:
            with self.opener.open(request, timeout=120) as page:
                return page.status, page.url, html.unescape(page.read().decode())
        except urllib.error.HTTPError as error:
            return error.code, error.url, html.unescape(error.read().decode(errors="replace"))


class _PortTaken(RuntimeError):
    """The hub or its proxy could not listen on a port it was given."""


def _port_taken(log: str) -> bool:
    """Whether the proxy (node's EADDRINUSE) or the hub (Python's errno 98) could not listen."""
    return "EADDRINUSE" in log or "[Errno 98]" in log


class Hub:
    """One hub process plus helpers for its REST API, the proxy and a kernel's websocket."""

    def __init__(self, state: Path, env: dict[str, str]):
        self.state = state
        self.env = env
        self.port = int(env["CONDASPAWNER_DEMO_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state / "hub.log"
        self.process: subprocess.Popen | None = None

    # -- process -----------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        """Start the hub. A port free_port() chose may still be taken meanwhile (by another
        test's explicit bind): a first start then tries other ports; a restart keeps its
        ports, which servers started before it were given."""
        first = self.process is None
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                if not first or attempt == 2:
                    raise
                self.stop()
                for name in ("CONDASPAWNER_DEMO_PORT", "CONDASPAWNER_DEMO_HUB_PORT", "CONDASPAWNER_DEMO_PROXY_PORT"):
                    self.env[name] = str(free_port())
                self.port = int(self.env["CONDASPAWNER_DEMO_PORT"])
                self.url = f"http://127.0.0.1:{self.port}"

    def _start_once(self, timeout: float) -> None:
        log_start = len(self.log()) if self.log_path.exists() else 0
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(REPO / "demo" / "jupyterhub_config.py")],
            cwd=self.state, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _port_taken(self.log()[log_start:]):
                raise _PortTaken(f"a port of the hub was taken:\n{self.log()[-3000:]}")
            if self.process.poll() is not None:
                raise RuntimeError(f"hub exited ({self.process.returncode}):\n{self.log()[-3000:]}")
            try:
                if self.api("GET", "/")[0] == 200 and not _port_taken(self.log()[log_start:]):
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"hub did not answer in {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> bool:
        """SIGTERM, as systemd or docker stop; False if the hub had to be killed after 90 s (a hub
        that waits for something never ends: the bound only has to be far above a slow exit's)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return False
        return True

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a crash: nothing of the hub runs at its end (its proxy stays)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- REST --------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return self.request(method, f"/hub/api{path}", body)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"token {TOKEN}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                payload = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            payload, status = error.read(), error.code
        try:
            return status, json.loads(payload) if payload else None
        except json.JSONDecodeError:
            return status, payload.decode(errors="replace")

    def ensure_user(self, name: str) -> None:
        self.api("POST", f"/users/{name}")

    def spawn(self, user: str, options: dict | None = None, server: str = "") -> tuple[int, Any]:
        self.ensure_user(user)
        return self.api("POST", f"/users/{user}/servers/{server}", options or {})

    def progress_request(self, user: str, server: str = "") -> urllib.request.Request:
        return urllib.request.Request(f"{self.url}/hub/api/users/{user}/servers/{server}/progress",
                                      headers={"Authorization": f"token {TOKEN}"})

    def progress(self, user: str, server: str = "", timeout: float = 300) -> list[dict]:
        """The spawn's progress events (server-sent events), until ready or failed."""
        events = []
        with urllib.request.urlopen(self.progress_request(user, server), timeout=timeout) as response:
            for line in response:
                if line.startswith(b"data:"):
                    events.append(json.loads(line[5:]))
                    if events[-1].get("ready") or events[-1].get("failed"):
                        break
        return events

    def login(self, user: str) -> tuple[BrowserSession, str]:
        """A browser's cookie session for ``user`` (the dummy login takes any name), and the
        page the login lands on: the spawn form, shown once as a person sees it."""
        session = BrowserSession(self.url)
        session.get("/hub/login")
        status, url, page = session.post("/hub/login?next=%2Fhub%2Fspawn", {"username": user, "password": ""})
        assert status == 200 and url.endswith("/hub/spawn"), (status, url)
        return session, page

    def spawn_page(self, user: str) -> str:
        """The spawn form as ``user`` sees it in a browser."""
        return self.login(user)[1]

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every condaspawner_ sample on /hub/metrics: (name, sorted labels) -> value."""
        status, text = self.request("GET", "/hub/metrics")
        assert status == 200, text
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name.startswith("condaspawner_")}

    def server_model(self, user: str, server: str = "") -> dict | None:
        status, model = self.api("GET", f"/users/{user}")
        assert status == 200, model
        return model["servers"].get(server)

    def server_once_checked(self, user: str, server: str = "", timeout: float = 120) -> dict | None:
        """The server's model once JupyterHub, started again, has checked that it answers (in the
        background: ``pending`` is "check" meanwhile), and has routed it again: JupyterHub adds the
        routes of servers checked in the background just after their check ends, and until then
        the proxy sends their requests to the hub."""
        deadline = time.monotonic() + timeout
        while (model := self.server_model(user, server)) is not None and model["pending"] == "check":
            assert time.monotonic() < deadline, model
            time.sleep(0.5)
        while model is not None and model["ready"] and not self._answers(user, server):
            assert time.monotonic() < deadline, "the proxy never routed the server again"
            time.sleep(0.5)
        return model

    def _answers(self, user: str, server: str = "") -> bool:
        """Whether the single-user server itself answers through the proxy (its own status, not a hub page)."""
        status, body = self.user_api(user, "/status", server=server)
        return status == 200 and isinstance(body, dict) and "started" in body

    def stop_server(self, user: str, server: str = "", timeout: float = 60) -> None:
        self.api("DELETE", f"/users/{user}/servers/{server}")
        deadline = time.monotonic() + timeout
        while self.server_model(user, server) is not None and time.monotonic() < deadline:
            time.sleep(0.3)

    # -- the single-user server, through the proxy ----------------------------------------------

    def user_api(self, user: str, path: str, method: str = "GET", body: Any = None, server: str = "") -> tuple[int, Any]:
        prefix = f"/user/{user}/{server + '/' if server else ''}"
        return self.request(method, f"{prefix}api{path}", body)

    async def execute(self, user: str, kernel_name: str, code: str, server: str = "") -> str:
        """Start a kernel through the server's REST API and run ``code`` over its websocket."""
        status, kernel = self.user_api(user, "/kernels", "POST", {"name": kernel_name}, server=server)
        assert status == 201, kernel
        prefix = f"/user/{user}/{server + '/' if server else ''}"
        url = f"ws://127.0.0.1:{self.port}{prefix}api/kernels/{kernel['id']}/channels"
        connection = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"}))
        try:
            return await _run_code(connection, code)
        finally:
            connection.close()
            self.user_api(user, f"/kernels/{kernel['id']}", "DELETE", server=server)


async def _run_code(connection, code: str, timeout: float = 60) -> str:
    msg_id = uuid.uuid4().hex
    session = uuid.uuid4().hex
    await connection.write_message(json.dumps({
        "header": {"msg_id": msg_id, "username": "e2e", "session": session, "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    output = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = await connection.read_message()
        if raw is None:
            break
        message = json.loads(raw)
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = message["header"]["msg_type"]
        if kind == "stream":
            output.append(message["content"]["text"])
        elif kind == "error":
            output.append("ERROR: " + message["content"]["evalue"])
        elif kind == "status" and message["content"]["execution_state"] == "idle":
            break
    return "".join(output)


@pytest.fixture(scope="module")
def hub(request, docker_daemon, base_image, dev_python_channel, tmp_path_factory):
    """The demo hub; a test module's ``HUB_EXTRA_CONFIG`` (config file text) is added last, and
    its ``hub_before_start(hub)``, if any, runs just before the hub first starts.

    Its channel is the small dev channel, unless the module sets ``HUB_REAL_SET``
    ("datascience"): then it is that real channel, as in ``make demo``, and the demo's
    data-science profile is offered too.
    """
    real_set = getattr(request.module, "HUB_REAL_SET", None)
    real_channel = request.getfixturevalue(f"{real_set}_channel") if real_set else None
    try:
        proxy_command = ensure_proxy(bench_dir())
    except BenchError as error:
        bench_unavailable(f"no configurable-http-proxy: {error}")
    state = tmp_path_factory.mktemp("hub")
    profiles = state / "profiles"
    (profiles / "envs").mkdir(parents=True)
    # Not the GPU profile (this machine has none), nor the data-science one on the dev channel.
    for source in (REPO / "demo" / "profiles").rglob("*"):
        if source.is_file() and "pytorch" not in source.name and (real_set or "datascience" not in source.name):
            target = profiles / source.relative_to(REPO / "demo" / "profiles")
            target.write_text(source.read_text())
    (profiles / "40-gpu-demo.yaml").write_text(GPU_PROFILE)
    (profiles / "envs" / "gpu.yml").write_text(GPU_ENV)
    extra = state / "extra_config.py"
    extra.write_text(EXTRA_CONFIG + getattr(request.module, "HUB_EXTRA_CONFIG", ""))
    env = {
        **os.environ,
        "CONDASPAWNER_BENCH_DIR": str(bench_dir()),
        "CONDASPAWNER_DEMO_STATE": str(state),
        "CONDASPAWNER_DEMO_PORT": str(free_port()),
        "CONDASPAWNER_DEMO_HUB_PORT": str(free_port()),
        "CONDASPAWNER_DEMO_PROXY_PORT": str(free_port()),
        "CONDASPAWNER_PROXY_COMMAND": "\n".join(proxy_command),
        "CONDASPAWNER_DEMO_PROFILES": str(profiles),
        "CONDASPAWNER_DEMO_IMAGE_REPO": f"condaspawner-e2e-{uuid.uuid4().hex[:8]}",
        "CONDASPAWNER_DEMO_EXTRA_CONFIG": str(extra),
        "CONDASPAWNER_DEMO_VOLUME_PREFIX": VOLUME_PREFIX,  # the demo's own home template, test-named
    }
    env.pop("CONDASPAWNER_DEMO_CHANNEL", None)
    if real_channel is not None:
        env["CONDASPAWNER_DEMO_CHANNEL"] = real_channel.url
    hub = Hub(state, env)
    before_start = getattr(request.module, "hub_before_start", None)
    if before_start is not None:  # e.g. images made before the hub ever ran (its state is ready)
        before_start(hub)
    hub.start()
    try:
        yield hub
    finally:
        try:
            _stop_all_servers(hub)
        except OSError:  # a test left the hub down: its containers still go below
            pass
        hub.stop()
        _remove_containers(docker_daemon.client(), hub)


def _stop_all_servers(hub: Hub) -> None:
    status, users = hub.api("GET", "/users")
    if status != 200:
        return
    for user in users:
        for server in user.get("servers", {}):
            hub.api("DELETE", f"/users/{user['name']}/servers/{server}")


def _remove_containers(client, hub: Hub) -> None:
    # other tests remove their containers meanwhile: one gone between the listing and here is fine
    for container in client.containers.list(all=True, filters={"label": "io.condaspawner.key"}, ignore_removed=True):
        with contextlib.suppress(docker.errors.NotFound):
            if container.image.tags and container.image.tags[0].startswith(hub.env["CONDASPAWNER_DEMO_IMAGE_REPO"]):
                container.remove(force=True)
    # Containers whose image was replaced (a rebuild moved its tag, or leftovers): only this
    # process's, by their home volume, since another test process's hubs may run theirs here.
    for container in client.containers.list(all=True, ignore_removed=True):
        if any(str(mount.get("Name", "")).startswith(VOLUME_PREFIX) for mount in container.attrs.get("Mounts", [])):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
    for volume in client.volumes.list():
        if volume.name.startswith(VOLUME_PREFIX):
            volume.remove(force=True)
    remove_repo_images(client, hub.env["CONDASPAWNER_DEMO_IMAGE_REPO"])
