"""A conda channel served over HTTP on loopback that holds every answer until the test opens
its gate: "a solve is running right now" made deterministic (the solve waits on the channel)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# A hub a test starts finds the module's gated channel here (see served_to_hubs).
HUB_ENV = "CONDASPAWNER_TEST_GATED_CHANNEL"


class GatedChannel:
    """The channel folder ``directory`` (written by throwaway_channel.write_channel) at ``url``.
    ``asked`` is set by the first request; every request waits for ``gate``."""

    def __init__(self, directory: Path) -> None:
        self.gate = threading.Event()
        self.asked = threading.Event()
        channel = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(directory), **kwargs)

            def send_head(self):  # GET and HEAD alike
                channel.asked.set()
                channel.gate.wait(600)
                return super().send_head()

            def end_headers(self) -> None:
                self.send_header("Cache-Control", "no-store")  # rattler's cache: every solve asks again
                super().end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GatedChannel:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def served_to_hubs(directory: Path) -> Iterator[GatedChannel]:
    """A GatedChannel whose URL the hubs started meanwhile read from HUB_ENV."""
    with GatedChannel(directory) as channel:
        os.environ[HUB_ENV] = channel.url
        try:
            yield channel
        finally:
            os.environ.pop(HUB_ENV, None)
