"""The production base image: Miniconda (Python 3.9) + the single-user server + jovyan.

Its recipe ships with the package (``images/miniconda-py39/Dockerfile`` and the pins
in ``images/singleuser-requirements.txt``), so ``condaspawner base`` works from an
installed wheel. It needs the internet (Debian, repo.anaconda.com, PyPI).

The layout every base image has: /opt/conda (Python 3.9), /opt/conda/envs/ for user
environments, jupyterhub-singleuser on PATH, USER jovyan (uid 1000, gid 100),
WORKDIR /home/jovyan.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

IMAGES_DIR = Path(__file__).resolve().parent / "images"
SINGLEUSER_REQUIREMENTS = IMAGES_DIR / "singleuser-requirements.txt"
SINGLEUSER_INSTALL = IMAGES_DIR / "install-singleuser.sh"  # how both base images install those pins
PRODUCTION_DOCKERFILE = "miniconda-py39/Dockerfile"  # relative to IMAGES_DIR, the build context

BASE_TAG = "condaspawner-base:py39"
BASE_CONDA_PREFIX = "/opt/conda"
LOG_TAIL_LINES = 30


class ImageBuildError(RuntimeError):
    """A base image could not be built; the message ends with the log's last lines."""


def singleuser_pins(requirements: Path = SINGLEUSER_REQUIREMENTS) -> dict[str, str]:
    """``{"jupyterhub": "5.5.4", ...}`` from the requirements file every base image installs."""
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==", 1)
            pins[name.strip()] = version.strip()
    return pins


def build_production_base(client: docker.DockerClient, *, tag: str = BASE_TAG) -> str:
    """Build ``images/miniconda-py39`` from the packaged recipe; return the image id."""
    return stream_build(client, path=str(IMAGES_DIR), dockerfile=PRODUCTION_DOCKERFILE, tag=tag)


def stream_build(client: docker.DockerClient, **build_kwargs: Any) -> str:
    """``docker build`` with host networking, logging each line; return the image id."""
    build_kwargs = {"network_mode": "host", "rm": True, "forcerm": True, **build_kwargs}
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    image_id = None
    started = time.monotonic()
    for chunk in client.api.build(decode=True, **build_kwargs):
        if "error" in chunk:
            tail.append(chunk["error"])
            raise ImageBuildError(
                f"docker build of {build_kwargs.get('tag')} failed:\n" + "\n".join(tail)
            )
        for line in chunk.get("stream", "").splitlines():
            if line.strip():
                tail.append(line)
                log.info("build: %s", line)
        image_id = chunk.get("aux", {}).get("ID", image_id)
    if image_id is None and build_kwargs.get("tag"):
        image_id = client.images.get(build_kwargs["tag"]).id
    if image_id is None:
        raise ImageBuildError("docker build gave no image id:\n" + "\n".join(tail))
    elapsed = time.monotonic() - started
    log.info("built %s (%s) in %.1f s", build_kwargs.get("tag"), image_id, elapsed)
    return image_id
