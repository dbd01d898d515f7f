"""Files a colleague can read, errors a user can act on (issue 16, points 2 and 3).

- every output honours the umask (0666 less it, what `open()` gives), not the temporary file's 0600;
- an unwritable destination (/proc, a read-only file system, a full disk) is one line naming the path and
  the operating system's reason, exit 2, and nothing is left behind;
- a file of another format given as a checkpoint is named (ONNX, NIR/HDF5, .npy/.npz, safetensors, zip,
  TorchScript), and no message ever passes on torch's advice to load with weights_only=False.

Each test was run against the code before this change and failed there (0600 files; `internal error:
FileNotFoundError ...` and exit 3 for /proc; torch's "Weights only load failed ... `weights_only` set to
`False`" for ONNX, NIR, HDF5, .npy, TorchScript and pickles of protocols 0, 4, 5; no name for .npz, zip, safetensors).
"""
import errno
import io
import json
import os
import pickle
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch

from sdt_deploy.cli.app import main
from sdt_deploy.files import atomic

from conftest import ROOT, case_input, oracle_path

CASE = "lif_0011"
TEMP_PREFIX = ".sdt-deploy-"      # the temporary files' names (sdt_deploy.files.atomic)
ADVICE = ("weights_only=False", "`weights_only` set to `False`", "Weights only load failed", "Re-running",
          "In PyTorch 2.6", "trusted source", "add_safe_globals")


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and "internal error" not in err[0], err[0]
    return err[0]


def _no_advice(line: str) -> None:
    for words in ADVICE:
        assert words not in line, (words, line)


def _temporaries(d) -> list:
    return [n for n in os.listdir(d) if n.startswith(TEMP_PREFIX)]


def _input(d) -> str:
    p = os.path.join(d, "x.npy")
    np.save(p, case_input(CASE))
    return p


@pytest.fixture
def umask():
    """Set the process's umask for one test; the previous one is restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# ---- 2. files a colleague can read ---------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_every_output_honours_the_umask(tmp_path, umask, capsys, mask):
    """Before: every file 0600 whatever the umask (mkstemp's mode survived the rename)."""
    x = _input(tmp_path)           # written by numpy itself, before the umask is set
    out = tmp_path / "out"
    out.mkdir()
    umask(mask)
    ck = oracle_path(CASE)
    for argv in (["export", ck, "--target", "nir", "-o", str(out / "m.nir")],             # .nir, stem, manifest
                 ["export", ck, "--target", "onnx", "-o", str(out / "m.onnx")],
                 ["quantize", ck, "-o", str(out / "q.pth")],
                 ["run", ck, "--input", x, "--dump", str(out / "d.npz")],
                 ["report", ck, "--random", "1", "--save-json", str(out / "r.json"), "--save-csv", str(out / "r.csv"),
                  "--save-plot", str(out / "r.png")]):
        assert main(argv) == 0, capsys.readouterr().err
    names = sorted(os.listdir(out))
    assert names == ["d.npz", "m.manifest.json", "m.nir", "m.onnx", "m.stem.onnx", "q.pth", "r.csv", "r.json",
                     "r.png"]
    modes = {n: oct(stat.S_IMODE(os.stat(out / n).st_mode)) for n in names}
    assert modes == {n: oct(0o666 & ~mask) for n in names}


def test_umask_is_read_without_changing_it(umask, monkeypatch):
    umask(0o027)
    assert atomic.current_umask() == 0o027 and atomic.file_mode() == 0o640
    real_open = open

    def no_proc(path, *a, **k):     # a system without /proc/self/status: the set-and-restore fallback
        if str(path) == "/proc/self/status":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", no_proc)
    assert atomic.current_umask() == 0o027
    monkeypatch.undo()
    assert os.umask(0o027) == 0o027          # left as it was


def test_demo_folder_is_ignored_by_git():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "sdt-deploy-demo/" in lines
    if shutil.which("git") and (ROOT / ".git").exists():
        r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "sdt-deploy-demo/report.json"])
        assert r.returncode == 0


# ---- 3a. unwritable destinations -----------------------------------------------------------------------

def _outputs_under(d: str, x: str) -> list:
    ck = oracle_path(CASE)
    return [(["export", ck, "--target", "onnx", "-o", f"{d}/m.onnx"], f"{d}/m.onnx"),
            (["export", oracle_path("plif_dvs_0000"), "--target", "nir", "-o", f"{d}/m.nir"], f"{d}/m.nir"),
            (["quantize", ck, "-o", f"{d}/q.pth"], f"{d}/q.pth"),
            (["run", ck, "--input", x, "--dump", f"{d}/d.npz"], f"{d}/d.npz"),
            (["report", ck, "--random", "1", "--save-json", f"{d}/r.json"], f"{d}/r.json")]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc on this system")
