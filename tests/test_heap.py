"""What `sdt_deploy.heap` asks of glibc's malloc, observed from outside: the process's resident memory
(/proc/self/statm) before and after a 64 MiB array is freed, in a fresh interpreter each (the settings
are process-wide). No timing here."""
import json
import os
import subprocess
import sys

import pytest

from sdt_deploy.heap import release_freed_memory, user_set_thresholds
from sdt_deploy.run.memory import BatchPlan, Budget
from sdt_deploy.verification.verifier import small_against_budget, trim_above

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
                           reason="glibc only")

PROBE = """
import json, sys
import numpy as np
from sdt_deploy.heap import keep_large_blocks_in_heap, release_freed_memory, resident_bytes
kept = keep_large_blocks_in_heap() if sys.argv[1] == "keep" else None
a = np.ones(64 * 2 ** 20, np.uint8)          # 64 MiB, every page touched
with_block = resident_bytes()
del a
after_free = resident_bytes()
skipped = release_freed_memory(above=2 ** 50)
after_skip = resident_bytes()
trimmed = release_freed_memory()
after_trim = resident_bytes()
print(json.dumps(dict(kept=kept, freed=with_block - after_free, skipped=skipped, after_skip=with_block - after_skip,
                      trimmed=trimmed, after_trim=with_block - after_trim)))
"""
MIB = 2 ** 20


def probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    return json.loads(out.stdout)


@glibc
def test_by_default_a_freed_large_block_goes_straight_back():
    r = probe("default", MALLOC_MMAP_THRESHOLD_=None, MALLOC_TRIM_THRESHOLD_=None)
    assert r["freed"] > 60 * MIB


@glibc
def test_kept_large_blocks_stay_until_trimmed_and_a_trim_waits_for_its_threshold():
    r = probe("keep", MALLOC_MMAP_THRESHOLD_=None, MALLOC_TRIM_THRESHOLD_=None)
    assert r["kept"] is True
    assert r["freed"] < 8 * MIB                         # still resident: the next tensor reuses its pages
    assert r["skipped"] is False and r["after_skip"] < 8 * MIB   # under the threshold nothing is handed back
    assert r["trimmed"] is True and r["after_trim"] > 60 * MIB


@glibc
@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_the_users_own_thresholds_are_kept(variable):
    r = probe("keep", **{**{"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": None}, variable: "131072"})
    assert r["kept"] is False and r["freed"] > 60 * MIB


def test_the_users_thresholds_are_read_from_either_variable():
    assert not user_set_thresholds({})
    assert user_set_thresholds({"MALLOC_MMAP_THRESHOLD_": "4096"})
    assert user_set_thresholds({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=9"})
    assert user_set_thresholds({"MALLOC_TRIM_THRESHOLD_": "4096"})
    assert user_set_thresholds({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=9"})
    assert not user_set_thresholds({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


def test_a_trim_above_the_resident_memory_does_nothing():
    assert release_freed_memory(above=2 ** 60) is False


def test_each_process_trims_above_half_its_share_of_the_budget():
    plan = BatchPlan(16, 2, Budget(8 * 2 ** 30, "8G"), 0, 0, None)
    assert trim_above(plan, 2) == 2 * 2 ** 30
    assert trim_above(plan, 1) == 4 * 2 ** 30


def test_only_a_run_small_against_the_budget_keeps_its_heap():
    GiB = 2 ** 30
    large = BatchPlan(4, 1, Budget(int(7.5 * GiB), "7.5G"), 3 * GiB, int(1.1 * GiB), None)   # SDT-8-768 at 224
    small = BatchPlan(16, 1, Budget(int(7.5 * GiB), "7.5G"), 50 * 2 ** 20, 40 * 2 ** 20, None)  # CIFAR 2-256
    assert not small_against_budget(large) and small_against_budget(small)
    assert small_against_budget(BatchPlan(16, 2, Budget(2 * GiB, "2G"), 0, 2 ** 20, None))
    assert not small_against_budget(BatchPlan(16, 2, Budget(2 * GiB, "2G"), 0, 2 ** 26, None))
