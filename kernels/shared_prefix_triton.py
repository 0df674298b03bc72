"""Triton shared-prefix attention over the paged KV layout: decode and chunked prefill in one launch.

Algorithm (BatchLLM, arXiv 2412.03594, section 3.3 "horizontal fusion"; flash-decoding KV splits; the
online softmax of the Triton fused-attention tutorial, base-2 exponentials). Written from those
descriptions, no code copied.

  launch 1  `_partial_attention_kernel`, grid (num_programs,): programs loop over the plan's work items
            (kernels/attention_plan.py; one item per program unless the plan is a static one), each item
            on one KV head:
              prefix item: rows = (token, query head) pairs of ALL members of a group that are in this step
                (decode tokens and prefill chunks alike), BLOCK_M rows per tile; attends to one chunk of the
                group's prefix pages with no mask. The chunk is read once per tile, i.e. once per group when
                the group's rows fit one tile (B * ratio <= BLOCK_M); the tiles of a larger group get
                adjacent program ids and share the chunk through L2.
              own item: rows of one sequence; one chunk of its own pages, causal (row token i of a q_len
                chunk sees own positions <= own_len - q_len + i).
              fused item (kind 8): an own item of a member whose chunk fills large tiles alone (prefill;
                in steps whose items fill the GPU and only prefixes the planner would not split, since
                fused items are never split); it reads its group's prefix first, then its own pages, and writes its rows directly:
                no partials and no merge. Sharing the prefix tiles with other members saves nothing there (a
                tile never spans two such members), and the tiles of one prefix chunk still run adjacent.
              packed item (kind 16; decode tokens whose own KV is <= attention_plan.PACK_MAX_KEYS keys,
                PACK_MAX_KEYS_TMA with TMA): the tokens of PACK_ROWS // ratio consecutive sequences in one
                tile of PACK_ROWS (16) rows, one KV head; ONE key loop over all their own blocks,
                sequence-major, each block visible to its sequence's rows only (masked pointer loads,
                pipelined by the compiler; no key past a sequence's length is read). With TMA, each
                sequence's whole blocks come first, through TMA in one loop over the pack, then each
                sequence's partial last block, masked (see _attend_packed). One program per sequence and
                KV head left each program a short chain of dependent loads and 2 programs per SM (session
                14, Nsight Compute: 240 registers, 115 KB of shared memory); packed, the loads of several
                sequences stream through one pipeline. A prefix pack (fields 10-12 hold a prefix range,
                attention_plan's pack_prefix) reads its group's prefix first, every row seeing all of it:
                its rows get one partial, so no merge.
              wide item (opt-in): one decode token's query heads of every KV head; columns are (key token,
                KV head) pairs, so a key token's heads are one contiguous read; other heads' scores masked.
                Compiled only into launches whose plan may hold wide items (HAS_WIDE).
            Row sets of <= 16 rows (decode tokens) use a 16-row tile, larger ones the step's BLOCK_M (one
            compiled branch each), so decode tokens mixed into a prefill step waste no MMA rows.
            Query heads sharing a KV head are folded into rows (row = token * ratio + head), so any GQA
            ratio works, MHA (1) and non-powers of two (7) included.
            The key blocks that every row of a tile sees whole (below the causal limit of the tile's first
            row) run without masks; the causal diagonal and the tail run masked.
            A row with one partial result writes out/lse directly; others write (o, lse) to a workspace slot.
  launch 2  `_merge_kernel`, grid (T, Hq / BLOCK_H): log-sum-exp merge of each row's partials (skipped by
            the launcher when the plan has none, e.g. plain decode without prefixes or splits).
So a step costs 2 launches (1 without partials) against the reference code's 3 (kernel, reduction,
FlashAttention for ungrouped requests), with no minimum group size.

KV side of the paged contract (kernels/paged.py): k_cache/v_cache (num_pages, page_size, Hkv, D) with
identical strides, any page_size that is a power of two (blocks of BLOCK_N tokens gather their page ids
per token, so page_size may be smaller or larger than BLOCK_N), the last dim contiguous. Page-table
entries past a sequence's length are never read. q (T, Hq, D) with the last dim contiguous. The core
launcher takes own and prefix KV as separate tensors with explicit strides (the paged path passes the
same pool for both).

Limits: head_dim a power of two in [16, 256]; dtypes fp16/bf16 (fp32 for tests: exact "ieee" dots);
outputs in q's dtype, lse fp32 natural log; inference only (no backward); no sliding window, ALiBi or
softcap; KV in the query's dtype (no FP8 KV).

TMA key loads (`plan.use_tma`; by default in prefill steps and the engine's CUDA-graph decode steps whose
pages hold whole 64-key blocks, see attention_plan.tma_default; EngineConfig.attention_tma): the unmasked key blocks of an item whose
KV range starts on a BLOCK_N boundary are read through tensor descriptors over the pool viewed as
(pages * page_size, Hkv * D), one page lookup per block instead of one per key; the launcher turns them on
only for a contiguous shared pool whose pages hold whole blocks (page_size % BLOCK_N == 0) on sm_90 or later.
Compiled for sm_90a (benchmarks/compile_check.py, triton 3.9) the main loop becomes cp.async.bulk.tensor
with mbarrier waits. On the H200 they made prefill chunks 6-7% faster and, with fused items and 64 x 64
tiles, 13-20%. Decode steps timed from Python looked up to 1.7x slower with them (session 6's variant
tables), so decode kept pointer loads until session 13 found that was launch host time (two tensor
descriptors per launch): as CUDA-graph replays, the engine's decode path, decode steps with TMA, 64-row
tiles, 3 stages and page ids a block ahead took 3-32% less time on all 13 steps timed
(benchmarks/decode_anatomy.py). Decode steps planned per step, launched from Python, keep pointer loads.

Page ids prefetched (`plan.prefetch_pages`; the planner's default with TMA at head_dim <= 128): compiled for
sm_90a, a TMA key loop that looks each block's page id up right before its loads keeps two TMA buffers where
three stages are asked for (the lookup takes a pipeline stage); loading the id one block ahead, as a
loop-carried scalar, gives the third (64 x 64 prefill tiles with an unpipelined masked loop: 83 -> 116 KiB of
shared memory; 128 x 64 with 8 warps: 98 -> 132 KiB, the dense kernel's own figure). On the H200 (session 8,
`bench_kernels.py --prefill-variants`) prefill chunks went from 44-47% to 54-64% of the matmul rate. Decode
steps timed from Python moved by -25% to +8%; as CUDA-graph replays (session 13) the lookup before each
block's loads made them 0-27% slower than the prefetch, so TMA decode plans take it too.

Compiled branches: a plan made for its step launches one program per item (no grid-stride loop: the loop
kept each item's state live across iterations, and prefill tiles spilled 744 bytes with it against 32
without), and the kernel is compiled only with the branches its plan can hold (16-row, wide, fused; the
prefix and own large tiles share one branch when their tiles are equal). A static plan (CUDA graphs) also
launches one program per item slot by default (the idle ones exit at once); `num_programs=` selects the
grid-stride loop.

Tested: against `paged_attention_reference` (outputs and lse, NaN-poisoned outputs and workspace) under
TRITON_INTERPRET=1 on CPU (tests/kernels, triton 3.9), every change, TMA loads included, and inside the
engine through this kernel against HF generate (tests/engine). On one H200 (torch 2.11, triton 3.6):
every session's kernel through session 12 gave tokens identical to HF generate for 17 of 17 prompts in fp32
inside the engine (benchmarks/engine_gpu_check.py, eager and CUDA-graph decode; session 13 ran its bf16
half only: 16 of 17 as in every session, TMA decode included); session 5's full grid (`bench_kernels.py
--check`: 101 rows plus the real-shape checks against the reference, GQA 1/4/7/8, head dims 64/128/256,
fp16/bf16, splits, prefill chunks, a CUDA-graph replay) matched SDPA within 3e-2 on every row.
Measured (bf16, Hkv 8, D 128, 256 requests, page 16; benchmarks/results/2026-11-29-session5, the planner
of that session): decode reaches >= 70% of copy bandwidth on the must-read bytes in 22 of 61 P >= 2048
rows: 87-94% for groups of one, 60-89% for groups of 4, 8-75% for groups of 16-256, lowest with the
largest groups and the shortest own KV (8-55% at own length 64). Those rows read few bytes and do much
work per byte (every member's query heads against the whole prefix), yet reach only 7-29% of the matmul
rate too: neither roofline is reached; the kernel's inner loop (tensor-core efficiency, as in prefill)
and per-item latency limit them. Counting max(bytes / copy BW,
FLOPs / matmul rate) as the bound changes little (22 of 61 rows >= 70% either way). At P=2048, B=32,
S=256, GQA 4: 5.1x SDPA on duplicated KV, 3.4x FlexAttention; groups of one are 1.08-1.64x faster than
SDPA on every row. Prefill chunks (4 x 512 tokens): 29-30% of the bf16 matmul rate at P=2048, 39% at
P=8192 (0.73-0.88x SDPA flash). No tile, warp, stage or occupancy variant beats the planner's choice by
more than 6% (session 5's variant tables).
Session 6 (same H200 type; benchmarks/results/2026-11-29-session6): without the item loop and with only the
needed branches, decode steps took 2-38% less time (W-paper's decode step 305 -> 250 us, one group of 256
members 174 -> 108 us) and prefill chunks 7-11% less; with fused items, 64 x 64 tiles and TMA, prefill
chunks reach 42-47% of the matmul rate (4 x 512 tokens at P = 2048: 340 -> 226 us). The ceiling
(benchmarks/attention_ceiling.py): a dense Triton flash kernel without pages reaches 62-74% on the same
shapes (128 x 128 tiles, 8 warps, TMA over contiguous KV), SDPA flash 36-43%, cuDNN 32-40%; 128-key TMA
blocks need pages of 128 tokens, and the engine's are 64.
Session 13 (benchmarks/results/2026-11-30-session13; decode rows now timed as CUDA-graph replays, the
engine's decode path): with TMA decode steps, 40 of 61 P >= 2048 rows reach 70% of copy bandwidth (groups
of one and of 4: 78-105%), 8.13x SDPA at the target row; prefill chunks 56-67% of the matmul rate. The 21
misses are groups of 16-256 members. There the own items, one per sequence and KV head over a short own KV,
read at about 30% of copy bandwidth (per-item latency; benchmarks/decode_anatomy.py splits a step by item
kind), and neither wide own items, a 16-row-only kernel, programs looping over items, nor loading item
fields and output slots ahead of the key loops changed that.
Session 14 (benchmarks/results/2026-11-30-session14): packed items (above) for own ranges <= 128 keys: own
items of 4 x 64 members at S = 64 in 40 us instead of 49 (Nsight Compute: 28.6 against 38.6 us for the
kernel alone); the grid's S = 64 rows of groups of 16-256 took 4-17% less time, 42 of 61 P >= 2048 rows reach
70% of copy bandwidth; W-large (64 x 64 members, own KV 32-192 keys) ran 1.43x faster end to end. Packing
longer ranges was slower (pointer loads against TMA at S >= 256). A plain read of the same 67 MB
(benchmarks/read_floor.py) takes 20.8 us, 76% of copy bandwidth, whatever the access pattern: steps that
read ~70-130 MB cannot reach 70% of copy bandwidth unless they run within ~80-93% of a plain read.
Session 15 (benchmarks/results/2026-11-30-session15): packed items read whole blocks through TMA and pack up
to 256 keys with TMA (the 18 remaining misses of the grid took 3-10% less time; 1024 keys was slower at
S = 1024), and prefix packs at GQA 8 (8-24% less time at P <= 2048, S <= 256): 43 of 61 rows. Tried and
dropped: merging in the attention launch (the last program to write a row's partial merges it, after an
acq_rel atomic count per row) was 1-17 us slower on all 16 steps timed: each program's epilogue became a
chain of barrier, atomic round trip and L2 reads, with only 2 programs per SM to hide it; the patch is kept
in that folder.
Session 16 (benchmarks/results/2026-11-30-session16): the grid's misses taken apart (`--set split`): at
S = 64 the prefix items alone take 50-84 us of a 71-113 us step, at S = 256 the own items alone 88-90 us
(72% of copy bandwidth over 268 MB) of 98-151. Deeper pipelines did not help (`--set deep`: 4 stages, or
prefix packs of 128 rows with 8 warps, were slower on all 18 misses), and triton 3.6's automatic warp
specialization does not compile this kind of loop for sm_90a (an assertion in its Hopper pass at 4 warps,
no partitioning at 8). Packed items now read each member's whole blocks through TMA (above): decode steps of
mixed own lengths take up to 22% less time; 42 of 61 grid rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_plan import NUM_FIELDS, PACK_MAX_SEQS, PagedAttentionPlan

try:  # tensor descriptors (TMA on Hopper): triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: pointer loads only
    TensorDescriptor = None
from .paged import PagedAttentionMetadata

_PACK_SEQS = tl.constexpr(PACK_MAX_SEQS)  # the member vector of packed items: as wide as the planner's cap

_LOG2E = 1.4426950408889634
# (head, dim) elements per merge program: its query heads are MERGE_ELEMENTS // head_dim. Session 13
# (benchmarks/decode_anatomy.py --set merge, 8 decode steps as CUDA-graph replays): the merge launch takes
# 6-11 us of a step; programs of 1024 elements (8 heads at head_dim 128) took 0.5-3.8 us less per step than
# 4096 on all 8 steps, 2048 and 512 about as much.
MERGE_ELEMENTS = 1024
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _partial_attention_kernel(
    q_ptr, k_ptr, v_ptr, prefix_k_ptr, prefix_v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    items_ptr, num_items_ptr, num_parts_ptr, part_start_ptr, token_kv_ptr, own_pages_ptr, prefix_pages_ptr,
    k_desc, v_desc,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_pkp, stride_pkt, stride_pkh,
    stride_ot, stride_oh, stride_own_pages, stride_prefix_pages,
    ratio, num_q_heads, num_kv_heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M_PREFIX: tl.constexpr, BLOCK_M_OWN: tl.constexpr, BLOCK_M_WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_N_WIDE: tl.constexpr, KV_HEADS_TILE: tl.constexpr, HAS_WIDE: tl.constexpr,
    HAS_SMALL: tl.constexpr, HAS_FUSED: tl.constexpr, HAS_PACKED: tl.constexpr, BLOCK_M_PACKED: tl.constexpr,
    GRID_STRIDE: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_FIELDS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    MASKED_STAGES: tl.constexpr, USE_TMA: tl.constexpr, PREFETCH_PAGES: tl.constexpr, PACK_TMA: tl.constexpr,
):
    # A static plan (CUDA graphs) launches a few programs per SM whatever its capacity: they grid-stride over
    # the items (no idle tail). A plan made for its step launches one program per item, and runs without
    # that loop: the loop keeps the item's state live across iterations and multiplied the prefill tiles'
    # register spills (benchmarks/compile_check.py: 744 bytes with it, 32 without). The two call sites stay
    # separate on purpose: one loop whose bounds allow a single iteration spills as much as the loop (636).
    if GRID_STRIDE:
        for item in range(tl.program_id(0), tl.load(num_items_ptr), tl.num_programs(0)):
            _run_item(q_ptr, k_ptr, v_ptr, prefix_k_ptr, prefix_v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                      items_ptr, item, num_parts_ptr, part_start_ptr, token_kv_ptr, own_pages_ptr, prefix_pages_ptr,
                      k_desc, v_desc,
                      stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_pkp, stride_pkt, stride_pkh,
                      stride_ot, stride_oh, stride_own_pages, stride_prefix_pages, ratio, num_q_heads, num_kv_heads,
                      qk_scale, HEAD_DIM, BLOCK_M_PREFIX, BLOCK_M_OWN, BLOCK_M_WIDE, BLOCK_N, BLOCK_N_WIDE,
                      KV_HEADS_TILE, HAS_WIDE, HAS_SMALL, HAS_FUSED, HAS_PACKED, BLOCK_M_PACKED, PAGE_SIZE, NUM_FIELDS,
                      DOT_PRECISION, DOT_DTYPE, MASKED_STAGES, USE_TMA, PREFETCH_PAGES, PACK_TMA)
    else:
        item = tl.program_id(0)
        if item < tl.load(num_items_ptr):
            _run_item(q_ptr, k_ptr, v_ptr, prefix_k_ptr, prefix_v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                      items_ptr, item, num_parts_ptr, part_start_ptr, token_kv_ptr, own_pages_ptr, prefix_pages_ptr,
                      k_desc, v_desc,
                      stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_pkp, stride_pkt, stride_pkh,
                      stride_ot, stride_oh, stride_own_pages, stride_prefix_pages, ratio, num_q_heads, num_kv_heads,
                      qk_scale, HEAD_DIM, BLOCK_M_PREFIX, BLOCK_M_OWN, BLOCK_M_WIDE, BLOCK_N, BLOCK_N_WIDE,
                      KV_HEADS_TILE, HAS_WIDE, HAS_SMALL, HAS_FUSED, HAS_PACKED, BLOCK_M_PACKED, PAGE_SIZE, NUM_FIELDS,
                      DOT_PRECISION, DOT_DTYPE, MASKED_STAGES, USE_TMA, PREFETCH_PAGES, PACK_TMA)


@triton.jit
def _run_item(
    q_ptr, k_ptr, v_ptr, prefix_k_ptr, prefix_v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    items_ptr, item, num_parts_ptr, part_start_ptr, token_kv_ptr, own_pages_ptr, prefix_pages_ptr, k_desc, v_desc,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_pkp, stride_pkt, stride_pkh,
    stride_ot, stride_oh, stride_own_pages, stride_prefix_pages,
    ratio, num_q_heads, num_kv_heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M_PREFIX: tl.constexpr, BLOCK_M_OWN: tl.constexpr, BLOCK_M_WIDE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_N_WIDE: tl.constexpr, KV_HEADS_TILE: tl.constexpr, HAS_WIDE: tl.constexpr,
    HAS_SMALL: tl.constexpr, HAS_FUSED: tl.constexpr, HAS_PACKED: tl.constexpr, BLOCK_M_PACKED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, NUM_FIELDS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    MASKED_STAGES: tl.constexpr, USE_TMA: tl.constexpr, PREFETCH_PAGES: tl.constexpr, PACK_TMA: tl.constexpr,
):
    fields = items_ptr + item * NUM_FIELDS
    kind = tl.load(fields + 0)
    table_row = tl.load(fields + 1).to(tl.int64)
    kv_head = tl.load(fields + 9)
    # Own KV and prefix KV may live in different tensors (the dense layout): pick pointers and strides.
    is_prefix = (kind % 2).to(tl.int64)
    page_stride = is_prefix * stride_pkp + (1 - is_prefix) * stride_kp
    token_stride = is_prefix * stride_pkt + (1 - is_prefix) * stride_kt
    head_stride = is_prefix * stride_pkh + (1 - is_prefix) * stride_kh
    if kind % 2 == 1:
        table = prefix_pages_ptr + table_row * stride_prefix_pages
        keys_ptr = prefix_k_ptr
        values_ptr = prefix_v_ptr
    else:
        table = own_pages_ptr + table_row * stride_own_pages
        keys_ptr = k_ptr
        values_ptr = v_ptr
    # Wide items (kind bit 2): all KV heads of a few tokens in one program, rows = (token, query head),
    # columns = (key token, KV head), so each key token's heads are one contiguous read. Small items
    # (bit 1): decode-sized row sets of one KV head in a 16-row tile. Else the step's large tiles: one
    # compiled branch for prefix and own items when their tiles are equal (each branch instantiation keeps
    # its own pipeline buffers and registers). Branches of kinds a plan cannot hold are not compiled.
    if kind >= 16:
        if HAS_PACKED:  # decode tokens of several sequences, one KV head: their own KV blocks in one loop
            _attend_packed(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, fields, num_parts_ptr,
                           part_start_ptr, token_kv_ptr, own_pages_ptr, stride_own_pages, stride_qt, stride_qh,
                           stride_kp, stride_kt, stride_kh, stride_ot, stride_oh, kv_head, ratio, num_q_heads,
                           num_kv_heads, qk_scale, HEAD_DIM, BLOCK_M_PACKED, BLOCK_N, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE,
                           k_desc, v_desc, USE_TMA and PACK_TMA, PREFETCH_PAGES, MASKED_STAGES, prefix_pages_ptr,
                           stride_prefix_pages, prefix_k_ptr, prefix_v_ptr, stride_pkp, stride_pkt, stride_pkh, USE_TMA)
    elif kind >= 8:
        if HAS_FUSED:  # own KV after the group's prefix, in one program (plans made for their step only)
            _attend_tile(q_ptr, keys_ptr, values_ptr, k_desc, v_desc, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                         fields, table, num_parts_ptr, part_start_ptr, stride_qt, stride_qh, page_stride, token_stride,
                         head_stride, stride_ot, stride_oh, kv_head, ratio, ratio, num_q_heads, num_kv_heads, qk_scale,
                         HEAD_DIM, BLOCK_M_OWN, BLOCK_N, 1, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, MASKED_STAGES,
                         USE_TMA, True, prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr, prefix_v_ptr,
                         stride_pkp, stride_pkt, stride_pkh, PREFETCH_PAGES)
    elif kind >= 4:
        if HAS_WIDE:  # compiled only for plans that hold wide items
            _attend_tile(q_ptr, keys_ptr, values_ptr, k_desc, v_desc, out_ptr, lse_ptr, part_out_ptr,
                         part_lse_ptr, fields, table, num_parts_ptr, part_start_ptr, stride_qt, stride_qh,
                         page_stride, token_stride, head_stride, stride_ot, stride_oh, 0, num_q_heads, ratio,
                         num_q_heads, num_kv_heads, qk_scale, HEAD_DIM, BLOCK_M_WIDE, BLOCK_N_WIDE, KV_HEADS_TILE,
                         PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, MASKED_STAGES, False, False, prefix_pages_ptr,
                         stride_prefix_pages, prefix_k_ptr, prefix_v_ptr, stride_pkp, stride_pkt, stride_pkh, PREFETCH_PAGES)
    elif kind >= 2:
        if HAS_SMALL:  # compiled only for plans that may hold decode-sized row sets
            _attend_tile(q_ptr, keys_ptr, values_ptr, k_desc, v_desc, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                         fields, table, num_parts_ptr, part_start_ptr, stride_qt, stride_qh, page_stride, token_stride,
                         head_stride, stride_ot, stride_oh, kv_head, ratio, ratio, num_q_heads, num_kv_heads, qk_scale,
                         HEAD_DIM, 16, BLOCK_N, 1, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, MASKED_STAGES, USE_TMA, False,
                         prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr, prefix_v_ptr, stride_pkp, stride_pkt,
                         stride_pkh, PREFETCH_PAGES)
    elif BLOCK_M_PREFIX == BLOCK_M_OWN:
        _attend_tile(q_ptr, keys_ptr, values_ptr, k_desc, v_desc, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                     fields, table, num_parts_ptr, part_start_ptr, stride_qt, stride_qh, page_stride, token_stride,
                     head_stride, stride_ot, stride_oh, kv_head, ratio, ratio, num_q_heads, num_kv_heads, qk_scale,
                     HEAD_DIM, BLOCK_M_PREFIX, BLOCK_N, 1, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, MASKED_STAGES,
                     USE_TMA, False, prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr, prefix_v_ptr, stride_pkp,
                     stride_pkt, stride_pkh, PREFETCH_PAGES)
    elif kind == 1:
        _attend_tile(q_ptr, keys_ptr, values_ptr, k_desc, v_desc, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                     fields, table, num_parts_ptr, part_start_ptr, stride_qt, stride_qh, page_stride, token_stride,
                     head_stride, stride_ot, stride_oh, kv_head, ratio, ratio, num_q_heads, num_kv_heads, qk_scale,
                     HEAD_DIM, BLOCK_M_PREFIX, BLOCK_N, 1, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, MASKED_STAGES,
                     USE_TMA, False, prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr, prefix_v_ptr, stride_pkp,
                     stride_pkt, stride_pkh, PREFETCH_PAGES)
    else:
        _attend_tile(q_ptr, keys_ptr, values_ptr, k_desc, v_desc, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
                     fields, table, num_parts_ptr, part_start_ptr, stride_qt, stride_qh, page_stride, token_stride,
                     head_stride, stride_ot, stride_oh, kv_head, ratio, ratio, num_q_heads, num_kv_heads, qk_scale,
                     HEAD_DIM, BLOCK_M_OWN, BLOCK_N, 1, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, MASKED_STAGES,
                     USE_TMA, False, prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr, prefix_v_ptr, stride_pkp,
                     stride_pkt, stride_pkh, PREFETCH_PAGES)


@triton.jit
def _attend_tile(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, fields, table,
    num_parts_ptr, part_start_ptr,
    stride_qt, stride_qh, page_stride, token_stride, head_stride, stride_ot, stride_oh,
    kv_head, row_heads, ratio, num_q_heads, num_kv_heads, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_HEADS_TILE: tl.constexpr,
    PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, MASKED_STAGES: tl.constexpr,
    USE_TMA: tl.constexpr, FUSED: tl.constexpr, prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr, prefix_v_ptr,
    prefix_page_stride, prefix_token_stride, prefix_head_stride, PREFETCH_PAGES: tl.constexpr,
):
    """One tile of rows against one KV range (FUSED: its group's prefix range first, unmasked but for the
    tail, then the own range). Rows: row = token * row_heads + h, query head
    kv_head * ratio + h (one KV head: row_heads = ratio; wide: row_heads = Hq, kv_head = 0). Columns: key
    token c // KV_HEADS_TILE of KV head kv_head + c % KV_HEADS_TILE (1 head per column block unless wide);
    a row sees the columns of its own KV head only."""
    tok_lo = tl.load(fields + 2)
    num_rows = tl.load(fields + 3)
    row_lo = tl.load(fields + 4)
    kv_lo = tl.load(fields + 5)
    kv_hi = tl.load(fields + 6)
    slot_offset = tl.load(fields + 7)
    causal_base = tl.load(fields + 8)
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    tokens = (tok_lo + rows // row_heads).to(tl.int64)
    heads = kv_head * ratio + rows % row_heads
    positions = causal_base + rows // row_heads  # last visible key of each row (prefix: no limit)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None], other=0.0).to(DOT_DTYPE)
    columns = tl.arange(0, BLOCK_N)
    column_heads = kv_head + columns % KV_HEADS_TILE
    column_offset = column_heads.to(tl.int64) * head_stride

    # Reductions are tl.reduce with triton.language.standard's own combiners (what tl.max / tl.sum compile
    # to), zeros are tl.full: the CPU interpreter maps these to numpy even when triton was imported before
    # TRITON_INTERPRET=1 was set (a full pytest run), where calling tl.max / tl.sum / tl.zeros fails.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    step = BLOCK_N // KV_HEADS_TILE
    if FUSED:  # the group's prefix: every row sees all of it
        acc, m_i, l_i = _attend_prefix(q, acc, m_i, l_i, fields, prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr,
                                       prefix_v_ptr, prefix_page_stride, prefix_token_stride, prefix_head_stride,
                                       columns, column_heads, dims, heads, ratio, num_kv_heads, qk_scale, kv_head,
                                       k_desc, v_desc, BLOCK_N, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, MASKED_STAGES,
                                       USE_TMA, PREFETCH_PAGES)
    # Key blocks that every row of the tile sees whole (below the causal limit of its first row and below
    # kv_hi) run without masks; the rest (the causal diagonal, the tail, wide items' head mask) with them.
    if KV_HEADS_TILE == 1:
        full_hi = kv_lo + tl.maximum(tl.minimum(kv_hi, causal_base + row_lo // row_heads + 1) - kv_lo, 0) // step * step
    else:
        full_hi = kv_lo
    if USE_TMA:  # TMA reads whole BLOCK_N-key blocks of one page: the unmasked blocks must start aligned
        full_hi = tl.where(kv_lo % BLOCK_N == 0, full_hi, kv_lo)
    own_prefetch: tl.constexpr = USE_TMA and PREFETCH_PAGES
    if own_prefetch:
        next_own_page = tl.load(table + tl.minimum(kv_lo, tl.maximum(kv_hi - 1, 0)) // PAGE_SIZE)
    for start in range(kv_lo, full_hi, step):
        page = 0
        if own_prefetch:
            page = next_own_page
            next_own_page = tl.load(table + tl.minimum(start + step, kv_hi - 1) // PAGE_SIZE)
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, kv_hi, table, k_ptr, v_ptr, page_stride, token_stride,
                                      column_offset, columns, column_heads, dims, positions, heads, ratio,
                                      num_kv_heads, qk_scale, KV_HEADS_TILE, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE,
                                      False, k_desc, v_desc, kv_head, USE_TMA, page, own_prefetch)
    # The masked loop runs the causal diagonal and the tail: a block or two (one in decode), but the whole
    # range for wide items. MASKED_STAGES=1 leaves it unpipelined, which frees its shared-memory buffers
    # (benchmarks/compile_check.py).
    for start in tl.range(full_hi, kv_hi, step, num_stages=MASKED_STAGES):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, kv_hi, table, k_ptr, v_ptr, page_stride, token_stride,
                                      column_offset, columns, column_heads, dims, positions, heads, ratio,
                                      num_kv_heads, qk_scale, KV_HEADS_TILE, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE,
                                      True, k_desc, v_desc, kv_head, False, 0, False)

    _write_rows(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, num_parts_ptr, part_start_ptr, acc, m_i, l_i, tokens,
                heads, row_valid, dims, slot_offset, stride_ot, stride_oh, num_q_heads, HEAD_DIM)


@triton.jit
def _attend_prefix(q, acc, m_i, l_i, fields, prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr, prefix_v_ptr,
                   prefix_page_stride, prefix_token_stride, prefix_head_stride, columns, column_heads, dims, heads,
                   ratio, num_kv_heads, qk_scale, kv_head, k_desc, v_desc, BLOCK_N: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   MASKED_STAGES: tl.constexpr, USE_TMA: tl.constexpr, PREFETCH_PAGES: tl.constexpr):
    """A tile's rows against their group's prefix keys [field 11, field 12) of prefix page-table row field 10,
    every row seeing all of them: whole blocks unmasked (TMA where the launch uses it, when the range starts
    on a block boundary), the tail masked. Fused items (prefill) and packed items with a prefix (decode)."""
    prefix_lo = tl.load(fields + 11)
    prefix_hi = tl.load(fields + 12)
    prefix_table = prefix_pages_ptr + tl.load(fields + 10).to(tl.int64) * stride_prefix_pages
    prefix_columns = kv_head.to(tl.int64) * prefix_head_stride + columns * 0
    prefix_full_hi = prefix_lo + (prefix_hi - prefix_lo) // BLOCK_N * BLOCK_N
    if USE_TMA:
        prefix_full_hi = tl.where(prefix_lo % BLOCK_N == 0, prefix_full_hi, prefix_lo)
    prefetch: tl.constexpr = USE_TMA and PREFETCH_PAGES  # page ids a block ahead (see _attend_block)
    if prefetch:
        next_page = tl.load(prefix_table + tl.minimum(prefix_lo, tl.maximum(prefix_hi - 1, 0)) // PAGE_SIZE)
    no_limit = heads * 0 + (1 << 30)
    for start in range(prefix_lo, prefix_full_hi, BLOCK_N):
        page = 0
        if prefetch:
            page = next_page
            next_page = tl.load(prefix_table + tl.minimum(start + BLOCK_N, prefix_hi - 1) // PAGE_SIZE)
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, prefix_hi, prefix_table, prefix_k_ptr, prefix_v_ptr,
                                      prefix_page_stride, prefix_token_stride, prefix_columns, columns,
                                      column_heads, dims, no_limit, heads, ratio, num_kv_heads, qk_scale,
                                      1, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, False, k_desc, v_desc,
                                      kv_head, USE_TMA, page, prefetch)
    for start in tl.range(prefix_full_hi, prefix_hi, BLOCK_N, num_stages=MASKED_STAGES):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, prefix_hi, prefix_table, prefix_k_ptr, prefix_v_ptr,
                                      prefix_page_stride, prefix_token_stride, prefix_columns, columns,
                                      column_heads, dims, no_limit, heads, ratio, num_kv_heads, qk_scale,
                                      1, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, True, k_desc, v_desc,
                                      kv_head, False, 0, False)
    return acc, m_i, l_i


@triton.jit
def _attend_packed(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, fields, num_parts_ptr,
                   part_start_ptr, token_kv_ptr, own_pages_ptr, stride_own_pages, stride_qt, stride_qh, page_stride,
                   token_stride, head_stride, stride_ot, stride_oh, kv_head, ratio, num_q_heads, num_kv_heads,
                   qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, k_desc, v_desc, USE_TMA: tl.constexpr,
                   PREFETCH_PAGES: tl.constexpr, MASKED_STAGES: tl.constexpr, prefix_pages_ptr, stride_prefix_pages,
                   prefix_k_ptr, prefix_v_ptr, prefix_page_stride, prefix_token_stride, prefix_head_stride,
                   PREFIX_TMA: tl.constexpr):
    """A packed item: the decode tokens of consecutive sequences seq0 .. seq0 + n - 1 (one query token each,
    rows = token * ratio + h in one BLOCK_M-row tile) against their own KV on one KV head, in ONE key loop over
    the n * blocks_per_seq blocks (sequence-major): block b is sequence b // blocks_per_seq's block
    b % blocks_per_seq, its keys < that token's own length (token_kv) are visible to that sequence's rows
    only. So several short own ranges stream through one pipelined loop (pointer loads, masked, which also
    skip the blocks past a shorter sequence's length) instead of one program each paying the start-up
    latency of its item fields, page id and first KV load.
    USE_TMA: every sequence's whole blocks (own_j // BLOCK_N, all starting on a page's block boundary: packed ranges
    start at key 0) come first, through TMA in ONE loop over the pack's whole blocks; then each sequence's partial
    last block, masked to its own length, in the masked loop (which TMA plans leave unpipelined: MASKED_STAGES).
    Session 15 read only the blocks below the pack's SHORTEST length through TMA, so a pack with one member under a
    block ran all its blocks unpipelined: on steps of mixed own lengths (the engine's) that made TMA packs 5-23%
    slower than pointer-load packs; with this layout those steps take up to 22% less time than with session 15's
    (session 16, decode_anatomy.py --set mixed). The block's sequence is found with reductions over a vector of the
    pack's members as wide as the planner's cap (attention_plan.PACK_MAX_SEQS, 32): one warp holds it, so no shared
    memory or barrier enters the key loop (over the 64-wide row vector those reductions made 64-row prefix packs 19%
    slower than session 15's loop)."""
    seq0 = tl.load(fields + 1)
    tok_lo = tl.load(fields + 2)
    num_rows = tl.load(fields + 3)
    slot_offset = tl.load(fields + 7)
    blocks_per_seq = tl.cdiv(tl.load(fields + 4), BLOCK_N)  # field 4: the pack's longest own range
    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    row_seq = rows // ratio
    tokens = (tok_lo + row_seq).to(tl.int64)
    heads = kv_head * ratio + rows % ratio
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_valid[:, None], other=0.0).to(DOT_DTYPE)
    columns = tl.arange(0, BLOCK_N)
    column_offset = kv_head.to(tl.int64) * head_stride + columns * 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    if tl.load(fields + 12) > tl.load(fields + 11):  # a packed item with its group's prefix (pack_prefix)
        acc, m_i, l_i = _attend_prefix(q, acc, m_i, l_i, fields, prefix_pages_ptr, stride_prefix_pages, prefix_k_ptr,
                                       prefix_v_ptr, prefix_page_stride, prefix_token_stride, prefix_head_stride,
                                       columns, columns, dims, heads, ratio, num_kv_heads, qk_scale, kv_head, k_desc,
                                       v_desc, BLOCK_N, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, MASKED_STAGES,
                                       PREFIX_TMA, PREFETCH_PAGES)
    num_seqs = num_rows // ratio
    if USE_TMA:
        # Member j's whole blocks (own_j // BLOCK_N of them) run through TMA in one loop over all members' whole
        # blocks (member-major, see _pack_block_of); then each member's partial last block, masked, in the masked
        # loop. The members are one vector of PACK_MAX_SEQS (32, the planner's cap): one warp holds it, so the
        # lookups stay within a warp (no shared memory, no barrier in the key loop).
        seqs = tl.arange(0, _PACK_SEQS)
        lens = tl.load(token_kv_ptr + tok_lo + seqs, mask=seqs < num_seqs, other=0)
        whole = lens // BLOCK_N
        ends = tl.associative_scan(whole, 0, tl.standard._sum_combine)
        starts = ends - whole
        total = tl.reduce(whole, 0, tl.standard._sum_combine)
        tables = own_pages_ptr + seq0.to(tl.int64) * stride_own_pages
        if PREFETCH_PAGES:  # page ids a block ahead (see _attend_block); block 0 is the first member with one
            # (clamped to the pack: with no whole block at all the count would point past its last member's row)
            first_j, _ = _pack_block_of(0, seqs, ends, starts)
            next_page = tl.load(tables + tl.minimum(first_j, num_seqs - 1) * stride_own_pages)
        for b in range(0, total):
            j, block = _pack_block_of(b, seqs, ends, starts)
            start = block * BLOCK_N
            page = 0
            if PREFETCH_PAGES:
                page = next_page
                after_j, after_block = _pack_block_of(tl.minimum(b + 1, total - 1), seqs, ends, starts)
                next_page = tl.load(tables + after_j * stride_own_pages + after_block * BLOCK_N // PAGE_SIZE)
            positions = tl.where(row_seq == j, 1 << 30, -1)  # other sequences' rows see none of this block
            acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start, 1 << 30, tables + j * stride_own_pages, k_ptr,
                                          v_ptr, page_stride, token_stride, column_offset, columns, columns, dims,
                                          positions, heads, ratio, num_kv_heads, qk_scale, 1, PAGE_SIZE,
                                          DOT_PRECISION, DOT_DTYPE, True, k_desc, v_desc, kv_head, True, page,
                                          PREFETCH_PAGES)
        for j in tl.range(0, num_seqs, num_stages=MASKED_STAGES):
            kv_len = tl.load(token_kv_ptr + tok_lo + j)
            if kv_len % BLOCK_N != 0:
                acc, m_i, l_i = _packed_block(q, acc, m_i, l_i, j, 1, kv_len // BLOCK_N, seq0, tok_lo, token_kv_ptr,
                                              own_pages_ptr, stride_own_pages, k_ptr, v_ptr, page_stride,
                                              token_stride, column_offset, columns, dims, row_seq, heads, ratio,
                                              num_kv_heads, qk_scale, BLOCK_N, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE,
                                              k_desc, v_desc, kv_head)
    else:
        for b in range(0, num_seqs * blocks_per_seq):
            acc, m_i, l_i = _packed_block(q, acc, m_i, l_i, b, blocks_per_seq, 0, seq0, tok_lo, token_kv_ptr,
                                          own_pages_ptr, stride_own_pages, k_ptr, v_ptr, page_stride, token_stride,
                                          column_offset, columns, dims, row_seq, heads, ratio, num_kv_heads, qk_scale,
                                          BLOCK_N, PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, k_desc, v_desc, kv_head)
    _write_rows(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, num_parts_ptr, part_start_ptr, acc, m_i, l_i, tokens,
                heads, row_valid, dims, slot_offset, stride_ot, stride_oh, num_q_heads, HEAD_DIM)


@triton.jit
def _pack_block_of(b, seqs, ends, starts):
    """(member j, j's block index) of whole block b of a packed item: the member whose [starts_j, ends_j) holds
    b (ends: the members' running whole-block counts; members without a whole block are skipped)."""
    j = tl.reduce((ends <= b).to(tl.int32), 0, tl.standard._sum_combine)
    return j, b - tl.reduce(tl.where(seqs == j, starts, 0), 0, tl.standard._sum_combine)


@triton.jit
def _packed_block(q, acc, m_i, l_i, b, per_seq, first_block, seq0, tok_lo, token_kv_ptr, own_pages_ptr,
                  stride_own_pages, k_ptr, v_ptr, page_stride, token_stride, column_offset, columns, dims, row_seq,
                  heads, ratio, num_kv_heads, qk_scale, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, k_desc, v_desc, kv_head):
    """Masked pointer-load block b of a packed item: sequence b // per_seq's block first_block + b % per_seq,
    visible to that sequence's rows and below its token's own length only."""
    j = b // per_seq
    start = (first_block + b - j * per_seq) * BLOCK_N
    kv_len = tl.load(token_kv_ptr + tok_lo + j)
    table = own_pages_ptr + (seq0 + j).to(tl.int64) * stride_own_pages
    positions = tl.where(row_seq == j, 1 << 30, -1)  # other sequences' rows see none of this block
    return _attend_block(q, acc, m_i, l_i, start, kv_len, table, k_ptr, v_ptr, page_stride, token_stride,
                         column_offset, columns, columns, dims, positions, heads, ratio, num_kv_heads, qk_scale, 1,
                         PAGE_SIZE, DOT_PRECISION, DOT_DTYPE, True, k_desc, v_desc, kv_head, False, 0, False)


@triton.jit
def _write_rows(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, num_parts_ptr, part_start_ptr, acc, m_i, l_i, tokens,
                heads, row_valid, dims, slot_offset, stride_ot, stride_oh, num_q_heads, HEAD_DIM: tl.constexpr):
    """Normalise a tile's rows and write them: to out/lse where the row has one partial, else to its
    workspace slot (part_start[token] + slot_offset) for the merge."""
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    num_parts = tl.load(num_parts_ptr + tokens, mask=row_valid, other=1)
    direct = row_valid & (num_parts == 1)
    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=direct[:, None])
    tl.store(lse_ptr + tokens * num_q_heads + heads, lse, mask=direct)
    split = row_valid & (num_parts > 1)
    slots = (tl.load(part_start_ptr + tokens, mask=split, other=0) + slot_offset).to(tl.int64)
    slot_rows = slots * num_q_heads + heads
    tl.store(part_out_ptr + slot_rows[:, None] * HEAD_DIM + dims[None, :], o, mask=split[:, None])
    tl.store(part_lse_ptr + slot_rows, lse, mask=split)


