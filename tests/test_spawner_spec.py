"""A refused or noted environment.yml on the form and REST: every problem, and the notes.

A CondaSpawner in-process with a stand-in user (as in test_spawner_failures.py); nothing
here needs Docker: a refused spec never reaches the builder.
"""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub.auth import Authenticator
from jupyterhub.utils import format_exception
from stand_in_user import StandInUser
from test_spawner_failures import spawner_for

from jupyterhub_condaspawner.failures import StartFailure

CORPUS = Path(__file__).parent / "corpus"
MANY = (CORPUS / "hostile" / "many-problems.yml").read_text()
FIELDS = ("channels[0] (line 3)", "channels[1] (line 4)", "channels[2] (line 5)", "dependencies[1].pip[0] (line 9)")


def test_rest_refuses_a_spec_with_every_problem_in_one_line(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    with pytest.raises(StartFailure) as refusal:
        spawner.apply_choice({"profile": "py", "environment": MANY})
    message = refusal.value.message
    assert refusal.value.status_code == 400 and "\n" not in message
    assert message.startswith("environment.yml: 4 problems: channels[0] (line 3): 'my-own-channel' is not")
    assert all(field in message for field in FIELDS)
    assert message.endswith("URLs and version-control references are not allowed; name a package from the index")


def test_an_environment_key_without_its_environment_is_refused_not_ignored(tmp_path):
    # Shown in user_options: sent alone, the profile's own environment would start instead.
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    with pytest.raises(StartFailure) as refusal:
        spawner.apply_choice({"profile": "py", "environment_key": "0" * 64})
    assert refusal.value.status_code == 400
    assert refusal.value.message.startswith("'environment_key' is what the hub saves with an environment, not a choice")
    assert spawner.user_options == {}


def test_a_single_problem_keeps_its_one_line_form(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    with pytest.raises(StartFailure) as refusal:
        spawner.apply_choice({"profile": "py", "environment": "dependencies:\n - pip:\n   - -e .\n"})
    assert refusal.value.message.startswith("environment.yml: dependencies[0].pip[0] (line 3): '-e .': pip options")


async def test_the_form_lists_every_problem_escaped(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    text = MANY.replace("anaconda-fake", "<b>bold</b>")
    with pytest.raises(ValueError) as refusal:
        await spawner.options_from_form_data({"profile": ["py"], "environment_text": [text]})
    message, _ = format_exception(refusal.value)  # what JupyterHub's spawn page shows above the form
    assert message == "pasted environment.yml: 4 problems, listed under your environment.yml below"
    assert str(refusal.value).startswith("pasted environment.yml: 4 problems: channels[0] (line 3): ")
    form = await spawner.render_options_form()  # the form JupyterHub renders again
    box = form.split('data-testid="condaspawner-form-problems">')[1].split("</div>")[0]
    assert box.lstrip().startswith('<span data-testid="condaspawner-spec-problems">pasted environment.yml: '
                                   "4 problems:</span>")
    items = box.split('data-testid="condaspawner-spec-problem">')[1:]
    assert len(items) == 4
    assert all(field in item for field, item in zip(FIELDS, items))
    assert "<b>" not in form and "&lt;b&gt;bold&lt;/b&gt;" in box
    assert 'id="condaspawner-custom" open' in form  # the box is open, the pasted text in it
    assert "condaspawner-form-problems" not in await spawner.render_options_form()  # shown once


async def test_an_upload_with_problems_opens_the_box_with_its_list(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    with pytest.raises(ValueError):
        await spawner.options_from_form_data(
            {"profile": ["py"], "environment_file_file": [{"body": MANY.encode(), "filename": "mine.yml"}]})
    form = await spawner.render_options_form()
    assert 'id="condaspawner-custom" open' in form
    assert "mine.yml: 4 problems:" in form.split('data-testid="condaspawner-form-problems">')[1]


async def test_an_empty_uploaded_file_is_refused_not_taken_for_no_file(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    with pytest.raises(ValueError) as refusal:
        await spawner.options_from_form_data(
            {"profile": ["py"], "environment_file_file": [{"body": b"", "filename": "environment.yml"}]})
    assert str(refusal.value) == "environment.yml: the uploaded file is empty: choose it again, or paste its text"
    # No file chosen: the browser sends an empty part with no name; the profile's own environment.
    options = await spawner.options_from_form_data(
        {"profile": ["py"], "environment_file_file": [{"body": b"", "filename": ""}]})
    assert options == {"profile": "py"}


async def test_a_text_field_named_as_the_upload_is_refused_in_one_line(tmp_path):
    # JupyterHub passes a file part as "<name>_file": HTTPFile dicts; a text field of that name is a str.
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    with pytest.raises(ValueError) as refusal:
        await spawner.options_from_form_data({"profile": ["py"], "environment_file_file": ["dependencies: [numpy]"]})
    assert str(refusal.value) == "environment_file: must be a file chosen with the form's upload field"


async def test_the_form_shows_a_single_problem_as_its_one_line(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    with pytest.raises(ValueError) as refusal:
        await spawner.options_from_form_data({"profile": ["py"], "environment_text": ["channels: [default]\n"
                                                                                "dependencies: [numpy]\n"]})
    message, _ = format_exception(refusal.value)
    assert message == str(refusal.value)
    assert message.startswith("pasted environment.yml: channels[0] (line 1): 'default' is not an allowed channel "
                              "(did you mean 'defaults'?)")


async def test_an_upload_with_ignored_keys_is_accepted_and_noted_on_the_progress_page(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    upload = (CORPUS / "good" / "conda-lock-keys.yml").read_bytes()
    options = await spawner.options_from_form_data(
        {"profile": ["py"], "environment_file_file": [{"body": upload, "filename": "env.yml"}]})
    spawner.apply_choice(options)
    _, custom = spawner._choice
    assert custom is not None and custom.notes == ("ignored: platforms, category, extras",)
    assert "platforms" not in spawner.user_options["environment"]  # stored normalised


async def test_the_notes_are_the_first_progress_events(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent", ImageBuilder__docker_host="tcp://127.0.0.1:9")
    spawner.apply_choice({"profile": "py", "environment": (CORPUS / "good" / "conda-lock-keys.yml").read_text()})
    with pytest.raises(StartFailure):  # no daemon and no registry: refused before anything is built
        await spawner.start()
    messages = [event["message"] async for event in spawner.progress()]
    assert messages[0] == "Note: your environment.yml: ignored: platforms, category, extras"


async def test_an_indented_paste_gets_the_same_verdict_from_the_form_as_from_check_and_rest(tmp_path):
    """A file copied from an indented code block: every line indented alike is valid YAML, and the
    form parses it as pasted, as Check and the REST API do (stripping only its first line broke it)."""
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    pasted = "    channels: [conda-forge]\n    dependencies:\n      - python=3.9\n"
    assert spawner.services.policy.parse(pasted).conda == ("python 3.9.*",)  # what Check and REST parse
    options = await spawner.options_from_form_data({"profile": ["py"], "environment_text": [pasted]})
    spawner.apply_choice(options)
    _, custom = spawner._choice
    assert custom is not None and custom.conda == ("python 3.9.*",)
    blank = await spawner.options_from_form_data({"profile": ["py"], "environment_text": ["   \n"]})
    assert "environment" not in blank  # a box of spaces is an empty box: the profile's own environment


async def test_a_pasted_file_is_read_once_and_off_the_hubs_event_loop(tmp_path):
    """The form reads the paste, then JupyterHub applies the options: one parse, in a thread
    (a file at the size limit takes up to a second to read, and the hub serves everyone meanwhile).
    REST options are read when applied, before any await, so that a refusal answers the request."""
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    policy = spawner.services.policy
    reads: list[bool] = []
    real_parse = type(policy).parse

    def recording_parse(self, data, source=None):
        reads.append(threading.current_thread() is threading.main_thread())
        return real_parse(self, data, source)

    pasted = "channels: [conda-forge]\ndependencies:\n  - python=3.9\n"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(policy), "parse", recording_parse)
        options = await spawner.options_from_form_data({"profile": ["py"], "environment_text": [pasted]})
        await spawner._run_apply_user_options(options)
        assert reads == [False]
    _, custom = spawner._choice
    assert custom is not None and custom.conda == ("python 3.9.*",)


async def test_a_paste_over_the_size_limit_is_refused_and_not_sent_back_in_the_form(tmp_path):
    """The hub takes a 100 MB body: kept and rendered back into the form, it would cost
    seconds of the hub's event loop and a gigabyte of memory per submit."""
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    limit = spawner.services.policy.max_file_bytes
    pasted = "dependencies: [python]\n" + "#" * limit
    with pytest.raises(ValueError) as refusal:
        await spawner.options_from_form_data({"profile": ["py"], "environment_text": [pasted]})
    assert str(refusal.value) == f"pasted environment.yml: file is {len(pasted)} bytes, larger than the limit of {limit}"
    form = await spawner.render_options_form()
    assert "#" * 100 not in form and len(form) < limit


async def test_a_gpu_card_on_a_machine_without_gpus_says_it_cannot_start_here(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent", GpuInventory__static_gpus=[])
    form = await spawner.render_options_form()
    cards = {card.split('"', 1)[0]: card for card in form.split('for="profile-')[1:]}
    assert cards["gpu"].count('class="badge') == 1  # not "will build" beside the note
    assert '<span class="badge bg-secondary" title="this machine has no GPU">cannot start here</span>' in cards["gpu"]
    assert '<span class="text-danger">this machine has no GPU</span>' in cards["gpu"]
    assert "cannot start here" not in cards["py"] and "will build" in cards["py"]


async def test_a_gpu_card_this_host_could_never_serve_says_why_before_the_start(tmp_path):
    """A profile whose GPU model no GPU here is, whose CUDA the driver is too old for, or that wants
    more than the per-user quota: its start would be refused in one line; the card says so first."""
    spawner = spawner_for(tmp_path, "file:///nonexistent", GpuAllocator__per_user_gpu_quota=1,
                          GpuInventory__static_gpus=[{"uuid": f"GPU-{n}-{uuid.uuid4().hex[:8]}", "name": "NVIDIA A100",
                                                      "cuda_version": "12.4"} for n in range(2)])
    for slug, fields in {"h100": "gpus: 1\ngpu_model: '*H100*'", "cuda13": "gpus: 1\ncuda: '13.0'",
                         "pair": "gpus: 2", "a100": "gpus: 1\ngpu_model: '*A100*'\ncuda: '12.1'"}.items():
        (tmp_path / "profiles" / f"50-{slug}.yaml").write_text(
            f"display_name: {slug}\nslug: {slug}\nenvironment: envs/py.yml\n{fields}\n")
    form = await spawner.render_options_form()
    cards = {card.split('"', 1)[0]: card for card in form.split('for="profile-')[1:]}
    notes = {slug: re.search(r'<span class="text-danger">([^<]*)</span>', cards[slug]) for slug in cards}
    assert {slug: note.group(1) for slug, note in notes.items() if note} == {
        "h100": "no GPU here is a H100", "cuda13": "the GPU driver here is too old for CUDA 13.0",
        "pair": "more than the 1-GPU quota per user"}
    assert "cannot start here" not in cards["a100"] and "cannot start here" in cards["h100"]


def test_a_miscased_or_misspelt_profile_link_names_the_users_nearest_profile(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    (tmp_path / "profiles" / "30-course.yaml").write_text(
        "display_name: Course\nslug: cs101-hw2\nenvironment: envs/py.yml\n")
    (tmp_path / "profiles" / "40-staff.yaml").write_text(
        "display_name: Staff\nslug: cs101-hw3\nenvironment: envs/py.yml\nallowed_users: [teacher]\n")
    for asked, hint in (("CS101-HW2", " (did you mean 'cs101-hw2'?)"), ("CS101-HW3", " (did you mean 'cs101-hw2'?)"),
                        ("astronomy", "")):  # staff's own profile is never named to a student
        with pytest.raises(StartFailure) as refusal:
            spawner.apply_choice({"profile": asked})
        assert refusal.value.status_code == 400
        assert refusal.value.message == f"profile: unknown profile {asked!r}{hint}"


async def test_a_profile_for_a_capitalised_roster_name_is_offered_to_that_user(tmp_path):
    # The instructor copies "TA-Jones" from the class roster; JupyterHub's authenticator logs
    # the TA in as "ta-jones" (it lower-cases names, and reads its own allowed_users so).
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    (tmp_path / "profiles" / "30-ta.yaml").write_text(
        "display_name: TA tools\nslug: cs101-ta\nenvironment: envs/py.yml\nallowed_users: [TA-Jones]\n")
    spawner.user = StandInUser(Authenticator().normalize_username("TA-Jones"))
    spawner.authenticator = Authenticator()
    assert 'id="profile-cs101-ta"' in await spawner.render_options_form()
    spawner.apply_choice({"profile": "cs101-ta"})
    assert spawner.user_options["profile"] == "cs101-ta"
    spawner.user = StandInUser("student")
    with pytest.raises(StartFailure) as refusal:
        spawner.apply_choice({"profile": "cs101-ta"})
    assert refusal.value.status_code == 403


async def test_a_user_no_profile_admits_is_told_so_on_the_form_and_at_the_start(tmp_path):
    # A student not yet in the course's group: not an empty form with a Start button that fails.
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    for name in ("10-py.yaml", "20-gpu.yaml"):
        path = tmp_path / "profiles" / name
        path.write_text(path.read_text() + "allowed_groups: [cs101]\n")
    spawner.user = StandInUser("late-student")
    form = await spawner.render_options_form()
    assert 'for="profile-' not in form
    alert = form.split('data-testid="condaspawner-no-profile">')[1].split("</div>")[0]
    assert alert.startswith("No profile on this hub is open to you (yet): ask the hub admin, or your instructor")
    with pytest.raises(StartFailure) as refusal:
        spawner.apply_choice({})
    assert refusal.value.status_code == 403
    assert refusal.value.message.startswith("no profile on this hub is open to you (yet): ask the hub admin")
    spawner.user = StandInUser("alice")
    spawner.user.groups = [SimpleNamespace(name="cs101")]
    assert 'data-testid="condaspawner-no-profile"' not in await spawner.render_options_form()


async def test_an_uploaded_files_name_is_shown_in_printable_characters_only(tmp_path):
    spawner = spawner_for(tmp_path, "file:///nonexistent")
    name = "\u202elmy.evil\x1b[31m.yml"  # a right-to-left override and a terminal colour
    for body, ends in ((b"", ": the uploaded file is empty: choose it again, or paste its text"),
                       (b"channels: [my-own-channel]\ndependencies: [numpy]\n", None)):
        with pytest.raises(ValueError) as refusal:
            await spawner.options_from_form_data({"profile": ["py"],
                                                  "environment_file_file": [{"body": body, "filename": name}]})
        message = str(refusal.value)
        assert message.startswith("?lmy.evil?[31m.yml"), message
        assert ends is None or message.endswith(ends), message
