"""Tiny random models, prompt sets and the plain-HF reference for the engine tests (CPU, fp32)."""

import random

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, MistralConfig, Qwen2Config

import batchllm_hf  # noqa: F401  (registers "batchllm")

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
VOCAB = 256
EOS = 2


def tiny_model(kind="llama", *, num_kv_heads=2, ratio=2, head_dim=64, layers=2, seed=0):
    extra = {"sliding_window": None} if kind == "mistral" else {}
    config = CONFIGS[kind](
        vocab_size=VOCAB, hidden_size=16 * num_kv_heads * ratio, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=num_kv_heads * ratio, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=1024, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=EOS,
        tie_word_embeddings=False, **extra,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def prompt_set(seed, *, groups=((40, 4), (21, 3), (9, 2)), singles=3, suffix=(1, 7)):
    """Shared-prefix groups (prefix length, members) + unrelated prompts, shuffled. Ids avoid 0..2."""
    rng = random.Random(seed)
    rows = []
    for prefix_len, members in groups:
        prefix = [rng.randrange(3, VOCAB) for _ in range(prefix_len)]
        rows += [prefix + [rng.randrange(3, VOCAB) for _ in range(rng.randint(*suffix))] for _ in range(members)]
    rows += [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))] for _ in range(singles)]
    rng.shuffle(rows)
    return rows


def greedy(max_new_tokens, **kwargs):
    kwargs.setdefault("eos_token_id", EOS)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)


def hf_generate(model, prompt, config):
    """Plain HF generate (sdpa) for one prompt, no padding: the generated token ids."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()
