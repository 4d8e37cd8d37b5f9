"""The ``condaspawner`` command: what admins and instructors run outside the hub.

Every command takes ``--config FILE`` (a traitlets config such as jupyterhub_config.py)
so the command line and the hub share one configuration.

Each command imports only what it uses: ``validate`` must not pay for docker, the
builder or the hub (jupyterhub, sqlalchemy, tornado) on every call.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import select
import shutil
import signal
import stat
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from traitlets import TraitError
from traitlets.config import Config
from traitlets.config.loader import ConfigFileNotFound, PyFileConfigLoader

from .configcheck import misspelled_sections

if TYPE_CHECKING:
    import docker

    from .builder import ImageBuilder
    from .builderrors import BuildError
    from .buildmodel import BuildRequest
    from .kubernetes import PushedImages
    from .profiles import Profile, ProfileCatalog
    from .resolve import Resolver


class CommandError(Exception):
    """An expected failure: printed as one ``error: ...`` line, exit status 1."""


def load_config(path: str | None) -> Config:
    """Load a traitlets Python config file (jupyterhub_config.py style); empty Config if None."""
    if path is None:
        return Config()
    config_path = Path(path).resolve()
    try:
        return PyFileConfigLoader(config_path.name, path=str(config_path.parent)).load_config()
    except ConfigFileNotFound:
        raise CommandError(f"config file not found: {path}")
    except Exception as error:  # a config file is arbitrary Python
        raise CommandError(f"cannot load config {path}: {error.__class__.__name__}: {error}")


# -- validate -----------------------------------------------------------------------


def _read_input(name: str, max_bytes: int) -> bytes:
    """The file's bytes (standard input for "-"), read no further than one byte past
    ``max_bytes`` (SpecPolicy.max_file_bytes): `validate /dev/zero` or a huge file is refused
    in one line, not read into memory whole."""
    from .spec import SpecError

    try:
        with contextlib.ExitStack() as stack:
            stream = sys.stdin.buffer if name == "-" else stack.enter_context(open(name, "rb"))
            data = stream.read(max_bytes + 1)
            if len(data) <= max_bytes:
                return data
            status = os.fstat(stream.fileno())
    except OSError as error:
        raise SpecError(f"cannot read file ({error.strerror})") from None
    size = f"{status.st_size} bytes, " if stat.S_ISREG(status.st_mode) else ""
    raise SpecError(f"file is {size}larger than the limit of {max_bytes}" + ("" if size else " bytes"))


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    from .spec import SpecError, SpecPolicy

    if args.strict and not args.solve:
        raise CommandError("--strict goes with --solve: without a solve, nothing can fail to be solved")
    policy = SpecPolicy(config=config)
    results: list[dict[str, Any]] = []
    specs = {}
    for index, name in enumerate(args.files):
        try:
            spec = policy.parse(_read_input(name, policy.max_file_bytes))
            specs[index] = spec
            results.append({"file": name, "ok": True, "key": spec.key(), "spec": spec.normalized(),
                            "notes": list(spec.notes)})
        except SpecError as error:
            results.append({"file": name, "ok": False, "error": error.detail, "errors": error.details})
    if args.solve and specs:
        import asyncio

        args.rattler_async = True  # see run()
        asyncio.run(_solve_all(args, config, policy.precheck_timeout, specs, results))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if result["ok"]:
                notes = f" ({'; '.join(result['notes'])})" if result["notes"] else ""
                print(f"{result['file']}: ok {result['key']}{notes}")
            else:
                for problem in result["errors"]:  # one line per problem, capped by SpecPolicy.max_problems
                    print(f"{result['file']}: error: {problem}")
    return 0 if all(result["ok"] for result in results) else 1


async def _solve_all(args: argparse.Namespace, config: Config, timeout: float, specs: dict[int, Any],
                     results: list[dict[str, Any]]) -> None:
    """The spawner's pre-check for each valid file: solved as its build would (ipykernel added)."""
    import asyncio

    from .builder import ImageBuilder
    from .buildmodel import BuildRequest
    from .resolve import ResolveError

    builder = ImageBuilder(config=config)
    if args.channel_alias:
        builder.resolver.channel_alias = args.channel_alias
    for index, spec in specs.items():
        result = results[index]
        try:
            lock = await asyncio.wait_for(builder.presolve(BuildRequest(spec, cuda=args.cuda)), timeout or None)
            result["notes"].append(f"solved: {len(lock.records)} packages")
            result["packages"] = len(lock.records)
        except asyncio.TimeoutError:
            _not_solved(result, f"not solved within {timeout:g} s (SpecPolicy.precheck_timeout)", args.strict)
        except ResolveError as error:
            if error.unreachable:  # the spawn goes on then, and its build solves: not the file's fault
                _not_solved(result, f"not solved: {error}", args.strict)
            else:
                result.update(ok=False, error=str(error), errors=[str(error)])


def _not_solved(result: dict[str, Any], why: str, strict: bool) -> None:
    """A file whose solve could not run: 'ok' with a note, as the spawn goes on and its build solves;
    with --strict an error, for a check that must know each file solves."""
    if strict:
        problem = f"{why} (--strict: run it where the channels answer, or raise SpecPolicy.precheck_timeout)"
        result.update(ok=False, error=problem, errors=[problem])
    else:
        result["notes"].append(f"{why}; the build will")


