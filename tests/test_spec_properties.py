"""Property tests: formatting never changes the key; meaning always does."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jupyterhub_condaspawner.spec import DEFAULT_CHANNELS, SpecPolicy
from jupyterhub_condaspawner.specreader import is_windows_only

POLICY = SpecPolicy()
# Package names the spec check takes: not Windows-only ones (`vc`, `ucrt`: a Windows export is refused).
names = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True).filter(lambda name: not is_windows_only(name))
versions = st.tuples(st.integers(0, 30), st.integers(0, 30))
# Three spellings of the same conda constraint "major.minor.*".
CONDA_SPELLINGS = ("{n}={a}.{b}", "{n} {a}.{b}.*", "{n}={a}.{b}.*")
# pip names that packaging canonicalises to the same project.
PIP_SPELLINGS = ("{n}", "{N}", "{n_}", "{n_dot}")


@st.composite
def environments(draw):
    conda_names = draw(st.lists(names, min_size=1, max_size=8, unique=True))
    pip_names = draw(st.lists(names.map(lambda n: "py-" + n), max_size=5, unique=True))
    return {
        "channels": draw(st.lists(st.sampled_from(DEFAULT_CHANNELS), min_size=1, max_size=4, unique=True)),
        "conda": {name: draw(versions) for name in conda_names},
        "pip": {name: draw(versions) for name in pip_names},
    }


@st.composite
def renderings(draw, env):
    """The same environment written as a person might: any order, spelling, indent, comments."""
    indent = " " * draw(st.integers(0, 4))
    comment = draw(st.booleans())
    lines = []
    if draw(st.booleans()):
        lines.append(f"name: {draw(names)}")
    lines.append("channels:")
    lines += [f"{indent}- {channel}" for channel in env["channels"]]
    conda_lines = []
    for name, (a, b) in env["conda"].items():
        spelling = draw(st.sampled_from(CONDA_SPELLINGS))
        conda_lines.append(spelling.format(n=name, a=a, b=b) + ("  # pinned" if comment else ""))
    conda_lines = draw(st.permutations(conda_lines))
    lines.append("dependencies:")
    lines += [f"{indent}- {line}" for line in conda_lines]
    if env["pip"]:
        pip_lines = []
        for name, (a, b) in env["pip"].items():
            spelled = draw(st.sampled_from(PIP_SPELLINGS)).format(
                n=name, N=name.upper(), n_=name.replace("-", "_"), n_dot=name.replace("-", ".")
            )
            pip_lines.append(f"{spelled}=={a}.{b}")
        lines.append(f"{indent}- pip:")
        lines += [f"{indent}    - {line}" for line in draw(st.permutations(pip_lines))]
    if comment:
        lines.insert(draw(st.integers(0, len(lines))), "# a comment line")
    if draw(st.booleans()):
        lines.append("prefix: /home/someone/miniconda3/envs/x")
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + newline


@settings(max_examples=150, deadline=None)
@given(data=st.data(), env=environments())
def test_formatting_order_and_spelling_keep_the_key(data, env):
    first = POLICY.parse(data.draw(renderings(env)))
    second = POLICY.parse(data.draw(renderings(env)))
    assert first == second
    assert first.key() == second.key()


@settings(max_examples=100, deadline=None)
@given(data=st.data(), env=environments())
def test_changing_channel_order_changes_the_key(data, env):
    if len(env["channels"]) < 2:
        env["channels"].append("conda-forge" if env["channels"] != ["conda-forge"] else "bioconda")
    reordered = dict(env, channels=list(reversed(env["channels"])))
    assert POLICY.parse(data.draw(renderings(env))).key() != POLICY.parse(data.draw(renderings(reordered))).key()


@settings(max_examples=100, deadline=None)
@given(data=st.data(), env=environments())
def test_changing_a_version_changes_the_key(data, env):
    section = data.draw(st.sampled_from([s for s in ("conda", "pip") if env[s]]))
    name = data.draw(st.sampled_from(sorted(env[section])))
    a, b = env[section][name]
    changed = dict(env, **{section: dict(env[section], **{name: (a, b + 1)})})
    assert POLICY.parse(data.draw(renderings(env))).key() != POLICY.parse(data.draw(renderings(changed))).key()


@settings(max_examples=100, deadline=None)
@given(data=st.data(), env=environments(), extra=names)
def test_adding_a_package_changes_the_key(data, env, extra):
    extra = "zz" + extra  # not already in the environment
    added = dict(env, conda=dict(env["conda"], **{extra: (1, 0)}))
    assert POLICY.parse(data.draw(renderings(env))).key() != POLICY.parse(data.draw(renderings(added))).key()
