"""Work decomposition for the shared-prefix Triton attention (kernels/shared_prefix_triton.py).

One engine step (kernels/paged.py contract) is cut into WORK ITEMS, one program each (a 1-D grid; an item
names its KV head):

    prefix item  a run of consecutive sequences of one group (the engine keeps a group's members together),
                 a tile of BLOCK_M of its rows, one KV chunk of the group prefix. Rows are
                 (token, query head of this KV head) pairs, row = token * ratio + head, so all members'
                 tokens and all query heads sharing the KV head fill one tensor-core tile and the prefix
                 chunk is read once for the whole tile (once per group when the group fits one tile).
    own item     one sequence, a tile of its rows, one KV chunk of its own KV (causal).
    packed item  (`pack=True`, the default) the decode tokens of consecutive sequences whose own KV is at most
                 PACK_MAX_KEYS keys (PACK_MAX_KEYS_TMA in plans with TMA key loads over pages of whole blocks),
                 PACK_ROWS // ratio of them in one tile of PACK_ROWS (16) rows, one KV head: one program reads
                 all their own blocks in one pipelined loop (each block masked to its sequence's rows; with
                 TMA, each sequence's whole blocks through TMA; at most PACK_MAX_SEQS sequences). On an H200
                 (session 14) own items at 64 keys took 40 us instead of 49 for 256 sequences x 8 KV heads; at
                 256 keys packing was slower with pointer loads, and with TMA blocks (session 15) it is 2-6%
                 faster; on steps of mixed own lengths they take up to 22% less time since session 16's
                 per-sequence TMA blocks.
                 Static plans pack when allocated with `packed=True` (the engine's CUDA-graph plans do).
    prefix pack  (`pack_prefix`; by default in TMA plans made for their step at GQA >= 8, head_dim <= 128, for
                 groups of 2+ whose prefix the step would not split, or whose packs fill the GPU and whose
                 prefix is at most PACK_PREFIX_FILL_SHARES fair shares of the step's work) a packed item that
                 also reads its group's prefix before its members' own blocks: for a run of a group's decode
                 tokens that all pack, no prefix items and no partials, so no merge, in tiles of
                 PACK_PREFIX_ROWS (64) rows. Session 15 (H200, grid at GQA 8, P <= 2048, S <= 256):
                 8-24% less time per step; at GQA 4 and 7, or for groups of one, it was slower. Session 16:
                 5% less at P = 8192 with 16 groups of 16, where the packs fill the GPU though the prefix is split.
    wide item    (opt-in, `wide=True`) a decode-sized row set, i.e. at most one token's query heads of all
                 KV heads (rows = token * Hq + head): one program reads each key token's KV heads as one
                 contiguous run and masks the scores of other heads. On an H200 it was slower than
                 one-head items on most decode steps (benchmarks/results/2026-11-29-session3) and won
                 only with groups of 1-4 and long own KV (about 10%), so plans leave it off by default.

Each KV range is cut into chunks of `chunk` tokens (flash-decoding split) so that a step of few, long
sequences still fills the GPU and no item is much longer than a fair share of the step's work (a large
group's prefix tiles beside many short own items); `chunk` is chosen per step from the total work, and the
items are sorted longest first so no tail of idle programs remains. A (token, head) row that receives more than one
partial result (several chunks, or prefix + own) writes each to a slot of a workspace and a merge kernel
combines them by log-sum-exp; a row with a single partial writes the output directly.

The plan is computed once per step on the host (one host sync; the same plan serves every layer). An
engine that holds the step's metadata on the host calls `plan_attention` with numpy arrays instead and
skips that sync: the plan then reaches the device in one non-blocking copy from pinned memory.
CUDA graphs: allocate a static plan once with `allocate_plan(...)` (capacities for the captured batch),
then before each replay call `plan_paged_attention(..., buffers=static_plan)`, which copies the step's
plan into those buffers (device copies only; it coarsens the KV chunks until the step fits and raises
ValueError if even unsplit it does not). A static plan launches one program per item slot by default (the
idle ones exit at once; the kernel then runs without its grid-stride loop, which cost 3-31% per decode step
on an H200: bench_kernels.py --decode-variants, session 6); `num_programs=` a few per SM makes the programs
loop over the step's items instead.
Sizing for a captured decode batch of N sequences in G groups of B: max_tokens = N,
max_items >= Hkv * (N + G * ceil(B * ratio / block_m)) (unsplit) plus headroom for KV splits,
max_parts >= 2 * N (prefix + own) plus headroom. The tile sizes of a static plan are fixed when it is allocated
(`static_decode_tiles`: the planner's for the step it is first used on; row sets of <= 16 rows always take
16-row tiles).
The graph also captures the metadata tensors' addresses: keep them static and copy each step into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .paged import PagedAttentionMetadata

# Item fields (int32): kind (bit 0: prefix, else own; bit 1: a small 16-row tile of one KV head, for
# decode-sized row sets in a step whose large tiles serve prefill chunks; bit 2: wide, all KV heads in one
# program), page-table row, first q token of the row set, rows in the row set, first row of this tile,
# KV start, KV end (causal end of the tile folded in), slot offset of this partial, causal base (position of
# the row set's first token; a large value for prefix items), KV head (0 for wide items); then, for fused
# items (kind 8: an own item of a member whose chunk fills large tiles alone, which also reads its group's
# prefix in the same program: no partials, no merge), the prefix page-table row, KV start and KV end (zeros
# for other kinds). Packed items (kind 16): the first sequence's page-table row and token, rows (sequences x
# ratio), the longest own length among them, 0, the sum of their own lengths (for the longest-first order), the
# shared slot offset, -, KV head, and for prefix packs the group's prefix page-table row, KV start and KV end
# (as fused items; zeros otherwise).
NUM_FIELDS = 13
FUSED = 8
PACKED = 16  # kind of a packed item: decode tokens of consecutive sequences, one KV head, their own KV in one loop
PACK_MAX_KEYS = 128  # own ranges up to this long are packed (see _pack_decode for the measurements)
PACK_MAX_KEYS_TMA = 256  # ... in plans whose packed items read their whole blocks through TMA (1024: slower)
PACK_ROWS = 16  # rows of a packed tile (PACK_ROWS // ratio sequences per packed item; 32 / 64: no gain, session 14)
PACK_DEFAULT = True  # plans pack short decode own ranges unless told not to (pack=False); see _pack_decode
# Prefix packs (_pack_prefix_runs): packed items of a group's decode tokens that also read its prefix. Plans made
# for their step with TMA key loads use them at GQA ratios >= PACK_PREFIX_MIN_RATIO for groups of 2 or more
# whose prefix the step would not split or whose packs fill the GPU (pack_prefix=None), in tiles of
# PACK_PREFIX_ROWS rows (session 15: faster at GQA 8, slower at GQA 4 and 7 and for groups of one), at
# head_dim <= 128 (64 x 256 tiles spill on sm_90a: benchmarks/compile_check.py)
PACK_PREFIX_MIN_RATIO = 8
PACK_PREFIX_ROWS = 64
PACK_PREFIX_FILL_SHARES = 4  # prefix a pack may read whole where packs fill the GPU, in fair shares (one SM's)
PACK_MAX_SEQS = 32  # sequences per packed item at most (the kernel finds a block's sequence with one-warp reductions)
NO_CAUSAL = 1 << 30
SMALL_TILE = 16
PREFILL_TILE = 128  # rows: a step whose own row sets are this large gets the prefill tiles; members whose
                    # chunk has this many rows read their group's prefix in fused items
WIDE_MAX_ROWS = 64  # row sets of at most this many (token, query head) rows run wide
_MIN_CHUNK = 256
_MIN_CHUNK_WIDE = 128
_PROGRAMS_PER_SM = 4
_MIN_CHUNK_FILLED = 2048  # shortest KV chunk when the step's unsplit items already fill the GPU


@dataclass
class PagedAttentionPlan:
    """Device buffers describing one step's work items, plus the kernel's tile configuration."""

    items: torch.Tensor        # (max_items, NUM_FIELDS) int32
    num_items: torch.Tensor    # (1,) int32
    num_parts: torch.Tensor    # (max_tokens,) int32: partial results per token (1: written directly)
    part_start: torch.Tensor   # (max_tokens,) int32: first workspace slot of the token
    part_out: torch.Tensor     # (max_parts, Hq, D) fp32 workspace
    part_lse: torch.Tensor     # (max_parts, Hq) fp32 workspace
    block_m: int               # rows per prefix tile
    block_m_own: int           # rows per own tile
    block_n: int
    block_m_wide: int          # rows per wide tile ((token, query head) pairs of all KV heads)
    block_n_wide: int          # columns per wide KV block ((key token, KV head) pairs)
    has_wide: bool             # the plan may hold wide items (else the kernel is compiled without them)
    num_warps: int
    num_stages: int
    needs_merge: bool          # False only when no token has several partials (merge launch skipped)
    num_programs: int          # programs along the item axis (each loops over items with this stride)
    masked_stages: int | None = None  # pipeline stages of the masked key loop (None: num_stages)
    use_tma: bool = False      # unmasked key blocks through TMA tensor descriptors where the launch allows it
    has_small: bool = True     # the plan may hold 16-row (decode-sized) items (else compiled without them)
    has_fused: bool = False    # the plan holds fused items (prefix + own in one program; per-step plans only)
    prefetch_pages: bool = False  # TMA key loops load each block's page id one block ahead (the planner's default
    # with TMA: a third TMA buffer; session 8, H200: 4 x 512 tokens at P=2048 / 8192 in 179 / 569 us against
    # 223 / 762 with the lookup before each load; session 13: decode steps as CUDA-graph replays took 0-21% less time)
    token_kv: torch.Tensor | None = None  # (max_tokens,) int32: own keys visible to each query token (packed items)
    has_packed: bool = False   # the plan may hold packed items (else the kernel is compiled without them)
    block_m_packed: int = 16   # rows per packed tile: min(block_m_packed // ratio, PACK_MAX_SEQS) sequences per item
    pack_tma: bool = True      # packed items read whole blocks through TMA where the launch uses TMA


def _rows_tile(rows: int, total_rows: int, head_dim: int) -> int:
    if rows <= 16:
        return 16
    if rows <= 32:
        return 32
    if rows <= 64 or total_rows <= 2048 or head_dim > 128:
        return 64
    return 128


def is_prefill_step(max_own_rows: int, total_rows: int, head_dim: int) -> bool:
    """Whether a step gets the prefill tile configuration."""
    return head_dim <= 128 and _rows_tile(max_own_rows, total_rows, head_dim) >= PREFILL_TILE


def tile_config(max_prefix_rows: int, max_own_rows: int, head_dim: int,
                total_rows: int, tma: bool = False) -> tuple[int, int, int, int, int]:
    """(block_m, block_m_own, block_n, num_warps, num_stages): small tiles for decode, large for prefill
    (`tma`: the step reads its unmasked key blocks through TMA)."""
    block_m = _rows_tile(max_prefix_rows, total_rows, head_dim)
    block_m_own = _rows_tile(max_own_rows, total_rows, head_dim)
    # Chosen from sweeps on an H200 (bf16, head_dim 128; benchmarks/bench_kernels.py --sweep / --prefill-variants):
    if head_dim > 128:
        return block_m, block_m_own, 32, 4, 3
    if tma and is_prefill_step(max_own_rows, total_rows, head_dim):
        # prefill chunks, with fused items and TMA key loads at pages of 64 (session 6): 64 x 64 tiles, 4 warps,
        # 3 stages took 226 / 757 / 381 / 573 us against 259 / 842 / 477 / 664 for 128 x 32 (4 x 512 tokens at
        # P = 2048 and 8192; GQA 7; 16 x 200 tokens at P = 2000, GQA 7)
        return 64, 64, 64, 4, 3
    if block_m_own >= PREFILL_TILE:  # prefill chunks, pointer loads: 1183 us vs 1233 (64 keys, 8 warps) at
        return block_m, block_m_own, 32, 4, 3  # P=8192, 4 x 512 tokens; session 5: 64 x 64 was 7-10% slower
    if tma:
        # decode with TMA key loads (and page ids a block ahead, a 1-stage masked loop: plan_attention): the
        # prefill tiles, at most 64 rows. Session 13 (benchmarks/decode_anatomy.py, H200, CUDA-graph replays):
        # 3-32% less time than the pointer-load configuration below on all 13 decode steps timed, groups of one
        # included (W-paper's step 252 -> 217 us, 16 x 16 members at P = 8192 335 -> 248); 128-row tiles with
        # 8 warps, 2 stages, or page ids looked up before each block's loads were slower.
        block_m = min(block_m, 64)
        return block_m, max(block_m, min(block_m_own, 64)), 64, 4, 3
    # decode, any group size: 64 keys, 4 warps, 2 stages. Session 3's sweep (one-head items): 155 us against
    # 231 for (128 keys, 8 warps, 3 stages) with 8 groups of 32 (128-row prefix tiles), 191 against 244 with
    # one group of 256 (GQA 8); 2 stages beat 3 by 10% with 32-256 members and lost 1-4% elsewhere.
    return block_m, block_m_own, 64, 4, 2


def tma_default(device: torch.device | str, page_size: int | None, head_dim: int) -> bool:
    """Whether TMA key loads suit a KV pool: pages that hold whole 64-key blocks, head_dim <= 128 (the
    measured tiles), and a Hopper-or-later GPU (or the CPU interpreter). The default for prefill steps
    (plan_attention with use_tma=None; sessions 6-8: faster on every prefill chunk) and for the engine's
    CUDA-graph decode plans (engine/decode_graphs.py; session 13: 3-32% less time per decode step as a
    replay). Decode steps launched from Python keep pointer loads: two tensor descriptors per launch cost
    host time there."""
    device = torch.device(device)
    return (page_size is not None and page_size % 64 == 0 and head_dim <= 128
            and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9))


def tma_loop_options(use_tma: bool, head_dim: int) -> dict:
    """allocate_plan's key-loop options for a plan with or without TMA key loads: with the measured TMA tiles
    (head_dim <= 128), page ids a block ahead and a 1-stage masked loop (prefill, session 8: 179 / 569 / 306 /
    457 us against 188 / 565 / 325 / 486 with 3 masked stages and 223 / 762 / 384 / 568 without the prefetch;
    decode as CUDA-graph replays, session 13's decode_anatomy.py: ids looked up before each block's loads made
    steps 0-27% slower, a 2-stage main loop up to 26%; the masked loop's stages were not varied for decode).
    A launch that falls back to pointer loads keeps the 1-stage masked loop (fp32 or pages of partial blocks)."""
    tiles = bool(use_tma) and head_dim <= 128
    return {"prefetch_pages": tiles, "masked_stages": 1 if tiles else None}


def static_decode_tiles(seq_group: np.ndarray, ratio: int, head_dim: int,
                        tma: bool = False) -> tuple[int, int, int, int, int]:
    """The tiles of a static (CUDA-graph) decode plan first used on a decode step whose sequences are in
    groups `seq_group` (-1: none): the per-step planner's, rows counted as it counts them (every sequence's
    own row set plus the grouped ones' prefix rows), with prefix tiles of at least 64 rows (a later step of
    larger groups still shares each prefix tile among 64 rows; row sets of <= 16 rows take 16-row tiles
    anyway)."""
    grouped = seq_group[seq_group >= 0]
    largest = int(np.bincount(grouped).max()) if grouped.size else 0
    return tile_config(max(64, largest * ratio), ratio, head_dim, (seq_group.shape[0] + grouped.size) * ratio, tma=tma)


def wide_tiles(num_q_heads: int, head_dim: int) -> tuple[int, int]:
    """(block_m_wide, block_n_wide) for decode tokens of a model with these heads."""
    return min(WIDE_MAX_ROWS, max(16, _next_power_of_2(num_q_heads))), 128 if head_dim <= 128 else 64


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def allocate_plan(max_tokens: int, max_items: int, max_parts: int, num_q_heads: int, head_dim: int,
                  device: torch.device | str, *, block_m: int = 16, block_m_own: int = 16, block_n: int = 64,
                  block_m_wide: int | None = None, block_n_wide: int | None = None, wide: bool = False,
                  num_warps: int = 4, num_stages: int = 3, num_programs: int | None = None,
                  masked_stages: int | None = None, use_tma: bool = False,
                  prefetch_pages: bool = False, packed: bool = False,
                  block_m_packed: int | None = None) -> PagedAttentionPlan:
    """Static buffers for CUDA-graph capture (fill them with `plan_paged_attention(..., buffers=plan)`).

    The kernel's grid has one program per item slot (the idle ones exit at once) unless `num_programs` is
    smaller: then that many programs loop over the step's items. `wide`: the plan may
    take wide items (plan with wide=True too); block_m_wide / block_n_wide default to
    `wide_tiles(num_q_heads, head_dim)`."""
    default_m_wide, default_n_wide = wide_tiles(num_q_heads, head_dim)
    block_m_packed = block_m_packed or PACK_ROWS
    if block_m_packed not in (16, 32, 64, 128):
        raise ValueError(f"block_m_packed must be 16, 32, 64 or 128 rows, got {block_m_packed}.")
    return PagedAttentionPlan(
        items=torch.empty((max_items, NUM_FIELDS), dtype=torch.int32, device=device),  # read below num_items
        num_items=torch.zeros((1,), dtype=torch.int32, device=device),
        num_parts=torch.empty((max_tokens,), dtype=torch.int32, device=device),  # read below the step's T
        part_start=torch.empty((max_tokens,), dtype=torch.int32, device=device),
        part_out=torch.empty((max(max_parts, 1), num_q_heads, head_dim), dtype=torch.float32, device=device),
        part_lse=torch.empty((max(max_parts, 1), num_q_heads), dtype=torch.float32, device=device),
        block_m=block_m, block_m_own=block_m_own, block_n=block_n, block_m_wide=block_m_wide or default_m_wide,
        block_n_wide=block_n_wide or default_n_wide, has_wide=wide, num_warps=num_warps, num_stages=num_stages,
        needs_merge=True, num_programs=min(num_programs or max_items, max_items), masked_stages=masked_stages,
        use_tma=use_tma, prefetch_pages=prefetch_pages,
        token_kv=torch.empty((max_tokens,), dtype=torch.int32, device=device), has_packed=packed,
        block_m_packed=block_m_packed,
    )


def _cdiv(a, b):
    return -(-a // b)


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For per-owner counts: (owner of each expanded entry, index of the entry within its owner)."""
    owner = np.repeat(np.arange(counts.shape[0]), counts)
    starts = np.cumsum(counts) - counts
    return owner, np.arange(owner.shape[0]) - starts[owner]


