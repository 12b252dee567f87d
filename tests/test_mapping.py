"""PMI_process_mapping must say truthfully which ranks share a host."""

from __future__ import annotations

import itertools

import pytest

from sparkmpi.pmi import nodes_from_mapping, process_mapping


@pytest.mark.parametrize(
    ("hosts", "mapping"),
    [
        (["a"], "(vector,(0,1,1))"),
        (["a", "a", "a", "a"], "(vector,(0,1,4))"),
        (["a", "a", "b", "b"], "(vector,(0,2,2))"),
        (["a", "b", "c"], "(vector,(0,3,1))"),
        (["a", "a", "b"], "(vector,(0,1,2),(1,1,1))"),
    ],
)
def test_known_layouts(hosts, mapping):
    assert process_mapping(hosts) == mapping


def test_every_small_layout_reads_back_exactly():
    for size in range(1, 6):
        for layout in itertools.product("abc", repeat=size):
            nodes = nodes_from_mapping(process_mapping(layout), size)
            first_seen = {h: i for i, h in reversed(list(enumerate(dict.fromkeys(layout))))}
            assert nodes == [first_seen[h] for h in layout], layout


def test_empty_is_an_error():
    with pytest.raises(ValueError):
        process_mapping([])
