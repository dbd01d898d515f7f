"""`export --target nir --no-quantize`: the BN-folded float weights as a NIR graph.

Not spike-exact against anything by construction (the weights are the float64 folding of float32
parameters, NIR consumers step it in their own precision) — it is for users who quantize elsewhere.
What it keeps exact is the one systematic tie: `talking_heads_lif` integrates integer token counts
against 0.5, so its threshold is lowered below 0.5 by less than the finest reachable step
(2**-(1 + T + 1)), as in the quantized export. Every other LIF reads a real-valued current, where an
exact tie has probability zero; its threshold is lowered by 2**-(40 + T + 1) only, so that NIR's `>`
still behaves as spikingjelly's `>=` on equality. A PLIF keeps its trained tau.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from sdt_deploy.errors import DeployError
from sdt_deploy.ir.graph import LIF, SPIKE, Graph, TokenSum
from sdt_deploy.quant.contract import rewrite_head_mean, threshold_grid

REAL_VALUED_GRID = 40


def float_nir_graph(folded: Graph) -> Graph:
    if not folded.meta.get("folded") or folded.meta.get("quantized"):
        raise DeployError("float NIR export needs the BN-folded float graph")
    g = rewrite_head_mean(folded) if folded.meta.get("head_pool", "mean") == "mean" else folded
    nodes = []
    for n in g.nodes:
        if isinstance(n, LIF):
            src = g[n.inputs[0]]
            counts = isinstance(src, TokenSum) and g[src.inputs[0]].out_kind == SPIKE
            base = 0 if counts else REAL_VALUED_GRID
            grid = threshold_grid(float(n.v_threshold), base)
            c = n.shape[0]
            n = replace(n, grid=np.full(c, grid, dtype=np.int64),
                        theta_int=np.full(c, int(n.v_threshold * 2.0 ** grid), dtype=np.int64))
        nodes.append(n)
    return g.replace_nodes(nodes, float_export=True, quantized=False)