# -- profiles -----------------------------------------------------------------------


def _describe_gpus(profile: Profile) -> str:
    if not profile.gpus:
        return "cpu"
    model = f" {profile.gpu_model}" if profile.gpu_model else ""
    cuda = f" cuda {profile.cuda}" if profile.cuda else ""
    return f"{profile.gpus}{model}{cuda}"


def cmd_profiles(args: argparse.Namespace, config: Config) -> int:
    from .profiles import ProfileCatalog, ProfileError

    catalog = ProfileCatalog(config=config)
    if args.directory:
        catalog.profiles_dir = args.directory
    try:
        profiles = catalog.load()
    except ProfileError as error:
        for problem in error.problems:
            print(f"error: {problem}")
        return 1
    if args.json:
        print(json.dumps([_profile_json(p) for p in profiles], indent=2))
        return 0
    # The spec's key (no daemon needed): not the build key `ls`, `log` and `lock` use, which adds
    # the base image, the CUDA version and the display name (two profiles can share a spec key).
    rows = [("SLUG", "NAME", "GPUS", "ACCESS", "SPEC KEY")]
    for p in profiles:
        access = ", ".join([*(f"@{g}" for g in p.allowed_groups), *p.allowed_users]) or "everyone"
        key = p.environment.key()[:16] if p.environment else "(user's own)"
        rows.append((p.slug + (" *" if p.default else ""), p.display_name, _describe_gpus(p), access, key))
    print(_table(rows))
    for note in _unstartable_notes(profiles, config):
        print(f"note: {note}", file=sys.stderr)
    return 0


def _unstartable_notes(profiles: Sequence[Profile], config: Config) -> list[str]:
    """Profiles no user could ever start under the config's per-user GPU quota (every start
    would be refused with "more than the per-user quota"). A bad GPU setting: `gpus` names it."""
    # Read from the config, not through GpuAllocator: gpus.py loads docker, which profiles never needs.
    quota = config.GpuAllocator.get("per_user_gpu_quota", 0) if "GpuAllocator" in config else 0
    if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
        return []  # a bad setting: `condaspawner gpus` names it
    return [f"profile {p.slug!r} needs {p.gpus} GPUs, more than c.GpuAllocator.per_user_gpu_quota = {quota}: "
            "no one can start it (lower its gpus or raise the quota)" for p in profiles if quota and p.gpus > quota]


def _profile_json(profile: Profile) -> dict[str, Any]:
    return {
        "slug": profile.slug,
        "display_name": profile.display_name,
        "default": profile.default,
        "gpus": profile.gpus,
        "gpu_model": profile.gpu_model,
        "cuda": profile.cuda,
        "cpu_limit": profile.cpu_limit,
        "mem_limit": profile.mem_limit,
        "allowed_groups": list(profile.allowed_groups),
        "allowed_users": list(profile.allowed_users),
        "allow_custom_environment": profile.allow_custom_environment,
        "environment_source": profile.environment_source,
        "key": profile.environment.key() if profile.environment else None,
    }


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# -- resolve ---------------------------------------------------------------------------


def _resolver(args: argparse.Namespace, config: Config) -> Resolver:
    from .resolve import Resolver

    resolver = Resolver(config=config)
    if getattr(args, "channel_alias", None):
        resolver.channel_alias = args.channel_alias
    return resolver


def cmd_resolve(args: argparse.Namespace, config: Config) -> int:
    import asyncio

    from .resolve import ResolveError
    from .spec import SpecError, SpecPolicy

    try:
        policy = SpecPolicy(config=config)
        spec = policy.parse(_read_input(args.file, policy.max_file_bytes), source=args.file)
        lock = asyncio.run(_resolver(args, config).solve(spec, cuda=args.cuda))
    except (SpecError, ResolveError) as error:
        raise CommandError(str(error))
    if args.lock_file:
        lock.write(Path(args.lock_file))
    if args.json:
        print(lock.to_json())
    else:
        for package in lock.packages():
            print(" ".join(package[field] for field in ("name", "version", "build", "url", "sha256")))
    return 0


def docker_client(settings: dict[str, Any] | None = None) -> docker.DockerClient:
    """A client that answers, of the daemon ``settings`` (DockerClient's arguments) name, else of
    the one ``DOCKER_HOST`` names (or the default socket)."""
    import docker

    try:
        client = docker.DockerClient(**settings) if settings else docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        where = (settings or {}).get("base_url") or "set DOCKER_HOST"
        raise CommandError(f"cannot reach the Docker daemon ({where}): {error}")
    return client


def servers_daemon_settings(config: Config) -> dict[str, Any]:
    """The daemon the hub runs servers on, from the config's DockerSpawner settings (as the hub connects)."""
    from .dockerclient import daemon_settings

    settings: dict[str, Any] = {}
    for section in ("DockerSpawner", "SwarmSpawner", "CondaSpawner", "CondaSwarmSpawner"):  # subclasses win
        settings.update({name: config[section][name] for name in ("tls_config", "client_kwargs")
                         if section in config and name in config[section]})
    return daemon_settings(settings.get("tls_config"), settings.get("client_kwargs"))


