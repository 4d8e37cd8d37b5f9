"""Profiles: loading, validation of every field, access rules, and the shipped examples."""

from __future__ import annotations

from pathlib import Path

import pytest
from traitlets.config import Config

from jupyterhub_condaspawner.profiles import ProfileCatalog, ProfileError, slugify

REPO = Path(__file__).resolve().parents[1]
ENV = "channels: [conda-forge]\ndependencies: [python=3.9, numpy]\n"


def write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


def load(directory: Path) -> ProfileCatalog:
    catalog = ProfileCatalog(profiles_dir=str(directory))
    catalog.load()
    return catalog


def problems(directory: Path) -> list[str]:
    with pytest.raises(ProfileError) as info:
        load(directory)
    return info.value.problems


def test_shipped_examples_load():
    catalog = load(REPO / "profiles")
    by_slug = {p.slug: p for p in catalog.profiles}
    assert set(by_slug) == {"datascience-cpu", "pytorch-gpu", "dl-course-hw3", "vision-lab-2gpu"}
    cpu, torch, homework, lab = (by_slug[s] for s in ("datascience-cpu", "pytorch-gpu", "dl-course-hw3", "vision-lab-2gpu"))
    assert cpu.gpus == 0 and cpu.default and "python 3.9.*" in cpu.environment.conda
    assert torch.gpus == 1 and torch.cuda == "11.8" and "pytorch-cuda 11.8.*" in torch.environment.conda
    assert torch.gpu_idle_timeout == 30 and lab.gpu_idle_timeout == 120
    assert homework.allowed_groups == ("dl-course",)
    assert homework.environment_source.endswith("profiles/envs/dl-course-hw3.yml")
    assert lab.gpus == 2 and lab.gpu_model == "*A100*" and lab.environment_source == "inline"
    assert lab.environment.pip == ("timm>=0.9", "wandb")


def test_fields_are_typed(tmp_path):
    write(tmp_path, {
        "a.yaml": "display_name: Big GPU box\nenvironment: envs/env.yml\ngpus: 4\ncpu_limit: 7.5\n"
                  "mem_limit: 64G\ncuda: '12.4'\nallowed_users: [ann]\n",
        "envs/env.yml": ENV,
    })
    profile = load(tmp_path).get("big-gpu-box")
    assert (profile.gpus, profile.cpu_limit, profile.mem_limit, profile.cuda) == (4, 7.5, 64 * 1024**3, "12.4")
    assert profile.allowed_users == ("ann",) and not profile.allow_custom_environment


def test_gpu_idle_timeout_is_minutes_on_gpu_profiles_only(tmp_path):
    write(tmp_path, {
        "a.yaml": "display_name: Culled\nenvironment: envs/env.yml\ngpus: 1\ngpu_idle_timeout: 45\n",
        "b.yaml": "display_name: Never culled\nenvironment: envs/env.yml\ngpus: 1\ngpu_idle_timeout: 0\n",
        "c.yaml": "display_name: Default\nenvironment: envs/env.yml\ngpus: 1\n",
        "envs/env.yml": ENV,
    })
    catalog = load(tmp_path)
    assert [catalog.get(slug).gpu_idle_timeout for slug in ("culled", "never-culled", "default")] == [45.0, 0.0, None]
    write(tmp_path, {
        "a.yaml": "display_name: CPU\nenvironment: envs/env.yml\ngpu_idle_timeout: 30\n",
        "b.yaml": "display_name: Negative\nenvironment: envs/env.yml\ngpus: 1\ngpu_idle_timeout: -5\n",
        "c.yaml": "display_name: Text\nenvironment: envs/env.yml\ngpus: 1\ngpu_idle_timeout: 30m\n",
    })
    found = problems(tmp_path)
    assert any(p.startswith(str(tmp_path / "a.yaml") + ": gpu_idle_timeout: only GPU profiles") for p in found), found
    assert any(p.startswith(str(tmp_path / "b.yaml") + ": gpu_idle_timeout: must be a number of minutes") for p in found)
    assert any(p.startswith(str(tmp_path / "c.yaml") + ": gpu_idle_timeout: must be a number of minutes") for p in found)


