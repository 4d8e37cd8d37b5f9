"""A misspelled setting class (c.ImageBuildr) is named, not silently ignored."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest
from test_cli import REPO
from traitlets import Float, TraitError
from traitlets.config import Config, Configurable

import jupyterhub_condaspawner
from jupyterhub_condaspawner.configcheck import SETTING_CLASSES, misspelled_sections
from jupyterhub_condaspawner.hubservices import HubConfigError, hub_services
from jupyterhub_condaspawner.spawner import CondaSpawner
from jupyterhub_condaspawner.traittypes import FiniteFloat


def _setting_classes() -> dict[str, type[Configurable]]:
    found = {}
    for module in pkgutil.iter_modules(jupyterhub_condaspawner.__path__):
        loaded = importlib.import_module(f"jupyterhub_condaspawner.{module.name}")
        for value in vars(loaded).values():
            if inspect.isclass(value) and issubclass(value, Configurable) and value.__module__ == loaded.__name__:
                found[value.__name__] = value
    return found


def test_the_list_is_every_configurable_class_of_the_package():
    assert set(_setting_classes()) == set(SETTING_CLASSES)


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


def test_the_hub_names_a_misspelled_class_even_when_another_setting_is_refused(caplog):
    """The warning came after the services were made: a refused setting raised first, and the
    misspelled class, the mistake that explains the rest, never reached the hub's log."""
    config = Config()
    config.GpuAlocator.per_user_gpu_quota = 1
    config.GpuAllocator.policy = "fastest"  # refused: not a policy
    spawner = CondaSpawner(config=config)
    for _ in range(3):  # every start and poll asks for the services: the warning is logged once
        with pytest.raises(HubConfigError, match="policy"):
            hub_services(spawner)
    assert caplog.text.count(
        "c.GpuAlocator is not a setting class, so its settings are ignored: did you mean c.GpuAllocator?") == 1


def test_the_hub_names_every_refused_setting_of_its_services_at_once():
    """traitlets stops at a class's first refused setting: three mistakes took three restarts to learn."""
    config = Config()
    config.GpuAllocator.policy = "fastest"
    config.SpecPolicy.max_file_bytes = "256K"
    config.ImageBuilder.max_images = -3
    config.ImageBuilder.max_concurrent_builds = 0
    config.ImageBuilder.max_concurrent_presolves = 4  # fine: not named
    with pytest.raises(HubConfigError) as refused:
        hub_services(CondaSpawner(config=config))
    message = str(refused.value)
    assert message.startswith("settings in the hub's config: ") and "\n" not in message
    for name in ("'policy' trait of a GpuAllocator", "'max_file_bytes' trait of a SpecPolicy",
                 "'max_images' trait of an ImageBuilder", "'max_concurrent_builds' trait of an ImageBuilder"):
        assert name in message, message
    assert message.count("; ") == 3 and "max_concurrent_presolves" not in message


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


def test_no_number_setting_of_the_package_takes_nan_or_infinity():
    """``min=0`` lets NaN through (every comparison with it is false): a NaN gpu_idle_timeout or
    queue_timeout would turn its feature off without a word."""
    checked = []
    for value in _setting_classes().values():
        for name, trait in value.class_traits(config=True).items():
            if isinstance(trait, Float) and name in vars(value):
                assert isinstance(trait, FiniteFloat), f"{value.__name__}.{name}"
                with pytest.raises(TraitError, match="expected a finite number"):
                    trait.validate(value, float("nan"))
                for infinite in (float("inf"), float("-inf")):  # or out of its range
                    with pytest.raises(TraitError):
                        trait.validate(value, infinite)
                checked.append(f"{value.__name__}.{name}")
    assert {"CondaSpawner.gpu_idle_timeout", "GpuAllocator.queue_timeout", "ImageBuilder.build_timeout"} <= set(checked)


@pytest.mark.parametrize("setting, value", [
    ("ImageBuilder.max_concurrent_builds", 0),  # every build queued for ever, without a word
    ("ImageBuilder.max_images", -3),  # gc read it as 1
    ("ImageBuilder.build_timeout", 0), ("ImageBuilder.registry_timeout", 0), ("Resolver.solve_timeout", -1),
    ("SpecPolicy.max_file_bytes", 0), ("SpecPolicy.max_dependencies", 0), ("SpecPolicy.max_problems", 0),
    ("SpecPolicy.precheck_timeout", -5), ("KubernetesExport.cpu_guarantee_fraction", 1.5),
    ("KubernetesExport.mem_guarantee_fraction", -0.5),
])
def test_a_count_or_a_limit_that_would_wedge_the_hub_is_refused(setting, value):
    section, name = setting.split(".")
    cls = _setting_classes()[section]
    with pytest.raises(TraitError, match=rf"'{name}' trait of .* should not be (less|greater) than"):
        cls.class_traits()[name].validate(cls, value)


def test_a_nan_spawner_setting_is_the_hubs_config_error_not_culling_turned_off():
    config = Config()
    config.CondaSpawner.gpu_idle_timeout = float("nan")
    spawner = CondaSpawner(config=config)
    assert spawner.gpu_idle_timeout == 0.0  # the default, and the error below refuses every start
    assert len(spawner._config_errors) == 1 and "gpu_idle_timeout" in spawner._config_errors[0]
    assert "expected a finite number, not the float nan" in spawner._config_errors[0]


def test_every_setting_has_a_config_example_and_a_row_in_the_readme():
    """An admin reads a setting's help (`--help-all`, the docs) and the README's Configuration
    table: each setting shows how it is written, and none is missing from the table."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Configuration\n")
    rows = [line.split(" | ")[0] for line in readme[start:readme.index("\n## ", start + 1)].splitlines()
            if line.startswith("| `c.")]
    missing = []
    for class_name, cls in _setting_classes().items():
        shown = "CondaSpawner" if class_name == "IsolationMixin" else class_name  # a mixin of the spawners
        for name, trait in cls.class_own_traits(config=True).items():
            assert f"c.{shown}.{name} = " in (trait.help or ""), f"{class_name}.{name}: no config example"
            if not any(row.startswith(f"| `c.{shown}.") and (f"`c.{shown}.{name}`" in row or f"`{name}`" in row)
                       for row in rows):
                missing.append(f"c.{shown}.{name}")
    assert not missing, f"not in the README's Configuration table: {missing}"
