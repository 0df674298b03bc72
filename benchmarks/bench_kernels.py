"""Benchmark of the shared-prefix Triton attention (paged) on a GPU: one command, JSON + a printed table.

    benchmarks/gpu_kernels.sh OUT_DIR --check          # CUDA kernel tests, real-shape checks, full grid
    python benchmarks/bench_kernels.py --quick --sweep  # headline rows + a tile-configuration sweep
    python benchmarks/bench_kernels.py --decode-variants --prefill-variants  # kernel variants only (~3 min)

Decode: G groups x B members (G * B = --requests, default 256), prefix P, own length S (incl. the new
token), Hkv 8, head_dim 128, bf16, pages of 64 tokens (--page-size; 64 is the engine's on a GPU, sessions
before 8 ran the grid at 16) handed out in random order; grid P in {512, 2048,
8192} x B in {1, 4, 16, 64, 256} x S in {64, 256, 1024} x GQA {4, 8}, plus P=2048 B=32 S=256 GQA 4 and
plain decode (P=0). Reported per row: time of `paged_attention` (plan excluded: made once per step for all
layers; its host time is in the JSON), achieved bandwidth over the bytes that MUST be read (each prefix
once per group + each request's own KV + q/out) as a fraction of the measured device copy bandwidth
(bytes read + written / time), the speedup over (a) torch SDPA (flash backend) on per-request KV with the
prefix duplicated, and on the P=2048 S=256 GQA 4 rows with B in {1, 16, 32} also over (b) FlexAttention
(torch.compile'd, same duplicated KV) and (c) the torch reference (it loops over sequences). Every row
checks our output against SDPA's (max abs error; the summary flags rows over 3e-2).
Prefill: M=4 members of one group each prefill a chunk of 512 tokens (their first), prefix P, against SDPA
on duplicated prefix KV with a lower-right causal mask; TFLOP/s over the useful FLOPs against the
measured bf16 matmul rate.
--check first compares outputs AND lse with `paged_attention_reference` on real shapes (GQA 1/4/7/8, head
dims 64/128/256, fp16/bf16, splits, prefill chunks) and replays a CUDA graph with a static plan.
Timing: triton.testing.do_bench (L2 flushed between runs), mean. Decode rows time CUDA-graph replays of ours,
SDPA's and FlexAttention's steps (the engine runs decode steps so; a launch from Python adds host time that
hid the GPU time of short steps, TMA ones most: session 13's decode_anatomy.py), and also our step launched
from Python (`eager_us`) and SDPA's (`sdpa_eager_us`). Prefill rows and the torch reference run eagerly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from batchllm_hf.kernels import (allocate_plan, attention_plan, paged_attention, plan_paged_attention,
                                 shared_prefix_prefill)
from batchllm_hf.kernels.paged import PagedAttentionMetadata, paged_attention_reference

NUM_KV_HEADS, HEAD_DIM = 8, 128
PAGE_SIZE = 64  # the grid's pages (--page-size): EngineConfig.for_device's on CUDA
WIDE = False  # --wide: also time each decode row with wide items


def make_step(groups: int, members: int, prefix: int, own: int, q_len: int, ratio: int, *, dtype=torch.bfloat16,
              head_dim=HEAD_DIM, num_kv_heads=NUM_KV_HEADS, page_size=None, seed=0):
    """Uniform step: every sequence has own_len `own` of which the last q_len are this step's queries."""
    page_size = page_size or PAGE_SIZE
    torch.manual_seed(seed)
    seqs = groups * members
    prefix_pages, own_pages = -(-prefix // page_size), -(-own // page_size)
    num_pages = groups * prefix_pages + seqs * own_pages + 1
    order = torch.randperm(num_pages, device="cuda", dtype=torch.int64).to(torch.int32)
    prefix_table = order[: groups * prefix_pages].view(groups, prefix_pages)
    own_table = order[groups * prefix_pages: num_pages - 1].view(seqs, own_pages)
    meta = PagedAttentionMetadata(
        q_starts=torch.arange(seqs + 1, device="cuda", dtype=torch.int32) * q_len,
        own_lens=torch.full((seqs,), own, device="cuda", dtype=torch.int32),
        own_pages=own_table if own_pages else torch.zeros((seqs, 1), device="cuda", dtype=torch.int32),
        seq_group=torch.arange(groups, device="cuda", dtype=torch.int32).repeat_interleave(members),
        prefix_pages=prefix_table if prefix_pages else torch.zeros((groups, 1), device="cuda", dtype=torch.int32),
        prefix_lens=torch.full((groups,), prefix, device="cuda", dtype=torch.int32), page_size=page_size)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device="cuda", dtype=dtype)
    v_cache = torch.randn(shape, device="cuda", dtype=dtype)
    q = torch.randn((seqs * q_len, num_kv_heads * ratio, head_dim), device="cuda", dtype=dtype)
    return q, k_cache, v_cache, meta


