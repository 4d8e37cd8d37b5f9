"""The test bench's commands: demo, setup, dev-channel, base (python -m condaspawner_bench).

They share the product CLI's conventions (``--config``, one ``error:`` line,
``--debug``) by reusing its runner; the product CLI knows nothing of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from traitlets.config import Config

from jupyterhub_condaspawner import cli
from jupyterhub_condaspawner.baseimage import BASE_TAG, ImageBuildError
from jupyterhub_condaspawner.resolve import ResolveError, Resolver

from .bench import Bench, BenchError, BenchParts, BenchSetup, default_bench_dir, ensure_bench, set_up_bench
from .devchannel import build_dev_channel
from .dockerd import BenchDaemonError
from .offlinebase import build_offline_base
from .realchannel import NO_REAL_SET, REAL_SETS, REAL_SETS_ENV, build_real_channel, real_set_from_env

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "demo" / "jupyterhub_config.py"
# demo/jupyterhub_config.py reads these (its defaults: 8081, 8001); the demo command sets them.
HUB_PORT_ENV = "CONDASPAWNER_DEMO_HUB_PORT"
EXTRA_CONFIG_ENV = "CONDASPAWNER_DEMO_EXTRA_CONFIG"  # more settings, loaded last by the demo's config
PROXY_PORT_ENV = "CONDASPAWNER_DEMO_PROXY_PORT"


def _say(line: str) -> None:
    # One write per line: the set-up's parts report from threads of their own, and print()
    # writes the line and its newline apart ("... (cached)bench: real channel ...").
    sys.stderr.write(line + "\n")


def _real_set(args: argparse.Namespace, default: str | None) -> str | None:
    """``--real-set``, else ``$CONDASPAWNER_BENCH_REAL_SET``, else ``default``; ``none``: no real set."""
    if args.real_set is not None:  # one of argparse's choices
        return None if args.real_set == NO_REAL_SET else args.real_set
    try:
        return real_set_from_env(default)
    except ValueError as error:
        raise cli.CommandError(f"${REAL_SETS_ENV}: {error}")


def _in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the hub and the proxy bind
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _left_proxy_runs(state: Path) -> bool:
    """Whether the proxy a previous demo hub of ``state`` left is running: the hub stops it
    (its pid file) before it starts its own, so the public and API ports it holds are free then."""
    try:
        os.kill(int((state / "proxy.pid").read_text().strip()), 0)
    except PermissionError:
        return True
    except (OSError, ValueError):
        return False
    return True


def check_demo_ports(args: argparse.Namespace, bench_dir: Path) -> None:
    """CommandError naming a port of the demo that something already listens on. Without it,
    JupyterHub reports a taken hub port with a traceback and leaves its proxy running, and a
    taken public port only in the proxy's log, while the hub says it runs there."""
    chosen = {"--port": args.port, "--hub-port": args.hub_port, "--proxy-api-port": args.proxy_api_port}
    if len(set(chosen.values())) < len(chosen):
        raise cli.CommandError("cannot start the demo hub: its three ports must differ: "
                               + ", ".join(f"{option} {port}" for option, port in chosen.items()))
    state = Path(os.environ.get("CONDASPAWNER_DEMO_STATE") or bench_dir / "demo-hub")
    ports = [(args.hub_port, "the hub's own port", "--hub-port")]
    if not _left_proxy_runs(state):
        ports = [(args.port, "the demo's address", "--port"),
                 (args.proxy_api_port, "the proxy's API port", "--proxy-api-port"), *ports]
    taken = [(port, what, option) for port, what, option in ports if _in_use(port)]
    if taken:
        listed = "; ".join(f"127.0.0.1:{port} ({what}, {option})" for port, what, option in taken)
        if _left_proxy_runs(state):
            # Its hub would stop that proxy: another --hub-port would take the running demo's proxy away.
            raise cli.CommandError(f"cannot start the demo hub: already in use: {listed}, and the proxy of this "
                                   "bench's demo runs: that demo hub is likely running: stop it first (a second "
                                   "demo beside it needs its own CONDASPAWNER_DEMO_STATE folder and free ports: "
                                   "--port, --hub-port, --proxy-api-port)")
        raise cli.CommandError(f"cannot start the demo hub: already in use: {listed}; another JupyterHub (a "
                               "demo?) may be running: stop it, or choose free ports with "
                               + ", ".join(option for _, _, option in taken))


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    real_set = _real_set(args, "datascience")
    bench_dir = Path(args.bench_dir).resolve() if args.bench_dir else default_bench_dir()
    check_demo_ports(args, bench_dir)
    demo_config = _demo_config(args)  # before the bench's set-up, as the ports
    try:
        bench = ensure_bench(bench_dir, say=_say, real_set=real_set)
    except (BenchError, BenchDaemonError, ImageBuildError, ResolveError) as error:
        raise cli.CommandError(f"cannot set up the demo bench: {error}")
    os.environ.update({
        **_demo_environment(bench),
        "CONDASPAWNER_DEMO_PORT": str(args.port),
        HUB_PORT_ENV: str(args.hub_port),
        PROXY_PORT_ENV: str(args.proxy_api_port),
    })
    _say(f"demo hub: http://127.0.0.1:{args.port}/ (any user name, no password; "
         "'student' sees the course profile)")
    os.execv(sys.executable, [sys.executable, "-m", "jupyterhub", "-f", str(demo_config)])


