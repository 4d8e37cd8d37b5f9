"""A misspelled setting class (c.ImageBuildr) is named, not silently ignored."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

from test_cli import REPO
from traitlets.config import Config, Configurable

import jupyterhub_condaspawner
from jupyterhub_condaspawner.configcheck import SETTING_CLASSES, misspelled_sections


def test_the_list_is_every_configurable_class_of_the_package():
    found = set()
    for module in pkgutil.iter_modules(jupyterhub_condaspawner.__path__):
        loaded = importlib.import_module(f"jupyterhub_condaspawner.{module.name}")
        for value in vars(loaded).values():
            if inspect.isclass(value) and issubclass(value, Configurable) and value.__module__ == loaded.__name__:
                found.add(value.__name__)
    assert found == set(SETTING_CLASSES)


def test_close_names_are_named_and_real_classes_are_not():
    config = Config()
    config.ImageBuildr.max_images = 3
    config.GPUAllocator.policy = "spread"
    config.ImageBuilder.max_images = 3
    config.DockerSpawner.remove = True
    config.Spawner.start_timeout = 60
    config.JupyterHub.port = 8000
    config.SwarmSpawner.network_name = "x"
    assert misspelled_sections(config) == [
        "c.ImageBuildr is not a setting class, so its settings are ignored: did you mean c.ImageBuilder?",
        "c.GPUAllocator is not a setting class, so its settings are ignored: did you mean c.GpuAllocator?",
    ]


def test_the_command_warns_in_one_line(tmp_path):
    path = tmp_path / "jupyterhub_config.py"
    path.write_text("c = get_config()\nc.SpecPolcy.max_dependencies = 5\n")
    env = tmp_path / "env.yml"
    env.write_text("dependencies: [python=3.9]\n")
    result = subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", "validate", "--config", str(path),
                             str(env)], capture_output=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().splitlines() == [
        "warning: c.SpecPolcy is not a setting class, so its settings are ignored: did you mean c.SpecPolicy?"]
