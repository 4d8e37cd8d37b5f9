"""The environments page without a hub: configure(c) and the EnvironmentsPage settings."""

from __future__ import annotations

from traitlets.config import Config

from jupyterhub_condaspawner.envpage import ADMIN_SCOPE, EnvironmentsPage, configure, handlers


def test_configure_adds_the_handlers_templates_and_scope_and_keeps_what_was_there():
    c = Config()
    c.JupyterHub.extra_handlers = [("/mine", "my.Handler")]
    c.JupyterHub.custom_scopes = {"custom:mine": {"description": "mine"}}
    configure(c)
    assert c.JupyterHub.extra_handlers == [("/mine", "my.Handler"), *handlers()]
    assert set(c.JupyterHub.custom_scopes) == {"custom:mine", ADMIN_SCOPE}
    assert c.JupyterHub.template_paths[0].endswith("templates/hub")
    assert "load_roles" not in c.JupyterHub  # the settings are read by the handlers, not a role
    assert EnvironmentsPage(config=c).admin_users == set()


def test_admins_named_in_settings_set_before_or_after_configure():
    c = Config()
    c.EnvironmentsPage.admin_users = {"carol"}
    configure(c, admin_users=["alice"], admin_groups=["gpu-admins"])
    c.EnvironmentsPage.admin_groups = c.EnvironmentsPage.admin_groups | {"late-group"}  # a later line of the file
    page = EnvironmentsPage(config=c)
    assert page.admin_users == {"alice", "carol"} and page.admin_groups == {"gpu-admins", "late-group"}
    assert page.names_admin("carol", []) and page.names_admin("dave", ["late-group", "x"])
    assert not page.names_admin("dave", ["x"])


def test_every_setting_has_help_with_a_config_example():
    for name, trait in EnvironmentsPage.class_traits(config=True).items():
        assert f"c.EnvironmentsPage.{name} = " in trait.help, name

