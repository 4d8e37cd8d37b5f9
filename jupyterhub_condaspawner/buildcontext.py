"""A build's context: the files of the image besides the environment (its spec, lock,
pip settings, kernel spec and server settings), and the labels the image carries.

Both routes use them: env.Dockerfile COPYs them, the layered route puts them in its top
layer (:func:`settings_files`). User text only ever goes into these files' contents.
"""

from __future__ import annotations

import configparser
import io
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .buildmodel import (
    LABEL_BASE_IMAGE,
    LABEL_BUILDER_VERSION,
    LABEL_CREATED,
    LABEL_ENV_NAME,
    LABEL_KEY,
    LABEL_LOCK_DIGEST,
    LABEL_SPEC,
    RECIPE_VERSION,
    BuildRequest,
)
from .resolve import Lock

ENV_DOCKERFILE = Path(__file__).parent / "images" / "env.Dockerfile"
# A server extension of the single-user server: applies SERVER_SETTINGS and names the
# environment's kernel from CONDASPAWNER_KERNEL_DISPLAY_NAME, which the spawner sets. Files of
# names of our own, never the base image's jupyter_server_config.py or .json.
SERVER_EXTENSION = Path(__file__).parent / "images" / "condaspawner_server_settings.py"
SERVER_SITE_PACKAGES = "/opt/conda/lib/python3.9/site-packages"  # the base's server (Base images)
SERVER_EXTENSIONS_DIR = "/opt/conda/etc/jupyter/jupyter_server_config.d"
SERVER_SETTINGS = "jupyter_server_settings.json"  # in meta/: /opt/condaspawner/, which the extension reads
KERNEL_DISPLAY_NAME_VARIABLE = "CONDASPAWNER_KERNEL_DISPLAY_NAME"


def write_context(context: Path, request: BuildRequest, lock: Lock, pip_config: dict[str, Any]) -> None:
    """Write the context's files into ``context`` (the staged environment is ``context``/env)."""
    shutil.copyfile(ENV_DOCKERFILE, context / "Dockerfile")
    meta = context / "meta"
    meta.mkdir()
    (meta / "environment.yml").write_text(request.spec.to_yaml(name=request.env_name))
    (meta / "condaspawner-lock.json").write_text(lock.to_json())
    (meta / "requirements.txt").write_text("".join(f"{line}\n" for line in request.spec.pip))
    (meta / "pip.conf").write_text(pip_conf(pip_config))
    kernel = context / "kernel"
    kernel.mkdir()
    (kernel / "kernel.json").write_text(json.dumps(kernel_spec(request), indent=2))
    # The env's kernel is the only one offered: the base's own python3 kernel is hidden.
    (meta / SERVER_SETTINGS).write_text(json.dumps({
        "MultiKernelManager": {"default_kernel_name": request.env_name},
        "KernelSpecManager": {"ensure_native_kernel": False, "allowed_kernelspecs": [request.env_name]},
    }, indent=2))
    (context / "jupyter").mkdir()
    (context / "jupyter" / f"{SERVER_EXTENSION.stem}.json").write_text(json.dumps({
        "ServerApp": {"jpserver_extensions": {SERVER_EXTENSION.stem: True}}}, indent=2))
    (context / "server").mkdir()
    shutil.copyfile(SERVER_EXTENSION, context / "server" / SERVER_EXTENSION.name)


def settings_files(context: Path, request: BuildRequest) -> dict[str, Path]:
    """Where env.Dockerfile's COPY steps put ``write_context``'s files: path in the image -> file."""
    files = {f"/opt/condaspawner/{path.name}": path for path in (context / "meta").iterdir()}
    files[f"/opt/conda/share/jupyter/kernels/{request.env_name}/kernel.json"] = context / "kernel" / "kernel.json"
    enabling = f"{SERVER_EXTENSION.stem}.json"
    files[f"{SERVER_EXTENSIONS_DIR}/{enabling}"] = context / "jupyter" / enabling
    files[f"{SERVER_SITE_PACKAGES}/{SERVER_EXTENSION.name}"] = context / "server" / SERVER_EXTENSION.name
    return files


def image_labels(key: str, request: BuildRequest, lock: Lock, base_image_id: str) -> dict[str, str]:
    """The labels of ``key``'s image: the key that finds it, what it was built from, and when."""
    return {
        LABEL_KEY: key,
        LABEL_SPEC: request.spec.normalized_json(),
        LABEL_LOCK_DIGEST: lock.digest(),
        LABEL_BASE_IMAGE: base_image_id,
        LABEL_BUILDER_VERSION: RECIPE_VERSION,
        LABEL_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
        LABEL_ENV_NAME: request.env_name,
    }


def kernel_spec(request: BuildRequest) -> dict[str, Any]:
    prefix = request.prefix
    variables = dict(request.spec.variables)
    env = {
        "CONDA_PREFIX": prefix,
        "CONDA_DEFAULT_ENV": request.env_name,
        "PATH": f"{prefix}/bin:/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        **variables,
    }
    if "PATH" in variables:
        # `PATH: $PATH:/x` expands from the server's PATH, whose first entry is the base's bin: the
        # notebook's `!pip` and `!python` would be the server's, not the environment's
        env["PATH"] = f"{prefix}/bin:{variables['PATH']}"
    return {
        "argv": [f"{prefix}/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        # Not the profile's display name: the server names the kernel from the variable
        # KERNEL_DISPLAY_NAME_VARIABLE (SERVER_EXTENSION), so that a renamed profile keeps its image.
        "display_name": request.env_name,
        "language": "python",
        "env": env,
        "metadata": {"debugger": True, "condaspawner": {"env_name": request.env_name}},
    }


def pip_conf(settings: dict[str, Any]) -> str:
    parser = configparser.ConfigParser()
    parser["global"] = {str(k): str(v) for k, v in settings.items()}
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()
