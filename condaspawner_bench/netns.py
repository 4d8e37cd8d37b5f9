"""Network namespaces joined by a private bridge: the wiring of the multi-node bench.

Each node is a network namespace with one veth (``eth0``) plugged into a bridge
that lives in a namespace of its own (the "switch"), so nothing of it is visible in
the host's namespace except one more veth, which gives the host (the hub, the proxy,
the tests) an address on the same private subnet. Nodes get loopback and that subnet
only: no default route, so no packet from a node can leave the namespaces.

Namespaces are plain files (no ``/run/netns``, no ``ip netns add``): ``unshare
--net=FILE true`` bind-mounts a new namespace onto FILE, which keeps it alive with no
process in it; ``nsenter --net=FILE CMD`` runs a command inside. Root only.

    net = PrivateNetwork.create(Path("/tmp/x/ns"), tag="a1b2c3")
    address = net.add_node("manager")          # 10.x.y.11, say
    subprocess.run(net.nsenter("manager", "ip", "addr"))
    net.remove()
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SWITCH = "switch"
BRIDGE = "br0"
NODE_IF = "eth0"
# 10.x.y.0/24 subnets the bench picks from; the /8 is private (RFC 1918).
SUBNET_PREFIX = "10.{}.{}.0/24"
SUBNET_SECOND_OCTETS = range(200, 250)
HOST_HOST_ID = 1           # the host's address on the subnet: .1
FIRST_NODE_HOST_ID = 11    # nodes: .11, .12, ...
KILL_TIMEOUT_S = 10.0
# Words `ip route show table all` may put before a route's destination.
ROUTE_TYPES = {"unicast", "local", "broadcast", "multicast", "anycast", "throw", "unreachable",
               "prohibit", "blackhole", "nat"}


class NetnsError(RuntimeError):
    """A namespace or link could not be set up."""


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


# --- namespaces as files ------------------------------------------------------


def create_namespace(path: Path) -> None:
    """A new, empty network namespace kept alive by a bind mount on ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    run(["unshare", f"--net={path}", "true"])
    # Loopback is down in a new namespace; servers and dockerd's own API need it.
    run(nsenter(path, "ip", "link", "set", "lo", "up"))


def remove_namespace(path: Path) -> None:
    """Unmount and delete a namespace file; the namespace goes once nothing runs in it."""
    if is_namespace(path):
        run(["umount", str(path)], check=False)
        if is_namespace(path):
            run(["umount", "--lazy", str(path)])
    path.unlink(missing_ok=True)