def cmd_demo_admin(args: argparse.Namespace, config: Config) -> int:
    """``condaspawner COMMAND`` with the demo hub's config, on its bench: its Docker daemon,
    channel and state folder (so ``build`` prebuilds the images the demo hub starts)."""
    if not args.command:
        raise cli.CommandError("name a condaspawner command, e.g. build, ls or profiles (condaspawner --help)")
    demo_config = _demo_config(args)
    bench_dir = Path(args.bench_dir).resolve() if args.bench_dir else default_bench_dir()
    try:
        bench = ensure_bench(bench_dir, say=_say, real_set=_real_set(args, "datascience"))
    except (BenchError, BenchDaemonError, ImageBuildError, ResolveError) as error:
        raise cli.CommandError(f"cannot set up the demo bench: {error}")
    os.environ.update(_demo_environment(bench))
    command, *rest = args.command
    os.execv(sys.executable, [sys.executable, "-m", "jupyterhub_condaspawner.cli", command,
                              "--config", str(demo_config), *rest])


def _demo_config(args: argparse.Namespace) -> Path:
    demo_config = Path(args.hub_config).resolve()
    if not demo_config.is_file():
        raise cli.CommandError(f"demo config not found: {demo_config}")
    _check_extra_config()
    return demo_config


def _check_extra_config() -> None:
    """The settings file CONDASPAWNER_DEMO_EXTRA_CONFIG names, made absolute: the demo's config loads it
    with traitlets' load_subconfig, which takes a relative path from demo/ and loads a missing file as
    nothing, without a word."""
    extra = os.environ.get(EXTRA_CONFIG_ENV)
    if not extra:
        return
    path = Path(extra).expanduser().resolve()
    if not path.is_file():
        raise cli.CommandError(f"{EXTRA_CONFIG_ENV}={extra}: no such file ({path})")
    os.environ[EXTRA_CONFIG_ENV] = str(path)


def _demo_environment(bench: Bench) -> dict[str, str]:
    """What the demo's config reads from the environment (ensure_bench exports DOCKER_HOST)."""
    return {
        "CONDASPAWNER_BENCH_DIR": str(bench.directory),
        "CONDASPAWNER_PROXY_COMMAND": "\n".join(bench.proxy_command),
        # users' environments come from the dev channel plus the real packages
        "CONDASPAWNER_DEMO_CHANNEL": (bench.real_channel or bench.channel).url,
    }


def cmd_setup(args: argparse.Namespace, config: Config) -> int:
    try:
        parts = BenchParts.of(args.parts.split(","))
    except ValueError as error:
        raise cli.CommandError(str(error))
    bench_dir = Path(args.bench_dir).resolve() if args.bench_dir else None
    ready_dir = Path(args.ready_dir) if args.ready_dir else None

    def ready(part: str, setup: BenchSetup) -> None:  # DIR/PART appears whole: the daemon's holds its JSON
        if ready_dir is not None:
            ready_dir.mkdir(parents=True, exist_ok=True)
            partial = ready_dir / f".{part}.partial"
            partial.write_text(json.dumps(setup.report()["daemon"]) if part == "daemon" else "")
            partial.replace(ready_dir / part)

    setup = set_up_bench(bench_dir, parts, say=_say, ready=ready, real_set=_real_set(args, None))
    if args.report:  # whole or not at all: someone may be waiting for it to appear
        partial = Path(args.report).with_name(Path(args.report).name + ".partial")
        partial.write_text(json.dumps(setup.report(), indent=2) + "\n")
        partial.replace(args.report)
    _say(f"bench set-up of {setup.directory} ({', '.join(parts.names())}):")
    for line in setup.phases.summary():
        _say("  " + line)
    for error in setup.errors:
        _say(f"error: {error}")
    return 1 if setup.errors else 0


def cmd_dev_channel(args: argparse.Namespace, config: Config) -> int:
    real_set = _real_set(args, None)
    if real_set is None:
        print(build_dev_channel(Path(args.directory), progress=_say))
    else:
        print(build_real_channel(Path(args.directory), real_set, progress=_say).url)
    return 0


