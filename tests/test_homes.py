"""Home templates on a swarm: the nodes create the volumes, so only the template itself can
keep two servers from sharing a home (homes.py). Refused templates show a real collision;
accepted ones name every (user, server) pair once, over arbitrary user and server names."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyterhub_condaspawner.homes import HomeSettingsError, check_template
from jupyterhub_condaspawner.isolation import escape_name


def render(template: str, user: str, server: str) -> str:
    return template.format(username=escape_name(user), servername=escape_name(server))


@pytest.mark.parametrize("template", ["home-{username}{servername}", "home-{username}-{servername}",
                                      "{servername}{username}"])
def test_templates_whose_fields_can_run_together_are_refused_and_do_collide(template):
    with pytest.raises(HomeSettingsError, match=r"lets two servers share a name .* put '--' between them"):
        check_template(template, "volumes")
    words = ["".join(letters) for size in range(4) for letters in itertools.product("ae2.", repeat=size)]
    seen: dict[str, tuple[str, str]] = {}
    for user, server in itertools.product(words[1:], words):
        other = seen.setdefault(render(template, user, server), (user, server))
        if other != (user, server):
            return  # the refusal is not overcautious: two servers, one name
    pytest.fail(f"no two servers share a name under {template!r}")


names = st.text(min_size=0, max_size=6, alphabet=st.sampled_from("ab-.o0é\x01"))


@pytest.mark.parametrize("template", ["home-{username}--{servername}", "{servername}--{username}",
                                      ":/export/home/{username}/{servername}", "home_{username}_{servername}",
                                      "home-{username}", "{username}/{username}"])
@settings(max_examples=300, deadline=None)
@given(first=st.tuples(names.filter(bool), names), second=st.tuples(names.filter(bool), names))
def test_accepted_templates_name_every_server_once(template, first, second):
    check_template(template, "volumes")
    if first != second and ("{servername}" in template or first[0] != second[0]):
        assert render(template, *first) != render(template, *second)