def is_namespace(path: Path) -> bool:
    """Whether a namespace is bind-mounted on ``path`` (a plain file reads as empty)."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False


def nsenter(path: Path, *argv: str) -> list[str]:
    """The command line that runs ``argv`` inside the network namespace at ``path``."""
    return ["nsenter", f"--net={path}", *argv]


def namespace_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a namespace, to compare with ``/proc/PID/ns/net``."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def pids_in_namespace(path: Path) -> list[int]:
    """Every process whose network namespace is the one bind-mounted at ``path``."""
    wanted = namespace_id(path)
    if wanted is None or not is_namespace(path):
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        if namespace_id(proc / "ns" / "net") == wanted:
            found.append(int(proc.name))
    return found


def kill_pids(pids: Iterable[int], timeout: float = KILL_TIMEOUT_S) -> None:
    """SIGKILL processes and wait until they are gone (or zombies: their parent reaps them)."""
    pids = [pid for pid in pids if pid != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(is_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise NetnsError(f"processes still running after SIGKILL: {[p for p in pids if is_running(p)]}")
        time.sleep(0.02)


def is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --- the private network --------------------------------------------------------


def short_tag(text: str, length: int = 6) -> str:
    """A short, stable hex tag (interface names are limited to 15 characters)."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class PrivateNetwork:
    """A switch namespace with a bridge, node namespaces on it, and the host's veth.

    ``ns_dir`` holds the namespace files (``switch``, one per node). ``tag`` makes the
    host-side interface name unique per bench (``csw<tag>``), so two benches on one
    machine don't collide; the subnet is chosen among those the host doesn't route yet.
    """

    ns_dir: Path
    tag: str
    subnet: ipaddress.IPv4Network
    nodes: dict[str, ipaddress.IPv4Address] = field(default_factory=dict)

    @classmethod
    def create(cls, ns_dir: Path, tag: str) -> PrivateNetwork:
        """The switch and the host's link into it, on a subnet the host does not use."""
        network = cls(ns_dir, tag, pick_free_subnet(tag))
        network.remove()  # what a crashed run with the same tag left behind
        create_namespace(network.switch_path)
        run(nsenter(network.switch_path, "ip", "link", "add", BRIDGE, "type", "bridge"))
        run(nsenter(network.switch_path, "ip", "link", "set", BRIDGE, "up"))
        network._attach_host()
        return network

    @property
    def switch_path(self) -> Path:
        return self.ns_dir / SWITCH

    @property
    def host_if(self) -> str:
        return f"csw{self.tag}"

    @property
    def host_address(self) -> ipaddress.IPv4Address:
        """The host's address on the subnet: where nodes reach the hub."""
        return self.subnet.network_address + HOST_HOST_ID

    def path(self, node: str) -> Path:
        return self.ns_dir / node

    def nsenter(self, node: str, *argv: str) -> list[str]:
        return nsenter(self.path(node), *argv)

    def add_node(self, name: str) -> ipaddress.IPv4Address:
        """A namespace for ``name`` with ``eth0`` on the switch; its address, no default route."""
        address = self.subnet.network_address + FIRST_NODE_HOST_ID + len(self.nodes)
        path = self.path(name)
        create_namespace(path)
        port = f"p{len(self.nodes)}-{self.tag}"
        # Created in the switch, its peer lands straight in the node as eth0.
        run(nsenter(self.switch_path, "ip", "link", "add", port, "type", "veth",
                    "peer", "name", NODE_IF, "netns", str(path)))
        run(nsenter(self.switch_path, "ip", "link", "set", port, "master", BRIDGE, "up"))
        self._configure_end(path, NODE_IF, address)
        self.nodes[name] = address
        return address

    def _attach_host(self) -> None:
        """A veth from the host's namespace into the switch, with a connected route only.

        The hub, the proxy and the tests run in the host's namespace: this link lets
        them reach nodes' addresses, and the nodes reach the hub. The host adds no
        default route and does not forward what arrives on this link.
        """
        run(["ip", "link", "add", self.host_if, "type", "veth",
             "peer", "name", "host", "netns", str(self.switch_path)])
        run(nsenter(self.switch_path, "ip", "link", "set", "host", "master", BRIDGE, "up"))
        _write_sysctl(f"net/ipv4/conf/{self.host_if}/forwarding", "0")
        _write_sysctl(f"net/ipv6/conf/{self.host_if}/disable_ipv6", "1")
        self._configure_end(None, self.host_if, self.host_address)

    def _configure_end(self, path: Path | None, interface: str,
                       address: ipaddress.IPv4Address) -> None:
        def ip(*args: str) -> list[str]:
            return nsenter(path, "ip", *args) if path else ["ip", *args]

        if path is not None:
            # No IPv6 inside: no link-local chatter, nothing but the IPv4 subnet.
            run(nsenter(path, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"))
        run(ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", interface))
        run(ip("link", "set", interface, "up"))

    def can_route_out(self, node: str, destination: str = "8.8.8.8") -> bool:
        """Whether ``node`` has a route to ``destination`` (it must not, off the subnet)."""
        return run(self.nsenter(node, "ip", "route", "get", destination), check=False).returncode == 0

    def remove(self) -> None:
        """Delete the host's veth and every namespace file under ``ns_dir``.

        Processes still running in the namespaces must be killed first (see
        ``pids_in_namespace``); a namespace with processes outlives its file.
        """
        remove_network(self.ns_dir, self.tag)
        self.nodes.clear()


def remove_network(ns_dir: Path, tag: str) -> None:
    """``PrivateNetwork.remove`` for a network known only by its folder and tag (a crashed run's)."""
    run(["ip", "link", "del", f"csw{tag}"], check=False)
    if ns_dir.is_dir():
        for path in sorted(ns_dir.iterdir()):
            remove_namespace(path)


def pick_free_subnet(tag: str) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that no address or route of the host overlaps (our own stale link aside).

    Starts at a place derived from ``tag`` so two benches rarely even try the same one.
    """
    used = _host_networks(ignore_interface=f"csw{tag}")
    start = int(tag, 16)
    candidates = [(second, third) for second in SUBNET_SECOND_OCTETS for third in range(256)]
    for offset in range(len(candidates)):
        second, third = candidates[(start + offset) % len(candidates)]
        subnet = ipaddress.IPv4Network(SUBNET_PREFIX.format(second, third))
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    raise NetnsError("no free 10.x.y.0/24 subnet for the bench")


def _host_networks(ignore_interface: str) -> list[ipaddress.IPv4Network]:
    """Networks the host routes or has addresses in (the default route aside)."""
    networks = []
    routes = run(["ip", "-4", "-o", "route", "show", "table", "all"]).stdout.splitlines()
    addresses = run(["ip", "-4", "-o", "addr", "show"]).stdout.splitlines()
    for line in routes:
        words = line.split()
        if not words or words[0] == "default" or f"dev {ignore_interface}" in line:
            continue
        target = words[1] if words[0] in ROUTE_TYPES else words[0]
        networks.append(ipaddress.IPv4Network(target, strict=False))
    for line in addresses:
        words = line.split()
        if words[1] != ignore_interface:
            networks.append(ipaddress.IPv4Interface(words[3]).network)
    return networks


def _write_sysctl(name: str, value: str) -> None:
    Path("/proc/sys", name).write_text(value)
