"""The environments page: a user's environments, and the admin's images, builds and GPUs.

Why hub handlers (``JupyterHub.extra_handlers``) and not a hub-managed service: what the
admin view shows lives in the hub process and nowhere else: builds in progress and their
queue (the builder's tasks), the GPU table and the GPU queue (the allocator's memory), the
servers running now. A service would be a second process that sees none of it, plus an
OAuth client, a port and a token to set up. Handlers run inside the hub, use its login,
its RBAC, its templates (page.html, Bootstrap, dark mode) and its spawn machinery; the
admin adds them with one call: ``jupyterhub_condaspawner.envpage.configure(c)``.
(JupyterHub logs once that ``extra_handlers`` is deprecated in favour of services; it
still works in 6.x, and the reasons above are why this page keeps to it.)

Permissions (JupyterHub RBAC): a logged-in user sees only the environments they started
(usage.py records them); another user's key answers 404, as an unknown one does. Admin
views and actions need the custom scope ``custom:condaspawner:admin`` (``configure``
defines it: grant it with a role of your own), the hub admin role's ``admin-ui`` scope (hub
admins have it by default), or a name in ``EnvironmentsPage.admin_users`` /
``admin_groups`` (settings, read by the handlers at each request).

Every view has a JSON API under ``/hub/api/environments``; the HTML pages
(``/hub/environments``, ``/hub/environments/admin``) render the same data, with a live
build log by server-sent events and one line for every failure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from traitlets import Set, Unicode
from traitlets.config import Configurable

ADMIN_SCOPE = "custom:condaspawner:admin"
TEMPLATES = Path(__file__).parent / "templates" / "hub"
KEY = r"([0-9a-f]{64})"
_HANDLERS = "jupyterhub_condaspawner.envhandlers."


class EnvironmentsPage(Configurable):
    """The environments page's settings (``c.EnvironmentsPage.*``), read by its handlers."""

    admin_users = Set(
        Unicode(),
        help="""Users who see the page's admin view (every image, build and GPU) and may use its
        actions (prebuild, rebuild, delete, GC), besides hub admins and holders of the
        custom:condaspawner:admin scope.

            c.EnvironmentsPage.admin_users = {"alice", "bob"}
        """,
    ).tag(config=True)
    admin_groups = Set(
        Unicode(),
        help="""JupyterHub groups whose members see the page's admin view and may use its actions,
        besides hub admins and holders of the custom:condaspawner:admin scope.

            c.EnvironmentsPage.admin_groups = {"gpu-admins"}
        """,
    ).tag(config=True)

    def names_admin(self, user: str, groups: list[str]) -> bool:
        """Whether these settings make ``user`` (a member of ``groups``) an admin of the page."""
        return user in self.admin_users or not self.admin_groups.isdisjoint(groups)


def configure(c: Any, admin_users: list[str] | None = None, admin_groups: list[str] | None = None) -> None:
    """Add the environments page to a JupyterHub config (in jupyterhub_config.py)::

        from jupyterhub_condaspawner.envpage import configure
        configure(c)                                    # hub admins see the admin view
        c.EnvironmentsPage.admin_groups = {"gpu-admins"}  # so do the members of gpu-admins

    Adds the handlers, the templates (a navigation-bar link on every hub page) and the custom
    scope. ``admin_users`` / ``admin_groups`` are a shorthand for the EnvironmentsPage settings
    of the same names (added to what the config already names).
    """
    c.JupyterHub.extra_handlers = list(c.JupyterHub.get("extra_handlers", [])) + handlers()
    c.JupyterHub.template_paths = [str(TEMPLATES)] + list(c.JupyterHub.get("template_paths", []))
    c.JupyterHub.custom_scopes = {
        **dict(c.JupyterHub.get("custom_scopes", {})),
        ADMIN_SCOPE: {"description": "See every environment image, build and GPU; prebuild, rebuild, "
                                     "delete images and run the image GC (the environments page)"},
    }
    if admin_users:
        c.EnvironmentsPage.admin_users = set(c.EnvironmentsPage.get("admin_users", set())) | set(admin_users)
    if admin_groups:
        c.EnvironmentsPage.admin_groups = set(c.EnvironmentsPage.get("admin_groups", set())) | set(admin_groups)


def handlers() -> list[tuple[str, str]]:
    """The page's routes, relative to the hub's prefix (/hub/). The handlers are named, not
    imported (tornado imports them when the hub starts): ``condaspawner --config`` reads the
    same config file and stays free of the hub's server."""
    return [
        (r"/environments/?", _HANDLERS + "UserPage"),
        (r"/environments/admin/?", _HANDLERS + "AdminPage"),
        (rf"/environments/{KEY}/start", _HANDLERS + "StartForm"),
        (r"/environments/admin/action", _HANDLERS + "AdminForm"),
        (r"/api/environments/?", _HANDLERS + "EnvironmentsAPI"),
        (r"/api/environments/check", _HANDLERS + "CheckAPI"),
        (rf"/api/environments/{KEY}", _HANDLERS + "EnvironmentAPI"),
        (rf"/api/environments/{KEY}/(environment\.yml|lock|log)", _HANDLERS + "DownloadAPI"),
        (rf"/api/environments/{KEY}/log/stream", _HANDLERS + "LogStreamAPI"),
        (rf"/api/environments/{KEY}/start", _HANDLERS + "StartAPI"),
        (r"/api/environments/admin/(images|builds|gpus)", _HANDLERS + "AdminViewAPI"),
        (r"/api/environments/admin/builds/stream", _HANDLERS + "BuildsStreamAPI"),
        (rf"/api/environments/admin/images/{KEY}", _HANDLERS + "AdminImageAPI"),
        (r"/api/environments/admin/(prebuild|rebuild|gc)", _HANDLERS + "AdminActionAPI"),
        (r"/api/environments/(.+)", _HANDLERS + "UnknownAPI"),  # last: what no route above matched
    ]
