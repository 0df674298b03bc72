"""Sampling: stateless per-request randomness, GenerationConfig processors, num_return_sequences sharing."""

import math

import pytest
import torch
from transformers import GenerationConfig

from batchllm_hf.engine import Engine, EngineConfig
from batchllm_hf.engine.sampling import SamplingParams, filter_top_k_top_p, sample, uniform_noise
from engine_helpers import EOS, greedy, hf_generate, prompt_set, tiny_model


def sampling(max_new_tokens=8, **kwargs):
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, eos_token_id=EOS, pad_token_id=0,
                            **kwargs)


def test_noise_is_a_pure_function_of_seed_key_position():
    seeds, keys, pos = torch.tensor([1, 1, 2, 1]), torch.tensor([0, 0, 0, 1]), torch.tensor([5, 5, 5, 5])
    u = uniform_noise(seeds, keys, pos, 1000)
    assert torch.equal(u[0], u[1])
    assert not torch.equal(u[0], u[2]) and not torch.equal(u[0], u[3])
    assert torch.equal(uniform_noise(seeds[2:3], keys[2:3], pos[2:3], 1000)[0], u[2])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02


def test_gumbel_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    params = SamplingParams(do_sample=True)
    tokens = sample(logits, params, seeds=[3] * 4000, keys=[0] * 4000, positions=list(range(4000)),
                    num_generated=[0] * 4000, histories=None)
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_half_precision_logits_sample_as_their_fp32_widening():
    # the runner hands logits over in the model's dtype: greedy picks on them directly (ties included: bf16
    # logits of this spread tie often), penalties and sampling widen them first
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(1024, 300, generator=g) * 3).to(torch.bfloat16)
    logits[:, 7] = torch.cat([logits[:, :7], logits[:, 8:]], dim=1).max(dim=-1).values  # a tie in every row
    assert (logits == logits.max(dim=-1, keepdim=True).values).sum(dim=-1).min() >= 2
    rows = dict(seeds=list(range(1024)), keys=[0] * 1024, positions=[9] * 1024, num_generated=[0, 5] * 512)
    for params in (SamplingParams(), SamplingParams(eos_ids=frozenset({7}), min_new_tokens=3),
                   SamplingParams(do_sample=True, temperature=0.7, top_k=20),
                   SamplingParams(repetition_penalty=1.3)):
        histories = [[7, 8, i % 300] for i in range(1024)] if params.repetition_penalty != 1.0 else None
        half = sample(logits, params, histories=histories, **rows)
        assert half == sample(logits.float(), params, histories=histories, **rows)
    assert sample(logits, SamplingParams(), histories=None, **rows) == logits.float().argmax(dim=-1).tolist()
    # a penalty computed in bf16 would round 1.0 / 1.3 up to a tie with 0.7695 and pick token 0; fp32 picks 1
    one = dict(seeds=[0], keys=[0], positions=[0], num_generated=[0])
    tie = torch.tensor([[1.0, 0.76953125]], dtype=torch.bfloat16)
    assert sample(tie, SamplingParams(repetition_penalty=1.3), histories=[[0]], **one) == [1]
    # fp64 logits are rounded to fp32 as HF generate rounds them: the near-tie becomes a tie, first index wins
    near = torch.tensor([[1.0, 1.0 + 1e-12, 0.5]], dtype=torch.float64)
    assert sample(near, SamplingParams(), histories=None, **one) == [0]


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, None)[0, 2:]).all()
    kept = torch.isfinite(filter_top_k_top_p(logits, None, 0.7)[0])
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, None, 0.01)[0]).sum() == 1


def test_outputs_do_not_depend_on_batch_order_or_budget():
    model = tiny_model("llama", ratio=2)
    prompts = prompt_set(seed=4)
    gen = sampling(8, temperature=0.8, top_k=50, top_p=0.95)
    seeds = [100 + i for i in range(len(prompts))]
    base = Engine(model, EngineConfig(page_size=8, num_pages=128)).generate(prompts, gen, seeds=seeds)
    order = list(reversed(range(len(prompts))))
    other = Engine(model, EngineConfig(page_size=4, max_batch_tokens=5, num_pages=256, decode_first=False)).generate(
        [prompts[i] for i in order], gen, seeds=[seeds[i] for i in order])
    assert [other[order.index(i)] for i in range(len(prompts))] == base
    alone = Engine(model, EngineConfig(page_size=8, num_pages=128)).generate([prompts[3]], gen, seeds=[seeds[3]])
    assert alone[0] == base[3]
    reseeded = Engine(model, EngineConfig(page_size=8, num_pages=128)).generate(prompts, gen, seeds=[s + 1 for s in seeds])
    assert reseeded != base


def test_num_return_sequences_prefill_the_prompt_once():
    model = tiny_model("llama", ratio=2)
    prompts = [list(range(10, 50)), list(range(60, 73))]
    engine = Engine(model, EngineConfig(page_size=8, num_pages=128))
    outputs = engine.generate(prompts, sampling(6, num_return_sequences=4, temperature=1.5), seeds=[1, 2])
    assert len(outputs) == 8
    assert len({tuple(o.token_ids) for o in outputs[:4]}) > 1  # distinct samples of one prompt
    # each prompt's tokens but the last are computed once; the last token once per sample
    assert engine.stats.physical_prompt_tokens == (39 + 4) + (12 + 4)
    assert engine.stats.logical_prompt_tokens == 4 * (40 + 13)
    # top_k=1 samples are identical and equal plain greedy generate
    outputs = engine.generate(prompts, sampling(5, num_return_sequences=3, top_k=1))
    for i, prompt in enumerate(prompts):
        expected = hf_generate(model, prompt, greedy(5))
        assert [o.token_ids for o in outputs[3 * i:3 * i + 3]] == [expected] * 3


def test_sampling_with_top_k_1_is_greedy():
    model = tiny_model("qwen2", ratio=2)
    prompts = prompt_set(seed=6)
    sampled = Engine(model, EngineConfig(page_size=8, num_pages=128)).generate(prompts, sampling(6, top_k=1))
    expected = [hf_generate(model, p, greedy(6)) for p in prompts]
    assert [o.token_ids for o in sampled] == expected


def test_generation_config_checks():
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams.from_generation_config(GenerationConfig(repetition_penalty=0.0))
    params = SamplingParams.from_generation_config(GenerationConfig(eos_token_id=[2, 3], do_sample=True,
                                                                    temperature=0.5), stop_token_ids=[9])
    assert params.eos_ids == {2, 3} and params.stop_ids == {9} and math.isclose(params.temperature, 0.5)
