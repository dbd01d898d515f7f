"""Cutting a deploy graph in two where an exact spiking encoding ends.

The stem's max-pool over currents (`patch_embed.maxpool3`, present in every published config) has no
exact NIR encoding. `split_at_current_maxpool` cuts the graph right after it: the *host* part computes
the stem up to and including that pool (exported to ONNX), the *device* part starts with an Input node
carrying the pool's output `x_feat` (a current on the pool's grid, passed as its exact float value) and
holds everything from the residual stream on (exported to NIR). The cut's value range, which the
device part's integer widths are planned from, is the caller's to add (`exporters.bundle.partition`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import Graph, Input, MaxPool


@dataclass
class Partition:
    host: Graph            # input -> ... -> the current max-pool (its output is the graph's output)
    device: Graph          # Input(<cut>) -> ... -> readout
    cut: str               # name of the node whose output crosses from host to device


def split_at_current_maxpool(g: Graph) -> Optional[Partition]:
    """None when the graph has no max-pool over currents (then it needs no partition)."""
    pools = [n.name for n in g.of_type(MaxPool)]
    if not pools:
        return None
    if len(pools) > 1:
        raise DeployError(f"cannot partition: several max-pools over currents ({', '.join(pools)})")
    cut = pools[0]
    names = [n.name for n in g.nodes]
    i = names.index(cut)
    host_nodes = g.nodes[: i + 1]
    host_names = set(names[: i + 1])
    device_nodes = []
    pool = g[cut]
    device_nodes.append(Input(cut, (), tuple(pool.shape), grid=pool.grid, bits=None))
    for n in g.nodes[i + 1:]:
        for src in n.inputs:
            if src in host_names and src != cut:
                raise DeployError(f"cannot partition at {cut}: {n.name} also reads {src} from the stem")
        device_nodes.append(n)
    host_meta = {**g.meta, "partition": "host", "cut": cut}
    device_meta = {**g.meta, "partition": "device", "cut": cut}
    return Partition(Graph(list(host_nodes), host_meta), Graph(device_nodes, device_meta), cut)


@dataclass
class NirPrefix:
    """A graph cut in two for NIR the other way round (SDT V2): the prefix NIR computes exactly, the rest on
    the host. `nir`: Input -> ... -> the cut (its output is the cut's current); `host`: Input(<cut>) -> ...
    -> readout."""

    nir: Graph
    host: Graph
    cut: str
    first_host_node: str   # the first node NIR cannot compute (what forces the cut)


def split_before(g: Graph, cannot: tuple) -> Optional[NirPrefix]:
    """Cut a graph before its first node of a type in `cannot` (V2: the attention's products of two dynamic
    tensors), at the last node before it that is the only value the rest reads from the prefix (the
    residual stream entering the first transformer block). None when no node is of those types."""
    names = [n.name for n in g.nodes]
    index = {name: i for i, name in enumerate(names)}
    first = next((i for i, n in enumerate(g.nodes) if isinstance(n, cannot)), None)
    if first is None:
        return None
    # earliest[i]: the earliest node read by any node at position >= i
    earliest = [len(names)] * (len(names) + 1)
    for i in range(len(names) - 1, -1, -1):
        reads = [index[s] for s in g.nodes[i].inputs]
        earliest[i] = min([earliest[i + 1]] + reads)
    cut_at = next((c for c in range(first - 1, 0, -1) if earliest[c + 1] >= c), None)
    if cut_at is None or isinstance(g.nodes[cut_at], Input):
        raise DeployError(f"cannot partition before {names[first]}: no single value separates it from the input")
    cut = g.nodes[cut_at]
    prefix_meta = {**g.meta, "partition": "device", "cut": cut.name}
    host_meta = {**g.meta, "partition": "host", "cut": cut.name}
    host_nodes = [Input(cut.name, (), tuple(cut.shape), grid=cut.grid, bits=None)] + list(g.nodes[cut_at + 1:])
    return NirPrefix(Graph(list(g.nodes[:cut_at + 1]), prefix_meta), Graph(host_nodes, host_meta), cut.name,
                     names[first])
