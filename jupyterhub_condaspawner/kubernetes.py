"""The Kubernetes path: the admin's profiles as KubeSpawner profiles (Zero to JupyterHub).

KubeSpawner cannot build images, so on Kubernetes every profile runs an image that
``condaspawner build --push`` built and pushed beforehand, pinned by digest. This
module turns the profiles into a Z2JH values fragment:

- ``singleuser.profileList``: per profile its pinned image, CPU and memory limits and
  guarantees, ``extra_resource_limits`` for its GPUs and a node selector (or a node
  affinity) on the GPU product label for its ``gpu_model``;
- ``hub.extraConfig``: a short snippet that gives KubeSpawner what it lacks, access by
  group and user (KubeSpawner 7 offers every profile to everyone), and a one-line
  refusal of a user's own environment.yml (there is no builder on the cluster).

The image of each profile comes through one seam, an :data:`ImageSource`: a function
from a profile to its pinned reference. :class:`PushedImages` is the one the command
uses: the file ``build --push`` writes, or ``--image SLUG=REF`` given by hand.
:func:`pushed_reference` is the seam on the build side: it asks the builder's push API
(``ImageBuilder.push``) for the reference of an image it built.

Nothing here imports docker, the hub or kubespawner: the export runs anywhere.
"""

from __future__ import annotations

import fnmatch
import html
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from traitlets import List, TraitError, Unicode, validate
from traitlets.config import Configurable

from .buildcontext import KERNEL_DISPLAY_NAME_VARIABLE
from .profiles import Profile
from .specyaml import describe_yaml_error
from .traittypes import FiniteFloat

if TYPE_CHECKING:
    from .buildmodel import ImageInfo

