"""Thin wrapper: `python benchmarks/bench_engine.py ...` == `batchllm-hf bench ...` (see batchllm_hf/bench.py)."""

import sys

from batchllm_hf.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
