"""Resolve an EnvironmentSpec to a lock, and install a lock into a staging prefix.

This is the one module that talks to py-rattler's solver and installer; its quirks
(pinned in pyproject.toml) are wrapped here. Channel names from a spec are mapped to
URLs under ``channel_alias`` (conda-forge in production, a local ``file://``
channel on the test bench): only the URL differs, never the code path.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import difflib
import errno
import hashlib
import json
import os
import platform as host_platform
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rattler
from rattler import (
    BuildString,
    GenericVirtualPackage,
    LockChannel,
    LockFile,
    LockPlatform,
    MatchSpec,
    PackageName,
    RepoDataRecord,
    Subdir,
    Version,
)
from traitlets import Dict, List, Unicode, default
from traitlets.config import Configurable

from .installer import InstallerCrashed, InstallJob, shared_installers
from .oneline import one_line
from .packagepaths import UnreadablePackageError, UnsafePackageError, check_records
from .spec import EnvironmentSpec
from .traittypes import FiniteFloat

LOCK_ENVIRONMENT = "default"
# `nodefaults` only removes `defaults` from the channel list; it is not a channel.
NO_DEFAULTS = "nodefaults"
# A solver explains a conflict as a tree that ends with its cause: room for most of them.
_MESSAGE_CHARS = 1500
# What py-rattler's solver says when a spec matches nothing; and how near a channel's
# package name must be to a missing one to be offered (difflib's ratio).
_NO_CANDIDATES = "No candidates were found for"
# ...and when a package's requirement matches nothing the rest of the request allows: it says so of
# the requirement even where the channels have versions that match it, which another spec excludes.
_REQUIRES_NOTHING = re.compile(r"└─ (?P<who>\S+ \S+) would require └─ (?P<name>[^\s,]+) (?P<range>.+?), "
                               r"for which no candidates were found")
# rattler, when a channel answers that it has no such subdir (an HTTP 404, a missing folder).
_NO_SUBDIR = "could not find subdir 'noarch' in channel"
_NEAR_NAME_CUTOFF = 0.75
# A version written into a package's name, as in a package file's name (`numpy-1.26.4`).
_VERSION_IN_NAME = re.compile(r"(?P<name>.+)-(?P<version>\d+(\.\d+)+)\Z")
_MOST_HINTS = 8  # names hinted at after a failed solve, then "and N more"
_MOST_VERSIONS = 6  # the newest versions shown of a package the spec asks for in another one
# Anaconda's `defaults` does not live under conda.anaconda.org.
ANACONDA_DEFAULTS = {
    "defaults": "https://repo.anaconda.com/pkgs/main",
    "pkgs/main": "https://repo.anaconda.com/pkgs/main",
    "pkgs/r": "https://repo.anaconda.com/pkgs/r",
}


class ResolveError(Exception):
    """A spec that cannot be resolved or installed: ``str(error)`` is one line for the user.

    ``unreachable``: a channel could not be reached, so a retry may succeed.
    ``no_space``: a disk filled up (the message may have lost the cause in its cut).
    ``details``: the solver's own text, lines and all (a conflict's tree), for the build log.
    """

    def __init__(self, message: str, *, unreachable: bool = False, no_space: bool = False, details: str = ""):
        super().__init__(message)
        self.unreachable = unreachable
        self.no_space = no_space
        self.details = details


@dataclass
class Lock:
    """The exact packages of one environment, for one platform."""

    records: list[RepoDataRecord]
    platform: str
    channels: list[str]
    virtual_packages: list[str]

    def packages(self) -> list[dict[str, str]]:
        """One dict per package (name, version, build, url, sha256), sorted by name."""
        return [
            {
                "name": record.name.normalized,
                "version": str(record.version),
                "build": str(record.build),
                "url": record.url,
                "sha256": record.sha256.hex() if record.sha256 else "",
            }
            for record in sorted(self.records, key=lambda r: r.name.normalized)
        ]

    def digest(self) -> str:
        """sha256 over the locked URLs and hashes: equal digests, identical installs."""
        lines = sorted(f"{p['url']} {p['sha256']}" for p in self.packages())
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "platform": self.platform,
                "channels": self.channels,
                "virtual_packages": self.virtual_packages,
                "digest": self.digest(),
                "packages": self.packages(),
            },
            indent=2,
        )

    def write(self, path: Path) -> None:
        """Write a rattler lock file (the format pixi uses) that :meth:`read` takes back."""
        lock_platform = LockPlatform(self.platform, virtual_packages=self.virtual_packages)
        lock_file = LockFile([lock_platform])
        lock_file.set_channels(LOCK_ENVIRONMENT, [LockChannel(url) for url in self.channels])
        for record in self.records:
            lock_file.add_conda_package(LOCK_ENVIRONMENT, lock_platform, record)
        lock_file.to_path(path)

    @classmethod
    def read(cls, path: Path) -> "Lock":
        try:
            lock_file = LockFile.from_path(path)
        except Exception as error:  # py-rattler's parse errors have no common base
            raise ResolveError(f"{path}: not a lock file ({_one_line(error)})")
        environment = lock_file.environment(LOCK_ENVIRONMENT)
        if environment is None or not lock_file.platforms():
            raise ResolveError(f"{path}: lock file has no '{LOCK_ENVIRONMENT}' environment")
        lock_platform = lock_file.platforms()[0]
        records = environment.conda_repodata_records_for_platform(lock_platform) or []
        return cls(
            records=records,
            platform=lock_platform.name,
            channels=[str(channel) for channel in environment.channels()],
            virtual_packages=list(lock_platform.virtual_packages or []),
        )


class Resolver(Configurable):
    """Solve specs against the configured channels and install locks into staging prefixes."""

    channel_alias = Unicode(
        "https://conda.anaconda.org/",
        config=True,
        help="""URL under which channel names resolve: `<channel_alias>/<name>`.

        Point it at a mirror, or at a local channel directory with file://.

        c.Resolver.channel_alias = "https://conda-mirror.example.edu/"
        """,
    )
    channel_urls = Dict(
        config=True,
        help="""Channel names that do not live under channel_alias, mapped to their URLs.

        `defaults`, `pkgs/main` and `pkgs/r` map to repo.anaconda.com unless set here.
        Users can read these URLs (every image's lock, the lock download): keep credentials
        out of them; py-rattler reads a private channel's from the hub's RATTLER_AUTH_FILE
        (JSON by host name) or ~/.netrc.

        c.Resolver.channel_urls = {"defaults": "https://mirror.example.edu/pkgs/main",
                                   "my-lab": "file:///srv/conda/my-lab"}
        """,
    )
    default_channels = List(
        Unicode(),
        default_value=["conda-forge"],
        config=True,
        help="""Channels used when an environment.yml lists none.

        c.Resolver.default_channels = ["conda-forge"]
        """,
    )
    platform = Unicode(
        "linux-64",
        config=True,
        help="""Conda platform of the images (the GPU hosts' architecture).

        c.Resolver.platform = "linux-aarch64"
        """,
    )
    glibc_version = Unicode(
        "2.36",
        config=True,
        help="""glibc of the base image, solved as the __glibc virtual package (Debian bookworm: 2.36).

        c.Resolver.glibc_version = "2.35"
        """,
    )
    solve_timeout = FiniteFloat(
        300,
        min=1,
        config=True,
        help="""Seconds a solve may take before it fails with a timeout message.

        c.Resolver.solve_timeout = 600
        """,
    )
    package_cache_dir = Unicode(
        config=True,
        help="""Package cache shared by every install (downloads and extracted packages), and by
        default the byte-code cache (ImageBuilder.bytecode_cache_dir). "" (the default):
        ~/.cache/condaspawner/pkgs of the hub's user.

        c.Resolver.package_cache_dir = "/var/cache/condaspawner/pkgs"
        """,
    )

    @default("package_cache_dir")
    def _default_package_cache_dir(self) -> str:
        return str(Path.home() / ".cache" / "condaspawner" / "pkgs")

    # -- channels ------------------------------------------------------------------

    def channel_url(self, name: str) -> str:
        """The URL a channel name stands for."""
        if name in self.channel_urls:
            return self.channel_urls[name].rstrip("/")
        owner, is_label, label = name.partition("/label/")
        if is_label and owner in self.channel_urls:  # a label of a mirrored channel: on that mirror
            return f"{self.channel_urls[owner].rstrip('/')}/label/{label}"
        if name in ANACONDA_DEFAULTS:
            return ANACONDA_DEFAULTS[name]
        return f"{self.channel_alias.rstrip('/')}/{name}"

    def channel_urls_for(self, spec: EnvironmentSpec) -> list[str]:
        """The spec's channels as URLs, in order, plus those named by `channel::package` specs."""
        return list(dict.fromkeys(self.channel_url(name) for name in self._channel_names(spec)))

    def _channel_names(self, spec: EnvironmentSpec) -> list[str]:
        """The spec's channel names (the default channels when it names none), then those of its
        `channel::package` specs."""
        names = [name for name in spec.channels if name != NO_DEFAULTS] or list(self.default_channels)
        return names + [_channel_name(text) for text in spec.conda if "::" in text]

    def _solver_spec(self, text: str) -> MatchSpec:
        """The spec for the solver: `channel[/subdir]::pkg` rewritten so the channel is our URL, not
        anaconda.org's; parsed as the spec check parsed it (leniently: a PyTorch build string such
        as ``py3.10_cuda11.8_cudnn8.7.0_0`` has dots, which a spec string given to the solver may not)."""
        match_spec = MatchSpec(text)
        if "::" not in text:
            return match_spec
        rest = text.split("::", 1)[1]
        url = self.channel_url(_channel_name(text))
        subdir = f"/{match_spec.subdir}" if match_spec.subdir else ""
        return MatchSpec(f"{url}{subdir}::{rest}")

    # -- solving -------------------------------------------------------------------

    def virtual_packages(self, cuda: str | None) -> list[GenericVirtualPackage]:
        """What the image's runtime provides: unix, linux, glibc, archspec and (if set) CUDA."""
        packages = [
            ("__unix", "0", "0"),
            ("__linux", _host_kernel_version(), "0"),
            ("__glibc", self.glibc_version, "0"),
            ("__archspec", "1", host_platform.machine() or "x86_64"),
        ]
        if cuda:
            packages.append(("__cuda", cuda, "0"))
        return [GenericVirtualPackage(PackageName(n), Version(v), BuildString(b)) for n, v, b in packages]

    async def solve(self, spec: EnvironmentSpec, cuda: str | None = None) -> Lock:
        """Solve the spec's conda dependencies; ResolveError with a one-line reason on failure."""
        self._check_subdirs(spec)
        channels = self.channel_urls_for(spec)
        virtual = self.virtual_packages(cuda)
        try:
            records = await asyncio.wait_for(
                rattler.solve(
                    channels,
                    [self._solver_spec(text) for text in spec.conda],
                    platforms=[Subdir(self.platform), Subdir("noarch")],
                    virtual_packages=virtual,
                    timeout=datetime.timedelta(seconds=self.solve_timeout),
                    # conda's default: every python brings pip (the pip: section needs it).
                    add_pip_as_python_dependency=True,
                ),
                timeout=self.solve_timeout + 5,
            )
        except asyncio.TimeoutError:
            raise ResolveError(f"solve took longer than {self.solve_timeout:g} s (Resolver.solve_timeout)")
        except Exception as error:  # rattler raises SolverError, FetchRepoDataError, ...
            unreachable = error.__class__.__name__ == "GatewayError"
            missing = self._missing_channel(error, spec) if unreachable else None
            if missing is not None:  # answered, with "no such channel": a retry never helps
                raise ResolveError(f"cannot solve: the channel {missing!r} does not exist on this hub (it has no "
                                   f"noarch packages): {_without_channel(missing, spec)}", details=str(error)) from None
            message = self._explain(error, cuda)
            if not unreachable and _NO_CANDIDATES in message:
                message = _one_line(message + await self._missing_names(channels, spec, message))
            elif not unreachable and _REQUIRES_NOTHING.search(message):
                message = _one_line(message + await self._excluded_requirements(channels, spec, message))
            if not unreachable:
                message = self._named_channels(message, spec)
            raise ResolveError(message, unreachable=unreachable, details=str(error)) from None
        return Lock(
            records=records,
            platform=self.platform,
            channels=channels,
            virtual_packages=[f"{p.name.normalized}={p.version}={p.build_string}" for p in virtual],
        )

    def _named_channels(self, message: str, spec: EnvironmentSpec) -> str:
        """The solver's ``message`` with the channel URLs of `channel::package` specs (the
        hub's mirror, a file:// path) put back as the names the user wrote."""
        for name in self._channel_names(spec):
            url = self.channel_url(name)
            message = message.replace(f'"{url}/"', f'"{name}"').replace(f'"{url}"', f'"{name}"')
        return message

    def _check_subdirs(self, spec: EnvironmentSpec) -> None:
        """A spec for another platform (`conda-forge/win-64::numpy`, `numpy[subdir=osx-arm64]`) would
        be solved for this one without a word: refused instead."""
        for text in spec.conda:
            subdir = MatchSpec(text).subdir
            if subdir and subdir not in (self.platform, "noarch"):
                raise ResolveError(f"cannot solve: {text!r} asks for {subdir} packages, and this hub builds "
                                   f"for {self.platform}: remove {subdir!r} from it")

    def _missing_channel(self, error: Exception, spec: EnvironmentSpec) -> str | None:
        """The spec's channel the channel server (or folder) says does not exist, or None.

        Only a channel the user's file makes up (a label, or a name under the channel alias):
        one the admin configured (channel_urls, default_channels) is the admin's to fix.
        """
        text = str(error)
        if _NO_SUBDIR not in text:
            return None
        names = [name for name in self._channel_names(spec)
                 if name not in self.default_channels and name not in self.channel_urls]
        found = [name for name in names if f"'{self.channel_url(name)}/'" in text or f"'{self.channel_url(name)}'" in text]
        return found[0] if found else None

    def _explain(self, error: Exception, cuda: str | None) -> str:
        message = _one_line(error).removeprefix("Cannot solve the request because of: ")
        if error.__class__.__name__ == "GatewayError":  # fetching repodata failed
            return f"a channel cannot be reached: {_first_and_root_cause(error)}"
        if "__cuda" in message and not cuda:
            return (
                f"cannot solve: {message} - this environment needs a CUDA GPU: pick a GPU profile "
                '(the hub admin gives a profile its cuda version, e.g. cuda: "12.4")'
            )
        return f"cannot solve: {message}"

    async def _missing_names(self, channels: list[str], spec: EnvironmentSpec, message: str) -> str:
        """`` (nothing provides cs-gamaa; did you mean cs-gamma?)`` for the spec's names no channel has,
        and ``python: the channels have 3.9.2, 3.9.18`` for a name they have in no version the spec
        allows (the solver's ``message`` names it); at most :data:`_MOST_HINTS` of them."""
        platforms = [Subdir(self.platform), Subdir("noarch")]
        try:
            available = sorted(name.normalized for name in await rattler.Gateway().names(channels, platforms))
        except Exception:  # the solve's own reason stands alone
            return ""
        known = set(available)
        hints = []
        for text in spec.conda:
            name = MatchSpec(text).name
            if name is None or name.normalized.startswith("__"):
                continue
            if name.normalized in known:
                if f"{_NO_CANDIDATES} {name.normalized} " in message:
                    hints.append(await self._versions_hint(channels, platforms, name.normalized, text))
                continue
            versioned = _VERSION_IN_NAME.match(name.normalized)
            near = ([f"{versioned['name']}={versioned['version']}"] if versioned and versioned["name"] in known
                    else difflib.get_close_matches(name.normalized, available, n=2, cutoff=_NEAR_NAME_CUTOFF)
                    or _affixed(name.normalized, available))
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            hints.append(f"nothing provides {name.normalized}{hint}")
        hints = [hint for hint in hints if hint]
        if len(hints) > _MOST_HINTS:
            hints = [*hints[:_MOST_HINTS], f"and {len(hints) - _MOST_HINTS} more"]
        return f" ({'; '.join(hints)})" if hints else ""

    async def _excluded_requirements(self, channels: list[str], spec: EnvironmentSpec, message: str) -> str:
        """`` (cs-alpha >=1.1,<2, which cs-beta 1.0 requires: the channels have 1.1, which 'cs-alpha>=2'
        excludes)`` for each requirement the solver says has "no candidates" where the channels do
        have versions that match it: the spec's own entries for that name rule them out (or, with no
        entry of its name, another requirement does). At most :data:`_MOST_HINTS` of them."""
        platforms = [Subdir(self.platform), Subdir("noarch")]
        hints = []
        for found in list(_REQUIRES_NOTHING.finditer(message))[:_MOST_HINTS]:
            name, needed, who = found["name"], found["range"], found["who"]
            try:
                records = [record for records in await rattler.Gateway().query(
                    channels, platforms, [MatchSpec(f"{name} {needed}")], recursive=False) for record in records]
            except Exception:  # the solver's own words stand alone
                continue
            versions = sorted({record.version for record in records})
            if not versions:
                continue  # the channels have none indeed
            shown = ", ".join(str(version) for version in versions[-_MOST_VERSIONS:])
            own = [text for text in spec.conda
                   if (spec_name := MatchSpec(text).name) is not None and spec_name.normalized == name]
            excluded = (f"which {' and '.join(repr(text) for text in own)} exclude{'s' if len(own) == 1 else ''}"
                        if own else "which another requirement excludes")
            hints.append(f"{name} {needed}, which {who} requires: the channels have {shown}, {excluded}")
        return f" ({'; '.join(hints)})" if hints else ""

    async def _versions_hint(self, channels: list[str], platforms: list[Subdir], name: str, text: str) -> str:
        """``numpy: the channels have 1.26.4, 2.0.2, none matching 'numpy 9.9.*'``: the newest versions
        there, for a spec that none of them matches; nothing for one that some of them match (listed
        beside another spec of its name, ``numpy=2.0`` and ``numpy=1.26``: the other is the one)."""
        try:
            found = await rattler.Gateway().query(channels, platforms, [MatchSpec(name)], recursive=False)
        except Exception:
            return ""
        records = [record for records in found for record in records]
        versions = sorted({record.version for record in records})
        if not versions or any(MatchSpec(text).matches(record) for record in records):
            return ""
        wanted = MatchSpec(text)
        if wanted.build and wanted.version:  # the version is there, in other builds: a build string exported elsewhere
            version_only = MatchSpec(f"{name} {wanted.version}")
            builds = sorted({str(record.build) for record in records if version_only.matches(record)})
            if builds:
                more = f" and {len(builds) - _MOST_VERSIONS} more" if len(builds) > _MOST_VERSIONS else ""
                exported = "" if "*" in str(wanted.build) else (
                    ": a build string from another platform's export? `conda env export --no-builds` leaves them out")
                return (f"{name}: the channels have {wanted.version.lstrip('=')} only as build "
                        f"{', '.join(builds[:_MOST_VERSIONS])}{more}, none matching build {wanted.build!r}{exported}")
        shown = ", ".join(str(version) for version in versions[-_MOST_VERSIONS:])
        more = f" and {len(versions) - _MOST_VERSIONS} older" if len(versions) > _MOST_VERSIONS else ""
        return f"{name}: the channels have {shown}{more}, none matching {text!r}"

    # -- installing ----------------------------------------------------------------

    def not_in_cache(self, lock: Lock) -> list[RepoDataRecord]:
        """The locked packages the shared package cache lacks (what an install will download)."""
        cache = Path(self.package_cache_dir)
        return [record for record in lock.records
                if not (cache / f"{record.name.normalized}-{record.version}-{record.build}").is_dir()]

    async def install(self, lock: Lock, staging_prefix: Path, target_prefix: str) -> int:
        """Link the locked packages into ``staging_prefix`` as if it lived at ``target_prefix``,
        in a child process (installer.py): a crash of the installer fails this install only.
        The bytes installed (each hard-linked file once).

        Link scripts never run: user packages never execute code on the hub host.
        """
        Path(self.package_cache_dir).mkdir(parents=True, exist_ok=True)
        await self._check_paths(lock)
        handle, lock_path = tempfile.mkstemp(prefix="condaspawner-install-", suffix=".lock")
        os.close(handle)
        try:
            await asyncio.to_thread(lock.write, Path(lock_path))
            outcome = await shared_installers().run(
                InstallJob(lock_path, str(staging_prefix), str(self.package_cache_dir), target_prefix))
        except InstallerCrashed as error:
            raise ResolveError(f"install failed: {error}") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
        if outcome.error:
            raise ResolveError(outcome.error, no_space=outcome.no_space)
        return outcome.size

    async def _check_paths(self, lock: Lock) -> None:
        """Refuse a package that lists a path outside its prefix: rattler's installer would abort the
        whole hub process on it (packagepaths)."""
        try:
            await check_records(lock.records, Path(self.package_cache_dir))
        except UnsafePackageError as error:
            raise ResolveError(f"install failed: {_one_line(error)}") from None
        except UnreadablePackageError as error:
            raise ResolveError(f"install failed: {_one_line(error)}", unreachable=True,
                               no_space=is_no_space(error)) from None


def install_error(error: BaseException) -> tuple[str, bool]:
    """The one line of a failed install, and whether a disk was full."""
    return f"install failed: {_one_line(error)}", is_no_space(error)


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` (an OSError, or rattler's text of one) is a full disk (ENOSPC)."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error).lower()  # Go's (Docker's) text is lower-case, Rust's and Python's capitalised
    return "no space left on device" in text or "os error 28" in text


def make_world_readable(root: Path) -> int:
    """chmod a+rX: rattler writes conda-meta/*.json with mode 0600, unreadable by the image's user.
    The bytes of the files under ``root``, each hard-linked file once (staged environments link into
    the package cache): the same walk, so that the build need not walk thousands of files again."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, dirnames, filenames in os.walk(root):
        for index, name in enumerate([*filenames, *dirnames]):
            path = os.path.join(directory, name)
            status = os.lstat(path)
            mode = status.st_mode
            if index < len(filenames) and (status.st_dev, status.st_ino) not in seen:
                seen.add((status.st_dev, status.st_ino))
                total += status.st_size
            if stat.S_ISLNK(mode):
                continue
            wanted = mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
            if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
                wanted |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
            if wanted != mode:
                os.chmod(path, stat.S_IMODE(wanted))
    return total


def _host_kernel_version() -> str:
    release = host_platform.release().split("-")[0]
    parts = [part for part in release.split(".") if part.isdigit()]
    return ".".join(parts[:3]) or "0"


def _first_and_root_cause(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line.removeprefix("Caused by:").strip() for line in lines if line.startswith("Caused by:")]
    return _one_line(f"{lines[0]}: {causes[-1]}" if causes else lines[0] if lines else error)


def _one_line(error: Any) -> str:
    return one_line(error, _MESSAGE_CHARS)


def _channel_name(text: str) -> str:
    """The channel of a validated `channel::package` spec (SpecPolicy refused URL channels)."""
    channel = MatchSpec(text).channel
    if channel is None or channel.name is None:
        raise ResolveError(f"{text!r} names no channel")
    return channel.name


def _without_channel(channel: str, spec: EnvironmentSpec) -> str:
    """What to change so that a missing channel is not asked for: the channels, or the
    `channel::package` spec that alone names it."""
    if channel in spec.channels:
        return "remove it from channels"
    named = next((text for text in spec.conda if "::" in text and _channel_name(text) == channel), None)
    return f"write {named.split('::', 1)[1]!r} instead of {named!r}" if named else "remove it from channels"


def _affixed(name: str, available: list[str]) -> list[str]:
    """Up to two names that are ``name`` with a dash-joined part before or after it: conda's
    ``python-dateutil`` for ``dateutil``, ``opencv-python`` for ``opencv`` (too short for difflib)."""
    return [other for other in available if other.endswith(f"-{name}") or other.startswith(f"{name}-")][:2]
