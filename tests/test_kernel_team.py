"""The C kernels' team of threads (sdt_deploy/run/_engine_kernels.c, `team_run`): how a split is handed out,
not what it computes (tests/test_engine_kernels.py checks every kernel, split and not, against the previous
engine). Two Python threads using the team at once, a fork after the team started, and workers that
sleep between rounds (SDT_ENGINE_SPIN_US=0) must all give the integers one thread gives, and never hang:
the subprocesses run under a timeout."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from sdt_deploy.run import engine_kernels

import engine_reference as REF
from conftest import ROOT

pytestmark = pytest.mark.skipif(not engine_kernels.compiled_kernels(), reason="the C kernels were not built")


def _cases(seed: int, n: int = 6) -> list:
    """Spike tensors and packed weights of a few shapes, each with the previous engine's convolution."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        N, C, O, size = 1 + i % 3, 8 + 7 * i, (32, 40, 64, 100, 256, 300)[i], 4 + i
        S = (rng.random((N, C, size, size)) < 0.3).astype(np.uint8)
        w = rng.integers(-127, 128, size=(O, C, 3, 3)).astype(np.int8)
        ref, adds = REF.synaptic_conv(S, w, 1)
        out.append((S, engine_kernels.event_weights(w), ref, adds // O))
    return out


def _same(S, packed, ref, pairs, parts) -> bool:
    Y, got_pairs, peak = engine_kernels.conv_events(S, packed, 1, parts)
    N, _, H, W = S.shape
    got = Y.reshape(N, H, W, -1).transpose(0, 3, 1, 2)
    return bool(np.array_equal(got, ref)) and got_pairs == pairs and peak == int(np.abs(ref).max(initial=0))


def test_two_python_threads_share_the_team():
    """One caller at a time holds the team; the other runs its parts itself. Either way, the same integers."""
    cases = [_cases(1), _cases(2)]
    failures = []

    def caller(mine):
        for round_ in range(60):
            for S, packed, ref, pairs in mine:
                if not _same(S, packed, ref, pairs, 2 + round_ % 3):
                    failures.append(round_)

    threads = [threading.Thread(target=caller, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert failures == []


_FORK_AFTER_THE_TEAM_STARTED = """
import os, sys
import numpy as np
sys.path.insert(0, "tests")
import test_kernel_team as T
cases = T._cases(3)
assert all(T._same(*c, parts=2) for c in cases)          # the team's workers now exist
pid = os.fork()
if pid == 0:                                             # the child: no workers; the team starts anew
    ok = all(T._same(*c, parts=parts) for c in cases for parts in (2, 3, 2))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
assert all(T._same(*c, parts=2) for c in cases)          # and the parent's team still works
print("ok")
"""


def test_a_forked_child_starts_its_own_team():
    proc = subprocess.run([sys.executable, "-c", _FORK_AFTER_THE_TEAM_STARTED], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


_ROUNDS_WITH_PAUSES = """
import sys, time
import numpy as np
sys.path.insert(0, "tests")
import test_kernel_team as T
cases = T._cases(4)
for round_ in range(200):
    for c in cases:
        assert T._same(*c, parts=2 + round_ % 2), round_
    if round_ % 3 == 0:
        time.sleep(0.002)                                # past the spin: the workers go to sleep
print("ok")
"""


@pytest.mark.parametrize("spin_us", ["0", "50"])
def test_sleeping_workers_are_woken_for_every_round(spin_us):
    """With no spin every round has to wake the workers from their condition variable (the hand-shake a
    lost wake-up would hang); with a short one, some rounds find them spinning and some asleep."""
    env = dict(os.environ, SDT_ENGINE_SPIN_US=spin_us)
    proc = subprocess.run([sys.executable, "-c", _ROUNDS_WITH_PAUSES], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT), env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_more_parts_than_work():
    """Parts beyond the output rows, the samples or the neurons get empty ranges (and add nothing)."""
    S = np.zeros((1, 3, 1, 1), np.uint8)
    S[0, 1] = 1
    w = np.arange(-6, 6, dtype=np.int8).reshape(4, 3, 1, 1)
    Y, pairs, peak = engine_kernels.conv_events(S, engine_kernels.event_weights(w), 0, 8)
    assert Y.tolist() == [[-5, -2, 1, 4]] and pairs == 1 and peak == 5      # w[:, 1] by hand
    X = np.array([[[3, -9]], [[4, 0]]], np.int32)                          # T 2, B 1, two neurons
    r = engine_kernels.lif_steps(X, np.array([2, 2]), 2, 8)
    # neuron 0: H = 3 >> 1 = 1, no spike, V 1; H = (1 + 4) >> 1 = 2, spike. Neuron 1: H = -5, then -3
    assert r.spikes[:, 0].tolist() == [[0, 0], [1, 0]] and r.peak_h == 5 and r.peak_x == 9 and r.count == 1
    assert engine_kernels.abs_max(np.array([1, -7, 3], np.int32), 8) == 7


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_a_split_comparison_finds_one_differing_byte_anywhere(parts):
    """`same_array` of a large array splits its bytes over the team (the engine's check of the graph's
    weights for changes in place): a single changed byte in any part's range is found."""
    a = np.random.default_rng(parts).integers(-128, 128, size=(3, 100_003), dtype=np.int8)
    assert a.nbytes >= engine_kernels.SPLIT_COMPARE_BYTES
    assert engine_kernels.same_array(a, a.copy(), parts)
    for at in (0, 1, a.size // 3, a.size // 2, a.size - 2, a.size - 1):
        b = a.copy()
        b.reshape(-1)[at] ^= 1
        assert not engine_kernels.same_array(a, b, parts), at
    assert not engine_kernels.same_array(a, a[:, :-1].copy(), parts)      # another shape


_PARTS_CHANGING_EVERY_ROUND = """
import sys
import numpy as np
from sdt_deploy.run import engine_kernels as K
rng = np.random.default_rng(6)
a = rng.integers(-2 ** 30, 2 ** 30, size=4_000).astype(np.int64)
want = int(np.abs(a).max())
for i in range(5_000):
    # rounds of 8 parts (7 workers) and of 2 (6 of them idle) in turn: an idle worker must not take the
    # next round's parts with this round's number (it would run the next round twice, and the caller
    # would return before every part was done)
    parts = 8 if i % 2 else 2
    b = a.copy()
    b[(i * 7919) % a.size] = want + 1 + i % 5
    assert K.abs_max(b, parts) == want + 1 + i % 5, i
print("ok")
"""


def test_rounds_with_fewer_parts_than_workers():
    proc = subprocess.run([sys.executable, "-c", _PARTS_CHANGING_EVERY_ROUND], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
