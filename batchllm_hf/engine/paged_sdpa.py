"""Paged attention through torch's scaled_dot_product_attention: the engine's fallback until the Triton
kernels (batchllm_hf.kernels.paged_attention) are available.

Same semantics as `kernels.paged.paged_attention_reference` (see the layout contract there), vectorized:
sequences are split into a decode bucket (1 query token) and a prefill bucket; per bucket each sequence's
prefix pages + own pages are gathered into one padded key/value tensor, query heads that share a KV head
are folded into rows (no KV expansion for GQA), and one SDPA call with a boolean mask does the rest.
It reads a group's prefix once per member (what the shared-prefix kernels avoid). Host-side lengths come
from `StepShape` (python ints the engine already has), so it syncs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.paged import PagedAttentionMetadata


@dataclass(frozen=True)
class StepShape:
    """Python-side copy of a step's metadata: per sequence q_len, own_len, prefix_len (0 if none)."""

    q_lens: tuple[int, ...]
    own_lens: tuple[int, ...]
    prefix_lens: tuple[int, ...]


def _bucket(q, k_cache, v_cache, meta, shape, index, scaling, out, prefix_table, q_base):
    device = q.device
    page_size = meta.page_size
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    ratio = num_q_heads // num_kv_heads
    q_lens = [shape.q_lens[i] for i in index]
    own_lens = [shape.own_lens[i] for i in index]
    prefix_lens = [shape.prefix_lens[i] for i in index]
    prefix_pages = [-(-n // page_size) for n in prefix_lens]
    own_pages = [-(-n // page_size) for n in own_lens]
    max_q = max(q_lens)
    num_table = max(p + o for p, o in zip(prefix_pages, own_pages))
    rows = len(index)
    idx = torch.tensor(index, device=device)

    # page table per sequence: prefix pages then own pages (padding: page 0, masked out)
    cols = torch.arange(num_table, device=device)
    pp = torch.tensor(prefix_pages, device=device)[:, None]
    own_col = (cols[None, :] - pp).clamp(0, meta.own_pages.shape[1] - 1)
    table = meta.own_pages[idx].long().gather(1, own_col)
    if any(prefix_pages):
        group = meta.seq_group[idx].long().clamp_min(0)
        pre_col = cols[None, :].clamp(max=prefix_table.shape[1] - 1).expand(rows, -1)
        table = torch.where(cols[None, :] < pp, prefix_table[group].gather(1, pre_col), table)
    length = num_table * page_size
    keys = k_cache[table].reshape(rows, length, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache[table].reshape(rows, length, num_kv_heads, head_dim).transpose(1, 2)

    # mask (rows, max_q, length): prefix tokens all visible; own tokens causal; padded query rows see key 0
    key_pos = torch.arange(length, device=device)[None, None, :]
    q_idx = torch.arange(max_q, device=device)[None, :, None]
    p_len = torch.tensor(prefix_lens, device=device)[:, None, None]
    p_span = pp[:, :, None] * page_size
    o_len = torch.tensor(own_lens, device=device)[:, None, None]
    q_len = torch.tensor(q_lens, device=device)[:, None, None]
    own_pos = key_pos - p_span
    visible = torch.where(key_pos < p_span, key_pos < p_len, own_pos <= o_len - q_len + q_idx)
    real_row = q_idx < q_len
    mask = torch.where(real_row, visible, key_pos == 0)

    # queries: packed rows -> (rows, max_q, Hq, D), padded rows read row 0
    starts = torch.tensor([q_base[i] for i in index], device=device)[:, None]
    src = (starts + torch.arange(max_q, device=device)[None, :]).clamp(max=q.shape[0] - 1)
    src = torch.where(real_row[:, :, 0], src, torch.zeros_like(src))
    queries = q[src.reshape(-1)].reshape(rows, max_q, num_kv_heads, ratio, head_dim)
    queries = queries.permute(0, 2, 3, 1, 4).reshape(rows, num_kv_heads, ratio * max_q, head_dim)
    mask = mask[:, None, None].expand(rows, 1, ratio, max_q, length).reshape(rows, 1, ratio * max_q, length)
    o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scaling)
    o = o.reshape(rows, num_kv_heads, ratio, max_q, head_dim).permute(0, 3, 1, 2, 4).reshape(rows, max_q, num_q_heads,
                                                                                              head_dim)
    keep = real_row[:, :, 0].reshape(-1)
    out[src.reshape(-1)[keep]] = o.reshape(rows * max_q, num_q_heads, head_dim)[keep]


def paged_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata,
                         scaling: float, shape: StepShape) -> torch.Tensor:
    """q (T, Hq, D) -> out (T, Hq, D) in q's dtype."""
    out = torch.empty_like(q)
    q_base, total = [], 0
    for n in shape.q_lens:
        q_base.append(total)
        total += n
    decode = [i for i, n in enumerate(shape.q_lens) if n == 1]
    prefill = [i for i, n in enumerate(shape.q_lens) if n > 1]
    for index in (decode, prefill):
        if index:
            _bucket(q, k_cache, v_cache, meta, shape, index, scaling, out, meta.prefix_pages.long(), q_base)
    return out
