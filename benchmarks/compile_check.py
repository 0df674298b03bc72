"""Compile the Triton kernels for an H100/H200 (sm_90a) on a machine without a GPU, and report each
configuration's registers per thread, spill stores and shared memory (ptxas -v). CPU only.

    python benchmarks/compile_check.py           # a table
    python benchmarks/compile_check.py --json    # every planner tile family, wide items, fused kernels

tests/kernels/test_compile_sm90.py runs `--json` (in a process without TRITON_INTERPRET) to check, in CI,
that every tile configuration family the planner can pick compiles for sm_90a and fits one SM's shared
memory: errors the CPU interpreter cannot show.

What it showed (triton 3.9, 2026-11-29): every attention configuration uses all 255 registers, so at most
2 programs of 4 warps fit an SM whatever the tile; 128-row tiles with 4 warps spill (600-1250 bytes), and
even a kernel of 16-row tiles alone needs about 165 registers. The 255 are real demand, not ptxas spreading
out: capped with maxnreg=168 the CUDA-graph decode configuration spills 660 bytes. Shared memory limits
occupancy too: 112 KiB for the graph decode configuration and 102 KiB for 16-row tiles alone (2 programs
per SM either way), half of it the pipeline buffers of the masked key loop, which runs only the causal
diagonal and the tail (1-2 blocks). Unpipelined (MASKED_STAGES=1) it takes 80 and 38 KiB, so 16-row tiles
(168 registers; 109 with 8 warps) could run 3 programs per SM. The GPU runs triton 3.6, whose allocation
may differ: a lead to check there (`bench_kernels.py --decode-variants`), not a measurement of it.
(Session 5 checked it: on the H200 16-row tiles and 8 warps lost on every decode step.)

Session 5 (`attention(..., use_tma=True)`): TMA key loads compile to cp.async.bulk.tensor + mbarrier waits
in the unmasked loop at the same 255 registers (prefill tiles 128/128/32 keys/4 warps: 832 bytes of spills
instead of 744). Two leads measured only here, in a scratch copy of the kernel: compiling the prefix and
own large-tile branches as ONE instantiation when their tiles are equal (prefill steps) cuts that
configuration's shared memory from 98 to 64 KiB and its spills to 624 bytes (each branch instantiation
keeps its own pipeline buffers); also leaving the 16-row branch out of steps without decode rows gives 504.

Session 6: the rest was the kernel's grid-stride loop over items. Without it (plans made for their step
launch one program per item; static plans one per item slot) the prefill configuration spills 32 bytes
instead of 744 (16 with TMA and no 16-row branch), the 16-row decode configuration needs 110 registers
instead of 168, and the session-5 leads are in (`has_small`, one large-tile branch when tiles are equal).
Fused prefill items (prefix then own KV in one program) add a branch: 84-112 bytes of spills with 128 x 32
tiles, none with the 64 x 64 tiles the planner now picks for prefill with TMA (147 KB of shared memory).
On the H200 those changes made decode steps 2-38% and prefill chunks 7-11% faster (before fused items).

Session 7: the prefill configurations' TMA key loops were two buffers deep where three stages were asked
for. The page-id lookup right before each block's TMA loads takes a pipeline stage: the attention_ceiling
ladder kernel shows 83 KiB without and 116 KiB with the id loaded a block ahead (the dense kernel at those
tiles: 116 KiB). `prefetch_pages=True` (plan.prefetch_pages) does that in our kernel: 83 -> 116 KiB at 64 x 64
with an unpipelined masked loop, 98 -> 132 KiB at 128 x 64 with 8 warps. Registers stay near 255 either way;
the dense kernel needs 150 at 64 x 64 / 4 warps and 128 x 64 / 8 warps (254 at 128 x 64 / 4 warps). Cutting
pieces from a scratch copy, our count drops to 173 only without both the masked loop and the split-partial
stores, so no single piece explains it.

Session 9 (the table now prints programs per SM, the smaller of shared memory's and registers' limits).
The planner's decode configuration for 128-row prefix tiles (128 / 16 / 64 keys / 4 warps / 2 stages: the
W-paper decode step, GQA 7 x 16 members, and GQA-8 steps with groups of 16 or more):
- triton 3.9 (this machine's): 128 KiB of shared memory, so ONE program per SM, and 408 bytes of spills;
  96 KiB (two programs) and 292 bytes with the masked loop unpipelined.
- triton 3.6, the GPU machine's (`pip install triton==3.6.0` in a CPU venv runs this file as well): 96 KiB
  and two programs either way, but 888 bytes of register spills (808 with the masked loop unpipelined, 272
  with 32-key blocks as well, none with 8 warps: 236 registers, one 8-warp program per SM). The 64-row
  graph configuration spills 4 bytes there, 16-row tiles none.
So the one-program occupancy is a triton-3.9 story; under both versions the 128-row tiles spill, and on the
GPU (triton 3.6) the spills are the lead. The grid (pages of
64, P >= 2048) is consistent with it but does not prove it, since large tiles also mean large groups:
steps the planner gives 16-row tiles only reach 59-97% of copy bandwidth, 32-row 67-92%, 64-row 12-82%,
128-row 9-77%. `bench_kernels.py --decode-variants` times the masked loop at 1 stage, 32-key blocks and
8 warps on the GPU.

Session 10 timed them (benchmarks/results/2026-11-30-session10/call1_decode_variants): every one is slower
than the spilling planner configuration on the 128-row steps. W-paper's step: 252 us planner, 270 masked
loop at 1 stage, 296 32-key blocks, 303 both, 361 8 warps. So the spills are not what holds those steps
back, and the variants were retired from the bench.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import tempfile
import warnings

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import batchllm_hf.kernels.fused_ops as fused
from batchllm_hf.kernels.attention_plan import NUM_FIELDS
import batchllm_hf.kernels.shared_prefix_triton as attention_kernels

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY_LIMIT = 227 * 1024  # per thread block on sm_90
_TL = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


def ptxas_path() -> str | None:
    """The ptxas that reads the PTX this triton writes (triton >= 3.9 ships it as ptxas-blackwell)."""
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def compile_kernel(jit_fn, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
                   divisible=(), **options) -> dict:
    """Compile for TARGET; returns {"regs", "spills", "shared"} (bytes of spill stores and shared memory)."""
    params = list(inspect.signature(jit_fn.fn).parameters)
    signature = {p: ("constexpr" if p in constexprs else types[p]) for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in divisible}
    source = ASTSource(jit_fn, signature=signature, constexprs=constexprs, attrs=attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = triton.compile(source, target=TARGET,
                                options={"num_warps": num_warps, "num_stages": num_stages, **options})
    report = {"regs": None, "spills": None, "shared": kernel.metadata.shared}
    ptxas = ptxas_path()
    if ptxas is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "kernel.ptx")
            with open(path, "w") as f:
                f.write(kernel.asm["ptx"])
            log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(folder, "k.cubin")],
                                 capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        report.update(regs=int(regs.group(1)) if regs else None, spills=int(spills.group(1)) if spills else 0)
    return report


def attention(head_dim: int, block_m: int, block_m_own: int, block_n: int, num_warps: int, num_stages: int,
              has_wide: bool, dtype: str = "bf16", num_kv_heads: int = 8, masked_stages: int | None = None,
              maxnreg: int | None = None, use_tma: bool = False, has_small: bool = True,
              grid_stride: bool = False, has_fused: bool = False, prefetch_pages: bool = False,
              has_packed: bool = False, block_m_packed: int = 16) -> dict:
    """Compile `_partial_attention_kernel` as the launcher would for this tile configuration."""
    types = {}
    for p in inspect.signature(attention_kernels._partial_attention_kernel.fn).parameters:
        if p in ("k_desc", "v_desc"):
            types[p] = f"tensordesc<{dtype}[{block_n}, {head_dim}]>"
        elif p in ("q_ptr", "k_ptr", "v_ptr", "prefix_k_ptr", "prefix_v_ptr", "out_ptr"):
            types[p] = "*" + dtype
        elif p in ("lse_ptr", "part_out_ptr", "part_lse_ptr"):
            types[p] = "*fp32"
        elif p.endswith("_ptr"):
            types[p] = "*i32"
        else:
            types[p] = "fp32" if p == "qk_scale" else "i32"
    block_n_wide = 128 if head_dim <= 128 else 64
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M_PREFIX=block_m, BLOCK_M_OWN=block_m_own, BLOCK_M_WIDE=32,
                      BLOCK_N=block_n, BLOCK_N_WIDE=block_n_wide,
                      KV_HEADS_TILE=min(triton.next_power_of_2(num_kv_heads), block_n_wide), HAS_WIDE=has_wide,
                      HAS_SMALL=has_small, HAS_FUSED=has_fused, HAS_PACKED=has_packed,
                      BLOCK_M_PACKED=block_m_packed, GRID_STRIDE=grid_stride,
                      PAGE_SIZE=64, NUM_FIELDS=NUM_FIELDS, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                      DOT_DTYPE=_TL[dtype], MASKED_STAGES=masked_stages or num_stages, USE_TMA=use_tma,
                      PREFETCH_PAGES=prefetch_pages, PACK_TMA=True)
    if not use_tma:
        constexprs.update(k_desc=None, v_desc=None)
    divisible = [p for p in types if p.endswith("_ptr") or p.startswith("stride_")]
    return compile_kernel(attention_kernels._partial_attention_kernel, types, constexprs, num_warps, num_stages,
                          divisible, **({"maxnreg": maxnreg} if maxnreg else {}))


def fused_kernels(dtype: str = "bf16") -> dict:
    """Compile the three fused glue kernels at Llama-3-8B sizes."""
    ptr = "*" + dtype
    rotary_types = {p: ptr for p in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_out_ptr")}
    rotary_types.update({p: "i32" for p in ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh",
                                            "stride_kt", "stride_cb", "stride_ct", "seq_len", "num_q_heads",
                                            "num_kv_heads")})
    return {
        "rms_norm": compile_kernel(fused._rms_norm_kernel, {"x_ptr": ptr, "w_ptr": ptr, "out_ptr": ptr, "stride_x": "i32",
                                                            "stride_out": "i32", "n_cols": "i32", "eps": "fp32"},
                                   dict(BLOCK=4096, INPUT_DTYPE=_TL[dtype], OUT_DTYPE=_TL[dtype]), num_warps=8),
        "rotary": compile_kernel(fused._rotary_kernel, rotary_types,
                                 dict(HALF=64, BLOCK_HQ=32, BLOCK_HK=8, DTYPE=_TL[dtype]), enable_fp_fusion=False),
        "silu_mul": compile_kernel(fused._silu_mul_kernel, {"gate_ptr": ptr, "up_ptr": ptr, "out_ptr": ptr, "n": "i64"},
                                   dict(BLOCK=2048, DTYPE=_TL[dtype]), num_warps=8),
    }


CONFIGS = [  # (name, (head_dim, block_m, block_m_own, block_n, num_warps, num_stages, has_wide))
    ("decode, CUDA-graph plan (bm 64, own 16, bn 64, 4w, 2st)", (128, 64, 16, 64, 4, 2, False)),
    ("decode, large groups (bm 128, own 16, bn 64, 4w, 2st)", (128, 128, 16, 64, 4, 2, False)),
    ("decode, session-2 large groups (bm 128, bn 128, 8w, 3st)", (128, 128, 16, 128, 8, 3, False)),
    ("prefill (bm 128, own 128, bn 32, 4w, 3st)", (128, 128, 128, 32, 4, 3, False)),
    ("prefill, 8 warps (bm 128, own 128, bn 64, 8w, 3st)", (128, 128, 128, 64, 8, 3, False)),
    ("decode with wide items (bm 64, bn 64, 4w, 2st)", (128, 64, 16, 64, 4, 2, True)),
    ("head_dim 256 (bm 64, own 64, bn 32, 4w, 3st)", (256, 64, 64, 32, 4, 3, False)),
    ("head_dim 256 with wide items", (256, 64, 64, 32, 4, 3, True)),
    ("head_dim 64 decode", (64, 64, 16, 64, 4, 2, False)),
    ("16-row tiles only (bm 16, own 16, bn 64, 4w, 2st)", (128, 16, 16, 64, 4, 2, False)),
    # the masked key loop (diagonal and tail, 1-2 blocks) unpipelined: its buffers no longer take shared memory
    ("decode, CUDA-graph plan, masked loop 1 stage", (128, 64, 16, 64, 4, 2, False, "bf16", 8, 1)),
    ("prefill, masked loop 1 stage", (128, 128, 128, 32, 4, 3, False, "bf16", 8, 1)),
    ("16-row tiles only, masked loop 1 stage", (128, 16, 16, 64, 4, 2, False, "bf16", 8, 1)),
    ("16-row tiles only, 8 warps, masked loop 1 stage", (128, 16, 16, 64, 8, 2, False, "bf16", 8, 1)),
    ("CUDA-graph plan at maxnreg 168 (3 by registers)", (128, 64, 16, 64, 4, 2, False, "bf16", 8, 1, 168)),
    # session 9: the planner's decode configuration for 128-row prefix tiles (W-paper's decode step, GQA 8
    # with groups of 16+): triton 3.9 128 KiB (one program per SM), triton 3.6 888 bytes of spills
    ("decode, large groups, masked loop 1 stage", (128, 128, 16, 64, 4, 2, False, "bf16", 8, 1)),
    ("decode, large groups, masked loop 1 stage, 32-key blocks", (128, 128, 16, 32, 4, 2, False, "bf16", 8, 1)),
    ("decode, large groups, 8 warps", (128, 128, 16, 64, 8, 2, False)),
    # the planner's defaults where pages hold whole 64-key blocks (attention_plan.tma_default): TMA key loads,
    # page ids a block ahead, masked loop 1 stage; decode (and the engine's CUDA-graph plans) since session 13
    ("decode, TMA (bm 64, own 64, bn 64, 4w, 3st, ids ahead)",
     (128, 64, 64, 64, 4, 3, False, "bf16", 8, 1, None, True, True, False, False, True)),
    ("prefill, TMA, fused items (bm 64, own 64, bn 64, 4w, 3st)",
     (128, 64, 64, 64, 4, 3, False, "bf16", 8, 1, None, True, False, False, True, True)),
]

SHARED_PER_SM = 227 * 1024  # an H100 / H200 SM's shared memory for its resident programs (bytes)
REGISTERS_PER_SM = 65536


def programs_per_sm(report: dict, num_warps: int) -> int:
    """Programs of this compiled kernel that fit one SM at once, by shared memory and by registers."""
    by_shared = SHARED_PER_SM // max(report["shared"], 1)
    by_registers = REGISTERS_PER_SM // (report["regs"] * 32 * num_warps) if report["regs"] else by_shared
    return min(by_shared, by_registers)


def planner_families() -> list[tuple]:
    """Per (head_dim, block_n, warps, stages), the largest row tiles `tile_config` picks (the CUDA-graph
    plans of engine/decode_graphs.py take tile_config too, via static_decode_tiles)."""
    from batchllm_hf.kernels.attention_plan import tile_config

    largest = {}
    for head_dim in (64, 128, 256):
        picks = [tile_config(p, o, head_dim, total, tma=tma) for p in (16, 64, 128, 512) for o in (16, 64, 128, 1024)
                 for total in (64, 4096) for tma in (False, True)]
        for bm, bmo, bn, warps, stages in picks:
            key = (head_dim, bn, warps, stages)
            old = largest.get(key, (0, 0))
            largest[key] = (max(old[0], bm), max(old[1], bmo))
    return [(hd, bm, bmo, bn, w, st) for (hd, bn, w, st), (bm, bmo) in sorted(largest.items())]


def all_reports() -> list[dict]:
    """What the CI test checks: each entry names its kernel and configuration, with its report or error."""
    # fp32 (tests only: engine_gpu_check runs head_dim 64) for head_dim 64; its larger tiles take ptxas minutes
    # every branch a per-step plan can hold (16-row, large, fused, packed), TMA key loads where a GPU could use them
    jobs = [(f"attention {dtype} {config}", lambda c=config, d=dtype: attention(
                *c, has_wide=False, dtype=d, has_fused=True, use_tma=d != "fp32", has_packed=True))
            for config in planner_families() for dtype in (("bf16", "fp32") if config[0] == 64 else ("bf16",))]
    # the planner's prefill default with TMA: page ids prefetched, masked loop 1 stage; with the 16-row branch
    # too (a mixed step: prefill chunks and decode tokens), the most branches such a plan compiles
    jobs += [("attention bf16 prefill, page ids prefetched", lambda: attention(
        128, 64, 64, 64, 4, 3, has_wide=False, has_fused=True, use_tma=True, has_small=True, prefetch_pages=True,
        masked_stages=1))]
    # per-step decode plans at GQA >= 8, head_dim <= 128: prefix packs in 64-row packed tiles
    # (attention_plan.PACK_PREFIX_ROWS; at head_dim 256 such tiles spill 1500 bytes, so the planner keeps them out)
    jobs += [("attention bf16 decode, 64-row packed tiles", lambda: attention(
        128, 64, 16, 64, 4, 3, has_wide=False, use_tma=True, has_packed=True, block_m_packed=64, prefetch_pages=True,
        masked_stages=1))]
    jobs += [(f"attention wide {head_dim}", lambda h=head_dim: attention(h, 64, 16, 64 if h <= 128 else 32, 4, 2, True))
             for head_dim in (128, 256)]
    jobs += [(f"fused {dtype}", lambda d=dtype: fused_kernels(d)) for dtype in ("bf16", "fp16", "fp32")]
    reports = []
    for name, job in jobs:
        try:
            result = job()
        except Exception as error:  # noqa: BLE001 - the test reports every failure, not the first
            reports.append({"name": name, "error": f"{type(error).__name__}: {str(error)[:500]}"})
            continue
        for kernel, report in (result.items() if name.startswith("fused") else [("attention", result)]):
            reports.append({"name": f"{name} {kernel}", **report})
    return reports


def main() -> None:
    import sys

    if "--json" in sys.argv:
        print(json.dumps(all_reports()))
        return
    print(f"triton {triton.__version__}, sm_90a, ptxas {ptxas_path()}")
    for name, config in CONFIGS:
        r = attention(*config)
        print(f"{name:60s} regs {r['regs']} spills {r['spills']} shared {r['shared'] / 1024:6.1f} KiB "
              f"-> {programs_per_sm(r, config[4])} programs / SM")
    for name, r in fused_kernels().items():
        print(f"{name:60s} regs {r['regs']} spills {r['spills']} shared {r['shared'] / 1024:6.1f} KiB")


if __name__ == "__main__":
    main()
