"""A Spark cluster of several "hosts" on one Linux machine: one network namespace per node.

The root namespace gets a bridge with the subnet's first address; it runs the Spark master
(and the driver). Each node is a namespace joined to the bridge by a veth pair, with its own
address and, through ``unshare --uts``, its own host name, running one Spark worker bound to
its address. Ranks on different nodes therefore see different hosts and MPI connects them with
TCP through the veths, which ``tc netem`` can shape like a cluster network. Nodes have no
default route: of the root namespace's addresses only the bridge's is reachable from them.
Needs root and iproute2 (``ip``, ``tc``) and util-linux (``unshare``); no Docker.

Everything made is recorded in the state directory before it is made, so :meth:`stop` removes
every process, namespace, link and filter also after a failed start, and
:meth:`NetnsCluster.cleanup` does the same by name prefix when even the state is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from sparkmpi.deploy.links import (
    LinkEnd,
    NetnsError,
    block,
    burst_bytes,
    ip,
    kill_inside,
    link_state,
    links_named,
    netem_available,
    netns_unavailable,
    shape_end,
    unblock,
)
from sparkmpi.deploy.standalone import StandaloneCluster, _alive, worker_command

__all__ = ["DEFAULT_STATE", "NODE_ENV", "NetnsCluster", "NetnsError", "Node", "netns_unavailable"]

DEFAULT_STATE = Path.home() / ".sparkmpi" / "netns"
REGISTRY = Path("/run/sparkmpi-netns")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,7}$")
NODE_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0"}
"""What every process of a node runs with. The nodes share one kernel, so UCX (MPICH's network
module) would find a rank of another node through its same-host transports (shared memory,
cross-memory attach), whatever the host names say; between nodes it must use the network, as
between real hosts. Ranks on one node still share memory: MPICH's own shared-memory module
serves them, chosen from ``PMI_process_mapping``."""


def _node_env() -> list[str]:
    return [f"{key}={value}" for key, value in NODE_ENV.items()]


@dataclass(frozen=True)
class Node:
    """One node: its namespace (also its host name), address, root-side veth and cores."""

    name: str
    address: str
    veth: str
    cores: int


class NetnsCluster:
    """``nodes`` namespaces on a bridge, a Spark master in the root namespace and one worker
    of ``cores`` cores (an int, or one per node) in each node."""

    def __init__(
        self,
        state_dir: str | os.PathLike = DEFAULT_STATE,
        *,
        nodes: int = 2,
        cores: int | Sequence[int] = 1,
        memory: str = "1g",
        prefix: str = "smpi",
        subnet: str = "10.77.0.0/24",
        rate: str | None = None,
        delay: str | None = None,
    ):
        if not _PREFIX.match(prefix):
            raise NetnsError(
                f"prefix {prefix!r}: 1-8 lower-case letters and digits, a letter first"
            )
        try:
            network = ipaddress.ip_network(subnet)
        except ValueError:
            raise NetnsError(f"subnet {subnet!r} is not a network like 10.77.0.0/24") from None
        counts = [cores] * nodes if isinstance(cores, int) else list(cores)
        if nodes < 1 or len(counts) != nodes or min(counts) < 1:
            raise NetnsError(f"{nodes} node(s) need as many positive core counts, got {cores!r}")
        if rate:
            burst_bytes(rate)  # a rate tc cannot read is refused before anything is built
        hosts = list(network.hosts())
        if len(hosts) < nodes + 11:
            raise NetnsError(f"subnet {subnet} is too small for {nodes} nodes")
        self.state_dir = Path(state_dir)
        self.prefix, self.subnet, self.memory = prefix, str(network), memory
        self.rate, self.delay = rate, delay
        self.bridge = f"{prefix}-br"
        self.bridge_address = str(hosts[0])
        self.nodes = [
            Node(f"{prefix}-node{i + 1}", str(hosts[10 + i]), f"{prefix}-v{i + 1}", counts[i])
            for i in range(nodes)
        ]
        self.extra_addresses: list[str] = []
        self._master: StandaloneCluster | None = None

    @property
    def master(self) -> StandaloneCluster:
        """The Spark master on the bridge address (made once the bridge exists)."""
        if self._master is None:
            self._master = StandaloneCluster(self.state_dir, workers=0, host=self.bridge_address)
        return self._master

    # -- state --------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.master.url

    @property
    def env(self) -> dict[str, str]:
        """Environment for a driver in the root namespace (Spark advertises the bridge)."""
        return dict(self.master.env)

    @property
    def mpiexec_launcher(self) -> Path:
        return self.state_dir / "launch-on-node"

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "prefix": self.prefix,
            "subnet": self.subnet,
            "memory": self.memory,
            "rate": self.rate,
            "delay": self.delay,
            "nodes": [asdict(n) for n in self.nodes],
            "extra_addresses": self.extra_addresses,
        }
        (self.state_dir / "netns.json").write_text(json.dumps(state, indent=2))
        with contextlib.suppress(OSError):
            REGISTRY.mkdir(parents=True, exist_ok=True)
            (REGISTRY / self.prefix).write_text(str(self.state_dir.resolve()))

    @classmethod
    def load(cls, state_dir: str | os.PathLike = DEFAULT_STATE) -> NetnsCluster:
        """The cluster recorded in ``state_dir``; NetnsError if there is none."""
        path = Path(state_dir) / "netns.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            raise NetnsError(f"{state_dir}: no namespace cluster recorded there") from None
        nodes = [Node(**n) for n in state["nodes"]]
        cluster = cls(
            state_dir,
            nodes=len(nodes),
            cores=[n.cores for n in nodes],
            memory=state["memory"],
            prefix=state["prefix"],
            subnet=state["subnet"],
            rate=state["rate"],
            delay=state["delay"],
        )
        cluster.extra_addresses = state["extra_addresses"]
        with contextlib.suppress(OSError, KeyError, ValueError):
            cluster._master = StandaloneCluster.load(state_dir)
        return cluster

    def node_of(self, name_or_address: str) -> Node:
        for node in self.nodes:
            if name_or_address in (node.name, node.address):
                return node
        raise NetnsError(f"no node {name_or_address!r} in cluster {self.prefix}")

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> NetnsCluster:
        """Builds the network, starts the master and one worker per node; returns once every
        worker has registered. On any failure, removes what it made and re-raises."""
        namespaces = ip("netns", "list").stdout.split()
        if links_named(self.prefix) or any(n.startswith(f"{self.prefix}-node") for n in namespaces):
            raise NetnsError(
                f"a namespace cluster with prefix {self.prefix!r} exists; remove it with "
                f"'spark-mpi cluster stop --netns --prefix {self.prefix}' or "
                f"'scripts/netns-cluster.sh down --prefix {self.prefix}'"
            )
        self._save()
        try:
            self._build_network()
            if self.rate or self.delay:
                self.shape(self.rate, self.delay)
            self._write_launcher()
            self.master.start(timeout)
            for node in self.nodes:
                self._start_worker(node)
            self.wait_for_workers(len(self.nodes), timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _build_network(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.bridge_address}/{self._prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            ip("netns", "add", node.name)
            ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.name)
            ip("link", "set", node.veth, "master", self.bridge, "up")
            ip("-n", node.name, "addr", "add", f"{node.address}/{self._prefixlen}", "dev", "eth0")
            ip("-n", node.name, "link", "set", "eth0", "up")
            ip("-n", node.name, "link", "set", "lo", "up")

    @property
    def _prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def node_command(self, node: Node, argv: list[str]) -> list[str]:
        """``argv`` run inside ``node``: its network namespace, its own host name, NODE_ENV."""
        enter = ["ip", "netns", "exec", node.name, "unshare", "--uts", "--", "env", *_node_env()]
        return [*enter, "sh", "-c", 'hostname "$0" && exec "$@"', node.name, *argv]

    def _start_worker(self, node: Node) -> None:
        work_dir = str(self.state_dir / f"work-{node.name}")
        command = worker_command(self.url, node.cores, self.memory, node.address, work_dir)
        self.master._spawn(
            f"worker-{node.name}",
            self.node_command(node, ["env", f"SPARK_LOCAL_IP={node.address}", *command]),
        )

    def _write_launcher(self) -> None:
        cases = "\n".join(f"    {n.address}|{n.name}) ns={n.name} ;;" for n in self.nodes)
        script = f"""#!/bin/sh
