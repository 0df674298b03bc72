"""Tiny random HF models and shared-prefix prompt sets for the tests (no hub access anywhere)."""

import copy
import random

import torch

import batchllm_hf  # noqa: F401  (registers "batchllm")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def tiny_config(kind: str = "llama", *, num_kv_heads: int = 2, ratio: int = 2, head_dim: int = 64, layers: int = 2,
                vocab: int = 160):
    extra = {"sliding_window": None} if kind == "mistral" else {}
    return CONFIG_CLASSES[kind](
        vocab_size=vocab, hidden_size=16 * num_kv_heads * ratio, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=num_kv_heads * ratio, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        max_position_embeddings=512, initializer_range=0.3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, **extra,
    )


def model_pair(config, seed: int = 0):
    """The same random weights loaded as a "batchllm" model and as a plain SDPA model (fp32, eval)."""
    torch.manual_seed(seed)
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="batchllm").eval()
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def shared_prefix_prompts(seed: int, *, groups=((12, 3), (7, 4)), singles: int = 2, vocab: int = 160,
                          suffix_range=(1, 6)):
    """Random prompts: for each (prefix_len, members) a shared prefix + distinct suffixes; plus unrelated
    single prompts; shuffled (not sorted by group). Token ids avoid pad/bos/eos (0..2)."""
    rng = random.Random(seed)
    rows = []
    for prefix_len, members in groups:
        prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
        for _ in range(members):
            rows.append(prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(*suffix_range))])
    for _ in range(singles):
        rows.append([rng.randrange(3, vocab) for _ in range(rng.randint(2, 9))])
    rng.shuffle(rows)
    return rows


def left_pad(rows, pad_id: int = 0):
    length = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (length - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def tiny_tokenizer(vocab: int = 160, *, pad: bool = True):
    """A real PreTrainedTokenizerFast over words "w6".."w{vocab-1}" plus chat roles, with a chat template."""
    from batchllm_hf.demo import demo_tokenizer

    return demo_tokenizer(vocab, pad=pad)


def text_prompts(seed: int, **kwargs):
    """shared_prefix_prompts as whitespace-separated words of tiny_tokenizer (ids >= 6)."""
    rows = shared_prefix_prompts(seed, **kwargs)
    return [" ".join(f"w{max(6, t)}" for t in row) for row in rows]
