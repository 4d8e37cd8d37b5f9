"""A misspelled setting class in jupyterhub_config.py (``c.ImageBuildr``) is never read: the hub
names it in its log, with the class meant, once."""

from __future__ import annotations

import pytest
from fixtures_hub import hub  # noqa: F401

pytestmark = pytest.mark.docker

HUB_EXTRA_CONFIG = "c.ImageBuildr.max_images = 3\n"


def test_the_hub_log_names_a_misspelled_setting_class_once(hub):  # noqa: F811
    hub.spawn_page("typo-class")  # the form: the hub's services are made on first use
    hub.spawn_page("typo-class-2")
    named = [line for line in hub.log().splitlines() if "c.ImageBuildr" in line]
    assert len(named) == 1, named
    assert named[0].endswith("c.ImageBuildr is not a setting class, so its settings are ignored: "
                             "did you mean c.ImageBuilder?")
