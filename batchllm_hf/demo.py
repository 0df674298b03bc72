"""`batchllm-hf demo`: the main job on an embedded default, with no downloads.

A small random-weight Llama built from a config and a synthetic shared-prefix prompt set (a few long
instructions, each followed by many short questions, shuffled). Runs `model.generate` once with a
SharedPrefixCache and once plainly, prints what was shared and whether the outputs are identical.
"""

from __future__ import annotations

import random
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from .cache import SharedPrefixCache, cache_argument_name

DEMO_CONFIG = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                   initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def demo_tokenizer(vocab: int = 1024, *, pad: bool = True):
    """A real PreTrainedTokenizerFast with no download: words "<pad> <s> </s> user assistant system" then
    "w6".."w{vocab-1}" (whitespace-split word level), and a simple chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "user", "assistant", "system"] + [f"w{i}" for i in range(6, vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>" if pad else None)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant{% endif %}")
    return tokenizer


def demo_model(attn_implementation: str = "batchllm", seed: int = 0, **overrides):
    """The demo's random-weight Llama (fp32, eval mode), built from DEMO_CONFIG."""
    import batchllm_hf  # noqa: F401  (registers "batchllm")

    torch.manual_seed(seed)
    config = LlamaConfig(**{**DEMO_CONFIG, **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


def demo_prompts(seed: int = 0, groups: int = 4, members: int = 8, prefix_len: int = 128,
                 vocab: int = 1024) -> list[list[int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(groups):
        prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
        rows += [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(4, 16))] for _ in range(members)]
    rng.shuffle(rows)
    return rows


def run_demo(max_new_tokens: int = 16, seed: int = 0) -> bool:
    model = demo_model(seed=seed)
    rows = demo_prompts(seed)
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])

    start = time.perf_counter()
    cache, inputs = SharedPrefixCache.from_inputs(model, input_ids, attention_mask)
    out = model.generate(**inputs, **{cache_argument_name(model): cache}, max_new_tokens=max_new_tokens,
                         do_sample=False)
    shared_seconds = time.perf_counter() - start
    ours = out[:, inputs["input_ids"].shape[1]:]

    model.set_attn_implementation("sdpa")
    start = time.perf_counter()
    plain = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                           do_sample=False)[:, length:]
    plain_seconds = time.perf_counter() - start

    stats = cache.stats
    same = torch.equal(ours, plain)
    print(f"requests {stats.requests}, groups {stats.groups}, prompt tokens logical {stats.logical_prompt_tokens} "
          f"-> physical {stats.physical_prompt_tokens} (saving {stats.saving:.1%})")
    print(f"shared-prefix generate {shared_seconds:.2f} s, plain generate {plain_seconds:.2f} s (CPU, fp32)")
    print(f"outputs identical to plain generate: {same}")
    return same