def duplicated_kv(cache: torch.Tensor, meta: PagedAttentionMetadata, members: int, prefix: int, own: int):
    """(N, Hkv, prefix + own, D): every request's prefix + own KV, the prefix copied per request."""
    def dense(table, length):
        n = table.shape[0]
        return cache[table.long()].reshape(n, -1, *cache.shape[2:])[:, :length]
    parts = [dense(meta.own_pages, own)]
    if prefix:
        parts.insert(0, dense(meta.prefix_pages, prefix).repeat_interleave(members, 0))
    return torch.cat(parts, 1).transpose(1, 2).contiguous()


def sdpa_flash(q, k, v, scale, causal_lower_right=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right as lower_right
    mask = lower_right(q.shape[2], k.shape[2]) if causal_lower_right else None
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def timed(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=5, rep=25) * 1e-3  # seconds


def timed_graph(fn) -> float:
    """`timed` of a CUDA-graph replay of fn (the engine's decode steps run so): the launches' host time
    drops out, the GPU time stays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay)


def device_ceilings() -> dict:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_s = timed(lambda: y.copy_(x))
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_s = timed(lambda: a @ b)
    return {"copy_GBps": 2 * (2 << 30) / copy_s / 1e9, "matmul_TFLOPs": 2 * 8192 ** 3 / mm_s / 1e12,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__}


def bench_decode(groups, members, prefix, own, ratio, ceilings, flex=False, ref=False) -> dict:
    q, k_cache, v_cache, meta = make_step(groups, members, prefix, own, 1, ratio)
    scale = HEAD_DIM ** -0.5
    t0 = time.perf_counter()
    # the configuration of the engine's CUDA-graph decode plans (engine/decode_graphs.py): TMA key loads where
    # the pages allow them; a per-step plan left to its default keeps decode on pointer loads (its eager launch)
    plan = plan_paged_attention(meta, q.shape[1], NUM_KV_HEADS, HEAD_DIM,
                                use_tma=attention_plan.tma_default(q.device, PAGE_SIZE, HEAD_DIM))
    plan_ms = (time.perf_counter() - t0) * 1e3
    out = torch.empty_like(q)
    step = lambda: paged_attention(q, k_cache, v_cache, meta, scale, out=out, plan=plan)  # noqa: E731
    eager = timed(step)
    ours = timed_graph(step)
    kv_bytes = 2 * NUM_KV_HEADS * HEAD_DIM * q.element_size() * groups * (prefix + members * own)
    must_read = kv_bytes + 2 * q.numel() * q.element_size()
    row = dict(kind="decode", G=groups, B=members, P=prefix, S=own, gqa=ratio, time_us=ours * 1e6,
               eager_us=eager * 1e6, plan_ms=plan_ms, block_m=plan.block_m, items=plan.items.shape[0],
               merge=plan.needs_merge, tma=plan.use_tma, GBps=must_read / ours / 1e9)
    row["frac_copy_bw"] = row["GBps"] / ceilings["copy_GBps"]
    row["frac_roofline"] = decode_roofline_us(row, ceilings) / row["time_us"]
    if WIDE:  # the same step with wide items (all KV heads of a decode token in one program), opt-in
        wide = plan_paged_attention(meta, q.shape[1], NUM_KV_HEADS, HEAD_DIM, wide=True)
        row["wide_items_us"] = timed_graph(lambda: paged_attention(q, k_cache, v_cache, meta, scale, out=out,
                                                                   plan=wide)) * 1e6
        paged_attention(q, k_cache, v_cache, meta, scale, out=out, plan=plan)
    qd = q.unsqueeze(2)  # (N, Hq, 1, D)
    kd = duplicated_kv(k_cache, meta, members, prefix, own)
    vd = duplicated_kv(v_cache, meta, members, prefix, own)
    expected = sdpa_flash(qd, kd, vd, scale).squeeze(2)
    row["max_err_vs_sdpa"] = (out.float() - expected.float()).abs().max().item()
    row["sdpa_us"] = timed_graph(lambda: sdpa_flash(qd, kd, vd, scale)) * 1e6
    row["sdpa_eager_us"] = timed(lambda: sdpa_flash(qd, kd, vd, scale)) * 1e6
    row["speedup_sdpa"] = row["sdpa_us"] / row["time_us"]
    if flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            compiled = torch.compile(flex_attention, dynamic=False)
            flex = lambda: compiled(qd, kd, vd, scale=scale, enable_gqa=True)  # noqa: E731
            row["flex_eager_us"] = timed(flex) * 1e6
            try:
                row["flex_us"] = timed_graph(flex) * 1e6
            except Exception as error:  # noqa: BLE001 - a compiled graph that cannot be captured: eager
                row["flex_us"], row["flex_graph_error"] = row["flex_eager_us"], repr(error)[:200]
            row["speedup_flex"] = row["flex_us"] / row["time_us"]
        except Exception as error:  # noqa: BLE001 - report, keep benchmarking
            row["flex_error"] = repr(error)[:200]
    if ref:
        row["ref_us"] = timed(lambda: paged_attention_reference(q, k_cache, v_cache, meta, scale)) * 1e6
        row["speedup_ref"] = row["ref_us"] / row["time_us"]
    return row


def decode_roofline_us(row: dict, ceilings: dict) -> float:
    """Lower bound of a decode row's time: the must-read bytes at copy bandwidth or the attention FLOPs at the
    matmul rate, whichever is longer. Large groups with short own KV are compute-bound (every member's
    query heads against the whole prefix), so there the copy-bandwidth fraction understates the kernel."""
    seconds_bytes = row["GBps"] * row["time_us"] * 1e3 / (ceilings["copy_GBps"] * 1e9)
    flops = 4 * NUM_KV_HEADS * row["gqa"] * HEAD_DIM * row["G"] * row["B"] * (row["P"] + row["S"])
    return 1e6 * max(seconds_bytes, flops / (ceilings["matmul_TFLOPs"] * 1e12))


def bench_prefill(members, chunk, prefix, ratio, ceilings) -> dict:
    q, k_cache, v_cache, meta = make_step(1, members, prefix, chunk, chunk, ratio)
    scale = HEAD_DIM ** -0.5
    plan = plan_paged_attention(meta, q.shape[1], NUM_KV_HEADS, HEAD_DIM)
    out = torch.empty_like(q)
    ours = timed(lambda: paged_attention(q, k_cache, v_cache, meta, scale, out=out, plan=plan))
    # also as a CUDA-graph replay (session 15: launched from Python, a run's host launch time exceeded the
    # P = 2048 chunk's GPU time; the replay leaves the GPU time). Added after session 15's last device call.
    replay = timed_graph(lambda: paged_attention(q, k_cache, v_cache, meta, scale, out=out, plan=plan))
    flops = 4 * q.shape[1] * HEAD_DIM * members * chunk * (prefix + (chunk + 1) / 2)
    qd = q.view(members, chunk, -1, HEAD_DIM).transpose(1, 2)
    kd = duplicated_kv(k_cache, meta, members, prefix, chunk)
    vd = duplicated_kv(v_cache, meta, members, prefix, chunk)
    expected = sdpa_flash(qd, kd, vd, scale, causal_lower_right=True).transpose(1, 2).reshape_as(q)
    sdpa = timed(lambda: sdpa_flash(qd, kd, vd, scale, causal_lower_right=True))
    return dict(kind="prefill", G=1, B=members, P=prefix, S=chunk, gqa=ratio, time_us=ours * 1e6,
                block_m=plan.block_m, items=plan.items.shape[0], TFLOPs=flops / ours / 1e12,
                frac_matmul=flops / ours / 1e12 / ceilings["matmul_TFLOPs"], graph_us=replay * 1e6,
                frac_matmul_graph=flops / replay / 1e12 / ceilings["matmul_TFLOPs"], sdpa_us=sdpa * 1e6,
                speedup_sdpa=sdpa / ours, max_err_vs_sdpa=(out.float() - expected.float()).abs().max().item())


def sweep_tiles() -> list[dict]:
    """Time kernel configurations on representative steps: decode with one-head items (block_n, warps,
    stages), decode with wide items (block_n_wide, warps, stages), prefill chunks (block_m, block_n, warps,
    stages)."""
    rows = []
    decode_steps = [(8, 32, 2048, 256, 1, 4), (8, 32, 2048, 1024, 1, 4), (256, 1, 8192, 1024, 1, 4),
                    (1, 256, 2048, 256, 1, 8), (256, 1, 2048, 64, 1, 8), (64, 4, 2048, 1024, 1, 4)]
    prefill_steps = [(1, 4, 2048, 512, 512, 4), (1, 4, 8192, 512, 512, 4)]
    narrow = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (128, 4, 3), (64, 8, 3), (128, 8, 3)]
    wide = [(32, 4, 3), (64, 4, 3), (64, 4, 2), (128, 4, 2), (64, 8, 3), (128, 8, 3), (128, 8, 2)]
    prefill = [(bm, bn, w, st) for bm in (64, 128) for bn, w, st in ((32, 4, 3), (64, 4, 3), (64, 8, 3), (64, 8, 2),
                                                                      (128, 8, 2), (32, 8, 3))]
    scale = HEAD_DIM ** -0.5

    def time_plan(inputs, plan, **config):
        q, k_cache, v_cache, meta, out = inputs
        try:
            t = timed(lambda: paged_attention(q, k_cache, v_cache, meta, scale, out=out, plan=plan))
        except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: report, go on
            t = float("nan")
            print("   sweep error", repr(error)[:120])
        rows.append(dict(config, time_us=t * 1e6))
        print("  sweep", rows[-1], flush=True)

    for shape in decode_steps:
        q, k_cache, v_cache, meta = make_step(*shape)
        step = (q, k_cache, v_cache, meta, torch.empty_like(q))
        # "16-row tiles": every tile 16 rows (block_m=16), so the kernel has no large-tile branch and needs
        # about 168 registers instead of 255 (benchmarks/compile_check.py): more programs per SM, while a
        # large group's prefix chunk is read by several tiles (through L2).
        for variant, configs in (("one-head", narrow), ("wide", wide), ("16-row tiles", [(64, 4, 2), (64, 4, 3)])):
            plan = plan_paged_attention(meta, q.shape[1], NUM_KV_HEADS, HEAD_DIM, wide=variant == "wide",
                                        block_m=16 if variant == "16-row tiles" else None)
            for bn, warps, stages in configs:
                if variant == "wide":
                    plan.block_n_wide = bn
                else:
                    plan.block_n = bn
                plan.num_warps, plan.num_stages = warps, stages
                time_plan(step, plan, step=["decode", *shape], items=variant, block_n=bn, num_warps=warps,
                          num_stages=stages)
    for shape in prefill_steps:
        q, k_cache, v_cache, meta = make_step(*shape)
        step = (q, k_cache, v_cache, meta, torch.empty_like(q))
        for bm, bn, warps, stages in prefill:
            plan = plan_paged_attention(meta, q.shape[1], NUM_KV_HEADS, HEAD_DIM, block_m=bm)
            plan.block_n, plan.num_warps, plan.num_stages = bn, warps, stages
            time_plan(step, plan, step=["prefill", *shape], block_m=bm, block_n=bn, num_warps=warps,
                      num_stages=stages)
    return rows


DECODE_VARIANT_STEPS = [  # (groups, members, prefix, own, ratio, KV heads)
    (50, 16, 2000, 250, 7, 4),    # W-paper's decode step (Qwen2.5-7B heads: 28 / 4)
    (8, 32, 2048, 256, 4, 8),     # the 3x-SDPA row (W-8B's decode step is close: 8 x 32, P 2048)
    (8, 32, 2048, 1024, 4, 8),
    (1, 256, 2048, 64, 8, 8),     # one large group, short own KV
    (16, 16, 2048, 64, 8, 8),     # the grid's slowest row that is not compute-bound (26% of copy bandwidth)
    (4, 64, 8192, 64, 4, 8),      # large groups, long prefix: few prefix tiles per KV head
    (16, 16, 8192, 256, 8, 8),
    (256, 1, 2048, 64, 8, 8),     # groups of one
    (64, 4, 2048, 1024, 4, 8),
]
# (name, plan overrides): block_m (prefix and own row tiles; own decode rows use 16-row tiles anyway),
# block_m_own after planning (16: the CUDA-graph plan's), keys per block, warps, stages of the main loop,
# stages of the masked loop (None: the main loop's); min_chunk_filled: the shortest KV chunk of a step
# whose items already fill the GPU (1 << 30: session 3's rule, no split there); chunk: every item's KV chunk
# (keys), as plan_paged_attention(chunk=...); plan_tma: plan_paged_attention(use_tma=...); use_tma /
# prefetch_pages: set after planning; page_size: the KV pages (default VARIANT_PAGE_SIZE, the engine's; TMA
# needs pages of whole key blocks). Every variant is timed as a CUDA-graph replay (session 13: launched from
# Python, TMA steps paid host time that sessions 6 and 9 read as slower kernels).
VARIANT_PAGE_SIZE = 64
DECODE_VARIANTS = [
    ("per-step planner (decode: pointer loads)", {}),
    ("planner with use_tma=True (TMA, 64-row tiles, 3 stages, ids ahead)", {"plan_tma": True}),
    # (session 9 timed fixed KV chunks of 512 and 1024 here: no better, results/2026-11-29-session9)
    # (session 10 timed the spill-free or less-spilling variants of the 128-row decode configuration: the
    # masked loop at 1 stage, 32-key blocks, both, 8 warps. All slower on the 128-row steps, e.g. W-paper's
    # 270 / 296 / 303 / 361 us against the planner's 252: results/2026-11-30-session10, compile_check.py)
    # (session 5's and 6's tables also timed the session-3 KV-split rule, a mixed step's tiles for decode rows
    # and pages of 16: benchmarks/results/2026-11-29-session6/variants_after.txt; session 13's
    # benchmarks/decode_anatomy.py times tile, stage and TMA variants of one launch)
    # the engine's CUDA-graph plan itself: a static plan (decode_graphs.py's capacities and TMA rule), one
    # program per item slot (the idle ones exit at once)
    ("CUDA-graph static plan (as the engine's)", {"static": None}),
]


def _static_plan(meta, q, kv_heads, programs, block_m=None):
    """A plan made like decode_graphs.py's: allocate_plan with its capacities for this batch, TMA key loads
    where `tma_default` allows them (then page ids a block ahead and a 1-stage masked loop), and the tiles
    `static_decode_tiles` picks for it (block_m: override the prefix tiles), then filled."""
    from batchllm_hf.kernels.attention_plan import static_decode_tiles, tma_default, tma_loop_options
    seqs, ratio = meta.own_lens.shape[0], q.shape[1] // kv_heads
    tma = tma_default(q.device, meta.page_size, HEAD_DIM)
    tiles = static_decode_tiles(meta.seq_group.cpu().numpy(), ratio, HEAD_DIM, tma=tma)
    block_m, block_m_own, block_n, warps, stages = (block_m or tiles[0],) + tiles[1:]
    capacity = (-(-ratio // 16) + -(-ratio // 64)) * kv_heads * seqs + 4096
    buffers = allocate_plan(seqs, capacity, 4 * seqs + 4096, q.shape[1], HEAD_DIM, q.device, block_m=block_m,
                            block_m_own=block_m_own, block_n=block_n, num_warps=warps, num_stages=stages,
                            num_programs=programs or capacity, use_tma=tma, packed=True,
                            **tma_loop_options(tma, HEAD_DIM))
    return plan_paged_attention(meta, q.shape[1], kv_heads, HEAD_DIM, buffers=buffers)


def _time_variant(q, k_cache, v_cache, meta, scale, plan, out, ref_out) -> tuple[float, float | str]:
    """(seconds as a CUDA-graph replay, max abs error vs the reference) of one planned step; (nan, the error)
    if it fails."""
    try:
        out.fill_(float("nan"))
        t = timed_graph(lambda: paged_attention(q, k_cache, v_cache, meta, scale, out=out, plan=plan))
        return t, (out.float() - ref_out.float()).abs().max().item()
    except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: report, go on
        return float("nan"), repr(error)[:120]


def _print_variant_table(header: str, variants: list, rows: list[dict], metric: str) -> None:
    """One markdown row per step: time and `metric` (a fraction, shown in %) of each variant."""
    print(f"\n| {header} | " + " | ".join(name for name, _ in variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for i in range(0, len(rows), len(variants)):
        cells = [f"{r['time_us']:.0f} us {100 * r[metric]:.0f}%" for r in rows[i:i + len(variants)]]
        print(f"| {rows[i]['step']} | " + " | ".join(cells) + " |")


def decode_variants(ceilings) -> list[dict]:
    """Decode steps under kernel and plan variants (tiles, TMA key loads, the KV-split rule, page size):
    time, fraction of copy bandwidth on the must-read bytes, and the max error against the torch reference
    (each variant is also a correctness check of that kernel build on the GPU)."""
    rows = []
    for groups, members, prefix, own, ratio, kv_heads in DECODE_VARIANT_STEPS:
        steps = {}
        for name, change in DECODE_VARIANTS:
            page_size = change.get("page_size", VARIANT_PAGE_SIZE)
            if page_size not in steps:
                q, k_cache, v_cache, meta = make_step(groups, members, prefix, own, 1, ratio, num_kv_heads=kv_heads,
                                                      page_size=page_size)
                steps[page_size] = (q, k_cache, v_cache, meta, *paged_attention_reference(q, k_cache, v_cache, meta,
                                                                                           HEAD_DIM ** -0.5))
            q, k_cache, v_cache, meta, ref_out, _ = steps[page_size]
            scale = HEAD_DIM ** -0.5
            must_read = (2 * kv_heads * HEAD_DIM * q.element_size() * groups * (prefix + members * own)
                         + 2 * q.numel() * q.element_size())
            out = torch.empty_like(q)
            default_min_chunk = attention_plan._MIN_CHUNK_FILLED
            attention_plan._MIN_CHUNK_FILLED = change.get("min_chunk_filled", default_min_chunk)
            try:
                if "static" in change:
                    plan = _static_plan(meta, q, kv_heads, change["static"], change.get("static_block_m"))
                else:
                    plan = plan_paged_attention(meta, q.shape[1], kv_heads, HEAD_DIM, block_m=change.get("block_m"),
                                                chunk=change.get("chunk"), use_tma=change.get("plan_tma"))
            finally:
                attention_plan._MIN_CHUNK_FILLED = default_min_chunk
            plan.block_m_own = change.get("block_m_own", plan.block_m_own)
            plan.num_warps = change.get("num_warps", plan.num_warps)
            plan.block_n = change.get("block_n", plan.block_n)
            plan.num_stages = change.get("num_stages", plan.num_stages)
            plan.masked_stages = change.get("masked_stages", plan.masked_stages)
            plan.use_tma = change.get("use_tma", plan.use_tma)
            plan.prefetch_pages = change.get("prefetch_pages", plan.prefetch_pages)
            t, err = _time_variant(q, k_cache, v_cache, meta, scale, plan, out, ref_out)
            rows.append(dict(step=[groups, members, prefix, own, ratio, kv_heads], variant=name, time_us=t * 1e6,
                             frac_copy_bw=must_read / t / 1e9 / ceilings["copy_GBps"], max_err=err,
                             tiles=[plan.block_m, plan.block_m_own, plan.block_n, plan.num_warps, plan.num_stages]))
            print("  variant", rows[-1], flush=True)
    _print_variant_table("step (G, B, P, S, GQA, Hkv)", DECODE_VARIANTS, rows, "frac_copy_bw")
    return rows


PREFILL_VARIANT_STEPS = [(4, 512, 2048, 4), (4, 512, 8192, 4), (4, 512, 2048, 7),
                         (16, 200, 2000, 7)]  # (members, chunk, prefix, GQA); the last: W-paper-like suffix chunks
PREFILL_VARIANTS = [  # (name, (block_m, block_n, warps, stages, masked-loop stages or None, TMA, page size[, fuse[,
    #                              page ids prefetched]]))
    # None: the planner's choice (pages of 64: 64 x 64 tiles, 4 warps, 3 stages, TMA, fused items, each TMA
    # block's page id loaded a block ahead, masked loop 1 stage: session 8)
    ("planner (engine default)", (None, None, None, None, None, None, VARIANT_PAGE_SIZE)),
    ("session 7's planner: page id before each block's loads, 3 masked stages",
     (64, 64, 4, 3, None, True, VARIANT_PAGE_SIZE, True, False)),
    ("64 x 64, 3 masked stages, page ids prefetched", (64, 64, 4, 3, None, True, VARIANT_PAGE_SIZE, True, True)),
    ("128 x 64, 8 warps, masked 1 stage, TMA, page ids prefetched",
     (128, 64, 8, 3, 1, True, VARIANT_PAGE_SIZE, True, True)),
    ("128 x 32, 4 warps, 3 stages (pointer loads: the planner at pages of 16)",
     (128, 32, 4, 3, None, False, VARIANT_PAGE_SIZE)),
    ("128 x 128, 8 warps, 2 stages, masked 1 stage, TMA, page ids prefetched",
     (128, 128, 8, 2, 1, True, 128, True, True)),
    # the dense kernel's best tiles (62-74%, attention_ceiling.py); 225 KiB of shared memory, 40 bytes spilled
    ("128 x 128, 8 warps, 3 stages, masked 1 stage, TMA, page ids prefetched",
     (128, 128, 8, 3, 1, True, 128, True, True)),
    # (sessions 7-8 also timed 128 x 32 with TMA, unfused items, 64 x 64 with 2 stages, the planner at pages
    # of 16, and 128 x 64 / 128 x 128 without the prefetch: benchmarks/results/2026-11-29-session{7,8}/)
]


def prefill_variants(ceilings) -> list[dict]:
    """Prefill chunks (members of one group, each a chunk of its first tokens against the group prefix)
    under tile variants: time, TFLOP/s over the useful FLOPs as a fraction of the measured matmul rate, and
    the max error against the torch reference."""
    rows = []
    scale = HEAD_DIM ** -0.5
    for members, chunk, prefix, ratio in PREFILL_VARIANT_STEPS:
        steps = {}
        for name, (bm, bn, warps, stages, masked, tma, page_size, *extra) in PREFILL_VARIANTS:
            fuse, prefetch = list(extra) + [True, None][len(extra):]  # defaults: fused items, the planner's prefetch
            if page_size not in steps:
                q, k_cache, v_cache, meta = make_step(1, members, prefix, chunk, chunk, ratio, page_size=page_size)
                steps[page_size] = (q, k_cache, v_cache, meta, paged_attention_reference(q, k_cache, v_cache, meta,
                                                                                          scale)[0])
            q, k_cache, v_cache, meta, ref_out = steps[page_size]
            flops = 4 * q.shape[1] * HEAD_DIM * members * chunk * (prefix + (chunk + 1) / 2)
            out = torch.empty_like(q)
            plan = plan_paged_attention(meta, q.shape[1], NUM_KV_HEADS, HEAD_DIM, block_m=bm, fuse=fuse, use_tma=tma)
            if bm is not None:
                plan.block_n, plan.num_warps, plan.num_stages, plan.masked_stages = bn, warps, stages, masked
            plan.prefetch_pages = plan.prefetch_pages if prefetch is None else prefetch
            t, err = _time_variant(q, k_cache, v_cache, meta, scale, plan, out, ref_out)
            rows.append(dict(step=[members, chunk, prefix, ratio], variant=name, time_us=t * 1e6,
                             frac_matmul=flops / t / 1e12 / ceilings["matmul_TFLOPs"], max_err=err,
                             tiles=[plan.block_m, plan.block_m_own, plan.block_n, plan.num_warps, plan.num_stages],
                             tma=plan.use_tma, fused=plan.has_fused, prefetch=plan.prefetch_pages,
                             masked_stages=plan.masked_stages))
            print("  variant", rows[-1], flush=True)
    _print_variant_table("step (members, chunk, P, GQA)", PREFILL_VARIANTS, rows, "frac_matmul")
    return rows


def check_against_reference() -> list[dict]:
    """Real-shape correctness: outputs and lse vs paged_attention_reference, plus a CUDA-graph replay."""
    results = []
    cases = [  # (G, B, P, S, q_len, ratio, head_dim, dtype)
        (3, 5, 1025, 127, 1, 4, 128, torch.bfloat16), (2, 16, 2048, 13, 1, 7, 128, torch.float16),
        (1, 64, 4096, 1, 1, 8, 64, torch.bfloat16), (5, 1, 8192, 1025, 1, 1, 256, torch.float16),
        (2, 3, 2048, 128, 128, 4, 128, torch.bfloat16), (1, 4, 1025, 513, 257, 7, 64, torch.float16),
        (1, 2, 127, 1025, 1025, 8, 256, torch.bfloat16), (4, 8, 0, 300, 1, 4, 128, torch.bfloat16),
    ]
    for g, b, p, s, ql, ratio, d, dtype in cases:
        q, k_cache, v_cache, meta = make_step(g, b, p, s, ql, ratio, dtype=dtype, head_dim=d, seed=g + p)
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), device="cuda")
        shared_prefix_prefill(q, k_cache, v_cache, meta, d ** -0.5, out=out, lse=lse)
        ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, d ** -0.5)
        err, lse_err = (out.float() - ref_out.float()).abs().max().item(), (lse - ref_lse).abs().max().item()
        ok = err < (3e-2 if dtype == torch.bfloat16 else 4e-3) and lse_err < 1e-3
        results.append(dict(case=[g, b, p, s, ql, ratio, d, str(dtype)], out_err=err, lse_err=lse_err, ok=ok))
        print("  ", results[-1], flush=True)
    results.append(check_cuda_graph())
    print("  ", results[-1], flush=True)
    return results


def check_cuda_graph() -> dict:
    """Capture one step with a static plan, then replay it for a step with other lengths and groups."""
    q, k_cache, v_cache, meta = make_step(4, 8, 2000, 300, 1, 4, seed=1)
    scale = HEAD_DIM ** -0.5
    lengths = [(1000, 100, [0, 1, 2, 3]), (2000, 300, [0, -1, 2, 3])]  # (prefix, own, group of each 8)

    def fill(prefix, own, group_ids):
        meta.prefix_lens.fill_(prefix)
        meta.own_lens.fill_(own)
        meta.seq_group.copy_(torch.tensor(group_ids, device="cuda", dtype=torch.int32).repeat_interleave(8))
        plan_paged_attention(meta, 32, NUM_KV_HEADS, HEAD_DIM, buffers=static)

    static = allocate_plan(max_tokens=q.shape[0], max_items=4096, max_parts=4096, num_q_heads=32,
                           head_dim=HEAD_DIM, device="cuda", block_m=64, block_m_own=64, block_n=64, num_stages=3,
                           use_tma=True, prefetch_pages=True, masked_stages=1)  # the engine's default (session 13)
    out = torch.empty_like(q)
    fill(*lengths[0])
    paged_attention(q, k_cache, v_cache, meta, scale, out=out, plan=static)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(q, k_cache, v_cache, meta, scale, out=out, plan=static)
    errors = []
    for step in reversed(lengths):
        fill(*step)
        out.fill_(float("nan"))
        graph.replay()
        ref_out, _ = paged_attention_reference(q, k_cache, v_cache, meta, scale)
        errors.append((out.float() - ref_out.float()).abs().max().item())
    return dict(case="cuda_graph_replay", out_err=max(errors), ok=max(errors) < 3e-2)


def main() -> None:
    global PAGE_SIZE, WIDE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time tile configurations first")
    parser.add_argument("--decode-variants", action="store_true",
                        help="only: decode steps under occupancy variants (about 1 minute), then exit")
    parser.add_argument("--prefill-variants", action="store_true",
                        help="only: prefill chunks under tile variants (about 1 minute), then exit")
    parser.add_argument("--wide", action="store_true", help="also time each decode row with wide items (opt-in)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE,
                        help="KV page size of the grid's steps (default 64, the engine's on a GPU)")
    parser.add_argument("--out", default="bench_kernels.json", help="JSON file (a directory: its bench_kernels.json)")
    parser.add_argument("--pack-rows", type=int, default=None,
                        help="rows of a packed decode tile (attention_plan.PACK_ROWS; default: the planner's)")
    args = parser.parse_args()
    if args.pack_rows:
        attention_plan.PACK_ROWS = args.pack_rows
    PAGE_SIZE, WIDE = args.page_size, args.wide
    if os.path.isdir(args.out):  # session 9 passed $OUT itself, and lost the variants' JSON at the end
        args.out = os.path.join(args.out, "bench_kernels.json")
    ceilings = device_ceilings()
    print(json.dumps(ceilings))
    report = {"ceilings": ceilings, "page_size": PAGE_SIZE, "check": [], "rows": []}
    if args.decode_variants or args.prefill_variants:
        if args.decode_variants:
            report["decode_variants"] = decode_variants(ceilings)
        if args.prefill_variants:
            report["prefill_variants"] = prefill_variants(ceilings)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        return
    if args.check:
        report["check"] = check_against_reference()
        print("check:", "ALL OK" if all(c["ok"] for c in report["check"]) else "FAILURES", flush=True)
    if args.sweep:
        report["sweep"] = sweep_tiles()
    if args.quick:
        grid = [(2048, b, s, 4) for b in (1, 4, 32, 256) for s in (64, 256, 1024)] + [(8192, 16, 256, 8)]
    else:
        grid = [(p, b, s, r) for r in (4, 8) for p in (512, 2048, 8192) for b in (1, 4, 16, 64, 256)
                for s in (64, 256, 1024)] + [(2048, 32, 256, 4)]
        grid += [(0, 1, s, r) for r in (4, 8) for s in (1024, 4096)]  # plain decode: no prefix at all
    extras = {(2048, b, 256, 4) for b in (1, 16, 32)}
    for p, b, s, r in grid:
        groups = max(1, args.requests // b)
        run_row(report, bench_decode, groups, b, p, s, r, ceilings, flex=(p, b, s, r) in extras,
                ref=(p, b, s, r) in extras)
        with open(args.out, "w") as f:  # after each row: a time limit keeps what ran
            json.dump(report, f, indent=1)
    for p in (512, 2048, 8192):
        for r in (4, 8):
            run_row(report, bench_prefill, 4, 512, p, r, ceilings)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print_summary(report)


def run_row(report: dict, bench, *args, **kwargs) -> None:
    try:
        row = bench(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - one failing row must not lose the others
        row = dict(kind="error", args=repr(args[:5]), error=repr(error)[:300])
        print("ERROR", row, flush=True)
    else:
        print(format_row(row), flush=True)
    report["rows"].append(row)
    torch.cuda.empty_cache()


def print_summary(report: dict) -> None:
    """The issue's targets, met or missed, from this run's rows."""
    rows = [r for r in report["rows"] if r["kind"] != "error"]
    bad = [r for r in rows if r["max_err_vs_sdpa"] > 3e-2]
    print(f"rows: {len(rows)} ok, {len(report['rows']) - len(rows)} errors, {len(bad)} over 3e-2 vs SDPA")
    decode = [r for r in rows if r["kind"] == "decode"]
    long_prefix = [r for r in decode if r["P"] >= 2048]
    if long_prefix:
        worst = min(long_prefix, key=lambda r: r["frac_copy_bw"])
        share = sum(r["frac_copy_bw"] >= 0.7 for r in long_prefix) / len(long_prefix)
        print(f"target decode >=70% copy BW (P>=2048): {100 * share:.0f}% of rows meet it; worst "
              f"{100 * worst['frac_copy_bw']:.1f}% at G={worst['G']} B={worst['B']} P={worst['P']} S={worst['S']} "
              f"gqa={worst['gqa']}")
        share = sum(decode_roofline_us(r, report["ceilings"]) / r["time_us"] >= 0.7 for r in long_prefix)
        print(f"  against max(bytes / copy BW, FLOPs / matmul rate) instead: {share} of {len(long_prefix)} rows >= 70%")
    for r in decode:
        if (r["P"], r["B"], r["S"], r["gqa"]) == (2048, 32, 256, 4):
            print(f"target >=3x SDPA at P=2048 B=32 S=256 gqa=4: {r['speedup_sdpa']:.2f}x")
    b1 = [r for r in decode if r["B"] == 1]
    if b1:
        worst = min(b1, key=lambda r: r["speedup_sdpa"])
        print(f"target B=1 never >10% slower than SDPA: worst {worst['speedup_sdpa']:.2f}x at P={worst['P']} "
              f"S={worst['S']} gqa={worst['gqa']}")
    for r in rows:
        if r["kind"] == "prefill" and r["P"] >= 2048:
            print(f"target prefill >=50% matmul (P={r['P']} gqa={r['gqa']}): {100 * r['frac_matmul']:.1f}% "
                  f"(as a graph replay: {100 * r['frac_matmul_graph']:.1f}%)")


def format_row(row: dict) -> str:
    extra = "".join(f" {k}={row[k]:.2f}x" for k in ("speedup_flex", "speedup_ref") if k in row)
    if row["kind"] == "decode":
        return (f"decode G={row['G']:4d} B={row['B']:3d} P={row['P']:5d} S={row['S']:5d} gqa={row['gqa']} "
                f"{row['time_us']:9.1f}us {row['GBps']:7.0f}GB/s {100 * row['frac_copy_bw']:5.1f}%copy "
                f"{100 * row.get('frac_roofline', float('nan')):5.1f}%roofline "
                f"sdpa {row['speedup_sdpa']:5.2f}x eager {row['eager_us']:8.1f}us "
                f"err {row['max_err_vs_sdpa']:.1e}{extra}")
    return (f"prefill B={row['B']} P={row['P']} chunk={row['S']} gqa={row['gqa']} {row['time_us']:9.1f}us "
            f"{row['TFLOPs']:6.0f}TFLOP/s {100 * row['frac_matmul']:5.1f}%mm sdpa {row['speedup_sdpa']:5.2f}x "
            f"graph {row['graph_us']:9.1f}us {100 * row['frac_matmul_graph']:5.1f}%mm err {row['max_err_vs_sdpa']:.1e}")


if __name__ == "__main__":
    sys.exit(main())
