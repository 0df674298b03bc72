"""KV pool sizing (engine/kv_pool.py): the pool leaves room for a step's activations."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlavaConfig, Qwen2MoeConfig

from batchllm_hf.engine import Engine, EngineConfig
from batchllm_hf.engine import engine as engine_module
from batchllm_hf.engine.kv_pool import page_bytes, pool_pages, step_activation_bytes
from engine_helpers import tiny_model

GiB = 2 ** 30
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)


def shaped(config):
    # the config alone (no weights): pool sizing reads only the model's config
    return SimpleNamespace(config=config)


def test_step_activation_estimate():
    llama = shaped(LlamaConfig(**LLAMA3_8B))
    gib = step_activation_bytes(llama, 16384, torch.bfloat16) / GiB
    assert 2.0 < gib < 2.2  # six 4096-wide and three 14336-wide bf16 tensors per token
    # a model without logits_to_keep computes every token's logits: 16384 x 128256 in bf16 is 3.9 GiB more
    assert 3.8 < step_activation_bytes(llama, 16384, torch.bfloat16, all_logits=True) / GiB - gib < 4.0
    assert step_activation_bytes(llama, 16384, torch.float32) == 2 * step_activation_bytes(llama, 16384,
                                                                                           torch.bfloat16)
    # a composite (vision-language) config: its text model's sizes
    llava = shaped(LlavaConfig(text_config=LlamaConfig(**LLAMA3_8B).to_dict()))
    assert step_activation_bytes(llava, 16384, torch.bfloat16) == step_activation_bytes(llama, 16384, torch.bfloat16)
    # no intermediate_size (GPT-2's n_inner=None): four times the hidden size
    gpt2 = shaped(GPT2Config(n_embd=768))
    assert step_activation_bytes(gpt2, 100, torch.float32) == 100 * (6 * 768 + 3 * 4 * 768) * 4
    # a mixture of experts: the active experts' MLPs, not the (unused) dense intermediate_size
    moe = shaped(Qwen2MoeConfig(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                                num_experts_per_tok=4))
    assert step_activation_bytes(moe, 10, torch.bfloat16) == 10 * (6 * 2048 + 3 * 4 * 1408) * 2


def test_pool_sets_a_step_of_activations_aside(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GiB, 141 * GiB))
    model, cuda = shaped(LlamaConfig(**LLAMA3_8B)), torch.device("cuda")
    page = page_bytes(model, 64, torch.bfloat16)
    assert page == 2 * 32 * 64 * 8 * 128 * 2  # 8 MiB: K and V of 64 tokens in 32 layers
    full = pool_pages(model, 64, torch.bfloat16, cuda, 0.85)
    assert full == int(20 * GiB * 0.85) // page - 1
    for tokens in (4096, 16384):
        pages = pool_pages(model, 64, torch.bfloat16, cuda, 0.85, step_tokens=tokens)
        set_aside = (full - pages) * page / 0.85 / GiB
        assert abs(set_aside - step_activation_bytes(model, tokens, torch.bfloat16) / GiB) < 0.02
    assert pool_pages(model, 64, torch.bfloat16, torch.device("cpu"), 0.85, step_tokens=16384) == 4096
    # little memory left: at most half of it is set aside (a too-large step then fails as out of memory,
    # which BatchGenerator retries with half the budget), with a warning naming the setting
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GiB, 141 * GiB))
    with caplog.at_level("WARNING"):
        pages = pool_pages(model, 64, torch.bfloat16, cuda, 0.85, step_tokens=16384)
    assert pages == int(1.5 * GiB * 0.85) // page - 1 and "max_batch_tokens=16384" in caplog.text


@pytest.mark.parametrize("budget", [256, 16384])
def test_engine_passes_its_token_budget_to_pool_sizing(monkeypatch, budget):
    seen = []
    real = engine_module.pool_pages
    monkeypatch.setattr(engine_module, "pool_pages", lambda *a, **k: seen.append(k) or real(*a, **k))
    Engine(tiny_model("llama"), EngineConfig(max_batch_tokens=budget))._kv_cache()
    assert seen == [{"step_tokens": budget, "all_logits": False}]  # HF Llama takes logits_to_keep
