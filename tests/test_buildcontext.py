"""The files an environment image carries besides the environment: its kernel spec."""

from __future__ import annotations

from jupyterhub_condaspawner.buildcontext import kernel_spec
from jupyterhub_condaspawner.buildmodel import BuildRequest
from jupyterhub_condaspawner.spec import SpecPolicy


def request(variables: str) -> BuildRequest:
    spec = SpecPolicy().parse(f"dependencies: [python=3.9]\nvariables: {{{variables}}}\n")
    return BuildRequest(spec, env_name="course")


def test_a_path_variable_keeps_the_environments_bin_first():
    """`PATH: $PATH:/x` expands from the server's PATH, which starts with the base's bin: the
    notebook's `!pip` would be the server's. The environment's bin goes first."""
    env = kernel_spec(request("PATH: '$PATH:/opt/tools/bin'"))["env"]
    assert env["PATH"] == "/opt/conda/envs/course/bin:$PATH:/opt/tools/bin"
    assert kernel_spec(request("OMP_NUM_THREADS: '4'"))["env"]["PATH"].startswith("/opt/conda/envs/course/bin:")


def test_the_kernel_is_named_by_its_folder_in_the_image_and_other_variables_pass_verbatim():
    spec = kernel_spec(request("PYTHONPATH: '$PYTHONPATH:/x', DATA: '/home/jovyan/data'"))
    assert spec["display_name"] == "course"  # the hub names it at start (CONDASPAWNER_KERNEL_DISPLAY_NAME)
    assert spec["env"]["PYTHONPATH"] == "$PYTHONPATH:/x" and spec["env"]["DATA"] == "/home/jovyan/data"
    assert spec["argv"][0] == "/opt/conda/envs/course/bin/python"
