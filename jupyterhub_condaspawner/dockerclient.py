"""How the project connects to a Docker daemon: exactly as DockerSpawner does.

A module of its own so that commands which only read the daemon (``condaspawner gpus``)
do not import the builder and, with it, the solver.
"""

from __future__ import annotations

from typing import Any

import docker
import docker.tls
import docker.utils


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
