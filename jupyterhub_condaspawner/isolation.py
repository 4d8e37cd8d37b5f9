r"""What keeps one user's server away from another's home and from the host.

Three parts, mixed into CondaSpawner by :class:`IsolationMixin`:

- **Collision-free names.** DockerSpawner renders ``{username}`` and ``{servername}``
  in container and volume names through its ``escape``. Its default (escapism 1.1)
  writes bytes below 0x10 with one hex digit, so ``"\x01" + "0"`` and ``"\x10"`` both
  become ``-10``, and a user named ``"jos\x0c3\n9"`` gets ``josé``'s names
  (``jos-c3-a9``). :func:`escape_name` always writes two digits: the same names as
  DockerSpawner's for every user name without control characters, and reversible,
  so no two user names share one.
- **Hardening defaults** for every server container (admin traits): no capabilities,
  ``no-new-privileges``, a PID limit, no swap beyond the memory limit. They go in
  *under* the admin's own ``extra_host_config``, which wins for single values and
  adds to lists.
- **Owned home volumes.** A per-user volume (its name template uses ``{username}``)
  is created by the spawner with an owner label, and a container is only created
  when every such volume it mounts belongs to this user. A template whose names
  collide (``{username}{servername}``: erin's ``one`` and erino's ``ne``) then fails
  closed, with one line naming the volume, instead of sharing a home. The owner is
  the user's name *and* identity (owners.py: id and creation time), so a deleted or
  renamed user's home is never handed to the next user of the name; volumes of an older
  hub (name label only) are adopted through the hub's ledger (owners.VolumeLedger).
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any, Callable, Iterable, cast

import docker
from tornado import web
from traitlets import Bool, Int, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .gpus import LABEL_USER
from .hubservices import hub_services
from .owners import ADOPTED, CLAIMED, LABEL_IDENTITY, ORPHANED, user_identity

if TYPE_CHECKING:
    from .spawner import CondaSpawner

# Template fields that make a volume name per-user (DockerSpawner 14's namespace).
USER_FIELDS = frozenset({"username", "safe_username", "raw_username"})
# Docker's local volume driver makes a folder of the name: one file name, at most 255 bytes.
MAX_VOLUME_NAME = 255
# What may stay as it is in a name: DNS-label characters without the escape character.
NAME_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def escape_name(text: str) -> str:
    """A Docker- and DNS-safe name for ``text``; distinct texts give distinct names.

    Characters outside [a-z0-9] become "-" and two lowercase hex digits per UTF-8 byte
    (escapism.unescape(name, escape_char="-") reverses it). "-" never stands alone, so
    "--" never occurs in a name: "{username}--{servername}" splits in exactly one place.
    """
    return "".join(c if c in NAME_SAFE else "".join(f"-{b:02x}" for b in c.encode()) for c in text)


class IsolationMixin(LoggingConfigurable):
    """Name escaping, hardening traits and home-volume ownership; the host class is a DockerSpawner."""

    if TYPE_CHECKING:  # provided by DockerSpawner, the class this is mixed into
        volumes: dict[str, Any]
        read_only_volumes: dict[str, Any]
        mounts: list[dict[str, Any]]
        user: Any

        def format_volume_name(self, template: str, spawner: Any) -> str: ...

        async def docker(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    @default("escape")
    def _escape_default(self) -> Callable[[str], str]:
        # An admin's c.DockerSpawner.escape still wins; "legacy" brings the collisions back.
        return escape_name

    cap_drop = List(
        Unicode(),
        default_value=["ALL"],
        config=True,
        help="""Linux capabilities removed from server containers. The single-user server
        and its kernels run as the image's non-root user (jovyan) and need none; dropping
        them all also disarms setuid-root programs. Give one back with
        extra_host_config, e.g. {"cap_add": ["NET_BIND_SERVICE"]}.

        c.CondaSpawner.cap_drop = ["ALL"]
        """,
    )

    security_opt = List(
        Unicode(),
        default_value=["no-new-privileges"],
        config=True,
        help="""Docker security options of server containers. no-new-privileges stops any
        process in the container from gaining privileges (setuid, file capabilities).
        The admin's extra_host_config security_opt entries are added to these.

        c.CondaSpawner.security_opt = ["no-new-privileges"]
        """,
    )

    pids_limit = Int(
        4096,
        allow_none=True,
        config=True,
        help="""Most processes and threads one server container may run: a fork bomb stops
        there instead of exhausting the host. Threads count, and numerical libraries start
        one per core in each kernel, so leave room on many-core GPU hosts. None or 0: no limit.

        c.CondaSpawner.pids_limit = 4096
        """,
    )

    allow_swap = Bool(
        False,
        config=True,
        help="""Let server containers swap beyond their memory limit. By default swap is
        capped at the memory limit (memswap_limit = mem_limit), so a server that runs out of
        memory is stopped instead of slowing the host down by swapping.

        c.CondaSpawner.allow_swap = False
        """,
    )

    # -- hardening ---------------------------------------------------------------------------

    def hardening_host_config(self, admin: dict[str, Any] | None = None) -> dict[str, Any]:
        """Host-config kwargs of the hardening traits, to merge the admin's extra_host_config over.

        ``admin`` is that extra_host_config: a memory limit set there is the one swap must match.
        """
        config: dict[str, Any] = {}
        if self.cap_drop:
            config["cap_drop"] = list(self.cap_drop)
        if self.security_opt:
            config["security_opt"] = list(self.security_opt)
        if self.pids_limit:
            config["pids_limit"] = self.pids_limit
        mem_limit = (admin or {}).get("mem_limit", getattr(self, "mem_limit", None))
        if not self.allow_swap and mem_limit:
            # Docker's MemorySwap is memory + swap: equal values mean no swap at all.
            config["memswap_limit"] = mem_limit
        return config

    # -- home volumes --------------------------------------------------------------------------

    def user_volume_names(self) -> list[str]:
        """The rendered names of the Docker volumes whose templates name the user."""
        templates: list[str] = [*self.volumes, *self.read_only_volumes, *self.mount_templates()]
        names = [self.format_volume_name(t, self) for t in templates if is_user_template(t)]
        # A source with a slash is a host path (bind mount), not a named volume: no labels there.
        return sorted({name for name in names if "/" not in name})

    def mount_templates(self) -> list[str]:
        """The name templates of the named volumes in DockerSpawner's ``mounts``."""
        return [mount["source"] for mount in self.mounts if mount.get("type", "volume") == "volume"]

    async def claim_user_volumes(self) -> None:
        """Create this user's volumes with owner labels; refuse any that another user owns."""
        identity = user_identity(self.user)
        for name in self.user_volume_names():
            if len(name.encode()) > MAX_VOLUME_NAME:
                raise web.HTTPError(500, volume_too_long(name))
            # create_volume returns the existing volume (labels unchanged) if the name is taken,
            # so two users racing for one name cannot both win.
            labels = {LABEL_USER: self.user.name, LABEL_IDENTITY: identity}
            volume = await self.docker("create_volume", name=name, labels=labels)
            if not volume.get("Labels"):
                # Docker 20.10, restarted, answers a create of an existing volume without its labels
                # until something reads that volume once: read it, rather than take it for unlabelled.
                volume = await self.docker("inspect_volume", name)
            refusal = self._ownership_refusal(name, volume.get("Labels") or {}, identity)
            if refusal:
                self.log.warning("Refusing volume %s for %s (%s): labels %r", name, self.user.name, identity,
                                 volume.get("Labels"))
                raise web.HTTPError(500, refusal)

    def _ownership_refusal(self, name: str, labels: dict[str, str], identity: str) -> str | None:
        """Why this user may not mount the volume ``name`` (one line), or None if it is theirs."""
        owner = labels.get(LABEL_USER)
        if owner != self.user.name:
            return volume_refusal(name, owner)
        if LABEL_IDENTITY in labels:
            return None if labels[LABEL_IDENTITY] == identity else volume_of_earlier_user(name)
        return self._legacy_refusal(name, identity)

    def _legacy_refusal(self, name: str, identity: str) -> str | None:
        """A volume of an older hub (name label only) is adopted by the first user of its name
        who starts now, and refused to any other identity after that, or once orphaned."""
        ledger = hub_services(cast("CondaSpawner", self)).owners
        entry = ledger.entry(name)
        if entry is None:
            ledger.record(name, ADOPTED, self.user.name, identity)
            self.log.info("Volume %s of an older hub adopted by %s (%s)", name, self.user.name, identity)
            return None
        if entry.get("state") == ADOPTED and entry.get("identity") == identity:
            return None
        return volume_of_earlier_user(name)

    def claim_user_volumes_in_ledger(self) -> None:
        """Where the nodes create the volumes (a swarm) and the hub cannot read their labels: the
        hub's ledger holds, for each home volume name, the first user identity that started with
        it; any other identity (a deleted user's name given again) is refused in one line."""
        identity, ledger = user_identity(self.user), hub_services(cast("CondaSpawner", self)).owners
        for name in self.user_volume_names():
            if len(name.encode()) > MAX_VOLUME_NAME:
                raise web.HTTPError(500, volume_too_long(name))
            entry = ledger.entry(name)
            if entry is None:
                ledger.record(name, CLAIMED, self.user.name, identity)
            elif entry.get("state") == ORPHANED or entry.get("identity") != identity:
                self.log.warning("Refusing volume %s for %s (%s): the ledger has %r", name, self.user.name,
                                 identity, entry)
                raise web.HTTPError(500, volume_of_earlier_user(name))

    def orphan_user_volumes_in_ledger(self) -> None:
        """A deleted user's home volume names, recorded as orphaned in the ledger (a swarm's nodes
        keep the data; no later user of the name is handed it)."""
        identity, ledger = user_identity(self.user), hub_services(cast("CondaSpawner", self)).owners
        for name in self.user_volume_names():
            entry = ledger.entry(name)
            if entry is None or (entry.get("identity") == identity and entry.get("state") != ORPHANED):
                ledger.record(name, ORPHANED, self.user.name, identity)
                self.log.info("Home volume %s of deleted user %s (%s) orphaned on the nodes: kept, handed to "
                              "no one", name, self.user.name, identity)

    async def orphan_user_volumes(self) -> None:
        """Record this (deleted) user's volumes as orphaned: their data stays, no one gets them."""
        identity, ledger = user_identity(self.user), hub_services(cast("CondaSpawner", self)).owners
        for name in self.user_volume_names():
            try:
                volume = await self.docker("inspect_volume", name)
            except docker.errors.NotFound:
                continue
            if self._ownership_refusal(name, volume.get("Labels") or {}, identity) is None:
                ledger.record(name, ORPHANED, self.user.name, identity)
                self.log.info("Volume %s of deleted user %s (%s) orphaned: kept, handed to no one", name,
                              self.user.name, identity)


