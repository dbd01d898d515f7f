"""The inputs a command runs on, chosen one way for every command: an array file, a dataset folder, the
held-out scikit-learn digits, or random inputs. Each is a dataset with `len()` and
`batch(indices) -> (x, labels or None)`, read lazily a batch at a time, and a description of itself
(`source`) for the reports."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from models import SDTConfig, V2Config
from sdt_deploy.data.datasets import ArrayDataset, open_dataset
from sdt_deploy.errors import DeployError
from sdt_deploy.files.arrays import check_input, load_array
from sdt_deploy.files.configs import DataConfig


@dataclass
class Inputs:
    dataset: object                 # ArrayDataset or FileDataset
    source: dict                    # what the inputs are, for reports: {"source": "digits", ...}

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int, indices: Optional[list] = None) -> Iterator[tuple]:
        """(x float32, labels or None, first index) per batch, in order."""
        idx = list(range(len(self.dataset))) if indices is None else list(indices)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            x, labels = self.dataset.batch(chunk)
            yield np.asarray(x, dtype=np.float32), labels, chunk[0] if chunk else 0


def digits_inputs(n: int, cfg: SDTConfig, data: DataConfig) -> ArrayDataset:
    """The first n digits of the demo's fixed held-out split, at the model's size and channels,
    normalised with the model's mean/std; for an event model, Poisson event frames of digits."""
    from sdt_deploy.data.digits import digit_events, digits_split

    if n < 1:
        raise DeployError("--digits must be at least 1")
    if data.events or cfg.dvs_mode or (cfg.in_channels == 2 and not isinstance(cfg, V2Config)):
        return ArrayDataset(digit_events(n, cfg.time_steps, cfg.img_size, channels=cfg.in_channels), None)
    split = digits_split("test", img_size=cfg.img_size, channels=cfg.in_channels, mean=data.mean, std=data.std)
    if n > split.x.shape[0]:
        raise DeployError(f"--digits {n}: the digits test split has {split.x.shape[0]} images")
    return ArrayDataset(split.x[:n], split.y[:n])


def choose_inputs(cfg: SDTConfig, data: DataConfig, input_path: Optional[str] = None, data_dir: Optional[str] = None,
                  digits: Optional[int] = None, random_n: Optional[int] = None, seed: int = 0,
                  default_digits: Optional[int] = None) -> Inputs:
    """At most one of the four sources (none: `default_digits` digits, or an error without a default)."""
    given = {"--input": input_path, "--data": data_dir, "--digits": digits, "--random": random_n}
    chosen = [k for k, v in given.items() if v is not None]
    if len(chosen) > 1:
        raise DeployError(f"give only one of --input, --data, --digits, --random (got {', '.join(chosen)})")
    if not chosen:
        if default_digits is None:
            raise DeployError("give one input: --input X.npy, --digits N, --random N or --data DIR")
        digits = default_digits
    if input_path is not None:
        x = check_input(load_array(input_path), cfg, name=f"input {input_path!r}")
        return Inputs(ArrayDataset(x), {"source": "input", "path": input_path})
    if data_dir is not None:
        return Inputs(open_dataset(data_dir, cfg, data), {"source": "data", "path": data_dir})
    if random_n is not None:
        from sdt_deploy.data.synth import random_inputs

        if random_n < 1:
            raise DeployError("--random must be at least 1")
        x = random_inputs(cfg, random_n, seed=seed, events=data.events or cfg.dvs_mode)
        return Inputs(ArrayDataset(x), {"source": "random", "seed": seed})
    return Inputs(digits_inputs(digits, cfg, data), {"source": "digits", "split": "test", "first": digits})
