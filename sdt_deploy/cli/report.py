"""`sdt-deploy report`: operations, firing rates and energy per layer, in the paper's convention and as
measured by the integer engine, with the ANN baseline; a table on the terminal, JSON, CSV and a plot.

The accounting is `sdt_deploy.report`; this module prepares the inputs (an array, the digits, random
images, or — through `dataset_batches` — a dataset folder), renders, and writes the outputs atomically.
The command object `report` is registered on the CLI group with `cli.add_command(report)`. It reuses
cli.py's option helpers, and cli.py imports this module to register it: to keep that cycle safe in
either import order, the click object is built on first access (module `__getattr__`), when
`sdt_deploy.cli` has defined its helpers.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Callable, Iterator, Optional

import click
import numpy as np

from sdt_deploy.report.energy import DEFAULT_TABLE, EnergyTable, load_energy_table
from sdt_deploy.errors import DeployError

# ---- inputs ----


def array_batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size]


def digits_inputs(n: int, loaded) -> np.ndarray:
    """The first n digits of the demo's fixed test split, at the model's size and channels, normalised
    with the checkpoint's mean/std; for an event model (2 channels), Poisson event frames of digits."""
    from sdt_deploy.data.digits import digit_events, digits_split

    cfg, data = loaded.config, loaded.resolved.data
    if data.events or cfg.in_channels == 2:
        return digit_events(n, cfg.time_steps, cfg.img_size, channels=cfg.in_channels)
    split = digits_split("test", img_size=cfg.img_size, channels=cfg.in_channels, mean=data.mean, std=data.std)
    if n > split.x.shape[0]:
        raise DeployError(f"--digits {n}: the digits test split has {split.x.shape[0]} images")
    return split.x[:n]


def random_images(n: int, loaded, seed: int = 0) -> np.ndarray:
    from sdt_deploy.data.synth import random_inputs

    cfg = loaded.config
    return random_inputs(cfg, n, seed=seed, events=loaded.resolved.data.events or cfg.dvs_mode)


def dataset_batches(path: str, loaded, batch_size: int) -> tuple[Iterator[np.ndarray], Optional[int]]:
    """`--data DIR`: the dataset reader is `sdt_deploy.datasets` (another module's job).

    Contract used: `open_dataset(root, model_config, data_config)` returns a dataset with `len()` and
    `batch(indices) -> (x, labels)`, x float32 [B,C,H,W] prepared with the checkpoint's evaluation
    transform (or [B,T,C,H,W] event frames). Batches are read lazily, one engine call at a time."""
    try:
        from sdt_deploy.data.datasets import open_dataset
    except ImportError:
        raise DeployError("--data: reading dataset folders is not available in this installation; "
                          "use --input X.npy, --digits N or --random N") from None
    dataset = open_dataset(path, loaded.config, loaded.resolved.data)
    n = len(dataset)

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, n, batch_size):
            x, _ = dataset.batch(list(range(start, min(n, start + batch_size))))
            yield np.asarray(x, dtype=np.float32)

    return batches(), n


# ---- the Python face ----

def run_report(loaded, batches, table: EnergyTable, samples: Optional[int] = None, source: Optional[dict] = None,
               weight_bits: int = 8, input_bits: int = 8, progress: bool = True) -> dict:
    """Quantize the model and report over `batches` (an iterable of input arrays)."""
    from sdt_deploy.api import quantize
    from sdt_deploy.report.counting import operation_report

    q = quantize(loaded, weight_bits=weight_bits, input_bits=input_bits)
    with _progress_bar(samples, enabled=progress) as advance:
        return operation_report(q.graph, batches, table, progress=advance, source=source)


