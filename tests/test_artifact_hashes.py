"""Byte identity of every file `sdt-deploy export` writes.

The hashes below were recorded with the code as it stood before the redesign of issue 17 (commit
df7ef44), by running these very commands; a refactoring that changes no behaviour keeps every byte.
A change that is meant to alter an artifact updates the hash here in the same commit and says why.

Changed on purpose since: every `.nir` file (and so the partition manifests, which hold its sha256) for
the graph metadata `readout_rule` and `loader` (issue 18: each file says how its logits are formed from
the per-step Output, for which T, and how it is loaded); the `norse` profile's files added.
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
    "norse.nir": ["--target", "nir", "--nir-profile", "norse"],
    "int_debug.onnx": ["--target", "onnx", "--onnx-variant", "int", "--debug-outputs"],
    "float_unrolled.onnx": ["--target", "onnx", "--onnx-variant", "float", "--unroll", "--debug-outputs"],
}

SHA256 = {
    "demo/float.onnx": "95e8c05b76db4e715522410d3e3c490727d0231b5612738a995178d27144ff26",
    "demo/float_unrolled.onnx": "ee2f9f57a1b4d00972de4692644cabb833d077bd7e074dbad427a31480bb7203",
    "demo/int.onnx": "0d97ec2cd358b2e6638f3e47f7e37a01e9b9db5908098b507677ef5f212ee617",
    "demo/int_debug.onnx": "d62e905aff183315d8cf1d1662f43c055e30feccb2dce5ef2daf9bd2cbf2e71a",
    "demo/norse.manifest.json": "fca77d9e67cd52e8669bb08f2f9c08657f2fa20884cb53d9afd0f64c13b3a7ca",
    "demo/norse.nir": "794f8380ee6e3c1749a360267a2547869d5aeef4160e4927e19d845ed21c6b85",
    "demo/norse.stem.onnx": "c24fe87af2ceae9a79de00c22f167db8a7fc12402435d9a61bfeebef06bcf68a",
    "demo/port.manifest.json": "6d5bd765baa7aca8b4674a16f401f4726f404585523acb7201c9fe620d47dd33",
    "demo/port.nir": "a3f6a8176a3ba9b30d4c6124b09d142076e3ce3afde804b54e0f7cac8e6a13f7",
    "demo/port.stem.onnx": "c24fe87af2ceae9a79de00c22f167db8a7fc12402435d9a61bfeebef06bcf68a",
    "demo/std.manifest.json": "5dc9b3abc916a2d7b1e911913f535199a1075673c664e185025bb27b919688d1",
    "demo/std.nir": "10703fbdfdf15abbd8fb9040393373dbb6eeb39debce55414242c107b4780556",
    "demo/std.stem.onnx": "c24fe87af2ceae9a79de00c22f167db8a7fc12402435d9a61bfeebef06bcf68a",
    "dvs_tet_t16/float.onnx": "6cbfcd61cc54fa86a423b82eafa3857cf4aa06e7c978d1a6339fcfdd9f05522f",
    "dvs_tet_t16/float_unrolled.onnx": "2204c04f78694549712c2d6df35856799cf8a3c3175cce48c9417dbfa3448256",
    "dvs_tet_t16/int.onnx": "9d99be581730af75b2d9daee9ff904c9c81338068c5374722be3789da5c840eb",
    "dvs_tet_t16/int_debug.onnx": "4bd9d3f78461294cc0a9fd41e6309bb162794f708609e2f435808344619b9800",
    "dvs_tet_t16/norse.manifest.json": "ed300c025ea815c082f8272a83e61660cc03d94fdb43392fdbbb2d8e7a6f599b",
    "dvs_tet_t16/norse.nir": "c815dcffba00df4f7db2f0584e0d42eeda8d8b1cc42d32eb350216f2d8951e7d",
    "dvs_tet_t16/norse.stem.onnx": "823ea076f1006c31c41ec48c13f4ce4b67a57f4f62ef8ebd6bcc99b8905e6c6b",
    "dvs_tet_t16/port.manifest.json": "60052ca40256a93720a207d88e2fefc49868961b2b024635a790217d0444bf7c",
    "dvs_tet_t16/port.nir": "5615eb67c3ebfe036abe95e0d2cd9ed2618b22ab68588f04197364f91014552a",
    "dvs_tet_t16/port.stem.onnx": "823ea076f1006c31c41ec48c13f4ce4b67a57f4f62ef8ebd6bcc99b8905e6c6b",
    "dvs_tet_t16/std.manifest.json": "93a205ec7d52b304010b1e5683e8c49bdbdc7cbf6b5e66b5765bbff5cf15f48d",
    "dvs_tet_t16/std.nir": "763a2f1918adeb0b5e6fdb6e9c50496902ed906433c0ad8396d3094828c1a666",
    "dvs_tet_t16/std.stem.onnx": "823ea076f1006c31c41ec48c13f4ce4b67a57f4f62ef8ebd6bcc99b8905e6c6b",
    "fixture/float.onnx": "c5373b4d8670b83851f0167364fb89a979325243b47338ca0acae5d6b3922840",
    "fixture/float_unrolled.onnx": "04c92edb7db8d39f490455aa569a7a59e5041a57842217a603221361c4d8d1b7",
    "fixture/int.onnx": "88a0434a1ccc030aa00fdcb72c1367e241ecf9a953974aa21c8ea22d70359426",
    "fixture/int_debug.onnx": "90eeaae48fd2d319a92a165777fe377366f7eea6182eaef072f1e14c1ab22c70",
    "fixture/norse.manifest.json": "3f850344d78612a61e22f0e10ec09d551b7c7eb8ff0ca2197c3667e3d5995814",
    "fixture/norse.nir": "5903124f0ebdd23e2b08471e5bd540fda11054a092060233c563f93fff48a812",
    "fixture/norse.stem.onnx": "c01fb2bc6c7057b49258d13fca95f0aae0d50e8f0719d87899a3d500c6d24486",
    "fixture/port.manifest.json": "d44fd9556a2a8099533716afd98250f40dfeb93434d1ccee8493ec30b9811c9c",
    "fixture/port.nir": "7e5316d3e293f1450e4d801cc5815ff99103caaa70700a7fe23b2af09f02a711",
    "fixture/port.stem.onnx": "c01fb2bc6c7057b49258d13fca95f0aae0d50e8f0719d87899a3d500c6d24486",
    "fixture/std.manifest.json": "ce4c8b78a33f4a170bf5a3488d342eabd65facb5f2af6db01fdf6419a4d40ec9",
    "fixture/std.nir": "8f81c4807240b5e775949b73f678550d5c052feb5e0e0a0d06a6b99eadcef4c6",
    "fixture/std.stem.onnx": "c01fb2bc6c7057b49258d13fca95f0aae0d50e8f0719d87899a3d500c6d24486",
    "plif_1111/float.onnx": "f8736ca9c27964ea012b2cf08e436717e1d67dbdebed6741b32f455ccc43308b",
    "plif_1111/float_unrolled.onnx": "105b7affd4d43e3b60a180149f498c93560ea1e58ea8b9957ef08d89f701a2cd",
    "plif_1111/int.onnx": "28c902911542f66ce8adce693323623d26c64b7dcdf27b59e4c620081004c981",
    "plif_1111/int_debug.onnx": "ff0b2ed9991f2cc5b2eb4280b0ce43930f4d6f6bd806f4b762a785815dfb8bcf",
    "plif_1111/norse.manifest.json": "49b39c94a1649a3a5fbbb6a96e870867f638be44b8e2d575e0f8ce87518a047b",
    "plif_1111/norse.nir": "5dadf4f68198fe9202b939884d6f938cb92f496afaa6a8772efc3a72f2c38636",
    "plif_1111/norse.stem.onnx": "e011b22ec603ff2e7deaa8fcd35e119934f66400dc4023d0e55479d109f0d6e4",
    "plif_1111/port.manifest.json": "4d7fbf5402cd81723021e06726c702c3f9efb46ecbe5186f2f42306767bbf982",
    "plif_1111/port.nir": "5b663453d327ed5043555107538fc6899d532540f609a058fa7f856cb42b2b33",
    "plif_1111/port.stem.onnx": "e011b22ec603ff2e7deaa8fcd35e119934f66400dc4023d0e55479d109f0d6e4",
    "plif_1111/std.manifest.json": "91828b41fcf0660cfde2378987806dd6d9380d80ea1cad5ba2e60e0af86131bb",
    "plif_1111/std.nir": "44c2c799c840f0c9d659b8c515831d2a9eef41ccc537bdf1e950fb4bb75c7afc",
    "plif_1111/std.stem.onnx": "e011b22ec603ff2e7deaa8fcd35e119934f66400dc4023d0e55479d109f0d6e4",
    "plif_dvs_0000/float.nir": "4dd5b97c022fac0db68729443f80f6d7bd747b0d2e960cc41dd4bf35dbbff290",
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
