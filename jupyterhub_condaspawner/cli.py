"""The ``condaspawner`` command: what admins and instructors run outside the hub.

Every command takes ``--config FILE`` (a traitlets config such as jupyterhub_config.py)
so the command line and the hub share one configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from traitlets.config import Config
from traitlets.config.loader import ConfigFileNotFound, PyFileConfigLoader

import docker

from .baseimage import BASE_TAG, ImageBuildError, build_offline_base, build_production_base
from .devchannel import build_dev_channel
from .profiles import ProfileCatalog, ProfileError
from .resolve import ResolveError, Resolver
from .spec import SpecError, SpecPolicy


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


def _read_input(name: str) -> bytes:
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as error:
        raise SpecError(f"cannot read file ({error.strerror})")


def cmd_validate(args: argparse.Namespace, config: Config) -> int:
    policy = SpecPolicy(config=config)
    results = []
    for name in args.files:
        try:
            spec = policy.parse(_read_input(name))
            results.append({"file": name, "ok": True, "key": spec.key(), "spec": spec.normalized()})
        except SpecError as error:
            results.append({"file": name, "ok": False, "error": error.detail})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            status = f"ok {result['key']}" if result["ok"] else f"error: {result['error']}"
            print(f"{result['file']}: {status}")
    return 0 if all(result["ok"] for result in results) else 1


# -- profiles -----------------------------------------------------------------------


def _describe_gpus(profile) -> str:
    if not profile.gpus:
        return "cpu"
    model = f" {profile.gpu_model}" if profile.gpu_model else ""
    cuda = f" cuda {profile.cuda}" if profile.cuda else ""
    return f"{profile.gpus}{model}{cuda}"


def cmd_profiles(args: argparse.Namespace, config: Config) -> int:
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
    rows = [("SLUG", "NAME", "GPUS", "ACCESS", "KEY")]
    for p in profiles:
        access = ", ".join([*(f"@{g}" for g in p.allowed_groups), *p.allowed_users]) or "everyone"
        key = p.environment.key()[:16] if p.environment else "(user's own)"
        rows.append((p.slug + (" *" if p.default else ""), p.display_name, _describe_gpus(p), access, key))
    print(_table(rows))
    return 0


def _profile_json(profile) -> dict:
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


# -- resolve, dev-channel -------------------------------------------------------------


def _resolver(args: argparse.Namespace, config: Config) -> Resolver:
    resolver = Resolver(config=config)
    if getattr(args, "channel_alias", None):
        resolver.channel_alias = args.channel_alias
    return resolver


def cmd_resolve(args: argparse.Namespace, config: Config) -> int:
    try:
        spec = SpecPolicy(config=config).parse(_read_input(args.file), source=args.file)
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


def cmd_dev_channel(args: argparse.Namespace, config: Config) -> int:
    url = build_dev_channel(Path(args.directory), progress=lambda line: print(line, file=sys.stderr))
    print(url)
    return 0


def cmd_base(args: argparse.Namespace, config: Config) -> int:
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        raise CommandError(f"cannot reach the Docker daemon (set DOCKER_HOST): {error}")
    try:
        if args.offline:
            resolver = _resolver(args, config)
            image_id = asyncio.run(build_offline_base(client, Path(args.bench_dir), resolver, tag=args.tag))
        else:
            image_id = build_production_base(client, tag=args.tag)
    except ResolveError as error:
        raise CommandError(f"cannot resolve the base environment: {error}")
    except ImageBuildError as error:
        lines = str(error).splitlines()
        raise CommandError(lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else ""))
    print(image_id)
    return 0


# -- entry point ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="condaspawner", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", metavar="FILE", help="traitlets config file, e.g. jupyterhub_config.py")
        sub.set_defaults(handler=handler)
        return sub

    validate = add("validate", cmd_validate, "check environment.yml files: 'FILE: ok KEY' or 'FILE: error: REASON'")
    validate.add_argument("files", nargs="+", metavar="FILE", help="environment files ('-' reads stdin)")
    validate.add_argument("--json", action="store_true", help="print the normalised spec and key per file")

    profiles = add("profiles", cmd_profiles, "list the admin profiles, or every problem in them")
    profiles.add_argument("directory", nargs="?", metavar="DIR", help="profiles directory (default: from config)")
    profiles.add_argument("--json", action="store_true", help="print profiles as JSON")
    resolve = add("resolve", cmd_resolve, "solve an environment.yml and print its lock (one package per line)")
    resolve.add_argument("file", metavar="FILE", help="environment file ('-' reads stdin)")
    resolve.add_argument("--channel-alias", metavar="URL", help="where channel names resolve (default: from config)")
    resolve.add_argument("--cuda", metavar="VERSION", help="solve for this __cuda version, as a GPU profile does")
    resolve.add_argument("--json", action="store_true", help="print the lock as JSON")
    resolve.add_argument("--lock-file", metavar="OUT", help="also write a rattler lock file (pixi.lock format)")

    dev_channel = add("dev-channel", cmd_dev_channel, "build or refresh the local offline conda channel; print its URL")
    dev_channel.add_argument("directory", metavar="DIR")
    base = add("base", cmd_base, "build the base image (conda + Python 3.9 + single-user server); print its id")
    base.add_argument("--offline", action="store_true",
                      help="no registry: debootstrap Debian and install Python from the configured conda channel")
    base.add_argument("--bench-dir", default=".bench", metavar="DIR", help="work and cache folder for --offline")
    base.add_argument("--channel-alias", metavar="URL", help="where channel names resolve (default: from config)")
    base.add_argument("--tag", default=BASE_TAG, help=f"image tag (default {BASE_TAG})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    finally:
        # py-rattler 0.28's worker threads may still hold the GIL briefly after an
        # awaited call; exiting during that window aborts the process (exit 134).
        time.sleep(0.1)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.handler(args, load_config(args.config))
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # never show a user a traceback unless asked
        if args.debug:
            traceback.print_exc()
        print(f"error: internal error: {error.__class__.__name__}: {error} (rerun with --debug)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
