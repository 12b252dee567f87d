"""A namespace cluster's settings are checked before anything is built (no root needed)."""

from __future__ import annotations

import pytest

from sparkmpi.bench.allreduce_nodes import slower_rate
from sparkmpi.deploy.links import NetnsError, burst_bytes
from sparkmpi.deploy.netns import NetnsCluster


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefix": "Bad-Prefix"}, "prefix 'Bad-Prefix'"),
        ({"subnet": "10.0.0.0/33"}, "is not a network"),
        ({"subnet": "10.0.0.0/29"}, "too small"),
        ({"nodes": 2, "cores": [1]}, "need as many positive core counts"),
        ({"rate": "fast"}, "expected e.g. 10gbit"),
    ],
)
def test_bad_settings_are_one_clear_error(tmp_path, kwargs, message):
    with pytest.raises(NetnsError, match=message):
        NetnsCluster(tmp_path, **kwargs)


def test_a_cluster_names_its_nodes_links_and_addresses(tmp_path):
    cluster = NetnsCluster(tmp_path, nodes=3, cores=[2, 1, 1], prefix="ab", subnet="10.9.0.0/24")
    assert cluster.bridge == "ab-br" and cluster.bridge_address == "10.9.0.1"
    assert [(n.name, n.address, n.veth, n.cores) for n in cluster.nodes] == [
        ("ab-node1", "10.9.0.11", "ab-v1", 2),
        ("ab-node2", "10.9.0.12", "ab-v2", 1),
        ("ab-node3", "10.9.0.13", "ab-v3", 1),
    ]
    assert cluster.node_of("10.9.0.12").name == cluster.node_of("ab-node2").name == "ab-node2"
    with pytest.raises(NetnsError, match="no node"):
        cluster.node_of("elsewhere")
    assert cluster.mpiexec_args(["ab-node1:2", "10.9.0.13"])[:2] == [
        "-hosts",
        "10.9.0.11:2,10.9.0.13",
    ]


def test_rates():
    assert burst_bytes("10gbit") == "1250000" and burst_bytes("1mbit") == "65536"
    assert slower_rate("10gbit") == "1000mbit" and slower_rate("1gbit") == "100mbit"
