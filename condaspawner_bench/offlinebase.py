"""The offline base image, built where no registry or conda channel is reachable.

The same layout as the product's production base (jupyterhub_condaspawner/baseimage.py),
built locally in two steps:

1. ``build_rootfs_image``: mmdebstrap a minimal Debian bookworm, add the host's
   CA bundle and the ``jovyan`` user, and ``docker import`` it;
2. ``build_base_image``: ``offline.Dockerfile`` on top of it, copying in a staged
   conda prefix (``conda/`` in the build context) and pip-installing the
   single-user server from the product's ``images/singleuser-requirements.txt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import docker
from docker.utils import parse_repository_tag

from jupyterhub_condaspawner.baseimage import (
    BASE_CONDA_PREFIX,
    BASE_TAG,
    SINGLEUSER_INSTALL,
    SINGLEUSER_REQUIREMENTS,
    ImageBuildError,
    stream_build,
)
from jupyterhub_condaspawner.resolve import Resolver, make_world_readable
from jupyterhub_condaspawner.spec import EnvironmentSpec

from .basewheels import served
from .dockerd import (
    ROOTFS_TOOL_PACKAGES,
    ensure_debian_packages,
    log_tail,
    unmount_under,
)
from .phases import PhaseLog

log = logging.getLogger(__name__)

OFFLINE_DOCKERFILE = Path(__file__).resolve().parent / "offline.Dockerfile"

ROOTFS_TAG = "condaspawner-rootfs:bookworm"
BASE_RECIPE_LABEL = "io.condaspawner.base.recipe"
ROOTFS_SUITE = "bookworm"
# The system libraries a Python built from the host's CPython links against
# (sqlite3, readline, curses); tini reaps zombies as the container's PID 1.
ROOTFS_PACKAGES = (
    "python3",
    "ca-certificates",
    "libsqlite3-0",
    "libreadline8",
    "libncursesw6",
    "tini",
)
# Bump when the rootfs recipe changes in a way the inputs below don't show.
ROOTFS_RECIPE_VERSION = 1  # not bumped for mmdebstrap: it makes the same packages as debootstrap did
MERGED_USR_HOOK = Path("/usr/share/mmdebstrap/hooks/merged-usr")
RECIPE_LABEL = "io.condaspawner.rootfs.recipe"
BASE_PYTHON_LABEL = "io.condaspawner.base.python"

NB_USER, NB_UID, NB_GID, NB_HOME = "jovyan", 1000, 100, "/home/jovyan"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")
CA_BUNDLE_ENV = ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE")

APT_SOURCES_LIST = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
DEBIAN_SUITES = {"bullseye", "bookworm", "trixie", "forky", "sid",
                 "oldstable", "stable", "testing", "unstable"}


# --- rootfs image ---------------------------------------------------------------


def build_rootfs_image(
    client: docker.DockerClient,
    bench_dir: Path,
    *,
    tag: str = ROOTFS_TAG,
    mirror: str | None = None,
    phases: PhaseLog | None = None,
) -> str:
    """Build (or find in the cache) the Debian rootfs image; return its id.

    ``mirror`` defaults to the Debian mirror the host's apt uses. ``phases`` records
    how long mmdebstrap and the import took.
    """
    phases = phases or PhaseLog()
    recipe = rootfs_recipe()
    cached = _image_with_label(client, tag, RECIPE_LABEL, recipe)
    if cached:
        log.info("rootfs image %s is up to date (%s)", tag, cached)
        return cached
    with phases(f"rootfs image: mmdebstrap {ROOTFS_SUITE}") as phase:
        rootfs = Path(bench_dir) / "rootfs" / ROOTFS_SUITE
        if _rootfs_is_current(rootfs, recipe):
            phase.note = "the tree of an earlier run"
        ensure_rootfs(rootfs, recipe, mirror=mirror)
    with phases("rootfs image: docker import"):
        return import_rootfs(client, rootfs, tag=tag, changes=_rootfs_image_changes(recipe))


def rootfs_recipe() -> str:
    """A digest of everything that goes into the rootfs: the image cache key."""
    inputs = {
        "version": ROOTFS_RECIPE_VERSION,
        "suite": ROOTFS_SUITE,
        "packages": sorted(ROOTFS_PACKAGES),
        "user": [NB_USER, NB_UID, NB_GID, NB_HOME],
        "ca": _file_digest(HOST_CA_BUNDLE),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def ensure_rootfs(rootfs: Path, recipe: str, *, mirror: str | None = None) -> Path:
    """A trimmed bookworm tree at ``rootfs``, reused when its stamp says ``recipe``."""
    if _rootfs_is_current(rootfs, recipe):
        return rootfs
    stamp = _rootfs_stamp(rootfs)
    remove_rootfs(rootfs)
    stamp.unlink(missing_ok=True)
    bootstrap(rootfs, mirror=mirror or debian_mirror())
    install_host_ca_bundle(rootfs)
    add_notebook_user(rootfs)
    trim_rootfs(rootfs)
    stamp.write_text(recipe)
    return rootfs


def rootfs_tree_is_current(bench_dir: Path) -> bool:
    """Is the bootstrapped tree of an earlier run there and of today's recipe?"""
    return _rootfs_is_current(Path(bench_dir) / "rootfs" / ROOTFS_SUITE, rootfs_recipe())


