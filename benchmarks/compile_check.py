"""Compile the Triton kernels for an H100/H200 (sm_90a) on a machine without a GPU, and report each
configuration's registers per thread, spill stores and shared memory (ptxas -v). CPU only.

    python benchmarks/compile_check.py

What it showed (triton 3.9, 2026-11-29): every attention configuration uses all 255 registers, so at most
2 programs of 4 warps fit an SM whatever the tile; 128-row tiles with 4 warps spill (600-1250 bytes), and
even a kernel of 16-row tiles alone needs about 165 registers. The GPU runs triton 3.6, whose allocation
may differ: a lead to check there, not a measurement of it.
"""
import inspect
import warnings

warnings.filterwarnings("ignore")
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import batchllm_hf.kernels.shared_prefix_triton as S
import batchllm_hf.kernels.fused_ops as F

TARGET = GPUTarget("cuda", 90, 32)

def compile_kernel(jit_fn, types, constexprs, num_warps=4, num_stages=3, divisible=()):
    params = list(inspect.signature(jit_fn.fn).parameters)
    sig = {p: ("constexpr" if p in constexprs else types[p]) for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in divisible}
    src = ASTSource(jit_fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    import os, re, subprocess, tempfile
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        open(path, "w").write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores", out)
    return regs, int(spill.group(1)) if spill else 0, k.metadata.shared

def attention(head_dim, bm, bmo, bn, warps, stages, has_wide, dtype="bf16"):
    ptr = "*" + dtype
    types = {}
    for p in inspect.signature(S._partial_attention_kernel.fn).parameters:
        if p in ("q_ptr", "k_ptr", "v_ptr", "prefix_k_ptr", "prefix_v_ptr", "out_ptr"):
            types[p] = ptr
        elif p in ("lse_ptr", "part_out_ptr", "part_lse_ptr"):
            types[p] = "*fp32"
        elif p.endswith("_ptr"):
            types[p] = "*i32"
        elif p == "qk_scale":
            types[p] = "fp32"
        else:
            types[p] = "i32"
    tl_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16}[dtype]
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M_PREFIX=bm, BLOCK_M_OWN=bmo, BLOCK_M_WIDE=32,
                      BLOCK_N=bn, BLOCK_N_WIDE=128 if head_dim <= 128 else 64, KV_HEADS_TILE=8, HAS_WIDE=has_wide,
                      PAGE_SIZE=64, NUM_FIELDS=10, DOT_PRECISION="tf32", DOT_DTYPE=tl_dtype)
    divisible = [p for p in types if p.endswith("_ptr") or p.startswith("stride_")]
    return compile_kernel(S._partial_attention_kernel, types, constexprs, warps, stages, divisible)

rows = [
    ("decode, groups<=16 rows (bm 64, own 16, bn 64, 4w, 2st)", (128, 64, 16, 64, 4, 2, False)),
    ("decode, large groups (bm 128, own 16, bn 64, 4w, 2st) NEW", (128, 128, 16, 64, 4, 2, False)),
    ("decode, large groups OLD (bm 128, bn 128, 8w, 3st)", (128, 128, 16, 128, 8, 3, False)),
    ("prefill (bm 128, own 128, bn 32, 4w, 3st)", (128, 128, 128, 32, 4, 3, False)),
    ("prefill (bm 128, own 128, bn 64, 8w, 3st)", (128, 128, 128, 64, 8, 3, False)),
    ("decode with wide items (bm 64, bn 64, 4w, 2st)", (128, 64, 16, 64, 4, 2, True)),
    ("head_dim 256 (bm 64, own 64, bn 32, 4w, 3st)", (256, 64, 64, 32, 4, 3, False)),
    ("head_dim 256 with wide items", (256, 64, 64, 32, 4, 3, True)),
    ("head_dim 64 decode", (64, 64, 16, 64, 4, 2, False)),
]
print(f"triton {triton.__version__}, sm_90")
for name, cfg in rows:
    try:
        regs, spills, shared = attention(*cfg)
        print(f"{name:62s} regs {regs:4d} spills {spills:5d} shared {shared / 1024:6.1f} KiB")
    except Exception as e:
        print(f"{name:62s} FAILED {type(e).__name__}: {str(e)[:200]}")

for name, fn, types, ce, w in [
    ("rms_norm hidden 4096 bf16", F._rms_norm_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "stride_x": "i32", "stride_out": "i32", "n_cols": "i32", "eps": "fp32"}, dict(BLOCK=4096, INPUT_DTYPE=tl.bfloat16, OUT_DTYPE=tl.bfloat16), 8),
    ("rotary Hq 32 Hkv 8 D 128", F._rotary_kernel, {**{p: "*bf16" for p in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_out_ptr")}, **{p: "i32" for p in ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kt", "stride_cb", "stride_ct", "seq_len", "num_q_heads", "num_kv_heads")}}, dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=8, DTYPE=tl.bfloat16), 4),
    ("silu_mul bf16", F._silu_mul_kernel, {"gate_ptr": "*bf16", "up_ptr": "*bf16", "out_ptr": "*bf16", "n": "i64"}, dict(BLOCK=2048, DTYPE=tl.bfloat16), 8),
]:
    try:
        regs, spills, shared = compile_kernel(fn, types, ce, w, 3)
        print(f"{name:62s} regs {regs:4d} spills {spills:5d} shared {shared / 1024:6.1f} KiB")
    except Exception as e:
        print(f"{name:62s} FAILED {type(e).__name__}: {str(e)[:300]}")
print("--- what the 16-row branch alone would need (all tiles 16 rows)")
for cfg in [(128, 16, 16, 64, 4, 2, False), (128, 16, 16, 64, 4, 3, False), (128, 16, 16, 128, 4, 2, False), (128, 32, 16, 64, 4, 2, False)]:
    regs, spills, shared = attention(*cfg)
    print(cfg, f"regs {regs} spills {spills} shared {shared/1024:.1f} KiB")