def cmd_base(args: argparse.Namespace, config: Config) -> int:
    from .baseimage import ImageBuildError, build_production_base

    client = docker_client()
    try:
        image_id = build_production_base(client, tag=args.tag)
    except ImageBuildError as error:
        raise CommandError(one_line(error))
    print(image_id)
    return 0


def one_line(error: Exception) -> str:
    """A multi-line build error as its first line ... its last line."""
    lines = str(error).splitlines() or [error.__class__.__name__]
    return lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "")


def cmd_gpus(args: argparse.Namespace, config: Config) -> int:
    import docker
    from traitlets import TraitError

    from .gpus import GpuAllocator, format_status, status_report

    if args.swarm or uses_swarm(config):
        return _swarm_gpus(args, config)
    try:
        settings = servers_daemon_settings(config)
        # A daemon that does not answer still lists the GPUs (holders unknown, and why).
        report = status_report(GpuAllocator(config=config),
                               connect=lambda: docker.DockerClient(**settings) if settings else None)
    except TraitError as error:
        raise CommandError(f"bad GPU configuration: {error}")
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


SWARM_SPAWNER_NAMES = ("conda-swarm", "jupyterhub_condaspawner.swarmspawner.CondaSwarmSpawner")


def uses_swarm(config: Config) -> bool:
    """Whether the config's hub runs the conda-swarm spawner, or a subclass of it the config defines."""
    spawner_class = config["JupyterHub"]["spawner_class"] if "spawner_class" in config.get("JupyterHub", {}) else ""
    if isinstance(spawner_class, str):
        return spawner_class in SWARM_SPAWNER_NAMES
    # By name: importing the spawner would slow every command down.
    return any(klass.__name__ == "CondaSwarmSpawner" for klass in getattr(spawner_class, "__mro__", ()))


def _swarm_gpus(args: argparse.Namespace, config: Config) -> int:
    """The swarm's GPUs per node and their holders, from the manager's task state."""
    import docker
    import requests

    from . import swarm

    settings = servers_daemon_settings(config)
    section = config["CondaSwarmSpawner"] if "CondaSwarmSpawner" in config else {}
    resource = section.get("gpu_resource", swarm.GPU_RESOURCE)
    label = section.get("gpu_model_label", swarm.GPU_MODEL_LABEL)
    try:
        client = docker.DockerClient(**settings) if settings else docker.from_env(timeout=10)
        state = swarm.read_swarm(client, resource, label)
    except (docker.errors.DockerException, requests.RequestException) as error:
        where = settings.get("base_url") or "DOCKER_HOST"
        raise CommandError(f"cannot read the swarm from its manager ({where}): {error}")
    report = swarm.status_report(state)
    print(json.dumps(report, indent=2) if args.json else swarm.format_status(report))
    return 0


# -- build, ls, gc, lock, log ------------------------------------------------------------


def _builder(args: argparse.Namespace, config: Config) -> ImageBuilder:
    builder = _cache_builder(args, config)
    builder.docker_client = docker_client(builder.client_settings())  # docker_host, else the servers' daemon
    return builder


def _cache_builder(args: argparse.Namespace, config: Config) -> ImageBuilder:
    """The builder for what its cache folder records (logs, locks, build status): no daemon needed."""
    from .builder import ImageBuilder

    builder = ImageBuilder(config=config, daemon_settings=servers_daemon_settings(config))
    if getattr(args, "channel_alias", None):
        builder.resolver.channel_alias = args.channel_alias
    return builder


def _build_requests(args: argparse.Namespace, config: Config,
                    profile_builds: list[tuple[Profile, BuildRequest]]) -> list[tuple[str, BuildRequest]]:
    """(label, request) for each FILE, or for every profile with an environment (``profile_builds``)."""
    from .buildmodel import BuildRequest
    from .spec import SpecError, SpecPolicy

    if args.files:
        policy = SpecPolicy(config=config)
        profiles = _profiles_if_any(config, args.profiles)
        for name in args.files:
            _refuse_a_slug_for_a_file(name, profiles)
        try:
            requests = [(name, BuildRequest(policy.parse(_read_input(name, policy.max_file_bytes), source=name)))
                        for name in args.files]
        except SpecError as error:
            raise CommandError(str(error))
        for name in args.files:
            _note_a_profiles_file(name, profiles)
        return requests
    return [(profile.slug, request) for profile, request in profile_builds]


def _profiles_if_any(config: Config, directory: str | None) -> list[Profile]:
    """The profiles that load (for hints about FILE arguments); none when they cannot be read."""
    from .profiles import ProfileCatalog, ProfileError

    catalog = ProfileCatalog(config=config)
    if directory:
        catalog.profiles_dir = directory
    try:
        return catalog.load()
    except ProfileError as error:
        return error.usable


def _refuse_a_slug_for_a_file(name: str, profiles: list[Profile]) -> None:
    """``build SLUG``: an instructor naming the profile to prebuild, not a file."""
    if name != "-" and not Path(name).exists() and any(profile.slug == name for profile in profiles):
        raise CommandError(f"{name}: no such file; it is a profile's slug: `condaspawner build --profile {name}` "
                           "prebuilds that profile's image")


