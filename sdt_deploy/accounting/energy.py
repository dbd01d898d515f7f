"""Energy per operation, in picojoules: the tables the operation report prices its counts with.

The figures are Horowitz's 45 nm, 0.9 V numbers (ISSCC 2014, "Computing's energy problem"), the
source of the SDT paper's E_MAC = 4.6 pJ and E_AC = 0.9 pJ:

    8-bit add 0.03    32-bit add 0.1    8-bit multiply 0.2    32-bit multiply 3.1
    fp32 add 0.9      fp32 multiply 3.7

Every table prices the same operation vocabulary (`OPERATIONS`); each entry says how it was derived.
A user table (`--energy FILE`, JSON or YAML) names a built-in `base` and overrides any entries:

    {"name": "my-chip", "base": "45nm-int8", "pj": {"ac": 0.05, "neuron_update": 0.3}}

(a flat mapping of operation to pJ is accepted too). Memory access and data movement are not priced
by any table: the paper's convention ignores them, and so does this report (it says so).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

from sdt_deploy.errors import DeployError

# Horowitz 2014, 45 nm: energy per operation in pJ.
HOROWITZ_45NM_PJ = {
    "int8_add": 0.03,
    "int32_add": 0.1,
    "int8_mult": 0.2,
    "int32_mult": 3.1,
    "fp32_add": 0.9,
    "fp32_mult": 3.7,
}

# The operation vocabulary every table prices.
OPERATIONS = {
    "mac": "multiply-accumulate of a real (multi-bit) value with a weight (the encoder; every ANN MAC)",
    "ac": "accumulate: add one weight (or a spike's 1) into an accumulator (a synaptic event, a spike count)",
    "add": "add two currents (residual stream, bias, token sum of currents)",
    "mult": "multiply two values (the ANN's attention scale)",
    "compare": "compare two currents (max-pool; an ANN's ReLU)",
    "bitop": "one 1-bit logic operation on spikes (AND mask, OR-pool)",
    "neuron_update": "one LIF update of one neuron at one step",
    "exp": "one exponential (the ANN's softmax)",
}


@dataclass(frozen=True)
class EnergyTable:
    """Picojoules per operation, with the derivation of every entry."""

    name: str
    pj: Mapping[str, float]
    derivation: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        missing = [op for op in OPERATIONS if op not in self.pj]
        if missing:
            raise DeployError(f"energy table {self.name!r}: no price for {', '.join(missing)}")

    def price(self, op: str) -> float:
        return float(self.pj[op])

    def to_dict(self) -> dict:
        return {"name": self.name, "unit": "pJ per operation",
                "pj": {op: float(self.pj[op]) for op in OPERATIONS},
                "derivation": {op: self.derivation.get(op, "") for op in OPERATIONS}}


def _fp32_table() -> EnergyTable:
    """The paper's world: every current and accumulator in fp32."""
    h = HOROWITZ_45NM_PJ
    bit = h["int8_add"] / 8
    return EnergyTable("45nm-fp32", {
        "mac": h["fp32_mult"] + h["fp32_add"],
        "ac": h["fp32_add"],
        "add": h["fp32_add"],
        "mult": h["fp32_mult"],
        "compare": h["fp32_add"],
        "bitop": bit,
        "neuron_update": 2 * h["fp32_add"],
        "exp": h["fp32_mult"] + h["fp32_add"],
    }, {
        "mac": "fp32 multiply 3.7 + fp32 add 0.9 = 4.6 (the paper's E_MAC)",
        "ac": "fp32 add 0.9 (the paper's E_AC)",
        "add": "fp32 add 0.9",
        "mult": "fp32 multiply 3.7",
        "compare": "a comparison is a subtraction: fp32 add 0.9",
        "bitop": "not in Horowitz's table: one bit-slice of an 8-bit add, 0.03 / 8 = 0.00375 "
                 "(an upper bound for a single 2-input gate)",
        "neuron_update": "integrate (one add) + threshold (one compare) = 2 x fp32 add; the decay by 1/2 "
                         "(an exponent decrement) and the reset (a select) taken as free",
        "exp": "one fp32 multiply-add, 4.6 (a lower bound: any polynomial or table exp costs more)",
    })


