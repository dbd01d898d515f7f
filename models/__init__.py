"""The Spike-Driven Transformer (V1) and Meta-SpikeFormer (V2), state-dict compatible with the original
BICLab checkpoints."""
from .config import ConfigError, SDTConfig
from .config_v2 import (
    V2_FACTORIES,
    V2_NAMED_CONFIGS,
    V2Config,
    infer_v2_from_state_dict,
    is_v2_state_dict,
    named_v2_config,
    v2_config_for_checkpoint,
    v2_config_from_args,
    v2_parameter_count,
)
from .neurons import LIF, PLIF, cupy_available, is_neuron
from .sdt import (
    InputQuantizer,
    SpikeDrivenTransformer,
    build_model,
    parameter_count,
    spike_names,
)
from .sdt_v2 import MetaSpikeFormer, build_v2_model, v2_lif_names, v2_spike_names

__all__ = [
    "LIF",
    "PLIF",
    "V2_FACTORIES",
    "V2_NAMED_CONFIGS",
    "ConfigError",
    "InputQuantizer",
    "MetaSpikeFormer",
    "SDTConfig",
    "SpikeDrivenTransformer",
    "V2Config",
    "build_model",
    "build_v2_model",
    "cupy_available",
    "infer_v2_from_state_dict",
    "is_neuron",
    "is_v2_state_dict",
    "named_v2_config",
    "parameter_count",
    "spike_names",
    "v2_config_for_checkpoint",
    "v2_config_from_args",
    "v2_lif_names",
    "v2_parameter_count",
    "v2_spike_names",
]