@triton.jit
def _attend_block(q, acc, m_i, l_i, start, kv_hi, table, k_ptr, v_ptr, page_stride, token_stride, column_offset,
                  columns, column_heads, dims, positions, heads, ratio, num_kv_heads, qk_scale,
                  KV_HEADS_TILE: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  DOT_DTYPE: tl.constexpr, MASKED: tl.constexpr, k_desc, v_desc, kv_head, USE_TMA: tl.constexpr,
                  page, PAGE_GIVEN: tl.constexpr):
    """Online-softmax update of one key block (base-2 exponentials). MASKED=False: every column is a valid
    key that every row sees (no masks on the loads or the scores). USE_TMA (unmasked blocks only): the block
    is BLOCK_N consecutive keys of one page, read through tensor descriptors over the pool viewed as
    (pages * page_size, Hkv * D); its page id is `page` when PAGE_GIVEN (the caller loaded it a block ahead:
    `plan.prefetch_pages`), else looked up here, right before the loads that need it. Compiled for sm_90a,
    that dependent lookup left the TMA loop two buffers deep where three stages were asked for, and loading
    it a block ahead gives the third (benchmarks/attention_ceiling.py's ladder kernel: 83 -> 116 KiB)."""
    keys = start + columns // KV_HEADS_TILE
    if MASKED:
        key_valid = keys < kv_hi
        if KV_HEADS_TILE > 1:
            key_valid = key_valid & (column_heads < num_kv_heads)
    if USE_TMA:
        if not PAGE_GIVEN:
            page = tl.load(table + start // PAGE_SIZE)
        row = page * PAGE_SIZE + start % PAGE_SIZE
        k = k_desc.load([row, kv_head * q.shape[1]])
        v = v_desc.load([row, kv_head * q.shape[1]])
    elif MASKED:
        pages = tl.load(table + keys // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
        offsets = pages * page_stride + (keys % PAGE_SIZE) * token_stride + column_offset
        k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)
        v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=key_valid[:, None], other=0.0)
    else:
        pages = tl.load(table + keys // PAGE_SIZE).to(tl.int64)
        offsets = pages * page_stride + (keys % PAGE_SIZE) * token_stride + column_offset
        k = tl.load(k_ptr + offsets[:, None] + dims[None, :])
        v = tl.load(v_ptr + offsets[:, None] + dims[None, :])
    # Raw scores; the scale folds into the exponent's argument (one FMA per score instead of a multiply and
    # a subtract: the softmax, not the MMAs, bounds a Hopper flash loop). m_i is in scaled units.
    scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    if MASKED:
        visible = key_valid[None, :] & (keys[None, :] <= positions[:, None])
        if KV_HEADS_TILE > 1:
            visible = visible & (column_heads[None, :] == (heads // ratio)[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(scores, 1, tl.standard._elementwise_max) * qk_scale)
    if MASKED:  # a row may have seen no key yet: keep exp2's argument finite
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # every row saw this block's keys: m_new is finite
        m_safe = m_new
    p = tl.exp2(scores * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, num_parts_ptr, part_start_ptr,
    stride_ot, stride_oh, num_q_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    count = tl.load(num_parts_ptr + token)
    if count <= 1:
        return
    first = tl.load(part_start_ptr + token).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_valid = heads < num_q_heads
    dims = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    total = tl.full([BLOCK_H], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_H, HEAD_DIM], 0.0, dtype=tl.float32)
    for j in range(count):
        slot_rows = (first + j) * num_q_heads + heads
        lse_j = tl.load(part_lse_ptr + slot_rows, mask=head_valid, other=float("-inf"))
        o_j = tl.load(part_out_ptr + slot_rows[:, None] * HEAD_DIM + dims[None, :], mask=head_valid[:, None],
                      other=0.0)
        m_new = tl.maximum(m, lse_j)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale_old = tl.exp(m - m_safe)
        scale_j = tl.exp(lse_j - m_safe)
        acc = acc * scale_old[:, None] + o_j * scale_j[:, None]
        total = total * scale_old + scale_j
        m = m_new
    has_keys = total > 0.0
    o = acc / tl.where(has_keys, total, 1.0)[:, None]
    lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
    tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=head_valid[:, None])
    tl.store(lse_ptr + token * num_q_heads + heads, lse, mask=head_valid)


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata) -> None:
    """Shape/dtype/stride checks with errors that say what to pass instead (no host sync)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"expected q (T, Hq, D) and k_cache (num_pages, page_size, Hkv, D); got {tuple(q.shape)} "
                         f"and {tuple(k_cache.shape)}.")
    head_dim = q.shape[2]
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}.")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides.")
    if k_cache.shape[3] != head_dim or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the KV cache {tuple(k_cache.shape)}: head_dim must "
                         "match and Hq must be a multiple of Hkv.")
    if k_cache.shape[1] != meta.page_size or meta.page_size & (meta.page_size - 1):
        raise ValueError(f"page_size must be a power of two equal to k_cache.shape[1]; got meta.page_size="
                         f"{meta.page_size}, k_cache.shape[1]={k_cache.shape[1]}.")
    if q.dtype != k_cache.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q and KV must share one dtype among fp16/bf16/fp32; got {q.dtype} and {k_cache.dtype}.")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("the head_dim axis of q and of the KV cache must be contiguous.")
    for name in ("own_pages", "prefix_pages"):
        table = getattr(meta, name)
        if table.dtype != torch.int32 or table.dim() != 2 or table.stride(1) != 1:
            raise ValueError(f"meta.{name} must be a 2-D int32 tensor with contiguous rows.")


def launch_shared_prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   meta: PagedAttentionMetadata, scaling: float, plan: PagedAttentionPlan,
                                   out: torch.Tensor | None = None,
                                   lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the planned step: out (T, Hq, D) in q's dtype, lse (T, Hq) fp32. No host sync, no allocation
    that depends on data (CUDA-graph safe when out/lse and the plan are static buffers)."""
    check_inputs(q, k_cache, v_cache, meta)
    kv = (k_cache, v_cache, k_cache.stride()[:3])
    return launch_partial_attention(q, k_cache.shape[2], kv, kv, meta.own_pages, meta.prefix_pages, meta.page_size,
                                    scaling, plan, out, lse)


def _tma_usable(plan: PagedAttentionPlan, own_kv, prefix_kv, page_size: int) -> bool:
    """Whether the plan's TMA key loads (opt-in, `plan.use_tma`) can run: one contiguous pool for own and
    prefix KV, pages holding whole BLOCK_N-key blocks, a Hopper-or-later GPU (or the CPU interpreter), and a
    triton with tensor descriptors, fp16/bf16 on a GPU. Otherwise the pointer loads run, with the same results."""
    if not plan.use_tma or TensorDescriptor is None or page_size % plan.block_n:
        return False
    keys, values = own_kv[0], own_kv[1]
    if keys is not prefix_kv[0] or values is not prefix_kv[1] or not (keys.is_contiguous() and values.is_contiguous()):
        return False
    if not keys.is_cuda:  # the CPU interpreter (tests), any dtype
        return True
    # fp32 tiles through TMA compile for sm_90a with ~47 KB of spills (fp16/bf16: none to 4 bytes)
    return keys.dtype != torch.float32 and torch.cuda.get_device_capability(keys.device)[0] >= 9


def _pool_descriptor(pool: torch.Tensor, block_n: int, head_dim: int):
    """A tensor descriptor over a (num_pages, page_size, Hkv, D) pool viewed as (pages * page_size, Hkv * D),
    in blocks of block_n keys x one head."""
    return TensorDescriptor.from_tensor(pool.view(pool.shape[0] * pool.shape[1], -1), [block_n, head_dim])


def launch_partial_attention(q, num_kv_heads, own_kv, prefix_kv, own_pages, prefix_pages, page_size, scaling, plan,
                             out, lse):
    """Core launcher. own_kv / prefix_kv: (keys, values, (page stride, token stride, head stride)), the
    tensors' last dim contiguous and keys/values sharing strides; page tables 2-D int32 with unit column
    stride. The paged layout passes the pool for both; the dense layout passes one 'page' per row."""
    num_tokens, num_q_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
    if out.shape != q.shape or out.stride(2) != 1 or not lse.is_contiguous():
        raise ValueError("out must have q's shape with a contiguous last dim, and lse must be contiguous (T, Hq).")
    if num_tokens == 0:
        return out, lse
    if plan.part_out.shape[1:] != (num_q_heads, head_dim) or plan.num_parts.shape[0] < num_tokens:
        raise ValueError("the plan was made for other head counts, head_dim, or fewer tokens; re-plan this step.")
    grid = (max(1, min(plan.num_programs, plan.items.shape[0])),)
    k_desc = v_desc = None
    if _tma_usable(plan, own_kv, prefix_kv, page_size):
        k_desc, v_desc = (_pool_descriptor(t, plan.block_n, head_dim) for t in own_kv[:2])
    _partial_attention_kernel[grid](
        q, own_kv[0], own_kv[1], prefix_kv[0], prefix_kv[1], out, lse, plan.part_out, plan.part_lse,
        plan.items, plan.num_items, plan.num_parts, plan.part_start, plan.token_kv, own_pages, prefix_pages,
        k_desc, v_desc,
        q.stride(0), q.stride(1), *own_kv[2], *prefix_kv[2], out.stride(0), out.stride(1),
        own_pages.stride(0), prefix_pages.stride(0), num_q_heads // num_kv_heads, num_q_heads, num_kv_heads,
        scaling * _LOG2E,
        HEAD_DIM=head_dim, BLOCK_M_PREFIX=plan.block_m, BLOCK_M_OWN=plan.block_m_own, BLOCK_M_WIDE=plan.block_m_wide,
        BLOCK_N=plan.block_n, BLOCK_N_WIDE=plan.block_n_wide,
        KV_HEADS_TILE=min(triton.next_power_of_2(num_kv_heads), plan.block_n_wide), HAS_WIDE=plan.has_wide,
        HAS_SMALL=plan.has_small, HAS_FUSED=plan.has_fused,
        HAS_PACKED=plan.has_packed, BLOCK_M_PACKED=plan.block_m_packed, GRID_STRIDE=grid[0] < plan.items.shape[0],
        PAGE_SIZE=page_size,
        NUM_FIELDS=NUM_FIELDS, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        # The CPU interpreter (triton 3.9) computes bf16 dots wrongly: there, dots run in fp32 on the same
        # bf16-rounded operands.
        DOT_DTYPE=_TL_DTYPES[q.dtype] if q.is_cuda else tl.float32,
        MASKED_STAGES=plan.masked_stages or plan.num_stages, USE_TMA=k_desc is not None,
        PREFETCH_PAGES=plan.prefetch_pages, PACK_TMA=plan.pack_tma,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if plan.needs_merge:
        block_h = min(triton.next_power_of_2(num_q_heads), max(1, MERGE_ELEMENTS // head_dim))
        _merge_kernel[(num_tokens, triton.cdiv(num_q_heads, block_h))](
            out, lse, plan.part_out, plan.part_lse, plan.num_parts, plan.part_start,
            out.stride(0), out.stride(1), num_q_heads,
            HEAD_DIM=head_dim, BLOCK_H=block_h, num_warps=4,
        )
    return out, lse
