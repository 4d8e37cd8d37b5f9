"""The Kubernetes path: the exported values, fed to KubeSpawner itself.

KubeSpawner runs in its mock mode (no cluster, no network): the values file is loaded
the way Zero to JupyterHub's jupyterhub_config.py loads it (singleuser.profileList into
``c.KubeSpawner.profile_list``, then each hub.extraConfig snippet exec'd with ``c``), and
the pod manifests it makes are checked: image, resources, GPUs, node placement, access.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_asyncio.config.kube_config
import pytest
import yaml
from jupyterhub.auth import Authenticator
from jupyterhub.objects import Hub, Server
from kubernetes_asyncio.client import ApiClient
from kubespawner import KubeSpawner
from tornado import web
from traitlets import TraitError
from traitlets.config import Config

from jupyterhub_condaspawner import cli
from jupyterhub_condaspawner.buildcontext import KERNEL_DISPLAY_NAME_VARIABLE
from jupyterhub_condaspawner.builder import BuildError, ImageBuilder, ImageInfo
from jupyterhub_condaspawner.kubernetes import (
    ACCESS_CONFIG_KEY,
    PINNED_REFERENCE,
    ExportError,
    KubernetesExport,
    MissingImage,
    PushedImages,
    PushUnavailable,
    byte_size,
    push_problem,
    pushed_reference,
)
from jupyterhub_condaspawner.profiles import Profile, ProfileCatalog

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "profiles"
REGISTRY = "registry.example.edu:5000/condaspawner-env"
A100S = ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB"]
NODE_PRODUCTS = [*A100S, "NVIDIA-L4", "Tesla-V100-SXM2-16GB"]
KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {server: "https://127.0.0.1:9"}
users:
- name: nobody
  user: {token: never-sent}
contexts:
- name: nowhere
  context: {cluster: nowhere, user: nobody, namespace: jhub}
current-context: nowhere
"""


@pytest.fixture(autouse=True)
def kubeconfig(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig KubeSpawner can load; its server is never contacted in mock mode."""
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(path))
    # kubernetes_asyncio reads $KUBECONFIG once, when it is imported
    monkeypatch.setattr(kubernetes_asyncio.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


def load(directory: Path = SHIPPED) -> list[Profile]:
    catalog = ProfileCatalog()
    catalog.profiles_dir = str(directory)
    return catalog.load()


def pinned(profile: Profile) -> str:
    """The reference a push of ``profile``'s image would return (a made-up digest)."""
    digest = hashlib.sha256(profile.slug.encode()).hexdigest()
    return f"{REGISTRY}:{profile.environment.key()[:16]}@sha256:{digest}"


def pushed(profiles: list[Profile]) -> PushedImages:
    """The images file `build --push` would have written for ``profiles``."""
    images = PushedImages()
    for profile in profiles:
        if profile.environment is not None:
            images.record(profile, pinned(profile))
    return images


def export_values(profiles: list[Profile], **settings: Any) -> dict[str, Any]:
    exporter = KubernetesExport(**({"gpu_products": NODE_PRODUCTS} | settings))
    text = exporter.export(profiles, pushed(profiles)).to_yaml()
    return yaml.safe_load(text)  # what helm reads


def hub_config(values: dict[str, Any]) -> Config:
    """What Z2JH's jupyterhub_config.py makes of the values: profile_list, then extraConfig."""
    c = Config()
    c.KubeSpawner.profile_list = values["singleuser"]["profileList"]
    for _, snippet in sorted(values["hub"]["extraConfig"].items()):
        exec(snippet, {"c": c})
    return c


def user(name: str, *groups: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, escaped_name=name, id=abs(hash(name)) % 10**6, url=f"/user/{name}/",
                           groups=[SimpleNamespace(name=group) for group in groups], server=Server())


def spawner(config: Config, who: SimpleNamespace, user_options: dict[str, Any] | None = None) -> KubeSpawner:
    spawner = KubeSpawner(_mock=True, user=who, hub=Hub(), config=config)
    spawner.user_options = user_options or {}
    return spawner


async def pod_for(config: Config, who: SimpleNamespace, user_options: dict[str, Any] | None = None) -> dict:
    """The pod KubeSpawner would send to the API server for ``who`` starting with ``user_options``."""
    kube = spawner(config, who, user_options)
    await kube.load_user_options()
    pod = await kube.get_pod_manifest()
    async with ApiClient() as api:  # no request is made: only the JSON the API would get
        return api.sanitize_for_serialization(pod)


def container(pod: dict) -> dict:
    (notebook,) = pod["spec"]["containers"]
    return notebook


def placement(pod: dict) -> tuple[dict[str, str] | None, list[dict[str, Any]]]:
    """The pod's node selector and its required node-affinity expressions."""
    required = (pod["spec"].get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution", {}))
    expressions = [e for term in required.get("nodeSelectorTerms", []) for e in term["matchExpressions"]]
    return pod["spec"].get("nodeSelector"), expressions


# -- every shipped profile, through KubeSpawner -------------------------------------------------


def test_every_shipped_profile_exports_and_gets_its_pod():
    profiles = load()
    assert [p.slug for p in profiles] == ["datascience-cpu", "pytorch-gpu", "dl-course-hw3", "vision-lab-2gpu"]
    config = hub_config(export_values(profiles))
    # one user allowed everywhere: a member of both groups
    member = user("pat", "dl-course", "vision-lab")

    async def check() -> None:
        for profile in profiles:
            notebook = container(await pod_for(config, member, {"profile": profile.slug}))
            assert notebook["image"] == pinned(profile)
            limits, requests = notebook["resources"]["limits"], notebook["resources"]["requests"]
            assert float(limits["cpu"]) == profile.cpu_limit == float(requests["cpu"])
            assert int(limits["memory"]) == profile.mem_limit == int(requests["memory"])
            if profile.gpus:
                assert limits["nvidia.com/gpu"] == str(profile.gpus)
            else:
                assert "nvidia.com/gpu" not in limits
            selector, expressions = placement(await pod_for(config, member, {"profile": profile.slug}))
            if profile.gpu_model:  # "*A100*": two products on the nodes carry it
                assert expressions == [{"key": "nvidia.com/gpu.product", "operator": "In", "values": A100S}]
                assert not selector
            else:
                assert not selector and not expressions

    asyncio.run(check())


def test_the_default_profile_is_what_an_empty_start_gets():
    config = hub_config(export_values(load()))
    pod = asyncio.run(pod_for(config, user("alice")))
    assert container(pod)["image"] == pinned(next(p for p in load() if p.slug == "datascience-cpu"))


def test_the_values_file_is_what_the_command_writes(tmp_path: Path):
    profiles = load()
    images = tmp_path / "images.yaml"
    pushed(profiles).write(images)
    out = tmp_path / "values.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "jupyterhub_condaspawner.cli", "export", "kubespawner", "-o", str(out),
         "--images", str(images), *(f"--gpu-product={p}" for p in NODE_PRODUCTS)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "wrote" in result.stderr and "4 profile(s)" in result.stderr
    # the profiles that also take a user's own file say what Kubernetes does with it
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert {line.split(":")[1].strip() for line in notes} == {"datascience-cpu", "pytorch-gpu", "vision-lab-2gpu"}
    text = out.read_text()
    assert text.startswith("# Zero to JupyterHub values")
    assert yaml.safe_load(text) == export_values(profiles)
    assert f"    {ACCESS_CONFIG_KEY}: |\n" in text  # the hub snippet stays readable


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="RLIMIT_FSIZE stands in for a full disk")
def test_an_export_that_cannot_be_written_whole_leaves_the_earlier_values_file(tmp_path: Path):
    """A values file cut short may still read as YAML: without its hub snippet, Helm would
    deploy every profile open to everyone."""
    pushed(load()).write(tmp_path / "images.yaml")
    out = tmp_path / "values.yaml"
    out.write_text("earlier values\n")

    def full_disk_after_2000_bytes() -> None:
        import resource  # POSIX only

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    result = subprocess.run(
        [sys.executable, "-m", "jupyterhub_condaspawner.cli", "export", "kubespawner", "-o", str(out),
         "--images", str(tmp_path / "images.yaml"), "--gpu-product", "NVIDIA-A100-SXM4-80GB"],
        capture_output=True, text=True, cwd=REPO, timeout=120, preexec_fn=full_disk_after_2000_bytes,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"error: cannot write {out}: ")
    assert out.read_text() == "earlier values\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images.yaml", "values.yaml"]