def test_every_problem_of_every_file_is_reported_at_once(tmp_path):
    write(tmp_path, {
        "bad1.yaml": "display_name: One\nenvironment: missing.yml\ngpus: -1\nmem_limit: lots\n",
        "bad2.yaml": "description: no name\nenvironmnet: envs/env.yml\ncuda: 12.1\n",
        "bad3.yaml": "- not a mapping\n",
        "bad4.yaml": "display_name: Four\nenvironment: envs/env.yml\ngpu_model: '*A100*'\nslug: Not_A_Slug\n",
        "good.yaml": "display_name: Fine\nenvironment: envs/env.yml\n",
        "envs/env.yml": ENV,
    })
    found = problems(tmp_path)
    expected = [
        "bad1.yaml: gpus: must be a whole number from 0 to 64, not -1",
        "bad1.yaml: mem_limit: 'lots' is not a size",
        "bad1.yaml: environment: missing.yml: cannot read (No such file or directory)",
        "bad2.yaml: unknown field 'environmnet' (did you mean 'environment'?)",
        "bad2.yaml: cuda: write the version as quoted text",
        "bad2.yaml: display_name: required",
        "bad2.yaml: environment: required unless allow_custom_environment is true",
        "bad3.yaml: must be a mapping of profile fields",
        "bad4.yaml: gpu_model: set gpus to 1 or more",
        "bad4.yaml: slug: 'Not_A_Slug' must be 1-63 lowercase letters",
    ]
    for fragment in expected:
        assert any(fragment in problem for problem in found), (fragment, found)
    assert not any("good.yaml" in problem for problem in found)
    assert len(found) == len(expected)


def test_a_kubespawner_profile_list_entry_says_where_its_limits_go(tmp_path):
    write(tmp_path, {
        "k.yaml": "display_name: K\nenvironment: envs/env.yml\nkubespawner_override: {cpu_limit: 2}\n",
        "envs/env.yml": ENV,
    })
    (found,) = problems(tmp_path)
    assert found.endswith("k.yaml: unknown field 'kubespawner_override' (KubeSpawner's, not read here: write its "
                          "cpu_limit, mem_limit, gpus ... at the profile's top level)"), found


def test_a_missing_relative_profiles_dir_names_the_folder_it_looked_in_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (found,) = problems(Path("profiles"))
    assert found == (f"profiles: profiles directory not found (relative to the current folder: {tmp_path / 'profiles'}): "
                     "set c.ProfileCatalog.profiles_dir to the folder of the profile files")


def test_a_pasted_kubespawner_profile_list_is_told_to_be_split_into_files(tmp_path):
    # An instructor coming from Zero to JupyterHub pastes singleuser.profileList into one file.
    write(tmp_path, {"course.yaml": "- display_name: CS101 HW1\n  environment: envs/e.yml\n"
                                    "- display_name: CS101 HW2\n  environment: envs/e.yml\n", "envs/e.yml": ENV})
    assert problems(tmp_path) == [f"{tmp_path / 'course.yaml'}: a list of 2 profiles (KubeSpawner's profile_list): "
                                  "write one profile per file, each a mapping of its fields"]


def test_problems_show_values_as_yaml_read_them(tmp_path):
    # 'not True' / "not 'true'" for either of `default: yes` and `default: "true"` told the admin nothing.
    write(tmp_path, {
        "a.yaml": 'display_name: A\nenvironment: envs/env.yml\ndefault: "true"\ngpus: "1"\ncpu_limit: yes\n',
        "b.yaml": "display_name: B\nenvironment: envs/env.yml\ngpus: 1.5\nallow_custom_environment: no way\n",
        "c.yaml": "display_name: C\nenvironment: envs/env.yml\ngpus: 1\ncuda: 12\n",
        "envs/env.yml": ENV,
    })
    found = {problem.removeprefix(f"{tmp_path}/") for problem in problems(tmp_path)}
    assert found == {
        "a.yaml: default: must be true or false, not the text 'true' (write it without quotes)",
        "a.yaml: gpus: must be a whole number from 0 to 64, not the text '1' (write it without quotes)",
        "a.yaml: cpu_limit: must be a positive number of CPUs, not true",
        "b.yaml: gpus: must be a whole number from 0 to 64, not 1.5",
        "b.yaml: allow_custom_environment: must be true or false, not the text 'no way'",
        'c.yaml: cuda: write the version as quoted text (cuda: "12")',
    }


