#!/usr/bin/env bash
# All CPU benchmarks of BENCHMARKS.md, one after another (about 25 minutes on a 2-core machine).
# Results: bench/out/*.json (everything measured) and bench/out/*.md (the tables), the sweep plot
# bench/out/engine_sweep.png. The GPU check is separate: python bench/gpu_check.py on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
date
uptime
$PY bench/bench_export.py
$PY bench/bench_inference.py
$PY bench/bench_engine.py
$PY bench/bench_verify.py
