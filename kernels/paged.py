"""Paged KV layout shared by the engine and the kernels, and its plain-PyTorch reference attention.

KV pool (one per layer): k_cache, v_cache of shape (num_pages, page_size, Hkv, D); page_size a power of
two. Logical token t of a sequence lives in page `pages[t // page_size]`, slot `t % page_size`. A new
token's KV is written at flat slot `page * page_size + slot` of `k_cache.view(-1, Hkv, D)`.

One engine step packs T query tokens of S sequences (decode tokens: 1 each; prefill chunks: several):

    q                (T, Hq, D)      packed; sequence s owns rows q_starts[s]:q_starts[s+1]
    q_starts         (S+1,) int32    cumulative
    own_lens         (S,)   int32    own KV length AFTER this step's tokens were written (>= its q_len);
                                     the step's q tokens are the last q_len of them (causal among them)
    own_pages        (S, max_own_pages) int32   own page table (unused entries: any valid page id)
    seq_group        (S,)   int32    the sequence's group, or -1 for "no shared prefix"
    prefix_pages     (G, max_prefix_pages) int32   each group's shared prefix pages (stored once)
    prefix_lens      (G,)   int32    0 allowed

A sequence attends to ALL of its group's prefix tokens (no mask: they precede it) and causally to its own
tokens. A group's prefix itself runs as an ordinary sequence with seq_group = -1 whose own pages are the
prefix pages. Sequences of one group are contiguous and ordered decode-first by the engine, so kernels can
read a prefix once for all its members' queries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import attention_with_lse, merge_attention_states


@dataclass
class PagedAttentionMetadata:
    """One step's attention metadata (the same for every layer). All tensors on the KV pool's device."""

    q_starts: torch.Tensor
    own_lens: torch.Tensor
    own_pages: torch.Tensor
    seq_group: torch.Tensor
    prefix_pages: torch.Tensor
    prefix_lens: torch.Tensor
    page_size: int

    @property
    def num_seqs(self) -> int:
        return self.own_lens.shape[0]


def gather_pages(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """(num_pages, page_size, Hkv, D) pool + page table -> (Hkv, length, D) contiguous tokens."""
    page_size = cache.shape[1]
    num = -(-length // page_size)
    tokens = cache[pages[:num].long()].reshape(num * page_size, *cache.shape[2:])[:length]
    return tokens.transpose(0, 1)


def paged_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: PagedAttentionMetadata, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for one step: returns out (T, Hq, D) in q's dtype and lse (T, Hq) fp32.

    Loops over sequences (slow, for tests and CPU runs); the prefix is re-read per sequence here, which is
    exactly what the kernels avoid.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    ratio = num_q_heads // num_kv_heads
    out = torch.zeros((num_tokens, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.full((num_tokens, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    starts = meta.q_starts.tolist()
    own_lens = meta.own_lens.tolist()
    groups = meta.seq_group.tolist()
    prefix_lens = meta.prefix_lens.tolist()
    for s in range(meta.num_seqs):
        lo, hi = starts[s], starts[s + 1]
        q_len, kv_len = hi - lo, own_lens[s]
        if q_len == 0:
            continue
        # (Hkv, ratio * q_len, D): query heads sharing a KV head folded into rows
        folded = q[lo:hi].transpose(0, 1).reshape(num_kv_heads, ratio * q_len, head_dim)
        own_k = gather_pages(k_cache, meta.own_pages[s], kv_len)
        own_v = gather_pages(v_cache, meta.own_pages[s], kv_len)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        causal = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]  # (q_len, kv_len)
        o, l = attention_with_lse(folded, own_k, own_v, causal.repeat(ratio, 1)[None], scaling)
        g = groups[s]
        if g >= 0 and prefix_lens[g] > 0:
            pk = gather_pages(k_cache, meta.prefix_pages[g], prefix_lens[g])
            pv = gather_pages(v_cache, meta.prefix_pages[g], prefix_lens[g])
            po, pl = attention_with_lse(folded, pk, pv, None, scaling)
            o, l = merge_attention_states(po, pl, o, l)
        out[lo:hi] = o.reshape(num_q_heads, q_len, head_dim).transpose(0, 1)
        lse[lo:hi] = l.reshape(num_q_heads, q_len).transpose(0, 1)
    return out.to(q.dtype), lse