class _progress_bar:
    """A rich progress bar over samples on stderr (transient; off when not wanted)."""

    def __init__(self, total: Optional[int], enabled: bool = True):
        self.total, self.enabled, self.progress = total, enabled, None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("engine"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self.progress.start()
        task = self.progress.add_task("report", total=self.total)
        return lambda n: self.progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---- rendering ----

def human(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g}{unit}"
    return f"{x:.{digits}g}"


def joules(pj: Optional[float]) -> str:
    if pj is None:
        return "-"
    if pj == 0:
        return "0"
    for unit, scale in (("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
        if abs(pj) >= scale:
            return f"{pj / scale:.3g} {unit}"
    return f"{pj:.3g} pJ"


def print_report(rep: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # piped output gets rich's 80 columns by default: too narrow for a per-layer table
    from sdt_deploy.console import console as _console

    console = console or _console()
    if not console.is_terminal and console.width < 180:
        console = Console(width=180, file=console.file)
    tot = rep["totals"]
    t = Table(title=f"operations and energy per sample (T = {tot['time_steps']}, {tot['samples']} samples, "
                    f"energy table {rep['energy_table']['name']})")
    for col, just in (("layer", "left"), ("kind", "left"), ("input", "left"), ("in rate", "right"),
                      ("FLOPs", "right"), ("paper ops", "right"), ("ACs", "right"), ("MACs", "right"),
                      ("other ops", "right"), ("E paper", "right"), ("E measured", "right")):
        t.add_column(col, justify=just, no_wrap=(col == "layer"))
    for r in rep["layers"]:
        other = sum(v for k, v in r["ops_per_sample"].items() if k not in ("ac", "mac"))
        paper = f"{human(r['paper_ops'])} {r['paper_counted_as']}" if r["paper_counted_as"] else "-"
        t.add_row(r["name"], r["kind"], "x".join(map(str, r["input_shape"])),
                  "-" if r["input_rate"] is None else f"{r['input_rate']:.4f}",
                  human(r["flops"]) if r["flops"] else "-", paper, human(r["acs_per_sample"]),
                  human(r["macs_per_sample"]), human(other), joules(r["paper_energy_pj"]), joules(r["energy_pj"]))
    m, p, a = tot["measured"], tot["paper"], tot["ann"]
    other = sum(v for k, v in m["ops_per_sample"].items() if k not in ("ac", "mac"))
    t.add_section()
    t.add_row("total", "", "", "", human(p["flops"]), f"{human(p['sops'])} SOP + {human(p['macs'])} MAC",
              human(m["acs_per_sample"]), human(m["macs_per_sample"]), human(other),
              joules(p["energy_pj"]), joules(m["energy_pj"]))
    console.print(t)
    console.print(f"[bold]energy per sample[/]  paper convention {p['energy_mj']:.4g} mJ   measured "
                  f"{m['energy_mj']:.4g} mJ   ANN baseline {a['energy_mj']:.4g} mJ"
                  + (f"   (ANN / measured = {tot['ann_over_measured']:.3g}x)" if tot["ann_over_measured"] else ""))
    if "engine" in tot:
        e = tot["engine"]
        console.print(f"[bold]measured ACs[/] {m['acs']:,} over the run = the integer engine's counter "
                      f"{e['total_acs']:,} ({'match' if e['matches'] else 'MISMATCH'}); MACs {m['macs']:,}")
    if rep["blocks"]:
        b = Table(title="SDSA vs vanilla self-attention, per block and sample")
        for col in ("block", "N x D", "vanilla MACs", "vanilla other", "E vanilla", "SDSA ops", "E SDSA",
                    "vanilla / SDSA", "(all as AC)", "E proj (ANN)", "E proj (SDT)"):
            b.add_column(col, justify="left" if col == "block" else "right")
        for blk in rep["blocks"]:
            v, s, pr = blk["vanilla"], blk["sdsa"], blk["projections"]
            b.add_row(blk["block"], f"{blk['tokens']} x {blk['dim']}", human(v["ops"]["mac"]),
                      human(sum(x for k, x in v["ops"].items() if k != "mac")), joules(v["energy_pj"]),
                      human(sum(s["ops"].values())), joules(s["energy_pj"]),
                      f"{blk['vanilla_over_sdsa']:.3g}x" if blk["vanilla_over_sdsa"] else "-",
                      f"{blk['vanilla_over_sdsa_all_as_ac']:.3g}x" if blk["vanilla_over_sdsa_all_as_ac"] else "-",
                      joules(pr["ann_energy_pj"]), joules(pr["measured_energy_pj"]))
        console.print(b)
    console.print("[bold]energy table[/] " + ", ".join(f"{k} {v:g} pJ" for k, v in rep["energy_table"]["pj"].items()))
    console.print("[bold]convention[/]")
    for section, lines in rep["convention"].items():
        for line in lines:
            console.print(f"  [dim]{section}:[/] {line}", highlight=False)


OP_COLUMNS = ("ac", "mac", "bias_add", "and", "or", "compare", "count", "add", "neuron_update")


def report_csv(rep: dict) -> str:
    """One row per layer; counts are totals over the run, energies per sample (pJ)."""
    T = rep["totals"]["time_steps"]
    header = (["name", "kind", "op", "input_from", "input_shape", "output_shape", "input_rate"]
              + [f"input_rate_t{t}" for t in range(T)] + ["output_rate", "flops"]
              + [f"ops_{k}" for k in OP_COLUMNS]
              + ["acs_per_sample", "macs_per_sample", "energy_pj", "paper_counted_as", "paper_ops",
                 "paper_energy_pj", "ann_macs", "ann_energy_pj"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rep["layers"]:
        steps = r["input_rate_per_step"] or [None] * T
        w.writerow([r["name"], r["kind"], r["op"], r["input_from"] or "", "x".join(map(str, r["input_shape"])),
                    "x".join(map(str, r["output_shape"])), _cell(r["input_rate"])]
                   + [_cell(v) for v in steps] + [_cell(r["output_rate"]), r["flops"]]
                   + [r["ops"].get(k, 0) for k in OP_COLUMNS]
                   + [_cell(r["acs_per_sample"]), _cell(r["macs_per_sample"]), _cell(r["energy_pj"]),
                      r["paper_counted_as"] or "", _cell(r["paper_ops"]), _cell(r["paper_energy_pj"]),
                      r["ann_ops"].get("mac", 0), _cell(r["ann_energy_pj"])])
    return buf.getvalue()


def _cell(v) -> str:
    return "" if v is None else repr(float(v))


def plot_report(rep: dict, path: str) -> None:
    """Per-layer input firing rate (mean and per step) and energy (measured, paper), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sdt_deploy.files.atomic import atomic_write

    layers = rep["layers"]
    names = [r["name"] for r in layers]
    x = np.arange(len(layers))
    fig, (ax_rate, ax_energy) = plt.subplots(2, 1, sharex=True, figsize=(max(8.0, 0.22 * len(layers) + 2), 8))
    rate = np.array([np.nan if r["input_rate"] is None else r["input_rate"] for r in layers])
    ax_rate.bar(x, np.nan_to_num(rate), color="tab:blue", label="mean over steps")
    T = rep["totals"]["time_steps"]
    for t in range(T):
        steps = np.array([np.nan if r["input_rate_per_step"] is None else r["input_rate_per_step"][t] for r in layers])
        ax_rate.plot(x, steps, ".", ms=3, alpha=0.7, label=f"t = {t}" if T <= 8 else None)
    out_rate = np.array([r["output_rate"] if r["kind"] == "neuron update" else np.nan for r in layers])
    ax_rate.plot(x, out_rate, "kx", ms=4, label="LIF output rate")
    ax_rate.set_ylabel("input firing rate")
    ax_rate.legend(fontsize=6, ncol=min(T + 1, 9))
    measured = np.array([r["energy_pj"] for r in layers])
    paper = np.array([r["paper_energy_pj"] for r in layers])
    ax_energy.bar(x - 0.2, measured, width=0.4, label="measured", color="tab:orange")
    ax_energy.bar(x + 0.2, paper, width=0.4, label="paper convention", color="tab:green")
    ax_energy.set_yscale("symlog", linthresh=1.0)
    ax_energy.set_ylabel(f"energy per sample (pJ, {rep['energy_table']['name']})")
    ax_energy.legend(fontsize=7)
    ax_energy.set_xticks(x)
    ax_energy.set_xticklabels(names, rotation=90, fontsize=6)
    tot = rep["totals"]
    fig.suptitle(f"T = {T}, {tot['samples']} samples: measured {tot['measured']['energy_mj']:.3g} mJ, "
                 f"paper {tot['paper']['energy_mj']:.3g} mJ, ANN {tot['ann']['energy_mj']:.3g} mJ per sample",
                 fontsize=9)
    fig.tight_layout()
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def report_json(rep: dict) -> str:
    from sdt_deploy.ir.graph import json_default

    return json.dumps(rep, indent=2, default=json_default)


def write_outputs(rep: dict, json_path: Optional[str], csv_path: Optional[str], plot_path: Optional[str]) -> None:
    from sdt_deploy.files.atomic import write_text

    if json_path:
        write_text(json_path, report_json(rep))
    if csv_path:
        write_text(csv_path, report_csv(rep))
    if plot_path:
        plot_report(rep, plot_path)


def check_outputs(paths: dict, force: bool) -> None:
    """Refuse existing (without --force), unwritable or clashing outputs before any work is done."""
    from sdt_deploy.files.atomic import check_output_path

    given = {k: v for k, v in paths.items() if v}
    seen: dict = {}
    for opt, p in given.items():
        full = check_output_path(p, force)
        if full in seen:
            raise DeployError(f"{seen[full]} and {opt} name the same file {p!r}")
        seen[full] = opt


# ---- the command ----

def _load_model(ckpt: Optional[str], kw: dict):
    from sdt_deploy.cli.app import _load

    return _load(ckpt, kw)


def report_command(ckpt, input_path=None, digits=None, random_n=None, data_dir=None, seed=0,
                   energy=DEFAULT_TABLE, json_path=None, csv_path=None, plot_path=None, force=False,
                   batch_size=8, weight_bits=8, input_bits=8, quiet=False, no_progress=False, **kw) -> dict:
    """What `sdt-deploy report` does; `kw` holds the model options of `cli._model_options`."""
    sources = {"--input": input_path, "--digits": digits, "--random": random_n, "--data": data_dir}
    chosen = [k for k, v in sources.items() if v is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one input: --input X.npy, --digits N, --random N or --data DIR"
                               + (f" (got {', '.join(chosen)})" if chosen else ""))
    check_outputs({"--json": json_path, "--csv": csv_path, "--plot": plot_path}, force)
    table = load_energy_table(energy)
    raw = None
    if input_path:
        from sdt_deploy.files.arrays import load_array

        raw = load_array(input_path)           # a missing or broken file fails before the model loads
    loaded = _load_model(ckpt, kw)
    cfg = loaded.config
    samples: Optional[int] = None
    if data_dir:
        batches, samples = dataset_batches(data_dir, loaded, batch_size)
        source = {"source": "data", "path": data_dir}
    else:
        if raw is not None:
            from sdt_deploy.files.arrays import check_input

            x = check_input(raw, cfg, name=f"input {input_path!r}")
            source = {"source": "input", "path": input_path}
        elif digits is not None:
            x = digits_inputs(digits, loaded)
            source = {"source": "digits", "split": "test", "first": digits}
        else:
            x = random_images(random_n, loaded, seed)
            source = {"source": "random", "seed": seed}
        samples = int(x.shape[0])
        batches = array_batches(x, batch_size)
    rep = run_report(loaded, batches, table, samples=samples, source=source, weight_bits=weight_bits,
                     input_bits=input_bits, progress=not no_progress)
    write_outputs(rep, json_path, csv_path, plot_path)
    if not quiet:
        print_report(rep)
    for opt, p in (("json", json_path), ("csv", csv_path), ("plot", plot_path)):
        if p:
            click.echo(f"wrote {p} ({opt})", err=True)
    return rep


def _build_report_command() -> click.Command:
    from sdt_deploy.cli import app as _cli   # here, not at import: cli.py imports this module to register `report`

    if "report" in globals():   # cli.py took `report` while the import above ran: one object only
        return globals()["report"]

    @click.command("report")
    @click.argument("ckpt", required=False)
    @_cli._model_options
    @click.option("--input", "input_path", type=click.Path(dir_okay=False),
                  help="[B,C,H,W] images or [B,T,C,H,W] event frames (.npy)")
    @click.option("--digits", type=click.IntRange(min=1), metavar="N",
                  help="the first N digits of the demo's test split, at the model's size and channels")
    @click.option("--random", "random_n", type=click.IntRange(min=1), metavar="N", help="N random inputs (synth)")
    @click.option("--data", "data_dir", type=click.Path(file_okay=False), metavar="DIR",
                  help="a dataset folder (ImageFolder, original CIFAR/ImageNet layouts), evaluation transform")
    @click.option("--seed", type=int, default=0, show_default=True, help="seed of --random")
    @click.option("--energy", default=DEFAULT_TABLE, show_default=True, metavar="45nm-fp32|45nm-int8|FILE",
                  help="energy table: built-in, or a JSON/YAML file {name, base, pj: {op: pJ}}")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the report as JSON")
    @click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="write the per-layer rows as CSV")
    @click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write firing rates and energy (PNG)")
    @click.option("--force", is_flag=True, help="overwrite existing output files")
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                  help="samples per engine call (the engine holds a batch's currents as int64 and its spikes)")
    @click.option("--weight-bits", type=int, default=8, show_default=True)
    @click.option("--input-bits", type=int, default=8, show_default=True)
    @click.option("--quiet", is_flag=True, help="no table on the terminal")
    @click.option("--no-progress", is_flag=True, help="no progress bar")
    def report(**options):
        """Operations, firing rates and energy per layer: the paper's convention, what the integer engine
        measured, and the ANN baseline (give one of --input, --digits, --random, --data)."""
        report_command(**options)

    return report


def __getattr__(name: str):
    if name == "report":
        command = _build_report_command()
        globals()["report"] = command
        return command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
