#!/usr/bin/env bash
# GPU run of the kernel work: the kernel tests on CUDA, then the benchmark (real-shape checks + timing).
# Usage, from the repo root on a CUDA machine:  benchmarks/gpu_kernels.sh OUT_DIR [bench_kernels.py args]
#   e.g. benchmarks/gpu_kernels.sh /tmp/out --check          (full grid; about 6-8 minutes on an H200)
set -o pipefail
out=${1:-.}; shift || true
mkdir -p "$out"
# Import `batchllm_hf.kernels` from this checkout without installing it (kernels/ is that subpackage) and
# without importing the rest of batchllm_hf; -P keeps the checkout root off sys.path.
pkg=$(mktemp -d)
mkdir -p "$pkg/batchllm_hf" && touch "$pkg/batchllm_hf/__init__.py" && ln -s "$PWD/kernels" "$pkg/batchllm_hf/kernels"
export PYTHONPATH=$pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TRITON_INTERPRET=0 BATCHLLM_TEST_DEVICE=cuda timeout 300 python3 -P -m pytest -q -x -p no:cacheprovider tests/kernels \
    2>&1 | tail -5 | tee "$out/tests.txt"
python3 -P benchmarks/bench_kernels.py --out "$out/bench_kernels.json" "$@" 2>&1 | tee "$out/bench.txt"
