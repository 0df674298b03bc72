"""Random engine steps in the paged layout (kernels/paged.py) for the kernel tests and the benchmark."""

from __future__ import annotations

import torch

from batchllm_hf.kernels.paged import PagedAttentionMetadata


def random_paged_step(groups: list[tuple[int, list[tuple[int, int]]]], num_q_heads: int, num_kv_heads: int,
                      head_dim: int, page_size: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0,
                      spare_pages: int = 3):
    """Build (q, k_cache, v_cache, meta) for one step.

    groups: [(prefix_len, [(own_len, q_len), ...]), ...]; prefix_len None makes ungrouped sequences
    (seq_group -1). Pages are handed out in a random order, unused table entries point at random pages,
    and all values are random (never zeros), so a kernel that reads the wrong page or slot fails.
    """
    gen = torch.Generator().manual_seed(seed)
    per_seq = [(g, own, ql) for g, (_, seqs) in enumerate(groups) for own, ql in seqs]
    prefix_lens = [p or 0 for p, _ in groups]
    pages_needed = sum(-(-p // page_size) for p in prefix_lens) + sum(-(-own // page_size) for _, own, _ in per_seq)
    num_pages = pages_needed + spare_pages
    order = torch.randperm(num_pages, generator=gen).tolist()

    def take(length: int, width: int) -> list[int]:
        used = [order.pop() for _ in range(-(-length // page_size))]
        filler = torch.randint(0, num_pages, (width - len(used),), generator=gen).tolist()
        return used + filler

    max_prefix_pages = max([-(-p // page_size) for p in prefix_lens] + [1])
    max_own_pages = max([-(-own // page_size) for _, own, _ in per_seq] + [1])
    prefix_pages = [take(p, max_prefix_pages) for p in prefix_lens]
    own_pages = [take(own, max_own_pages) for _, own, _ in per_seq]
    q_lens = [ql for _, _, ql in per_seq]
    q_starts = [0]
    for ql in q_lens:
        q_starts.append(q_starts[-1] + ql)
    seq_group = [g if groups[g][0] is not None else -1 for g, _, _ in per_seq]

    def ints(values, shape=None):
        t = torch.tensor(values, dtype=torch.int32)
        return (t.reshape(shape) if shape is not None else t).to(device)

    meta = PagedAttentionMetadata(
        q_starts=ints(q_starts), own_lens=ints([own for _, own, _ in per_seq]),
        own_pages=ints(own_pages, (len(per_seq), max_own_pages)), seq_group=ints(seq_group),
        prefix_pages=ints(prefix_pages, (len(groups), max_prefix_pages)), prefix_lens=ints(prefix_lens),
        page_size=page_size)
    kv_shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(kv_shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(kv_shape, generator=gen).to(dtype).to(device)
    q = torch.randn((q_starts[-1], num_q_heads, head_dim), generator=gen).to(dtype).to(device)
    return q, k_cache, v_cache, meta
