# Copied verbatim into every environment image, as a module of the single-user server's
# Python 3.9 (/opt/conda/lib/python3.9/site-packages), and enabled as a server extension by
# /opt/conda/etc/jupyter/jupyter_server_config.d/condaspawner_server_settings.json.
#
# Not a jupyter_server_config.py or .json: those names are the base image's own, and one of
# ours would replace the base's file of that name (Jupyter Server reads only the extensions
# to enable from jupyter_server_config.d/, so the settings are applied here, when the
# extension is linked: before the server makes its kernel managers).
#
# The environment's kernel is named in JupyterLab from the server's environment, which the
# hub sets from the profile's display name (CONDASPAWNER_KERNEL_DISPLAY_NAME): the image holds
# no display name, so renaming a profile reuses its image. Without the variable (the image
# run by hand) the kernel keeps the name in its kernel.json, the environment's folder name.
from __future__ import annotations

import inspect
import json
import os
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from traitlets.config import Config

DISPLAY_NAME_VARIABLE = "CONDASPAWNER_KERNEL_DISPLAY_NAME"
# The environment's server settings (its kernel the default and only one), written by the build.
SETTINGS_FILE = "/opt/condaspawner/jupyter_server_settings.json"


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "condaspawner_server_settings"}]


def _link_jupyter_server_extension(serverapp: Any) -> None:
    serverapp.update_config(Config(_unset(serverapp.config, _settings(serverapp.log))))
    # The default class is only known once the server made its gateway settings, after this.
    configured = "ServerApp.kernel_spec_manager_class" in serverapp.config
    serverapp.kernel_spec_manager_class = named_by_the_hub(
        serverapp.kernel_spec_manager_class if configured else KernelSpecManager)


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Nothing to do once the server runs: linking applied the settings."""


def _settings(log: Any) -> dict[str, dict[str, Any]]:
    try:
        with open(SETTINGS_FILE, encoding="utf-8") as settings:
            return json.load(settings)
    except (OSError, ValueError) as error:
        log.warning("condaspawner: cannot read %s: %s", SETTINGS_FILE, error)
        return {}


def _unset(config: Any, settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The settings no config file (the base image's, the user's) or command line set already:
    those stay as they are."""
    return {section: {name: value for name, value in values.items() if f"{section}.{name}" not in config}
            for section, values in settings.items()}


def named_by_the_hub(manager_class: type) -> type:
    """``manager_class`` (the base image's, if it configures one) naming the environment's
    kernel from DISPLAY_NAME_VARIABLE."""
    if inspect.iscoroutinefunction(getattr(manager_class, "get_kernel_spec", None)):
        return manager_class  # a gateway's kernels: named where they run

    class EnvironmentKernelSpecManager(manager_class):
        """Kernel specs as on disk, but the environment's kernel named by the hub."""

        def get_kernel_spec(self, kernel_name: str, *args: Any, **kwargs: Any) -> Any:
            spec = super().get_kernel_spec(kernel_name, *args, **kwargs)
            display_name = os.environ.get(DISPLAY_NAME_VARIABLE, "").strip()
            if display_name and "condaspawner" in (spec.metadata or {}):
                spec.display_name = display_name
            return spec

    return EnvironmentKernelSpecManager
