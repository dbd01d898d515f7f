"""Export speed and memory: `sdt-deploy export` of SDT-8-768 (224x224, T = 4, 66.3M parameters) to
ONNX and to NIR, beside `torch.onnx.export` of the same torch model with both of torch's exporters
(`dynamo=False`, TorchScript-based, and `dynamo=True`, torch's default, which needs onnxscript: the
`bench` extra), measured in the same run.

    python bench/bench_export.py [--runs 3] [--no-dynamo]

The checkpoint (random weights: the models' plain initialisation, torch seed 0, in the original
train.py format) is written to bench/out/sdt_8_768.pth on first use. Each command is a whole child
process (Python start, imports, loading the checkpoint, everything up to the written file): one
warm-up round, then `--runs` rounds, the commands interleaved so that the machine's load falls on
all of them alike; the figure is the median. Peak memory is each child's own peak RSS (`ru_maxrss`).

Targets (issue 9): our ONNX export in at most 0.5x the time of torch.onnx.export (judged against each
exporter); peak RSS at most 3x the checkpoint's size. The dynamo exporter writes the weights to an
external data file beside the .onnx (`.onnx.data`): its size is the two files'.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

CONFIG = "imagenet/8_768_300E_t4"


def make_checkpoint(path: str) -> None:
    sys.path.insert(0, C.ROOT)
    import torch

    from models import build_model
    from sdt_deploy.data import synth
    from sdt_deploy.files.checkpoint import save_original_format
    from sdt_deploy.files.configs import resolve

    cfg = resolve(yaml_path=CONFIG).config
    torch.manual_seed(0)
    save_original_format(path, build_model(cfg).eval(), synth.checkpoint_args(cfg))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-dynamo", action="store_true", help="skip torch.onnx.export(dynamo=True)")
    a = p.parse_args()
    os.makedirs(C.OUT, exist_ok=True)
    ckpt = os.path.join(C.OUT, "sdt_8_768.pth")
    if not os.path.exists(ckpt):
        make_checkpoint(ckpt)
    ckpt_mib = os.path.getsize(ckpt) / 2 ** 20
    out = lambda name: os.path.join(C.OUT, name)  # noqa: E731
    commands = {
        "ours_onnx": [C.SDT_DEPLOY, "export", ckpt, "--target", "onnx", "-o", out("sdt_8_768.onnx"), "--force"],
        "torch_onnx": [C.PYTHON, os.path.join(C.ROOT, "bench", "torch_onnx_export.py"), ckpt,
                       out("sdt_8_768.torch.onnx"), "--config", CONFIG],
        "ours_nir": [C.SDT_DEPLOY, "export", ckpt, "--target", "nir", "-o", out("sdt_8_768.nir"), "--force"],
    }
    try:
        import onnxscript  # noqa: F401
        dynamo = not a.no_dynamo
    except ImportError:
        dynamo = False
        print("onnxscript is not installed (pip install -c constraints.txt -e '.[bench]'): "
              "torch.onnx.export(dynamo=True) not measured", flush=True)
    if dynamo:
        commands["torch_onnx_dynamo"] = [C.PYTHON, os.path.join(C.ROOT, "bench", "torch_onnx_export.py"), ckpt,
                                         out("sdt_8_768.torch_dynamo.onnx"), "--config", CONFIG, "--dynamo"]
    baseline_cmd = [C.PYTHON, "-c", "import torch, onnx, nir, sdt_deploy.cli, sdt_deploy.api, exporters.onnx, "
                                    "exporters.nir; from sdt_deploy.quant.brevitas_import import import_brevitas; "
                                    "import_brevitas()"]     # brevitas as the export imports it
    runs = {k: [] for k in commands}
    for round_ in range(a.runs + 1):                   # round 0 is the warm-up
        for name, cmd in commands.items():
            r = C.run_child(cmd)
            if r["rc"] != 0:
                raise SystemExit(f"{name} failed ({r['rc']}): {r['stderr']}")
            print(f"round {round_} {name}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"load {r['load_before']}", flush=True)
            if round_:
                runs[name].append(r)
    base = C.run_child(baseline_cmd)
    med = {k: {"seconds": C.median(r["seconds"] for r in v), "peak_rss_mib": C.median(r["peak_rss_mib"] for r in v),
               "load1": [r["load_before"][0] for r in v]} for k, v in runs.items()}
    def mib(name: str) -> float:
        return sum(os.path.getsize(out(f)) for f in (name, name + ".data") if os.path.exists(out(f))) / 2 ** 20

    files = {"ours_onnx": "sdt_8_768.onnx", "torch_onnx": "sdt_8_768.torch.onnx", "ours_nir": "sdt_8_768.nir",
             "torch_onnx_dynamo": "sdt_8_768.torch_dynamo.onnx"}
    sizes = {k: mib(f) for k, f in files.items() if k in commands}
    t_ratio = C.ratio(med["ours_onnx"]["seconds"], med["torch_onnx"]["seconds"])
    rows = [
        ["ONNX export, wall time (s)", med["ours_onnx"]["seconds"], med["torch_onnx"]["seconds"], t_ratio,
         "<= 0.5", "yes" if t_ratio <= 0.5 else "no"],
        ["NIR export, wall time (s)", med["ours_nir"]["seconds"], med["torch_onnx"]["seconds"],
         C.ratio(med["ours_nir"]["seconds"], med["torch_onnx"]["seconds"]), "-", "-"],
    ]
    for k, label in (("ours_onnx", "ONNX"), ("ours_nir", "NIR")):
        x = med[k]["peak_rss_mib"] / ckpt_mib
        rows.append([f"{label} export, peak RSS (MiB)", med[k]["peak_rss_mib"], med["torch_onnx"]["peak_rss_mib"],
                     C.ratio(med[k]["peak_rss_mib"], med["torch_onnx"]["peak_rss_mib"]),
                     f"<= 3x checkpoint ({3 * ckpt_mib:.0f} MiB)",
                     f"{'yes' if x <= 3 else 'no'} ({x:.2f}x checkpoint)"])
    rows.append(["output file (MiB)", f"{sizes['ours_onnx']:.0f} (onnx int) / {sizes['ours_nir']:.0f} (nir)",
                 sizes["torch_onnx"], "-", "-", "-"])
    for r in rows:
        r.insert(2, "torch.onnx.export(dynamo=False)")
    if dynamo:
        d = med["torch_onnx_dynamo"]
        td = C.ratio(med["ours_onnx"]["seconds"], d["seconds"])
        rows += [
            ["ONNX export, wall time (s)", med["ours_onnx"]["seconds"], "torch.onnx.export(dynamo=True)", d["seconds"],
             td, "<= 0.5", "yes" if td <= 0.5 else "no"],
            ["NIR export, wall time (s)", med["ours_nir"]["seconds"], "torch.onnx.export(dynamo=True)", d["seconds"],
             C.ratio(med["ours_nir"]["seconds"], d["seconds"]), "-", "-"],
            ["ONNX export, peak RSS (MiB)", med["ours_onnx"]["peak_rss_mib"], "torch.onnx.export(dynamo=True)",
             d["peak_rss_mib"], C.ratio(med["ours_onnx"]["peak_rss_mib"], d["peak_rss_mib"]), "-", "-"],
            ["output file (MiB)", f"{sizes['ours_onnx']:.0f} (onnx int)", "torch.onnx.export(dynamo=True)",
             f"{sizes['torch_onnx_dynamo']:.0f} (.onnx + .onnx.data)", "-", "-", "-"],
        ]
    md = C.md_table(["figure", "ours", "baseline", "baseline value", "ours / baseline", "target", "met?"], rows)
    md += (f"\n\nCheckpoint {ckpt_mib:.0f} MiB. Interpreter + imports alone (torch, brevitas, onnx, nir, "
           f"sdt_deploy): peak RSS {base['peak_rss_mib']:.0f} MiB. Median of {a.runs} runs after a warm-up; "
           f"load average (1 min) at the runs: ours ONNX {med['ours_onnx']['load1']}, torch "
           f"{med['torch_onnx']['load1']}, ours NIR {med['ours_nir']['load1']}"
           + (f", torch dynamo=True {med['torch_onnx_dynamo']['load1']}." if dynamo else "."))
    C.save("export", {"machine": C.machine(), "versions": C.versions(), "checkpoint_mib": ckpt_mib,
                      "commands": commands, "medians": med, "runs": runs, "file_mib": sizes,
                      "baseline_peak_rss_mib": base["peak_rss_mib"]}, md)


if __name__ == "__main__":
    main()