@pytest.mark.parametrize("field, written", [("cpu_limit", ".nan"), ("cpu_limit", ".inf"),
                                            ("gpu_idle_timeout", ".nan"), ("gpu_idle_timeout", ".inf")])
def test_yaml_not_a_numbers_are_refused_not_taken_as_no_limit(tmp_path, field, written):
    """YAML's .nan compares false with everything: a culler never found the GPU idle long enough, and a
    CPU limit passed every check; .inf is no limit in disguise. Each is one line naming the field."""
    write(tmp_path, {"p.yaml": f"display_name: P\nenvironment: envs/env.yml\ngpus: 1\n{field}: {written}\n",
                     "envs/env.yml": ENV})
    (problem,) = problems(tmp_path)
    assert problem.startswith(f"{tmp_path}/p.yaml: {field}: must be a ") and "\n" not in problem, problem


@pytest.mark.parametrize("written, reason", [
    ("yes", "true is not a size such as 8G, 512M or a number of bytes"),  # ByteSpecification: 1 byte
    ("1.5", "1.5 is not a size such as 8G, 512M or a number of bytes"),  # ... and 1 byte
    ("2048", "2048 is under Docker's minimum of 6M (a bare number is bytes: write 2G, 512M)"),
])
def test_mem_limit_docker_could_never_apply_is_refused(tmp_path, written, reason):
    write(tmp_path, {"p.yaml": f"display_name: P\nenvironment: envs/env.yml\nmem_limit: {written}\n", "envs/env.yml": ENV})
    assert problems(tmp_path) == [f"{tmp_path}/p.yaml: mem_limit: {reason}"]
    write(tmp_path, {"p.yaml": "display_name: P\nenvironment: envs/env.yml\nmem_limit: 6M\n"})
    assert load(tmp_path).get("p").mem_limit == 6 * 1024**2


def test_environment_errors_name_file_field_and_line(tmp_path):
    write(tmp_path, {
        "p.yaml": "display_name: P\nenvironment: envs/e.yml\n",
        "envs/e.yml": "channels: [conda-forge]\ndependencies:\n  - pip:\n    - -e .\n",
    })
    (problem,) = problems(tmp_path)
    assert problem.startswith(f"{tmp_path}/p.yaml: environment: envs/e.yml: dependencies[0].pip[0] (line 4): ")
    assert "pip options" in problem


def test_inline_environment_is_validated_too(tmp_path):
    write(tmp_path, {"p.yaml": "display_name: P\nenvironment:\n  channels: ['https://evil/x']\n  dependencies: [a]\n"})
    (problem,) = problems(tmp_path)
    assert "environment: inline: channels[0]" in problem and "is a URL or a path" in problem


def test_spec_policy_from_config_applies_to_profiles(tmp_path):
    write(tmp_path, {"p.yaml": "display_name: P\nenvironment: envs/e.yml\n", "envs/e.yml": "channels: [my-lab]\ndependencies: [a]\n"})
    assert "not an allowed channel" in problems(tmp_path)[0]
    config = Config()
    config.ProfileCatalog.profiles_dir = str(tmp_path)
    config.SpecPolicy.allowed_channels = ["my-lab"]
    catalog = ProfileCatalog(config=config)
    assert catalog.load()[0].environment.channels == ("my-lab",)


def test_custom_environment_only_profile_needs_no_environment(tmp_path):
    write(tmp_path, {"p.yaml": "display_name: Bring your own, 1 GPU\ngpus: 1\nallow_custom_environment: true\n"})
    profile = load(tmp_path).profiles[0]
    assert profile.environment is None and profile.slug == "bring-your-own-1-gpu"


def test_duplicate_slugs_and_two_defaults_are_reported(tmp_path):
    write(tmp_path, {
        "a.yaml": "display_name: Same\nenvironment: envs/e.yml\ndefault: true\n",
        "b.yaml": "display_name: same!\nenvironment: envs/e.yml\ndefault: true\n",
        "envs/e.yml": ENV,
    })
    found = problems(tmp_path)
    assert any("b.yaml: slug: 'same' is also used by" in p for p in found)
    assert any("more than one profile is the default" in p for p in found)


