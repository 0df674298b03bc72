"""How fast can a Triton flash-attention forward go on this GPU for issue 4's prefill-chunk shapes, with no
pages at all? The ceiling for our paged kernel's inner loop (GPU diagnostics, not a test).

    python benchmarks/attention_ceiling.py [--out ceiling.json]     # about 2 minutes on an H200

Shape (the prefill rows of bench_kernels.py): M members of one group each prefill a chunk of C tokens (their
first) against a prefix of P tokens, Hkv 8, GQA 4 or 7, head_dim 128, bf16. In dense form each member's KV
is [prefix; own chunk] (P + C keys, the prefix duplicated), a lower-right causal mask: exactly what
bench_kernels.bench_prefill hands SDPA, so every column below does the same useful FLOPs:
4 * Hq * D * M * C * (P + (C + 1) / 2).

Columns: `_dense_prefill_kernel` below (contiguous KV, one (member, query head) per program row tile, no
GQA folding, no pages) under several tile / warp / stage / TMA / accumulate-in-dot variants; a ladder from it
toward our kernel, one difference at a time (`_ladder_prefill_kernel`: paged KV read through TMA with a
page-table lookup per key block, the page id prefetched a block ahead or not, GQA rows folded or not); torch SDPA's
flash, cuDNN and memory-efficient backends; our paged kernel as the planner runs it (pages of 16 and 64,
with and without TMA key loads). Each is checked against SDPA flash (max abs error) and reported as
TFLOP/s and a fraction of the measured bf16 matmul rate (issue 4's prefill target: >= 50%).

The kernel is the online softmax of the FlashAttention papers with base-2 exponentials, written here from
that description; it exists only to measure what triton reaches on these shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

_LOG2E = 1.4426950408889634


@triton.jit
def _dense_block(q, acc, m_i, l_i, k_ptr, v_ptr, k_desc, v_desc, kv_row0, start, cols, dims, q_pos, qk_scale,
                 MASKED: tl.constexpr, USE_TMA: tl.constexpr, DOT_ACC: tl.constexpr, HEAD_DIM: tl.constexpr):
    if USE_TMA:
        k = k_desc.load([kv_row0 + start, 0])
        v = v_desc.load([kv_row0 + start, 0])
    else:
        rows = (kv_row0 + start + cols).to(tl.int64)
        k = tl.load(k_ptr + rows[:, None] * HEAD_DIM + dims[None, :])
        v = tl.load(v_ptr + rows[:, None] * HEAD_DIM + dims[None, :])
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where((start + cols)[None, :] <= q_pos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_ACC:
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _dense_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, q_desc, k_desc, v_desc, n_q, n_kv, ratio, num_q_heads,
                          num_kv_heads, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, DOT_ACC: tl.constexpr):
    """q, o (B, Hq, n_q, D), k, v (B, Hkv, n_kv, D), all contiguous; n_q % BLOCK_M == n_kv % BLOCK_N == 0.
    Lower-right causal: query i sees keys <= n_kv - n_q + i."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    kv_row0 = ((bh // num_q_heads) * num_kv_heads + (bh % num_q_heads) // ratio) * n_kv
    q_row0 = bh * n_q + start_m
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    q_rows = (q_row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    if USE_TMA:
        q = q_desc.load([q_row0, 0])
    else:
        q = tl.load(q_ptr + q_rows[:, None] * HEAD_DIM + dims[None, :])
    q_pos = n_kv - n_q + start_m + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    full_hi = (n_kv - n_q + start_m + 1) // BLOCK_N * BLOCK_N
    hi = tl.minimum(n_kv, n_kv - n_q + start_m + BLOCK_M)
    for start in range(0, full_hi, BLOCK_N):
        acc, m_i, l_i = _dense_block(q, acc, m_i, l_i, k_ptr, v_ptr, k_desc, v_desc, kv_row0, start, cols, dims,
                                     q_pos, qk_scale, False, USE_TMA, DOT_ACC, HEAD_DIM)
    for start in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i = _dense_block(q, acc, m_i, l_i, k_ptr, v_ptr, k_desc, v_desc, kv_row0, start, cols, dims,
                                     q_pos, qk_scale, True, USE_TMA, DOT_ACC, HEAD_DIM)
    o = acc / l_i[:, None]
    tl.store(o_ptr + q_rows[:, None] * HEAD_DIM + dims[None, :], o.to(o_ptr.dtype.element_ty))


def dense_prefill(q, k, v, scale, block_m, block_n, warps, stages, tma, dot_acc, out):
    batch, num_q_heads, n_q, head_dim = q.shape
    num_kv_heads, n_kv = k.shape[1], k.shape[2]
    q_desc = k_desc = v_desc = None
    if tma:
        q_desc = TensorDescriptor.from_tensor(q.view(-1, head_dim), [block_m, head_dim])
        k_desc = TensorDescriptor.from_tensor(k.view(-1, head_dim), [block_n, head_dim])
        v_desc = TensorDescriptor.from_tensor(v.view(-1, head_dim), [block_n, head_dim])
    grid = (n_q // block_m, batch * num_q_heads)
    _dense_prefill_kernel[grid](q, k, v, out, q_desc, k_desc, v_desc, n_q, n_kv, num_q_heads // num_kv_heads,
                                num_q_heads, num_kv_heads, scale * _LOG2E, HEAD_DIM=head_dim, BLOCK_M=block_m,
                                BLOCK_N=block_n, USE_TMA=tma, DOT_ACC=dot_acc, num_warps=warps, num_stages=stages)
    return out


@triton.jit
def _ladder_block(q, acc, m_i, l_i, k_desc, v_desc, table, next_page, start, n_kv, cols, q_pos, kv_head, qk_scale,
                  MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  PREFETCH: tl.constexpr):
    if PREFETCH:
        page = next_page
        next_page = tl.load(table + tl.minimum(start + BLOCK_N, n_kv - 1) // PAGE_SIZE)
    else:
        page = tl.load(table + start // PAGE_SIZE)
    row = page * PAGE_SIZE + start % PAGE_SIZE
    k = k_desc.load([row, kv_head * HEAD_DIM])
    v = v_desc.load([row, kv_head * HEAD_DIM])
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where((start + cols)[None, :] <= q_pos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i, next_page


@triton.jit
def _ladder_prefill_kernel(q_ptr, o_ptr, k_desc, v_desc, table_ptr, stride_table, n_q, n_kv, ratio, num_q_heads,
                           num_kv_heads, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PREFETCH: tl.constexpr,
                           FOLD: tl.constexpr):
    """The dense kernel one step closer to ours: K/V in a paged pool (pages of PAGE_SIZE in random order), each
    key block's page looked up in the member's table (prefix pages then own pages) and read through TMA over the
    pool viewed as (pages * page_size, Hkv * D), as our kernel's TMA path does. PREFETCH: the next block's page
    id is loaded one iteration ahead (a loop-carried scalar) instead of right before its TMA load. FOLD: rows
    are (token, query head) pairs of one KV head (row = token * ratio + h), q gathered through pointers from
    (T, Hq, D), per-row causal limits: our kernel's GQA folding. q/o: (B, Hq, n_q, D) unfolded, (T, Hq, D)
    folded. Lower-right causal."""
    tile = tl.program_id(0)
    member = tl.program_id(1) // (num_kv_heads if FOLD else num_q_heads)
    head_index = tl.program_id(1) % (num_kv_heads if FOLD else num_q_heads)
    kv_head = head_index if FOLD else head_index // ratio
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    if FOLD:
        tokens = rows // ratio
        heads = kv_head * ratio + rows % ratio
        valid = tokens < n_q
        offsets = ((member * n_q + tokens).to(tl.int64) * num_q_heads + heads) * HEAD_DIM
    else:
        tokens = rows
        valid = rows < n_q
        offsets = ((member * num_q_heads + head_index) * n_q + rows).to(tl.int64) * HEAD_DIM
    q = tl.load(q_ptr + offsets[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
    q_pos = n_kv - n_q + tokens
    table = table_ptr + member * stride_table
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    first_token = (tile * BLOCK_M) // ratio if FOLD else tile * BLOCK_M
    last_token = tl.minimum(((tile + 1) * BLOCK_M - 1) // ratio if FOLD else (tile + 1) * BLOCK_M - 1, n_q - 1)
    full_hi = (n_kv - n_q + first_token + 1) // BLOCK_N * BLOCK_N
    hi = tl.minimum(n_kv, n_kv - n_q + last_token + 1)
    cols = tl.arange(0, BLOCK_N)
    next_page = tl.load(table)
    for start in range(0, full_hi, BLOCK_N):
        acc, m_i, l_i, next_page = _ladder_block(q, acc, m_i, l_i, k_desc, v_desc, table, next_page, start, n_kv, cols,
                                                 q_pos, kv_head, qk_scale, False, HEAD_DIM, BLOCK_N, PAGE_SIZE,
                                                 PREFETCH)
    for start in range(full_hi, hi, BLOCK_N):
        acc, m_i, l_i, next_page = _ladder_block(q, acc, m_i, l_i, k_desc, v_desc, table, next_page, start, n_kv, cols,
                                                 q_pos, kv_head, qk_scale, True, HEAD_DIM, BLOCK_N, PAGE_SIZE,
                                                 PREFETCH)
    o = acc / l_i[:, None]
    tl.store(o_ptr + offsets[:, None] + dims[None, :], o.to(o_ptr.dtype.element_ty), mask=valid[:, None])


def ladder_prefill(q, pool_k, pool_v, tables, n_q, n_kv, num_q_heads, num_kv_heads, scale, block_m, block_n, warps,
                   stages, prefetch, fold, out):
    """q/out unfolded (B, Hq, n_q, D) or folded (T, Hq, D); pools (pages, page_size, Hkv, D); tables (B, pages)."""
    head_dim, page_size = pool_k.shape[-1], pool_k.shape[1]
    k_desc, v_desc = (TensorDescriptor.from_tensor(t.view(t.shape[0] * page_size, -1), [block_n, head_dim])
                      for t in (pool_k, pool_v))
    members = tables.shape[0]
    ratio = num_q_heads // num_kv_heads
    rows = n_q * ratio if fold else n_q
    grid = (triton.cdiv(rows, block_m), members * (num_kv_heads if fold else num_q_heads))
    _ladder_prefill_kernel[grid](q, out, k_desc, v_desc, tables, tables.stride(0), n_q, n_kv, ratio, num_q_heads,
                                 num_kv_heads, scale * _LOG2E, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                                 PAGE_SIZE=page_size, PREFETCH=prefetch, FOLD=fold, num_warps=warps,
                                 num_stages=stages)
    return out


# From the dense kernel to ours, one difference at a time (128 x 64 tiles, 8 warps, 3 stages, TMA, pages of 64;
# and 64 x 64, 4 warps, the planner's prefill tiles): where the paged kernel loses the dense kernel's rate.
LADDER_VARIANTS = [  # name, (block_m, block_n, warps, stages, prefetch, fold)
    ("ladder 128x64 8w: paged, page id before each load", (128, 64, 8, 3, False, False)),
    ("ladder 128x64 8w: paged, page id prefetched", (128, 64, 8, 3, True, False)),
    ("ladder 128x64 8w: paged, prefetched, GQA rows folded", (128, 64, 8, 3, True, True)),
    ("ladder 128x64 8w: paged, GQA rows folded", (128, 64, 8, 3, False, True)),
    ("ladder 64x64 4w: paged, page id before each load", (64, 64, 4, 3, False, False)),
    ("ladder 64x64 4w: paged, GQA rows folded", (64, 64, 4, 3, False, True)),
    ("ladder 64x64 4w: paged, prefetched, GQA rows folded", (64, 64, 4, 3, True, True)),
]


DENSE_VARIANTS = [  # name, (block_m, block_n, warps, stages, tma, dot_acc)
    ("dense 128x64 4w 3st", (128, 64, 4, 3, False, True)),
    ("dense 128x64 4w 3st TMA", (128, 64, 4, 3, True, True)),
    ("dense 128x64 8w 3st TMA", (128, 64, 8, 3, True, True)),
    ("dense 128x128 8w 2st TMA", (128, 128, 8, 2, True, True)),
    ("dense 128x128 8w 3st TMA", (128, 128, 8, 3, True, True)),
    ("dense 128x128 8w 3st TMA, acc + dot", (128, 128, 8, 3, True, False)),
    ("dense 128x128 8w 3st", (128, 128, 8, 3, False, True)),
    ("dense 128x32 4w 3st (our tiles)", (128, 32, 4, 3, False, False)),
    ("dense 64x64 4w 3st TMA (the planner's prefill tiles)", (64, 64, 4, 3, True, True)),
]
STEPS = [(4, 512, 2048, 4), (4, 512, 8192, 4), (16, 512, 2048, 4), (4, 512, 2048, 7)]  # members, chunk, P, GQA
NUM_KV_HEADS, HEAD_DIM = 8, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="attention_ceiling.json")
    args = parser.parse_args()
    from bench_kernels import device_ceilings, duplicated_kv, make_step, sdpa_flash, timed
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from batchllm_hf.kernels import paged_attention, plan_paged_attention
    import torch.nn.functional as F

    ceilings = device_ceilings()
    print(json.dumps(ceilings), flush=True)
    rate = ceilings["matmul_TFLOPs"]
    rows = []
    for members, chunk, prefix, ratio in STEPS:
        q, k_cache, v_cache, meta = make_step(1, members, prefix, chunk, chunk, ratio, page_size=64)
        scale = HEAD_DIM ** -0.5
        flops = 4 * q.shape[1] * HEAD_DIM * members * chunk * (prefix + (chunk + 1) / 2)
        qd = q.view(members, chunk, -1, HEAD_DIM).transpose(1, 2).contiguous()
        kd = duplicated_kv(k_cache, meta, members, prefix, chunk)
        vd = duplicated_kv(v_cache, meta, members, prefix, chunk)
        expected = sdpa_flash(qd, kd, vd, scale, causal_lower_right=True)

        def record(name, fn, result):
            try:
                result.fill_(float("nan"))
                t = timed(fn)
                err = (result.float() - expected_for(result).float()).abs().max().item()
                rows.append(dict(step=[members, chunk, prefix, ratio], variant=name, time_us=t * 1e6,
                                 TFLOPs=flops / t / 1e12, frac_matmul=flops / t / 1e12 / rate, max_err=err))
            except Exception as error:  # noqa: BLE001 - report and go on
                rows.append(dict(step=[members, chunk, prefix, ratio], variant=name, time_us=float("nan"),
                                 frac_matmul=float("nan"), max_err=repr(error)[:160]))
            print("  ", rows[-1], flush=True)

        def expected_for(result):
            return expected if result.dim() == 4 else expected.transpose(1, 2).reshape_as(q)

        out = torch.empty_like(qd)
        for name, (bm, bn, warps, stages, tma, dot_acc) in DENSE_VARIANTS:
            record(name, lambda: dense_prefill(qd, kd, vd, scale, bm, bn, warps, stages, tma, dot_acc, out), out)
        record("SDPA flash", lambda: out.copy_(sdpa_flash(qd, kd, vd, scale, causal_lower_right=True)), out)
        from torch.nn.attention.bias import causal_lower_right
        kx, vx = kd.repeat_interleave(ratio, 1), vd.repeat_interleave(ratio, 1)
        for label, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                               ("SDPA efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def run(backend=backend):
                with sdpa_kernel([backend]):
                    # cuDNN takes a boolean mask as its causal form only for square shapes: pass is_causal on
                    # the lower-right-equal case via an explicit bias object
                    return out.copy_(F.scaled_dot_product_attention(
                        qd, kx, vx, attn_mask=causal_lower_right(qd.shape[2], kx.shape[2]), scale=scale))
            record(label, run, out)
        # the ladder: each member's KV as prefix pages then own pages of the same pool
        tables = torch.cat([meta.prefix_pages[meta.seq_group.long()], meta.own_pages], dim=1).contiguous()
        flat = torch.empty_like(q)
        for name, (bm, bn, warps, stages, prefetch, fold) in LADDER_VARIANTS:
            src, dst = (q, flat) if fold else (qd, out)
            record(name, lambda src=src, dst=dst, bm=bm, bn=bn, warps=warps, stages=stages, prefetch=prefetch,
                   fold=fold: ladder_prefill(src, k_cache, v_cache, tables, chunk, prefix + chunk, q.shape[1],
                                             NUM_KV_HEADS, scale, bm, bn, warps, stages, prefetch, fold, dst), dst)
        for label, page_tma, prefetch in (("ours (planner), pages of 64", False, False),
                                          ("ours (planner) + TMA, pages of 64", True, False),
                                          ("ours (planner) + TMA, page ids prefetched", True, True)):
            plan = plan_paged_attention(meta, q.shape[1], NUM_KV_HEADS, HEAD_DIM, use_tma=page_tma)
            plan.prefetch_pages = prefetch
            record(label, lambda plan=plan: paged_attention(q, k_cache, v_cache, meta, scale, out=flat, plan=plan),
                   flat)
        del qd, kd, vd, kx, vx, out, flat, expected
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"ceilings": ceilings, "rows": rows}, f, indent=1)
    names = list(dict.fromkeys(r["variant"] for r in rows))
    steps = list(dict.fromkeys(tuple(r["step"]) for r in rows))
    print("\n| variant | " + " | ".join(str(list(s)) for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name in names:
        cells = []
        for s in steps:
            r = next(r for r in rows if r["variant"] == name and tuple(r["step"]) == s)
            bad = isinstance(r["max_err"], str) or r["max_err"] > 3e-2
            cells.append(f"{r['time_us']:.0f} us {100 * r['frac_matmul']:.0f}%" + (" ERR" if bad else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
