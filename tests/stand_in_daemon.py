"""A stand-in Docker daemon on a unix socket, for races with a slow container listing.

docker-py's real client talks to it over HTTP. It answers the version and the container
listing the GPU table is restored from: the listing is taken when the request arrives (as
the daemon takes it), and its answer is held until the test lets it go, so a race between a
slow listing and the hub's allocations plays out step by step, with no sleeps.
"""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
from pathlib import Path
from typing import Any

API_VERSION = "1.41"


class StandInDaemon(socketserver.ThreadingUnixStreamServer):
    """``containers``: what ``docker ps -a`` lists now; ``listings``: one event per listing asked
    for, set to let its answer go (:meth:`answer`)."""

    daemon_threads = True

    def __init__(self, path: Path):
        super().__init__(str(path), _Handler)
        self.url = f"unix://{path}"
        self.containers: list[dict[str, Any]] = []
        self.listings: list[threading.Event] = []
        self._asked = threading.Condition()
        self._holding = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def add_container(self, name: str, labels: dict[str, str], running: bool = True) -> None:
        self.containers.append({"Id": name.ljust(64, "0"), "Names": ["/" + name], "Labels": labels,
                                "State": "running" if running else "exited", "Created": len(self.containers)})

    def wait_for_listing(self, count: int = 1) -> None:
        """Until ``count`` listings were asked for (their answers held)."""
        with self._asked:
            if not self._asked.wait_for(lambda: len(self.listings) >= count, timeout=30):
                raise AssertionError(f"no listing #{count} was asked for")

    def answer(self, listing: int) -> None:
        self.listings[listing].set()

    def answer_all(self) -> None:
        """Let every listing go, those asked for from now on too."""
        with self._asked:
            self._holding = False
            for listing in self.listings:
                listing.set()

    def asked(self, release: threading.Event) -> None:
        with self._asked:
            self.listings.append(release)
            if not self._holding:
                release.set()
            self._asked.notify_all()

    def close(self) -> None:
        self.answer_all()
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: StandInDaemon

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.endswith("/version"):
            return self._reply(200, {"ApiVersion": API_VERSION, "Version": "stand-in"})
        if "/containers/json" in self.path:
            listing = list(self.server.containers)
            release = threading.Event()
            self.server.asked(release)
            release.wait(60)  # the test lets it go (60 s: a failed test must not hang the run)
            return self._reply(200, listing)
        return self._reply(404, {"message": f"the stand-in daemon has no {self.path}"})

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