def volume_too_long(name: str) -> str:
    """One line for a home volume whose name is longer than a volume name may be (a long user
    name, escaped): names are never cut short, which could make two users' names one."""
    return (f"the name of your home volume ({name[:40]}..., {len(name.encode())} characters from your user "
            f"name) is longer than the {MAX_VOLUME_NAME} a volume name may have: tell the hub admin (a "
            "shorter user name, or a shorter volume name template in c.DockerSpawner.volumes)")


def volume_of_earlier_user(name: str) -> str:
    """One line for a volume of an earlier user of this name (deleted, or renamed since)."""
    return (f"volume {name} belongs to an earlier user of your name (deleted or renamed): an admin must "
            f"check whose it is and hand it over or remove it as the README's Isolation section says")


def volume_refusal(name: str, owner: str | None) -> str:
    """One line for the user and the admin: which volume, why, what to do (never the owner's name)."""
    if owner is None:
        return (f"volume {name} has no owner label (made by hand or by an older hub): an admin must "
                f"check whose it is and hand it over as the README's Isolation section says")
    return (f"volume {name} belongs to another user: the hub's volume names are ambiguous; an admin "
            f"must name per-user volumes from {{username}} (see the README's Isolation section)")


def is_user_template(template: str) -> bool:
    """Whether a volume name template contains a user-name field."""
    return bool(USER_FIELDS & set(template_fields(template)))


def template_fields(template: str) -> Iterable[str]:
    """The base names of a str.format template's fields ("username" for "{username!s:>3}")."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:  # not a valid template: DockerSpawner leaves such strings as they are
        return []
    return [field.split(".")[0].split("[")[0] for _, field, _, _ in parsed if field]