def test_standard_output_and_every_missing_image_at_once(tmp_path: Path):
    profiles = load()
    images = pushed(profiles[:2])
    images.write(tmp_path / "images.yaml")
    command = [sys.executable, "-m", "jupyterhub_condaspawner.cli", "export", "kubespawner",
               "--images", str(tmp_path / "images.yaml"), "--gpu-product", "NVIDIA-A100-SXM4-80GB"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert [line.split(":")[1].strip() for line in errors] == ["dl-course-hw3", "vision-lab-2gpu"]
    assert "run `condaspawner build --push`, or pass --image dl-course-hw3=" in errors[0]
    assert "Traceback" not in result.stderr

    given = [f"--image={p.slug}={pinned(p)}" for p in profiles[2:]]
    result = subprocess.run([*command, *given], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    values = yaml.safe_load(result.stdout)
    vision = values["singleuser"]["profileList"][3]["kubespawner_override"]
    assert vision["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}  # one A100 product given


# -- access by group and user ---------------------------------------------------------------------


def test_a_user_outside_the_group_neither_sees_nor_starts_the_profile():
    config = hub_config(export_values(load()))

    async def check() -> None:
        outsider = spawner(config, user("alice", "physics"))
        form = await outsider.get_options_form()
        assert "Python 3.9 data science" in form and "PyTorch 2.0 on 1 GPU" in form
        assert "Deep Learning course" not in form and "Vision lab" not in form
        # the REST API cannot ask for it either
        with pytest.raises(ValueError, match="No such profile: dl-course-hw3"):
            await spawner(config, user("alice", "physics"), {"profile": "dl-course-hw3"}).load_user_options()

        student = spawner(config, user("student", "dl-course"))
        form = await student.get_options_form()
        assert "Deep Learning course" in form and "Vision lab" not in form
        pod = await pod_for(config, user("student", "dl-course"), {"profile": "dl-course-hw3"})
        assert container(pod)["resources"]["limits"]["nvidia.com/gpu"] == "1"

    asyncio.run(check())


def test_a_start_of_a_profile_not_open_to_the_user_is_a_one_line_403_before_kubespawner_starts():
    """KubeSpawner's own refusal is a ValueError from start(): a 500 and a traceback for the hub."""
    config = hub_config(export_values(load()))

    async def check() -> None:
        with pytest.raises(web.HTTPError) as refused:
            await spawner(config, user("alice", "physics"), {"profile": "dl-course-hw3"}).run_pre_spawn_hook()
        assert (refused.value.status_code, refused.value.log_message) == (
            403, "profile: 'dl-course-hw3' is not available to you")
        with pytest.raises(web.HTTPError) as unknown:
            await spawner(config, user("alice"), {"profile": "no-such"}).run_pre_spawn_hook()
        assert (unknown.value.status_code, unknown.value.log_message) == (400, "profile: no profile 'no-such' on this hub")
        await spawner(config, user("student", "dl-course"), {"profile": "dl-course-hw3"}).run_pre_spawn_hook()

    asyncio.run(check())


def exported_values_text(folder: Path, profile_yaml: str) -> str:
    """The values file exported from one profile file holding ``profile_yaml``."""
    (folder / "p.yaml").write_text(profile_yaml)
    profiles = load(folder)
    return KubernetesExport().export(profiles, pushed(profiles)).to_yaml(source=folder)


def test_names_go_yaml_would_read_as_numbers_or_booleans_are_quoted(tmp_path: Path):
    """Helm reads the values with Go YAML: plain `1e3` is 1000 there, `n` is false."""
    text = exported_values_text(tmp_path, "display_name: Course\nslug: 1e3\nenvironment: {dependencies: [python=3.11]}\n"
                                          "allowed_users: ['19e0042', 'n', 'y', '0o17', alice]\n")
    for value in ("1e3", "19e0042", "n", "y", "0o17"):
        assert f"'{value}'" in text, value
    assert "- alice" in text  # plain where it is text to every reader


def test_names_go_yaml_reads_as_numbers_after_a_sign_or_underscores_are_quoted(tmp_path: Path):
    """Go YAML drops `_` from a plain scalar that starts with a sign before reading it as a number:
    `-_1` is -1 there, `+_2` is 2, and `-.5` is -0.5 (PyYAML reads all three as text)."""
    text = exported_values_text(tmp_path, "display_name: '-.5'\nslug: course\nenvironment: {dependencies: [python=3.11]}\n"
                                          "allowed_users: ['-_1', '-._5']\nallowed_groups: ['+_2', '+.5']\n")
    for value in ("-.5", "-_1", "-._5", "+_2", "+.5"):
        assert f"'{value}'" in text, value


def test_a_name_the_hub_could_not_read_back_is_refused_in_one_line(tmp_path: Path):
    """Z2JH hands the values to the hub through Helm's toYaml, which writes `=` and `<<` unquoted;
    the hub's PyYAML cannot read them (ConstructorError), and the hub would not start."""
    (tmp_path / "a.yaml").write_text("display_name: Lab\nslug: lab\nenvironment: {dependencies: [python=3.11]}\n"
                                     "allowed_groups: [physics, '=']\n")
    (tmp_path / "b.yaml").write_text("display_name: '<<'\nslug: odd\nenvironment: {dependencies: [python=3.11]}\n")
    profiles = load(tmp_path)
    with pytest.raises(ExportError) as failed:
        KubernetesExport().export(profiles, pushed(profiles))
    assert [problem.split(":")[0] for problem in failed.value.problems] == ["lab", "odd"]
    assert "'='" in failed.value.problems[0] and "'<<'" in failed.value.problems[1]
    assert "the hub" in failed.value.problems[0]
    (tmp_path / "a.yaml").unlink()
    (tmp_path / "b.yaml").write_text("display_name: Odd\ndescription: '<<'\nenvironment: {dependencies: [python=3.11]}\n")
    profiles = load(tmp_path)
    assert KubernetesExport().export(profiles, pushed(profiles)).profile_list[0]["description"] == "&lt;&lt;"


def test_a_name_with_a_next_line_character_reads_back_as_written(tmp_path: Path):
    """U+0085 (NEL) is a line break to YAML 1.1 readers: PyYAML's own single quotes lose it."""
    (tmp_path / "p.yaml").write_text('display_name: "Lab\\Nx"\ndescription: "a\\Lb\\Pc"\n'
                                     "environment: {dependencies: [python=3.11]}\n")
    profiles = load(tmp_path)
    export = KubernetesExport().export(profiles, pushed(profiles))
    assert yaml.safe_load(export.to_yaml(source=tmp_path)) == export.values()


def test_a_display_name_with_braces_names_the_kernel_as_written(tmp_path: Path):
    """KubeSpawner fills `{username}`-style fields into every string of `environment`: a
    display_name's braces must reach the pod as written, and never fail the start."""
    (tmp_path / "a.yaml").write_text('display_name: "Python {3.11} for {username}"\nslug: braces\n'
                                     "environment: {dependencies: [python=3.11]}\n")
    (tmp_path / "b.yaml").write_text('display_name: "R {tidyverse"\nslug: open\n'
                                     "environment: {dependencies: [python=3.11]}\n")
    profiles = load(tmp_path)
    config = hub_config(export_values(profiles))

    async def check() -> None:
        for profile in profiles:
            pod = await pod_for(config, user("alice"), {"profile": profile.slug})
            env = {variable["name"]: variable.get("value") for variable in container(pod)["env"]}
            assert env[KERNEL_DISPLAY_NAME_VARIABLE] == profile.display_name

    asyncio.run(check())


def test_the_profiles_folders_name_stays_in_the_header_comment():
    """A folder name with a line break must not end the comment: the rest would be values."""
    profiles = load()
    export = KubernetesExport(gpu_products=NODE_PRODUCTS).export(profiles, pushed(profiles))
    for source in ("profiles\nsingleuser: {profileList: []}", "profiles\x85hub: {}", "profiles\u2028x: 1"):
        assert yaml.safe_load(export.to_yaml(source=source)) == export.values(), repr(source)


def test_a_profiles_text_reads_as_text_on_kubespawners_form(tmp_path: Path):
    (tmp_path / "p.yaml").write_text('display_name: "CUDA <12 & friends"\n'
                                     'description: "PyTorch <img src=x onerror=alert(1)>"\n'
                                     "environment: {dependencies: [python=3.11]}\n")
    config = hub_config(export_values(load(tmp_path)))

    async def check() -> None:
        form = await spawner(config, user("alice")).get_options_form()
        assert "<img" not in form and "PyTorch &lt;img src=x onerror=alert(1)&gt;" in form
        assert "CUDA &lt;12 &amp; friends" in form

    asyncio.run(check())


def test_allowed_users_admit_a_user_without_the_group():
    config = hub_config(export_values(load()))

    async def check() -> None:
        pod = await pod_for(config, user("pi-smith"), {"profile": "vision-lab-2gpu"})
        assert container(pod)["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert placement(pod)[1] == [{"key": "nvidia.com/gpu.product", "operator": "In", "values": A100S}]
        with pytest.raises(ValueError, match="No such profile"):
            await pod_for(config, user("pi-smithers"), {"profile": "vision-lab-2gpu"})

    asyncio.run(check())


def test_allowed_users_are_read_through_the_hubs_name_normalisation(tmp_path: Path):
    # A roster's "TA-Jones" is the hub user "ta-jones": JupyterHub's authenticator lower-cases names.
    (tmp_path / "ta.yaml").write_text(
        "display_name: TA tools\nslug: cs101-ta\nenvironment: {dependencies: [python=3.11]}\n"
        "allowed_users: [TA-Jones]\n")
    config = hub_config(export_values(load(tmp_path)))

    async def check() -> None:
        kube = spawner(config, user("ta-jones"), {"profile": "cs101-ta"})
        kube.authenticator = Authenticator()
        assert [profile["slug"] for profile in await kube.profile_list(kube)] == ["cs101-ta"]
        await kube.pre_spawn_hook(kube)  # the start is let through
        other = spawner(config, user("student"), {"profile": "cs101-ta"})
        other.authenticator = Authenticator()
        with pytest.raises(web.HTTPError) as refused:
            await other.pre_spawn_hook(other)
        assert refused.value.status_code == 403

    asyncio.run(check())


def test_without_the_hub_snippet_kubespawner_would_offer_every_profile():
    """Why the values must be used whole: KubeSpawner 7 ignores allowed_groups by itself."""
    values = export_values(load())
    bare = Config()
    bare.KubeSpawner.profile_list = values["singleuser"]["profileList"]
    pod = asyncio.run(pod_for(bare, user("alice"), {"profile": "dl-course-hw3"}))
    assert container(pod)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_user_no_profile_admits_is_refused_not_given_a_default_image(tmp_path: Path):
    (tmp_path / "only.yaml").write_text(
        "display_name: Lab only\nenvironment: {dependencies: [python=3.11]}\nallowed_groups: [lab]\n")
    config = hub_config(export_values(load(tmp_path)))
    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(pod_for(config, user("alice")))
    assert refused.value.status_code == 403


def test_the_snippet_refuses_a_values_file_without_the_profile_list():
    values = export_values(load())
    with pytest.raises(ValueError, match="singleuser.profileList is not set"):
        exec(values["hub"]["extraConfig"][ACCESS_CONFIG_KEY], {"c": Config()})


# -- the user's own environment.yml ------------------------------------------------------------


def test_a_users_own_environment_is_refused_in_one_line_and_earlier_hooks_still_run():
    values = export_values(load())
    ran: list[str] = []
    c = Config()
    c.Spawner.pre_spawn_hook = lambda spawner: ran.append(spawner.user.name)
    c.KubeSpawner.profile_list = values["singleuser"]["profileList"]
    exec(values["hub"]["extraConfig"][ACCESS_CONFIG_KEY], {"c": c})

    async def check() -> None:
        own = spawner(c, user("alice"), {"profile": "datascience-cpu", "environment": "dependencies: [numpy]"})
        with pytest.raises(web.HTTPError) as refused:
            await own.run_pre_spawn_hook()
        assert refused.value.status_code == 400 and "cannot build your own environment.yml" in refused.value.log_message
        # by the key of one (as the Docker hub's environments page starts it): not the profile's image instead
        by_key = spawner(c, user("alice"), {"profile": "datascience-cpu", "environment_key": "ab" * 32})
        with pytest.raises(web.HTTPError) as refused:
            await by_key.run_pre_spawn_hook()
        assert refused.value.status_code == 400 and "cannot build your own environment.yml" in refused.value.log_message
        assert ran == []
        await spawner(c, user("bob"), {"profile": "datascience-cpu"}).run_pre_spawn_hook()
        assert ran == ["bob"]

    asyncio.run(check())


def test_hooks_an_admin_sets_in_other_extra_config_entries_still_run_after_the_refusal():
    """Z2JH runs hub.extraConfig in sorted key order; the snippet's key sorts last, so an admin's
    `hooks` entry is set by then, and chained."""
    values = export_values(load())
    assert ACCESS_CONFIG_KEY == max([ACCESS_CONFIG_KEY, "hooks", "config", "spawner", "myConfig", "z-extra"])
    ran: list[str] = []
    values["hub"]["extraConfig"]["hooks"] = "c.Spawner.pre_spawn_hook = lambda spawner: ran.append(spawner.user.name)"
    c = Config()
    c.KubeSpawner.profile_list = values["singleuser"]["profileList"]
    for _, snippet in sorted(values["hub"]["extraConfig"].items()):
        exec(snippet, {"c": c, "ran": ran})

    async def check() -> None:
        own = spawner(c, user("alice"), {"profile": "datascience-cpu", "environment": "dependencies: [numpy]"})
        with pytest.raises(web.HTTPError):
            await own.run_pre_spawn_hook()
        await spawner(c, user("bob"), {"profile": "datascience-cpu"}).run_pre_spawn_hook()
        assert ran == ["bob"]

    asyncio.run(check())


def test_an_entry_after_the_snippet_that_replaces_its_hook_fails_every_start_in_one_line():
    values = export_values(load())
    values["hub"]["extraConfig"]["zzz-late"] = "c.KubeSpawner.pre_spawn_hook = lambda spawner: None"
    with pytest.raises(web.HTTPError) as refused:
        asyncio.run(pod_for(hub_config(values), user("alice"), {"profile": "datascience-cpu"}))
    assert refused.value.status_code == 500
    assert refused.value.log_message.startswith("hub.extraConfig: an entry after zz-condaspawner-profile-access sets "
                                                "pre_spawn_hook")


def test_profiles_that_only_take_the_users_own_file_are_left_out_with_a_note(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("display_name: Bring your own\nallow_custom_environment: true\ngpus: 1\n")
    (tmp_path / "b.yaml").write_text("display_name: Base\nenvironment: {dependencies: [python=3.11]}\n"
                                     "allow_custom_environment: true\n")
    profiles = load(tmp_path)
    export = KubernetesExport().export(profiles, pushed(profiles))
    assert [entry["slug"] for entry in export.profile_list] == ["base"]
    assert export.notes == [
        "bring-your-own: left out: it only runs the user's own environment.yml, which needs a builder on the "
        "cluster (docs/kubernetes.md)",
        "base: exported with its own environment only; users cannot bring their own environment.yml on "
        "Kubernetes (docs/kubernetes.md)",
    ]
    with pytest.raises(ExportError, match="nothing to export"):
        KubernetesExport().export(profiles[:1], pushed(profiles))


# -- GPU models: node selectors are exact values -------------------------------------------------


def gpu_profile(model: str | None, gpus: int = 1) -> Profile:
    return Profile(slug="g", display_name="G", source="g.yaml", gpus=gpus, gpu_model=model)


@pytest.mark.parametrize(("model", "products", "expected"), [
    (None, [], {}),
    ("*L4*", NODE_PRODUCTS, {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-L4"}}),
    ("*v100*", NODE_PRODUCTS, {"node_selector": {"nvidia.com/gpu.product": "Tesla-V100-SXM2-16GB"}}),
    # NVML's name has spaces where the label has dashes; the spawner matches without case
    ("NVIDIA A100-SXM4-80GB", [], {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}}),
    ("nvidia a100-sxm4-80gb", NODE_PRODUCTS, {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}}),
    ("NVIDIA A100*", NODE_PRODUCTS, {"node_affinity_required": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": A100S}]}]}),
])
def test_gpu_model_to_node_placement(model: str | None, products: list[str], expected: dict[str, Any]):
    assert KubernetesExport(gpu_products=products).gpu_placement(gpu_profile(model)) == expected


@pytest.mark.parametrize(("model", "products", "message"), [
    ("*A100*", [], "is a glob and node selectors need exact values: list the nvidia.com/gpu.product values"),
    ("*H100*", NODE_PRODUCTS, "matches none of the GPU products given"),
    ("NVIDIA H100 80GB HBM3", NODE_PRODUCTS, "matches none of the GPU products given"),
    ("NVIDIA A100-SXM4-40GB", ["NVIDIA-A100-SXM4-40GB-SHARED"], "matches none of the GPU products given"),
    ("A100 (80 GB)", [], "is not a possible value of nvidia.com/gpu.product"),
])
def test_a_gpu_model_that_cannot_be_placed_is_refused_in_one_line(model: str, products: list[str], message: str):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        KubernetesExport(gpu_products=products).gpu_placement(gpu_profile(model))


def test_glob_errors_name_every_profile(tmp_path: Path):
    profiles = load()
    with pytest.raises(ExportError) as failed:
        KubernetesExport().export(profiles, pushed(profiles))
    assert failed.value.problems == [
        "vision-lab-2gpu: gpu_model '*A100*' is a glob and node selectors need exact values: list the "
        "nvidia.com/gpu.product values of your nodes with --gpu-product (kubectl get nodes -L nvidia.com/gpu.product)"
    ]


def test_settings_change_the_label_resource_and_guarantees():
    profiles = [p for p in load() if p.slug == "vision-lab-2gpu"]
    values = export_values(profiles, gpu_resource="gpu.example.com/a100", gpu_product_label="example.com/gpu",
                           gpu_products=["A100-80"], cpu_guarantee_fraction=0.25, mem_guarantee_fraction=0.5)
    (entry,) = values["singleuser"]["profileList"]
    override = entry["kubespawner_override"]
    assert override["extra_resource_limits"] == {"gpu.example.com/a100": "2"}
    assert override["node_selector"] == {"example.com/gpu": "A100-80"}
    assert (override["cpu_guarantee"], override["mem_guarantee"]) == (4.0, "64G")
    pod = asyncio.run(pod_for(hub_config(values), user("pi-smith"), {"profile": "vision-lab-2gpu"}))
    resources = container(pod)["resources"]
    assert (float(resources["requests"]["cpu"]), int(resources["requests"]["memory"])) == (4.0, 64 * 2**30)
    assert (resources["limits"]["gpu.example.com/a100"], placement(pod)[0]) == ("2", {"example.com/gpu": "A100-80"})
    # the kernel's name in JupyterLab is not in the image: the pod's environment carries it
    env = {variable["name"]: variable.get("value") for variable in container(pod)["env"]}
    assert env[KERNEL_DISPLAY_NAME_VARIABLE] == profiles[0].display_name

    none = KubernetesExport(cpu_guarantee_fraction=0, mem_guarantee_fraction=0).resources(profiles[0])
    assert "cpu_guarantee" not in none and "mem_guarantee" not in none
    for bad in ({"cpu_guarantee_fraction": 1.5}, {"mem_guarantee_fraction": -0.1}, {"gpu_products": ["A100 80GB"]}):
        with pytest.raises(TraitError):
            KubernetesExport(**bad)


@pytest.mark.parametrize(("setting", "value"), [
    ("gpu_product_label", "nvidia.com/gpu product"), ("gpu_product_label", "nvidia.com/"), ("gpu_product_label", ""),
    ("gpu_resource", "gpu"), ("gpu_resource", "nvidia.com/gpu "), ("gpu_resource", "kubernetes.io/gpu"),
])
def test_a_label_or_resource_name_kubernetes_would_refuse_is_a_setting_error(setting: str, value: str):
    """Found only when a pod is made, it would fail every GPU start (422 from the API server)."""
    with pytest.raises(TraitError, match=setting):
        KubernetesExport(**{setting: value})


@pytest.mark.parametrize(("setting", "value"), [
    ("gpu_product_label", "gpu.product"), ("gpu_product_label", "example.com/gpu"), ("gpu_resource", "amd.com/gpu"),
    ("gpu_resource", "gpu.example.com/a100"),
])
def test_label_and_resource_names_kubernetes_accepts_are_taken(setting: str, value: str):
    assert getattr(KubernetesExport(**{setting: value}), setting) == value


def test_settings_come_from_the_hub_config_file(tmp_path: Path):
    config = tmp_path / "jupyterhub_config.py"
    config.write_text("c.KubernetesExport.gpu_products = ['NVIDIA-A100-SXM4-80GB']\n"
                      "c.KubernetesExport.images_file = 'pinned.yaml'\n")
    pushed(load()).write(tmp_path / "pinned.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "jupyterhub_condaspawner.cli", "export", "kubespawner", "--config", str(config),
         "--profiles", str(SHIPPED)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    vision = yaml.safe_load(result.stdout)["singleuser"]["profileList"][3]["kubespawner_override"]
    assert vision["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}


@pytest.mark.parametrize(("size", "text"), [(4 * 2**30, "4G"), (512 * 2**20, "512M"), (2**40, "1T"),
                                             (1536 * 2**20, "1536M"), (1000, 1000)])
def test_byte_sizes_read_as_kubespawner_reads_them(size: int, text: str | int):
    assert byte_size(size) == text


def test_every_setting_has_help_with_a_config_example():
    for name, trait in KubernetesExport.class_traits(config=True).items():
        assert f"c.KubernetesExport.{name} = " in trait.help, name


# -- the images: pinned, and current --------------------------------------------------------------


def test_images_must_be_pinned_by_digest_and_current(tmp_path: Path):
    profiles = load()
    datascience = profiles[0]
    images = pushed(profiles)
    path = tmp_path / "images.yaml"
    images.write(path)
    again = PushedImages.load(path)
    assert again(datascience) == pinned(datascience)
    assert PINNED_REFERENCE.match(pinned(datascience))

    changed = Profile(**{**datascience.__dict__, "cuda": "12.4"})
    with pytest.raises(MissingImage, match="environment changed since .* was pushed"):
        again(changed)

    by_hand = PushedImages()
    by_hand.set("datascience-cpu", f"{REGISTRY}:latest")
    with pytest.raises(MissingImage, match="not pinned by digest"):
        by_hand(datascience)
    by_hand.set("datascience-cpu", pinned(datascience))
    assert by_hand(changed) == pinned(datascience)  # given by hand: nothing to compare with


def test_a_broken_images_file_is_one_line_per_problem(tmp_path: Path):
    path = tmp_path / "images.yaml"
    path.write_text("images: {a: 3, b: {image: x@sha256:00}}\n")
    with pytest.raises(ExportError) as failed:
        PushedImages.load(path)
    assert failed.value.problems == [f"{path}: images.a: must be a reference or a mapping with `image`"]
    path.write_text("- not a mapping\n")
    with pytest.raises(ExportError, match="must be a mapping with `images:"):
        PushedImages.load(path)
    result = subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", "export", "kubespawner",
                             "--images", str(tmp_path / "absent.yaml")], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert (result.returncode, result.stderr.strip()) == (1, f"error: images file not found: {tmp_path / 'absent.yaml'}")
    result = subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", "export", "kubespawner",
                             f"--image=pytorch={REGISTRY}:1@sha256:{'0' * 64}"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert (result.returncode, result.stderr.strip()) == (1, "error: --image pytorch=...: no such profile (profiles: "
                                                          "datascience-cpu, dl-course-hw3, pytorch-gpu, vision-lab-2gpu)")


def test_a_slug_given_twice_in_the_images_file_or_by_hand_is_refused_naming_both(tmp_path: Path):
    # YAML, and a repeated option, keep the last: the export would run whichever came last.
    first, second = f"{REGISTRY}:a@sha256:{'1' * 64}", f"{REGISTRY}:b@sha256:{'2' * 64}"
    path = tmp_path / "images.yaml"
    path.write_text(f"version: 1\nimages:\n  datascience-cpu: {first}\n  pytorch-gpu: {first}\n"
                    f"  datascience-cpu:\n    image: {second}\n")
    with pytest.raises(ExportError) as failed:
        PushedImages.load(path)
    assert failed.value.problems == [f"{path}: images.datascience-cpu: given twice (lines 3 and 5): keep one entry"]
    path.write_text(f"images:\n  1: {first}\n  '1': {second}\n")  # one slug, however it is quoted
    with pytest.raises(ExportError) as failed:
        PushedImages.load(path)
    assert failed.value.problems == [f"{path}: images.1: given twice (lines 2 and 3): keep one entry"]

    result = subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", "export", "kubespawner",
                             f"--image=datascience-cpu={first}", f"--image=datascience-cpu={second}"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (result.returncode, result.stderr.strip(), result.stdout) == (
        1, f"error: --image datascience-cpu=...: given twice ({first} and {second}): keep one", "")


def test_build_push_refuses_an_images_file_that_gives_a_slug_twice(fake_builder: FakeBuilder, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]):
    images = tmp_path / "images.yaml"
    reference = f"{REGISTRY}:a@sha256:{'1' * 64}"
    images.write_text(f"images:\n  pytorch-gpu: {reference}\n  pytorch-gpu: {reference}\n")
    assert cli.main(["build", "--push", "--profiles", str(SHIPPED), "--images", str(images)]) == 1
    assert capsys.readouterr().err == f"error: {images}: images.pytorch-gpu: given twice (lines 2 and 3): keep one entry\n"
    assert fake_builder.pushed == []


def test_an_images_file_of_another_version_or_broken_yaml_is_one_line_that_says_where(tmp_path: Path):
    path = tmp_path / "images.yaml"
    path.write_text(f"version: 2\nimages: {{datascience-cpu: {REGISTRY}:t@sha256:{'0' * 64}}}\n")
    with pytest.raises(ExportError) as failed:
        PushedImages.load(path)
    (problem,) = failed.value.problems
    assert problem.startswith(f"{path}: version 2: ") and "reads version 1" in problem
    path.write_text("images: {a: [}\n")
    with pytest.raises(ExportError) as failed:
        PushedImages.load(path)
    (problem,) = failed.value.problems
    assert problem.startswith(f"{path}: invalid YAML at line 1, column ")


# -- the build side: `build --push` and the builder's push API --------------------------------------


PINNED = f"{REGISTRY}:kkkkkkkkkkkkkkkk@sha256:{'1' * 64}"
INFO = ImageInfo(key="k" * 64, tag="condaspawner-env:kkkkkkkkkkkkkkkk", image_id="sha256:1", env_name="x", cached=True,
                 reference=PINNED)


class WithRegistry:
    registry = REGISTRY


def test_pushed_reference_is_the_builders_pinned_reference():
    assert asyncio.run(pushed_reference(WithRegistry(), INFO)) == PINNED

    unpinned = dataclasses.replace(INFO, reference=f"{REGISTRY}:kkkk")
    with pytest.raises(PushUnavailable, match="not a registry reference pinned by digest"):
        asyncio.run(pushed_reference(WithRegistry(), unpinned))
    with pytest.raises(PushUnavailable, match="not a registry reference pinned by digest"):
        asyncio.run(pushed_reference(WithRegistry(), dataclasses.replace(INFO, reference="")))

    no_registry = WithRegistry()
    no_registry.registry = ""
    assert push_problem(no_registry) == (
        'no registry to push to: set c.ImageBuilder.registry = "registry.example.edu/condaspawner-env"')
    with pytest.raises(PushUnavailable):
        asyncio.run(pushed_reference(no_registry, INFO))


def test_build_push_takes_profiles_not_files():
    result = subprocess.run([sys.executable, "-m", "jupyterhub_condaspawner.cli", "build", "--push", "x.yml"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (result.returncode, result.stderr.strip()) == (
        1, "error: build --push prebuilds the profiles (for Kubernetes); give no FILE")


def test_the_images_file_round_trips_as_yaml(tmp_path: Path):
    profiles = load()
    pushed(profiles).write(tmp_path / "images.yaml")
    document = yaml.safe_load((tmp_path / "images.yaml").read_text())
    assert document["version"] == 1
    assert document["images"]["dl-course-hw3"] == {
        "image": pinned(profiles[2]), "spec": profiles[2].environment.key(), "cuda": "11.8"}
    assert json.dumps(document)  # plain data only


class FakeBuild:
    """A finished build, as ImageBuilder.ensure returns it (a failed push fails the build)."""

    def __init__(self, info: ImageInfo | None, error: BuildError | None = None):
        self.info, self.error = info, error

    async def follow(self) -> Any:
        yield {"phase": "ready", "progress": 100, "message": "ready"}

    async def result(self) -> ImageInfo:
        if self.error is not None:
            raise self.error
        assert self.info is not None
        return self.info


class FakeBuilder:
    """The builder as `build --push` uses it with a registry: every image ends up pushed."""

    registry = REGISTRY

    def __init__(self, refuse: str = ""):
        self.refuse = refuse
        self.pushed: list[str] = []

    def base_image_id(self) -> str:
        return "sha256:base"

    def ensure(self, request: Any) -> FakeBuild:
        key = request.spec.key()
        if request.env_name == self.refuse:
            return FakeBuild(None, BuildError(f"push of condaspawner-env:{key[:16]} failed: registry unreachable",
                                              phase="registry"))
        self.pushed.append(request.env_name)
        reference = f"{REGISTRY}:{key[:16]}@sha256:{hashlib.sha256(key.encode()).hexdigest()}"
        return FakeBuild(ImageInfo(key=key, tag=f"condaspawner-env:{key[:16]}", image_id="sha256:" + key,
                                   env_name=request.env_name, cached=True, reference=reference, pushed_bytes=0))

    async def finish_removals(self) -> None:
        """Nothing was staged here: no staging folder to wait for."""


@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch) -> FakeBuilder:
    """`build --push` against a builder with a registry (no Docker, no registry)."""
    builder = FakeBuilder()
    monkeypatch.setattr(cli, "_builder", lambda args, config: builder)
    monkeypatch.setattr(ImageBuilder, "registry", REGISTRY)  # what `push_problem` checks first
    return builder


def test_build_push_records_pinned_images_that_export_then_uses(fake_builder: FakeBuilder, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]):
    images = tmp_path / "images.yaml"
    assert cli.main(["build", "--push", "--profiles", str(SHIPPED), "--images", str(images)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {images}: 4 pinned image(s)" in out and out.count(f"{REGISTRY}:") >= 4
    assert fake_builder.pushed == ["datascience-cpu", "pytorch-gpu", "dl-course-hw3", "vision-lab-2gpu"]

    values = tmp_path / "values.yaml"
    assert cli.main(["export", "kubespawner", "--profiles", str(SHIPPED), "--images", str(images),
                     "--gpu-product", "NVIDIA-A100-SXM4-80GB", "-o", str(values)]) == 0
    profile_list = yaml.safe_load(values.read_text())["singleuser"]["profileList"]
    recorded = yaml.safe_load(images.read_text())["images"]
    assert [entry["kubespawner_override"]["image"] for entry in profile_list] == [
        recorded[slug]["image"] for slug in ("datascience-cpu", "pytorch-gpu", "dl-course-hw3", "vision-lab-2gpu")]


def test_export_into_a_folder_that_is_not_there_is_one_error_line(fake_builder: FakeBuilder, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]):
    images = tmp_path / "images.yaml"
    assert cli.main(["build", "--push", "--profiles", str(SHIPPED), "--images", str(images)]) == 0
    capsys.readouterr()
    target = tmp_path / "missing" / "values.yaml"
    assert cli.main(["export", "kubespawner", "--profiles", str(SHIPPED), "--images", str(images),
                     "--gpu-product", "NVIDIA-A100-SXM4-80GB", "-o", str(target)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: cannot write {target}: No such file or directory"


def test_build_push_to_an_images_file_it_cannot_write_says_so_before_building(
        fake_builder: FakeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Found after the builds, it would lose every pushed reference (and show an internal error)."""
    images = tmp_path / "missing" / "images.yaml"
    assert cli.main(["build", "--push", "--profiles", str(SHIPPED), "--images", str(images)]) == 1
    assert fake_builder.pushed == []
    assert capsys.readouterr().err == f"error: cannot write {images}: No such file or directory\n"


def test_build_push_that_cannot_write_the_images_file_after_building_is_one_error_line(
        fake_builder: FakeBuilder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    images = tmp_path / "images.yaml"

    def full(self: PushedImages, path: str | Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PushedImages, "write", full)
    assert cli.main(["build", "--push", "--profiles", str(SHIPPED), "--images", str(images)]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines()[-1].startswith(f"error: cannot write {images}: No space left on device")
    assert "internal error" not in err and out.count("@sha256:") == 4  # the references are still shown


def test_export_onto_its_own_images_file_is_refused(fake_builder: FakeBuilder, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    """condaspawner-images.yaml and condaspawner-values.yaml are one tab completion apart: the
    values written over the images would lose every pushed reference."""
    images = tmp_path / "images.yaml"
    assert cli.main(["build", "--push", "--profiles", str(SHIPPED), "--images", str(images)]) == 0
    recorded = images.read_text()
    capsys.readouterr()
    assert cli.main(["export", "kubespawner", "--profiles", str(SHIPPED), "--images", str(images),
                     "--gpu-product", "NVIDIA-A100-SXM4-80GB", "-o", str(tmp_path / "." / "images.yaml")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: -o {tmp_path / '.' / 'images.yaml'}: that is the images file the export reads: write the values "
        "elsewhere")
    assert images.read_text() == recorded


def test_a_profile_edited_while_build_push_runs_is_recorded_as_built_and_then_found_stale(
        fake_builder: FakeBuilder, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The images file pairs each image with the profile it was built from, not with a later read
    of the folder: an edit meanwhile (a package added to its environment) is caught."""
    profiles = tmp_path / "profiles"
    shutil.copytree(SHIPPED, profiles)
    edited = profiles / "envs" / "datascience-py39.yml"
    built_key = ""
    ensure = fake_builder.ensure

    def ensure_then_edit(request: Any) -> FakeBuild:
        nonlocal built_key
        if request.env_name == "datascience-cpu":  # an admin edits it while the builds run
            built_key = request.spec.key()
            edited.write_text(edited.read_text().replace("  - pip\n", "  - pip\n  - scipy\n", 1))
        return ensure(request)

    fake_builder.ensure = ensure_then_edit  # type: ignore[method-assign]
    images = tmp_path / "images.yaml"
    assert cli.main(["build", "--push", "--profiles", str(profiles), "--images", str(images)]) == 0
    recorded = yaml.safe_load(images.read_text())["images"]
    assert recorded["datascience-cpu"]["spec"] == built_key  # what was built, not the file read after
    capsys.readouterr()
    assert cli.main(["export", "kubespawner", "--profiles", str(profiles), "--images", str(images),
                     "--gpu-product", "NVIDIA-A100-SXM4-80GB", "-o", str(tmp_path / "values.yaml")]) == 1
    assert "datascience-cpu: the profile's environment changed since" in capsys.readouterr().err


def test_a_renamed_profile_exports_its_pushed_image_under_the_new_name(tmp_path: Path):
    """The kernel's name is not in the image: a new display_name needs no new push (the pod's
    environment carries it), but an entry of an older release, whose image held it, does."""
    profiles = load()
    images = pushed(profiles)
    renamed = [dataclasses.replace(p, display_name=p.display_name + " (2026)") for p in profiles]
    exported = KubernetesExport(gpu_products=["NVIDIA-A100-SXM4-80GB"]).export(renamed, images).profile_list
    for entry, profile in zip(exported, renamed):
        override = entry["kubespawner_override"]
        assert override["image"] == pinned(profile)
        assert override["environment"] == {KERNEL_DISPLAY_NAME_VARIABLE: profile.display_name}
    images.entries[profiles[0].slug]["kernel"] = profiles[0].display_name  # as an older release wrote it
    with pytest.raises(ExportError, match=r"display_name \(its kernel's name in that image\) changed since"):
        KubernetesExport(gpu_products=["NVIDIA-A100-SXM4-80GB"]).export(renamed, images)


def test_a_failed_push_fails_its_row_and_keeps_the_earlier_image(fake_builder: FakeBuilder, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]):
    images = tmp_path / "images.yaml"
    earlier = PushedImages()
    earlier.set("pytorch-gpu", f"{REGISTRY}:old@sha256:{'2' * 64}")
    earlier.write(images)
    fake_builder.refuse = "pytorch-gpu"
    assert cli.main(["build", "--push", "--profiles", str(SHIPPED), "--images", str(images)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: " in out and "push of condaspawner-env:" in out and "registry unreachable" in out
    recorded = yaml.safe_load(images.read_text())["images"]
    assert sorted(recorded) == ["datascience-cpu", "dl-course-hw3", "pytorch-gpu", "vision-lab-2gpu"]
    assert recorded["pytorch-gpu"] == {"image": f"{REGISTRY}:old@sha256:{'2' * 64}"}


def test_build_push_says_why_it_cannot_push_before_building(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(cli, "_builder", lambda args, config: pytest.fail("nothing may be built"))
    monkeypatch.setattr(ImageBuilder, "registry", "", raising=False)
    assert cli.main(["build", "--push", "--profiles", str(SHIPPED)]) == 1
    assert capsys.readouterr().err == 'error: cannot push: no registry to push to: set c.ImageBuilder.registry = ' \
                                      '"registry.example.edu/condaspawner-env"\n'


@pytest.mark.parametrize("registry", ["registry.example:5000", "Registry.Example.ORG", "[fd00::1]:5000",
                                      "10.0.0.2:5000/lab"])
def test_a_pinned_reference_may_name_any_registry_host_docker_accepts(registry):
    """Docker's reference grammar lets the host hold capitals and be an IPv6 address; the
    repository path stays lower case, and a digest is always needed."""
    digest = "@sha256:" + "a" * 64
    assert PINNED_REFERENCE.match(f"{registry}/envs:key{digest}")
    assert not PINNED_REFERENCE.match(f"{registry}/Envs:key{digest}")
    assert not PINNED_REFERENCE.match(f"{registry}/envs:key")
