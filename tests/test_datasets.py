"""Dataset layouts for `verify --data` / `report --data`: ImageFolder, the original CIFAR python batches
(untrusted pickles: numpy-only unpickler) and ImageNet's val/ folder, with the conf's eval transform."""
import pickle

import numpy as np
import pytest

from models import SDTConfig
from sdt_deploy.data.datasets import eval_transform, open_dataset, shard
from sdt_deploy.errors import DeployError
from sdt_deploy.files.configs import DataConfig

CFG = SDTConfig(img_size=16, dim=16, num_heads=2, pooling_stat="0011", num_classes=10)
DATA = DataConfig(dataset="torch/cifar10", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)


def test_cifar_batches_are_read_with_the_eval_transform(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": raw, "labels": [3, 1, 4, 1]}, f)
    ds = open_dataset(str(tmp_path), CFG, DATA)
    x, y = ds.batch([0, 2])
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [3, 4]
    # the transform by hand: resize 32 -> 16 (bicubic), center crop 16, /255, (x - 0.5) / 0.25
    from PIL import Image

    img = Image.fromarray(raw[0].reshape(3, 32, 32).transpose(1, 2, 0)).resize((16, 16), Image.BICUBIC)
    expected = (np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(x[0], expected, rtol=0, atol=1e-6)


def test_a_cifar_batch_carrying_code_is_refused(tmp_path):
    import os

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DeployError, match="refused"):
        open_dataset(str(tmp_path), CFG, DATA)
    assert not marker.exists()


def test_imagenet_val_layout_and_center_crop(tmp_path):
    from PIL import Image

    for wnid in ("n01", "n02"):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        colour = (255, 0, 0) if wnid == "n01" else (0, 0, 255)
        Image.new("RGB", (40, 20), colour).save(tmp_path / "val" / wnid / "a.JPEG")
    data = DataConfig(dataset="imagenet", crop_pct=0.8)
    ds = open_dataset(str(tmp_path), CFG, data)
    x, y = ds.batch([0, 1])
    assert y.tolist() == [0, 1] and x.shape == (2, 3, 16, 16)
    red = (1.0 - 0.485) / 0.229
    assert x[0, 0].mean() == pytest.approx(red, abs=0.05)


def test_eval_transform_resizes_the_shorter_side_then_crops():
    """timm's eval transform: shorter side to floor(16 / crop_pct), then the centre 16 x 16."""
    from PIL import Image

    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 3, (32, 1, 3))    # R = G = B = 3x, [32, 64, 3]
    plain = DataConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=0.5)
    out = eval_transform(CFG, plain)(Image.fromarray(ramp))   # shorter side already 32: no resize
    # the centre crop of 64 x 32: columns 24..39, rows 8..23, so pixel (0, 0) of the crop is column 24
    assert out.shape == (3, 16, 16)
    np.testing.assert_array_equal(out[0, 0], np.arange(24, 40, dtype=np.float32) * 3 / np.float32(255))
    # shorter side 128 -> floor(16 / 0.25) = 64 (bicubic: a flat image stays flat), then the centre crop,
    # normalised with the conf's mean and std
    grey = DataConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.25)
    flat = eval_transform(CFG, grey)(Image.new("RGB", (128, 256), (51, 51, 51)))
    assert flat.shape == (3, 16, 16)
    np.testing.assert_allclose(flat, (51 / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)


def test_shards_cover_every_sample_once():
    parts = [shard(11, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(11))


def test_missing_or_empty_folders_are_one_line(tmp_path):
    with pytest.raises(DeployError, match="not a directory"):
        open_dataset(str(tmp_path / "nope"), CFG, DATA)
    with pytest.raises(DeployError, match="no images"):
        open_dataset(str(tmp_path), CFG, DATA)