def test_a_field_set_twice_is_refused_not_the_last_one_taken(tmp_path):
    """YAML keeps the last of two equal keys: an `allowed_groups: []` appended below a course's
    restriction would open its profile to everyone without a word."""
    write(tmp_path, {
        "hw.yaml": "display_name: Homework\nenvironment: envs/e.yml\nallowed_groups: [dl-course]\n"
                   "mem_limit: 2G\nallowed_groups: []\n",
        "gpu.yaml": "display_name: GPU\nenvironment: envs/e.yml\nkubespawner_override:\n  mem_limit: 1G\n"
                    "  mem_limit: 8G\n",
        # `<<` merges override keys as meant, also when a merged mapping is used again by an alias
        "merged.yaml": "a: &base {mem_limit: 1G, cpu_limit: 1}\nb: {<<: &mid {<<: *base, cpu_limit: 2}}\n"
                       "c: *mid\nd: {<<: *base, <<: *mid}\n",
        "bools.yaml": "display_name: B\nenvironment: envs/e.yml\nkubespawner_override: {yes: 1, true: 2}\n",
        "envs/e.yml": ENV,
    })
    found = problems(tmp_path)
    assert f"{tmp_path / 'hw.yaml'}: line 5: 'allowed_groups' is set twice in one mapping (YAML would keep the " \
           "last one): keep one" in found
    assert any(p.startswith(f"{tmp_path / 'gpu.yaml'}: line 5: 'mem_limit' is set twice") for p in found)
    assert any(p.startswith(f"{tmp_path / 'bools.yaml'}: line 3: 'true' is set twice") for p in found)  # both True
    assert not any("merged.yaml" in p and "set twice" in p for p in found)


def test_environment_file_among_profiles_gets_a_hint(tmp_path):
    write(tmp_path, {"env.yml": ENV})
    assert "looks like an environment.yml; keep those in a subfolder" in problems(tmp_path)[0]


def test_missing_or_empty_directory(tmp_path):
    assert "profiles directory not found" in problems(tmp_path / "nope")[0]
    assert "no profile files" in problems(tmp_path)[0]


def test_access_rules_visibility_and_default(tmp_path):
    write(tmp_path, {
        "1-open.yaml": "display_name: Open\nenvironment: envs/e.yml\n",
        "2-course.yaml": "display_name: Course\nenvironment: envs/e.yml\nallowed_groups: [course]\ndefault: true\n",
        "3-lab.yaml": "display_name: Lab\nenvironment: envs/e.yml\nallowed_groups: [lab]\nallowed_users: [pi]\n",
        "envs/e.yml": ENV,
    })
    catalog = load(tmp_path)
    slugs = lambda profiles: [p.slug for p in profiles]  # noqa: E731
    assert slugs(catalog.visible_to("stranger")) == ["open"]
    assert slugs(catalog.visible_to("student", ["course"])) == ["open", "course"]
    assert slugs(catalog.visible_to("pi")) == ["open", "lab"]
    assert catalog.default_for("student", ["course"]).slug == "course"
    assert catalog.default_for("stranger").slug == "open"
    assert not catalog.get("course").allows("stranger", ["lab"])
    with pytest.raises(KeyError):
        catalog.get("missing")


def test_allowed_users_are_read_through_the_hubs_name_normalisation(tmp_path):
    # JupyterHub lower-cases user names (Authenticator.normalize_username) and reads its own
    # allowed_users through it: a course roster's "TA-Jones" is the hub user "ta-jones".
    write(tmp_path, {
        "1-ta.yaml": "display_name: TA\nenvironment: envs/e.yml\nallowed_users: [TA-Jones]\n",
        "envs/e.yml": ENV,
    })
    catalog = load(tmp_path)
    assert [p.slug for p in catalog.visible_to("ta-jones", [], str.lower)] == ["ta"]
    assert catalog.default_for("ta-jones", [], str.lower).slug == "ta"
    assert not catalog.get("ta").allows("ta-jones")  # without the hub's normalisation: exact names
    assert not catalog.get("ta").allows("student", [], str.lower)


