"""The multi-node bench: a real Docker Swarm of dockerds in network namespaces, with fake GPUs.

Not part of the product. On one machine, as root, it brings up what a site with
several GPU servers has:

- a private network (netns.py): a switch namespace with a bridge, one namespace per
  node on it, and a veth giving the host's namespace an address on the same private
  /24 (``host_address``). No node has a default route: nothing leaves the namespaces;
- one dockerd per node inside its namespace (own hostname, data-root, exec-root,
  socket, cgroup parent and engine key), workers declaring fake ``NVIDIA-GPU``
  generic resources and a GPU model node label, exactly as a site's GPU nodes would;
- Debian's ``docker-registry`` on the manager's address (swarm_registry.py), which
  every dockerd trusts over plain HTTP; images are always registry-qualified;
- the swarm itself: init on the manager, workers joined, dispatcher heartbeat 1 s so
  a dead node is Down within ~5 s.

Where the hub runs: in the host's namespace, like the tests. It listens on
``host_address`` (``c.JupyterHub.hub_ip`` / ``hub_connect_ip``) so servers on the
nodes reach its API, and reaches each server at its node's address (host
networking: Swarm's virtual IPs and routing mesh need IPVS, which these machines
lack). The manager's Docker API is a unix socket (``manager.docker_host``), reachable
from any namespace. The only route the host gains is the subnet on its veth, which
does not forward: all traffic stays between the host and these namespaces.

    with SwarmBench.start(Path("/tmp/swarm")) as bench:
        client = bench.manager.client()
        client.services.create(bench.tiny_image, ["sleep", "60"], resources=...)
        bench.kill_node("worker1")
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import DockerException

from .dockerd import (
    BenchDaemonError,
    ensure_debian_packages,
    log_tail,
    mounts_under,
    unmount_under,
)
from .netns import (
    PrivateNetwork,
    is_running,
    kill_pids,
    pids_in_namespace,
    remove_network,
    short_tag,
)
from .swarm_registry import RegistryProcess, free_loopback_port

# Debian packages the bench needs, by the command each provides.
SWARM_PACKAGES = {
    "dockerd": "docker.io",
    "docker-registry": "docker-registry",
    "busybox": "busybox-static",
    "ip": "iproute2",
    "nsenter": "util-linux",
    "iptables": "iptables",  # a test cuts a node off the registry
}
GPU_RESOURCE = "NVIDIA-GPU"
# The node label a GPU model constraint uses: Kubernetes' `nvidia.com/gpu.product` without
# the slash, which Swarm refuses in a constraint key ("key ... is invalid").
GPU_MODEL_LABEL = "nvidia.gpu.product"
FAKE_GPU_MODEL = "NVIDIA A100-SXM4-80GB"
# The node label with the newest CUDA a node's driver supports ("CUDA Version" of nvidia-smi).
CUDA_LABEL = "nvidia.cuda.version"
FAKE_CUDA_VERSION = "12.4"
REGISTRY_PORT = 5000
SWARM_PORT = 2377
HEARTBEAT_S = 1
TINY_IMAGE = "csw-busybox:1"
PT_INTERP = 3
BUSYBOX_APPLETS = ("sh", "env", "sleep", "cat", "echo", "hostname", "httpd", "ls", "mkdir", "true", "wget")
DAEMON_START_TIMEOUT_S = 60.0
DAEMON_START_ATTEMPTS = 3
KILL_PASSES = 5
NODE_STATE_TIMEOUT_S = 30.0
PING_TIMEOUT_S = 2
RUNTIME_ROOT = Path("/tmp")
# A cap, not a reservation: a tmpfs holds only what is written (pulled images, containers).
DATA_TMPFS_SIZE = "8g"


class SwarmBenchError(BenchDaemonError):
    """The multi-node bench could not be set up."""


class DaemonExited(SwarmBenchError):
    """A node's dockerd exited before it answered (on a loaded machine: its containerd did not
    start within dockerd's own timeout)."""


