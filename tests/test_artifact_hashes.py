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
HDF5's placement of them in the file differs. Then every integer ONNX file (int, int_debug, every
partition's stem, and so the manifests) for its weights (issue 19): ConvInteger/MatMulInteger weights
stored as uint8 w_int + 128 with the weight zero point 128 instead of int8 w_int (onnxruntime's
int8-weight kernel was 4.5x slower); checked when it was made on the fixture: the same 212 nodes, types,
attributes and metadata; each of the 18 weight initializers is the old one + 128; one initializer added
(the zero point); the float ONNX and the .nir files unchanged.
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
    "demo/int.onnx": "2e688884a67e1f83fc95385ec02786ebb6322dcad5add1f57ef9313d87566e2d",
    "demo/int_debug.onnx": "6f3c64dc82d36a2bcb0c374f81be1103cc02de5c69a095a77462cf3925d79373",
    "demo/norse.manifest.json": "b151ff3a060e90c77301680a15ddd866ecb07362e5aa300e45977a904613e8ce",
    "demo/norse.nir": "e6f6c2199c68c4c459208372f862a0e7c33366bed8ec383f057c55c3d90700fd",
    "demo/norse.stem.onnx": "376cdca83f23f584b8658de99fff537f055a02d3c66d314b0bc19b960650982f",
    "demo/port.manifest.json": "74336157adc4bf9b139bdaa12459578978699ce132010e7ba47587eec4a90b3f",
    "demo/port.nir": "d89aae05ad787162b3c11a54ae736b318c815f4bab75e47ad80773bfc9c2b8de",
    "demo/port.stem.onnx": "376cdca83f23f584b8658de99fff537f055a02d3c66d314b0bc19b960650982f",
    "demo/std.manifest.json": "f07f347e4d39eaded0b6a12cf20adee1067ae66a9314ae48fc6777c3a04e2a31",
    "demo/std.nir": "4612b1ef583d0b4cfab6672dc7350e327521e7fd4fa657b3131fb9ca08756640",
    "demo/std.stem.onnx": "376cdca83f23f584b8658de99fff537f055a02d3c66d314b0bc19b960650982f",
    "dvs_tet_t16/float.onnx": "0b2128c390c3476ca96657bab996aa8ef933887685a395271add10c9b75a716f",
    "dvs_tet_t16/float_unrolled.onnx": "dea1977f6e6be7285cf0cd26ffbd0736c910c9944091e3863eb2e10c19619f22",
    "dvs_tet_t16/int.onnx": "9190deb02c45a7787ea401d73629448b50ae4aa8edb198665ab4f93317939a6a",
    "dvs_tet_t16/int_debug.onnx": "86beaef7d293efa857c7e9daca9d3b500407d17bdda47ccece46e4f4b8ab7151",
    "dvs_tet_t16/norse.manifest.json": "f76b6b253dccfa7e9ff5580a63e34b21e72564b988de6a333c6de4bf77aa6591",
    "dvs_tet_t16/norse.nir": "771402b2a0373b6757e15e2acba09ea80fe046fe954cd4eef27912cde5090342",
    "dvs_tet_t16/norse.stem.onnx": "d6daa6b31c7b406208edd09f10aa650771908400dddac1f75e296e0243dcf54b",
    "dvs_tet_t16/port.manifest.json": "8483e9aca70fc50a15a9eb6979ae2348a7754c6cec9985068c7c37bd6666b8f3",
    "dvs_tet_t16/port.nir": "1bfc96c783a1af482fa8dc50a3b35f0082318d66c780c9a771170ae5c2a53a9d",
    "dvs_tet_t16/port.stem.onnx": "d6daa6b31c7b406208edd09f10aa650771908400dddac1f75e296e0243dcf54b",
    "dvs_tet_t16/std.manifest.json": "81716bf549e9d65d7a9b60e6baba7da87dde2808864c72f2aab92ad17da00738",
    "dvs_tet_t16/std.nir": "17a0afb8d19851bc257aa74cdb58b796d39ffa669aaa80eec814a9d46b6df38b",
    "dvs_tet_t16/std.stem.onnx": "d6daa6b31c7b406208edd09f10aa650771908400dddac1f75e296e0243dcf54b",
    "fixture/float.onnx": "4834cf87138446a1ff31dec765599bd6966a30fe1f7f85ca0b27bac429641ce7",
    "fixture/float_unrolled.onnx": "c96c4aaa1620aabd755eac9a47170196cbdd049f9aed377961220c608219d9e5",
    "fixture/int.onnx": "fef26b5cf922abae438c9849b1da0d94b52f22781f733b108cace1c1e9f6e4ae",
    "fixture/int_debug.onnx": "492b8c9836e3cbdf7313fe9ecb4284f002373f04a46f71bdf723125c7c6f9928",
    "fixture/norse.manifest.json": "b2f2ae4fc71abbb48cd226ee78fa4ca3e2443dc452abb745569322e082d193bf",
    "fixture/norse.nir": "274aed92f384f1fbd0a5370a2d6231f336674dba50cb1897527f27d6ad6166cf",
    "fixture/norse.stem.onnx": "75aac21276408cfe21d622e12635e197021e91d566ac8aa8c93cefd68fe79ea3",
    "fixture/port.manifest.json": "1453dc0547d9a135a5b48033b291dc271feb2e9572ab1f90619cb551809c2376",
    "fixture/port.nir": "1ce26c1aa42002b05e943a4aaf360efa8d7145b6641296b9356db77c0e783c19",
    "fixture/port.stem.onnx": "75aac21276408cfe21d622e12635e197021e91d566ac8aa8c93cefd68fe79ea3",
    "fixture/std.manifest.json": "dc4b7690efc14fff17f9f8dc0f94081bff3acbde323155f655365924e2a4e643",
    "fixture/std.nir": "65b6f1956a274b8c4ce4eefadbe74870d1a820084fff6ef87071c6acf84403e9",
    "fixture/std.stem.onnx": "75aac21276408cfe21d622e12635e197021e91d566ac8aa8c93cefd68fe79ea3",
    "plif_1111/float.onnx": "188b35be8575c61689f2e7b848bf6c864fe624045d12458ffc896b233962a4a0",
    "plif_1111/float_unrolled.onnx": "7f8a1a42d8a55dca792d63bdea78f271fc1bfa6cea1cb74c917c826ce8592151",
    "plif_1111/int.onnx": "cb751e47b759998182cec4ccd2b583011a24b8d62de7e1f01b97f783355d8c3c",
    "plif_1111/int_debug.onnx": "f72b35a9027386bdca2a3074193adfc24b29808ffec82827b7ce1f4a6e11462b",
    "plif_1111/norse.manifest.json": "89a3cafcff55ff4d0328b6d66c5ed8d5596a985c36cdae12373809a405032b90",
    "plif_1111/norse.nir": "0965ee5ba81034fcad49ddf2b981b21762501d2e39bbd84118e5eb7d18a439fb",
    "plif_1111/norse.stem.onnx": "161bb70e4fccf479bf0b8ac085a3559cb36396c500c115c586b717d3922abd5e",
    "plif_1111/port.manifest.json": "6ca93562617c47c797f134044eb45139906facf18357122916deb48756409261",
    "plif_1111/port.nir": "8afbb7c366cf1e37469e611d2342697004740a4109ab02a1522686e579f1db77",
    "plif_1111/port.stem.onnx": "161bb70e4fccf479bf0b8ac085a3559cb36396c500c115c586b717d3922abd5e",
    "plif_1111/std.manifest.json": "5092bf306fa8d02c4570c2cd619e1eeb3a3ed2c7fecee57330b1544e384b37e7",
    "plif_1111/std.nir": "40c5611e7f7c491e2c04a5422386adbeb9ea1604049e315c61aa430e187ab98b",
    "plif_1111/std.stem.onnx": "161bb70e4fccf479bf0b8ac085a3559cb36396c500c115c586b717d3922abd5e",
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
