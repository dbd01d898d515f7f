"""Comparing two sets of spike tensors: exact equality, first divergence, agreement rates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Divergence:
    layer: str
    step: int
    sample: int
    index: tuple          # neuron index within the per-sample, per-step tensor
    reference: int
    candidate: int


def first_divergence(reference: dict, candidate: dict, order: list) -> Optional[Divergence]:
    """The earliest differing spike: by time step first, then by the graph's layer order (a wrong
    spike propagates forward in time and downstream, so this is where it started)."""
    best = None
    for rank, name in enumerate(order):
        if name not in reference or name not in candidate:
            continue
        diff = reference[name] != candidate[name]
        if not diff.any():
            continue
        t = int(np.argmax(diff.reshape(diff.shape[0], -1).any(axis=1)))
        key = (t, rank)
        if best is None or key < best[0]:
            at = np.argwhere(diff[t])[0]
            best = (key, Divergence(name, t, int(at[0]), tuple(int(i) for i in at[1:]),
                                    int(reference[name][(t, *at)]), int(candidate[name][(t, *at)])))
    return None if best is None else best[1]


def mismatch_table(reference: dict, candidate: dict) -> dict:
    """Per layer: number of differing spikes and of spikes on each side."""
    out = {}
    for name, ref in reference.items():
        if name not in candidate:
            continue
        cand = candidate[name]
        out[name] = {"mismatches": int(np.count_nonzero(ref != cand)), "reference_spikes": int(ref.sum(dtype=np.int64)),
                     "candidate_spikes": int(cand.sum(dtype=np.int64)), "size": int(ref.size)}
    return out


def agreement(reference: dict, candidate: dict) -> dict:
    """Fraction of equal spikes per layer (for the comparisons that are not exact by nature)."""
    return {k: float(np.mean(reference[k] == candidate[k])) for k in reference if k in candidate}
