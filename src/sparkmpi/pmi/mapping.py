"""``PMI_process_mapping``: which ranks share a node, in MPICH's vector notation."""

from __future__ import annotations

import re
from collections.abc import Sequence


def process_mapping(hosts: Sequence[str]) -> str:
    """``(vector,(node,nodes,ranks_per_node),...)``: tells MPI which ranks share a host.

    ``hosts[r]`` is the host rank ``r`` runs on. Node ids follow the order in which hosts first
    appear. The vector covers every rank exactly once, so it is exact whatever the layout:
    ranks on one host are told they share a node (and use shared memory), others are not.
    """
    if not hosts:
        raise ValueError("process_mapping needs at least one rank")
    node_of: dict[str, int] = {}
    runs: list[list[int]] = []  # [node, ranks in this run]
    for host in hosts:
        node = node_of.setdefault(host, len(node_of))
        if runs and runs[-1][0] == node:
            runs[-1][1] += 1
        else:
            runs.append([node, 1])
    blocks: list[list[int]] = []  # [first node, node count, ranks per node]
    for node, count in runs:
        last = blocks[-1] if blocks else None
        if last and last[2] == count and last[0] + last[1] == node:
            last[1] += 1
        else:
            blocks.append([node, 1, count])
    return "(vector," + ",".join(f"({a},{b},{c})" for a, b, c in blocks) + ")"


_BLOCK = re.compile(r"\((\d+),(\d+),(\d+)\)")


def nodes_from_mapping(mapping: str, size: int) -> list[int]:
    """The node id of each of ``size`` ranks described by ``mapping`` (MPICH's reading of it)."""
    if not mapping.startswith("(vector,") or not mapping.endswith(")"):
        raise ValueError(f"not a vector process mapping: {mapping!r}")
    blocks = [tuple(map(int, m)) for m in _BLOCK.findall(mapping)]
    if not blocks:
        raise ValueError(f"empty process mapping: {mapping!r}")
    nodes: list[int] = []
    while len(nodes) < size:
        for first, count, per_node in blocks:
            for node in range(first, first + count):
                nodes.extend([node] * per_node)
    return nodes[:size]