def plan_paged_attention(meta: PagedAttentionMetadata, num_q_heads: int, num_kv_heads: int, head_dim: int, *,
                         num_sms: int | None = None, block_m: int | None = None, chunk: int | None = None,
                         wide: bool = False, use_tma: bool | None = None, fuse: bool = True,
                         pack: bool | None = None, pack_prefix: bool | None = None,
                         buffers: PagedAttentionPlan | None = None) -> PagedAttentionPlan:
    """Plan one step (host sync here, once per step). See the module docstring.

    num_sms defaults to the device's; block_m and chunk (KV tokens per work item) override the heuristics
    (tests use them to force splits and tile shapes); wide=True lets decode-sized row sets run wide;
    use_tma=True reads the unmasked key blocks through TMA tensor descriptors where the launch allows it, with
    tiles of at most 64 rows, 3 stages, page ids a block ahead: on an H200 (session 13) decode steps run as
    CUDA-graph replays took 3-32% less time so, on every one of 13 steps (the engine's CUDA-graph decode plans
    do this: `tma_default`); None (default) does so for prefill steps whose pages hold whole 64-key blocks
    (13-20% faster on every prefill chunk measured), and leaves decode steps planned per step on pointer
    loads: launched from Python, TMA's tensor descriptors cost host time that made 5 of 13 decode steps
    slower (up to 1.6x; sessions 6 and 9 had read that as a slower kernel).
    A static plan (`buffers`) keeps the choice it was allocated with."""
    tensors = (meta.q_starts, meta.own_lens, meta.seq_group, meta.prefix_lens)
    arrays = [t.cpu().numpy().astype(np.int64) for t in tensors]
    return plan_attention(*arrays, num_q_heads, num_kv_heads, head_dim, meta.own_lens.device, num_sms=num_sms,
                          block_m=block_m, chunk=chunk, wide=wide, use_tma=use_tma, fuse=fuse, pack=pack,
                          pack_prefix=pack_prefix, page_size=meta.page_size, buffers=buffers)


