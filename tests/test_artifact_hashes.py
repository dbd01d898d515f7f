"""Byte identity of every file `sdt-deploy export` writes.

The hashes below were recorded with the code as it stood before the redesign of issue 17 (commit
df7ef44), by running these very commands; a refactoring that changes no behaviour keeps every byte.
A change that is meant to alter an artifact updates the hash here in the same commit and says why.
"""
import hashlib
import os

import pytest

from sdt_deploy.cli.app import main

from conftest import DEMO_CKPT, FIXTURE_CKPT, ORACLE, ROOT

CASES = {
    "demo": DEMO_CKPT,
    "fixture": FIXTURE_CKPT,
    "plif_1111": ORACLE / "plif_1111.pth",
    "dvs_tet_t16": ROOT / "tests" / "data" / "variants" / "dvs_tet_t16.pth",
}
EXPORTS = {
    "int.onnx": ["--target", "onnx", "--onnx-variant", "int"],
    "float.onnx": ["--target", "onnx", "--onnx-variant", "float"],
    "std.nir": ["--target", "nir", "--nir-profile", "standard"],
    "port.nir": ["--target", "nir", "--nir-profile", "portable"],
    "int_debug.onnx": ["--target", "onnx", "--onnx-variant", "int", "--debug-outputs"],
    "float_unrolled.onnx": ["--target", "onnx", "--onnx-variant", "float", "--unroll", "--debug-outputs"],
}

