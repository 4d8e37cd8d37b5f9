"""Debian's ``docker-registry`` as a plain process: the image registry of the multi-node bench.

Its storage is a folder, so two registry processes may serve the same images: the
multi-node bench runs one on the manager's address for the nodes, and briefly one on
loopback for the single-host bench daemon, which may push over plain HTTP only to
127.0.0.0/8 (its default insecure range) and cannot be reconfigured from a test.

    with RegistryProcess.start(storage, "127.0.0.1:5123", log_file) as registry:
        ...  # docker push 127.0.0.1:5123/name:tag

(Kept separate from the single-host registry fixture so the two can be merged.)
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .dockerd import BenchDaemonError, log_tail

REGISTRY_PACKAGES = {"docker-registry": "docker-registry"}
START_TIMEOUT_S = 20.0
MANIFEST_TYPES = ", ".join([
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])


class RegistryError(BenchDaemonError):
    """The registry did not start or does not answer."""


def registry_config(storage: Path, address: str) -> str:
    """A registry config (JSON is YAML): filesystem storage, no auth, plain HTTP on ``address``."""
    return json.dumps({
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        "http": {"addr": address, "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }, indent=2)


@dataclass
class RegistryProcess:
    """A running ``docker-registry serve``; ``address`` is host:port (no scheme)."""

    address: str
    process: subprocess.Popen
    log_file: Path

    @classmethod
    def start(cls, storage: Path, address: str, log_file: Path,
              wrapper: Sequence[str] = ()) -> RegistryProcess:
        """Start it (``wrapper``, e.g. an nsenter prefix, runs it in a namespace) and wait until it answers."""
        storage.mkdir(parents=True, exist_ok=True)
        config = log_file.with_suffix(".yml")
        config.write_text(registry_config(storage, address))
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [*wrapper, "docker-registry", "serve", str(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        registry = cls(address, process, log_file)
        try:
            registry.wait_until_ready()
        except BaseException:
            registry.stop()
            raise
        return registry

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def wait_until_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RegistryError(f"docker-registry exited with status {self.process.returncode}.\n"
                                    + log_tail(self.log_file))
            if self.answers():
                return
            time.sleep(0.05)
        raise RegistryError(f"docker-registry did not answer at {self.url} within {timeout:.0f} s.\n"
                            + log_tail(self.log_file))

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def manifest(self, repository: str, tag: str) -> dict | None:
        """The image manifest ``repository:tag`` names (config and layer digests, sizes), or None."""
        request = urllib.request.Request(f"{self.url}/v2/{repository}/manifests/{tag}",
                                         headers={"Accept": MANIFEST_TYPES})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return dict(json.load(response))
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def manifest_config_digest(self, repository: str, tag: str) -> str | None:
        """The config digest (= the image ID Docker shows) that ``repository:tag`` names, or None."""
        config = (self.manifest(repository, tag) or {}).get("config") or {}
        return config.get("digest")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RegistryProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