@dataclass(frozen=True)
class NodeSpec:
    """One node to bring up: its name (= hostname), role, fake GPU ids, GPU model and the CUDA
    version its (fake) driver supports."""

    name: str
    role: str = "worker"
    gpus: tuple[str, ...] = ()
    gpu_model: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    cuda_version: str | None = None

    def node_labels(self) -> dict[str, str]:
        """Swarm node labels: ``labels`` plus the GPU model and CUDA labels when it has GPUs."""
        labels = dict(self.labels)
        if self.gpus and self.gpu_model:
            labels[GPU_MODEL_LABEL] = self.gpu_model
        if self.gpus and self.cuda_version:
            labels[CUDA_LABEL] = self.cuda_version
        return labels


def default_nodes(workers: int = 2, gpus_per_worker: int = 2, gpu_model: str = FAKE_GPU_MODEL,
                  cuda_version: str = FAKE_CUDA_VERSION) -> list[NodeSpec]:
    """A manager without GPUs and ``workers`` workers with ``gpus_per_worker`` fake GPUs each."""
    nodes = [NodeSpec("manager", role="manager")]
    for number in range(1, workers + 1):
        name = f"worker{number}"
        gpus = tuple(f"GPU-fake-{name}-{index}" for index in range(gpus_per_worker))
        nodes.append(NodeSpec(name, gpus=gpus, gpu_model=gpu_model, cuda_version=cuda_version))
    return nodes


@dataclass
class SwarmNode:
    """A running node: its dockerd, address and (once joined) Swarm node id."""

    spec: NodeSpec
    address: str
    data_dir: Path          # data-root, daemon.json, log, engine key
    runtime_dir: Path       # socket, pidfile, exec-root (short: unix socket paths are limited)
    cgroup_parent: str
    process: subprocess.Popen | None = None
    node_id: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def gpus(self) -> tuple[str, ...]:
        return self.spec.gpus

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        """``unix://...``: the node's Docker API, reachable from any namespace."""
        return f"unix://{self.socket}"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "dockerd.log"

    def client(self, timeout: int = 60) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)

    def answers(self) -> bool:
        try:
            client = docker.DockerClient(base_url=self.docker_host, timeout=PING_TIMEOUT_S)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (DockerException, OSError):
            return False


