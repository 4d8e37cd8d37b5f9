"""What each entry point imports: the command stays fast, the product stays free of the bench."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = REPO / "jupyterhub_condaspawner"
GOOD_FILE = REPO / "tests" / "corpus" / "good" / "variables.yml"

# The hub and the image machinery: ~1,000 modules that `validate` has no use for.
HUB_AND_DOCKER = {"jupyterhub", "dockerspawner", "docker", "sqlalchemy", "alembic", "tornado", "aiohttp", "tqdm"}
PRODUCT_HEAVY_MODULES = {f"jupyterhub_condaspawner.{name}" for name in ("spawner", "builder", "gpus")}


def modules_after(code: str) -> tuple[str, set[str]]:
    """Run ``code`` in a fresh interpreter; return its output and the modules it loaded."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, cwd=REPO, timeout=120, text=True)
    assert result.returncode == 0, result.stderr
    *output, modules = result.stdout.splitlines()
    return "\n".join(output), set(json.loads(modules))


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_validate_loads_neither_the_hub_nor_docker_nor_the_builder():
    output, modules = modules_after(
        f"from jupyterhub_condaspawner import cli\nassert cli.main(['validate', {str(GOOD_FILE)!r}]) == 0"
    )
    assert output.startswith(f"{GOOD_FILE}: ok ")
    assert top_level(modules) & HUB_AND_DOCKER == set()
    assert modules & PRODUCT_HEAVY_MODULES == set()
    assert "condaspawner_bench" not in top_level(modules)


def test_profiles_loads_no_docker_and_no_hub_server():
    output, modules = modules_after(
        f"from jupyterhub_condaspawner import cli\nassert cli.main(['profiles', {str(REPO / 'profiles')!r}]) == 0"
    )
    assert "datascience-cpu" in output
    # jupyterhub.traitlets (ByteSpecification for mem_limit) is fine; the hub's server is not.
    assert top_level(modules) & (HUB_AND_DOCKER - {"jupyterhub"}) == set()
    assert modules & PRODUCT_HEAVY_MODULES == set()


def test_export_loads_neither_docker_nor_kubespawner_nor_the_builder(tmp_path):
    pinned = "registry.example.edu/envs:1@sha256:" + "0" * 64
    images = [f"--image={slug}={pinned}" for slug in ("datascience-cpu", "pytorch-gpu", "dl-course-hw3", "vision-lab-2gpu")]
    args = ["export", "kubespawner", "--profiles", str(REPO / "profiles"), "--gpu-product", "NVIDIA-A100-SXM4-80GB",
            "-o", str(tmp_path / "values.yaml"), *images]
    _, modules = modules_after(f"from jupyterhub_condaspawner import cli\nassert cli.main({args!r}) == 0")
    assert (tmp_path / "values.yaml").exists()
    assert top_level(modules) & (HUB_AND_DOCKER - {"jupyterhub"} | {"kubespawner", "kubernetes_asyncio"}) == set()
    assert modules & PRODUCT_HEAVY_MODULES == set()


def test_importing_the_package_does_not_import_the_spawner():
    _, modules = modules_after("import jupyterhub_condaspawner")
    assert top_level(modules) & HUB_AND_DOCKER == set()
    assert "jupyterhub_condaspawner.spawner" not in modules


def test_condaspawner_spawner_is_still_reachable_from_the_package_and_the_entry_point():
    import jupyterhub_condaspawner
    from jupyterhub_condaspawner.spawner import CondaSpawner

    assert jupyterhub_condaspawner.CondaSpawner is CondaSpawner
    (conda,) = [ep for ep in entry_points(group="jupyterhub.spawners") if ep.name == "conda"]
    assert conda.value == "jupyterhub_condaspawner.spawner:CondaSpawner"
    assert conda.load() is CondaSpawner


def test_only_commands_that_await_py_rattler_wait_for_its_threads_at_exit():
    from jupyterhub_condaspawner.cli import build_parser

    parser = build_parser()
    waits = {command: parser.parse_args([command, *args]).rattler_async for command, args in {
        "validate": ["x"], "profiles": [], "gpus": [], "base": [], "ls": [], "resolve": ["x"], "build": [],
        "export": ["kubespawner"],
    }.items()}
    assert waits == {"validate": False, "profiles": False, "gpus": False, "base": False, "ls": False,
                     "resolve": True, "build": True, "export": False}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, including ``import_module("...")`` calls."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def test_the_product_never_imports_the_bench():
    sources = sorted(PRODUCT.rglob("*.py"))
    assert len(sources) > 5
    offenders = {
        str(path.relative_to(REPO)): sorted(name for name in imported_modules(path) if name.split(".")[0] == "condaspawner_bench")
        for path in sources
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_bench_modules_are_gone_from_the_product():
    assert {"bench.py", "dockerd.py", "devchannel.py", "offlinebase.py"} & {p.name for p in PRODUCT.rglob("*.py")} == set()