def test_profiles_are_ordered_by_file_name(tmp_path):
    write(tmp_path, {"b.yaml": "display_name: B\nenvironment: envs/e.yml\n", "a.yml": "display_name: A\nenvironment: envs/e.yml\n", "envs/e.yml": ENV})
    assert [p.slug for p in load(tmp_path).profiles] == ["a", "b"]


def test_slugify():
    assert slugify("PyTorch 2.0 on 1 GPU (CUDA 11.8)") == "pytorch-2-0-on-1-gpu-cuda-11-8"
    assert len(slugify("x" * 100)) == 63


def test_reload_if_changed_picks_up_edits_and_keeps_the_old_profiles_on_errors(tmp_path):
    write(tmp_path, {"a.yaml": "display_name: A\nenvironment: envs/e.yml\n", "envs/e.yml": ENV})
    catalog = load(tmp_path)
    assert catalog.reload_if_changed() == []
    write(tmp_path, {"b.yaml": "display_name: B\nenvironment: envs/e.yml\n"})
    assert catalog.reload_if_changed() == []
    assert [p.slug for p in catalog.profiles] == ["a", "b"]
    write(tmp_path, {"c.yaml": "display_name: C\ngpus: lots\n"})
    problems = catalog.reload_if_changed()
    assert any("c.yaml: gpus:" in problem for problem in problems)
    assert [p.slug for p in catalog.profiles] == ["a", "b"]  # the last good profiles stay
    assert catalog.reload_if_changed() == []  # reported once


def test_an_environment_file_outside_the_profiles_folder_is_watched_too(tmp_path):
    # environment: ../course-repo/environment.yml (the course's own repository): an instructor's
    # edit there must reach the hub's next start, as `condaspawner build` reads it.
    profiles, repo = tmp_path / "profiles", tmp_path / "course-repo"
    write(repo, {"environment.yml": "channels: [conda-forge]\ndependencies: [python=3.9, cs-alpha=1.0]\n"})
    write(profiles, {"hw.yaml": "display_name: HW\nenvironment: ../course-repo/environment.yml\n"})
    catalog = ProfileCatalog(profiles_dir=str(profiles))
    assert catalog.reload_if_changed() == []
    assert "cs-alpha 1.0.*" in catalog.get("hw").environment.conda
    write(repo, {"environment.yml": "channels: [conda-forge]\ndependencies: [python=3.9, cs-alpha=2.0]  # week 5\n"})
    assert catalog.reload_if_changed() == []
    assert "cs-alpha 2.0.*" in catalog.get("hw").environment.conda
    write(repo, {"environment.yml": "channels: [conda-forge]\ndependancies: [python=3.9]\n"})
    problems = catalog.reload_if_changed()
    assert any("hw.yaml: environment: ../course-repo/environment.yml: " in problem for problem in problems), problems
    assert "cs-alpha 2.0.*" in catalog.get("hw").environment.conda  # the last good one stays
    assert catalog.reload_if_changed() == []  # reported once
    write(repo, {"environment.yml": "channels: [conda-forge]\ndependencies: [python=3.9, cs-alpha=1.1]\n"})
    assert catalog.reload_if_changed() == []
    assert "cs-alpha 1.1.*" in catalog.get("hw").environment.conda


def test_a_hub_started_on_a_broken_file_serves_the_others_and_says_where_the_yaml_breaks(tmp_path):
    write(tmp_path, {"a.yaml": "display_name: A\nenvironment: envs/e.yml\n", "envs/e.yml": ENV,
                     "b.yaml": 'display_name: "B\nenvironment: envs/e.yml\n',  # a quote never closed
                     "c.yaml": "display_name: C\nenvironment envs/e.yml\n"})  # a ':' missing
    catalog = ProfileCatalog(profiles_dir=str(tmp_path))
    problems = catalog.reload_if_changed()
    assert [p.slug for p in catalog.profiles] == ["a"]
    assert problems == [
        f"{tmp_path / 'b.yaml'}: invalid YAML at line 1, column 15: the quote opened here is never closed "
        "(found unexpected end of stream at line 3)",
        f"{tmp_path / 'c.yaml'}: invalid YAML at line 2, column 1: 'environment envs/e.yml' needs a ':' after it "
        "(expected 'key: value', or '- item' under a key)",
    ]
    assert catalog.reload_if_changed() == []  # reported once