def _note_a_profiles_file(name: str, profiles: list[Profile]) -> None:
    """A FILE that is a profile's environment file is built as a user's own environment.yml
    (the kernel "My environment"): another key than the profile's image, which stays unbuilt."""
    with contextlib.suppress(OSError):
        path = Path(name).resolve()
        slugs = [profile.slug for profile in profiles if profile.environment_source not in (None, "inline")
                 and Path(str(profile.environment_source)).resolve() == path]
        if slugs:
            print(f"note: {name} is the environment of profile {', '.join(slugs)}: built here as a user's own "
                  "environment.yml, which is another image than the profile's; `condaspawner build --profile "
                  f"{slugs[0]}` prebuilds the profile's", file=sys.stderr)


def _profile_builds(config: Config, directory: str | None,
                    slugs: Sequence[str] = ()) -> list[tuple[Profile, BuildRequest]]:
    """Every profile with an environment of its own (or those of ``slugs``), and its build."""
    import difflib

    from .buildmodel import request_for_profile

    catalog = _load_catalog(config, directory)
    if not slugs:
        return [(p, request_for_profile(p)) for p in catalog.profiles if p.environment is not None]
    builds = []
    for slug in dict.fromkeys(slugs):
        try:
            profile = catalog.get(slug)
        except KeyError:
            close = difflib.get_close_matches(slug.lower(), [p.slug for p in catalog.profiles], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CommandError(f"--profile: no profile {slug!r}{hint}; `condaspawner profiles` lists them") from None
        if profile.environment is None:
            raise CommandError(f"--profile: profile {slug!r} has no environment of its own (users bring theirs): "
                               "nothing to prebuild")
        builds.append((profile, request_for_profile(profile)))
    return builds


def _load_catalog(config: Config, directory: str | None) -> ProfileCatalog:
    from .profiles import ProfileCatalog, ProfileError

    catalog = ProfileCatalog(config=config)
    if directory:
        catalog.profiles_dir = directory
    try:
        catalog.load()
    except ProfileError as error:
        # One `error:` line per problem, as `condaspawner profiles` prints them
        raise CommandError("\nerror: ".join(error.problems))
    return catalog


async def _build_with_bars(builder: ImageBuilder, requests: list[tuple[str, BuildRequest]]) -> list[tuple]:
    import asyncio

    from tqdm import tqdm

    from .builderrors import BuildError

    async def one(position: int, label: str, request: BuildRequest) -> tuple:
        bar = tqdm(total=100, desc=label[:24].ljust(24), position=position, leave=True, file=sys.stderr,
                   bar_format="{desc} {bar} {percentage:3.0f}% {postfix}", disable=None)
        build = builder.ensure(request)
        async for event in build.follow():
            bar.update(event["progress"] - bar.n)
            bar.set_postfix_str(event["message"][:50], refresh=True)
        bar.close()
        try:
            return (label, await build.result(), None)
        except BuildError as error:
            return (label, None, error)

    results = await asyncio.gather(*(one(i, label, request) for i, (label, request) in enumerate(requests)))
    await builder.finish_removals()
    return results


def cmd_build(args: argparse.Namespace, config: Config) -> int:
    import asyncio

    from .builderrors import BuildError

    images = _images_to_push(args, config) if args.push else None
    builder = _builder(args, config)
    if args.push and not builder.registry:
        raise CommandError("--push needs a registry: set c.ImageBuilder.registry in the config "
                           "(e.g. \"registry.example.edu:5000/condaspawner-env\")")
    # The profiles are read once: what the images file records is what was built, whatever
    # an admin edits meanwhile.
    if args.files and args.profile:
        raise CommandError("give FILEs or --profile, not both")
    profile_builds = [] if args.files else _profile_builds(config, args.profiles, args.profile)
    requests = _build_requests(args, config, profile_builds)
    if not requests:
        raise CommandError("nothing to build: no FILE given and no profile has an environment")
    try:
        builder.base_image_id()
    except BuildError as error:
        raise CommandError(str(error))
    results = asyncio.run(_build_with_bars(builder, requests))
    pushing = bool(builder.registry)
    pushed: dict[str, str] = {}
    if images is not None:
        results, pushed = asyncio.run(_push(builder, results))
    rows = [("NAME", "KEY", "IMAGE", "SIZE", "SECONDS", "RESULT", *(("PUSHED",) if pushing else ()))]
    failed = []
    for label, info, failure in results:
        if info is None:
            key = getattr(failure, "key", "")[:16]
            failed += [failure] if key else []
            rows.append((label, key, "", "", "", f"FAILED: {failure}", *(("",) if pushing else ())))
            continue
        bytes_pushed = (_size(info.pushed_bytes or 0),) if pushing else ()
        rows.append((label, info.key[:16], info.image, _size(info.size), f"{info.seconds:.1f}",
                     "cached" if info.cached else "built", *bytes_pushed))
    print(_table(rows))
    if pushing and any(info is not None for _, info, _ in results):
        total = sum(info.pushed_bytes or 0 for _, info, _ in results if info is not None)
        print(f"pushed {_size(total)} to {builder.registry} (layers it already had are not uploaded again)")
    if images is not None and pushed:
        for profile, _ in profile_builds:
            if profile.slug in pushed:
                images.record(profile, pushed[profile.slug])
        _write_images(images)
        print(f"wrote {images.source}: {len(pushed)} pinned image(s) for `condaspawner export kubespawner`")
    for failed_build in failed:  # one line each: the key, the phase in words, the cause, where the log is
        print(_failure_line(failed_build), file=sys.stderr)
    return 1 if any(info is None for _, info, _ in results) else 0


def _failure_line(failed_build: BuildError) -> str:
    """A failed row's line: the key, the phase in words, the cause, and where its log is; a registry that
    failed it is no build's failure (the image may be built and here), and its log does not say."""
    if failed_build.phase not in ("registry", "registry-failed"):
        return f"{failed_build.summary()} (`condaspawner log {failed_build.key[:16]}` shows its log)"
    todo = ("run the command again once the registry answers" if failed_build.unreachable
            else "see to the registry (or the settings for it) and run the command again")
    return (f"{failed_build.summary()}: the image is not in the registry (it is built on this host if the build "
            f"ran); {todo}")


def _images_to_push(args: argparse.Namespace, config: Config) -> PushedImages:
    """Before anything is built: can the builder push? The images file to update."""
    from .builder import ImageBuilder
    from .kubernetes import KubernetesExport, PushedImages, push_problem

    if args.files:
        raise CommandError("build --push prebuilds the profiles (for Kubernetes); give no FILE")
    problem = push_problem(ImageBuilder(config=config))
    if problem:
        raise CommandError(f"cannot push: {problem}")
    path = Path(args.images or KubernetesExport(config=config).images_file)
    # Found only after the builds, an unwritable file would lose every pushed reference.
    problem = _cannot_write(path)
    if problem:
        raise CommandError(f"cannot write {path}: {problem}")
    images = _load_images(path) if path.exists() else PushedImages()
    images.source = str(path)
    return images


def _cannot_write(path: Path) -> str | None:
    """Why ``path`` cannot be written, as the system would say it, or None."""
    if path.exists():
        return None if os.access(path, os.W_OK) else "Permission denied"
    if not path.parent.is_dir():
        return "No such file or directory"
    return None if os.access(path.parent, os.W_OK) else "Permission denied"


def _write_images(images: PushedImages) -> None:
    try:
        images.write(images.source)
    except OSError as error:
        raise CommandError(f"cannot write {images.source}: {error.strerror or error} "
                           "(the table above shows the pushed references)") from None


async def _push(builder: ImageBuilder, results: list[tuple]) -> tuple[list[tuple], dict[str, str]]:
    """Push every built image; a failed push fails its row. Returns the rows and the references."""
    from .builderrors import BuildError
    from .kubernetes import PushUnavailable, pushed_reference

    rows, pushed = [], {}
    for label, info, failure in results:
        if info is not None:
            try:
                pushed[label] = await pushed_reference(builder, info)
            except (PushUnavailable, BuildError) as error:
                failure = BuildError(f"push: {one_line(error)}", phase="registry", key=info.key)
                info = None
        rows.append((label, info, failure))
    return rows, pushed


# -- export ------------------------------------------------------------------------------


def _load_images(path: Path) -> PushedImages:
    from .kubernetes import ExportError, PushedImages

    try:
        return PushedImages.load(path)
    except ExportError as error:
        raise CommandError("; ".join(error.problems))


def _image_argument(text: str) -> tuple[str, str]:
    slug, equals, reference = text.partition("=")
    if not equals or not slug or not reference:
        raise argparse.ArgumentTypeError(f"{text!r}: write SLUG=REGISTRY/REPO:TAG@sha256:DIGEST")
    return slug, reference


def _set_images_given(images: PushedImages, given: list[tuple[str, str]], slugs: set[str]) -> None:
    """``--image SLUG=REF`` into ``images``; a slug given twice is refused (which one was meant?)."""
    references: dict[str, str] = {}
    for slug, reference in given:
        if slug not in slugs:
            raise CommandError(f"--image {slug}=...: no such profile (profiles: {', '.join(sorted(slugs))})")
        if slug in references:
            raise CommandError(f"--image {slug}=...: given twice ({references[slug]} and {reference}): keep one")
        references[slug] = reference
        images.set(slug, reference)


def cmd_export(args: argparse.Namespace, config: Config) -> int:
    from traitlets import TraitError

    from .kubernetes import ExportError, KubernetesExport, PushedImages

    exporter = KubernetesExport(config=config)
    try:
        if args.gpu_products:
            exporter.gpu_products = args.gpu_products
    except TraitError as error:
        raise CommandError(str(error))
    catalog = _load_catalog(config, args.profiles)
    path = Path(args.images or exporter.images_file)
    output = Path(args.output) if args.output and args.output != "-" else None
    if output is not None and output.exists() and path.exists() and os.path.samefile(output, path):
        # condaspawner-images.yaml and condaspawner-values.yaml: one tab completion apart
        raise CommandError(f"-o {args.output}: that is the images file the export reads: write the values elsewhere")
    if path.exists():
        images = _load_images(path)
    elif args.images:
        raise CommandError(f"images file not found: {path}")
    else:
        images = PushedImages(source=f"{path} (not found)")
    _set_images_given(images, args.image, {profile.slug for profile in catalog.profiles})
    try:
        export = exporter.export(catalog.profiles, images)
    except ExportError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    for note in export.notes:
        print(f"note: {note}", file=sys.stderr)
    text = export.to_yaml(source=catalog.profiles_dir)
    if output is not None:
        try:
            _write_whole(output, text)
        except OSError as error:
            raise CommandError(f"cannot write {args.output}: {error.strerror or error}") from None
        print(f"wrote {args.output}: {len(export.profile_list)} profile(s) for singleuser.profileList",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _write_whole(path: Path, text: str) -> None:
    """``text`` into ``path`` whole or not at all: a write that fails (a full disk) leaves the file as
    it was, never a values file cut short that Helm would deploy without its hub snippet."""
    if path.is_symlink() or (path.exists() and not path.is_file()):  # /dev/stdout (>> appends), a pipe
        path.write_text(text, encoding="utf-8")
        return
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    partial = path.with_name(f".{path.name}.partial")
    try:
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "w", encoding="utf-8") as file:
            if path.exists():
                os.fchmod(file.fileno(), stat.S_IMODE(path.stat().st_mode))  # as when written in place
            file.write(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def cmd_ls(args: argparse.Namespace, config: Config) -> int:
    from .builderrors import BuildError
    from .buildmodel import LABEL_CREATED, LABEL_KEY, request_for_profile

    if args.failed:
        return _ls_failed(_cache_builder(args, config))
    builder = _builder(args, config)
    profiles_by_key: dict[str, list[str]] = {}
    unmatched = ""  # why no image could be matched to the profiles
    try:
        for profile in _load_catalog(config, None).profiles:
            if profile.environment is not None:
                key = builder.build_key(request_for_profile(profile))
                profiles_by_key.setdefault(key, []).append(profile.slug)
    except CommandError:
        pass  # profiles with problems: `condaspawner profiles` lists them
    except BuildError as error:  # e.g. the configured base image is missing: every build key needs it
        unmatched = one_line(error)
    rows = [("KEY", "IMAGE", "SIZE", "CREATED", "LAST USED", "PROFILES")]
    images = sorted(builder.images(), key=lambda image: -builder.last_used(image.labels[LABEL_KEY]))
    own = builder.own_layers(images)  # SIZE: what each image adds to the base image, which they all share
    for image in images:
        key = image.labels[LABEL_KEY]
        used = builder.last_used(key)
        rows.append((key[:16], builder.tag_for(key), _size(sum(own[image.id].values())),
                     image.labels.get(LABEL_CREATED, "?"), _when(used) if used else "never",
                     ", ".join(profiles_by_key.get(key, [])) or "-"))
    print(_table(rows))
    held = {layer: size for layers in own.values() for layer, size in layers.items()}
    print(f"{len(images)} image(s), {_size(sum(held.values()))} beyond the base image {builder.base_image} "
          "(layers they share counted once)")
    if unmatched:
        print(f"note: PROFILES cannot be matched: {unmatched}", file=sys.stderr)
    return 0


def _ls_failed(builder: ImageBuilder) -> int:
    """Builds whose last attempt failed or was interrupted, from the cache folder alone."""
    rows = [("KEY", "STATUS", "PHASE", "WHEN", "NAME", "CAUSE")]
    for record in builder.failed_builds():
        rows.append((record.key[:16], record.status, record.phase or "-", record.finished or record.started or "?",
                     record.name or "-", record.cause or "-"))
    print(_table(rows))
    return 0


def cmd_gc(args: argparse.Namespace, config: Config) -> int:
    from .builderrors import BuildError
    from .buildmodel import LABEL_KEY

    builder = _builder(args, config)
    try:
        keep = builder.profile_images(_load_catalog(config, None).profiles)
    except CommandError:  # profiles with problems (`condaspawner profiles` lists them)
        keep = {}
        print("note: the profiles cannot be read: their current images are not kept as such "
              "(`condaspawner profiles` lists the problems)", file=sys.stderr)
    except BuildError as error:  # no base image: no image is a profile's current one
        keep = {}
        print(f"note: the profiles' current images cannot be told: {one_line(error)}", file=sys.stderr)
    result = builder.gc(dry_run=args.dry_run, keep=keep)
    verb = "would remove" if args.dry_run else "removed"
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    left = result.leftovers
    for folder, size in result.staging.items():
        print(f"{verb} {folder} ({_size(size)}), the staging folder of an interrupted build")
    for temporary, size in left.temporaries.items():
        print(f"{verb} {temporary} ({_size(size)}), a cache temporary an interrupted build left")
    for container in left.containers:
        print(f"{verb} the build container {container}, left by a failed build")
    for image in left.images:
        print(f"{verb} the untagged image {image}, left by a failed build")
    for pid, container in left.processes.items():
        print(f"{verb} process {pid}, the step of build container {container} still running after its daemon died")
    for image in result.removed:
        print(f"{verb} {builder.tag_for(image.labels[LABEL_KEY])} ({_size(result.freed.get(image.id, 0))})")
    print(f"{verb} {len(result.removed)} image(s), {_size(result.freed_total)} (the environment images held "
          f"{_size(result.total)} beyond the base image)")
    return 0


def _key_dir(builder: ImageBuilder, key: str) -> Path:
    """The cache folder of a key given in full or as a prefix of at least 8 characters."""
    builds = Path(builder.cache_dir) / "builds"
    if len(key) < 8 or not key.isalnum():
        raise CommandError(f"{key!r} is not a build key: give 8 or more of its hex digits (`condaspawner ls` "
                           "and `ls --failed` list them)")
    matches = sorted(builds.glob(f"{key.lower()}*"))
    if not matches:
        raise CommandError(f"no build has key {key!r}: `condaspawner ls` and `ls --failed` list the build keys "
                           "(the key `validate` and `profiles` print is the spec's, not a build's)")
    if len(matches) > 1:
        raise CommandError(f"{len(matches)} builds have keys starting {key!r}: give more of its digits")
    return matches[0]


def cmd_lock(args: argparse.Namespace, config: Config) -> int:
    path = _key_dir(_cache_builder(args, config), args.key) / "lock.json"
    if not path.exists():
        raise CommandError(f"build {args.key} has no lock (its solve failed; see `condaspawner log`)")
    lock = json.loads(path.read_text())
    if args.json:
        print(json.dumps(lock, indent=2))
    else:
        for package in lock["packages"]:
            print(" ".join(package[field] for field in ("name", "version", "build", "url", "sha256")))
    return 0


def cmd_log(args: argparse.Namespace, config: Config) -> int:
    path = _key_dir(_cache_builder(args, config), args.key) / "build.log"
    if not path.exists():
        raise CommandError(f"build {args.key} has no log")
    sys.stdout.flush()
    with path.open("rb") as log:  # its UTF-8 bytes as they are, whatever the terminal's locale
        shutil.copyfileobj(log, sys.stdout.buffer)
    return 0


def _size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return str(size)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


# -- entry point ----------------------------------------------------------------------


Handler = Callable[[argparse.Namespace, Config], int]
AddCommand = Callable[..., argparse.ArgumentParser]


def command_parser(prog: str, description: str) -> tuple[argparse.ArgumentParser, AddCommand]:
    """A parser with ``--debug``, and ``add(name, handler, help, rattler_async=False)`` for commands.

    ``rattler_async`` marks commands that await py-rattler (see ``run``).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str, rattler_async: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="FILE", help="traitlets config file, e.g. jupyterhub_config.py")
        sub.set_defaults(handler=handler, rattler_async=rattler_async)
        return sub

    return parser, add


def build_parser() -> argparse.ArgumentParser:
    from .baseimage import BASE_TAG

    parser, add = command_parser("condaspawner", __doc__.splitlines()[0])

    validate = add("validate", cmd_validate, "check environment.yml files: 'FILE: ok KEY' or one "
                   "'FILE: error: REASON' line per problem")
    validate.add_argument("files", nargs="+", metavar="FILE", help="environment files ('-' reads stdin)")
    validate.add_argument("--json", action="store_true", help="print the normalised spec and key per file")
    validate.add_argument("--solve", action="store_true",
                          help="also solve each valid file as the spawner's pre-check does (within "
                               "c.SpecPolicy.precheck_timeout): 'cannot solve: ...' is an error")
    validate.add_argument("--strict", action="store_true",
                          help="with --solve: a file that could not be solved (a channel did not answer, or the "
                               "solve ran past the timeout) is an error too, not 'ok' with a note (for CI)")
    validate.add_argument("--cuda", metavar="VERSION", help="with --solve: solve for this __cuda, as a GPU profile")
    validate.add_argument("--channel-alias", metavar="URL", help="with --solve: where channel names resolve "
                          "(default: from config)")

    profiles = add("profiles", cmd_profiles, "list the admin profiles, or every problem in them")
    profiles.add_argument("directory", nargs="?", metavar="DIR", help="profiles directory (default: from config)")
    profiles.add_argument("--json", action="store_true", help="print profiles as JSON")
    resolve = add("resolve", cmd_resolve, "solve an environment.yml and print its lock (one package per line)",
                  rattler_async=True)
    resolve.add_argument("file", metavar="FILE", help="environment file ('-' reads stdin)")
    resolve.add_argument("--channel-alias", metavar="URL", help="where channel names resolve (default: from config)")
    resolve.add_argument("--cuda", metavar="VERSION", help="solve for this __cuda version, as a GPU profile does")
    resolve.add_argument("--json", action="store_true", help="print the lock as JSON")
    resolve.add_argument("--lock-file", metavar="OUT", help="also write a rattler lock file (pixi.lock format)")

    base = add("base", cmd_base, "build the production base image (Miniconda Python 3.9 + single-user server) "
               "from the packaged recipe; needs the internet; print its id")
    base.add_argument("--tag", default=BASE_TAG, help=f"image tag (default {BASE_TAG})")
    gpus = add("gpus", cmd_gpus, "list GPUs: memory, utilization, which server holds each and since when")
    gpus.add_argument("--json", action="store_true", help="print GPUs, holders and notes as JSON")
    gpus.add_argument("--swarm", action="store_true",
                      help="the Docker Swarm view: GPUs per node and the servers Swarm assigned them to (the "
                           "default when the config's spawner_class is conda-swarm)")
    build = add("build", cmd_build, "prebuild the images of every profile, or of the given environment files",
                rattler_async=True)
    build.add_argument("files", nargs="*", metavar="FILE",
                       help="environment files, built as users' own environment.yml (default: every profile)")
    build.add_argument("--profile", metavar="SLUG", action="append", default=[],
                       help="prebuild only this profile's image (repeatable)")
    build.add_argument("--profiles", metavar="DIR", help="profiles directory (default: from config)")
    build.add_argument("--push", action="store_true",
                       help="make sure every profile's image is in the registry (c.ImageBuilder.registry): push "
                            "what is missing, print the bytes pushed, and record the references pinned by digest "
                            "in the images file (for `export kubespawner`)")
    build.add_argument("--images", metavar="FILE",
                       help="images file --push updates (default: c.KubernetesExport.images_file)")
    export = add("export", cmd_export, "write the profiles as KubeSpawner's singleuser.profileList "
                 "(a Zero to JupyterHub values file) with their pushed images")
    export.add_argument("target", choices=["kubespawner"], help="what to export for")
    export.add_argument("-o", "--output", metavar="FILE", help="write here (default: standard output)")
    export.add_argument("--profiles", metavar="DIR", help="profiles directory (default: from config)")
    export.add_argument("--images", metavar="FILE",
                        help="pinned images per profile, as `build --push` writes (default: "
                             "c.KubernetesExport.images_file)")
    export.add_argument("--image", metavar="SLUG=REF", type=_image_argument, action="append", default=[],
                        help="a profile's image given by hand, pinned by digest (repeatable)")
    export.add_argument("--gpu-product", dest="gpu_products", metavar="VALUE", action="append", default=[],
                        help="a nvidia.com/gpu.product value your nodes carry, for gpu_model globs (repeatable; "
                             "default: c.KubernetesExport.gpu_products)")
    ls = add("ls", cmd_ls, "list environment images: key, image, size, created, last used, profiles")
    ls.add_argument("--failed", action="store_true",
                    help="list the builds that failed or were interrupted instead (key, phase, cause), from the "
                         "cache folder: no Docker daemon needed")
    gc = add("gc", cmd_gc, "remove least-recently-used environment images over the budget (never one in use)")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    lock = add("lock", cmd_lock, "print the lock (exact packages) of a build")
    lock.add_argument("key", metavar="KEY", help="build key or its first 8+ hex digits")
    lock.add_argument("--json", action="store_true", help="print the lock as JSON (every field, as the cache keeps it)")
    log = add("log", cmd_log, "print the full log of a build")
    log.add_argument("key", metavar="KEY", help="build key or its first 8+ hex digits")
    build.add_argument("--channel-alias", metavar="URL", help="where channel names resolve (default: from config)")
    for sub in (ls, gc, lock, log):  # they solve nothing: the option is taken so that scripts may pass it to all
        sub.add_argument("--channel-alias", metavar="URL", help="no effect here (this command resolves no channel: "
                         "build keys leave channels out)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command: expected failures are one ``error:`` line."""
    args = parser.parse_args(argv)
    _show_setting_warnings()
    try:
        return _run(args)
    finally:
        if args.rattler_async:
            # py-rattler 0.28's worker threads may still hold the GIL briefly after an
            # awaited call; exiting during that window aborts the process (exit 134).
            time.sleep(0.1)


class _WarningLines(logging.Handler):
    """Warnings as ``warning:`` lines on whatever sys.stderr is when they come."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)


def _show_setting_warnings() -> None:
    """A misspelled setting (``c.ImageBuilder.max_concurent_builds``) is unknown to its
    class, which says so, with the name it meant, through traitlets' logger (silent outside
    an application) or a Python warning: both reach the admin as ``warning:`` lines. Once
    per process, however many commands run in it."""
    logger = logging.getLogger("traitlets")
    if not any(isinstance(handler, _WarningLines) for handler in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))
    warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
    warnings.simplefilter("always", UserWarning)  # the default filter lost some (validate's)


def _run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        for line in misspelled_sections(config):
            print(f"warning: {line}", file=sys.stderr)
        return args.handler(args, config)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except TraitError as error:  # a setting of the wrong type or value, found when first used
        print(f"error: a setting in the config: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as error:
        if not _reader_left():  # another pipe or socket (the Docker daemon's): a failure like any other
            return _internal_error(args, error)
        # The reader left (`validate ... | head`): end as a shell tool does on SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 128 + signal.SIGPIPE
    except Exception as error:  # never show a user a traceback unless asked
        return _internal_error(args, error)


def _internal_error(args: argparse.Namespace, error: Exception) -> int:
    if args.debug:
        traceback.print_exc()
    print(f"error: internal error: {error.__class__.__name__}: {error} (rerun with --debug)", file=sys.stderr)
    return 2


def _reader_left() -> bool:
    """Whether standard output is a pipe whose reader has gone (its write end polls as an error)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # AttributeError: no poll() (Windows)
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    return False


if __name__ == "__main__":
    sys.exit(main())
