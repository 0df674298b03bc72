#!/bin/bash
# One device call: engine sanity check, then the bench on W-1B, W-8B, W-noshare (engine first, then baselines).
# Usage (repo root): OUT=dir bash benchmarks/engine_gpu_run.sh
export PYTHONUNBUFFERED=1
PKG=/tmp/pkg; rm -rf $PKG; mkdir -p $PKG
cp -r batchllm_hf $PKG/ && rm -rf $PKG/batchllm_hf/kernels && cp -r kernels $PKG/batchllm_hf/kernels
export PYTHONPATH=$PKG
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
timeout 45 python benchmarks/engine_gpu_check.py 2>&1 | tee $OUT/gpu_check.txt
B=/tmp/bench; mkdir -p $B
timeout 110 python benchmarks/bench_engine.py --workloads W-1B --out $B/w1b 2>&1 | grep -v Warning
timeout 170 python benchmarks/bench_engine.py --workloads W-8B --skip-generate-batch --out $B/w8b 2>&1 | grep -v Warning
timeout 60 python benchmarks/bench_engine.py --workloads W-noshare --skip-generate-batch --skip-ablations --out $B/noshare 2>&1 | grep -v Warning
for d in w1b w8b noshare; do
  cp $B/$d/results.md $OUT/$d.md 2>/dev/null; cp $B/$d/results.json $OUT/$d.json 2>/dev/null
done
cp $B/w8b/kv_timeline.png $OUT/w8b_kv.png 2>/dev/null
cat $B/*/log.txt