def test_a_destination_under_proc_is_one_line_naming_it(tmp_path, capsys):
    """Before (as root): `internal error: FileNotFoundError: ... '/proc/.sdt-deploy-....partial'`, exit 3."""
    x = _input(tmp_path)
    for argv, path in _outputs_under("/proc", x):
        assert main(argv) == 2, argv
        line = _err_line(capsys)
        assert f"cannot write {path!r}" in line and os.strerror(errno.ENOENT) in line, line
        assert not os.path.exists(path)


def test_a_read_only_directory_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """A read-only file system refuses even root (a chmod 0o555 directory does not): the directory's
    refusal is simulated where a file is created in it, for every command that writes. Before: the
    directory looked writable, the write failed later with `internal error: OSError`, exit 3."""
    ro = tmp_path / "ro"
    ro.mkdir()
    x = _input(tmp_path)
    real_mkstemp = atomic.tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if dir is not None and os.path.abspath(dir) == str(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, ".sdt-deploy-x"))
        return real_mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    for argv, path in _outputs_under(str(ro), x):
        assert main(argv) == 2, argv
        line = _err_line(capsys)
        assert f"cannot write {path!r}" in line and "Read-only file system" in line, line
        assert ".sdt-deploy-x" not in line            # the temporary name is no business of the user's
    assert os.listdir(ro) == []


def test_disk_full_while_writing_leaves_nothing(tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of a write (part of the file written) and at the rename: one line, exit 2, no
    temporary file, and an existing file overwritten with --force is left as it was. Before: `internal
    error: OSError: [Errno 28] ...`, exit 3."""
    real_open = open

    def full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and os.path.basename(str(path)).startswith(TEMP_PREFIX):
            f.write(b"partial")
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return f

    out = tmp_path / "m.onnx"
    monkeypatch.setattr("builtins.open", full_disk)
    code = main(["export", oracle_path(CASE), "--target", "onnx", "-o", str(out)])
    monkeypatch.undo()
    assert code == 2
    line = _err_line(capsys)
    assert line == f"sdt-deploy: error: cannot write {str(out)!r}: No space left on device"
    assert os.listdir(tmp_path) == []

    x = _input(tmp_path)
    real_replace = os.replace

    def full_at_rename(src, dst, *a, **k):
        if os.path.basename(str(src)).startswith(TEMP_PREFIX):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), src, dst)
        return real_replace(src, dst, *a, **k)

    d = tmp_path / "d"
    d.mkdir()
    for argv, path in _outputs_under(str(d), x):
        with open(path, "wb") as f:
            f.write(b"keep me")
        monkeypatch.setattr(os, "replace", full_at_rename)
        code = main([*argv, "--force"])
        monkeypatch.undo()
        assert code == 2, argv
        line = _err_line(capsys)
        assert line.endswith(f"cannot write {path!r}: No space left on device"), line
        assert open(path, "rb").read() == b"keep me"
    assert _temporaries(d) == []


class _DiskOfSize:
    """An unbuffered binary file on a disk with `room` bytes left: writes past it fail with ENOSPC."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if self.f.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_in_the_middle_of_a_nir_file(tmp_path, capsys, monkeypatch):
    """HDF5 meeting ENOSPC part-way through a .nir file (here after 300 KB of the demo's 2.6 MB; the
    stem's 111 KB fit): one line, exit 2, and neither the .nir, its temporary file nor the partition's stem
    left. Before: a segmentation fault inside h5py's clean-up (exit 139) with both files left behind.
    tests/test_files.py::test_a_real_full_disk_and_read_only_file_system does it on a real tmpfs."""
    real_open = open

    def small_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and str(path).endswith(".partial.nir"):
            return _DiskOfSize(f, 300_000)
        return f

    monkeypatch.setattr("builtins.open", small_disk)
    code = main(["export", "--target", "nir", "-o", str(tmp_path / "demo.nir")])
    monkeypatch.undo()
    assert code == 2
    out = str(tmp_path / "demo.nir")
    assert _err_line(capsys) == f"sdt-deploy: error: cannot write {out!r}: No space left on device"
    assert os.listdir(tmp_path) == []


def _private_mount_namespace() -> list:
    """The unshare command that gives a process its own mounts (root, or an unprivileged user namespace),
    or [] where the system allows neither."""
    if not shutil.which("unshare") or not shutil.which("mount"):
        return []
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]):
        r = subprocess.run([*cmd, "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt 2>/dev/null || "
                            "mount -t tmpfs -o size=16k tmpfs /tmp"], capture_output=True)
        if r.returncode == 0:
            return cmd
    return []


