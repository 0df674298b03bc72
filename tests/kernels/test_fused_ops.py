"""Fused RMSNorm / rotary / SiLU-mul kernels against HF's own modules and functions, under TRITON_INTERPRET=1
on CPU (BATCHLLM_TEST_DEVICE=cuda runs them on a GPU). The swap into a model: tests/engine/test_fused_model.py."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by the kernels

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRMSNorm, LlamaRotaryEmbedding

from batchllm_hf.kernels.fused_ops import rms_norm, rotary, silu_mul

pytest.importorskip("triton")
DEVICE = os.environ.get("BATCHLLM_TEST_DEVICE", "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def one_ulp(dtype):
    return {torch.float32: 2e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 7, 96), (3, 200)])
def test_rms_norm_matches_hf_module(dtype, shape):
    torch.manual_seed(len(shape) + shape[-1])
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).to(DEVICE, dtype)
    norm.weight.data = torch.randn(shape[-1], device=DEVICE).to(dtype)
    x = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    expected = norm(x)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # Only the fp32 mean differs (summation order): at most one ulp of the output dtype.
    torch.testing.assert_close(got, expected, atol=0, rtol=one_ulp(dtype))


def test_rms_norm_fp32_weight_promotes_like_hf():
    norm = LlamaRMSNorm(32).to(DEVICE)
    norm.weight.data = torch.rand(32, device=DEVICE) + 0.5
    x = torch.randn(5, 32, device=DEVICE).to(torch.bfloat16)
    expected = norm(x)
    got = rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 2, 64), (7, 1, 32), (3, 3, 128)])
def test_rotary_is_bit_identical_to_hf(dtype, num_q_heads, num_kv_heads, head_dim):
    torch.manual_seed(num_q_heads * head_dim)
    batch, seq = 2, 5
    config = LlamaConfig(hidden_size=num_q_heads * head_dim, num_attention_heads=num_q_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim, rope_theta=10000.0)
    rope = LlamaRotaryEmbedding(config).to(DEVICE)
    # q / k as the attention layer makes them: transposed views of the projections' (B, T, H*D) outputs.
    q = torch.randn(batch, seq, num_q_heads * head_dim, device=DEVICE).to(dtype).view(batch, seq, -1, head_dim)
    k = torch.randn(batch, seq, num_kv_heads * head_dim, device=DEVICE).to(dtype).view(batch, seq, -1, head_dim)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    positions = torch.randint(0, 400, (batch, seq), device=DEVICE)
    cos, sin = rope(q, positions)
    expected_q, expected_k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = rotary(q, k, cos, sin)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    # The output keeps the projections' (B, T, H, D) memory, so the attention's transposes need no copy.
    assert got_q.transpose(1, 2).is_contiguous() and got_k.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_hf_mlp_activation(dtype):
    torch.manual_seed(3)
    gate = (4 * torch.randn(3, 4099, device=DEVICE)).to(dtype)  # not a multiple of the block
    up = torch.randn(3, 4099, device=DEVICE).to(dtype)
    expected = torch.nn.functional.silu(gate) * up
    # silu's exponential differs from torch's by fp32 ulps; rounded twice (silu, product): two ulps at most.
    torch.testing.assert_close(silu_mul(gate, up), expected, atol=1e-6, rtol=2 * one_ulp(dtype))
