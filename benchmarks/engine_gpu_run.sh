#!/bin/bash
# One device call (about 8 minutes on an H200): the engine's GPU sanity check in fp32 (tokens vs HF generate,
# every graph size captured; its bf16 part, about 110 s more, does not fit beside the bench: run
# `python benchmarks/engine_gpu_check.py bf16` in a call of its own), then the headline bench
# with HF generate side by side and the default engine again after it (sessions 5-8: the first engine run of a
# workload had slower host phases; each run's host probe is in the log; session 9 found no pinned-memory, GC
# or compile cost there; until session 10 session 8's defaults ran as a variant too, about 80 s more).
# W-noshare does not fit its limits (its HF baseline was cut every time): run `--workloads W-noshare` alone.
# Usage (repo root): OUT=dir bash benchmarks/engine_gpu_run.sh   (SKIP_CHECK=1: the bench only)
export PYTHONUNBUFFERED=1
PKG=/tmp/pkg; rm -rf $PKG; mkdir -p $PKG; OUT=$(realpath $OUT)
cp -r batchllm_hf $PKG/ && rm -rf $PKG/batchllm_hf/kernels && cp -r kernels $PKG/batchllm_hf/kernels
export PYTHONPATH=$PKG
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
[ -n "$SKIP_CHECK" ] || timeout 150 python benchmarks/engine_gpu_check.py ${CHECK_DTYPES:-fp32} 2>&1 | grep -v Warning | tee $OUT/gpu_check.txt
# from $PKG: `python -m` puts the working directory first on sys.path, where batchllm_hf has no kernels/
(cd $PKG && timeout 420 python -m batchllm_hf.cli bench --workloads W-paper,W-8B,W-1B --skip-generate-batch \
    --ablations "default again" --out $OUT 2>&1 | grep -v Warning | tail -20)
