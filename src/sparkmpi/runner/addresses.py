"""Which address of the driver its executors reach: where the PMI and control listeners bind,
and what they tell the Spark tasks to connect to.

The rule, first match wins:

1. an explicit address: ``pmi_host=`` / ``--pmi-host``, else the Spark conf
   ``spark.sparkmpi.pmi.host``, else the environment variable ``SPARKMPI_PMI_HOST``;
2. a ``local`` master: loopback (``127.0.0.1``), nothing is exposed to a network;
3. ``spark.driver.host``: the address Spark itself tells its executors to reach the driver at,
   which they must reach for Spark to work at all. The listeners bind
   ``spark.driver.bindAddress`` when it is set (containers, NAT: as Spark does), else that address
   itself, never every interface;
4. when that is a loopback address (a host name that resolves to ``127.0.x.x``) but the master is
   on another host, the driver's source address on its route to the master's host.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

_MASTER_HOST = re.compile(r"^spark://\[?([^\],:/]+)\]?(?::\d+)?")


@dataclass(frozen=True)
class ListenAddress:
    """Where to bind, what to advertise, and which rule chose them (for ``spark-mpi info``)."""

    bind: str
    advertise: str
    rule: str


def resolve(host: str) -> str:
    """``host``'s IPv4 address; ValueError naming it when it does not resolve."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise ValueError(f"the driver address {host!r} does not resolve") from None


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def master_host(master: str) -> str | None:
    """The host of a ``spark://host:port`` master URL (the first one of a list); None else."""
    match = _MASTER_HOST.match(master.strip())
    return match.group(1) if match else None


def route_source(host: str) -> str | None:
    """The address this machine sends from when it talks to ``host`` (no packet is sent)."""
    try:
        target = resolve(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            return probe.getsockname()[0]
    except (OSError, ValueError):
        return None


def driver_host_for(master: str | None) -> str | None:
    """For a ``spark://`` master, the driver address its workers' executors can reach (the source
    address on the route to the master); None for other masters."""
    host = master_host(master or "")
    return route_source(host) if host else None


def listen_address(
    master: str, conf_get: Callable[[str], str | None], explicit: str | None = None
) -> ListenAddress:
    """Applies the module's rule to a driver of ``master`` whose Spark conf reads ``conf_get``."""
    if explicit:
        return ListenAddress(resolve(explicit), explicit, "explicit (pmi_host / spark.sparkmpi)")
    if master.startswith("local"):
        return ListenAddress("127.0.0.1", "127.0.0.1", "local master: loopback")
    driver_host = conf_get("spark.driver.host") or socket.gethostname()
    advertise = driver_host
    bind = conf_get("spark.driver.bindAddress") or resolve(driver_host)
    rule = "spark.driver.host"
    if is_loopback(resolve(driver_host)):
        host = master_host(master)
        source = route_source(host) if host else None
        if source and not is_loopback(source):
            advertise = bind = source
            rule = f"route to the master {host} (spark.driver.host is loopback)"
    return ListenAddress(bind, advertise, rule)
