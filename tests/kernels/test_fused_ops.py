"""Fused RMSNorm / rotary / SiLU-mul kernels against HF's own modules and functions, under TRITON_INTERPRET=1
on CPU (BATCHLLM_TEST_DEVICE=cuda runs them on a GPU), and the swap that puts them into a model."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by the kernels

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from batchllm_hf.engine.fused_model import fused_ops
from batchllm_hf.kernels.fused_ops import rms_norm, rotary, silu_mul

from hf_models import model_pair, tiny_config  # tests/ is on sys.path

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
    torch.testing.assert_close(silu_mul(gate, up), expected, atol=1e-6, rtol=one_ulp(dtype))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_fused_model_matches_hf_and_restores(kind):
    model, _ = model_pair(tiny_config(kind, num_kv_heads=2, ratio=2, head_dim=32))
    model = model.to(DEVICE)
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    original_rotary = modeling.apply_rotary_pos_emb
    ids = torch.randint(3, 160, (2, 9), device=DEVICE)
    with torch.inference_mode():
        expected = model(ids).logits
        with fused_ops(model, force=True) as swapped:
            # 2 layers x (2 norms + MLP) + the final norm, and the rotary function.
            assert swapped == 2 * 3 + 1 + 1
            assert modeling.apply_rotary_pos_emb is not original_rotary
            got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    assert modeling.apply_rotary_pos_emb is original_rotary
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fused_model_restores_after_error_and_leaves_replaced_forwards():
    model, _ = model_pair(tiny_config("llama"))
    hooked = model.model.norm
    hooked.forward = hooked_forward = lambda x: x  # e.g. an accelerate hook's forward
    with pytest.raises(RuntimeError, match="boom"):
        with fused_ops(model, force=True) as swapped:
            assert swapped == 2 * 3 + 1  # every norm and MLP but the hooked one, plus rotary
            raise RuntimeError("boom")
    assert hooked.__dict__["forward"] is hooked_forward
    assert not any("forward" in m.__dict__ for m in model.modules() if m is not hooked)
    assert not hasattr(modeling_llama.apply_rotary_pos_emb, "batchllm_original")


def test_fused_model_leaves_cpu_and_grad_tensors_to_hf(monkeypatch):
    import batchllm_hf.kernels.fused_ops as kernels

    def fail(*args, **kwargs):
        raise AssertionError("a fused kernel ran")

    for name in ("rms_norm", "rotary", "silu_mul"):
        monkeypatch.setattr(kernels, name, fail)
    model, _ = model_pair(tiny_config("llama"))
    ids = torch.randint(3, 160, (1, 6))
    with fused_ops(model):  # not forced: CPU tensors take HF's path
        model(ids)
    with fused_ops(model, force=True):  # forced, but tensors that need gradients take HF's path too
        model(ids).logits.sum().backward()


def test_fused_model_skips_unknown_classes():
    class Norm(LlamaRMSNorm):  # a subclass may change the formula: not in the known set
        pass

    model, _ = model_pair(tiny_config("llama"))
    model.model.norm = Norm(model.config.hidden_size)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, LlamaMLP)
    mlp.config = LlamaConfig(hidden_act="gelu")  # not SwiGLU: left alone
    with fused_ops(model, force=True) as swapped:
        assert "forward" not in model.model.norm.__dict__ and "forward" not in mlp.__dict__
        assert swapped == 2 * 2 + 1 + 1
