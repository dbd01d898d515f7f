"""Byte identity of every file `sdt-deploy export` writes.

The hashes below were recorded with the code as it stood before the redesign of issue 17 (commit
df7ef44), by running these very commands; a refactoring that changes no behaviour keeps every byte.
A change that is meant to alter an artifact updates the hash here in the same commit and says why.

Changed on purpose since: every `.nir` file (and so the partition manifests, which hold its sha256) for
the graph metadata `readout_rule` and `loader` (issue 18: each file says how its logits are formed from
the per-step Output, for which T, and how it is loaded); the `norse` profile's files added. Then every
file for the provenance of issue 15 (ONNX metadata `sdt_deploy.provenance` and `input_range` in
`sdt_deploy.quantization`; NIR graph metadata `sdt_provenance`, `sdt_quantization`; the manifests): checked
when it was made, the ONNX graphs (`ModelProto.graph`) and the NIR nodes and edges are the same as before,
only metadata differs. Then every `.nir` file (and its manifest) for the way HDF5 writes it: through an
open file object (h5py's file-object driver) instead of a path, so that a full disk is one error line
instead of a crash inside h5py (files.atomic.ErrorHoldingFile); checked when it was made, every dataset
of every file (values, dtypes, shapes, compression, chunks) and every group are the same as before, only
HDF5's placement of them in the file differs.
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
    "demo/float.onnx": "3f34e57d2ce6a1ad77df678b73487fd28610cb69b7fffd2f845ddfbf189fec68",
    "demo/float_unrolled.onnx": "e54673c60593acea527cde2f114317e67f31f1eaa3c1a4632edc06ed0a748a13",
    "demo/int.onnx": "eeb4d9ffe00410404e90fef772f76d91d4416473cd6ded955cef3c4ce178f3e9",
    "demo/int_debug.onnx": "a2333eb4e7f7c76378c216117668c115db8b7426d523121c4087ed15d57a7224",
    "demo/norse.manifest.json": "a913072adadcb684f2b41d0057feab7cc946f7ad93fb8187355cfd77ff5e6b9d",
    "demo/norse.nir": "e6f6c2199c68c4c459208372f862a0e7c33366bed8ec383f057c55c3d90700fd",
    "demo/norse.stem.onnx": "d9778b420e4356226caf3f50ca24f8ec5b213304129f9d696d6506d002709544",
    "demo/port.manifest.json": "8bcfceb903159a7c67eab0c7ed14db061f5bf52a2e0c4a46426df70444d34dcc",
    "demo/port.nir": "d89aae05ad787162b3c11a54ae736b318c815f4bab75e47ad80773bfc9c2b8de",
    "demo/port.stem.onnx": "d9778b420e4356226caf3f50ca24f8ec5b213304129f9d696d6506d002709544",
    "demo/std.manifest.json": "ca7725c18f8b3e5660da68d471d4a03d1124b9cec1ec9753a36275ae3b902025",
    "demo/std.nir": "4612b1ef583d0b4cfab6672dc7350e327521e7fd4fa657b3131fb9ca08756640",
    "demo/std.stem.onnx": "d9778b420e4356226caf3f50ca24f8ec5b213304129f9d696d6506d002709544",
    "dvs_tet_t16/float.onnx": "0b2128c390c3476ca96657bab996aa8ef933887685a395271add10c9b75a716f",
    "dvs_tet_t16/float_unrolled.onnx": "dea1977f6e6be7285cf0cd26ffbd0736c910c9944091e3863eb2e10c19619f22",
    "dvs_tet_t16/int.onnx": "d1e44304f0c935ea067a0b5f0b33f86f7a7a8788c4840f0e379d7a74c3f78236",
    "dvs_tet_t16/int_debug.onnx": "3d73f5c867cddd54197ea69282077cbbd8db61dfe4d6442a0d89590d61aaa27e",
    "dvs_tet_t16/norse.manifest.json": "7174dfda78884daf47cf86969fd95bc418afa99c2da1c706343299cecbc041df",
    "dvs_tet_t16/norse.nir": "771402b2a0373b6757e15e2acba09ea80fe046fe954cd4eef27912cde5090342",
    "dvs_tet_t16/norse.stem.onnx": "8dce648121c249640ac280fb6423098a7cc95959dee4ae5e130fd9d628441489",
    "dvs_tet_t16/port.manifest.json": "59260d63d2e65d3e0e6619c1bfe28924e7ba415ec67f7c633ea136676f5ebfb3",
    "dvs_tet_t16/port.nir": "1bfc96c783a1af482fa8dc50a3b35f0082318d66c780c9a771170ae5c2a53a9d",
    "dvs_tet_t16/port.stem.onnx": "8dce648121c249640ac280fb6423098a7cc95959dee4ae5e130fd9d628441489",
    "dvs_tet_t16/std.manifest.json": "948dab99e208480b9720de7d51a08819b2033589db68beadda11c1c4519a5823",
    "dvs_tet_t16/std.nir": "17a0afb8d19851bc257aa74cdb58b796d39ffa669aaa80eec814a9d46b6df38b",
    "dvs_tet_t16/std.stem.onnx": "8dce648121c249640ac280fb6423098a7cc95959dee4ae5e130fd9d628441489",
    "fixture/float.onnx": "4834cf87138446a1ff31dec765599bd6966a30fe1f7f85ca0b27bac429641ce7",
    "fixture/float_unrolled.onnx": "c96c4aaa1620aabd755eac9a47170196cbdd049f9aed377961220c608219d9e5",
    "fixture/int.onnx": "52ce5578fa2b24f63da3bdf00a7ca9ba9cc55743f3aa3c65e01f1b259cb81cc3",
    "fixture/int_debug.onnx": "d132c4412116bed1051c37b5b6e51d81a5336111e5a1036fa10f02a1605b1124",
    "fixture/norse.manifest.json": "1bb96abd5788e4db9d97838749e1f882501779ef1db2f8a362ade79c75d5952d",
    "fixture/norse.nir": "274aed92f384f1fbd0a5370a2d6231f336674dba50cb1897527f27d6ad6166cf",
    "fixture/norse.stem.onnx": "cf24319d8f25bbe65673191d9652f3386e4e4ce8cbc25cfa4cf6120bfdc38123",
    "fixture/port.manifest.json": "2e66ed71d60bdddab96d3152ad763e9fd1d46a52a30e1875c843b674fa9d8d5b",
    "fixture/port.nir": "1ce26c1aa42002b05e943a4aaf360efa8d7145b6641296b9356db77c0e783c19",
    "fixture/port.stem.onnx": "cf24319d8f25bbe65673191d9652f3386e4e4ce8cbc25cfa4cf6120bfdc38123",
    "fixture/std.manifest.json": "b73d2d1303c071d7e98812adb3224825d6ba49d6e051a2d80f6683344a062bfc",
    "fixture/std.nir": "65b6f1956a274b8c4ce4eefadbe74870d1a820084fff6ef87071c6acf84403e9",
    "fixture/std.stem.onnx": "cf24319d8f25bbe65673191d9652f3386e4e4ce8cbc25cfa4cf6120bfdc38123",
    "plif_1111/float.onnx": "188b35be8575c61689f2e7b848bf6c864fe624045d12458ffc896b233962a4a0",
    "plif_1111/float_unrolled.onnx": "7f8a1a42d8a55dca792d63bdea78f271fc1bfa6cea1cb74c917c826ce8592151",
    "plif_1111/int.onnx": "a5e8510d28ad82622f253938f9b76f5fcef3c28c7cb60585d2dea7ebccd72f32",
    "plif_1111/int_debug.onnx": "3ac17c457ac39f0e88e02d406cc9b1e25253b90e9ceba67a75411d6057665059",
    "plif_1111/norse.manifest.json": "a2a3c716888427eec01ac6363b87a858676179d5ab61f1d300684b85fe64aede",
    "plif_1111/norse.nir": "0965ee5ba81034fcad49ddf2b981b21762501d2e39bbd84118e5eb7d18a439fb",
    "plif_1111/norse.stem.onnx": "50bf44a73e255e67da132796056755766f6bc565ba815c5a6da9155ccbe51bc9",
    "plif_1111/port.manifest.json": "c958dce7319a34ef2c4528f56e81dd828f7ccf8e6ab6a8fa938bd9a09a5c045d",
    "plif_1111/port.nir": "8afbb7c366cf1e37469e611d2342697004740a4109ab02a1522686e579f1db77",
    "plif_1111/port.stem.onnx": "50bf44a73e255e67da132796056755766f6bc565ba815c5a6da9155ccbe51bc9",
    "plif_1111/std.manifest.json": "b88a801e7aae4ba6bccf93a811cc16c5d58a82d0cdacf1a4f8f61c07f52f3646",
    "plif_1111/std.nir": "40c5611e7f7c491e2c04a5422386adbeb9ea1604049e315c61aa430e187ab98b",
    "plif_1111/std.stem.onnx": "50bf44a73e255e67da132796056755766f6bc565ba815c5a6da9155ccbe51bc9",
    "plif_dvs_0000/float.nir": "876448cba6e8443a1db70f0e556c8cae976d478e664765b35798baa1b2ceeb7d",
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
