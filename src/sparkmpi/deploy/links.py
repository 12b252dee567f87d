"""The tools under a namespace cluster: whether they work here, ``ip`` and ``tc`` on one end
of a node's link (rate, delay, silently dropped ports), link states, and what a cluster left
behind by name.

Only the htb and pfifo qdiscs and the u32 classifier are used for rate limits and drops: they
need no tc action modules, which some kernels (this project's CI machine among them) lack. The
netem qdisc, for delays, is used only when asked for, and its absence is one clear error.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

UNSHAPED_RATE = "100gbit"
"""The htb rate of an unshaped link: far above what veths carry on a small machine."""


class NetnsError(RuntimeError):
    """A namespace cluster cannot be built or used as asked; the message says why."""


def run_tool(command: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``command``; :class:`NetnsError` with its stderr if it fails and ``check``."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_tool(["ip", *args], check)


def netns_unavailable() -> str | None:
    """None if this process can build namespace clusters; else one line saying why."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not found (scripts/setup.sh installs iproute2 and util-linux)"
    probe = f"sparkmpi-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    try:
        uts = run_tool(["ip", "netns", "exec", probe, "unshare", "--uts", "true"], check=False)
    finally:
        ip("netns", "del", probe, check=False)
    if uts.returncode != 0:
        return f"cannot give a namespace its own host name: {uts.stderr.strip()}"
    return None


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (link delay); tried on a throwaway veth."""
    probe = f"smpq{os.getpid() % 100000}"
    if ip(
        "link", "add", probe, "type", "veth", "peer", "name", f"{probe}b", check=False
    ).returncode:
        return False
    try:
        netem = ["tc", "qdisc", "add", "dev", probe, "root", "netem", "delay", "1ms"]
        return run_tool(netem, check=False).returncode == 0
    finally:
        ip("link", "del", probe, check=False)


def rate_bits(rate: str) -> float:
    """Bits per second of a rate in tc syntax (``10gbit``, ``500mbit``); NetnsError if not one."""
    match = re.match(r"^(\d+(?:\.\d+)?)([kmg]?)bit$", rate, re.IGNORECASE)
    if not match:
        raise NetnsError(f"rate {rate!r}: expected e.g. 10gbit, 500mbit")
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
    return float(match.group(1)) * units[match.group(2).lower()]


def burst_bytes(rate: str) -> str:
    """One millisecond of ``rate`` (tc syntax) in bytes, at least 64 KiB (a GSO segment)."""
    return str(max(65536, int(rate_bits(rate) / 8 / 1000)))


@dataclass(frozen=True)
class LinkEnd:
    """One end of a link: the device, and the namespace it is in (None: the root one)."""

    dev: str
    namespace: str | None = None

    @property
    def tc(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, "tc"] if self.namespace else ["tc"]


def shape_end(end: LinkEnd, rate: str | None, delay: str | None) -> None:
    """An htb root on ``end``: class 1:10 takes all traffic at ``rate`` (unlimited: None) with
    netem ``delay`` below it, class 1:99 drops what :func:`block` sends to it."""
    tc, dev = end.tc, end.dev
    run_tool([*tc, "qdisc", "del", "dev", dev, "root"], check=False)
    run_tool([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
    rate = rate or UNSHAPED_RATE
    burst = burst_bytes(rate)
    shaped = ["rate", rate, "ceil", rate, "burst", burst, "cburst", burst, "quantum", "60000"]
    run_tool([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", *shaped])
    if delay:
        run_tool([*tc, "qdisc", "add", "dev", dev, "parent", "1:10", "netem", "delay", delay])
    starved = ["rate", "8bit", "ceil", "8bit", "quantum", "1500"]
    run_tool([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:99", "htb", *starved])
    run_tool([*tc, "qdisc", "add", "dev", dev, "parent", "1:99", "pfifo", "limit", "0"])


def block(end: LinkEnd, address: str, port: int) -> None:
    """Silently drops TCP packets leaving through ``end`` for ``address:port``."""
    tc, dev = end.tc, end.dev
    if "htb 1:" not in run_tool([*tc, "qdisc", "show", "dev", dev]).stdout:
        shape_end(end, None, None)
    match = ["match", "ip", "dst", f"{address}/32", "match", "ip", "dport", str(port), "0xffff"]
    where = ["parent", "1:", "protocol", "ip", "prio", "1"]
    run_tool([*tc, "filter", "add", "dev", dev, *where, "u32", *match, "flowid", "1:99"])


def unblock(end: LinkEnd) -> None:
    """Lifts every :func:`block` on ``end``."""
    run_tool([*end.tc, "filter", "del", "dev", end.dev, "parent", "1:", "prio", "1"], check=False)


def link_state(dev: str, namespace: str | None = None) -> str:
    """The operational state of ``dev`` (UP, DOWN, LOWERLAYERDOWN, ...)."""
    where = ["-n", namespace] if namespace else []
    words = ip(*where, "-br", "link", "show", "dev", dev).stdout.split()
    return words[1] if len(words) > 1 else "UNKNOWN"


def links_named(prefix: str) -> list[str]:
    """The links of the root namespace whose names start with ``prefix-``."""
    names = []
    for line in ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if name.startswith(f"{prefix}-"):
            names.append(name)
    return names


def namespace_pids(namespace: str) -> list[int]:
    """PIDs of the processes in network namespace ``namespace`` (none if it does not exist)."""
    return [int(p) for p in ip("netns", "pids", namespace, check=False).stdout.split()]


def kill_inside(namespace: str) -> None:
    """SIGKILLs every process in ``namespace`` (all of them ours: we made it) until none is left."""
    for _ in range(50):
        pids = namespace_pids(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
