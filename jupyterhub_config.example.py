# jupyterhub_config.example.py: a complete CondaSpawner hub. Copy it, then adapt the
# paths, channels and GPU settings. `condaspawner <command> --config jupyterhub_config.py`
# reads the same file, so the command line and the hub agree.
import sys

c = get_config()  # noqa: F821  (provided by JupyterHub)

# -- The spawner -----------------------------------------------------------------------
c.JupyterHub.spawner_class = "conda"  # jupyterhub_condaspawner.CondaSpawner
# Each named server has its own environment and its own GPUs.
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 3
# Servers outlive a hub restart (an upgrade, a config change, Ctrl-C / SIGTERM): the hub
# finds them again from its database and the GPU table from container labels. With the
# default (True) every user's server is stopped whenever the hub stops.
c.JupyterHub.cleanup_servers = False
# The first start of a new environment builds its image; CondaSpawner already defaults
# start_timeout to 1800 s. Raise it for very large environments.
c.Spawner.start_timeout = 1800
# Every pending spawn counts against this (default 100), and a spawn waiting in the GPU
# queue (up to GpuAllocator.queue_timeout) or for its image build is pending: with 100 users
# waiting for a few GPUs, every other start, CPU profiles too, would get "429 Too many users
# trying to log in". The GPU queue and ImageBuilder.max_concurrent_builds bound the work;
# 0 is no limit (or set it well above the longest GPU queue you expect).
c.JupyterHub.concurrent_spawn_limit = 0

# -- The environments page (/hub/environments, linked in the hub's navigation bar) -----------
# Users see the environments they started (packages, downloads, what changed); hub admins (and
# holders of the custom:condaspawner:admin scope) also see every image, the builds and the GPUs.
from jupyterhub_condaspawner.envpage import configure as add_environments_page  # noqa: E402

add_environments_page(c)
# So do these users and the members of these groups:
# c.EnvironmentsPage.admin_users = {"alice"}
# c.EnvironmentsPage.admin_groups = {"gpu-admins"}

# -- Profiles: one YAML file per profile (see profiles/ in the project) ---------------------
c.ProfileCatalog.profiles_dir = "/etc/jupyterhub/profiles"

# -- What users may put in their own environment.yml ------------------------------------------
c.SpecPolicy.allowed_channels = ["conda-forge", "pytorch", "nvidia", "bioconda", "nodefaults"]
c.SpecPolicy.max_dependencies = 1000

# -- Where channel names resolve ------------------------------------------------------------
c.Resolver.channel_alias = "https://conda.anaconda.org/"  # or your mirror
# c.Resolver.channel_urls = {"my-lab": "https://conda.example.edu/my-lab"}
c.Resolver.package_cache_dir = "/var/cache/condaspawner/pkgs"

# -- Images -------------------------------------------------------------------------------
c.ImageBuilder.base_image = "condaspawner-base:py39"  # built by `condaspawner base`
c.ImageBuilder.image_repo = "condaspawner-env"
c.ImageBuilder.cache_dir = "/var/cache/condaspawner"
c.ImageBuilder.max_concurrent_builds = 2
c.ImageBuilder.build_memory_limit = "8G"
c.ImageBuilder.max_images = 200  # `condaspawner gc` (run it from cron) keeps at most this many
c.ImageBuilder.disk_budget = "500G"
# c.ImageBuilder.pip_config = {"index-url": "https://pypi-mirror.example.edu/simple"}
# Several hosts: a registry is the image cache every hub and build host shares; servers run
# images pinned by digest. Credentials: `docker login` as the hub's user (or DOCKER_CONFIG).
# c.ImageBuilder.registry = "registry.example.edu:5000/condaspawner-env"
# c.ImageBuilder.insecure_registries = []  # only registries without a trusted certificate
# c.ImageBuilder.docker_host = "tcp://build.example.edu:2376"  # a build host (needs the registry)