def test_a_hub_started_on_conflicting_files_serves_none_of_them(tmp_path):
    write(tmp_path, {"a.yaml": "display_name: A\nslug: same\nenvironment: envs/e.yml\n", "envs/e.yml": ENV,
                     "b.yaml": "display_name: B\nslug: same\nenvironment: envs/e.yml\n"})
    with pytest.raises(ProfileError, match="slug: 'same' is also used by"):
        ProfileCatalog(profiles_dir=str(tmp_path)).reload_if_changed()


def test_a_hub_started_with_one_courses_copied_file_serves_every_other_course(tmp_path):
    # The instructor copied hw2's file for hw3 and left its slug: after a restart, hw2 and hw3 are
    # ambiguous (both left out), but the other courses' profiles are served.
    write(tmp_path, {"hw2.yaml": "display_name: HW2\nslug: cs101-hw\nenvironment: envs/e.yml\n", "envs/e.yml": ENV,
                     "hw3.yaml": "display_name: HW3\nslug: cs101-hw\nenvironment: envs/e.yml\n",
                     "other.yaml": "display_name: Stats\nslug: stats200\nenvironment: envs/e.yml\n"})
    catalog = ProfileCatalog(profiles_dir=str(tmp_path))
    problems = catalog.reload_if_changed()
    assert any("slug: 'cs101-hw' is also used by" in problem for problem in problems), problems
    assert [profile.slug for profile in catalog.profiles] == ["stats200"]
    assert catalog.reload_if_changed() == []  # reported once


def test_a_hub_started_with_two_defaults_serves_them_with_neither_the_default(tmp_path):
    write(tmp_path, {"a.yaml": "display_name: A\nenvironment: envs/e.yml\ndefault: true\n", "envs/e.yml": ENV,
                     "b.yaml": "display_name: B\nenvironment: envs/e.yml\ndefault: true\n"})
    catalog = ProfileCatalog(profiles_dir=str(tmp_path))
    assert any(problem.startswith("default: more than one profile is the default") for problem in catalog.reload_if_changed())
    assert [(profile.slug, profile.default) for profile in catalog.profiles] == [("a", False), ("b", False)]
    assert catalog.default_for("anyone").slug == "a"  # the first visible, as with no default


def test_reload_if_changed_loads_the_first_time_and_reports_a_missing_folder(tmp_path):
    catalog = ProfileCatalog(profiles_dir=str(tmp_path / "nope"))
    with pytest.raises(ProfileError, match="profiles directory not found"):
        catalog.reload_if_changed()
    write(tmp_path, {"a.yaml": "display_name: A\nallow_custom_environment: true\n"})
    catalog.profiles_dir = str(tmp_path)
    assert catalog.reload_if_changed() == [] and [p.slug for p in catalog.profiles] == ["a"]


def test_the_readme_example_and_the_setting_help_name_every_profile_field():
    """An admin writes profiles from the README's example and `profiles_dir`'s help: a field
    the parser reads but neither names is one nobody uses."""
    from jupyterhub_condaspawner.profiles import _FIELDS

    readme = (REPO / "README.md").read_text()
    start = readme.index("\n## Profiles\n")
    example = readme[readme.index("```yaml\n", start):readme.index("\n```", readme.index("```yaml\n", start))]
    written = {line.split(":", 1)[0] for line in example.splitlines()[1:] if line and not line.startswith(" ")}
    assert written == set(_FIELDS)
    help_text = ProfileCatalog.class_traits()["profiles_dir"].help
    assert all(f"`{field}`" in help_text for field in _FIELDS), help_text


def test_demo_profiles_load():
    # The README's demo section names these four; the demo's PyTorch profile reads the shipped env file.
    catalog = load(REPO / "demo" / "profiles")
    assert [p.slug for p in catalog.profiles] == ["python39", "datascience", "course-hw1", "pytorch-gpu"]
    assert catalog.get("course-hw1").allowed_groups == ("dl-course",) and catalog.get("python39").default
