# The demo hub: the example config, adapted to the local bench (no GPU, no registry, no
# conda-forge). `make demo` (`python -m condaspawner_bench demo`) sets up the bench and
# runs JupyterHub with this file; the end-to-end tests use it too. Log in with any user
# name and no password.
import os
from pathlib import Path

c = get_config()  # noqa: F821
here = Path(__file__).resolve().parent
load_subconfig(str(here.parent / "jupyterhub_config.example.py"))  # noqa: F821

bench = Path(os.environ["CONDASPAWNER_BENCH_DIR"])
state = Path(os.environ.get("CONDASPAWNER_DEMO_STATE") or bench / "demo-hub")
state.mkdir(parents=True, exist_ok=True)

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = int(os.environ.get("CONDASPAWNER_DEMO_PORT", "8000"))
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(os.environ.get("CONDASPAWNER_DEMO_HUB_PORT", "8081"))
c.JupyterHub.hub_connect_ip = "127.0.0.1"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{os.environ.get('CONDASPAWNER_DEMO_PROXY_PORT', '8001')}"
c.ConfigurableHTTPProxy.command = os.environ["CONDASPAWNER_PROXY_COMMAND"].split("\n")
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")

# A login that needs no account setup; `student` is in the course group, `pi-smith` in the lab.
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {"admin"}
c.JupyterHub.load_groups = {"dl-course": {"users": ["student"]}, "vision-lab": {"users": ["pi-smith"]},
                           "gpu-admins": {"users": ["ops"]}}
# `ops` sees the environments page's admin view (images, builds, GPUs) without being a hub admin.
c.EnvironmentsPage.admin_groups = {"gpu-admins"}

# The bench instead of conda-forge, the registry and a GPU host.
c.ProfileCatalog.profiles_dir = os.environ.get("CONDASPAWNER_DEMO_PROFILES") or str(here / "profiles")
# Users' environments: the dev channel plus real packages (numpy, pandas, matplotlib) that
# `make demo` builds and names in CONDASPAWNER_DEMO_CHANNEL; else the dev channel alone.
c.Resolver.channel_urls = {"conda-forge": os.environ.get("CONDASPAWNER_DEMO_CHANNEL") or (bench / "channel").as_uri()}
# conda-forge is the only channel the demo serves (the machine may be offline): a user's file
# naming another is refused as not allowed here, rather than failing at the start with "cannot
# be reached: try again later". The admin's profiles keep the example's list (PyTorch's names
# pytorch and nvidia: on this GPU-less machine it is refused before any solve).
c.ProfileCatalog.SpecPolicy.allowed_channels = list(c.SpecPolicy.allowed_channels)
c.SpecPolicy.allowed_channels = ["conda-forge", "nodefaults"]
c.Resolver.package_cache_dir = str(bench / "pkgs")
c.ImageBuilder.cache_dir = str(state / "builder")
c.ImageBuilder.image_repo = os.environ.get("CONDASPAWNER_DEMO_IMAGE_REPO", "condaspawner-demo")
c.ImageBuilder.build_memory_limit = None
# The bench daemon has no bridge: pip sections reach their index (PyPI, or a test's on
# loopback) through the host's network. Production keeps Docker's default (see the README).
c.ImageBuilder.build_network_mode = "host"
c.DockerSpawner.network_name = "host"  # all traffic stays on loopback
# One home per user, shared by all of their servers. {username} is DockerSpawner's escaped
# name (injective), so no two users get one name. The tests set their own prefix (cleanup).
volume_prefix = os.environ.get("CONDASPAWNER_DEMO_VOLUME_PREFIX", "condaspawner-demo-")
c.DockerSpawner.volumes = {volume_prefix + "home-{username}": "/home/jovyan"}
c.DockerSpawner.remove = True
c.JupyterHub.cleanup_servers = False  # as in the example: Ctrl-C keeps users' servers running
c.JupyterHub.services = []  # the idle culler is a separate package
c.JupyterHub.load_roles = []
extra = os.environ.get("CONDASPAWNER_DEMO_EXTRA_CONFIG")
if extra:  # the end-to-end tests add settings (fake GPUs, an API token) here
    load_subconfig(extra)  # noqa: F821