class SwarmBench:
    """A manager and workers forming a real swarm, a registry on the manager; see the module doc.

    Use ``SwarmBench.start(...)`` (a context manager); ``stop()`` kills everything it
    started and removes its namespaces, mounts, cgroups and state. Registry storage
    lives in ``cache_dir`` and survives, so images seeded once are there next time.
    """

    def __init__(self, state_dir: Path, node_specs: Sequence[NodeSpec], cache_dir: Path,
                 say: Callable[[str], None], data_tmpfs_size: str | None = DATA_TMPFS_SIZE) -> None:
        if [spec.role for spec in node_specs].count("manager") != 1:
            raise SwarmBenchError("a swarm bench needs exactly one node with role='manager'")
        self.state_dir = Path(state_dir).resolve()
        self.cache_dir = Path(cache_dir).resolve()
        self.tag = short_tag(str(self.state_dir))
        self.runtime_dir = RUNTIME_ROOT / f"csw-{self.tag}"
        self.say = say
        self.data_tmpfs_size = data_tmpfs_size
        self.node_specs = list(node_specs)
        self.nodes: dict[str, SwarmNode] = {}
        self.network: PrivateNetwork | None = None
        self.registry: RegistryProcess | None = None
        self.timings: dict[str, float] = {}
        self._stopped = False

    # --- bring-up -------------------------------------------------------------

    @classmethod
    def start(cls, state_dir: Path, *, nodes: Sequence[NodeSpec] | None = None,
              cache_dir: Path | None = None, say: Callable[[str], None] = print,
              data_tmpfs_size: str | None = DATA_TMPFS_SIZE) -> SwarmBench:
        """Bring up the network, daemons, registry and swarm; print each phase's time.

        ``nodes``: default a manager and two workers with two fake GPUs each.
        ``cache_dir``: the registry's storage lives there and is kept (default
        ``state_dir/cache``). ``data_tmpfs_size``: the nodes' data-roots live on a
        tmpfs of at most this size (None: on disk); deleting pulled images file by
        file takes tens of seconds, unmounting a tmpfs none.
        """
        bench = cls(state_dir, nodes or default_nodes(), cache_dir or Path(state_dir) / "cache", say,
                    data_tmpfs_size)
        try:
            bench._bring_up()
        except BaseException:
            bench.stop()
            raise
        return bench

    def _bring_up(self) -> None:
        started = time.monotonic()
        with self._phase("packages"):
            ensure_debian_packages(SWARM_PACKAGES)
        with self._phase("cleanup"):
            self._remove_leftovers()
        with self._phase("network"):
            self._mount_data_tmpfs()
            self._create_network()
        with self._phase("daemons+registry"):
            for node in self.nodes.values():
                self._start_daemon(node)
            self._start_registry()
            for node in self.nodes.values():
                self._wait_for_daemon(node, attempts=DAEMON_START_ATTEMPTS)
        with self._phase("swarm"):
            self._form_swarm()
        with self._phase("tiny image"):
            self._push_tiny_image()
        self.timings["total"] = time.monotonic() - started
        self.say("swarm bench up: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.timings.items()))

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = time.monotonic() - started

    def _mount_data_tmpfs(self) -> None:
        nodes_dir = self.state_dir / "nodes"
        nodes_dir.mkdir(parents=True, exist_ok=True)
        if self.data_tmpfs_size:
            mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.data_tmpfs_size},mode=0711",
                                    "csw-nodes", str(nodes_dir)], capture_output=True, text=True)
            if mount.returncode != 0:
                raise SwarmBenchError(f"cannot mount a tmpfs on {nodes_dir}: {mount.stderr.strip()}")

    def _create_network(self) -> None:
        self.network = PrivateNetwork.create(self.state_dir / "ns", self.tag)
        for spec in self.node_specs:
            address = str(self.network.add_node(spec.name))
            self.nodes[spec.name] = SwarmNode(
                spec, address,
                data_dir=self.state_dir / "nodes" / spec.name,
                runtime_dir=self.runtime_dir / spec.name,
                cgroup_parent=f"/csw-{self.tag}-{spec.name}",
            )

    # --- daemons ----------------------------------------------------------------

    def _daemon_config(self, node: SwarmNode) -> dict[str, Any]:
        return {
            "hosts": [node.docker_host],
            "data-root": str(node.data_dir / "data"),
            "exec-root": str(node.runtime_dir / "x"),
            "pidfile": str(node.runtime_dir / "dockerd.pid"),
            "cgroup-parent": node.cgroup_parent,
            # Explicit: on cgroup v2 hosts dockerd may default to systemd, which wants a slice.
            "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "storage-driver": "overlay2",
            # Tasks use host networking: no bridge, no NAT (iptables rules would only
            # touch the node's own namespace anyway, but they cost start time).
            "bridge": "none",
            "iptables": False,
            "ip-masq": False,
            "ip-forward": False,
            "insecure-registries": [self.registry_address],
            "node-generic-resources": [f"{GPU_RESOURCE}={gpu}" for gpu in node.gpus],
            "labels": [f"{key}={value}" for key, value in node.spec.node_labels().items()],
            **_engine_key_option(node.data_dir / "key.json"),
        }

    def _start_daemon(self, node: SwarmNode) -> None:
        """dockerd in the node's namespace, with its own mount and UTS namespaces.

        Private mounts: the overlay and exec-root mounts die with the daemon (no
        leftovers in the host), and a tmpfs over /run/containerd hides a system
        containerd, which dockerd would otherwise use instead of starting its own
        (its containers would then run in the host's namespace).
        """
        assert self.network is not None
        for directory in (node.data_dir, node.runtime_dir):
            directory.mkdir(parents=True, exist_ok=True)
        node.socket.unlink(missing_ok=True)
        config = node.data_dir / "daemon.json"
        config.write_text(json.dumps(self._daemon_config(node), indent=2))
        script = ('hostname "$0" && '
                  'if [ -d /run/containerd ]; then mount -t tmpfs -o mode=0711 csw /run/containerd; fi && '
                  'exec dockerd --config-file "$1"')
        argv = self.network.nsenter(
            node.name, "unshare", "--mount", "--uts", "--propagation", "private",
            "sh", "-c", script, node.name, str(config),
        )
        with open(node.log_file, "ab") as log_file:
            node.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for_daemon(self, node: SwarmNode, attempts: int = 1) -> None:
        """Wait until the node's dockerd answers; start it again (``attempts`` in all) when it
        exits first, after killing the containerd it may leave behind."""
        for attempt in range(1, attempts + 1):
            try:
                self._wait_for_answer(node)
                return
            except DaemonExited:
                if attempt == attempts:
                    raise
            kill_pids(pid for pid in pids_in_namespace(self._network_path(node)) if _command(pid) == "containerd")
            self._start_daemon(node)

    def _network_path(self, node: SwarmNode) -> Path:
        assert self.network is not None
        return self.network.path(node.name)

    def _wait_for_answer(self, node: SwarmNode) -> None:
        assert node.process is not None
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while not node.answers():
            if node.process.poll() is not None:
                raise DaemonExited(f"dockerd of {node.name} exited with status "
                                   f"{node.process.returncode}.\n" + log_tail(node.log_file))
            if time.monotonic() > deadline:
                raise SwarmBenchError(f"dockerd of {node.name} did not answer within "
                                      f"{DAEMON_START_TIMEOUT_S:.0f} s.\n" + log_tail(node.log_file))
            time.sleep(0.05)

    # --- registry ---------------------------------------------------------------

    @property
    def manager(self) -> SwarmNode:
        return next(node for node in self.nodes.values() if node.role == "manager")

    def manager_client(self, timeout: int = 60) -> docker.DockerClient:
        """A client of the manager's Docker API: services, nodes and tasks of the whole swarm."""
        return self.manager.client(timeout)

    @property
    def workers(self) -> list[SwarmNode]:
        return [node for node in self.nodes.values() if node.role != "manager"]

    @property
    def registry_address(self) -> str:
        """host:port of the registry every node trusts (on the manager's address)."""
        return f"{self.manager.address}:{REGISTRY_PORT}"

    @property
    def registry_url(self) -> str:
        """The prefix of image names: ``<registry_url>/<name>:<tag>`` (no scheme)."""
        return self.registry_address

    @property
    def registry_storage(self) -> Path:
        return self.cache_dir / "registry"

    def image(self, name: str) -> str:
        """The registry-qualified reference for ``name`` (unqualified names make nodes try Docker Hub)."""
        return f"{self.registry_url}/{name}"

    @property
    def tiny_image(self) -> str:
        """A busybox image (~1 MB) in the registry: sh, env, sleep, httpd, wget."""
        return self.image(TINY_IMAGE)

    def _start_registry(self) -> None:
        assert self.network is not None
        self.registry = RegistryProcess.start(
            self.registry_storage, self.registry_address, self.state_dir / "registry.log",
            wrapper=self.network.nsenter(self.manager.name),
        )

    # --- swarm --------------------------------------------------------------------

    def _form_swarm(self) -> None:
        manager = self.manager
        client = manager.client()
        client.swarm.init(
            advertise_addr=manager.address, listen_addr=f"{manager.address}:{SWARM_PORT}",
            # A dead node is Down after a few missed heartbeats: ~4 s instead of ~15 s.
            dispatcher_heartbeat_period=HEARTBEAT_S * 1_000_000_000,
            task_history_retention_limit=2,
        )
        client.swarm.reload()
        token = client.swarm.attrs["JoinTokens"]["Worker"]
        errors: list[BaseException] = []
        joiners = [threading.Thread(target=self._join, args=(node, token, errors)) for node in self.workers]
        for thread in joiners:
            thread.start()
        for thread in joiners:
            thread.join()
        if errors:
            raise SwarmBenchError(f"workers could not join the swarm: {errors}")
        self._wait_for_nodes_ready()
        self._label_nodes()

    def _join(self, node: SwarmNode, token: str, errors: list[BaseException]) -> None:
        try:
            node.client().swarm.join(
                remote_addrs=[f"{self.manager.address}:{SWARM_PORT}"], join_token=token,
                listen_addr=f"{node.address}:{SWARM_PORT}", advertise_addr=node.address,
            )
        except BaseException as error:  # reported by the caller, in the main thread
            errors.append(error)

    def _wait_for_nodes_ready(self) -> None:
        """Until the manager lists every node Ready, with the GPUs it declared."""
        deadline = time.monotonic() + NODE_STATE_TIMEOUT_S
        client = self.manager.client()
        while True:
            # A node that has just joined may not report its description yet: not ready then.
            by_hostname = {node.attrs["Description"]["Hostname"]: node for node in client.nodes.list()
                           if node.attrs.get("Description", {}).get("Hostname")}
            ready = [name for name, node in by_hostname.items()
                     if node.attrs["Status"]["State"] == "ready"
                     and len(_declared_gpus(node.attrs)) == len(self.nodes[name].gpus)]
            if len(ready) == len(self.nodes):
                for name, swarm_node in by_hostname.items():
                    self.nodes[name].node_id = swarm_node.id
                return
            if time.monotonic() > deadline:
                missing = [node for name, node in self.nodes.items() if name not in ready]
                raise SwarmBenchError(f"only {sorted(ready)} of {sorted(self.nodes)} are ready in the swarm.\n"
                                      + "\n".join(log_tail(node.log_file, 8) for node in missing))
            time.sleep(0.1)

    def _label_nodes(self) -> None:
        client = self.manager.client()
        for node in self.nodes.values():
            labels = node.spec.node_labels()
            if not labels:
                continue
            swarm_node = client.nodes.get(node.node_id)
            spec = swarm_node.attrs["Spec"]
            spec["Labels"] = {**spec.get("Labels", {}), **labels}
            swarm_node.update(spec)

    # --- images ---------------------------------------------------------------------

    def _push_tiny_image(self) -> None:
        """Import busybox as a one-layer image on the manager and push it (once per registry cache)."""
        assert self.registry is not None
        repository, tag = TINY_IMAGE.split(":")
        if self.registry.manifest_config_digest(repository, tag):
            return
        client = self.manager.client()
        reference = self.image(repository)
        client.api.import_image_from_data(busybox_rootfs_tar(), repository=reference, tag=tag,
                                          changes=['CMD ["sh"]'])
        _push(client, reference, tag)

    def seed_image(self, source: docker.DockerClient, image: str) -> str:
        """Put an image of another daemon (the single-host bench's base) into the registry.

        Returns its registry reference. Skipped when the registry already has it (same
        image ID). The source daemon pushes to a second registry process on loopback
        over the same storage: it may use plain HTTP only there (127.0.0.0/8).
        """
        assert self.registry is not None
        repository, tag = _split_reference(image)
        image_id = source.images.get(image).id
        if self.registry.manifest_config_digest(repository, tag) == image_id:
            return self.image(f"{repository}:{tag}")
        address = f"127.0.0.1:{free_loopback_port()}"
        with RegistryProcess.start(self.registry_storage, address, self.state_dir / "seed-registry.log"):
            loopback_reference = f"{address}/{repository}"
            source.images.get(image).tag(loopback_reference, tag)
            try:
                _push(source, loopback_reference, tag)
            finally:
                source.images.remove(f"{loopback_reference}:{tag}", noprune=True)
        return self.image(f"{repository}:{tag}")

    def pull(self, reference: str, nodes: Iterable[str] | None = None) -> dict[str, float]:
        """Pull ``reference`` on ``nodes`` (default: the workers) in parallel; seconds per node."""
        names = list(nodes) if nodes is not None else [node.name for node in self.workers]
        seconds: dict[str, float] = {}
        errors: list[BaseException] = []

        def pull_on(name: str) -> None:
            started = time.monotonic()
            try:
                self.nodes[name].client(timeout=600).images.pull(reference)
            except BaseException as error:
                errors.append(error)
            seconds[name] = time.monotonic() - started

        threads = [threading.Thread(target=pull_on, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise SwarmBenchError(f"pulling {reference} failed: {errors[0]}")
        return seconds

    # --- nodes ------------------------------------------------------------------------

    def node_for_id(self, node_id: str) -> SwarmNode:
        """The node a task runs on (``task["NodeID"]``): its ``address`` is where servers listen."""
        for node in self.nodes.values():
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    def nsenter(self, node: str, *argv: str) -> list[str]:
        """The command line that runs ``argv`` in ``node``'s network namespace."""
        assert self.network is not None
        return self.network.nsenter(node, *argv)

    @property
    def host_address(self) -> str:
        """The host namespace's address on the subnet: where the hub listens for the nodes."""
        assert self.network is not None
        return str(self.network.host_address)

    def node_state(self, name: str) -> str:
        """The manager's view of a node: ``ready``, ``down``, ``unknown`` or ``disconnected``."""
        node = self.manager.client().nodes.get(self.nodes[name].node_id)
        return str(node.attrs["Status"]["State"])

    def wait_for_node_state(self, name: str, state: str, timeout: float = NODE_STATE_TIMEOUT_S) -> float:
        """Seconds until the manager reports ``state`` for ``name``."""
        started = time.monotonic()
        while self.node_state(name) != state:
            if time.monotonic() - started > timeout:
                raise SwarmBenchError(f"{name} is still {self.node_state(name)!r}, not {state!r}, "
                                      f"after {timeout:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - started

    def kill_node(self, name: str, *, dockerd_only: bool = False) -> None:
        """The machine dies: SIGKILL its dockerd, containerd, shims and containers (and the
        registry, on the manager). Its namespace stays: ``restart_node`` brings it back.

        ``dockerd_only``: only the daemon crashes (its containerd goes with it); the
        containers keep running, as they would on a real host, until dockerd restarts.
        """
        node = self.nodes[name]
        assert self.network is not None
        if dockerd_only:
            if node.process is not None:
                kill_pids([node.process.pid])
                node.process.wait()
            return
        self._kill_everything(node)
        if node.process is not None:
            node.process.wait()
        if node.role == "manager" and self.registry is not None:
            self.registry.stop()  # killed with its namespace; reap it
        _remove_cgroups(node.cgroup_parent)

    def _kill_everything(self, node: SwarmNode) -> None:
        """SIGKILL every process of the node, pass after pass until a pass finds none: a shim
        killed in one pass may just have forked (``runc delete``), and that child would live on."""
        for _ in range(KILL_PASSES):
            found = set(pids_in_namespace(self._network_path(node))) | set(_cgroup_pids(node.cgroup_parent))
            alive = [pid for pid in found if is_running(pid)]
            if not alive:
                return
            kill_pids(alive)
        raise SwarmBenchError(f"processes of {node.name} kept appearing after {KILL_PASSES} passes of SIGKILL")

    def restart_node(self, name: str) -> None:
        """Start a killed node's dockerd again; it rejoins the swarm from its own state."""
        node = self.nodes[name]
        self._start_daemon(node)
        self._wait_for_daemon(node, attempts=DAEMON_START_ATTEMPTS)
        if node.role == "manager":
            self._start_registry()

    # --- teardown -----------------------------------------------------------------------

    def stop(self) -> None:
        """Kill everything started here; remove namespaces, cgroups and state (not the cache)."""
        if self._stopped:
            return
        self._stopped = True
        started = time.monotonic()
        if self.registry is not None:
            self.registry.stop()
        for name in self.nodes:
            self.kill_node(name)
        self._remove_leftovers()
        self.say(f"swarm bench stopped in {time.monotonic() - started:.2f} s")

    def _remove_leftovers(self) -> None:
        """Whatever this state dir's bench (this one or a crashed earlier run) left running."""
        ns_dir = self.state_dir / "ns"
        if ns_dir.is_dir():
            for path in ns_dir.iterdir():
                kill_pids(pids_in_namespace(path))
        for spec in self.node_specs:
            cgroup_parent = f"/csw-{self.tag}-{spec.name}"
            kill_pids(_cgroup_pids(cgroup_parent))
            _remove_cgroups(cgroup_parent)
        remove_network(ns_dir, self.tag)
        for root in (self.state_dir, self.runtime_dir):
            unmount_under(root)
        self._remove_state()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        leftovers = mounts_under(self.state_dir) + mounts_under(self.runtime_dir)
        if leftovers:
            raise SwarmBenchError(f"mounts left after teardown: {leftovers}")

    def _remove_state(self) -> None:
        """Delete the state folder's contents (namespace files are unmounted by now), but the cache."""
        if not self.state_dir.is_dir():
            return
        for child in self.state_dir.iterdir():
            if child == self.cache_dir or child in self.cache_dir.parents:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def __enter__(self) -> SwarmBench:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- helpers ------------------------------------------------------------------------------


def _engine_key_option(key_path: Path) -> dict[str, str]:
    """Before Docker 23 the engine ID comes from /etc/docker/key.json, shared by every daemon
    of a machine, unless each has its own key path; later ones keep it in the data-root and
    refuse the option."""
    return {"deprecated-key-path": str(key_path)} if dockerd_major_version() < 23 else {}


@functools.cache
def dockerd_major_version() -> int:
    output = subprocess.run(["dockerd", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"version (\d+)\.", output)
    return int(match.group(1)) if match else 0


def _declared_gpus(node_attrs: Mapping[str, Any]) -> list[str]:
    """The GPU ids a Swarm node declares (``Description.Resources.GenericResources``).

    Ids (``NVIDIA-GPU=GPU-...``) are *named* resources; a bare count would be discrete.
    """
    resources = node_attrs.get("Description", {}).get("Resources", {}).get("GenericResources") or []
    return [item["NamedResourceSpec"]["Value"] for item in resources
            if item.get("NamedResourceSpec", {}).get("Kind") == GPU_RESOURCE]


def _split_reference(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        return image, "latest"
    return repository, tag


def _push(client: docker.DockerClient, repository: str, tag: str) -> None:
    for line in client.api.push(repository, tag=tag, stream=True, decode=True):
        if "error" in line:
            raise SwarmBenchError(f"pushing {repository}:{tag} failed: {line['error']}")


def busybox_rootfs_tar() -> bytes:
    """A root filesystem of the host's static busybox and a few applet links."""
    busybox = shutil.which("busybox")
    if busybox is None or not _is_static_elf(Path(busybox)):
        raise SwarmBenchError(f"the bench needs a static busybox, found {busybox} (apt-get install busybox-static)")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return buffer.getvalue()


def _is_static_elf(path: Path) -> bool:
    """Whether an ELF executable has no program interpreter (PT_INTERP): it runs in an empty image."""
    with open(path, "rb") as executable:
        header = executable.read(65536)  # the ELF and program headers come first
    if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only, like the machines we run on
        return False
    order = "<" if header[5] == 1 else ">"
    (phoff,) = struct.unpack_from(order + "Q", header, 0x20)
    phentsize, phnum = struct.unpack_from(order + "HH", header, 0x36)
    types = (struct.unpack_from(order + "I", header, phoff + index * phentsize)[0] for index in range(phnum))
    return PT_INTERP not in types


def cgroup_dirs(cgroup_parent: str) -> list[Path]:
    """The cgroup folders of a node's containers, in every hierarchy (v1) or the unified one (v2)."""
    name = cgroup_parent.strip("/")
    root = Path("/sys/fs/cgroup")
    found = [path for path in root.glob(f"*/{name}") if path.is_dir()]
    if (root / name).is_dir():
        found.append(root / name)
    return found


def _cgroup_pids(cgroup_parent: str) -> list[int]:
    pids: set[int] = set()
    for directory in cgroup_dirs(cgroup_parent):
        for procs in directory.rglob("cgroup.procs"):
            try:
                pids.update(int(pid) for pid in procs.read_text().split())
            except OSError:
                continue
    return sorted(pid for pid in pids if is_running(pid))


def _remove_cgroups(cgroup_parent: str) -> None:
    """rmdir a node's (now empty) cgroup folders, deepest first. A folder may vanish while we
    walk (its container's ``runc delete`` removes it): os.walk skips what it cannot list."""
    for directory in cgroup_dirs(cgroup_parent):
        for parent, children, _files in os.walk(directory, topdown=False):
            for child in children:
                _rmdir(Path(parent) / child)
        _rmdir(directory)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# --- by hand ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m condaspawner_bench.swarm [STATE_DIR]``: bring a swarm up, print how to use it,
    hold it until Ctrl-C, then tear it down."""
    parser = argparse.ArgumentParser(prog="python -m condaspawner_bench.swarm", description=main.__doc__)
    parser.add_argument("state_dir", nargs="?", default=".swarm-bench", type=Path)
    args = parser.parse_args(argv)
    with SwarmBench.start(args.state_dir) as bench:
        for node in bench.nodes.values():
            gpus = f" GPUs {', '.join(node.gpus)}" if node.gpus else ""
            print(f"{node.name:10} {node.address:15} DOCKER_HOST={node.docker_host}{gpus}")
            print(f"{'':10} shell: {' '.join(bench.nsenter(node.name, 'bash'))}")
        print(f"registry   {bench.registry_url}   tiny image {bench.tiny_image}")
        print(f"host       {bench.host_address} (the hub listens here)   Ctrl-C stops it all")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
