"""A PEP 503 package index on loopback for the pip sections of test builds.

It serves one tiny pure-Python wheel (or a given sdist) per project the test adds, answers 404 for every
other project (pip: "No matching distribution found"), and can hold a project's page
until the test opens a gate, which makes "a build is running right now" deterministic.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A hub a test starts finds the module's index here (see served_to_hubs).
HUB_ENV = "CONDASPAWNER_TEST_PIP_INDEX"
# A hub's config lines for it (HUB_EXTRA_CONFIG): pip sections build against that index only.
HUB_PIP_CONFIG = (
    "import os\n"
    f'c.ImageBuilder.pip_config = {{"index-url": os.environ["{HUB_ENV}"], '
    '"trusted-host": "127.0.0.1", "timeout": "600", "retries": "0"}\n'
)


def tiny_wheel(name: str, version: str) -> tuple[str, bytes]:
    """A valid, installable pure-Python wheel for ``name``: (file name, bytes)."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: condaspawner-tests\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return f"{module}-{version}-py3-none-any.whl", buffer.getvalue()


def sdist(name: str, version: str, files: dict[str, str]) -> tuple[str, bytes]:
    """A source distribution of ``name`` holding ``files`` (pyproject.toml, an in-tree build
    backend, ...) under its top folder: (file name, bytes). pip runs its backend to build it."""
    top = f"{name.replace('-', '_')}-{version}"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, text in {"PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", **files}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{path}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return f"{top}.tar.gz", buffer.getvalue()


class PipIndex:
    """``url`` is the index's /simple/ URL on 127.0.0.1."""

    def __init__(self) -> None:
        self.wheels: dict[str, tuple[str, bytes]] = {}
        self.gates: dict[str, threading.Event] = {}
        self.requested: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                index.requested.append(self.path)
                parts = [part for part in self.path.split("/") if part]
                if len(parts) == 2 and parts[0] == "simple" and parts[1] in index.wheels:
                    gate = index.gates.get(parts[1])
                    if gate is not None:
                        gate.wait(600)
                    filename, _ = index.wheels[parts[1]]
                    self._send(200, f'<a href="/files/{filename}">{filename}</a>'.encode(), "text/html")
                elif len(parts) == 2 and parts[0] == "files":
                    found = [data for filename, data in index.wheels.values() if filename == parts[1]]
                    self._send(200, found[0], "application/octet-stream") if found else self._send(404, b"")
                else:
                    self._send(404, b"not found")

            def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, name: str, version: str = "1.0", gated: bool = False) -> threading.Event | None:
        """Serve ``name``; if ``gated``, its page waits until the returned event is set."""
        self.wheels[name] = tiny_wheel(name, version)
        if gated:
            self.gates[name] = threading.Event()
            return self.gates[name]
        return None

    def add_file(self, name: str, distribution: tuple[str, bytes]) -> None:
        """Serve ``distribution`` (file name, bytes: a wheel or an sdist) as ``name``'s only one."""
        self.wheels[name] = distribution

    def __enter__(self) -> "PipIndex":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for gate in self.gates.values():
            gate.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def served_to_hubs() -> Iterator[PipIndex]:
    """A PipIndex whose URL the hubs started meanwhile read from HUB_ENV (HUB_PIP_CONFIG)."""
    with PipIndex() as index:
        os.environ[HUB_ENV] = index.url
        try:
            yield index
        finally:
            os.environ.pop(HUB_ENV, None)