def _int8_table() -> EnergyTable:
    """Integer hardware as the quantized graph runs: int8 weights, int32 accumulators and currents."""
    h = HOROWITZ_45NM_PJ
    bit = h["int8_add"] / 8
    return EnergyTable("45nm-int8", {
        "mac": h["int8_mult"] + h["int32_add"],
        "ac": h["int32_add"],
        "add": h["int32_add"],
        "mult": h["int32_mult"],
        "compare": h["int32_add"],
        "bitop": bit,
        "neuron_update": 2 * h["int32_add"],
        "exp": h["int32_mult"] + h["int32_add"],
    }, {
        "mac": "8-bit multiply 0.2 + 32-bit add 0.1 = 0.3 (int8 x int8 product into an int32 accumulator)",
        "ac": "32-bit add 0.1 (an int8 weight added into an int32 accumulator)",
        "add": "32-bit add 0.1 (currents are int32)",
        "mult": "32-bit multiply 3.1",
        "compare": "a comparison is a subtraction: 32-bit add 0.1",
        "bitop": "not in Horowitz's table: one bit-slice of an 8-bit add, 0.03 / 8 = 0.00375 "
                 "(an upper bound for a single 2-input gate)",
        "neuron_update": "H = (V + X) >> 1 (one 32-bit add; the shift is wiring) + threshold compare "
                         "(one 32-bit add) = 0.2; the reset (a select) taken as free",
        "exp": "one 32-bit multiply + 32-bit add, 3.2 (a lower bound for an integer exp approximation)",
    })


BUILTIN_TABLES = {"45nm-fp32": _fp32_table, "45nm-int8": _int8_table}
DEFAULT_TABLE = "45nm-fp32"


def builtin_table(name: str) -> EnergyTable:
    try:
        return BUILTIN_TABLES[name]()
    except KeyError:
        raise DeployError(f"energy table {name!r}: not a built-in table ({', '.join(BUILTIN_TABLES)}) "
                          "and no such file") from None


def table_from_mapping(doc: Mapping, name: str) -> EnergyTable:
    """A user table: `{"name"?, "base"?, "pj": {op: pJ}}` or a flat `{op: pJ}`, over a built-in base."""
    if not isinstance(doc, Mapping):
        raise DeployError(f"energy table {name!r}: expected a mapping of operation to pJ")
    doc = dict(doc)
    base_name = doc.pop("base", DEFAULT_TABLE)
    label = doc.pop("name", name)
    prices = doc.pop("pj", None)
    if prices is None:
        prices, doc = doc, {}
    if doc:
        raise DeployError(f"energy table {name!r}: unknown keys {', '.join(map(str, doc))} "
                          "(expected name, base, pj)")
    if not isinstance(prices, Mapping):
        raise DeployError(f"energy table {name!r}: `pj` must map operations to pJ")
    base = builtin_table(str(base_name))
    unknown = [k for k in prices if k not in OPERATIONS]
    if unknown:
        raise DeployError(f"energy table {name!r}: unknown operations {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(OPERATIONS)})")
    pj = dict(base.pj)
    derivation = dict(base.derivation)
    for op, value in prices.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise DeployError(f"energy table {name!r}: {op} must be a non-negative number of pJ, got {value!r}")
        pj[op] = float(value)
        derivation[op] = f"from {name}"
    for op in OPERATIONS:
        if op not in prices:
            derivation[op] = f"from {base.name}: {base.derivation.get(op, '')}"
    return EnergyTable(str(label), pj, derivation)


def load_energy_table(spec: str) -> EnergyTable:
    """A built-in table by name (`45nm-fp32`, `45nm-int8`) or a JSON/YAML file."""
    if spec in BUILTIN_TABLES:
        return builtin_table(spec)
    if not os.path.exists(spec):
        return builtin_table(spec)   # raises, naming the built-in tables
    import yaml

    try:
        with open(spec, "r", encoding="utf-8") as f:
            text = f.read()
        doc = yaml.safe_load(text) if spec.endswith((".yaml", ".yml")) else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DeployError(f"energy table {spec!r}: not a readable JSON/YAML file ({first})") from None
    return table_from_mapping(doc, os.path.basename(spec))
