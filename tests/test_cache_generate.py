"""SharedPrefixCache + model.generate against plain SDPA generate, token for token (CPU, fp32)."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchllm_hf import SharedPrefixCache
from batchllm_hf.cache import cache_argument_name
from hf_models import left_pad, model_pair, shared_prefix_prompts, tiny_config


def generate_both(ours, plain, rows, seed=0, **gen_kwargs):
    ids, mask = left_pad(rows)
    cache, inputs = SharedPrefixCache.from_inputs(ours, ids, mask)
    torch.manual_seed(seed)
    out = ours.generate(**inputs, **{cache_argument_name(ours): cache}, **gen_kwargs)
    torch.manual_seed(seed)
    ref = plain.generate(input_ids=ids, attention_mask=mask, **gen_kwargs)
    return out[:, inputs["input_ids"].shape[1]:], ref[:, ids.shape[1]:], cache


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("ratio", [1, 2, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_greedy_matches_plain_generate(kind, ratio, head_dim):
    ours, plain = model_pair(tiny_config(kind, num_kv_heads=2 if ratio < 7 else 1, ratio=ratio, head_dim=head_dim))
    rows = shared_prefix_prompts(seed=ratio * 1000 + head_dim)
    new, ref, cache = generate_both(ours, plain, rows, max_new_tokens=12, do_sample=False)
    assert cache.stats.groups < len(rows)  # something was actually shared
    assert torch.equal(new, ref)


GENERATION_MODES = {
    "sampling": dict(do_sample=True, temperature=1.3, top_k=40, max_new_tokens=10),
    "beam_search": dict(do_sample=False, num_beams=3, max_new_tokens=8),
    "beams_return_2": dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=8),
    "sampling_return_3": dict(do_sample=True, num_return_sequences=3, max_new_tokens=8),
    "repetition_penalty": dict(do_sample=False, repetition_penalty=1.8, max_new_tokens=12),
}


@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generation_modes_match_plain_generate(mode, kind):
    ours, plain = model_pair(tiny_config(kind, num_kv_heads=2, ratio=4, head_dim=64), seed=3)
    rows = shared_prefix_prompts(seed=7)
    new, ref, _ = generate_both(ours, plain, rows, seed=11, **GENERATION_MODES[mode])
    assert new.shape == ref.shape
    assert torch.equal(new, ref)


def test_edge_groupings():
    """Groups of one, identical prompts, a prefix that is the whole prompt but its last token, unsorted rows."""
    rng = random.Random(5)
    shared = [rng.randrange(3, 160) for _ in range(10)]
    rows = [
        shared + [rng.randrange(3, 160)],  # prefix = whole prompt but its last token
        shared + [rng.randrange(3, 160)],
        [rng.randrange(3, 160) for _ in range(6)],  # group of one
        shared + [7, 8, 9],
        [rng.randrange(3, 160)],  # one-token prompt
        shared + [7, 8, 9],  # identical to row 3
    ]
    ours, plain = model_pair(tiny_config("llama", num_kv_heads=2, ratio=2))
    new, ref, cache = generate_both(ours, plain, rows, max_new_tokens=10, do_sample=False)
    assert torch.equal(new, ref)
    assert torch.equal(new[3], new[5])
    assert cache.stats.groups == 3
    assert cache.stats.physical_prompt_tokens < cache.stats.logical_prompt_tokens


def test_no_sharing_at_all_still_matches():
    rows = [[rng_tok for rng_tok in range(3 + i, 9 + 2 * i)] for i in range(4)]
    ours, plain = model_pair(tiny_config("llama"))
    new, ref, cache = generate_both(ours, plain, rows, max_new_tokens=6, do_sample=False)
    assert cache.stats.groups == len(rows)
    assert torch.equal(new, ref)


def test_prefix_kv_is_stored_once_per_group():
    ours, _ = model_pair(tiny_config("llama"))
    rows = shared_prefix_prompts(seed=1, groups=((16, 5),), singles=0)
    ids, mask = left_pad(rows)
    cache, inputs = SharedPrefixCache.from_inputs(ours, ids, mask)
    layer = cache.layers[0]
    prefix_keys = layer.dense_views(0)[0]
    assert prefix_keys.shape[0] == 1 and prefix_keys.shape[2] == 16  # one group, one copy, one page
    assert layer.layout.prefix_lens.tolist() == [16]
    assert layer.keys.shape[0] == 1  # before generation the pool holds just the prefix page
    assert cache.get_seq_length() == 16
    assert inputs["input_ids"].shape[0] == len(rows)


def test_user_contract_from_pretrained(tmp_path):
    """The README contract verbatim: from_pretrained(path, attn_implementation="batchllm")."""
    import batchllm_hf  # noqa: F401

    ours, plain = model_pair(tiny_config("llama"))
    ours.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="batchllm").eval()
    rows = shared_prefix_prompts(seed=2)
    input_ids, attention_mask = left_pad(rows)
    cache, inputs = SharedPrefixCache.from_inputs(model, input_ids, attention_mask)
    out = model.generate(**inputs, **{cache_argument_name(model): cache}, max_new_tokens=8, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    ref = plain.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(new_tokens, ref[:, input_ids.shape[1]:])


def test_past_key_values_name_works_on_every_version():
    ours, plain = model_pair(tiny_config("llama"))
    rows = shared_prefix_prompts(seed=4)
    ids, mask = left_pad(rows)
    cache, inputs = SharedPrefixCache.from_inputs(ours, ids, mask)
    out = ours.generate(**inputs, past_key_values=cache, max_new_tokens=5, do_sample=False)
    ref = plain.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, inputs["input_ids"].shape[1]:], ref[:, ids.shape[1]:])


@pytest.mark.parametrize("mode", ["greedy", "beams_return_2", "sampling_return_3"])
def test_paged_kernel_path_matches_plain_generate(monkeypatch, mode):
    """The path CUDA takes (rows ordered by group, packed tokens, paged metadata and plan), here with the
    kernels' own CPU fallback, the paged torch reference."""
    import batchllm_hf.cache

    monkeypatch.setattr(batchllm_hf.cache, "use_triton", lambda query: True)
    kwargs = {"greedy": dict(do_sample=False, max_new_tokens=10), **GENERATION_MODES}[mode]
    ours, plain = model_pair(tiny_config("qwen2", num_kv_heads=2, ratio=4, head_dim=64), seed=5)
    rows = shared_prefix_prompts(seed=9, groups=((20, 3), (18, 2)), singles=1)
    new, ref, _ = generate_both(ours, plain, rows, seed=3, **kwargs)
    assert torch.equal(new, ref)
