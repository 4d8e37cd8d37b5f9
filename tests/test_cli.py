"""The condaspawner command, run as a real subprocess."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from test_spec import HOSTILE

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).parent / "corpus"


def condaspawner(*args: str, stdin: bytes = b"", cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyterhub_condaspawner.cli", *args],
        input=stdin, capture_output=True, cwd=cwd, timeout=120,
    )


def test_validate_prints_ok_and_key_per_file():
    files = sorted(str(p) for p in (CORPUS / "good").iterdir())
    result = condaspawner("validate", *files)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(files)
    for name, line in zip(files, lines):
        line, _, note = line.partition(" (ignored: ")  # unknown top-level keys
        prefix, key = line.rsplit(" ", 1)
        assert prefix == f"{name}: ok" and len(key) == 64 and int(key, 16) >= 0
        assert not note or name.endswith(("-keys.yml", "-ignored.yml"))


def test_every_hostile_file_gets_error_lines_and_no_traceback():
    files = sorted(str(p) for p in (CORPUS / "hostile").iterdir())
    result = condaspawner("validate", *files)
    assert result.returncode == 1
    assert result.stderr == b""
    lines = result.stdout.decode().splitlines()
    by_file: dict[str, list[str]] = {}
    for line in lines:
        name, _, rest = line.partition(": error: ")
        by_file.setdefault(name, []).append(rest)
    assert list(by_file) == files  # in order, each file at least one line
    for name, problems in by_file.items():
        assert HOSTILE[Path(name).name] in problems[0]
        assert "Traceback" not in "".join(problems)


def test_validate_prints_one_error_line_per_problem():
    hostile = str(CORPUS / "hostile" / "many-problems.yml")
    lines = condaspawner("validate", hostile).stdout.decode().splitlines()
    assert [line.split(": ", 2)[1] for line in lines] == ["error"] * 4
    assert [line.split(": error: ")[1].split(":")[0] for line in lines] == [
        "channels[0] (line 3)", "channels[1] (line 4)", "channels[2] (line 5)", "dependencies[1].pip[0] (line 9)"]


def test_validate_caps_the_problems_it_prints(tmp_path):
    env = tmp_path / "env.yml"
    env.write_text("dependencies:\n" + "".join(f"  - bad{i}>>=1\n" for i in range(30)))
    config = tmp_path / "c.py"
    config.write_text("c = get_config()\nc.SpecPolicy.max_problems = 3\n")
    lines = condaspawner("validate", "--config", str(config), str(env)).stdout.decode().splitlines()
    assert len(lines) == 4 and lines[-1] == f"{env}: error: ... and 27 more problems"


def test_validate_names_the_ignored_keys():
    good = str(CORPUS / "good" / "conda-lock-keys.yml")
    result = condaspawner("validate", good)
    assert result.returncode == 0
    ok, key, note = result.stdout.decode().strip().removeprefix(f"{good}: ").split(" ", 2)
    assert ok == "ok" and len(key) == 64
    assert note == "(ignored: platforms, category, extras)"
    (entry,) = json.loads(condaspawner("validate", "--json", good).stdout)
    assert entry["notes"] == ["ignored: platforms, category, extras"]


def test_validate_notes_defaults_beside_nodefaults(tmp_path):
    env = tmp_path / "env.yml"
    env.write_text("channels: [defaults, nodefaults]\ndependencies: [numpy]\n")
    result = condaspawner("validate", str(env))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip().endswith(
        " (channels (line 1): lists both 'defaults' and 'nodefaults', which means \"not defaults\": 'defaults' is "
        "used all the same; remove the one you did not mean)")


def test_one_bad_file_makes_the_exit_status_nonzero():
    good = str(CORPUS / "good" / "variables.yml")
    result = condaspawner("validate", good, str(CORPUS / "hostile" / "empty.yml"))
    assert result.returncode == 1
    assert result.stdout.decode().splitlines()[0].startswith(f"{good}: ok ")


def test_missing_file_and_stdin():
    result = condaspawner("validate", "/nonexistent/env.yml")
    assert result.stdout.decode() == "/nonexistent/env.yml: error: cannot read file (No such file or directory)\n"
    result = condaspawner("validate", "-", stdin=b"dependencies: [numpy]\n")
    assert result.returncode == 0 and result.stdout.decode().startswith("-: ok ")


def test_validate_json_has_normalised_spec_and_key():
    good = str(CORPUS / "good" / "crlf-pip.yml")
    result = condaspawner("validate", "--json", good, str(CORPUS / "hostile" / "pip-editable.yml"))
    ok, bad = json.loads(result.stdout)
    assert ok["ok"] and ok["spec"]["pip"] == ["requests>=2.0"] and ok["spec"]["channels"] == ["conda-forge"]
    plain = condaspawner("validate", good).stdout.decode()
    assert plain.strip().endswith(ok["key"])
    assert not bad["ok"] and "pip options" in bad["error"] and bad["errors"] == [bad["error"]]


def test_validate_reads_limits_from_a_traitlets_config(tmp_path):
    config = tmp_path / "jupyterhub_config.py"
    config.write_text("c = get_config()\nc.SpecPolicy.allowed_channels = ['my-lab']\n")
    env = tmp_path / "env.yml"
    env.write_text("channels: [my-lab]\ndependencies: [numpy]\n")
    assert condaspawner("validate", str(env)).returncode == 1
    assert condaspawner("validate", "--config", str(config), str(env)).returncode == 0


def test_bad_config_is_one_error_line(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("c = get_config(\n")
    result = condaspawner("validate", "--config", str(config), str(CORPUS / "good" / "variables.yml"))
    assert result.returncode == 1
    assert result.stderr.decode().startswith("error: cannot load config")
    assert "Traceback" not in result.stderr.decode()
    missing = condaspawner("validate", "--config", str(tmp_path / "none.py"), "x")
    assert missing.stderr.decode().strip() == f"error: config file not found: {tmp_path / 'none.py'}"


def test_a_misspelled_setting_is_a_warning_and_a_wrong_type_one_error_line(tmp_path):
    env = str(CORPUS / "good" / "variables.yml")
    typo = tmp_path / "typo.py"
    typo.write_text("c = get_config()\nc.SpecPolicy.max_dependencie = 5\n")
    result = condaspawner("validate", "--config", str(typo), env)
    warning = result.stderr.decode()
    assert result.returncode == 0 and warning.startswith("warning: ") and warning.count("\n") == 1, warning
    assert "max_dependencie`" in warning and "max_dependencies" in warning  # the name, and the one it meant
    wrong = tmp_path / "wrong.py"
    wrong.write_text("c = get_config()\nc.SpecPolicy.max_dependencies = 'many'\n")
    result = condaspawner("validate", "--config", str(wrong), env)
    error = result.stderr.decode()
    assert result.returncode == 1 and error.startswith("error: a setting in the config: ") and "max_dependencies" in error
    assert error.count("\n") == 1 and "internal error" not in error and "Traceback" not in error


def test_profiles_lists_the_shipped_examples():
    result = condaspawner("profiles")
    assert result.returncode == 0, result.stdout
    out = result.stdout.decode()
    assert out.splitlines()[0].split() == ["SLUG", "NAME", "GPUS", "ACCESS", "SPEC", "KEY"]
    for slug in ("datascience-cpu *", "pytorch-gpu", "dl-course-hw3", "vision-lab-2gpu"):
        assert slug in out
    assert "@dl-course" in out and "2 *A100* cuda 12.1" in out


def test_profiles_notes_a_profile_over_the_per_user_gpu_quota(tmp_path):
    (tmp_path / "big.yaml").write_text('display_name: Big\nallow_custom_environment: true\ngpus: 4\ncuda: "12.1"\n')
    (tmp_path / "small.yaml").write_text('display_name: Small\nallow_custom_environment: true\ngpus: 2\ncuda: "12.1"\n')
    config = tmp_path / "c.py"
    config.write_text(f"c = get_config()\nc.ProfileCatalog.profiles_dir = {str(tmp_path)!r}\n"
                      "c.GpuAllocator.per_user_gpu_quota = 2\n")
    result = condaspawner("profiles", "--config", str(config))
    assert result.returncode == 0 and "big" in result.stdout.decode()
    assert result.stderr.decode().splitlines() == [
        "note: profile 'big' needs 4 GPUs, more than c.GpuAllocator.per_user_gpu_quota = 2: no one can start it "
        "(lower its gpus or raise the quota)"]


def test_profiles_json_and_config_dir(tmp_path):
    (tmp_path / "p.yaml").write_text("display_name: Mine\nallow_custom_environment: true\n")
    config = tmp_path / "c.py"
    config.write_text(f"c = get_config()\nc.ProfileCatalog.profiles_dir = {str(tmp_path)!r}\n")
    result = condaspawner("profiles", "--json", "--config", str(config))
    (profile,) = json.loads(result.stdout)
    assert profile["slug"] == "mine" and profile["key"] is None


def test_profiles_reports_all_problems(tmp_path):
    (tmp_path / "a.yaml").write_text("display_name: A\ngpus: many\n")
    (tmp_path / "b.yaml").write_text("displayname: B\n")
    result = condaspawner("profiles", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert all(line.startswith("error: ") for line in lines) and len(lines) == 5
    assert any("a.yaml: gpus:" in line for line in lines)
    assert any("b.yaml: unknown field 'displayname' (did you mean 'display_name'?)" in line for line in lines)


def test_the_gpus_command_runs_without_loading_the_solver(tmp_path):
    # A GPU node's admin runs `condaspawner gpus` to see its GPUs; the conda solver
    # (py-rattler, a native extension) has nothing to do with that and is not loaded.
    script = ("import sys; sys.modules['rattler'] = None\n"
              "from jupyterhub_condaspawner import cli\n"
              "sys.exit(cli.main(['gpus', '--json']))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=REPO, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["holders_known"] is False and isinstance(report["gpus"], list)


def test_every_command_line_the_readme_and_docs_show_parses():
    """A command copied from the README or docs/ names a real subcommand and real flags."""
    import re

    from jupyterhub_condaspawner.cli import build_parser

    shown = set()
    for path in (REPO / "README.md", REPO / "docs" / "kubernetes.md"):
        text = path.read_text().replace("\\\n", " ")  # a console line continued
        shown |= {match.group(1) for match in re.finditer(r"`(condaspawner [a-z][^`]*)`", text)}
        shown |= {match.group(1) for match in re.finditer(r"^\s*\$ (condaspawner [^#\n]*)", text, re.MULTILINE)}
    placeholders = {"KEY": "0123abcd", "FILE": "env.yml", "FILE...": "env.yml", "DIR": "profiles", "SLUG": "x"}
    parser = build_parser()
    checked = []
    for line in sorted(shown):
        words = [placeholders.get(word, word) for word in line.replace("[", " ").replace("]", " ").split()[1:]]
        if words[0] not in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
            continue  # "condaspawner does not ...", prose
        checked.append(words[0])
        if len(words) == 1:
            continue  # the command named in prose ("`condaspawner validate` says ..."): it exists
        try:
            parser.parse_args(words)
        except SystemExit:
            raise AssertionError(f"the docs show {line!r}, which the command refuses") from None
    assert {"validate", "profiles", "build", "ls", "gc", "lock", "log", "gpus", "export"} <= set(checked)


def test_every_option_of_every_command_says_what_it_does():
    import argparse

    from jupyterhub_condaspawner.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, command in commands.items():
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"condaspawner {name} {'/'.join(action.option_strings) or action.dest}: no help"


def test_validate_piped_into_a_pager_that_quits_is_no_internal_error():
    files = [str(CORPUS / "good" / "variables.yml")] * 2000
    reader = subprocess.run(f"{shlex.join([sys.executable, '-m', 'jupyterhub_condaspawner.cli', 'validate', *files])}"
                            " | head -n 1", shell=True, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert reader.stdout.count("\n") == 1
    assert "internal error" not in reader.stderr and "Traceback" not in reader.stderr


def test_a_broken_pipe_other_than_standard_output_stays_an_internal_error(monkeypatch, capsys):
    from jupyterhub_condaspawner import cli

    def handler(args, config):
        raise BrokenPipeError(32, "Broken pipe")  # as a write to the Docker daemon's socket would

    args = cli.build_parser().parse_args(["validate", "x.yml"])
    monkeypatch.setattr(args, "handler", handler)
    assert cli._run(args) == 2
    assert "error: internal error: BrokenPipeError" in capsys.readouterr().err


def test_a_file_past_the_size_limit_is_refused_without_being_read_whole(tmp_path):
    """`validate /dev/zero` (or a multi-GB file, or a stream) stops one byte past
    SpecPolicy.max_file_bytes: one line, no memory spent on the rest."""
    big = tmp_path / "big.yml"
    big.write_bytes(b"dependencies: [numpy]\n" + b"#" * (600 * 1024))
    result = condaspawner("validate", str(big), "/dev/zero", "-", stdin=b"#" * (300 * 1024))
    assert result.returncode == 1, result.stderr
    assert result.stdout.decode().splitlines() == [
        f"{big}: error: file is {big.stat().st_size} bytes, larger than the limit of 262144",
        "/dev/zero: error: file is larger than the limit of 262144 bytes",
        "-: error: file is larger than the limit of 262144 bytes",
    ]