def _rootfs_stamp(rootfs: Path) -> Path:
    return rootfs.with_name(rootfs.name + ".recipe")


def _rootfs_is_current(rootfs: Path, recipe: str) -> bool:
    return rootfs.is_dir() and _read_text(_rootfs_stamp(rootfs)) == recipe


def remove_rootfs(rootfs: Path) -> None:
    # An interrupted bootstrap leaves proc/sys mounted inside the tree.
    if rootfs.exists():
        unmount_under(rootfs)
        shutil.rmtree(rootfs)


def bootstrap(rootfs: Path, *, mirror: str) -> None:
    """A minimal Debian tree with mmdebstrap: the same packages as ``debootstrap --variant=minbase``
    (merged /usr, as bookworm's debootstrap makes it), in about half the time: apt fetches the
    packages in parallel and installs them in one dpkg run."""
    ensure_debian_packages(ROOTFS_TOOL_PACKAGES)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        f"--include={','.join(ROOTFS_PACKAGES)}",
        ROOTFS_SUITE,
        str(rootfs),
        mirror,
    ]
    if MERGED_USR_HOOK.is_dir():  # else mmdebstrap installs usrmerge, which pulls in perl
        command.insert(3, f"--hook-dir={MERGED_USR_HOOK}")
    log_file = rootfs.with_name(rootfs.name + ".bootstrap.log")
    started = time.monotonic()
    # No fsync per file in the throwaway tree (a crash leaves no stamp, so the next run starts over).
    env = {**os.environ, "DPKG_FORCE": "unsafe-io"}
    with open(log_file, "wb") as output:
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    unmount_under(rootfs)
    if result.returncode != 0:
        raise ImageBuildError(
            f"mmdebstrap {ROOTFS_SUITE} from {mirror} failed (status {result.returncode}).\n"
            + log_tail(log_file)
        )
    log.info("mmdebstrap %s took %.0f s", ROOTFS_SUITE, time.monotonic() - started)


def debian_mirror() -> str:
    """The Debian mirror from the host's apt sources (deb822 ``URIs:`` or sources.list)."""
    for uri, suites in _apt_sources():
        if DEBIAN_SUITES.intersection(suites):
            return uri
    raise ImageBuildError(
        f"No Debian mirror found in {APT_SOURCES_LIST} or {APT_SOURCES_DIR}/*.sources; "
        "pass mirror='http://deb.debian.org/debian' (or your mirror) explicitly."
    )


def _apt_sources() -> Iterator[tuple[str, list[str]]]:
    """(uri, suites) of every enabled ``deb`` source, in apt's reading order."""
    if APT_SOURCES_LIST.is_file():
        yield from _one_line_sources(APT_SOURCES_LIST.read_text())
    for path in sorted(APT_SOURCES_DIR.glob("*.list")):
        yield from _one_line_sources(path.read_text())
    for path in sorted(APT_SOURCES_DIR.glob("*.sources")):
        yield from _deb822_sources(path.read_text())


def _one_line_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [arch=amd64 signed-by=...]
            while words and not words[0].endswith("]"):
                words.pop(0)
            words = words[1:]
        if len(words) >= 2:
            yield words[0].rstrip("/"), [words[1]]


