"""Bad input gets a ValueError naming the cause, before any model work."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config, T5Config, T5ForConditionalGeneration

from batchllm_hf import SharedPrefixCache
from hf_models import left_pad, model_pair, shared_prefix_prompts, tiny_config


def forward_spy(*args, **kwargs):
    raise AssertionError("model work happened before validation")


def batchllm_model(config):
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="batchllm").eval()


def inputs():
    return left_pad(shared_prefix_prompts(seed=0))


def expect_error(model, ids, mask, match):
    model.forward = forward_spy
    with pytest.raises(ValueError, match=match):
        SharedPrefixCache.from_inputs(model, ids, mask)


def test_sliding_window_mistral_refused():
    config = tiny_config("mistral")
    config.sliding_window = 4096
    expect_error(batchllm_model(config), *inputs(), "sliding-window")


def test_mistral_default_config_has_sliding_window_and_is_refused():
    config = MistralConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2)
    expect_error(batchllm_model(config), *inputs(), "sliding")


def test_qwen2_use_sliding_window_refused():
    config = Qwen2Config(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         max_window_layers=1)
    expect_error(batchllm_model(config), *inputs(), "sliding")


def test_hybrid_layer_types_refused():
    model = batchllm_model(tiny_config("llama"))
    model.config.layer_types = ["full_attention", "linear_attention"]
    expect_error(model, *inputs(), "linear_attention")


def test_chunked_attention_refused():
    model = batchllm_model(tiny_config("llama"))
    model.config.attention_chunk_size = 16
    expect_error(model, *inputs(), "chunked")


def test_encoder_decoder_refused():
    config = T5Config(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model = T5ForConditionalGeneration(config)
    expect_error(model, *inputs(), "encoder-decoder")


def test_model_not_set_to_batchllm():
    _, plain = model_pair(tiny_config("llama"))
    expect_error(plain, *inputs(), "batchllm")


def test_right_padded_rows_refused():
    ids, mask = inputs()
    right_ids, right_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        right_ids[i, :n] = ids[i, mask[i].bool()]
        right_mask[i, :n] = 1
    expect_error(batchllm_model(tiny_config("llama")), right_ids, right_mask, "left-padded")


def test_shape_mismatch_refused():
    ids, mask = inputs()
    expect_error(batchllm_model(tiny_config("llama")), ids, mask[:, 1:], "same shape")


def test_one_dimensional_input_refused():
    ids, mask = inputs()
    expect_error(batchllm_model(tiny_config("llama")), ids[0], mask[0], "2-D")


def test_device_mismatch_refused():
    ids, mask = inputs()
    expect_error(batchllm_model(tiny_config("llama")), ids.to("meta"), mask.to("meta"), "meta")


def test_empty_row_refused():
    ids, mask = inputs()
    mask[2] = 0
    expect_error(batchllm_model(tiny_config("llama")), ids, mask, "Row 2")


def test_float_ids_refused():
    ids, mask = inputs()
    expect_error(batchllm_model(tiny_config("llama")), ids.float(), mask, "integer")
