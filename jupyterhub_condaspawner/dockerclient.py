"""How the project connects to a Docker daemon: exactly as DockerSpawner does.

A module of its own so that commands which only read the daemon (``condaspawner gpus``)
do not import the builder and, with it, the solver.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

import docker
import docker.errors
import docker.tls
import docker.utils

from .builderrors import one_line


def daemon_settings(tls_config: dict[str, Any] | None = None, client_kwargs: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """DockerClient arguments for a daemon, made exactly as DockerSpawner makes its client's:
    version "auto", ``tls_config`` (docker.tls.TLSConfig's arguments), then DOCKER_HOST,
    DOCKER_TLS_VERIFY and DOCKER_CERT_PATH, then ``client_kwargs`` over all of them."""
    settings: dict[str, Any] = {"version": "auto"}
    if tls_config:
        settings["tls"] = docker.tls.TLSConfig(**tls_config)
    settings.update(docker.utils.kwargs_from_env())
    settings.update(client_kwargs or {})
    return settings


async def thread_stream(make: Callable[[], Iterable[dict[str, Any]]]) -> AsyncGenerator[dict[str, Any], None]:
    """A docker-py event stream (synchronous) read in a thread, as an async iterator.

    The daemon's refusals become ``{"error": ...}`` events, like errors inside the stream;
    a daemon that cannot be reached becomes ``{"daemon_error": ...}``. Abandoning the
    iterator (a timeout) stops reading at the next event.

    The reading thread is a daemon thread, not the event loop's executor: a build step can
    print nothing for minutes (a slow pip index), and a hub told to stop (SIGTERM) would
    otherwise wait for its next line before it could exit, the proxy already gone.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    abandoned = threading.Event()

    def put(item: dict[str, Any] | None) -> None:
        with contextlib.suppress(RuntimeError):  # the hub's loop has closed: nobody is reading
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        try:
            for item in make():
                if abandoned.is_set():
                    break
                put(item)
        except docker.errors.APIError as error:
            put({"error": one_line(error.explanation or error)})
        except Exception as error:  # the daemon went away or cannot be reached
            put({"daemon_error": one_line(error)})
        put(None)

    threading.Thread(target=pump, name="docker-stream", daemon=True).start()
    try:
        while (item := await queue.get()) is not None:
            yield item
    finally:
        abandoned.set()
