"""A wrong type for one of CondaSpawner's own settings (the admin's mistake in
jupyterhub_config.py): every start is refused with the hub's config error and the hub's log
names the setting in one line, never a bare 500 with a traceback."""

from __future__ import annotations

import html

import pytest
from fixtures_hub import BrowserSession, hub  # noqa: F401

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = 'c.CondaSpawner.gpu_idle_timeout = "30 minutes"\n'


def test_a_wrong_type_for_a_spawner_setting_is_the_hubs_config_error(hub):  # noqa: F811
    hub.ensure_user("typo-admin")
    status, body = hub.spawn("typo-admin", {"profile": "python39"})
    assert status == 500, body
    assert body["message"] == ("This hub's configuration has an error: tell the hub admin (the hub's log "
                               "names the setting)")
    session = BrowserSession(hub.url)  # the spawn page a browser gets: the same sentence, no traceback
    session.get("/hub/login")
    status, _, page = session.post("/hub/login?next=%2Fhub%2Fspawn", {"username": "typo-admin", "password": ""})
    assert status == 500 and "configuration has an error: tell the hub admin" in html.unescape(page), page
    log = hub.log()
    assert "Traceback" not in log and "Uncaught exception" not in log
    named = [line for line in log.splitlines() if "gpu_idle_timeout" in line and "a setting in the hub's config" in line]
    assert named and "expected a finite number, not the str '30 minutes'" in named[0]
    assert "not recognized by `CondaSpawner`" not in log  # the other settings load as usual
