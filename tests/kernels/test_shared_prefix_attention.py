"""Triton shared-prefix attention (paged) against the torch reference, under TRITON_INTERPRET=1 on CPU.

Shapes are scaled down for the interpreter but keep what breaks tilings: lengths 1, 13, 127, 128, 1025,
one group and many, groups of one, empty prefixes, ungrouped sequences, GQA 1/4/7/8, head dims 64/128,
fp32/fp16/bf16, KV splits forced small, prefill chunks of several members of a group in one step.
Outputs and lse start as NaN, so rows the kernels forget fail. The same tests run on a GPU when the
tensors are CUDA (set BATCHLLM_TEST_DEVICE=cuda); benchmarks/bench_kernels.py --check covers real sizes.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by the kernels

import numpy as np
import pytest
import torch

from batchllm_hf.kernels import (
    allocate_plan,
    paged_attention,
    plan_paged_attention,
    shared_prefix_decode,
    shared_prefix_prefill,
)
from batchllm_hf.kernels.paged import paged_attention_reference

from paged_steps import random_paged_step  # tests/kernels is on sys.path (pytest rootdir-less import)

pytest.importorskip("triton")
DEVICE = os.environ.get("BATCHLLM_TEST_DEVICE", "cpu")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def run_and_compare(groups, num_q_heads, num_kv_heads, head_dim, dtype, *, page_size=16, decode=False, seed=0,
                    block_n=None, masked_stages=None, prefetch_pages=None, **plan_kwargs):
    q, k_cache, v_cache, meta = random_paged_step(groups, num_q_heads, num_kv_heads, head_dim, page_size, dtype,
                                                  DEVICE, seed)
    scaling = head_dim ** -0.5
    plan = plan_paged_attention(meta, num_q_heads, num_kv_heads, head_dim, **plan_kwargs)
    plan.part_out.fill_(float("nan"))  # a workspace slot the kernel forgets to write poisons the merge
    plan.part_lse.fill_(float("nan"))
    plan.block_n = block_n or plan.block_n
    plan.masked_stages = masked_stages or plan.masked_stages
    plan.prefetch_pages = plan.prefetch_pages if prefetch_pages is None else prefetch_pages  # None: the planner's
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), device=q.device)
    launcher = shared_prefix_decode if decode else shared_prefix_prefill
    launcher(q, k_cache, v_cache, meta, scaling, out=out, lse=lse, plan=plan, force_triton=True)
    ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, scaling)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
    return plan


def decode_groups(prefix_lens, members, own_len):
    return [(p, [(own_len + i, 1) for i in range(members)]) for p in prefix_lens]


@pytest.mark.parametrize("prefix_len", [0, 1, 13, 127, 128, 1025])
def test_decode_prefix_lengths(prefix_len):
    groups = decode_groups([prefix_len], 3, 13) + [(None, [(1, 1), (128, 1)])]
    run_and_compare(groups, 8, 2, 64, torch.float32, decode=True)


@pytest.mark.parametrize("ratio,num_kv_heads", [(1, 3), (4, 2), (7, 1), (8, 1), (7, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wide", [True, False])
def test_decode_gqa_ratios(ratio, num_kv_heads, dtype, wide):
    groups = decode_groups([127, 13, 1], 5, 2) + [(40, [(1, 1)])]  # the last: a group of one
    plan = run_and_compare(groups, ratio * num_kv_heads, num_kv_heads, 64, dtype, decode=True, wide=wide)
    kinds = set(plan.items[: int(plan.num_items)][:, 0].tolist())
    # Wide items (all KV heads in one program) for the own KV of every decode token and the prefix of the
    # group of one, when there are several KV heads and a token's query heads fit one wide tile.
    assert (4 in kinds and 5 in kinds) == (wide and num_kv_heads > 1 and ratio * num_kv_heads <= 64)


@pytest.mark.parametrize("rows_per_token", [32, 28, 64])
def test_decode_wide_tiles_of_real_head_counts(rows_per_token):
    # Llama-3-8B (32 / 8), Qwen2.5-7B (28 / 4), 70B per GPU (64 / 8): wide tiles of 32 and 64 rows, 8 KV
    # heads per key token in a 128-column block; a 2-token chunk of a group of one beside them (one-head items).
    num_kv_heads = 4 if rows_per_token == 28 else 8
    groups = decode_groups([100, 0], 3, 37) + [(70, [(2, 2)])]
    plan = run_and_compare(groups, rows_per_token, num_kv_heads, 64, torch.bfloat16, chunk=48, wide=True)
    assert plan.block_m_wide == (64 if rows_per_token == 64 else 32)
    kinds = plan.items[: int(plan.num_items)][:, 0].tolist()
    assert 4 in kinds and 1 in kinds or 3 in kinds


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_many_groups_uneven(head_dim):
    groups = [(13 * g + 1, [(1 + 7 * m, 1) for m in range(1 + g % 4)]) for g in range(9)]
    groups += [(0, [(5, 1), (1, 1)]), (None, [(33, 1)])]
    run_and_compare(groups, 4, 1, head_dim, torch.float16, decode=True, seed=head_dim)
    run_and_compare(groups, 8, 2, head_dim, torch.float16, decode=True, seed=head_dim, wide=True)


@pytest.mark.parametrize("chunk", [16, 48])
@pytest.mark.parametrize("page_size", [1, 4, 128])
def test_decode_kv_splits(chunk, page_size):
    # Forced small chunks: every row merges several prefix and own partials; pages smaller and larger than
    # the kernel's BLOCK_N.
    groups = decode_groups([127, 0], 2, 100) + [(None, [(129, 1)])]
    plan = run_and_compare(groups, 4, 2, 64, torch.float32, page_size=page_size, decode=True, chunk=chunk)
    assert plan.needs_merge


def test_long_prefix_split_beside_many_short_items(monkeypatch):
    # One large group's few prefix tiles (1025 keys each) beside many short own items: the items outnumber
    # the programs the planner aims for, yet the prefix tiles are split so that none outlasts the rest (at
    # interpreter scale the shortest chunk for such steps is lowered from 2048 to 256 keys); session 3's
    # rule (split only an underfilled step) left them whole.
    from batchllm_hf.kernels import attention_plan

    groups = decode_groups([1025], 24, 13) + [(None, [(9, 1)]) for _ in range(20)]
    monkeypatch.setattr(attention_plan, "_MIN_CHUNK_FILLED", 256)
    plan = run_and_compare(groups, 8, 2, 64, torch.float32, decode=True, num_sms=8)
    items = plan.items[: int(plan.num_items)]
    prefix = items[items[:, 0] % 2 == 1]
    assert int(prefix[:, 5].max()) > 0 and int((prefix[:, 6] - prefix[:, 5]).max()) <= 256
    assert plan.num_items > 8 * 4 and plan.needs_merge  # more items than the 32 programs aimed for
    monkeypatch.setattr(attention_plan, "_MIN_CHUNK_FILLED", 1 << 30)
    old = run_and_compare(groups, 8, 2, 64, torch.float32, decode=True, num_sms=8)
    assert int(old.items[: int(old.num_items)][:, 5].max()) == 0  # every item starts at key 0: no split


@pytest.mark.parametrize("block_n", [32, 128])
def test_tile_widths_used_on_gpu(block_n):
    # The GPU configurations: 32 keys per step for prefill tiles, 128 for decode with large groups.
    groups = [(130, [(40, 17), (9, 1), (2, 1)]), (None, [(150, 1)])]
    run_and_compare(groups, 8, 2, 64, torch.float16, block_n=block_n, chunk=64)


def test_decode_large_group_spans_several_tiles():
    # 40 members x ratio 4 = 160 rows: several BLOCK_M tiles read the same prefix.
    run_and_compare(decode_groups([128], 40, 3), 4, 1, 64, torch.bfloat16, decode=True, block_m=32)


@pytest.mark.parametrize("q_len", [1, 13, 127])
@pytest.mark.parametrize("ratio", [1, 7])
def test_prefill_chunks_of_several_members(q_len, ratio):
    # Members of one group prefill chunks in the same step (sharing the prefix read); the own KV holds
    # earlier chunks + this chunk; plus a prefix prefill (ungrouped) and decode tokens (one in the big
    # group, one in a group of its own: the small-tile items mixed with the large ones).
    groups = [(128, [(q_len, q_len), (q_len + 20, q_len), (1, 1)]), (13, [(5, 1)]), (None, [(q_len + 3, q_len)])]
    run_and_compare(groups, ratio, 1, 64, torch.float16, seed=q_len)


@pytest.mark.parametrize("masked_stages", [1, 2])
def test_masked_loop_stages(masked_stages):
    # The masked key loop (causal diagonal, tails) with its own pipeline depth (a sweep variant on the GPU):
    # prefill chunks crossing the diagonal, decode tails, a KV split.
    groups = [(70, [(37, 20), (5, 1), (3, 1)]), (None, [(45, 45)])]
    plan = run_and_compare(groups, 8, 2, 64, torch.float16, masked_stages=masked_stages, chunk=32, block_m=32)
    assert plan.masked_stages == masked_stages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_split_and_large_tiles(dtype):
    groups = [(1025, [(200, 130), (13, 13)]), (0, [(90, 90)])]
    run_and_compare(groups, 8, 2, 128, dtype, chunk=256, block_m=128)


def test_group_members_not_contiguous():
    # The contract keeps a group's members together, but the plan must stay correct when they are not.
    q, k_cache, v_cache, meta = random_paged_step([(50, [(3, 1), (4, 1)]), (20, [(5, 1)])], 4, 2, 64, 16,
                                                  torch.float32, DEVICE)
    meta.seq_group = torch.tensor([0, 1, 0], dtype=torch.int32, device=DEVICE)
    plan = plan_paged_attention(meta, 4, 2, 64)
    out, lse = shared_prefix_decode(q, k_cache, v_cache, meta, 0.125, plan=plan, force_triton=True)
    ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("num_programs", [3, None])
def test_static_plan_buffers_are_reused(wide, num_programs):
    # CUDA-graph usage: one static plan, refilled for two different steps, larger than either needs.
    # num_programs=3: 3 programs loop over all items (the kernel's grid-stride loop); None: one program per
    # item slot, the slots past the step's items idle. Wide items only where the static plan was made for
    # them (its kernel is compiled with or without them).
    static = allocate_plan(max_tokens=16, max_items=64, max_parts=64, num_q_heads=4, head_dim=64, device=DEVICE,
                           block_m=16, num_programs=num_programs, wide=wide)
    assert static.num_programs == (num_programs or 64)
    for seed, groups in enumerate([decode_groups([60], 3, 5), decode_groups([7, 300], 2, 40)]):
        q, k_cache, v_cache, meta = random_paged_step(groups, 4, 2, 64, 16, torch.float32, DEVICE, seed)
        plan = plan_paged_attention(meta, 4, 2, 64, buffers=static, chunk=64, wide=True)
        assert plan is static
        assert int(plan.num_items) > plan.num_programs if num_programs else int(plan.num_items) < plan.num_programs
        assert (4 in plan.items[: int(plan.num_items), 0].tolist()) == wide
        out, lse = shared_prefix_decode(q, k_cache, v_cache, meta, 0.125, plan=plan, force_triton=True)
        ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ratio,num_kv_heads", [(1, 3), (4, 2), (7, 1), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size,chunk", [(16, None), (4, 32), (128, None)])
def test_packed_decode_items(ratio, num_kv_heads, dtype, page_size, chunk):
    # Packed items: consecutive decode tokens' own KV (<= PACK_MAX_KEYS keys) in one loop, several sequences
    # per 16-row tile. Own lengths 1-128 across block and page boundaries, a longer one (not packed), a
    # prefill chunk and ungrouped sequences between packs, groups whose prefixes split into different numbers
    # of partials (chunk=32: a pack never spans two of them), a group of one.
    groups = [(37, [(1 + 9 * m, 1) for m in range(7)] + [(130, 1), (64, 1), (65, 1)]),
              (300, [(3, 1), (128, 1), (20, 3), (5, 1), (6, 1)]), (None, [(33, 1), (2, 1), (90, 1)]), (20, [(3, 1)])]
    plan = run_and_compare(groups, ratio * num_kv_heads, num_kv_heads, 64, dtype, page_size=page_size, chunk=chunk)
    kinds = plan.items[: int(plan.num_items), 0].tolist()
    assert plan.has_packed and 16 in kinds
    packed = plan.items[: int(plan.num_items)][plan.items[: int(plan.num_items), 0] == 16]
    assert int(packed[:, 3].max()) <= 16 and int(packed[:, 3].min()) >= 2 * ratio  # 2+ sequences per tile
    unpacked = run_and_compare(groups, ratio * num_kv_heads, num_kv_heads, 64, dtype, page_size=page_size,
                               chunk=chunk, pack=False)
    # the kernel's key blocks may be narrower than the planner's (the benchmarks' sweeps set block_n after
    # planning): packed items hold their longest own range, not a block count
    narrow = run_and_compare(groups, ratio * num_kv_heads, num_kv_heads, 64, dtype, page_size=page_size,
                             chunk=chunk, block_n=16)
    assert 16 in narrow.items[: int(narrow.num_items), 0].tolist()
    assert 16 not in unpacked.items[: int(unpacked.num_items), 0].tolist()


def test_packed_tile_rows_are_checked():
    with pytest.raises(ValueError, match="block_m_packed"):
        allocate_plan(max_tokens=4, max_items=8, max_parts=8, num_q_heads=8, head_dim=64, device="cpu",
                      packed=True, block_m_packed=24)


def test_static_plan_packs_only_when_allocated_so():
    # A static plan packs decode tokens only if allocated with packed=True (its kernel is compiled with or
    # without the packed branch); refilled for two steps, the other plan's kinds never appear.
    for packed in (True, False):
        static = allocate_plan(max_tokens=16, max_items=64, max_parts=64, num_q_heads=8, head_dim=64, device=DEVICE,
                               packed=packed)
        for seed, groups in enumerate([decode_groups([60], 3, 5), decode_groups([7, 300], 2, 40)]):
            q, k_cache, v_cache, meta = random_paged_step(groups, 8, 2, 64, 16, torch.float32, DEVICE, seed)
            plan = plan_paged_attention(meta, 8, 2, 64, buffers=static, chunk=64)
            assert (16 in plan.items[: int(plan.num_items), 0].tolist()) == packed
            out, lse = shared_prefix_decode(q, k_cache, v_cache, meta, 0.125, plan=plan, force_triton=True)
            ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
            torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_static_plan_coarsens_chunks_to_fit():
    q, k_cache, v_cache, meta = random_paged_step(decode_groups([60], 3, 5), 4, 2, 64, 16, torch.float32, DEVICE)
    static = allocate_plan(max_tokens=3, max_items=8, max_parts=6, num_q_heads=4, head_dim=64, device=DEVICE)
    plan_paged_attention(meta, 4, 2, 64, buffers=static, chunk=16)  # chunk 16 would need 7 items per KV head
    assert int(static.num_items) == 8  # chunk 64: (1 prefix + 3 own) items x 2 KV heads
    out, lse = shared_prefix_decode(q, k_cache, v_cache, meta, 0.125, plan=static, force_triton=True)
    ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_static_plan_too_small_raises():
    q, k_cache, v_cache, meta = random_paged_step(decode_groups([60], 3, 5), 4, 2, 64, 16, torch.float32)
    static = allocate_plan(max_tokens=16, max_items=1, max_parts=0, num_q_heads=4, head_dim=64, device="cpu")
    with pytest.raises(ValueError, match="max_items"):
        plan_paged_attention(meta, 4, 2, 64, buffers=static)


def test_input_checks():
    q, k_cache, v_cache, meta = random_paged_step(decode_groups([8], 2, 3), 4, 2, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="one query token per sequence"):
        shared_prefix_decode(q[:1], k_cache, v_cache, meta, 0.125, force_triton=True)
    with pytest.raises(ValueError, match="head_dim"):
        shared_prefix_prefill(q[..., :48], k_cache[..., :48], v_cache[..., :48], meta, 0.125, force_triton=True)
    with pytest.raises(ValueError, match="dtype"):
        shared_prefix_prefill(q.half(), k_cache, v_cache, meta, 0.125, force_triton=True)


def test_paged_attention_dispatches_to_reference_off_cuda():
    q, k_cache, v_cache, meta = random_paged_step(decode_groups([30], 2, 3), 4, 2, 64, 16, torch.float32)
    out = torch.full_like(q, float("nan"))
    result = paged_attention(q, k_cache, v_cache, meta, 0.125, out=out)
    assert result is out
    torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.125)[0], atol=0, rtol=0)


@pytest.mark.parametrize("page_size,block_n,chunk", [(64, 64, None), (64, 32, None), (128, 64, 96), (64, 32, 80),
                                                     (16, 32, None)])
@pytest.mark.parametrize("dtype,prefetch", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_tma_key_loads(page_size, block_n, chunk, dtype, prefetch, monkeypatch):
    # Unmasked key blocks through tensor descriptors (plan.use_tma): pages of whole blocks; chunks longer
    # than a block that start KV splits off block boundaries (those items must fall back to masked pointer
    # loads: without the alignment guard a TMA block would straddle pages); pages smaller than a block (the
    # launcher keeps pointer loads). Decode tokens and prefill chunks of several members. prefetch: each
    # block's page id loaded a block ahead (plan.prefetch_pages), so the last block of an item must not read
    # a table entry past its range.
    from batchllm_hf.kernels import shared_prefix_triton

    used = []
    real = shared_prefix_triton._pool_descriptor
    monkeypatch.setattr(shared_prefix_triton, "_pool_descriptor", lambda *a: used.append(a[1]) or real(*a))
    groups = [(300, [(140, 70), (129, 1), (200, 2)]), (0, [(130, 130)]), (None, [(257, 1)])]
    run_and_compare(groups, 8, 2, 64, dtype, page_size=page_size, block_n=block_n, chunk=chunk, use_tma=True,
                    prefetch_pages=prefetch)
    assert bool(used) == (page_size % block_n == 0)


@pytest.mark.parametrize("use_tma,page_size,prefetch", [(False, 16, False), (True, 64, False), (True, 64, True)])
def test_fused_prefill_items(use_tma, page_size, prefetch, monkeypatch):
    # Members whose chunk fills large tiles alone (q_len * ratio >= 128 rows) read their group's prefix in
    # their own items (kind 8): prefix (unmasked blocks, then a tail that is not a whole block), then their
    # own KV causally, one partial per row, so those rows write the output directly. Beside them: a member
    # with a short chunk and a decode token sharing the group's prefix tiles, a group of one, and an
    # ungrouped prefill. fuse=False plans the same step without fused items; both match the reference.
    from batchllm_hf.kernels import shared_prefix_triton

    used = []
    real = shared_prefix_triton._pool_descriptor
    monkeypatch.setattr(shared_prefix_triton, "_pool_descriptor", lambda *a: used.append(a[1]) or real(*a))
    groups = [(200, [(70, 40), (150, 33), (9, 5), (30, 1)]), (77, [(64, 64)]), (None, [(50, 40)])]
    fused = run_and_compare(groups, 8, 2, 64, torch.float32, page_size=page_size, block_n=32, use_tma=use_tma,
                            num_sms=1, prefetch_pages=prefetch)
    items = fused.items[: int(fused.num_items)]
    kinds = items[:, 0].tolist()
    assert fused.has_fused and kinds.count(8) > 0 and set(items[items[:, 0] == 8][:, 12].tolist()) == {200, 77}
    assert (items[items[:, 0] != 8][:, 10:] == 0).all()
    assert bool(used) == use_tma
    # (these two take the planner's prefetch: on with TMA, whatever `prefetch` says for the fused run above)
    plain = run_and_compare(groups, 8, 2, 64, torch.float32, page_size=page_size, block_n=32, use_tma=use_tma,
                            fuse=False, num_sms=1)
    # only where fused items lose no parallelism: prefixes of at most 2048 keys, steps whose items fill the GPU
    few = run_and_compare(groups, 8, 2, 64, torch.float32, page_size=page_size, block_n=32, use_tma=use_tma)
    assert not few.has_fused  # 132 SMs (the CPU default) would wait on a few long fused items
    assert not plain.has_fused and 8 not in plain.items[: int(plain.num_items)][:, 0].tolist()
    num_tokens = 40 + 33 + 5 + 1 + 64 + 40
    assert int((fused.num_parts[:num_tokens] > 1).sum()) < int((plain.num_parts[:num_tokens] > 1).sum())


def test_planner_default_tma_and_compiled_branches():
    # use_tma=None (the default): TMA key loads, with 64 x 64 prefill tiles, page ids loaded a block ahead and
    # a 1-stage masked loop, for prefill steps whose pages hold whole 64-key blocks; pages of 16 keep
    # pointer loads and 128-row tiles. has_small / has_fused: the kernel branches a plan needs compiled (a
    # step of long prefill chunks alone is compiled without the 16-row branch; with decode rows, with it).
    from batchllm_hf.kernels.attention_plan import plan_attention

    def plan(q_lens, own_lens, page_size=64, prefix=512, head_dim=128, **kw):
        n = len(q_lens)
        return plan_attention(np.concatenate([[0], np.cumsum(q_lens)]), np.array(own_lens), np.zeros(n, np.int64),
                              np.array([prefix]), 32, 8, head_dim, torch.device("cpu"), num_sms=132,
                              page_size=page_size, **kw)

    chunks = ([512] * 4, [512] * 4)  # 4 chunks of 512 tokens, GQA 4: 8192 rows
    prefill = plan(*chunks)
    assert (prefill.block_m_own, prefill.block_n, prefill.use_tma, prefill.has_small) == (64, 64, True, False)
    assert (prefill.prefetch_pages, prefill.masked_stages) == (True, 1)  # page ids a block ahead: 3 TMA buffers
    assert prefill.has_fused  # every member's chunk has 2048 rows
    # fused only where the chunk rule would not split the prefix: a step that fills the GPU (here a fair
    # share of the work is over 8192 keys, so that prefix stays whole fused or not); one member alone is
    # too few (unfused, its prefix is split over many programs; fused, 8 long items would leave SMs idle)
    assert plan(*chunks, prefix=8192).has_fused
    alone = plan([512], [512], prefix=8192)
    assert not alone.has_fused and int(alone.items[: int(alone.num_items)][:, 5].max()) > 0
    pointer = plan(*chunks, page_size=16)
    assert (pointer.block_m_own, pointer.block_n, pointer.use_tma, pointer.prefetch_pages) == (128, 32, False, False)
    mixed = plan([512] * 4 + [1] * 8, [512] * 4 + [40] * 8)  # decode tokens with 40 own keys: packed items
    assert (mixed.use_tma, mixed.has_small, mixed.has_packed) == (True, False, True)
    mixed = plan([512] * 4 + [1] * 8, [512] * 4 + [40] * 8, pack=False)
    assert (mixed.use_tma, mixed.has_small, mixed.has_packed) == (True, True, False)
    # decode steps planned per step (launched from Python) keep pointer loads, 2 stages, 128-row tiles for
    # large groups; use_tma=True (what the engine's CUDA-graph plans take, session 13) gives them tiles of at
    # most 64 rows, 3 stages, page ids a block ahead and a 1-stage masked loop
    decode = plan([1] * 64, [40] * 64, pack=False)
    assert (decode.block_m_own, decode.num_stages, decode.use_tma, decode.has_small, decode.has_fused) == (
        16, 2, False, True, False)
    packed = plan([1] * 64, [40] * 64)  # 4 sequences (16 rows at GQA 4) per packed item and KV head
    kinds = packed.items[: int(packed.num_items), 0]
    assert (packed.has_small, packed.has_packed, int((kinds == 16).sum())) == (False, True, 16 * 8)
    large = plan([1] * 512, [40] * 512)  # 2048 prefix rows
    assert (large.block_m, large.block_m_own, large.num_stages, large.use_tma) == (128, 16, 2, False)
    forced = plan([1] * 512, [40] * 512, use_tma=True)
    assert (forced.block_m, forced.block_m_own, forced.block_n, forced.num_stages) == (64, 64, 64, 3)
    assert (forced.use_tma, forced.prefetch_pages, forced.masked_stages) == (True, True, 1)
    assert not plan(*chunks, use_tma=False).use_tma and not plan(*chunks, use_tma=False).prefetch_pages
    wide_head = plan([1] * 64, [40] * 64, head_dim=256, use_tma=True)  # untimed with TMA: no prefetch there
    assert (wide_head.use_tma, wide_head.prefetch_pages, wide_head.masked_stages) == (True, False, None)
    assert not plan(*chunks, head_dim=256).use_tma  # head_dim 256 never gets the prefill tiles
    with pytest.raises(ValueError, match="16-row"):  # a prefill plan's kernel has no 16-row branch to reuse
        plan([1] * 64, [40] * 64, buffers=prefill)


def test_wide_items_split_by_their_work():
    # A wide item reads every KV head per key, so its work is Hkv times its span: 4 groups of one with a
    # 2000-key prefix (wide decode items, 16,000 units of work each) beside 200 sequences of 600 own keys, on
    # a GPU whose fair share is ~8,000 units: the prefix items are split although 2000 keys alone would not be.
    import numpy as np

    from batchllm_hf.kernels.attention_plan import plan_attention

    seqs = 204
    own = np.full(seqs, 600)
    own[:4] = 3
    groups = np.full(seqs, -1)
    groups[:4] = np.arange(4)
    plan = plan_attention(np.arange(seqs + 1), own, groups, np.full(4, 2000), 8, 8, 64, torch.device("cpu"),
                          num_sms=32, wide=True)
    items = plan.items[: int(plan.num_items)]
    wide_prefix = items[items[:, 0] == 5]
    assert len(wide_prefix) > 4 and int((wide_prefix[:, 6] - wide_prefix[:, 5]).max()) < 2000


def _check_poisoned(launcher, q, k_cache, v_cache, meta, plan, ref_out, ref_lse):
    """Run the kernel on a NaN-poisoned workspace (a slot it forgets to write poisons the merge) and compare."""
    plan.part_out.fill_(float("nan"))
    plan.part_lse.fill_(float("nan"))
    out, lse = launcher(q, k_cache, v_cache, meta, 0.125, plan=plan, force_triton=True)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def _poison_past_lengths(k_cache, v_cache, meta):
    """NaN in every pool slot no sequence or prefix holds (past each length on its last page, spare pages)."""
    page_size = meta.page_size
    held = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for table, lens in ((meta.own_pages, meta.own_lens), (meta.prefix_pages, meta.prefix_lens)):
        for row, length in zip(table.tolist(), lens.tolist()):
            for key in range(length):
                held[row[key // page_size], key % page_size] = True
    for cache in (k_cache, v_cache):
        cache[~held.to(cache.device)] = float("nan")


@pytest.mark.parametrize("page_size,block_n", [(64, 64), (128, 64), (64, 32)])
@pytest.mark.parametrize("ratio,num_kv_heads", [(4, 2), (7, 1), (1, 3)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_packed_items_through_tma(page_size, block_n, ratio, num_kv_heads, prefetch, monkeypatch):
    # With TMA key loads, packed items read each sequence's whole blocks through TMA (one loop over the pack)
    # and each sequence's partial last block with masked pointer loads; such plans pack own ranges up to
    # PACK_MAX_KEYS_TMA keys. Lengths on and off block boundaries (64, 65, 128, 250, 256), packs
    # whose shortest member has no whole block, NaN in every pool slot past a length (a TMA block or a
    # pointer load past a length would poison the output), block_n narrowed after planning (32).
    from batchllm_hf.kernels import attention_plan, shared_prefix_triton

    used = []
    real = shared_prefix_triton._pool_descriptor
    monkeypatch.setattr(shared_prefix_triton, "_pool_descriptor", lambda *a: used.append(a[1]) or real(*a))
    groups = [(37, [(1 + 9 * m, 1) for m in range(4)] + [(256, 1), (250, 1), (200, 1), (256, 1), (64, 1), (65, 1)]),
              (130, [(128, 1), (190, 1), (129, 1), (300, 1), (3, 1)]), (None, [(33, 1), (64, 1), (90, 1)])]
    num_q_heads = ratio * num_kv_heads
    q, k_cache, v_cache, meta = random_paged_step(groups, num_q_heads, num_kv_heads, 64, page_size, torch.float32,
                                                  DEVICE, 3)
    ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    _poison_past_lengths(k_cache, v_cache, meta)
    plan = plan_paged_attention(meta, num_q_heads, num_kv_heads, 64, use_tma=True)
    items = plan.items[: int(plan.num_items)]
    packed = items[items[:, 0] == attention_plan.PACKED]
    assert int(packed[:, 4].max()) > attention_plan.PACK_MAX_KEYS  # longer ranges packed than without TMA
    plan.block_n, plan.prefetch_pages = block_n, prefetch
    _check_poisoned(shared_prefix_decode, q, k_cache, v_cache, meta, plan, ref_out, ref_lse)
    assert used == [block_n, block_n]
    assert 16 not in plan_paged_attention(meta, num_q_heads, num_kv_heads, 64, use_tma=True, pack=False).items[:, 0]


@pytest.mark.parametrize("block_n,prefetch", [(64, True), (64, False), (32, True)])
def test_packed_tma_blocks_of_members_of_any_lengths(block_n, prefetch):
    # Prefix packs hold members whose lengths differ by any number of blocks: members with no whole block
    # first (the first TMA block is a later member's: its page id is prefetched from that member's row), in the
    # middle and last, exact multiples of a block (no masked block at all), all below one block. GQA 8, 64-row
    # tiles (8 members), NaN past every length.
    from batchllm_hf.kernels import attention_plan

    groups = [(70, [(5, 1), (7, 1), (200, 1)]), (40, [(130, 1), (5, 1), (130, 1)]), (33, [(130, 1), (130, 1), (5, 1)]),
              (64, [(64, 1), (128, 1), (192, 1)]), (9, [(3, 1), (60, 1)]), (100, [(1, 1), (1, 1), (250, 1), (2, 1)])]
    q, k_cache, v_cache, meta = random_paged_step(groups, 8, 1, 64, 64, torch.float32, DEVICE, 4)
    ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    _poison_past_lengths(k_cache, v_cache, meta)
    plan = plan_paged_attention(meta, 8, 1, 64, use_tma=True, pack_prefix=True)
    items = plan.items[: int(plan.num_items)]
    with_prefix = items[(items[:, 0] == attention_plan.PACKED) & (items[:, 12] > items[:, 11])]
    assert sorted(with_prefix[:, 10].tolist()) == list(range(len(groups)))  # one prefix pack per group
    plan.block_n, plan.prefetch_pages = block_n, prefetch
    _check_poisoned(shared_prefix_decode, q, k_cache, v_cache, meta, plan, ref_out, ref_lse)


def test_static_128_row_packs_hold_at_most_32_sequences():
    # A static (CUDA-graph) plan allocated with 128-row packed tiles at GQA 1: packs of 32 sequences at most.
    from batchllm_hf.kernels import attention_plan

    groups = [(None, [(20 + 17 * (m % 5), 1) for m in range(37)])]
    q, k_cache, v_cache, meta = random_paged_step(groups, 2, 2, 64, 64, torch.float32, DEVICE, 6)
    ref_out, _ = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    _poison_past_lengths(k_cache, v_cache, meta)
    static = allocate_plan(max_tokens=40, max_items=256, max_parts=128, num_q_heads=2, head_dim=64, device=DEVICE,
                           packed=True, use_tma=True, prefetch_pages=True, masked_stages=1, block_m_packed=128)
    plan = plan_paged_attention(meta, 2, 2, 64, buffers=static)
    items = plan.items[: int(plan.num_items)]
    packed = items[items[:, 0] == attention_plan.PACKED]
    assert sorted(set(packed[:, 3].tolist())) == [5, 32]
    out, _ = shared_prefix_decode(q, k_cache, v_cache, meta, 0.125, plan=plan, force_triton=True)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)


def test_packs_hold_at_most_32_sequences(monkeypatch):
    # The kernel finds a TMA block's sequence with reductions over a 32-wide vector (one warp), so the planner
    # puts at most PACK_MAX_SEQS = 32 sequences in a pack, even where the tile has rows for more (64-row packs
    # at GQA 1). 40 decode members of mixed lengths (some below one block), NaN past every length.
    from batchllm_hf.kernels import attention_plan

    monkeypatch.setattr(attention_plan, "PACK_ROWS", 64)
    groups = [(70, [(5 + 13 * (m % 7), 1) for m in range(40)])]
    q, k_cache, v_cache, meta = random_paged_step(groups, 2, 2, 64, 64, torch.float32, DEVICE, 2)
    ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    _poison_past_lengths(k_cache, v_cache, meta)
    plan = plan_paged_attention(meta, 2, 2, 64, use_tma=True)
    items = plan.items[: int(plan.num_items)]
    packed = items[items[:, 0] == attention_plan.PACKED]
    assert plan.block_m_packed == 64 and sorted(set(packed[:, 3].tolist())) == [8, 32]  # rows = sequences at GQA 1
    _check_poisoned(shared_prefix_decode, q, k_cache, v_cache, meta, plan, ref_out, ref_lse)


@pytest.mark.parametrize("ratio,num_kv_heads,rows", [(8, 1, 64), (4, 2, 16), (7, 1, 32), (1, 3, 16), (8, 1, 128)])
@pytest.mark.parametrize("use_tma", [False, True])
def test_prefix_packs(ratio, num_kv_heads, rows, use_tma, monkeypatch):
    # Prefix packs: the decode tokens of a group whose every own range is packable read the group's prefix
    # AND their own blocks in packed items: no prefix items, one partial per row. Groups of one and of many,
    # a prefix of 0 and of 1 key, lengths on and off block boundaries, a group with a prefill chunk (it
    # keeps prefix items), a member whose own range is too long to pack (its group keeps prefix items),
    # NaN in every pool slot past a length.
    from batchllm_hf.kernels import attention_plan

    monkeypatch.setattr(attention_plan, "PACK_PREFIX_ROWS", rows)
    groups = [(130, [(1 + 12 * m, 1) for m in range(11)]), (64, [(64, 1), (200, 1), (65, 1)]), (1, [(5, 1)]),
              (40, [(9, 1), (20, 3)]), (70, [(3, 1), (300, 1)]), (None, [(33, 1), (2, 1)]), (0, [(7, 1), (8, 1)])]
    num_q_heads = ratio * num_kv_heads
    q, k_cache, v_cache, meta = random_paged_step(groups, num_q_heads, num_kv_heads, 64, 64, torch.float32, DEVICE, 5)
    ref_out, ref_lse = paged_attention_reference(q, k_cache, v_cache, meta, 0.125)
    _poison_past_lengths(k_cache, v_cache, meta)
    plan = plan_paged_attention(meta, num_q_heads, num_kv_heads, 64, use_tma=use_tma, pack_prefix=True)
    items = plan.items[: int(plan.num_items)]
    with_prefix = items[(items[:, 0] == attention_plan.PACKED) & (items[:, 12] > items[:, 11])]
    # own ranges up to PACK_MAX_KEYS_TMA keys pack with TMA, PACK_MAX_KEYS without: group 1 holds 200 keys
    packs = {0, 1, 2} if use_tma else {0, 2}
    assert plan.block_m_packed == rows and set(with_prefix[:, 10].tolist()) == packs
    assert set(items[items[:, 0] % 2 == 1][:, 1].tolist()) == {1, 3, 4} - packs  # the others keep prefix items
    _check_poisoned(shared_prefix_prefill, q, k_cache, v_cache, meta, plan, ref_out, ref_lse)


def test_prefix_packs_by_default_at_gqa_8_for_groups_of_two_or_more():
    # The planner's default (session 15's measurements): per-step TMA plans at GQA ratios >= 8 pack groups of 2+
    # decode members with their prefix in 64-row tiles. Groups of one, a prefix the step splits (few members,
    # long prefix), GQA 4, plans without TMA and static plans keep prefix items.
    from batchllm_hf.kernels import attention_plan

    def prefix_packed(plan):
        items = plan.items[: int(plan.num_items)]
        return set(items[(items[:, 0] == attention_plan.PACKED) & (items[:, 12] > 0)][:, 10].tolist())

    groups = [(100, [(20 + m, 1) for m in range(5)]), (50, [(30, 1)]), (3000, [(10, 1), (11, 1)])]
    for ratio, use_tma, expect in ((8, True, {0}), (4, True, set()), (8, False, set())):
        q, k_cache, v_cache, meta = random_paged_step(groups, 2 * ratio, 2, 64, 64, torch.float32, DEVICE)
        plan = plan_paged_attention(meta, 2 * ratio, 2, 64, use_tma=use_tma)
        assert prefix_packed(plan) == expect
        assert plan.block_m_packed == (attention_plan.PACK_PREFIX_ROWS if expect else attention_plan.PACK_ROWS)
        items = plan.items[: int(plan.num_items)]
        assert set(items[items[:, 0] % 2 == 1][:, 1].tolist()) == {0, 1, 2} - expect  # prefix items of the rest
        out, lse = shared_prefix_decode(q, k_cache, v_cache, meta, 0.125, plan=plan, force_triton=True)
        torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.125)[0], atol=2e-5,
                                   rtol=2e-5)
    # a prefix the step would split still gets prefix packs where the step's packs fill the GPU (one program
    # per pack and KV head, at least one per SM) and no pack reads more than 4 fair shares of the step's work:
    # 3 groups of 2 at P = 600 (3 packs x 2 KV heads) on 6 SMs, not on 7; a long prefix beside short ones not
    # even where the packs fill the GPU (it would outlast the step)
    fill = [(600, [(10, 1), (11, 1)])] * 3
    straggler = [(3000, [(10, 1), (11, 1)])] + [(64, [(20 + m, 1) for m in range(8)])] * 4
    for step, num_sms, expect in ((fill, 6, {0, 1, 2}), (fill, 7, set()), (straggler, 4, {1, 2, 3, 4})):
        q, k_cache, v_cache, meta = random_paged_step(step, 16, 2, 64, 64, torch.float32, DEVICE)
        plan = plan_paged_attention(meta, 16, 2, 64, use_tma=True, num_sms=num_sms)
        assert prefix_packed(plan) == expect
        out, lse = shared_prefix_decode(q, k_cache, v_cache, meta, 0.125, plan=plan, force_triton=True)
        torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, meta, 0.125)[0], atol=2e-5,
                                   rtol=2e-5)
    static = allocate_plan(max_tokens=8, max_items=256, max_parts=64, num_q_heads=16, head_dim=64, device=DEVICE,
                           packed=True, use_tma=True)
    q, k_cache, v_cache, meta = random_paged_step(groups, 16, 2, 64, 64, torch.float32, DEVICE)
    assert prefix_packed(plan_paged_attention(meta, 16, 2, 64, buffers=static)) == set()
