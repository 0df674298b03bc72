"""Dense-layout (HF cache) shared-prefix attention on the Triton kernel vs `shared_prefix_attention_reference`,
under TRITON_INTERPRET=1: left-padded prefixes and own KV, decode and multi-token queries, GQA 1/4/7."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from batchllm_hf.kernels.dense_ops import plan_dense_shared_prefix, shared_prefix_attention_dense
from batchllm_hf.kernels.reference import shared_prefix_attention_reference

pytest.importorskip("triton")
DEVICE = os.environ.get("BATCHLLM_TEST_DEVICE", "cpu")


def dense_inputs(batch, groups, ratio, num_kv_heads, prefix_len, own_len, q_len, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_q_heads = ratio * num_kv_heads

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)

    prefix_pad = torch.randint(0, prefix_len + 1, (groups,), generator=gen)
    prefix_pad[0] = 0  # one unpadded prefix
    prefix_mask = torch.arange(prefix_len)[None, :] >= prefix_pad[:, None]
    own_pad = torch.randint(0, own_len - q_len + 1, (batch,), generator=gen)
    cols, last = torch.arange(own_len), own_len - q_len + torch.arange(q_len)
    own_mask = (cols[None, None, :] >= own_pad[:, None, None]) & (cols[None, None, :] <= last[None, :, None])
    group_index = torch.randint(0, groups, (batch,), generator=gen)
    return dict(query=rand(batch, num_q_heads, q_len, head_dim), prefix_key=rand(groups, num_kv_heads, prefix_len,
                head_dim), prefix_value=rand(groups, num_kv_heads, prefix_len, head_dim),
                prefix_mask=prefix_mask.to(DEVICE), group_index=group_index.to(DEVICE),
                own_key=rand(batch, num_kv_heads, own_len, head_dim),
                own_value=rand(batch, num_kv_heads, own_len, head_dim), own_mask=own_mask[:, None].to(DEVICE))


@pytest.mark.parametrize("q_len,own_len", [(1, 13), (5, 40)])
@pytest.mark.parametrize("ratio,num_kv_heads,dtype", [(4, 2, torch.float32), (7, 1, torch.float16),
                                                      (1, 3, torch.bfloat16)])
def test_dense_matches_reference(q_len, own_len, ratio, num_kv_heads, dtype):
    inputs = dense_inputs(6, 3, ratio, num_kv_heads, 70, own_len, q_len, 64, dtype, seed=q_len + ratio)
    out, lse = shared_prefix_attention_dense(**inputs, scaling=0.125, force_triton=True)
    ref_out, ref_lse = shared_prefix_attention_reference(**inputs, scaling=0.125)
    tol = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_dense_without_own_mask_is_causal():
    inputs = dense_inputs(3, 2, 4, 1, 20, 9, 3, 64, torch.float32)
    inputs["own_mask"] = None
    out, lse = shared_prefix_attention_dense(**inputs, scaling=0.125, force_triton=True)
    ref_out, ref_lse = shared_prefix_attention_reference(**inputs, scaling=0.125)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


def test_other_masks_fall_back_to_reference():
    inputs = dense_inputs(3, 2, 4, 1, 20, 9, 1, 64, torch.float32)
    inputs["own_mask"] = inputs["own_mask"].clone()
    inputs["own_mask"][0, 0, 0, -1] = False  # a hole in the middle of a row: not left padding + causal
    assert plan_dense_shared_prefix(inputs["prefix_mask"], inputs["group_index"], inputs["own_mask"], 1, 9, 4, 1,
                                    64) is None
    out, lse = shared_prefix_attention_dense(**inputs, scaling=0.125, force_triton=True)
    ref_out, ref_lse = shared_prefix_attention_reference(**inputs, scaling=0.125)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
