"""The engine's SDPA paged attention against the contract's reference (kernels/paged.py)."""

import random

import pytest
import torch

from batchllm_hf.engine.paged_sdpa import StepShape, paged_attention_sdpa
from batchllm_hf.kernels.paged import PagedAttentionMetadata, paged_attention_reference


def random_step(seed, ratio, head_dim, page_size=4, num_pages=64, num_kv_heads=2):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    k_cache = torch.randn(num_pages, page_size, num_kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    pages = list(range(num_pages))
    rng.shuffle(pages)
    prefix_lens = [rng.choice([0, 1, 5, 13]) for _ in range(3)]
    prefix_tables = [[pages.pop() for _ in range(-(-n // page_size))] for n in prefix_lens]
    q_lens, own_lens, groups, tables = [], [], [], []
    for _ in range(6):
        q_len = rng.choice([1, 1, 3, 9])
        own = q_len + rng.choice([0, 2, 7])
        q_lens.append(q_len)
        own_lens.append(own)
        groups.append(rng.choice([-1, 0, 1, 2]))
        tables.append([pages.pop() for _ in range(-(-own // page_size))])
    width = max(map(len, tables))
    pwidth = max(1, max(map(len, prefix_tables)))
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = PagedAttentionMetadata(
        q_starts=torch.tensor(starts, dtype=torch.int32), own_lens=torch.tensor(own_lens, dtype=torch.int32),
        own_pages=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_group=torch.tensor(groups, dtype=torch.int32),
        prefix_pages=torch.tensor([t + [0] * (pwidth - len(t)) for t in prefix_tables], dtype=torch.int32),
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32), page_size=page_size)
    shape = StepShape(tuple(q_lens), tuple(own_lens), tuple(prefix_lens[g] if g >= 0 else 0 for g in groups))
    q = torch.randn(starts[-1], num_kv_heads * ratio, head_dim)
    return q, k_cache, v_cache, meta, shape


@pytest.mark.parametrize("ratio", [1, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_sdpa_matches_reference(seed, ratio, head_dim):
    q, k_cache, v_cache, meta, shape = random_step(seed, ratio, head_dim)
    expected, _ = paged_attention_reference(q, k_cache, v_cache, meta, head_dim ** -0.5)
    out = paged_attention_sdpa(q, k_cache, v_cache, meta, head_dim ** -0.5, shape)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