# -- GPUs ---------------------------------------------------------------------------------
c.GpuAllocator.policy = "pack"  # or "spread"
c.GpuAllocator.max_servers_per_gpu = 1  # exclusive GPUs
c.GpuAllocator.per_user_gpu_quota = 2
c.GpuAllocator.device_mode = "device-request"  # or "nvidia-runtime"
# A spawn that finds every fitting GPU held waits its turn (up to 10 min); a smaller request
# may overtake a bigger, older one for 2 min, then the GPUs the older one could use are its.
c.GpuAllocator.queue_timeout = 600
c.GpuAllocator.queue_hold_after = 120
# Where NVML is not visible to the hub process, declare the GPUs:
# c.GpuInventory.static_gpus = [{"uuid": "GPU-...", "name": "NVIDIA A100-SXM4-80GB", "cuda_version": "12.4"}]

# -- Containers -----------------------------------------------------------------------------
# A Docker network shared with the hub (or "host": every server then gets its own port
# on the host's loopback).
c.DockerSpawner.network_name = "jupyterhub"
c.JupyterHub.hub_ip = "0.0.0.0"
c.JupyterHub.hub_connect_ip = "jupyterhub"  # the hub container's name on that network
# One home volume per user, shared by all of that user's servers; it survives rebuilds,
# restarts and environment changes. Name it from {username} (DockerSpawner's escaped,
# collision-free user name) and nothing user-chosen next to it: "{username}{servername}"
# gives erin's server "one" and erino's server "ne" the same volume. CondaSpawner labels
# each per-user volume with its owner and refuses to mount one that another user owns.
c.DockerSpawner.volumes = {"jupyterhub-home-{username}": "/home/jovyan"}
c.DockerSpawner.remove = True  # containers are disposable; the volume holds the work
c.DockerSpawner.cpu_limit = 2  # defaults (a pre_spawn_hook may change them); a profile's cpu_limit / mem_limit win
c.DockerSpawner.mem_limit = "4G"
# Hardening (these are the defaults): no capabilities, no privilege gain, at most 4096
# processes and threads, no swap beyond mem_limit. extra_host_config adds to or overrides them.
c.CondaSpawner.cap_drop = ["ALL"]
c.CondaSpawner.security_opt = ["no-new-privileges"]
c.CondaSpawner.pids_limit = 4096
c.CondaSpawner.allow_swap = False

# -- Idle servers give their GPUs back -------------------------------------------------------
# GPU servers: stopped after 30 minutes with every GPU at or below 5 % utilization, however
# active the browser is (built in; a profile's gpu_idle_timeout wins, 0 = never).
c.CondaSpawner.gpu_idle_timeout = 30
c.GpuAllocator.idle_utilization = 5
c.GpuAllocator.gpu_sample_interval = 30
# Every server (CPU ones too) after 8 hours without browser activity: the generic culler.
# pip install jupyterhub-idle-culler
c.JupyterHub.services = [
    {"name": "idle-culler", "command": [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=28800"]},
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    },
]

# -- Several GPU hosts in a Docker Swarm (README, "Docker Swarm") ----------------------------
# Each server is a service on a node with free GPUs (the nodes declare them as generic
# resources "NVIDIA-GPU"; the hub picks a node's GPU ids and pins the service there, so servers
# live through node updates); needs the registry above. Last in this file on purpose: these
# settings replace the one-host network and hub address of "Containers" above.
# c.CondaSwarmSpawner.gpu_assignment = "hub"  # "swarm" where other services reserve the GPUs too
# c.JupyterHub.spawner_class = "conda-swarm"
# c.DockerSpawner.client_kwargs = {"base_url": "tcp://swarm-manager.example.edu:2376"}
# c.CondaSwarmSpawner.network_name = "host"  # servers listen on their node's address
# c.JupyterHub.hub_connect_ip = "hub.example.edu"  # an address every node can reach
# Homes that follow a server to any node: NFS through Docker's local driver ({username} is the
# escaped name; the export's folder must exist and be writable by jovyan).
# c.CondaSwarmSpawner.volumes = {"home-{username}": "/home/jovyan"}
# c.CondaSwarmSpawner.volume_driver = "local"
# c.CondaSwarmSpawner.volume_driver_options = {"type": "nfs", "o": "addr=nfs.example.edu,rw,nfsvers=4",
#                                              "device": ":/export/home/{username}"}
# Node labels the admin sets per GPU node: nvidia.gpu.product (model), nvidia.cuda.version (driver).
# GPU utilization for metrics and idle culling: dcgm-exporter on every GPU node.
# c.CondaSwarmSpawner.gpu_metrics_url = "http://{address}:9400/metrics"
