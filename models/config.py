"""The architecture hyper-parameters of a Spike-Driven Transformer, as one small value type.

Field names follow the original `train.py` arguments where they exist (`dim`, `layer` is called
`depth` here, `time_steps`, `pooling_stat`, ...); `sdt_deploy.configs` maps conf YAML keys onto them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

SPIKE_MODES = ("lif", "plif")


class ConfigError(ValueError):
    """A configuration the original SDT code could not build or run."""


@dataclass(frozen=True)
class SDTConfig:
    img_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    dim: int = 512
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4
    time_steps: int = 4
    pooling_stat: str = "1111"
    spike_mode: str = "lif"
    dvs_mode: bool = False
    tet: bool = False

    def __post_init__(self) -> None:
        problems = list(validation_problems(self))
        if problems:
            raise ConfigError(problems[0])

    @property
    def hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def token_size(self) -> int:
        """Side of the token grid after the stem's pools."""
        return self.img_size // 2 ** self.pooling_stat.count("1")

    @property
    def stem_dims(self) -> tuple[int, int, int, int]:
        return (self.dim // 8, self.dim // 4, self.dim // 2, self.dim)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "SDTConfig":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def validation_problems(cfg: SDTConfig):
    """Yield one sentence per reason the original code could not build or run `cfg`."""
    for name in ("img_size", "in_channels", "num_classes", "dim", "depth", "num_heads", "time_steps"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            yield f"{name} must be a positive integer, got {value!r}"
            return
    if not isinstance(cfg.pooling_stat, str) or len(cfg.pooling_stat) != 4 or set(cfg.pooling_stat) - {"0", "1"}:
        yield f"pooling_stat must be four characters of 0/1 (e.g. '1111'), got {cfg.pooling_stat!r}"
        return
    if cfg.spike_mode not in SPIKE_MODES:
        yield f"spike_mode must be one of {', '.join(SPIKE_MODES)}, got {cfg.spike_mode!r}"
    if cfg.dim % 8:
        yield f"dim must be a multiple of 8 (the stem widths are dim/8, dim/4, dim/2), got {cfg.dim}"
    if cfg.dim % cfg.num_heads:
        yield f"dim {cfg.dim} must be divisible by num_heads {cfg.num_heads}"
    if not (isinstance(cfg.mlp_ratio, (int, float)) and cfg.mlp_ratio > 0 and int(cfg.dim * cfg.mlp_ratio) >= 1):
        yield f"mlp_ratio must be positive, got {cfg.mlp_ratio!r}"
    pools = cfg.pooling_stat.count("1")
    if cfg.img_size % (2 ** pools):
        # The original reshapes with H // 2**k after each pool; a pooled odd size breaks that reshape.
        yield (f"img_size {cfg.img_size} must be divisible by 2**{pools} for pooling_stat "
               f"{cfg.pooling_stat!r} (the original SDT cannot run it otherwise)")