@pytest.mark.slow
def test_a_real_full_disk_and_read_only_file_system(tmp_path):
    """The real thing, in a private mount namespace: a 32 KiB tmpfs (the ONNX file is 60 KB), a 512 KiB one
    for a partitioned NIR export, then the first remounted read-only. Skipped where mounts are not allowed.
    Before: `internal error: OSError: [Errno 28]`, exit 3, and `output directory ... is not writable`
    without a reason."""
    cmd = _private_mount_namespace()
    if not cmd:
        pytest.skip("no private mount namespace here (needs root or unprivileged user namespaces)")
    d, d2 = tmp_path / "small", tmp_path / "half"
    d.mkdir()
    d2.mkdir()
    out = d / "m.onnx"
    script = textwrap.dedent(f"""
        mount -t tmpfs -o size=32k tmpfs {d} || exit 99
        {sys.executable} -m sdt_deploy export {oracle_path(CASE)} --target onnx -o {out} 2>{tmp_path}/full.err
        echo $? > {tmp_path}/full.rc; ls -A {d} > {tmp_path}/full.ls
        mount -t tmpfs -o size=512k tmpfs {d2} || exit 97
        {sys.executable} -m sdt_deploy export --target nir -o {d2}/demo.nir 2>{tmp_path}/nir.err
        echo $? > {tmp_path}/nir.rc; ls -A {d2} > {tmp_path}/nir.ls
        mount -o remount,ro {d} || exit 98
        {sys.executable} -m sdt_deploy export {oracle_path(CASE)} --target onnx -o {out} 2>{tmp_path}/ro.err
        echo $? > {tmp_path}/ro.rc
    """)
    r = subprocess.run([*cmd, "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for case, reason in (("full", "No space left on device"), ("ro", "Read-only file system")):
        err = (tmp_path / f"{case}.err").read_text()
        assert (tmp_path / f"{case}.rc").read_text().strip() == "2", err
        assert err.count("\n") == 1 and f"cannot write {str(out)!r}" in err and reason in err, err
    assert (tmp_path / "full.ls").read_text() == ""            # no partial file, no temporary file
    # NIR (HDF5) of the demo, partitioned: its 111 KB stem fits, the 2.6 MB .nir does not. Before: a
    # segmentation fault inside h5py's clean-up (exit 139), a partial file and the stem left behind.
    err = (tmp_path / "nir.err").read_text()
    assert (tmp_path / "nir.rc").read_text().strip() == "2", err
    assert err.count("\n") == 1 and f"cannot write {str(d2 / 'demo.nir')!r}: No space left on device" in err, err
    assert (tmp_path / "nir.ls").read_text() == ""              # neither the .nir, its temporary, nor the stem


# ---- 3b. other formats given as a checkpoint -----------------------------------------------------------

def _safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "__metadata__": {"format": "pt"}}).encode()
    return struct.pack("<Q", len(header)) + header + np.zeros(2, np.float32).tobytes()


