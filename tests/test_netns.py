"""The test bed: a Spark cluster of network namespaces on one machine (root only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from sparkmpi.deploy.links import NetnsError, netem_available
from sparkmpi.deploy.netns import NetnsCluster, netns_unavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def needs_netns():
    why = netns_unavailable()
    if why:
        pytest.skip(f"needs network namespaces: {why}")


ROOT_EXTRA = "10.79.0.1"
RUN = os.getpid() % 10000
FAIL_PREFIX, CLI_PREFIX = f"tf{RUN}", f"tc{RUN}"
FAIL_SUBNET = "10.76.0.0/24"

CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as exc:
    print("failed", type(exc).__name__, exc.strerror or "")
"""


def on_node(cluster: NetnsCluster, node, code: str, *args: str) -> str:
    command = cluster.node_command(node, [sys.executable, "-c", code, *args])
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def tc(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout


def connect_from(cluster, node, address: str, port: int, timeout: float = 3) -> str:
    return on_node(cluster, node, CONNECT, address, str(port), str(timeout))


@pytest.fixture
def listener(netns_cluster):
    """A TCP listener in the root namespace on the bridge address."""
    import socket

    with socket.socket() as sock:
        sock.bind((netns_cluster.bridge_address, 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_every_node_has_its_own_host_name_address_and_worker(netns_cluster):
    cluster = netns_cluster
    assert cluster.alive_hosts() == {n.address for n in cluster.nodes}
    for node in cluster.nodes:
        code = "import socket; print(socket.gethostname())"
        assert on_node(cluster, node, code) == node.name
        addresses = subprocess.run(
            cluster.node_command(node, ["ip", "-4", "-o", "addr", "show", "eth0"]),
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert f"{node.address}/24" in addresses


def test_nodes_reach_each_other_and_the_bridge_over_tcp(netns_cluster, listener):
    cluster = netns_cluster
    first, second = cluster.nodes[0], cluster.nodes[1]
    serve = "import socket; s = socket.socket(); s.bind(('0.0.0.0', 7788)); s.listen();"
    serve += "print('up', flush=True); s.accept()[0].close()"
    server = subprocess.Popen(
        cluster.node_command(second, [sys.executable, "-c", serve]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "up"
        assert connect_from(cluster, first, second.address, 7788) == "connected"
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()
    assert connect_from(cluster, first, cluster.bridge_address, listener) == "connected"


def test_a_second_root_address_is_unreachable_from_the_nodes(netns_cluster):
    import socket

    cluster = netns_cluster
    if ROOT_EXTRA + "/24" not in cluster.extra_addresses:
        cluster.add_root_address(ROOT_EXTRA + "/24")
    with socket.socket() as sock:
        sock.bind((ROOT_EXTRA, 0))
        sock.listen()
        port = sock.getsockname()[1]
        socket.create_connection((ROOT_EXTRA, port), timeout=5).close()
        assert connect_from(cluster, cluster.nodes[0], ROOT_EXTRA, port).startswith("failed")


def test_shaping_blocking_and_link_state(netns_cluster, listener):
    cluster, node = netns_cluster, netns_cluster.nodes[1]
    before = cluster.link_bytes(node)
    cluster.shape("500mbit", nodes=[node])
    try:
        for end in (["tc"], ["ip", "netns", "exec", node.name, "tc"]):
            dev = node.veth if end == ["tc"] else "eth0"
            assert "htb 1:" in tc(*end, "qdisc", "show", "dev", dev)
            assert "rate 500Mbit" in tc(*end, "class", "show", "dev", dev)
        assert "rate 500Mbit" not in tc("tc", "class", "show", "dev", cluster.nodes[0].veth)
        if netem_available():
            cluster.shape("500mbit", "1ms", nodes=[node])
            assert "netem" in tc("tc", "qdisc", "show", "dev", node.veth)
        else:
            with pytest.raises(NetnsError, match="no netem qdisc"):
                cluster.shape("500mbit", "1ms", nodes=[node])
    finally:
        cluster.shape(None)
    assert "rate 500Mbit" not in tc("tc", "class", "show", "dev", node.veth)
    cluster.block(node, cluster.bridge_address, listener)
    try:
        blocked = connect_from(cluster, node, cluster.bridge_address, listener, 2)
        assert blocked.startswith("failed TimeoutError")
        other = cluster.nodes[2]
        assert connect_from(cluster, other, cluster.bridge_address, listener) == "connected"
    finally:
        cluster.unblock(node)
    assert connect_from(cluster, node, cluster.bridge_address, listener) == "connected"
    cluster.set_link(node, False)
    try:
        assert connect_from(cluster, node, cluster.bridge_address, listener, 2).startswith("failed")
    finally:
        cluster.set_link(node, True)
    assert connect_from(cluster, node, cluster.bridge_address, listener, 30) == "connected"
    assert cluster.link_bytes(node) > before


def test_a_killed_worker_leaves_and_a_restarted_one_registers(netns_cluster):
    cluster, node = netns_cluster, netns_cluster.nodes[2]
    cluster.kill_worker(node)
    assert node.address not in cluster.alive_hosts()
    cluster.restart_worker(node)
    assert cluster.alive_hosts() == {n.address for n in cluster.nodes}


def namespace_pids(namespace: str) -> list[str]:
    command = ["ip", "netns", "pids", namespace]
    return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.split()


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: it waits for init, which the stopper is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def naming(address: str) -> list[int]:
    """Running processes whose command line names ``address`` (the master, the workers)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(address in arg for arg in proc.info["cmdline"] or []) and running(proc.pid):
            found.append(proc.pid)
    return found


def leftovers(prefix: str) -> list[str]:
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line for line in (namespaces + links).splitlines() if f"{prefix}-" in line]


def test_a_failed_start_leaves_nothing(tmp_path):
    cluster = NetnsCluster(tmp_path, nodes=1, memory="lots", prefix=FAIL_PREFIX, subnet=FAIL_SUBNET)
    with pytest.raises(NetnsError, match=f"worker-{FAIL_PREFIX}-node1 exited"):
        cluster.start(timeout=120)
    assert leftovers(FAIL_PREFIX) == []
    assert naming(cluster.bridge_address) == []


def test_the_script_starts_reports_and_removes_a_cluster(tmp_path):
    state = str(tmp_path / "state")
    script = ["bash", "scripts/netns-cluster.sh"]
    options = ["--prefix", CLI_PREFIX, "--state-dir", state]
    up = subprocess.run(
        [*script, "up", "2", "--subnet", "10.75.0.0/24", *options],
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert up.returncode == 0, up.stderr[-2000:]
        assert f"{CLI_PREFIX}-node2" in up.stdout and "spark://10.75.0.1:" in up.stdout
        status = subprocess.run(
            [*script, "status", *options], capture_output=True, text=True, timeout=60
        )
        assert status.stdout.count("worker alive") == 2
        pids = json.loads((tmp_path / "state" / "state.json").read_text())["pids"].values()
        pids = [*pids, *(int(p) for n in (1, 2) for p in namespace_pids(f"{CLI_PREFIX}-node{n}"))]
    finally:
        down = subprocess.run(
            [*script, "down", *options], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert leftovers(CLI_PREFIX) == []
    assert pids and not any(running(pid) for pid in pids)
    again = subprocess.run(
        [*script, "down", "--prefix", CLI_PREFIX, "--state-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "removed 0" in again.stdout
