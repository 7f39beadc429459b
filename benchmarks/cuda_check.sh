#!/usr/bin/env bash
# The GPU checks in one call (a lent device machine's time is short): CUDA tests, the threshold
# methods side by side, eager l21 taken apart, linf1's Triton kernel against ATen's eager path and
# torch.compile (with its cold-start compile time), the benchmark table on the GPU (4096^2 eager +
# compiled, 16384^2 eager), the whole suite under that machine's torch. Each stage has its own
# time limit; logs go to $OUT (or ./gpu-out).
# SKIP_SUITE=1 leaves the whole-suite stage out (it needs pytest-xdist and ~90 s); SKIP_BIG=1 the 16384^2 table.
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"
stage() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1; echo "== $name rc=$? ($SECONDS s)"; tail -n "${TAILN:-5}" "$OUT/$name.txt"; }
TAILN=25 stage cuda_tests 150 $PY -m pytest -q -p no:cacheprovider --tb=short tests/test_cuda.py "tests/test_contract.py::test_cuda_keeps_device_and_matches_cpu"
TAILN=80 stage variants 180 $PY -m benchmarks.cuda_variants
TAILN=40 stage bench_4096 150 $PY -m benchmarks --device cuda --rounds 5
[ -n "${SKIP_BIG:-}" ] || TAILN=16 stage bench_16384 70 $PY -m benchmarks --device cuda --rounds 3 --size 16384 --no-compile
[ -n "${SKIP_SUITE:-}" ] || TAILN=40 stage suite 150 $PY -m pytest -q -p no:cacheprovider -p no:benchmark -n 14 --tb=line -rfE --ignore=tests/test_cuda.py