# Hydra's ssh launcher runs: THIS [-x ...] HOST COMMAND...; run COMMAND on that node instead.
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1; shift
case "$host" in
{cases}
    *) echo "launch-on-node: no node $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" unshare --uts -- env {" ".join(_node_env())} \\
    sh -c "hostname $ns && exec $*"
"""
        self.mpiexec_launcher.write_text(script)
        self.mpiexec_launcher.chmod(0o755)

    def mpiexec_args(self, hosts: Sequence[str]) -> list[str]:
        """Hydra options placing ranks on ``hosts`` (node names or addresses, ``:N`` slots)."""
        placed = []
        for host in hosts:
            name, _, slots = host.partition(":")
            address = self.node_of(name).address
            placed.append(f"{address}:{slots}" if slots else address)
        launcher = ["-launcher", "ssh", "-launcher-exec", str(self.mpiexec_launcher)]
        env = [arg for key, value in NODE_ENV.items() for arg in ("-genv", key, value)]
        return ["-hosts", ",".join(placed), *launcher, "-iface", self.bridge, *env]

    # -- workers ------------------------------------------------------------------------------
    def alive_hosts(self) -> set[str]:
        """Addresses of the workers the master counts as alive."""
        try:
            url = f"http://{self.bridge_address}:{self.master.webui_port}/json/"
            with urllib.request.urlopen(url, timeout=2) as reply:
                workers = json.load(reply).get("workers", [])
        except (OSError, ValueError):
            return set()
        return {w.get("host") for w in workers if w.get("state") == "ALIVE"}

    def wait_for_workers(self, count: int, timeout: float = 180) -> None:
        """Returns once ``count`` workers are alive; NetnsError at once if the master or a
        worker process ended (naming its log), or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.master.alive_workers() < count:
            for name, pid in self.master.pids.items():
                if _exited(pid):
                    log = self.state_dir / f"{name}.log"
                    raise NetnsError(f"the Spark {name} exited; see {log}")
            if time.monotonic() > deadline:
                raise NetnsError(f"{count} workers did not register within {timeout} s")
            time.sleep(0.3)

    def _wait_for(self, node: Node, alive: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (node.address in self.alive_hosts()) != alive:
            if time.monotonic() > deadline:
                state = "register" if alive else "leave"
                raise NetnsError(f"the worker of {node.name} did not {state} within {timeout} s")
            time.sleep(0.2)

    def kill_worker(self, node: Node) -> None:
        """SIGKILLs the node's worker JVM (not its executors) and waits until the master sees it."""
        pid = self.master.pids.get(f"worker-{node.name}")
        if pid is None or not _alive(pid):
            raise NetnsError(f"the worker of {node.name} is not running")
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        self._wait_for(node, False, 120)

    def restart_worker(self, node: Node, timeout: float = 120) -> None:
        self._start_worker(node)
        self._wait_for(node, True, timeout)

    # -- the network --------------------------------------------------------------------------
    def _ends(self, node: Node) -> tuple[LinkEnd, LinkEnd]:
        """The root-side and the node-side end of ``node``'s link."""
        return LinkEnd(node.veth), LinkEnd("eth0", node.name)

    def shape(
        self, rate: str | None, delay: str | None = None, nodes: Sequence[Node] | None = None
    ) -> None:
        """Limits both ends of the links of ``nodes`` (all: None) to ``rate`` (htb) with netem
        ``delay``, replacing what was set; None lifts either. Blocks set with :meth:`block` on
        those nodes are lifted too."""
        if delay and not netem_available():
            raise NetnsError(
                "this kernel has no netem qdisc (sch_netem), so --delay cannot be emulated; "
                "--rate works without it"
            )
        if rate:
            burst_bytes(rate)
        if nodes is None:
            self.rate, self.delay = rate, delay
            self._save()
        for node in nodes or self.nodes:
            for end in self._ends(node):
                shape_end(end, rate, delay)

    def set_link(self, node: Node, up: bool) -> None:
        """Takes ``node``'s link down or up; returns once both ends show it. After "up" the
        addresses either end failed to resolve meanwhile are forgotten: a resolution begun
        while the link was down would otherwise fail a new connection with "no route to host"."""
        ip("link", "set", node.veth, "up" if up else "down")
        deadline = time.monotonic() + 30
        while (link_state(node.veth) == "UP", link_state("eth0", node.name) == "UP") != (up, up):
            if time.monotonic() > deadline:
                raise NetnsError(f"the link of {node.name} did not go {'up' if up else 'down'}")
            time.sleep(0.05)
        if up:
            ip("-n", node.name, "neigh", "flush", "dev", "eth0")
            ip("neigh", "flush", "dev", self.bridge, "to", node.address)

    def link_bytes(self, node: Node) -> int:
        """Bytes received plus sent on the node's root-side veth so far."""
        stats = Path("/sys/class/net") / node.veth / "statistics"
        return sum(int((stats / f).read_text()) for f in ("rx_bytes", "tx_bytes"))

    def block(self, node: Node, address: str, port: int) -> None:
        """Silently drops TCP packets from ``node`` to ``address:port`` (until :meth:`unblock`)."""
        block(self._ends(node)[1], address, port)

    def unblock(self, node: Node) -> None:
        unblock(self._ends(node)[1])

    def add_root_address(self, address_cidr: str) -> None:
        """A second address in the root namespace, on an interface of its own; no node reaches it
        (nodes route only their own subnet)."""
        spare = f"{self.prefix}-x0"  # a bridge with no ports (some kernels lack dummy links)
        self.extra_addresses.append(address_cidr)
        self._save()
        if ip("link", "show", spare, check=False).returncode != 0:
            ip("link", "add", spare, "type", "bridge")
            ip("link", "set", spare, "up")
        ip("addr", "add", address_cidr, "dev", spare)

    # -- teardown -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Removes every process, namespace, link and filter of this cluster (idempotent)."""
        if self._master is not None:
            self._master.stop()
        NetnsCluster.cleanup(self.prefix)
        (self.state_dir / "netns.json").unlink(missing_ok=True)

    @staticmethod
    def cleanup(prefix: str) -> list[str]:
        """Removes what a cluster with ``prefix`` left: the master recorded in its state (by
        PID), every process inside its namespaces, the namespaces, its links. Returns what it
        removed."""
        removed = []
        registered = REGISTRY / prefix
        with contextlib.suppress(OSError, NetnsError):
            state_dir = registered.read_text().strip()
            StandaloneCluster.load(state_dir).stop()
        registered.unlink(missing_ok=True)
        namespaces = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line]
        ours = [ns for ns in namespaces if ns.startswith(f"{prefix}-node")]
        for ns in ours:
            kill_inside(ns)
            ip("netns", "del", ns, check=False)
            removed.append(f"namespace {ns}")
        for link in links_named(prefix):
            ip("link", "del", link, check=False)
            removed.append(f"link {link}")
        deadline = time.monotonic() + 30
        while links_named(prefix) and time.monotonic() < deadline:
            time.sleep(0.1)  # namespaces go away asynchronously, their veths with them
        return removed

    def __enter__(self) -> NetnsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exited(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie counts; its command line may be mid-exec)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