@pytest.fixture(scope="module")
def foreign_files(tmp_path_factory):
    import h5py

    d = tmp_path_factory.mktemp("foreign")
    ck = oracle_path(CASE)
    files = {}
    files["onnx"] = str(d / "m.onnx")            # this project's own exports
    assert main(["export", ck, "--target", "onnx", "-o", files["onnx"]]) == 0
    files["nir"] = str(d / "m.nir")
    assert main(["export", oracle_path("plif_dvs_0000"), "--target", "nir", "-o", files["nir"]]) == 0
    files["hdf5"] = str(d / "weights.h5")
    with h5py.File(files["hdf5"], "w") as h:
        h["dense/kernel"] = np.zeros((2, 2), np.float32)
    files["npz"] = str(d / "spikes.npz")
    np.savez(files["npz"], logits=np.zeros(3), spikes=np.zeros(4))
    files["npy"] = str(d / "x.npy")
    np.save(files["npy"], np.zeros(3))
    files["safetensors"] = str(d / "model.safetensors")
    (d / "model.safetensors").write_bytes(_safetensors_bytes())
    files["zip"] = str(d / "bundle.zip")
    with zipfile.ZipFile(files["zip"], "w") as z:
        z.writestr("readme.txt", "not weights")
    files["torchscript"] = str(d / "scripted.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), files["torchscript"])
    return files


FOREIGN_WORDS = {"onnx": "an ONNX model (ir_version", "nir": "a NIR graph (HDF5)", "hdf5": "an HDF5 file",
                 "npz": "a NumPy .npz archive (2 arrays: logits, spikes)", "npy": "a NumPy .npy array",
                 "safetensors": "a safetensors file (1 tensor)", "zip": "a zip archive without a PyTorch",
                 "torchscript": "a TorchScript archive"}


@pytest.mark.parametrize("kind", sorted(FOREIGN_WORDS))
def test_a_file_of_another_format_is_named(tmp_path, capsys, foreign_files, kind):
    path = foreign_files[kind]
    out = tmp_path / "d.npz"
    assert main(["run", path, "--input", _input(tmp_path), "--dump", str(out)]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"sdt-deploy: error: checkpoint {path!r}: {FOREIGN_WORDS[kind]}"), line
    _no_advice(line)
    assert not out.exists() and _temporaries(tmp_path) == []


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5, "torch.save"])
def test_a_pickled_global_is_named_and_torch_advice_never_shown(tmp_path, capsys, protocol):
    """A pickle asking for os.system, in every pickle protocol and as torch.save writes it. Before: for
    protocols 0, 4 and 5 torch's unpickler stops at an opcode it does not read, and its message, the
    advice to load with weights_only=False, was passed on without the global's name."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.zeros(1)}, "extra": _System(marker)}
    if protocol == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps({"extra": _System(marker)}, protocol=protocol))
    out = tmp_path / "d.npz"
    assert main(["run", str(evil), "--input", _input(tmp_path), "--dump", str(out)]) == 2
    line = _err_line(capsys)
    assert f"refused, it asks for the pickled global {os.system.__module__}.system" in line, line
    _no_advice(line)
    assert not marker.exists() and not out.exists()


def _torch_messages() -> dict:
    """torch.load's messages in each of the shapes its weights-only failures take (torch/serialization.py)."""
    unsafe = getattr(torch.serialization, "UNSAFE_MESSAGE", "In PyTorch 2.6, we changed the default value of "
                     "the `weights_only` argument in `torch.load` from `False` to `True`. Re-running "
                     "`torch.load` with `weights_only` set to `False` will likely succeed")
    docs = ("\n\nCheck the documentation of torch.load to learn more about types accepted by default with "
            "weights_only https://pytorch.org/docs/stable/generated/torch.load.html.")
    return {
        "import": (pickle.UnpicklingError(f"Weights only load failed. numpy.foo must be imported to load\n "
                                          f"{unsafe}\n{docs}"), "numpy.foo must be imported to load"),
        "torchscript": (RuntimeError("Cannot use ``weights_only=True`` with TorchScript archives passed to "
                                     "``torch.load``. " + unsafe), "TorchScript archives"),
        "legacy tar": (RuntimeError("Cannot use ``weights_only=True`` with files saved in the legacy .tar "
                                    "format. " + unsafe), "legacy .tar format"),
        "opcode": (pickle.UnpicklingError(f"Weights only load failed. {unsafe}\nPlease file an issue with the "
                                          "following so that we can make `weights_only=True` compatible with "
                                          f"your use case: WeightsUnpickler error: \n\nUnsupported operand 81"
                                          f"{docs}"), "Unsupported operand 81"),
    }


@pytest.mark.parametrize("shape", sorted(_torch_messages()))
def test_torch_messages_are_cut_before_the_unsafe_advice(tmp_path, capsys, monkeypatch, shape):
    exc, words = _torch_messages()[shape]

    def failing_load(*a, **k):
        raise exc

    monkeypatch.setattr(torch, "load", failing_load)
    assert main(["inspect", oracle_path(CASE)]) == 2
    line = _err_line(capsys)
    assert words in line, line
    _no_advice(line)


def test_an_unexpected_error_never_shows_the_advice_either(capsys, monkeypatch):
    """The command line's last line of defence: an exception no module wrapped, carrying torch's text."""
    unsafe = _torch_messages()["torchscript"][0]

    def failing(*a, **k):
        raise unsafe

    monkeypatch.setattr("sdt_deploy.files.checkpoint.read_file", failing)
    assert main(["inspect", oracle_path(CASE)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: RuntimeError: Cannot use" in err[0], err
    _no_advice(err[0])


def test_checkpoints_are_still_read(tmp_path):
    """The format check lets every torch file through: the zip archive, and the legacy format before 1.6."""
    from sdt_deploy.files.checkpoint import read_file

    sd = {"w": torch.arange(3.0)}
    legacy = tmp_path / "legacy.pth"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    buf = io.BytesIO()
    torch.save(sd, buf)
    (tmp_path / "zip.pth").write_bytes(buf.getvalue())
    for p in (legacy, tmp_path / "zip.pth"):
        assert torch.equal(read_file(str(p))["w"], sd["w"])
    assert read_file(oracle_path(CASE))["state_dict"]