# <registry>/<repository>[:tag]@sha256:<digest>: what a pod may run. A tag alone is
# mutable: the same profile could start another environment tomorrow.
# The registry host may hold capitals and be an IPv6 address ([fd00::1]:5000), as Docker's
# reference grammar allows; the repository path is lower case.
PINNED_REFERENCE = re.compile(
    r"(?P<name>(?:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::[0-9]+)?/)?"
    r"[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"@sha256:(?P<digest>[0-9a-f]{64})\Z"
)
# A Kubernetes label value: at most 63 characters, alphanumerics at both ends.
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?\Z")
# A Kubernetes qualified name (a label key, a resource name): [DNS subdomain/]name.
QUALIFIED_NAME = re.compile(r"(?:(?P<prefix>[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/)?"
                            r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
GLOB_CHARACTERS = frozenset("*?[")
# Z2JH runs hub.extraConfig entries in sorted key order: last, so that the hooks and profile
# lists an admin sets in other entries are set by then, and wrapped.
ACCESS_CONFIG_KEY = "zz-condaspawner-profile-access"
IMAGES_FILE_VERSION = 1

# What a profile's image comes from: given a profile, its pinned image reference.
# Raise MissingImage when there is none (the export names every such profile).
ImageSource = Callable[[Profile], str]


class ExportError(ValueError):
    """Every problem found while exporting, one line each (like ProfileError)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class MissingImage(LookupError):
    """An ImageSource has no (usable) image for a profile: ``str(error)`` says why, in one line."""


class PushUnavailable(RuntimeError):
    """The builder cannot push: no push API, or no registry configured."""


# -- the build side of the seam ------------------------------------------------------------


def push_problem(builder: object) -> str | None:
    """Why ``builder`` cannot put images in a registry, in one line, or None when it can.

    With ``ImageBuilder.registry`` set, every build (or cache hit) ends with the image in the
    registry and ``ImageInfo.reference`` pinned by digest (the registry work, issue 10 s.1).
    """
    if not getattr(builder, "registry", ""):
        return 'no registry to push to: set c.ImageBuilder.registry = "registry.example.edu/condaspawner-env"'
    return None


async def pushed_reference(builder: object, info: ImageInfo) -> str:
    """The registry reference, pinned by digest, of the built image ``info``.

    The builder pushed it already (a failed push failed the build with BuildError); this
    only checks that ``info.reference`` is ``<registry>/<repository>:<tag>@sha256:<digest>``.
    """
    problem = push_problem(builder)
    if problem:
        raise PushUnavailable(problem)
    reference = info.reference
    if not PINNED_REFERENCE.match(reference or ""):
        raise PushUnavailable(f"the builder made {info.tag} but gave {reference!r}, "
                              "not a registry reference pinned by digest (name@sha256:...)")
    return reference


# -- the export side of the seam: which image each profile runs --------------------------------


@dataclass
class PushedImages:
    """Pinned images by profile slug: the file ``build --push`` writes and ``export`` reads.

    Each entry remembers the spec key and CUDA version it was built for, so a profile
    whose environment changed after the push is refused instead of exported with the old
    image. Entries given by hand (``--image SLUG=REF``, or a plain string in the file)
    carry no key and are taken as they are.
    """

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "the images file"

    @classmethod
    def load(cls, path: str | Path) -> PushedImages:
        """Read an images file; raise ExportError naming the file and the entry."""
        path = Path(path)
        try:
            node, document = _read_yaml(path.read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as error:  # where, and what was expected there
            raise ExportError([f"{path}: {describe_yaml_error(error)}"])
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ExportError([f"{path}: cannot read: {str(error).splitlines()[0]}"])
        duplicates = _repeated_slugs(node)
        if duplicates:  # YAML keeps the last of each: which image an admin meant is not known
            raise ExportError([f"{path}: {duplicate}" for duplicate in duplicates])
        images = document.get("images") if isinstance(document, dict) else None
        if not isinstance(images, dict):
            raise ExportError([f"{path}: must be a mapping with `images: {{slug: reference}}`"])
        version = document.get("version", IMAGES_FILE_VERSION)
        if version != IMAGES_FILE_VERSION:  # another release's entries may not mean what this one reads
            raise ExportError([f"{path}: version {version!r}: this condaspawner reads version {IMAGES_FILE_VERSION}: "
                               "use the release that wrote it, or move it aside and run `condaspawner build --push`"])
        entries: dict[str, dict[str, Any]] = {}
        problems = []
        for slug, entry in images.items():
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                problems.append(f"{path}: images.{slug}: must be a reference or a mapping with `image`")
                continue
            entries[str(slug)] = dict(entry)
        if problems:
            raise ExportError(problems)
        return cls(entries, source=str(path))

    def record(self, profile: Profile, reference: str) -> None:
        """Remember the pushed image of ``profile`` (with what it was built from)."""
        self.entries[profile.slug] = {
            "image": reference,
            "spec": profile.environment.key() if profile.environment is not None else None,
            "cuda": profile.cuda,
        }

    def set(self, slug: str, reference: str) -> None:
        """An image given by hand: no spec key to check."""
        self.entries[slug] = {"image": reference}

    def write(self, path: str | Path) -> None:
        text = ("# Written by `condaspawner build --push`: each profile's image, pinned by digest.\n"
                "# `condaspawner export kubespawner` reads it.\n")
        document = {"version": IMAGES_FILE_VERSION, "images": dict(sorted(self.entries.items()))}
        Path(path).write_text(text + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")

    def __call__(self, profile: Profile) -> str:
        entry = self.entries.get(profile.slug)
        if entry is None:
            raise MissingImage(f"no image in {self.source}: run `condaspawner build --push`, "
                               f"or pass --image {profile.slug}=REGISTRY/REPO:TAG@sha256:DIGEST")
        reference = entry["image"]
        if not PINNED_REFERENCE.match(reference):
            raise MissingImage(f"image {reference!r} is not pinned by digest (name:tag@sha256:...); "
                               "a tag can move, a digest cannot")
        spec = profile.environment.key() if profile.environment is not None else None
        if "spec" in entry and (entry.get("spec"), entry.get("cuda")) != (spec, profile.cuda):
            raise MissingImage(f"the profile's environment changed since {reference} was pushed: "
                               "run `condaspawner build --push` again")
        # Written by releases whose images held the kernel's name (the pod's environment names it now)
        if "kernel" in entry and entry["kernel"] != profile.display_name:
            raise MissingImage(f"the profile's display_name (its kernel's name in that image) changed since "
                               f"{reference} was pushed: run `condaspawner build --push` again")
        return reference


# -- the export ------------------------------------------------------------------------------


class KubernetesExport(Configurable):
    """Turns profiles into a Zero to JupyterHub values fragment for KubeSpawner."""

    gpu_resource = Unicode(
        "nvidia.com/gpu",
        config=True,
        help="""Extended resource that counts GPUs on the nodes (the NVIDIA device plugin's).

        A profile's `gpus: N` becomes `extra_resource_limits: {<gpu_resource>: "N"}`.

        c.KubernetesExport.gpu_resource = "nvidia.com/gpu"
        """,
    )
    gpu_product_label = Unicode(
        "nvidia.com/gpu.product",
        config=True,
        help="""Node label naming the GPU model (set by NVIDIA GPU feature discovery / the GPU
        operator, e.g. `NVIDIA-A100-SXM4-80GB`: the NVML name with spaces as dashes).

        A profile's `gpu_model` becomes a node selector (or node affinity) on this label.

        c.KubernetesExport.gpu_product_label = "nvidia.com/gpu.product"
        """,
    )
    gpu_products = List(
        Unicode(),
        config=True,
        help="""The values of the GPU product label that the cluster's nodes carry
        (`kubectl get nodes -L nvidia.com/gpu.product`). Node selectors match exact values,
        so a `gpu_model` glob such as "*A100*" is matched against this list: one match
        becomes a node selector, several a required node affinity, none an error.
        A gpu_model without glob characters needs no list.

        c.KubernetesExport.gpu_products = ["NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-PCIE-40GB", "NVIDIA-L4"]
        """,
    )
    cpu_guarantee_fraction = FiniteFloat(
        1.0,
        min=0,
        max=1,
        config=True,
        help="""CPU guarantee (request) as a fraction of each profile's cpu_limit, from 0 to 1.

        1 reserves the whole limit; less lets servers share CPUs; 0 sets no guarantee
        (the chart's singleuser.cpu.guarantee applies).

        c.KubernetesExport.cpu_guarantee_fraction = 0.5
        """,
    )
    mem_guarantee_fraction = FiniteFloat(
        1.0,
        min=0,
        max=1,
        config=True,
        help="""Memory guarantee (request) as a fraction of each profile's mem_limit, from 0 to 1.

        Memory cannot be taken back from a running server: below 1, a busy node may
        kill servers that use more than their guarantee. 0 sets no guarantee.

        c.KubernetesExport.mem_guarantee_fraction = 1.0
        """,
    )
    images_file = Unicode(
        "condaspawner-images.yaml",
        config=True,
        help="""File of pinned images per profile: `condaspawner build --push` writes it,
        `condaspawner export kubespawner` reads it (both take --images FILE instead).

        c.KubernetesExport.images_file = "/etc/jupyterhub/condaspawner-images.yaml"
        """,
    )

    @validate("cpu_guarantee_fraction", "mem_guarantee_fraction")
    def _fraction(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not 0 <= value <= 1:
            raise TraitError(f"{proposal['trait'].name} must be from 0 to 1, not {value}")
        return value

    @validate("gpu_product_label", "gpu_resource")
    def _qualified_name(self, proposal: Any) -> str:
        # Found only when a pod is made, a bad one would fail every GPU start (422 from the API server).
        name, value = proposal["trait"].name, proposal["value"]
        match = QUALIFIED_NAME.match(value)
        if not match or len(match["prefix"] or "") > 253:
            raise TraitError(f"{name}: {value!r} is not a Kubernetes name ([DOMAIN/]NAME; NAME: 1-63 letters, "
                             "digits, '-', '_', '.')")
        if name == "gpu_resource" and (not match["prefix"] or "kubernetes.io/" in value):
            raise TraitError(f"gpu_resource: {value!r} is not an extended resource name (DOMAIN/NAME, as the "
                             "device plugin names it: nvidia.com/gpu)")
        return value

    @validate("gpu_products")
    def _products(self, proposal: Any) -> list[str]:
        bad = [value for value in proposal["value"] if not value or not LABEL_VALUE.match(value)]
        if bad:
            raise TraitError(f"gpu_products: {bad[0]!r} is not a Kubernetes label value "
                             "(1-63 letters, digits, '-', '_', '.')")
        return list(proposal["value"])

    # -- one profile -------------------------------------------------------------------------

    def gpu_placement(self, profile: Profile) -> dict[str, Any]:
        """KubeSpawner overrides that put ``profile`` on a node with its GPU model.

        Raises ValueError (one line) when the model cannot be expressed as a node constraint.
        """
        if not profile.gpus or not profile.gpu_model:
            return {}
        label = self.gpu_product_label
        # GPU feature discovery writes the NVML name with spaces as dashes; the spawner
        # matches gpu_model against the NVML name without regard to case: do the same.
        pattern = profile.gpu_model.replace(" ", "-")
        if not GLOB_CHARACTERS & set(pattern):
            if not LABEL_VALUE.match(pattern):
                raise ValueError(f"gpu_model {profile.gpu_model!r} is not a possible value of {label}")
            known = [p for p in self.gpu_products if p.lower() == pattern.lower()]
            if self.gpu_products and not known:  # the nodes' values are known: one no node has would leave pods Pending
                raise ValueError(f"gpu_model {profile.gpu_model!r} matches none of the GPU products given "
                                 f"({', '.join(self.gpu_products)})")
            return {"node_selector": {label: known[0] if known else pattern}}
        if not self.gpu_products:
            raise ValueError(
                f"gpu_model {profile.gpu_model!r} is a glob and node selectors need exact values: list the "
                f"{label} values of your nodes with --gpu-product (kubectl get nodes -L {label})"
            )
        matches = [p for p in self.gpu_products if fnmatch.fnmatchcase(p.lower(), pattern.lower())]
        if not matches:
            raise ValueError(f"gpu_model {profile.gpu_model!r} matches none of the GPU products given "
                             f"({', '.join(self.gpu_products)})")
        if len(matches) == 1:
            return {"node_selector": {label: matches[0]}}
        term = {"matchExpressions": [{"key": label, "operator": "In", "values": matches}]}
        return {"node_affinity_required": [term]}

    def resources(self, profile: Profile) -> dict[str, Any]:
        """CPU, memory and GPU limits and guarantees, as KubeSpawner settings."""
        overrides: dict[str, Any] = {}
        if profile.cpu_limit is not None:
            overrides["cpu_limit"] = profile.cpu_limit
            if self.cpu_guarantee_fraction:
                overrides["cpu_guarantee"] = round(profile.cpu_limit * self.cpu_guarantee_fraction, 3)
        if profile.mem_limit is not None:
            overrides["mem_limit"] = byte_size(profile.mem_limit)
            if self.mem_guarantee_fraction:
                overrides["mem_guarantee"] = byte_size(int(profile.mem_limit * self.mem_guarantee_fraction))
        if profile.gpus:
            # Extended resources are never overcommitted: the request equals the limit.
            overrides["extra_resource_limits"] = {self.gpu_resource: str(profile.gpus)}
        return overrides

    def profile_entry(self, profile: Profile, image: str) -> dict[str, Any]:
        """One ``profile_list`` entry: KubeSpawner's keys, plus the access lists the snippet reads."""
        unreadable = _unreadable_by_the_hub(profile)
        if unreadable is not None:
            raise ValueError(f"{unreadable!r} cannot reach the hub: Helm's copy of the values writes it unquoted, "
                             "and the hub's YAML reader refuses it (the hub would not start)")
        # KubeSpawner's form renders these as HTML; a profile's are text (CondaSpawner's form
        # escapes them), so "CUDA <12" reads the same on both.
        entry: dict[str, Any] = {"display_name": html.escape(profile.display_name), "slug": profile.slug}
        if profile.description:
            entry["description"] = html.escape(profile.description)
        if profile.default:
            entry["default"] = True
        if profile.allowed_groups:
            entry["allowed_groups"] = list(profile.allowed_groups)
        if profile.allowed_users:
            entry["allowed_users"] = list(profile.allowed_users)
        environment = {KERNEL_DISPLAY_NAME_VARIABLE: kubespawner_literal(profile.display_name)}
        entry["kubespawner_override"] = {"image": image, **self.resources(profile), **self.gpu_placement(profile),
                                         "environment": environment}
        return entry

    # -- the whole catalog ------------------------------------------------------------------

    def export(self, profiles: Iterable[Profile], image_for: ImageSource) -> Export:
        """Every profile with an environment of its own, or ExportError listing every problem.

        Profiles that only take the user's own environment.yml are left out (noted).
        """
        entries, notes, problems = [], [], []
        for profile in profiles:
            if profile.environment is None:
                notes.append(f"{profile.slug}: left out: it only runs the user's own environment.yml, "
                             "which needs a builder on the cluster (docs/kubernetes.md)")
                continue
            try:
                entries.append(self.profile_entry(profile, image_for(profile)))
            except (MissingImage, ValueError) as error:
                problems.append(f"{profile.slug}: {error}")
                continue
            if profile.allow_custom_environment:
                notes.append(f"{profile.slug}: exported with its own environment only; users cannot bring "
                             "their own environment.yml on Kubernetes (docs/kubernetes.md)")
        if problems:
            raise ExportError(problems)
        if not entries:
            raise ExportError(["no profile has an environment of its own: nothing to export"])
        return Export(entries, notes)


@dataclass
class Export:
    """The exported profiles and what was left out or narrowed, one line each."""

    profile_list: list[dict[str, Any]]
    notes: list[str]

    def values(self) -> dict[str, Any]:
        """The Zero to JupyterHub values fragment (``helm upgrade ... -f FILE``)."""
        return {
            "singleuser": {"profileList": self.profile_list},
            "hub": {"extraConfig": {ACCESS_CONFIG_KEY: ACCESS_SNIPPET}},
        }

    def to_yaml(self, source: str = "profiles/") -> str:
        header = [
            f"# Zero to JupyterHub values: the condaspawner profiles of {_comment_text(str(source))} for KubeSpawner.",
            "# Written by `condaspawner export kubespawner`; regenerate it rather than edit it.",
            "# Use it whole (helm upgrade ... -f THIS_FILE): hub.extraConfig enforces each",
            "# profile's allowed_groups / allowed_users, which KubeSpawner alone ignores.",
        ]
        header += [f"# note: {note}" for note in self.notes]
        return "\n".join(header) + "\n" + yaml.dump(self.values(), Dumper=_BlockDumper, sort_keys=False,
                                                    allow_unicode=True, width=100)


# Z2JH gives the hub the values through Helm's toYaml, which writes these unquoted; the hub's
# PyYAML reads them as YAML 1.1's value and merge keys, and cannot construct them.
_HUB_UNREADABLE = frozenset({"=", "<<"})


def _read_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The images file as its YAML node tree (keys as written, with their lines: a repeated one
    is still there) and as the document it makes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return node, loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _repeated_slugs(root: yaml.Node | None) -> list[str]:
    """A line per slug the file's ``images`` mapping gives twice (or ``images`` itself twice)."""
    if not isinstance(root, yaml.MappingNode):
        return []
    problems = _repeated_keys(root, "")
    for key, value in root.value:
        if key.value == "images" and isinstance(value, yaml.MappingNode):
            problems += _repeated_keys(value, "images.")
    return problems


def _repeated_keys(mapping: yaml.MappingNode, prefix: str) -> list[str]:
    first: dict[str, int] = {}
    problems = []
    for key, _ in mapping.value:
        line = key.start_mark.line + 1
        name = str(key.value)  # `1:` and `"1":` are one slug
        if name in first:
            problems.append(f"{prefix}{name}: given twice (lines {first[name]} and {line}): keep one entry")
        else:
            first[name] = line
    return problems


def _unreadable_by_the_hub(profile: Profile) -> str | None:
    # as written: the description only HTML-escaped ("<<" is "&lt;&lt;"), the display_name raw in the environment too
    texts = (profile.display_name, html.escape(profile.description), *profile.allowed_groups, *profile.allowed_users)
    return next((text for text in texts if text in _HUB_UNREADABLE), None)


def kubespawner_literal(text: str) -> str:
    """``text`` as a string of KubeSpawner's ``environment``, which it reads as a template whose
    ``{username}``-style fields it fills in: "Python {3.11}" would fail the start."""
    return text.replace("{", "{{").replace("}", "}}")


def _comment_text(text: str) -> str:
    """``text`` fit for a YAML comment: no line break ends it (the rest would be values), no
    character YAML refuses."""
    return "".join(char if char.isprintable() else "?" for char in text)


def byte_size(size: int) -> str | int:
    """Bytes as KubeSpawner's (and the profiles') notation: 4294967296 -> "4G"; odd sizes stay bytes."""
    for suffix, unit in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return size


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the hub snippet) as YAML block literals, readable in the file."""


# Plain scalars Helm's Go YAML reads as numbers, booleans or null where PyYAML reads text
# (`1e3`, `19e0042`, `n`, `y`, `0o17`; after a sign it drops `_`: `-_1`, `-.5`): a slug or user
# name like that would stop matching.
_GO_YAML_NOT_TEXT = re.compile(r"[-+]?[._]*[0-9]|(y|n|yes|no|on|off|true|false|null|~)\Z", re.IGNORECASE)
# Line breaks to YAML 1.1 besides "\n": PyYAML's single quotes lose a NEL; escaped, every reader keeps them.
_UNICODE_BREAKS = frozenset("\x85\u2028\u2029")


def _scalar_style(value: str) -> str | None:
    if not _UNICODE_BREAKS.isdisjoint(value):
        return '"'
    if "\n" in value:
        return "|"
    return "'" if not value or _GO_YAML_NOT_TEXT.match(value) else None


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.nodes.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=_scalar_style(value))


_BlockDumper.add_representer(str, _represent_str)


# The hub side, run by Z2JH's jupyterhub_config.py from hub.extraConfig (where `c` is the
# hub's config). Self-contained on purpose: the hub image needs only kubespawner, not this
# package. tests/test_kubernetes.py runs it exactly so, against KubeSpawner itself.
ACCESS_SNIPPET = '''\
# condaspawner: who may use which profile, and no user-supplied environment.yml.
# KubeSpawner offers every profile in singleuser.profileList to every user; this wraps
# the list in a function of the user, so the form shows, and a start (form or REST API)
# accepts, only the profiles whose allowed_groups / allowed_users admit the user
# (empty lists: everyone).
def _condaspawner_access():
    from jupyterhub.utils import maybe_future
    from tornado import web

    configured = c.KubeSpawner.profile_list if "profile_list" in c.KubeSpawner else None
    if not (isinstance(configured, list) or callable(configured)):
        raise ValueError("zz-condaspawner-profile-access: singleuser.profileList is not set; "
                         "use the whole file `condaspawner export kubespawner` wrote")

    def allows(profile, spawner):
        user = spawner.user
        groups = set(profile.get("allowed_groups") or ())
        users = set(profile.get("allowed_users") or ())
        if not groups and not users:
            return True
        # allowed_users read as JupyterHub reads its own: through the authenticator's
        # normalize_username (it lower-cases), so "Alice" admits the hub user "alice"
        normalize = getattr(spawner.authenticator, "normalize_username", None) or (lambda name: name)
        member_of = {getattr(group, "name", group) for group in user.groups}
        return (user.name in users or user.name in {normalize(name) for name in users}
                or not groups.isdisjoint(member_of))

    async def configured_profiles(spawner):
        return await maybe_future(configured(spawner)) if callable(configured) else configured

    async def profile_list(spawner):
        if spawner.pre_spawn_hook is not refuse_own_environment:
            # A later config entry replaced the hook: the environment.yml refusal and the admin's
            # own hook would not run. Loudly, rather than silently.
            raise web.HTTPError(500, "hub.extraConfig: an entry after zz-condaspawner-profile-access sets "
                                     "pre_spawn_hook; set it in an entry that sorts before: tell the hub admin")
        visible = [profile for profile in await configured_profiles(spawner) if allows(profile, spawner)]
        if not visible:
            raise web.HTTPError(403, f"No profile on this hub is open to {spawner.user.name}: ask the hub admin")
        return visible

    # A pre_spawn_hook set before this one (on KubeSpawner or Spawner: every other entry) still runs, after it.
    earlier_hook = next((section.pre_spawn_hook for section in (c.KubeSpawner, c.Spawner)
                         if "pre_spawn_hook" in section), None)

    async def refuse_own_environment(spawner):
        slug = (spawner.user_options or {}).get("profile")
        if slug:  # KubeSpawner's own "No such profile" is a ValueError: a 500 with a traceback
            chosen = [profile for profile in await configured_profiles(spawner) if profile.get("slug") == slug]
            if not chosen:
                raise web.HTTPError(400, f"profile: no profile {slug!r} on this hub")
            if not allows(chosen[0], spawner):
                raise web.HTTPError(403, f"profile: {slug!r} is not available to you")
        options = spawner.user_options or {}
        if options.get("environment") or options.get("environment_key"):  # the text, or the key of one built
            raise web.HTTPError(400, "This hub cannot build your own environment.yml (Kubernetes has no "
                                     "condaspawner builder here): start one of the profiles instead")
        if callable(earlier_hook):
            await maybe_future(earlier_hook(spawner))

    c.KubeSpawner.profile_list = profile_list
    c.KubeSpawner.pre_spawn_hook = refuse_own_environment


_condaspawner_access()
'''
