"""KV pool sizing (engine/kv_pool.py): the pool leaves room for a step's activations."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from batchllm_hf.engine import Engine, EngineConfig
from batchllm_hf.engine import engine as engine_module
from batchllm_hf.engine.kv_pool import page_bytes, pool_pages, step_activation_bytes

from engine_helpers import tiny_model

GiB = 2 ** 30


def llama3_8b_shape():
    # the config alone (no weights): pool sizing reads only the model's config
    return SimpleNamespace(config=LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=8))


def test_pool_sets_a_step_of_activations_aside(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * GiB, 141 * GiB))
    model, cuda = llama3_8b_shape(), torch.device("cuda")
    page = page_bytes(model, 64, torch.bfloat16)
    assert page == 2 * 32 * 64 * 8 * 128 * 2  # 8 MiB: K and V of 64 tokens in 32 layers
    activations = step_activation_bytes(model, 16384, torch.bfloat16)
    assert activations == 16384 * (6 * 4096 + 3 * 14336) * 2  # about 2.1 GiB
    assert pool_pages(model, 64, torch.bfloat16, cuda, 0.85) == int(20 * GiB * 0.85) // page - 1
    assert pool_pages(model, 64, torch.bfloat16, cuda, 0.85, step_tokens=16384) == \
        int((20 * GiB - activations) * 0.85) // page - 1
    # less free memory than a step needs: one page (the engine then admits what fits, one request at a time)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GiB, 141 * GiB))
    assert pool_pages(model, 64, torch.bfloat16, cuda, 0.85, step_tokens=16384) == 1
    assert pool_pages(model, 64, torch.bfloat16, torch.device("cpu"), 0.85, step_tokens=16384) == 4096


@pytest.mark.parametrize("budget", [256, 16384])
def test_engine_sizes_its_pool_for_its_token_budget(monkeypatch, budget):
    seen = []
    real = engine_module.pool_pages
    monkeypatch.setattr(engine_module, "pool_pages", lambda *a, **k: seen.append(k) or real(*a, **k))
    Engine(tiny_model("llama"), EngineConfig(max_batch_tokens=budget))._kv_cache()
    assert seen == [{"step_tokens": budget}]
