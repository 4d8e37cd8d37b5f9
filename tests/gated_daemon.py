"""A gate in front of the bench's real Docker daemon, for races with a slow container listing.

A unix socket that relays every request to the daemon and its answer back, one request at a
time per connection (docker-py keeps its connections alive). A container listing
(``GET .../containers/json``, what the GPU table is restored from) goes to the daemon at
once, and the daemon's answer is read, so the listing is taken when the request arrives; the
answer is held until the test lets it go. A race between a slow listing and the hub's
allocations then plays out step by step, with no sleeps, against real containers.

A container stop can be dropped too (``stops_to_drop``): the daemon never hears of it, and
the client's connection ends unanswered, as when a daemon fails under a stop. A container
start's answer can be dropped (``start_answers_to_drop``): the daemon starts the container,
and the client hears nothing.

Not relayed: connections a request upgrades (attach, exec start); no test here needs one.
"""

from __future__ import annotations

import http.client
import socket
import socketserver
import threading
from pathlib import Path
from urllib.parse import urlsplit

HOLD_S = 60  # a listing's answer is let go after this at the latest: a failed test must not hang the run


class GatedDaemon(socketserver.ThreadingUnixStreamServer):
    """The daemon at ``upstream`` (a DOCKER_HOST: unix:// or tcp:// without TLS), served at
    ``url``; ``listings``: one event per listing asked for, set to let its answer go."""

    daemon_threads = True

    def __init__(self, path: Path, upstream: str):
        super().__init__(str(path), _Connection)
        self.url = f"unix://{path}"
        self.upstream = urlsplit(upstream)
        if self.upstream.scheme not in ("unix", "tcp", "http"):
            raise ValueError(f"the gate relays to unix:// or plain tcp:// daemons, not {upstream}")
        self.listings: list[threading.Event] = []
        self.stops_to_drop = 0  # container stops to end unanswered, never relayed
        self.start_answers_to_drop = 0  # container starts relayed, their answers never
        self._asked = threading.Condition()
        self._holding = True
        self._sockets: set[socket.socket] = set()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def __enter__(self) -> GatedDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect_upstream(self) -> socket.socket:
        if self.upstream.scheme == "unix":
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.upstream.path)
        else:
            upstream = socket.create_connection((self.upstream.hostname, self.upstream.port or 2375))
        self.track(upstream)
        return upstream

    def track(self, sock: socket.socket) -> None:
        with self._asked:
            self._sockets.add(sock)

    def wait_for_listing(self, count: int = 1) -> None:
        """Until ``count`` listings were asked for (the daemon's answers in, held)."""
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

    def hold_listing(self) -> None:
        release = threading.Event()
        with self._asked:
            self.listings.append(release)
            if not self._holding:
                release.set()
            self._asked.notify_all()
        release.wait(HOLD_S)

    def take(self, counter: str) -> bool:
        """Whether to drop this one (``counter``: "stops_to_drop", "start_answers_to_drop")."""
        with self._asked:
            if getattr(self, counter) <= 0:
                return False
            setattr(self, counter, getattr(self, counter) - 1)
            return True

    def close(self) -> None:
        """Let every listing go, stop serving and close every connection, both sides."""
        self.answer_all()
        self.shutdown()
        self.server_close()
        with self._asked:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


class _Connection(socketserver.StreamRequestHandler):
    """One client connection, relayed over one connection to the daemon."""

    server: GatedDaemon

    def handle(self) -> None:
        self.server.track(self.connection)
        upstream = self.server.connect_upstream()
        try:
            while self._relay(upstream):
                pass
        finally:
            upstream.close()

    def _relay(self, upstream: socket.socket) -> bool:
        """Relay one request and its answer; False when the connection ends after it."""
        request_line = self.rfile.readline(65537)
        if not request_line.strip():
            return False
        head, headers = [request_line], {}
        while (line := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
            head.append(line)
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self._body(headers)
        method, target = request_line.decode("latin-1").split()[:2]
        path = urlsplit(target).path
        if method == "POST" and path.endswith("/stop") and self.server.take("stops_to_drop"):
            return False
        upstream.sendall(b"".join(head) + b"\r\n" + body)

        response = http.client.HTTPResponse(upstream, method=method)
        response.begin()  # the daemon has answered: a listing is taken
        if method == "POST" and path.endswith("/start") and self.server.take("start_answers_to_drop"):
            return False
        if method == "GET" and urlsplit(target).path.endswith("/containers/json"):
            self.server.hold_listing()
        status = f"HTTP/1.1 {response.status} {response.reason}\r\n"
        fields = "".join(f"{name}: {value}\r\n" for name, value in response.getheaders())
        self.connection.sendall((status + fields + "\r\n").encode("latin-1"))
        if response.chunked:  # a stream (logs, events, a build's output): passed on as it comes
            while chunk := response.read1(65536):
                self.connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.connection.sendall(b"0\r\n\r\n")
        else:
            while chunk := response.read(65536):
                self.connection.sendall(chunk)
        return not response.will_close and response.status != 101

    def _body(self, headers: dict[str, str]) -> bytes:
        """The request's body as it came, by Content-Length or in chunks."""
        if "chunked" not in headers.get("transfer-encoding", ""):
            return self.rfile.read(int(headers.get("content-length") or 0))
        raw = []
        while True:
            size_line = self.rfile.readline(65537)
            raw.append(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:  # then trailers, up to a blank line
                while (line := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                    raw.append(line)
                raw.append(b"\r\n")
                return b"".join(raw)
            raw.append(self.rfile.read(size + 2))