def plan_attention(q_starts: np.ndarray, own_lens: np.ndarray, seq_group: np.ndarray, prefix_lens: np.ndarray,
                   num_q_heads: int, num_kv_heads: int, head_dim: int, device: torch.device, *,
                   own_starts: np.ndarray | None = None, prefix_starts: np.ndarray | None = None,
                   num_sms: int | None = None, block_m: int | None = None, chunk: int | None = None,
                   wide: bool = False, use_tma: bool | None = None, fuse: bool = True,
                   pack: bool | None = None, pack_prefix: bool | None = None, page_size: int | None = None,
                   buffers: PagedAttentionPlan | None = None) -> PagedAttentionPlan:
    """`plan_paged_attention` on host arrays (page_size: the KV pages', which decide whether TMA key loads
    can serve a step's 64-key blocks; None: they cannot). own_starts / prefix_starts: first visible key of each
    sequence's own KV / each group's prefix (left padding in the dense layout; zeros when None). fuse: let
    members with long chunks read their group's prefix in their own items (see below)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")
    ratio = num_q_heads // num_kv_heads
    own_starts = np.zeros_like(own_lens) if own_starts is None else own_starts
    prefix_starts = np.zeros_like(prefix_lens) if prefix_starts is None else prefix_starts
    num_tokens = int(q_starts[-1])
    q_lens = np.diff(q_starts)
    if (own_lens < q_lens).any():
        raise ValueError("own_lens must include this step's tokens (own_lens >= q_len for every sequence).")
    if buffers is not None:
        pack, pack_rows = buffers.has_packed, buffers.block_m_packed
    else:
        pack, pack_rows = PACK_DEFAULT if pack is None else pack, PACK_ROWS
    if num_sms is None:
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132

    # Runs of consecutive sequences sharing one group with a non-empty prefix.
    prefix_spans = prefix_lens - prefix_starts
    has_prefix = (seq_group >= 0) & (prefix_spans[np.clip(seq_group, 0, None)] > 0 if prefix_lens.size else False)
    # Fused members: a chunk of >= PREFILL_TILE rows fills large tiles on its own, so sharing its group's
    # prefix tiles with other members saves no reads (a tile never spans two such members' rows anyway);
    # its own items read the prefix first, then its own KV, and write the output directly (no partials,
    # no merge launch for them). Fused items are never split, so only where the chunk rule below would not
    # split the prefix either: in a step whose items fill the GPU, a prefix within the larger of
    # _MIN_CHUNK_FILLED and a fair share of the fused members' work alone (a lower bound of the step's).
    # Plans made for their step only (a static plan's kernel has no such items).
    fused = np.zeros_like(has_prefix)
    if fuse and buffers is None and prefix_lens.size:
        span = prefix_spans[np.clip(seq_group, 0, None)]
        fused = has_prefix & (q_lens * ratio >= PREFILL_TILE)
        tiles = _cdiv(q_lens[fused] * ratio, PREFILL_TILE)
        target = num_sms * _PROGRAMS_PER_SM
        share = int((tiles * (span[fused] + own_lens[fused] - own_starts[fused])).sum()) * num_kv_heads // target
        # unfused, these members alone would make a prefix and an own item per tile and KV head
        if 2 * int(tiles.sum()) * num_kv_heads < target:
            fused[:] = False
        fused &= span <= max(_MIN_CHUNK_FILLED, share)
    has_prefix = has_prefix & ~fused
    new_run = np.ones(seq_group.shape[0], dtype=bool)
    new_run[1:] = (seq_group[1:] != seq_group[:-1]) | ~has_prefix[1:] | ~has_prefix[:-1]
    run_of_seq = np.cumsum(new_run) - 1
    run_first = np.flatnonzero(new_run)
    run_last = np.append(run_first[1:], seq_group.shape[0]) - 1
    runs = np.flatnonzero(has_prefix[run_first])  # runs that have prefix work
    run_group = seq_group[run_first[runs]]
    run_tok_lo = q_starts[run_first[runs]]
    run_rows = (q_starts[run_last[runs] + 1] - run_tok_lo) * ratio
    runs, run_group, run_tok_lo, run_rows = (a[run_rows > 0] for a in (runs, run_group, run_tok_lo, run_rows))
    run_kv, run_kv_lo = prefix_lens[run_group], prefix_starts[run_group]
    own_seqs = np.flatnonzero(q_lens > 0)
    own_tokens = q_lens[own_seqs]
    own_spans = own_lens[own_seqs] - own_starts[own_seqs]
    own_fused = fused[own_seqs]
    own_group = np.where(own_fused, seq_group[own_seqs], 0)
    own_prefix_lo = np.where(own_fused, prefix_starts[own_group] if prefix_starts.size else 0, 0)
    own_prefix_hi = np.where(own_fused, prefix_lens[own_group] if prefix_lens.size else 0, 0)
    run_tokens = run_rows // ratio

    # Wide row sets: few enough (token, query head) rows for one tile, all KV heads in one program.
    if buffers is not None:
        bmw, bnw = buffers.block_m_wide, buffers.block_n_wide
    else:
        bmw, bnw = wide_tiles(num_q_heads, head_dim)
    can_wide = (wide and num_kv_heads > 1 and _next_power_of_2(num_kv_heads) <= bnw
                and (buffers is None or buffers.has_wide))
    run_wide = can_wide & (run_tokens * num_q_heads <= bmw)
    own_wide = can_wide & (own_tokens * num_q_heads <= bmw)
    if buffers is None:  # the smallest wide tile that holds this step's wide row sets
        widest = max(int((run_tokens[run_wide] * num_q_heads).max(initial=0)),
                     int((own_tokens[own_wide] * num_q_heads).max(initial=0)))
        bmw = max(16, _next_power_of_2(widest))
    run_rows = np.where(run_wide, run_tokens * num_q_heads, run_rows)
    own_rows = np.where(own_wide, own_tokens * num_q_heads, own_tokens * ratio)

    total_rows = int(run_rows.sum() + own_rows.sum())
    max_own_rows = int(own_rows[~own_wide].max(initial=0))
    prefill = is_prefill_step(max_own_rows, total_rows, head_dim)
    if use_tma is None:  # TMA key loads where measured faster: prefill steps whose pages allow it (tma_default).
        # A decode step planned per step is launched from Python, where TMA's two tensor descriptors per launch
        # cost host time (session 13: 5 of 13 decode steps slower so, up to 1.6x); the engine's CUDA-graph
        # decode plans take TMA (engine/decode_graphs.py), and use_tma=True gives a per-step plan the same.
        use_tma = prefill and tma_default(device, page_size, head_dim)
    if buffers is not None:
        use_tma = buffers.use_tma
        bm, bmo = buffers.block_m, buffers.block_m_own
        bn, warps, stages = buffers.block_n, buffers.num_warps, buffers.num_stages
    else:
        bm, bmo, bn, warps, stages = tile_config(int(run_rows[~run_wide].max(initial=0)), max_own_rows, head_dim,
                                                 total_rows, tma=use_tma)
        bm, bmo = block_m or bm, block_m or bmo

    # Per row set: tile rows, kind, tiles, programs per (tile, KV chunk): Hkv for one-head items, 1 for wide.
    run_bm = np.where(run_wide, bmw, np.where(run_rows <= SMALL_TILE, SMALL_TILE, bm))
    own_bm = np.where(own_wide, bmw, np.where(own_rows <= SMALL_TILE, SMALL_TILE, bmo))
    run_kind = np.where(run_wide, 5, np.where(run_rows <= SMALL_TILE, 3, 1))
    own_kind = np.where(own_fused, FUSED, np.where(own_wide, 4, np.where(own_rows <= SMALL_TILE, 2, 0)))
    run_heads = np.where(run_wide, 1, num_kv_heads)
    own_heads = np.where(own_wide, 1, num_kv_heads)
    run_row_heads = np.where(run_wide, num_q_heads, ratio)
    own_row_heads = np.where(own_wide, num_q_heads, ratio)
    run_tiles, own_tiles = _cdiv(run_rows, run_bm), _cdiv(own_rows, own_bm)
    run_spans = run_kv - run_kv_lo

    # Chunk size (KV tokens per item): no item longer than a fair share of the step's work, the work spread
    # over ~_PROGRAMS_PER_SM programs per SM, so no long item outlasts the rest. Work counts (key token, KV
    # head) reads per tile; a wide item does Hkv of them per key token, so its chunk is Hkv times shorter.
    # A step whose items already fill the GPU can still need splits: a large group's few prefix tiles, each
    # reading a long prefix, beside thousands of short own items. There a split costs a partial per row and
    # pays only for long chunks, so the chunks stay >= _MIN_CHUNK_FILLED. H200, bf16, 256 requests
    # (benchmarks/results/2026-11-29-session5): 4 groups of 64 at P=8192 went 269 -> 206 us and 16 of 16
    # 424 -> 367 us with 2048-4096-key chunks, while 704-1024-key chunks made P=2048 steps 10-15% slower.
    work = int((run_tiles * run_spans).sum() + (own_tiles * (own_spans + own_prefix_hi - own_prefix_lo)).sum())
    work *= num_kv_heads
    unsplit_programs = int((run_tiles * run_heads).sum() + (own_tiles * own_heads).sum())
    splittable_own = np.where(own_fused, 0, own_spans)  # fused items are never split
    longest = int(max(run_spans.max(initial=0), splittable_own.max(initial=0)))
    # the largest single item's work, in the same units (a wide item reads Hkv heads per key)
    heaviest = int(max((run_spans * np.where(run_wide, num_kv_heads, 1)).max(initial=0),
                       (splittable_own * np.where(own_wide, num_kv_heads, 1)).max(initial=0)))
    target = num_sms * _PROGRAMS_PER_SM
    balanced = _cdiv(work, target) if work else 0
    min_chunk = _MIN_CHUNK if unsplit_programs < target else _MIN_CHUNK_FILLED
    chunk_given = chunk is not None
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of KV tokens, got {chunk}.")
        chunk_wide = chunk
    elif heaviest <= max(min_chunk, balanced):
        chunk = chunk_wide = max(longest, 1)
    else:  # even chunks: the longest range cut into as many equal pieces as a fair share allows
        chunk = max(min_chunk, _cdiv(balanced, bn) * bn)
        chunk = max(min_chunk, _cdiv(_cdiv(longest, _cdiv(longest, chunk)), bn) * bn)
        chunk_wide = max(_MIN_CHUNK_WIDE, _cdiv(_cdiv(balanced, num_kv_heads), 16) * 16)

    # Packed items read their whole blocks through TMA where the launch will (pages of whole blocks), and
    # then pack longer own ranges. A static plan's TMA choice was checked against the pages when allocated
    # (tma_default), so it holds when no page_size is given.
    tma_blocks = bool(use_tma) and (page_size % bn == 0 if page_size is not None else buffers is not None)
    pack_keys = PACK_MAX_KEYS_TMA if tma_blocks else PACK_MAX_KEYS
    # Prefix packs (pack_prefix): runs of decode tokens whose every own range is packable read their group's
    # prefix in their packed items instead of in prefix items: one partial per row, no merge.
    run_ok = np.zeros(runs.size, dtype=bool)
    implicit = pack_prefix is None
    if implicit:  # as measured: TMA plans (64-row packs with pointer loads take 180 KB of shared memory)
        pack_prefix = buffers is None and ratio >= PACK_PREFIX_MIN_RATIO and head_dim <= 128 and tma_blocks
    if pack and pack_prefix:
        seq_ok = np.zeros(q_lens.shape[0], dtype=bool)  # kind 2: a token's rows fit 16, so a pack holds >= 1
        seq_ok[own_seqs] = ((own_kind == 2) & (own_tokens == 1) & (own_starts[own_seqs] == 0) & (own_spans > 0)
                            & (own_spans <= pack_keys))
        bad = np.concatenate([[0], np.cumsum(~seq_ok)])
        run_ok = (bad[run_last[runs] + 1] - bad[run_first[runs]] == 0) & ~run_wide
        if implicit:  # groups of one kept their prefix items (session 15: 256 x 1 at P = 512, GQA 8: 9% slower),
            # and prefixes this step would split (a prefix pack reads its prefix whole: a long prefix beside few
            # members would leave most SMs idle)
            # unless the step's prefix packs fill the GPU anyway (one program per SM or more) and the prefix is no
            # longer than PACK_PREFIX_FILL_SHARES fair shares of the step's work (one SM's share: no single group's
            # pack outlasts the step). Session 16, H200, P = 8192 (chunks of 2048, a fair share ~4200 keys), GQA 8:
            # 16 groups of 16 took 201 / 246 us with prefix items against 190 / 234 with prefix packs (256
            # programs); 4 x 64 and 1 x 256 within 1%.
            run_ok &= run_last[runs] > run_first[runs]
            per_pack = min(PACK_PREFIX_ROWS // ratio, PACK_MAX_SEQS)
            pack_programs = int(_cdiv(run_last[runs] - run_first[runs] + 1, per_pack)[run_ok].sum()) * num_kv_heads
            fills = pack_programs >= num_sms and not chunk_given
            run_ok &= run_spans <= (max(chunk, PACK_PREFIX_FILL_SHARES * balanced) if fills else chunk)
        if buffers is None and run_ok.any():
            pack_rows = PACK_PREFIX_ROWS
    prefix_pack_items = _pack_prefix_runs(run_ok, run_first[runs], run_last[runs], run_group, q_starts,
                                          own_lens - own_starts, prefix_starts, prefix_lens, ratio, num_kv_heads,
                                          pack_rows)
    seq_in_prefix_pack = np.zeros(q_lens.shape[0], dtype=bool)
    packed_run, member = _expand(run_last[runs][run_ok] - run_first[runs][run_ok] + 1)
    seq_in_prefix_pack[run_first[runs][run_ok][packed_run] + member] = True
    own_in_prefix_pack = seq_in_prefix_pack[own_seqs]

    def build(chunk: int, chunk_wide: int):
        run_chunk = np.where(run_wide, chunk_wide, chunk)
        own_chunk = np.where(own_fused, NO_CAUSAL, np.where(own_wide, chunk_wide, chunk))
        run_splits = np.where(run_ok, 0, _cdiv(run_spans, run_chunk))  # prefix packs read their prefix whole
        own_splits = np.maximum(_cdiv(own_spans, own_chunk), 1)  # >= 1: a row with no visible key still gets 0
        own_splits = np.where(own_in_prefix_pack, 1, own_splits)
        # Prefix items. Split-major, then head, then tile: the tiles reading one prefix chunk of one KV head
        # get adjacent program ids, so they run together and share the chunk through L2.
        per_split = run_tiles * run_heads
        run_idx, local = _expand(per_split * run_splits)
        tile = local % run_tiles[run_idx]
        head = (local // run_tiles[run_idx]) % run_heads[run_idx]
        split = local // per_split[run_idx]
        c, lo, hi = run_chunk[run_idx], run_kv_lo[run_idx], run_kv[run_idx]
        prefix_items = np.stack([
            run_kind[run_idx], run_group[run_idx], run_tok_lo[run_idx], run_rows[run_idx], tile * run_bm[run_idx],
            lo + split * c, np.minimum(lo + (split + 1) * c, hi), split, np.full_like(tile, NO_CAUSAL), head,
            *([np.zeros_like(tile)] * 3),
        ], axis=1)
        # Own items; a sequence's prefix partials take its first slots.
        seq_prefix_splits = np.zeros(seq_group.shape[0], dtype=np.int64)
        seq_prefix_splits_runs = np.zeros(run_of_seq.max(initial=-1) + 1, dtype=np.int64)
        seq_prefix_splits_runs[runs] = run_splits
        seq_prefix_splits[:] = seq_prefix_splits_runs[run_of_seq] if seq_group.size else 0
        packed, packed_items = _pack_decode(pack, own_seqs, own_kind, own_tokens, own_splits, own_spans,
                                            own_starts[own_seqs], seq_prefix_splits[own_seqs], q_starts, ratio, bn,
                                            num_kv_heads, pack_rows, pack_keys, own_in_prefix_pack)
        packed |= own_in_prefix_pack
        own_idx, local = _expand(np.where(packed, 0, own_tiles * own_heads * own_splits))
        split = local % own_splits[own_idx]
        head = (local // own_splits[own_idx]) % own_heads[own_idx]
        tile = local // (own_splits[own_idx] * own_heads[own_idx])
        seq = own_seqs[own_idx]
        c = own_chunk[own_idx]
        causal_base = own_lens[seq] - q_lens[seq]
        last_row = np.minimum((tile + 1) * own_bm[own_idx], own_rows[own_idx]) - 1
        own_items = np.stack([
            own_kind[own_idx], seq, q_starts[seq], own_rows[own_idx], tile * own_bm[own_idx],
            own_starts[seq] + split * c,
            np.minimum(own_starts[seq] + (split + 1) * c, causal_base + last_row // own_row_heads[own_idx] + 1),
            seq_prefix_splits[seq] + split,
            causal_base, head, own_group[own_idx], own_prefix_lo[own_idx], own_prefix_hi[own_idx],
        ], axis=1)
        items = np.concatenate([prefix_items, own_items, packed_items, prefix_pack_items]).reshape(-1, NUM_FIELDS)
        cost = ((items[:, 6] - items[:, 5]) * (1 + items[:, 0] % 2) * np.where(items[:, 0] & 4, num_kv_heads, 1)
                + items[:, 12] - items[:, 11])
        items = items[np.argsort(-cost, kind="stable")]

        # Per token: number of partials and workspace slots.
        seq_of_token = np.repeat(np.arange(q_lens.shape[0]), q_lens)
        own_splits_all = np.zeros(q_lens.shape[0], dtype=np.int64)
        own_splits_all[own_seqs] = own_splits
        num_parts = (seq_prefix_splits + own_splits_all)[seq_of_token]
        multi = np.where(num_parts > 1, num_parts, 0)
        part_start = np.cumsum(multi) - multi
        return items, num_parts, part_start, int(multi.sum())

    items, num_parts, part_start, num_part_slots = build(chunk, chunk_wide)
    # A static plan: coarser chunks (fewer items and partials) until the step fits the capacities.
    while buffers is not None and min(chunk, chunk_wide) < longest and (
            items.shape[0] > buffers.items.shape[0] or num_part_slots > buffers.part_out.shape[0]):
        chunk, chunk_wide = 2 * chunk, 2 * chunk_wide
        items, num_parts, part_start, num_part_slots = build(chunk, chunk_wide)

    # Own keys visible to each query token (its causal limit + 1): packed items mask their blocks by it.
    seq_of_token = np.repeat(np.arange(q_lens.shape[0]), q_lens)
    token_kv = own_lens[seq_of_token] - q_lens[seq_of_token] + np.arange(num_tokens) - q_starts[seq_of_token] + 1
    host = torch.from_numpy(np.concatenate([items.ravel(), num_parts, part_start, token_kv]).astype(np.int32))
    if torch.device(device).type == "cuda":  # pinned + non_blocking: the copy does not wait for the device
        host = host.pin_memory().to(device, non_blocking=True)
    else:
        host = host.to(device)
    flat_items, plan_parts, plan_starts, plan_kv = host.split([items.size, num_tokens, num_tokens, num_tokens])
    tensors = dict(items=flat_items.view(items.shape[0], NUM_FIELDS), num_parts=plan_parts, part_start=plan_starts)
    if buffers is None:
        buffers = allocate_plan(num_tokens, items.shape[0], num_part_slots, num_q_heads, head_dim, device,
                                block_m=bm, block_m_own=bmo, block_n=bn, block_m_wide=bmw, block_n_wide=bnw,
                                wide=bool(run_wide.any() or own_wide.any()),
                                num_warps=warps, num_stages=stages,
                                use_tma=use_tma, block_m_packed=pack_rows,
                                **tma_loop_options(use_tma, head_dim),
                                num_programs=items.shape[0])  # one item per program: hardware load balance
        buffers.needs_merge = num_part_slots > 0
        buffers.has_small = bool(((items[:, 0] == 2) | (items[:, 0] == 3)).any())
        buffers.has_fused = bool((items[:, 0] == FUSED).any())
        buffers.has_packed = bool((items[:, 0] == PACKED).any())
    if not buffers.has_small and ((items[:, 0] == 2) | (items[:, 0] == 3)).any():
        raise ValueError("this plan's kernel is compiled without 16-row tiles (has_small=False) but the step has "
                         "decode-sized row sets; plan it anew or use a static plan from allocate_plan.")
    for name, have, need in (("max_items", buffers.items.shape[0], items.shape[0]),
                             ("max_tokens", buffers.num_parts.shape[0], num_tokens),
                             ("max_parts", buffers.part_out.shape[0], num_part_slots)):
        if have < need:
            raise ValueError(f"static plan too small: {name}={have} but this step needs {need}; "
                             "allocate_plan with a larger capacity.")
    buffers.items[: items.shape[0]].copy_(tensors["items"])
    buffers.num_items.fill_(items.shape[0])
    buffers.num_parts[:num_tokens].copy_(tensors["num_parts"])
    buffers.part_start[:num_tokens].copy_(tensors["part_start"])
    buffers.token_kv[:num_tokens].copy_(plan_kv)
    return buffers


def _pack_prefix_runs(run_ok, run_first, run_last, run_group, q_starts, own_lens, prefix_lo, prefix_hi, ratio: int,
                      num_kv_heads: int, pack_rows: int):
    """Packed items WITH their group's prefix (`pack_prefix=True`): the members of each run in run_ok (decode
    tokens only, every one's own KV packable), pack_rows // ratio consecutive members per tile of pack_rows
    rows, each item reading its group's prefix (fields 10-12) and then its members' own blocks: one partial
    per row, no prefix items, no merge. Returns the items (n_items, NUM_FIELDS)."""
    per_pack = min(pack_rows // ratio, PACK_MAX_SEQS)
    runs = np.flatnonzero(run_ok)
    if runs.size == 0 or per_pack < 1:
        return np.zeros((0, NUM_FIELDS), dtype=np.int64)
    members = run_last[runs] - run_first[runs] + 1
    run_idx, pack = _expand(_cdiv(members, per_pack))
    seq0 = run_first[runs][run_idx] + pack * per_pack
    n = np.minimum(per_pack, run_last[runs][run_idx] + 1 - seq0)
    bounds = np.stack([seq0, seq0 + n], axis=1).ravel()
    longest = np.maximum.reduceat(np.append(own_lens, 0), bounds)[::2]
    keys = np.add.reduceat(np.append(own_lens, 0), bounds)[::2]
    group = run_group[runs][run_idx]
    pack_idx, head = _expand(np.full(seq0.size, num_kv_heads))
    zeros = np.zeros_like(pack_idx)
    return np.stack([zeros + PACKED, seq0[pack_idx], q_starts[seq0][pack_idx], n[pack_idx] * ratio, longest[pack_idx],
                     zeros, keys[pack_idx], zeros, zeros + NO_CAUSAL, head, group[pack_idx],
                     prefix_lo[group][pack_idx], prefix_hi[group][pack_idx]], axis=1)


def _pack_decode(pack: bool, own_seqs, own_kind, own_tokens, own_splits, own_spans, own_first, prefix_splits,
                 q_starts, ratio: int, block_n: int, num_kv_heads: int, pack_rows: int, max_keys: int, taken):
    """Packed items: consecutive sequences whose own item would be one small (16-row) unsplit tile of one
    decode token over a short own range, pack_rows // ratio of them per packed tile, so that their own KV
    blocks stream through one pipelined loop. A pack holds sequences with consecutive indices (so consecutive
    tokens), the same prefix partial count (so the same workspace slot offset) and block counts within one of
    each other.
    Returns (which own entries are packed, the packed items (n_items, NUM_FIELDS))."""
    count = own_seqs.shape[0]
    per_pack = min(pack_rows // ratio, PACK_MAX_SEQS)
    ok = (pack & (per_pack >= 2) & (own_kind == 2) & (own_tokens == 1) & (own_splits == 1) & (own_first == 0)
          & (own_spans > 0) & (own_spans <= max_keys) & ~taken)
    candidates = np.flatnonzero(ok)
    if candidates.size < 2:
        return np.zeros(count, dtype=bool), np.zeros((0, NUM_FIELDS), dtype=np.int64)
    seqs, blocks = own_seqs[candidates], _cdiv(own_spans[candidates], block_n)
    splits = prefix_splits[candidates]
    joins = (seqs[1:] == seqs[:-1] + 1) & (splits[1:] == splits[:-1]) & (np.abs(blocks[1:] - blocks[:-1]) <= 1)
    new_run = np.concatenate([[True], ~joins])
    run_first = np.flatnonzero(new_run)
    position = np.arange(candidates.size) - run_first[np.cumsum(new_run) - 1]
    new_pack = new_run | (position % per_pack == 0)
    pack_of = np.cumsum(new_pack) - 1
    sizes = np.bincount(pack_of)
    keep = sizes[pack_of] >= 2  # a pack of one stays an ordinary own item
    packed = np.zeros(count, dtype=bool)
    packed[candidates[keep]] = True
    firsts = np.flatnonzero(new_pack & keep)
    if firsts.size == 0:
        return packed, np.zeros((0, NUM_FIELDS), dtype=np.int64)
    n = sizes[pack_of[firsts]]
    # the pack's longest own range (the kernel cuts it into its BLOCK_N-key blocks: a plan's block_n may be
    # changed after planning, as the benchmarks' sweeps do)
    starts = np.flatnonzero(new_pack)
    pack_longest = np.maximum.reduceat(own_spans[candidates], starts)[pack_of[firsts]]
    pack_keys = np.add.reduceat(own_spans[candidates], starts)[pack_of[firsts]]
    pack_idx, head = _expand(np.full(firsts.size, num_kv_heads))
    seq0 = seqs[firsts][pack_idx]
    zeros = np.zeros_like(pack_idx)
    items = np.stack([zeros + PACKED, seq0, q_starts[seq0], n[pack_idx] * ratio, pack_longest[pack_idx], zeros,
                      pack_keys[pack_idx], splits[firsts][pack_idx], zeros + NO_CAUSAL, head, zeros, zeros, zeros],
                     axis=1)
    return packed, items