def cmd_base(args: argparse.Namespace, config: Config) -> int:
    resolver = Resolver(config=config)
    if args.channel_alias:
        resolver.channel_alias = args.channel_alias
    try:
        image_id = asyncio.run(build_offline_base(cli.docker_client(), Path(args.bench_dir), resolver, tag=args.tag))
    except ResolveError as error:
        raise cli.CommandError(f"cannot resolve the base environment: {error}")
    except ImageBuildError as error:
        raise cli.CommandError(cli.one_line(error))
    print(image_id)
    return 0


def _add_real_set(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--real-set", choices=[*REAL_SETS, NO_REAL_SET], default=None,
                        help="also build the dev channel plus real PyPI packages as conda packages: datascience "
                        "(numpy, pandas, matplotlib; ~60 MB), full (adds scipy, scikit-learn, torch with its CUDA "
                        f"libraries; ~2.8 GB) (default: ${REAL_SETS_ENV}, else {default})")


def build_parser() -> argparse.ArgumentParser:
    parser, add = cli.command_parser("python -m condaspawner_bench", __doc__.splitlines()[0])
    demo = add("demo", cmd_demo, "set up the bench (daemon, channel, base image, proxy) and run the demo hub",
               rattler_async=True)
    demo.add_argument("--port", type=int, default=8000, help="the demo's port on 127.0.0.1, where users log in (default 8000)")
    demo.add_argument("--hub-port", type=int, default=os.environ.get(HUB_PORT_ENV) or "8081", metavar="PORT",
                      help=f"the hub's own port on 127.0.0.1, behind the proxy (default: ${HUB_PORT_ENV}, else 8081)")
    demo.add_argument("--proxy-api-port", type=int, default=os.environ.get(PROXY_PORT_ENV) or "8001",
                      metavar="PORT", help=f"the proxy's API port on 127.0.0.1 (default: ${PROXY_PORT_ENV}, else 8001)")
    demo.add_argument("--bench-dir", metavar="DIR", help="bench folder (default: $CONDASPAWNER_BENCH_DIR or .bench)")
    demo.add_argument("--hub-config", default=str(DEMO_CONFIG), metavar="FILE",
                      help="the hub's config (default: the checkout's demo/jupyterhub_config.py)")
    _add_real_set(demo, "datascience")
    admin = add("demo-admin", cmd_demo_admin, "run a condaspawner command (build, ls, profiles, gpus, log, ...) "
                "with the demo hub's config, on its bench: e.g. `demo-admin build` prebuilds its profiles' images",
                rattler_async=True)
    admin.add_argument("--bench-dir", metavar="DIR", help="bench folder (default: $CONDASPAWNER_BENCH_DIR or .bench)")
    admin.add_argument("--hub-config", default=str(DEMO_CONFIG), metavar="FILE",
                       help="the hub's config (default: the checkout's demo/jupyterhub_config.py)")
    _add_real_set(admin, "datascience")
    admin.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                       help="the condaspawner command and its arguments")
    setup = add("setup", cmd_setup, "set up the bench's parts (independent ones at once) and print how long each "
                "phase took", rattler_async=True)
    setup.add_argument("--bench-dir", metavar="DIR", help="bench folder (default: $CONDASPAWNER_BENCH_DIR or .bench)")
    setup.add_argument("--parts", default="daemon,rootfs,channel,base,proxy", metavar="LIST",
                       help=f"comma-separated, of {', '.join(BenchParts.NAMES)} (default: what the demo uses)")
    setup.add_argument("--report", metavar="FILE", help="also write the phases, errors and daemon as JSON")
    setup.add_argument("--ready-dir", metavar="DIR", help="write DIR/PART as soon as each part is done "
                       "(DIR/daemon: its DOCKER_HOST and whether this set-up started it, as JSON)")
    _add_real_set(setup, NO_REAL_SET)
    dev_channel = add("dev-channel", cmd_dev_channel, "build or refresh the local offline conda channel; print its URL",
                      rattler_async=True)
    dev_channel.add_argument("directory", metavar="DIR")
    _add_real_set(dev_channel, NO_REAL_SET)
    base = add("base", cmd_base, "build the offline base image: mmdebstrap Debian, Python from the configured "
               "conda channel, the single-user server from PyPI; print its id", rattler_async=True)
    base.add_argument("--bench-dir", default=".bench", metavar="DIR", help="work and cache folder (default .bench)")
    base.add_argument("--channel-alias", metavar="URL", help="where channel names resolve (default: from config)")
    base.add_argument("--tag", default=BASE_TAG, help=f"image tag (default {BASE_TAG})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(build_parser(), argv)
