"""The fused-kernel swap (engine/fused_model.py) on real HF model classes: same logits, everything put back,
unknown classes and non-inference tensors left to HF. Kernels under TRITON_INTERPRET=1 on CPU (forced)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by the kernels

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP, LlamaRMSNorm

from batchllm_hf.engine.fused_model import fused_ops

from hf_models import model_pair, tiny_config  # tests/ is on sys.path

pytest.importorskip("triton")
DEVICE = "cpu"


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


def test_fused_model_qwen3_norms_its_queries_and_keys_too():
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 160, (2, 7))
    with torch.inference_mode():
        expected = model(ids).logits
        with fused_ops(model, force=True) as swapped:
            assert swapped == 2 * 5 + 1 + 1  # per layer: 2 norms, q_norm, k_norm, MLP; final norm; rotary
            got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


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


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_engine_with_fused_kernels_matches_hf_generate(kind, monkeypatch):
    # The engine's own call pattern (packed (1, T) steps, arbitrary positions, decode and prefill chunks mixed)
    # with the fused kernels forced onto the CPU (interpreter): tokens equal plain HF generate's, and the
    # model is put back afterwards.
    import random

    from batchllm_hf.engine import Engine, EngineConfig
    from batchllm_hf.engine import fused_model
    import batchllm_hf.kernels.fused_ops as kernels

    from engine_helpers import greedy, hf_generate, prompt_set, tiny_model

    calls = {"rms_norm": 0, "rotary": 0, "silu_mul": 0}
    for name in calls:
        def counted(*args, _name=name, _original=getattr(kernels, name)):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(kernels, name, counted)
    monkeypatch.setattr(fused_model._Swap, "runs", lambda self, x: True)
    model = tiny_model(kind, num_kv_heads=2, ratio=2, head_dim=32)
    modeling = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    original_rotary = modeling.apply_rotary_pos_emb
    prompts = prompt_set(seed=5, groups=((24, 3), (9, 2)), singles=2)
    max_new = [random.Random(i).randint(1, 6) for i in range(len(prompts))]
    engine = Engine(model, EngineConfig(page_size=8, max_batch_tokens=24, num_pages=128))
    outputs = engine.generate(prompts, greedy(6), max_new_tokens_per_request=max_new)
    assert all(calls.values()), calls
    assert [o.token_ids for o in outputs] == [hf_generate(model, p, greedy(m)) for p, m in zip(prompts, max_new)]
    assert modeling.apply_rotary_pos_emb is original_rotary
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_fused_model_falls_back_for_shapes_the_kernels_do_not_take():
    # head_dim 48: half of it is not a power of two, so rotary takes HF's path; norms and MLPs stay fused.
    model, _ = model_pair(tiny_config("llama", num_kv_heads=2, ratio=2, head_dim=48))
    ids = torch.randint(3, 160, (1, 5))
    with torch.inference_mode():
        expected = model(ids).logits
        with fused_ops(model, force=True):
            got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_fused_model_keeps_what_others_install_inside_the_block():
    class LlamaRMSNorm(torch.nn.Module):  # a remote-code class with a known name but its own formula
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x

    model, _ = model_pair(tiny_config("llama"))
    model.extra = LlamaRMSNorm()
    layer_norm = model.model.layers[0].input_layernorm
    original_rotary = modeling_llama.apply_rotary_pos_emb
    try:
        with fused_ops(model, force=True):
            assert "forward" not in model.extra.__dict__  # not transformers' class: left alone
            layer_norm.forward = theirs = lambda x: x  # e.g. a hook installed while the engine runs
            modeling_llama.apply_rotary_pos_emb = their_rotary = lambda *a, **k: None
        assert layer_norm.__dict__["forward"] is theirs
        assert modeling_llama.apply_rotary_pos_emb is their_rotary
    finally:
        modeling_llama.apply_rotary_pos_emb = original_rotary


def test_a_failing_kernel_turns_the_swap_off_with_a_warning(monkeypatch):
    import batchllm_hf.kernels.fused_ops as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no such GPU instruction")

    monkeypatch.setattr(kernels, "rms_norm", broken)
    model, _ = model_pair(tiny_config("llama"))
    ids = torch.randint(3, 160, (1, 6))
    with torch.inference_mode():
        expected = model(ids).logits
        with pytest.warns(UserWarning, match="fused kernels turned off"):
            with fused_ops(model, force=True):
                first = model(ids).logits
                second = model(ids).logits  # no second warning: the swap stays off
    torch.testing.assert_close(first, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(second, expected, atol=0, rtol=0)
