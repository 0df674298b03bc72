#!/bin/bash
# One device call (about 9.5 minutes on an H200): the engine's GPU sanity check (fp32 tokens vs HF generate,
# bf16 agreement; every graph size captured; its bf16 part needs more than 100 s), then the headline bench
# with HF generate side by side, the engine with the shrinking tail padded into graphs up to 32x its batch
# (EngineConfig.graph_tail_padding) as a variant, and the default engine again after it (sessions 5-8: the
# first engine run of a workload had slower host phases; each run's host probe is in the log).
# W-noshare does not fit its limits (its HF baseline was cut every time): run `--workloads W-noshare` alone.
# Usage (repo root): OUT=dir bash benchmarks/engine_gpu_run.sh   (SKIP_CHECK=1: the bench only)
export PYTHONUNBUFFERED=1
PKG=/tmp/pkg; rm -rf $PKG; mkdir -p $PKG; OUT=$(realpath $OUT)
cp -r batchllm_hf $PKG/ && rm -rf $PKG/batchllm_hf/kernels && cp -r kernels $PKG/batchllm_hf/kernels
export PYTHONPATH=$PKG
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
[ -n "$SKIP_CHECK" ] || timeout 150 python benchmarks/engine_gpu_check.py 2>&1 | grep -v Warning | tee $OUT/gpu_check.txt
# from $PKG: `python -m` puts the working directory first on sys.path, where batchllm_hf has no kernels/
(cd $PKG && timeout 435 python -m batchllm_hf.cli bench --workloads W-paper,W-8B,W-1B --skip-generate-batch \
    --ablations "tail padding 32x,default again" --out $OUT 2>&1 | grep -v Warning | tail -20)