SHA256 = {
    "demo/float.onnx": "95e8c05b76db4e715522410d3e3c490727d0231b5612738a995178d27144ff26",
    "demo/float_unrolled.onnx": "ee2f9f57a1b4d00972de4692644cabb833d077bd7e074dbad427a31480bb7203",
    "demo/int.onnx": "0d97ec2cd358b2e6638f3e47f7e37a01e9b9db5908098b507677ef5f212ee617",
    "demo/int_debug.onnx": "d62e905aff183315d8cf1d1662f43c055e30feccb2dce5ef2daf9bd2cbf2e71a",
    "demo/port.manifest.json": "7230c90fb969a6925449615ac175f8c1aaa25fb05a5e43d3b893be945d482230",
    "demo/port.nir": "13493ecba46402481bae1dd9661334d27507f0a38d964671478a4478531bc7a5",
    "demo/port.stem.onnx": "c24fe87af2ceae9a79de00c22f167db8a7fc12402435d9a61bfeebef06bcf68a",
    "demo/std.manifest.json": "e47781d9c81c68f2df98e5b66daa629c49ddceb74c03e2930dced1882047204d",
    "demo/std.nir": "352d04fa3870d4ac4be34c1ce0ea6d09895815b5988d345b476b6b026cb4d050",
    "demo/std.stem.onnx": "c24fe87af2ceae9a79de00c22f167db8a7fc12402435d9a61bfeebef06bcf68a",
    "dvs_tet_t16/float.onnx": "6cbfcd61cc54fa86a423b82eafa3857cf4aa06e7c978d1a6339fcfdd9f05522f",
    "dvs_tet_t16/float_unrolled.onnx": "2204c04f78694549712c2d6df35856799cf8a3c3175cce48c9417dbfa3448256",
    "dvs_tet_t16/int.onnx": "9d99be581730af75b2d9daee9ff904c9c81338068c5374722be3789da5c840eb",
    "dvs_tet_t16/int_debug.onnx": "4bd9d3f78461294cc0a9fd41e6309bb162794f708609e2f435808344619b9800",
    "dvs_tet_t16/port.manifest.json": "43232cd8fb532d742853477e41e3ca595d4efd3f1fe02e6734a5639b728a71ff",
    "dvs_tet_t16/port.nir": "d93388c323f98d7b33eb8f292b6a7202d09a40887272565f23cce2c5f4f3ac79",
    "dvs_tet_t16/port.stem.onnx": "823ea076f1006c31c41ec48c13f4ce4b67a57f4f62ef8ebd6bcc99b8905e6c6b",
    "dvs_tet_t16/std.manifest.json": "99cfcd4f7198847d76b123ed55bf5e5263e5df97b43fc81596d81a4420828b5b",
    "dvs_tet_t16/std.nir": "9de0267da898d3547ac432b33193a1206e44e961e10237107b1995c188fd48e0",
    "dvs_tet_t16/std.stem.onnx": "823ea076f1006c31c41ec48c13f4ce4b67a57f4f62ef8ebd6bcc99b8905e6c6b",
    "fixture/float.onnx": "c5373b4d8670b83851f0167364fb89a979325243b47338ca0acae5d6b3922840",
    "fixture/float_unrolled.onnx": "04c92edb7db8d39f490455aa569a7a59e5041a57842217a603221361c4d8d1b7",
    "fixture/int.onnx": "88a0434a1ccc030aa00fdcb72c1367e241ecf9a953974aa21c8ea22d70359426",
    "fixture/int_debug.onnx": "90eeaae48fd2d319a92a165777fe377366f7eea6182eaef072f1e14c1ab22c70",
    "fixture/port.manifest.json": "f495cb5cc32ec83518f0700aa7c3226fe5ae90f95346442d4ec62889f0df5394",
    "fixture/port.nir": "2ea9a747058096a06b941ab9333db27f7d79a2ed2d2c4fa92710c3551e419e84",
    "fixture/port.stem.onnx": "c01fb2bc6c7057b49258d13fca95f0aae0d50e8f0719d87899a3d500c6d24486",
    "fixture/std.manifest.json": "96f2e9b12e49c8d2d9ab2855357a19dd571472981ed1267bf998cd891a1a1fbb",
    "fixture/std.nir": "9365c372a0fb3f659f1cfa9f31e8f1ed9d700e9248f9f8105a0d7e4ff4510df6",
    "fixture/std.stem.onnx": "c01fb2bc6c7057b49258d13fca95f0aae0d50e8f0719d87899a3d500c6d24486",
    "plif_1111/float.onnx": "f8736ca9c27964ea012b2cf08e436717e1d67dbdebed6741b32f455ccc43308b",
    "plif_1111/float_unrolled.onnx": "105b7affd4d43e3b60a180149f498c93560ea1e58ea8b9957ef08d89f701a2cd",
    "plif_1111/int.onnx": "28c902911542f66ce8adce693323623d26c64b7dcdf27b59e4c620081004c981",
    "plif_1111/int_debug.onnx": "ff0b2ed9991f2cc5b2eb4280b0ce43930f4d6f6bd806f4b762a785815dfb8bcf",
    "plif_1111/port.manifest.json": "05727e5a1d65ddfd21922f90ca661e5a5fd3ecd27c5083ea19af91a676bcc62f",
    "plif_1111/port.nir": "f79399feb7777d6f2ac55fa7cb5eb9ab57417cf30c9e8c46b59f2682ded14278",
    "plif_1111/port.stem.onnx": "e011b22ec603ff2e7deaa8fcd35e119934f66400dc4023d0e55479d109f0d6e4",
    "plif_1111/std.manifest.json": "a8cd167c5f676ebc3df461ca5b7acf592d5d7cd514644599bf37b7bad6d99aed",
    "plif_1111/std.nir": "a0d7fe79f1bde6ee6cb8257e5ac74b103d967620bed15e5cd9e8b765216cba85",
    "plif_1111/std.stem.onnx": "e011b22ec603ff2e7deaa8fcd35e119934f66400dc4023d0e55479d109f0d6e4",
    "plif_dvs_0000/float.nir": "e58e45def5909b58ef9f3bcabbc73d5cfd2e74bdb75e2d9c6367a8cef5946466",
}


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_exports_are_byte_identical_to_the_recorded_ones(case, tmp_path):
    ckpt = CASES[case]
    if not os.path.exists(ckpt):
        pytest.skip(f"{ckpt} is absent")
    for name, args in EXPORTS.items():
        assert main(["export", str(ckpt), *args, "-o", str(tmp_path / name)]) == 0, name
    written = {f"{case}/{f}": _sha256(tmp_path / f) for f in sorted(os.listdir(tmp_path))}
    expected = {k: v for k, v in SHA256.items() if k.startswith(case + "/") and not k.endswith("float.nir")}
    assert set(written) == set(expected)
    changed = [k for k in expected if written[k] != expected[k]]
    assert not changed, f"artifacts changed: {changed}"


def test_float_nir_export_is_byte_identical(tmp_path):
    out = tmp_path / "float.nir"
    assert main(["export", str(ORACLE / "plif_dvs_0000.pth"), "--target", "nir", "--no-quantize", "-o", str(out)]) == 0
    assert _sha256(out) == SHA256["plif_dvs_0000/float.nir"]
