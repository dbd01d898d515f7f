"""`nir.write` with the graph's nodes serialised one at a time: the one place that relies on how nir
itself writes a file.

nir 1.0.8's `nir.write(path, graph)` calls `graph.to_dict()` and stores `d["nodes"]` by iterating its
`.items()` (`nir.ir.serialization`/`write_recursive`). Its graph-level `to_dict` deep-copies every weight
twice (`dataclasses.asdict` of the whole graph, then of each node again): 2 GB at once for SDT-8-768.
Handing it a dictionary whose `.items()` makes each node's `to_dict()` while nir stores it, and a
placeholder weight replaced by the real one (`makers`) only for that moment, writes the same file with
one node's arrays in memory at a time.

That is an assumption about nir's internals, so it is guarded: the streaming path runs only on the nir
version it was checked against (`VERIFIED_NIR`); any other version gets the plain `nir.write` of the
graph with every weight in it (the same bytes, more memory). `tests/test_nir.py` checks that both paths
write identical bytes and fails when the installed nir is not the verified one.
"""
from __future__ import annotations

from importlib.metadata import version

import nir

VERIFIED_NIR = "1.0.8"


def streaming_supported() -> bool:
    return version("nir") == VERIFIED_NIR


def write_streaming(path: str, graph: nir.NIRGraph, makers: dict, **h5_options) -> None:
    """`nir.write(path, graph)` where `makers[name]()` gives the real weight of node `name`, whose weight
    in `graph` is a placeholder of its shape."""
    if streaming_supported():
        nir.write(path, _Serialised(graph, makers), **h5_options)
        return
    for name, make in makers.items():
        graph.nodes[name].weight = make()
    nir.write(path, graph, **h5_options)


class _NodesOneByOne(dict):
    """`NIRGraph.to_dict()["nodes"]` made lazily: each node's own `to_dict()` (a deep copy of its arrays)
    while nir.write stores it, then dropped. nir's graph-level `to_dict` copies every weight twice
    (`dataclasses.asdict` of the whole graph, then of each node again): 2 GB at once for SDT-8-768.
    A node with a placeholder weight is given its real weight for its `to_dict()` alone."""

    def __init__(self, nodes: dict, makers: dict):
        super().__init__()
        self._nodes, self._makers = nodes, makers

    def items(self):
        for name, node in self._nodes.items():
            make = self._makers.get(name)
            if make is None:
                yield name, node.to_dict()
                continue
            placeholder, node.weight = node.weight, make()
            try:
                d = node.to_dict()
            finally:
                node.weight = placeholder
            yield name, d


class _Serialised:
    """What nir.write reads of a graph (`to_dict()`), the same dictionary nir builds, with the nodes
    serialised one at a time (see `_NodesOneByOne`): nir's own writer, the same file."""

    def __init__(self, graph: nir.NIRGraph, makers: dict):
        self.graph, self.makers = graph, makers

    def to_dict(self) -> dict:
        nodes = self.graph.nodes
        self.graph.nodes = {}            # the graph-level fields without a copy of every node
        try:
            d = self.graph.to_dict()
        finally:
            self.graph.nodes = nodes
        d["nodes"] = _NodesOneByOne(nodes, self.makers)
        return d
