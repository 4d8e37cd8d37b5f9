"""The bench's image registry: Debian's ``docker-registry`` on loopback.

``start_registry`` installs the package when it is missing (as root, with apt-get),
writes a config with ``http.addr`` on 127.0.0.1 and a free port and filesystem storage
under the given folder, optionally htpasswd basic auth (bcrypt, written with Debian's
``htpasswd`` from apache2-utils), starts ``docker-registry serve CONFIG`` and waits
until ``/v2/`` answers. The bench daemon treats 127.0.0.0/8 registries as insecure by
default, so it pushes to and pulls from ``127.0.0.1:PORT`` without a daemon setting.

    server = start_registry(tmp / "registry", users={"hub": "secret"})
    server.repository("condaspawner-env")   # "127.0.0.1:PORT/condaspawner-env"
    server.stop(); server.start()           # down and up again, same port and storage
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .dockerd import BenchDaemonError, ensure_debian_packages, log_tail
from .ports import free_port

REGISTRY_PACKAGES = {"docker-registry": "docker-registry"}
HTPASSWD_PACKAGES = {"htpasswd": "apache2-utils"}
START_TIMEOUT_S = 30.0


class BenchRegistryError(BenchDaemonError):
    """The registry could not be installed or started."""


@dataclass
class RegistryServer:
    """One ``docker-registry serve`` process on 127.0.0.1:``port``, storing under ``directory``."""

    directory: Path
    port: int
    users: dict[str, str] = field(default_factory=dict)
    storage_dir: Path | None = None  # another registry's storage, to serve the same blobs
    tls: tuple[Path, Path] | None = None  # (certificate, key) in PEM: HTTPS instead of HTTP
    process: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def config_path(self) -> Path:
        return self.directory / "config.yml"

    @property
    def log_path(self) -> Path:
        return self.directory / "registry.log"

    @property
    def storage(self) -> Path:
        return self.storage_dir or self.directory / "storage"

    def repository(self, path: str) -> str:
        """A registry-qualified repository name, e.g. ``127.0.0.1:PORT/condaspawner-env``."""
        return f"{self.host}/{path}"

    def docker_config(self, directory: Path) -> Path:
        """Write a Docker config folder (``config.json``) holding this registry's credentials; for DOCKER_CONFIG."""
        directory.mkdir(parents=True, exist_ok=True)
        auths = {self.host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
                 for user, password in list(self.users.items())[:1]}
        (directory / "config.json").write_text(json.dumps({"auths": auths}, indent=2))
        return directory

    def start(self) -> RegistryServer:
        if self.process is not None and self.process.poll() is None:
            return self
        self._write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([_registry_command(), "serve", str(self.config_path)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchRegistryError(f"docker-registry exited with {self.process.returncode}:\n"
                                         + log_tail(self.log_path))
            if self.answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise BenchRegistryError(f"docker-registry did not answer on {self.url} in {START_TIMEOUT_S:g} s:\n"
                                 + log_tail(self.log_path))

    def answers(self) -> bool:
        """Whether ``/v2/`` answers (200, or 401 when it asks for credentials)."""
        context = ssl._create_unverified_context() if self.tls else None  # only "is it up?"
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=context):
                return True
        except urllib.error.HTTPError as error:
            return error.code == 401
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the process (the storage stays: ``start()`` brings the same registry back)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stored_bytes(self) -> int:
        """Bytes of the blobs the registry stores (each layer once, by digest)."""
        blobs = self.storage / "docker" / "registry" / "v2" / "blobs"
        return sum(path.stat().st_size for path in blobs.rglob("data")) if blobs.exists() else 0

    def _write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {json.dumps(str(self.storage))}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {json.dumps(str(self.tls[0]))}", f"    key: {json.dumps(str(self.tls[1]))}"]
        if self.users:
            htpasswd = self.directory / "htpasswd"
            write_htpasswd(htpasswd, self.users)
            lines += ["auth:", "  htpasswd:", "    realm: condaspawner-bench", f"    path: {json.dumps(str(htpasswd))}"]
        self.config_path.write_text("\n".join(lines) + "\n")


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    """An htpasswd file with bcrypt hashes (the only kind docker-registry accepts), via Debian's htpasswd."""
    ensure_debian_packages(HTPASSWD_PACKAGES)
    entries = []
    for user, password in users.items():
        result = subprocess.run(["htpasswd", "-nbB", user, password], capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchRegistryError(f"htpasswd failed: {result.stderr.strip()}")
        entries.append(result.stdout.strip())
    path.write_text("\n".join(entries) + "\n")
    os.chmod(path, 0o600)


def _registry_command() -> str:
    try:
        ensure_debian_packages(REGISTRY_PACKAGES)
    except BenchDaemonError as error:
        raise BenchRegistryError(str(error)) from None
    command = shutil.which("docker-registry")
    if command is None:
        raise BenchRegistryError("docker-registry is not on PATH after installing it")
    return command


def start_registry(directory: Path, *, users: dict[str, str] | None = None, port: int | None = None,
                   storage: Path | None = None, tls: tuple[Path, Path] | None = None) -> RegistryServer:
    """Install (if missing) and start a registry on 127.0.0.1, storing under ``directory``.

    ``users``: {name: password} for htpasswd basic auth; ``storage``: serve another registry's
    storage folder (its blobs and repositories) instead of a new one; ``tls``: (certificate,
    key) PEM files to serve HTTPS.
    """
    return RegistryServer(Path(directory), port or free_port(), dict(users or {}), storage, tls).start()
