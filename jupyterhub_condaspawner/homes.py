"""Homes that follow a server across the nodes of a swarm: the home volume's driver and options.

On one host a named volume is enough. On a swarm the node Swarm picks creates the volume
itself, from the service's mount: with Docker's ``local`` driver and NFS options (or a
multi-host volume plugin) every node mounts the same export, so a server that lands on
another node finds its files. The options are templates, like the volume names:
``{username}`` and ``{servername}`` only, both the *escaped* names (``[a-z0-9-]``, one
name per user: isolation.escape_name). Raw user text (``{raw_username}``) is refused in
volume names and driver options alike: it would reach a path on the file server. So is a
template in which two fields meet without ``--`` (or a character outside ``[a-z0-9-]``,
such as ``/``) between them: the nodes create volumes themselves, so no owner check can
catch ``home-{username}{servername}`` giving erin's server "o" and erino's default server
one home; an escaped name never holds ``--`` or such a character, so
``{username}--{servername}`` or ``{username}/{servername}`` names every server once.

    c.CondaSwarmSpawner.volumes = {"home-{username}": "/home/jovyan"}
    c.CondaSwarmSpawner.volume_driver = "local"
    c.CondaSwarmSpawner.volume_driver_options = {
        "type": "nfs", "o": "addr=nfs.example.edu,rw,nfsvers=4",
        "device": ":/export/home/{username}"}
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping

from .isolation import NAME_SAFE, template_fields

# What a home template may name: the escaped names DockerSpawner renders volume names with.
ALLOWED_FIELDS = frozenset({"username", "servername"})
_ESCAPED_NAME_CHARS = frozenset(NAME_SAFE | {"-"})


class HomeSettingsError(ValueError):
    """A volume name or driver option that would put raw user text (or an unknown field) in a path."""


def check_template(template: str, what: str) -> None:
    """Raise :class:`HomeSettingsError` unless ``template``'s fields are all in ALLOWED_FIELDS."""
    try:
        list(string.Formatter().parse(template))
    except ValueError as error:
        raise HomeSettingsError(f"{what}: {template!r} is not a valid template ({error})") from None
    unknown = sorted(set(template_fields(template)) - ALLOWED_FIELDS)
    if unknown:
        raise HomeSettingsError(f"{what}: {template!r} uses {', '.join('{' + f + '}' for f in unknown)}; "
                                "only {username} and {servername} (escaped names) may name a home")
    _check_fields_apart(template, what)


def _check_fields_apart(template: str, what: str) -> None:
    """Two different fields must have "--" (or a character no escaped name has) between them,
    or two servers' names may be one."""
    previous = None
    between = ""
    for literal, field, _, _ in string.Formatter().parse(template):
        between += literal
        if field is None:
            continue
        apart = "--" in between or any(char not in _ESCAPED_NAME_CHARS for char in between)
        if previous is not None and field != previous and not apart:
            raise HomeSettingsError(
                f"{what}: {template!r} lets two servers share a name ({{{previous}}} and {{{field}}} meet: "
                f"erin's server 'o' and erino's default server would be one); put '--' between them, "
                f"as in '{{{previous}}}--{{{field}}}'")
        previous, between = field, ""


def check_driver_options(options: Mapping[str, str]) -> None:
    """Every option value must be a string template naming only escaped names."""
    for key, value in options.items():
        if not isinstance(value, str):
            raise HomeSettingsError(f"volume_driver_options[{key!r}]: must be a string, not {value!r}")
        check_template(value, f"volume_driver_options[{key!r}]")


def check_volume_names(templates: Iterable[str]) -> None:
    """Named-volume templates (not host paths) may name only escaped names."""
    for template in templates:
        if not template.startswith("/"):
            check_template(template, f"volumes[{template!r}]")


def check_options_fit_volumes(options: Mapping[str, str], templates: Iterable[str]) -> None:
    """Every named volume is created with the driver options: one whose name lacks a field the
    options use (a shared ``datasets``, with options naming ``{username}``) would be created on
    each node with the first server's options and mounted by every later server there, another
    user's home behind a shared name."""
    used = {field for value in options.values() if isinstance(value, str) for field in template_fields(value)}
    for template in templates:
        missing = sorted(used - set(template_fields(template)))
        if not template.startswith("/") and missing:
            fields = " and ".join("{" + field + "}" for field in missing)
            raise HomeSettingsError(
                f"volumes[{template!r}]: volume_driver_options name {fields} but this volume's name does not, "
                f"so each node would give every server the first one's; name it with {fields} too, or mount "
                "shared data from a path on the nodes")


def render_driver_options(options: Mapping[str, str], username: str, servername: str) -> dict[str, str]:
    """The driver options for one server, ``{username}``/``{servername}`` replaced by the escaped names."""
    check_driver_options(options)
    return {key: value.format(username=username, servername=servername) for key, value in options.items()}
