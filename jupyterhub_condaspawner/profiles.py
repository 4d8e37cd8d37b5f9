"""Admin profiles: one YAML file per profile, in KubeSpawner's ``profile_list`` shape.

A profile names an environment (a file next to it or an inline mapping) and the
hardware it runs on (GPUs, CPU, memory, the CUDA version to solve for), plus who
may use it. :class:`ProfileCatalog` loads a directory of them, reporting every
problem of every file at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml
from jupyterhub.traitlets import ByteSpecification
from traitlets import TraitError, Unicode
from traitlets.config import Configurable

from .spec import EnvironmentSpec, SpecError, SpecPolicy, show
from .specyaml import describe_yaml_error

PROFILE_SUFFIXES = (".yaml", ".yml")
MAX_GPUS = 64
_SLUG = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_CUDA_VERSION = re.compile(r"\d+(\.\d+){0,2}\Z")
DOCKER_MIN_MEMORY = 6 * 1024**2  # the Docker daemon refuses a smaller container memory limit


@dataclass(frozen=True)
class Profile:
    """One validated admin profile."""

    slug: str
    display_name: str
    source: str
    description: str = ""
    default: bool = False
    environment: EnvironmentSpec | None = None
    environment_source: str | None = None
    gpus: int = 0
    gpu_model: str | None = None
    cpu_limit: float | None = None
    mem_limit: int | None = None
    cuda: str | None = None
    gpu_idle_timeout: float | None = None  # minutes; None: CondaSpawner.gpu_idle_timeout
    allowed_groups: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()
    allow_custom_environment: bool = False

    def allows(self, user: str, groups: Iterable[str] = (), normalize: Callable[[str], str] | None = None) -> bool:
        """Whether ``user`` (member of ``groups``) may use this profile; empty lists mean everyone.

        ``normalize`` is the hub's ``Authenticator.normalize_username``: ``allowed_users`` is read
        through it, as JupyterHub reads its own ``allowed_users`` and ``admin_users``, so that
        ``[Alice]`` (a class roster's spelling) admits the user JupyterHub calls ``alice``."""
        if not self.allowed_users and not self.allowed_groups:
            return True
        if user in self.allowed_users or not set(groups).isdisjoint(self.allowed_groups):
            return True
        return normalize is not None and any(normalize(name) == user for name in self.allowed_users)


class ProfileError(ValueError):
    """Every problem found while loading profiles, one line each; ``usable``: the profiles of
    the files without problems, less those whose slug another file also uses (and, with
    several defaults, none of them the default)."""

    def __init__(self, problems: list[str], usable: list[Profile] | None = None):
        super().__init__("\n".join(problems))
        self.problems = problems
        self.usable = usable or []


class _FieldError(Exception):
    pass


def slugify(text: str) -> str:
    """A KubeSpawner-style slug: lowercase letters, digits and dashes, at most 63 chars."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:63].rstrip("-")


# -- field readers: each takes the raw YAML value and returns the typed one ------------


def _as_written(value: Any) -> str:
    """A YAML value as the admin wrote it: text quoted, a boolean or number bare, so that
    `default: "true"` reads as text and `cpu_limit: yes` as the boolean YAML made of it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return "an empty value"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return show(value)


def _not(value: Any) -> str:
    if not isinstance(value, str):
        return f"not {_as_written(value)}"
    try:
        bare = yaml.safe_load(value)
    except yaml.YAMLError:
        bare = value
    unquote = " (write it without quotes)" if isinstance(bare, (bool, int, float)) else ""
    return f"not the text {show(value)}{unquote}"


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _FieldError("must be non-empty text")
    return value.strip()


def _optional_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _FieldError("must be text")
    return value.strip()


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _FieldError(f"must be true or false, {_not(value)}")
    return value


def _slug(value: Any) -> str:
    if not isinstance(value, str) or not _SLUG.match(value):
        raise _FieldError(f"{_as_written(value)} must be 1-63 lowercase letters, digits or dashes")
    return value


def _gpu_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_GPUS:
        raise _FieldError(f"must be a whole number from 0 to {MAX_GPUS}, {_not(value)}")
    return value


def _cpu_limit(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:  # .nan too
        raise _FieldError(f"must be a positive number of CPUs, {_not(value)}")
    return float(value)


def _mem_limit(value: Any) -> int:
    # ByteSpecification takes True as 1 byte and 1.5 as 1: neither is what the admin meant.
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise _FieldError(f"{_as_written(value)} is not a size such as 8G, 512M or a number of bytes")
    try:
        limit = ByteSpecification().validate(None, value)
    except TraitError:
        raise _FieldError(f"{_as_written(value)} is not a size such as 8G, 512M or a number of bytes")
    if not isinstance(limit, int) or limit <= 0:
        raise _FieldError(f"{_as_written(value)} must be a positive size such as 8G")
    if limit < DOCKER_MIN_MEMORY:
        raise _FieldError(f"{_as_written(value)} is under Docker's minimum of 6M (a bare number is bytes: write 2G, 512M)")
    return limit


def _cuda(value: Any) -> str:
    if isinstance(value, float):
        raise _FieldError(f'write the version as quoted text (cuda: "{value}"): YAML reads 12.10 as 12.1')
    if isinstance(value, int) and not isinstance(value, bool):
        raise _FieldError(f'write the version as quoted text (cuda: "{value}")')
    if not isinstance(value, str) or not _CUDA_VERSION.match(value.strip()):
        raise _FieldError(f'{_as_written(value)} must be a CUDA version such as "11.8" or "12.4"')
    return value.strip()


def _minutes(value: Any) -> float:
    # .nan would compare as never idle long enough (culling off without a word); .inf is 0's "off" in disguise
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise _FieldError(f"must be a number of minutes (0 turns culling off), {_not(value)}")
    return float(value)


def _names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _FieldError("must be a list of names")
    return tuple(v.strip() for v in value)


_FIELDS: dict[str, Callable[[Any], Any]] = {
    "display_name": _text,
    "description": _optional_text,
    "slug": _slug,
    "default": _flag,
    "environment": lambda value: None,  # read by ProfileCatalog._read_environment: it needs the file's folder
    "gpus": _gpu_count,
    "gpu_model": _text,
    "cpu_limit": _cpu_limit,
    "mem_limit": _mem_limit,
    "cuda": _cuda,
    "gpu_idle_timeout": _minutes,
    "allowed_groups": _names,
    "allowed_users": _names,
    "allow_custom_environment": _flag,
}


# profile_list fields of KubeSpawner that CondaSpawner does not read (README, Profiles)
_KUBESPAWNER_ONLY = frozenset({"kubespawner_override", "profile_options"})


class _SetTwice(yaml.YAMLError):
    """A key written twice in one mapping of a profile file: ``str(error)`` names its line and key."""


class _ProfileLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping, where YAML keeps the last one
    silently: an `allowed_groups: []` added below a course's `allowed_groups: [dl-course]` would
    open its profile to everyone, and no message would say so."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        # As written (composed once, before any `<<` merge flattens it), keys compared as the dict will hold
        # them (`yes` and `true` are one key, `1` and `'1'` two); `<<` merges are no key of their own.
        node = super().compose_mapping_node(anchor)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            constructor = self.yaml_constructors.get(key_node.tag)
            key = constructor(self, key_node) if constructor is not None else key_node.value  # as the dict will hold it
            if key in seen:
                raise _SetTwice(f"line {key_node.start_mark.line + 1}: {show(key_node.value)} is set twice in "
                                "one mapping (YAML would keep the last one): keep one")
            seen.add(key)
        return node


class ProfileCatalog(Configurable):
    """The admin's profiles, loaded from ``profiles_dir``, and who may use which."""

    profiles_dir = Unicode(
        "profiles",
        config=True,
        help="""Directory holding one YAML file per profile (relative to the hub's working directory).

        Each file is one entry of KubeSpawner's profile_list (`display_name`, `description`,
        `slug`, `default`; not `kubespawner_override` or `profile_options`), plus `environment`,
        `gpus`, `gpu_model`, `cuda`, `cpu_limit`, `mem_limit` (at the top level), `gpu_idle_timeout`
        (minutes), `allowed_groups`, `allowed_users` and `allow_custom_environment`. The hub reads
        the folder again when a file in it changes.

        c.ProfileCatalog.profiles_dir = "/etc/jupyterhub/profiles"
        """,
    )

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.profiles: list[Profile] = []
        self.spec_policy = SpecPolicy(parent=self)
        self._loaded_signature: tuple | None = None  # None: never loaded
        # The environment files the profile files named at the last load: one outside the folder
        # (environment: ../course-repo/environment.yml) is watched too.
        self._environment_files: set[Path] = set()

    def files_signature(self) -> tuple:
        """Names, sizes and mtimes of every file under the profiles folder, and of the environment
        files the profiles name elsewhere: changes when an admin edits."""
        directory = Path(self.profiles_dir)
        if not directory.is_dir():
            return ()
        inside = [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in directory.rglob("*") if p.is_file()]
        return tuple(sorted(inside)) + tuple(sorted(_stat(path) for path in self._environment_files))

    def reload_if_changed(self) -> list[str]:
        """Load the first time, then reload when the files changed. On problems keep the
        previous profiles; with none yet (a hub started on a broken file), serve the files
        that load, less those whose slug another file also uses (ProfileError when none is
        left). Returns the problems."""
        signature = self.files_signature()
        if signature == self._loaded_signature:
            return []
        try:
            self.load()
        except ProfileError as error:
            if not self.profiles:
                if not error.usable:
                    raise
                self.profiles = error.usable
            self._loaded_signature = self.files_signature()  # report a broken edit once, not on every spawn
            return error.problems
        return []

    def load(self) -> list[Profile]:
        """(Re)load every profile file; raise ProfileError listing every problem found."""
        directory = Path(self.profiles_dir)
        if not directory.is_dir():
            where = "" if directory.is_absolute() else f" (relative to the current folder: {directory.absolute()})"
            raise ProfileError([f"{directory}: profiles directory not found{where}: set "
                                "c.ProfileCatalog.profiles_dir to the folder of the profile files"])
        files = sorted(p for p in directory.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file())
        self._environment_files = set()
        problems: list[str] = []
        profiles = []
        for path in files:
            profile = self._load_file(path, problems)
            if profile is not None:
                profiles.append(profile)
        conflicts = _catalog_problems(profiles)
        problems += conflicts
        if not profiles and not problems:
            problems.append(f"{directory}: no profile files (*.yaml, *.yml)")
        if problems:
            raise ProfileError(problems, usable=_without_conflicts(profiles))
        self.profiles = profiles
        self._loaded_signature = self.files_signature()
        return profiles

    def visible_to(self, user: str, groups: Iterable[str] = (),
                   normalize: Callable[[str], str] | None = None) -> list[Profile]:
        groups = list(groups)
        return [profile for profile in self.profiles if profile.allows(user, groups, normalize)]

    def default_for(self, user: str, groups: Iterable[str] = (),
                    normalize: Callable[[str], str] | None = None) -> Profile | None:
        """The user's default: the visible profile marked ``default``, else the first visible."""
        visible = self.visible_to(user, groups, normalize)
        return next((p for p in visible if p.default), visible[0] if visible else None)

    def get(self, slug: str) -> Profile:
        """The profile with this slug; KeyError if none."""
        for profile in self.profiles:
            if profile.slug == slug:
                return profile
        raise KeyError(slug)

    # -- one file ------------------------------------------------------------------

    def _load_file(self, path: Path, problems: list[str]) -> Profile | None:
        try:
            document = yaml.load(path.read_text(encoding="utf-8"), Loader=_ProfileLoader)  # noqa: S506 (a SafeLoader)
        except _SetTwice as twice:
            problems.append(f"{path}: {twice}")
            return None
        except yaml.MarkedYAMLError as error:  # where, and what was expected there
            problems.append(f"{path}: {describe_yaml_error(error)}")
            return None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            problems.append(f"{path}: cannot read: {str(error).splitlines()[0]}")
            return None
        if isinstance(document, list) and document and all(isinstance(entry, dict) for entry in document):
            # KubeSpawner's whole profile_list (Z2JH's singleuser.profileList), pasted into one file
            problems.append(f"{path}: a list of {len(document)} profiles (KubeSpawner's profile_list): write one "
                            "profile per file, each a mapping of its fields")
            return None
        if not isinstance(document, dict):
            problems.append(f"{path}: must be a mapping of profile fields")
            return None
        if "dependencies" in document and "display_name" not in document:
            problems.append(f"{path}: looks like an environment.yml; keep those in a subfolder such as envs/")
            return None
        found_before = len(problems)
        values = self._read_fields(path, document, problems)
        values["environment"], environment_source = self._read_environment(path, document, values, problems)
        if "display_name" not in document:
            problems.append(f"{path}: display_name: required")
        if values.get("gpu_model") and not values.get("gpus"):
            problems.append(f"{path}: gpu_model: set gpus to 1 or more to choose a GPU model")
        if values.get("gpu_idle_timeout") and not values.get("gpus"):
            problems.append(f"{path}: gpu_idle_timeout: only GPU profiles are culled for idle GPUs (set gpus)")
        if len(problems) > found_before:
            return None
        values.setdefault("slug", slugify(values["display_name"]) or slugify(path.stem))
        return Profile(source=str(path), environment_source=environment_source, **values)

    def _read_fields(self, path: Path, document: dict, problems: list[str]) -> dict[str, Any]:
        values = {}
        for key, raw in document.items():
            reader = _FIELDS.get(key)
            if reader is None:
                hint = difflib.get_close_matches(str(key), _FIELDS, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                if key in _KUBESPAWNER_ONLY:  # a profile_list entry copied from a KubeSpawner hub
                    suggestion = (" (KubeSpawner's, not read here: write its cpu_limit, mem_limit, gpus ... "
                                  "at the profile's top level)")
                problems.append(f"{path}: unknown field {show(key)}{suggestion}")
                continue
            try:
                values[key] = reader(raw)
            except _FieldError as error:
                problems.append(f"{path}: {key}: {error}")
        return values

    def _read_environment(
        self, path: Path, document: dict, values: dict[str, Any], problems: list[str]
    ) -> tuple[EnvironmentSpec | None, str | None]:
        try:
            environment, source = self._environment(path, document.get("environment"))
        except _FieldError as error:
            problems.append(f"{path}: environment: {error}")
            return None, None
        if environment is None and not values.get("allow_custom_environment", False):
            problems.append(f"{path}: environment: required unless allow_custom_environment is true")
        return environment, source

    def _environment(self, path: Path, value: Any) -> tuple[EnvironmentSpec | None, str | None]:
        if value is None:
            return None, None
        try:
            if isinstance(value, dict):
                return self.spec_policy.parse_mapping(value), "inline"
            if isinstance(value, str) and value.strip():
                env_path = path.parent / value.strip()
                self._environment_files.add(env_path)
                return self.spec_policy.parse(_read_bytes(env_path)), str(env_path)
        except SpecError as error:
            raise _FieldError(f"{value if isinstance(value, str) else 'inline'}: {error.detail}")
        raise _FieldError("must be a path to an environment.yml (relative to this file) or a mapping")


def _stat(path: Path) -> tuple[str, int, int]:
    """A file's name, mtime and size for the signature; a missing one is (name, -1, -1)."""
    try:
        stat = path.stat()
    except OSError:
        return str(path), -1, -1
    return str(path), stat.st_mtime_ns, stat.st_size


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise SpecError(f"cannot read ({error.strerror})")


def _without_conflicts(profiles: list[Profile]) -> list[Profile]:
    """What a hub with no profiles loaded yet serves despite conflicts: one course's copied file
    (its slug left unchanged) does not take every other course down. The files that share a
    slug are all left out (which one is meant?); with several defaults, none is the default."""
    slugs = Counter(profile.slug for profile in profiles)
    kept = [profile for profile in profiles if slugs[profile.slug] == 1]
    if sum(profile.default for profile in kept) > 1:
        kept = [dataclasses.replace(profile, default=False) for profile in kept]
    return kept


def _catalog_problems(profiles: list[Profile]) -> list[str]:
    """Problems that span files: duplicate slugs, more than one default."""
    problems = []
    seen: dict[str, str] = {}
    for profile in profiles:
        if profile.slug in seen:
            problems.append(f"{profile.source}: slug: {profile.slug!r} is also used by {seen[profile.slug]}")
        seen.setdefault(profile.slug, profile.source)
    defaults = [p.source for p in profiles if p.default]
    if len(defaults) > 1:
        problems.append(f"default: more than one profile is the default ({', '.join(defaults)})")
    return problems
