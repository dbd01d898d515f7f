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
only metadata differs.
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
    "demo/norse.manifest.json": "2583c50be30cf5cb5ff3baab56c51b8e075e317e2e15240a1a8779ad5fe16eea",
    "demo/norse.nir": "16a66cacf79d9928a400541e808c94f51e47b1a39d6ae1366d544b75c6ff0497",
    "demo/norse.stem.onnx": "d9778b420e4356226caf3f50ca24f8ec5b213304129f9d696d6506d002709544",
    "demo/port.manifest.json": "6acddd715c827f36753723c16a7f9a82e7acfadd278fa891effbe4bf115f419f",
    "demo/port.nir": "ab0fea5c20c1eb723f29164165eb0d924f0eaf8bed24dfdc99a6ceefa4d4c2b2",
    "demo/port.stem.onnx": "d9778b420e4356226caf3f50ca24f8ec5b213304129f9d696d6506d002709544",
    "demo/std.manifest.json": "4608122340072d68d845e400c6535a03cd261c29159ef68cd61d83558bc08555",
    "demo/std.nir": "49ae9f2daec562dd9881e61a596671870aba6f8adc430c9cea963711884c2f83",
    "demo/std.stem.onnx": "d9778b420e4356226caf3f50ca24f8ec5b213304129f9d696d6506d002709544",
    "dvs_tet_t16/float.onnx": "0b2128c390c3476ca96657bab996aa8ef933887685a395271add10c9b75a716f",
    "dvs_tet_t16/float_unrolled.onnx": "dea1977f6e6be7285cf0cd26ffbd0736c910c9944091e3863eb2e10c19619f22",
    "dvs_tet_t16/int.onnx": "d1e44304f0c935ea067a0b5f0b33f86f7a7a8788c4840f0e379d7a74c3f78236",
    "dvs_tet_t16/int_debug.onnx": "3d73f5c867cddd54197ea69282077cbbd8db61dfe4d6442a0d89590d61aaa27e",
    "dvs_tet_t16/norse.manifest.json": "c5acd2df23eef3ce8968031c353278aa7b9357594158827be060733e7396cf9e",
    "dvs_tet_t16/norse.nir": "f6c047a97c4c74cfc29edfa42337efcc33bce2c4d7c3b42637b1e2fd8a3ba6d9",
    "dvs_tet_t16/norse.stem.onnx": "8dce648121c249640ac280fb6423098a7cc95959dee4ae5e130fd9d628441489",
    "dvs_tet_t16/port.manifest.json": "8f2b178b100ebd30d8dc9a4b679a521bc5aebe09398df03eef5eaf455506cf85",
    "dvs_tet_t16/port.nir": "44ae59f5c146c88484a59b2edcf03db7e0f3b49c8184ee487770a50459a269e1",
    "dvs_tet_t16/port.stem.onnx": "8dce648121c249640ac280fb6423098a7cc95959dee4ae5e130fd9d628441489",
    "dvs_tet_t16/std.manifest.json": "1872eef040ef63cb488a982178ea891c354563d01c3df0fccbfa9392521776ad",
    "dvs_tet_t16/std.nir": "b14aea8c02c07143e0287c631f436af989316a37dc50b5b14df61d43a3276a85",
    "dvs_tet_t16/std.stem.onnx": "8dce648121c249640ac280fb6423098a7cc95959dee4ae5e130fd9d628441489",
    "fixture/float.onnx": "4834cf87138446a1ff31dec765599bd6966a30fe1f7f85ca0b27bac429641ce7",
    "fixture/float_unrolled.onnx": "c96c4aaa1620aabd755eac9a47170196cbdd049f9aed377961220c608219d9e5",
    "fixture/int.onnx": "52ce5578fa2b24f63da3bdf00a7ca9ba9cc55743f3aa3c65e01f1b259cb81cc3",
    "fixture/int_debug.onnx": "d132c4412116bed1051c37b5b6e51d81a5336111e5a1036fa10f02a1605b1124",
    "fixture/norse.manifest.json": "c2d29b84d0a57a8248424aa6449f925bafd4e875c780762b21e2b059183a8439",
    "fixture/norse.nir": "e77db1853072a06dda6b6b90d906a71a059847d587dea20a2eb97268d987af83",
    "fixture/norse.stem.onnx": "cf24319d8f25bbe65673191d9652f3386e4e4ce8cbc25cfa4cf6120bfdc38123",
    "fixture/port.manifest.json": "132bc870f60c7dbae40544a08ba2e39d668847cc074fc593442116d18268d780",
    "fixture/port.nir": "ce3b7194c2962a6b38cf5c7aa3a59cdfec6dee91591b108534283ce4398ac7a5",
    "fixture/port.stem.onnx": "cf24319d8f25bbe65673191d9652f3386e4e4ce8cbc25cfa4cf6120bfdc38123",
    "fixture/std.manifest.json": "4e7e9d7b95959c8969808b79d068045b5d7931940024fc10a1205cf8980aa0a3",
    "fixture/std.nir": "44f5483efa9f61c8df77d7c12155d435edbbbfdc274699b1c3925c11159249ed",
    "fixture/std.stem.onnx": "cf24319d8f25bbe65673191d9652f3386e4e4ce8cbc25cfa4cf6120bfdc38123",
    "plif_1111/float.onnx": "188b35be8575c61689f2e7b848bf6c864fe624045d12458ffc896b233962a4a0",
    "plif_1111/float_unrolled.onnx": "7f8a1a42d8a55dca792d63bdea78f271fc1bfa6cea1cb74c917c826ce8592151",
    "plif_1111/int.onnx": "a5e8510d28ad82622f253938f9b76f5fcef3c28c7cb60585d2dea7ebccd72f32",
    "plif_1111/int_debug.onnx": "3ac17c457ac39f0e88e02d406cc9b1e25253b90e9ceba67a75411d6057665059",
    "plif_1111/norse.manifest.json": "d96221a7b48188fd6f057f8115174005e620cbdea9299bc233912f9e9d25ec22",
    "plif_1111/norse.nir": "5d074a64f1897e0240c2ad2d6d21f607536b496cff894d5147d0540cc16315b3",
    "plif_1111/norse.stem.onnx": "50bf44a73e255e67da132796056755766f6bc565ba815c5a6da9155ccbe51bc9",
    "plif_1111/port.manifest.json": "ba20f6fc48bc218f7beec53dd8997497b3be5b26755c4f11c50a591c8aaf716f",
    "plif_1111/port.nir": "947ff5b549a66274847fe94b44c099e86796075691c6a23e1895faf5732f8bfa",
    "plif_1111/port.stem.onnx": "50bf44a73e255e67da132796056755766f6bc565ba815c5a6da9155ccbe51bc9",
    "plif_1111/std.manifest.json": "27e3cc64418bd714b593ba738cdfe811427a2f47534cae1063167ea00c32764d",
    "plif_1111/std.nir": "16c4a5bccfd17495054b560f33998d30138a2af89e634fc6e3c27c56213ebbff",
    "plif_1111/std.stem.onnx": "50bf44a73e255e67da132796056755766f6bc565ba815c5a6da9155ccbe51bc9",
    "plif_dvs_0000/float.nir": "cba1d57710bd15561bec06755d40d23f5df4a9ae61d307ac5cf0879257dfaf28",
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