def _deb822_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    for stanza in text.split("\n\n"):
        fields = _deb822_fields(stanza)
        if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"]) == ["no"]:
            continue
        for uri in fields.get("uris", []):
            yield uri.rstrip("/"), fields.get("suites", [])


def _deb822_fields(stanza: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        name, value = line.split(":", 1)
        fields[name.strip().lower()] = value.split()
    return fields


def install_host_ca_bundle(rootfs: Path) -> None:
    """Trust what the host trusts: registries here are reached through a TLS-intercepting proxy."""
    shutil.copyfile(HOST_CA_BUNDLE, rootfs / HOST_CA_BUNDLE.relative_to("/"))
    # The individual extra CAs too, so update-ca-certificates in a derived image keeps them.
    if HOST_EXTRA_CA_DIR.is_dir():
        target = rootfs / HOST_EXTRA_CA_DIR.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        for cert in HOST_EXTRA_CA_DIR.glob("*.crt"):
            shutil.copyfile(cert, target / cert.name)


def add_notebook_user(rootfs: Path) -> None:
    """jovyan (uid 1000) in group users (gid 100), written directly: minbase has no useradd."""
    etc = rootfs / "etc"
    if not _has_entry(etc / "group", f"{NB_GID}", field=2):
        _append_line(etc / "group", f"users:x:{NB_GID}:")
    if not _has_entry(etc / "passwd", NB_USER):
        _append_line(etc / "passwd", f"{NB_USER}:x:{NB_UID}:{NB_GID}::{NB_HOME}:/bin/bash")
        _append_line(etc / "shadow", f"{NB_USER}:*:{int(time.time()) // 86400}:0:99999:7:::")
    home = rootfs / NB_HOME.lstrip("/")
    home.mkdir(parents=True, exist_ok=True)
    for skeleton in (etc / "skel").glob(".*"):
        shutil.copy2(skeleton, home / skeleton.name)
    for path in (home, *home.iterdir()):
        os.chown(path, NB_UID, NB_GID)
    home.chmod(0o755)


def _has_entry(path: Path, value: str, *, field: int = 0) -> bool:
    return any(
        line.split(":")[field] == value
        for line in path.read_text().splitlines()
        if line.count(":") >= field
    )


def _append_line(path: Path, line: str) -> None:
    text = path.read_text()
    separator = "" if not text or text.endswith("\n") else "\n"
    path.write_text(f"{text}{separator}{line}\n")


# Trimmed like Debian's -slim images; copyright files stay (licences travel with the image).
TRIM_GLOBS = (
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "usr/share/lintian/*",
    "var/lib/apt/lists/*_*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/*.log",
    "var/log/apt/*",
)
DPKG_SLIM_CONFIG = """\
# Keep later apt-get installs as small as the rootfs (as Debian's -slim images do).
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
"""


def trim_rootfs(rootfs: Path) -> None:
    for pattern in TRIM_GLOBS:
        for path in rootfs.glob(pattern):
            _remove(path)
    for path in (rootfs / "usr/share/doc").glob("*/*"):
        if path.name != "copyright":
            _remove(path)
    (rootfs / "etc/dpkg/dpkg.cfg.d/condaspawner-slim").write_text(DPKG_SLIM_CONFIG)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _rootfs_image_changes(recipe: str) -> list[str]:
    ca_bundle = str(HOST_CA_BUNDLE)
    return [
        f"LABEL {RECIPE_LABEL}={recipe}",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        *(f"ENV {name}={ca_bundle}" for name in CA_BUNDLE_ENV),
        'CMD ["/bin/bash"]',
    ]


def import_rootfs(
    client: docker.DockerClient, rootfs: Path, *, tag: str, changes: list[str]
) -> str:
    """``tar --numeric-owner -C rootfs -c . | docker import``, tagged ``tag``; return the id."""
    repository, image_tag = parse_repository_tag(tag)
    started = time.monotonic()
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        response = client.api.import_image_from_stream(
            _chunks(tar.stdout), repository=repository, tag=image_tag, changes=changes
        )
    finally:
        tar.stdout.close()
        tar_errors = tar.stderr.read().decode(errors="replace")
        tar.wait()
    if tar.returncode != 0:
        raise ImageBuildError(f"tar of {rootfs} failed:\n{tar_errors}")
    _raise_on_stream_error(response, f"docker import of {rootfs}")
    image_id = client.images.get(tag).id
    log.info("imported %s as %s in %.1f s", rootfs, tag, time.monotonic() - started)
    return image_id


def _chunks(stream: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    # A generator makes requests send chunked: a pipe has no length to announce.
    while chunk := stream.read(size):
        yield chunk


def _raise_on_stream_error(response: str, what: str) -> None:
    for line in response.splitlines():
        if line.strip() and "error" in json.loads(line):
            raise ImageBuildError(f"{what} failed: {json.loads(line)['error']}")


# --- the single-user base image -------------------------------------------------


def build_base_image(
    client: docker.DockerClient,
    context_dir: Path,
    *,
    tag: str,
    python_version: str = "3.9",
    rootfs_image: str = ROOTFS_TAG,
    labels: dict[str, str] | None = None,
    wheels_url: str = "",
) -> str:
    """Build ``offline.Dockerfile`` over a context holding a staged ``conda/`` prefix.

    The Dockerfile and the shared pins are copied into ``context_dir``; pip runs
    in the build with host networking, from ``wheels_url`` alone when given (a
    folder of wheels served on loopback, basewheels.py). Returns the image id.
    """
    context_dir = Path(context_dir)
    if not (context_dir / "conda" / "bin" / "python").exists():
        raise ImageBuildError(f"No {context_dir}/conda/bin/python: stage the conda prefix first.")
    shutil.copyfile(OFFLINE_DOCKERFILE, context_dir / "Dockerfile")
    shutil.copyfile(SINGLEUSER_REQUIREMENTS, context_dir / SINGLEUSER_REQUIREMENTS.name)
    shutil.copyfile(SINGLEUSER_INSTALL, context_dir / SINGLEUSER_INSTALL.name)
    make_world_readable(context_dir / "conda")
    return stream_build(
        client,
        path=str(context_dir),
        tag=tag,
        buildargs={"ROOTFS_IMAGE": rootfs_image, "PYTHON_VERSION": python_version, "PIP_WHEELS_URL": wheels_url},
        labels=labels or {},
    )


async def build_offline_base(
    client: docker.DockerClient,
    bench_dir: Path,
    resolver: Resolver,
    *,
    tag: str = BASE_TAG,
    python_version: str = "3.9",
    phases: PhaseLog | None = None,
    wheels: Path | None = None,
) -> str:
    """Build (or find cached) the offline base image; return its id.

    The rootfs image, then Python + pip solved and installed by ``resolver`` for
    /opt/conda on the host, then ``offline.Dockerfile``. The image is reused
    while the rootfs, the lock and the recipe files are unchanged. ``phases``
    records how long each step took; ``wheels``: a folder holding the single-user
    server's wheels (basewheels.py), else pip fetches them from PyPI in the build.
    """
    phases = phases or PhaseLog()
    rootfs_id = build_rootfs_image(client, bench_dir, phases=phases)
    lock = await resolver.solve(EnvironmentSpec(conda=(f"python {python_version}.*", "pip")))
    recipe = _digest(rootfs_id, lock.digest(), _file_digest(OFFLINE_DOCKERFILE), _file_digest(SINGLEUSER_REQUIREMENTS),
                     _file_digest(SINGLEUSER_INSTALL))
    cached = _image_with_label(client, tag, BASE_RECIPE_LABEL, recipe)
    if cached:
        log.info("base image %s is up to date (%s)", tag, cached)
        return cached
    context = Path(bench_dir) / "base-context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    try:
        with phases("base image: /opt/conda from the channel"):
            await resolver.install(lock, context / "conda", BASE_CONDA_PREFIX)
        source = "from the wheels fetched beforehand" if wheels is not None else "from PyPI"
        with phases(f"base image: docker build (pip installs the single-user server {source})"), \
                served(wheels) if wheels is not None else contextlib.nullcontext("") as wheels_url:
            return build_base_image(client, context, tag=tag, python_version=python_version,
                                    labels={BASE_RECIPE_LABEL: recipe}, wheels_url=wheels_url)
    finally:
        shutil.rmtree(context, ignore_errors=True)


# --- helpers ---------------------------------------------------------------------


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _image_with_label(client: docker.DockerClient, tag: str, label: str, value: str) -> str | None:
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    return image.id if image.labels.get(label) == value else None


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
