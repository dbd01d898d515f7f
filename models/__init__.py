"""The Spike-Driven Transformer, state-dict compatible with the original BICLab checkpoints."""
from .config import ConfigError, SDTConfig
from .neurons import LIF, PLIF, cupy_available, is_neuron
from .sdt import InputQuantizer, SpikeDrivenTransformer, build_model, parameter_count, spike_names

__all__ = [
    "ConfigError",
    "InputQuantizer",
    "LIF",
    "PLIF",
    "SDTConfig",
    "SpikeDrivenTransformer",
    "build_model",
    "cupy_available",
    "is_neuron",
    "parameter_count",
    "spike_names",
]
