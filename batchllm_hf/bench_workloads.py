"""The benchmark workloads of shared/bench/workloads.md: model shapes, prompt sets, hardware ceilings and
the roofline lower bound. Random weights, synthetic token ids: no hub access."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

MODELS = {
    "llama3.2-1b": (LlamaConfig, dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                      tie_word_embeddings=True)),
    "llama3-8b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                    tie_word_embeddings=False)),
    "qwen2.5-7b": (Qwen2Config, dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                                     tie_word_embeddings=False, sliding_window=None, use_sliding_window=False)),
    # CPU dry runs of the bench (`--tiny`)
    "tiny": (LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, vocab_size=100000, tie_word_embeddings=True)),
}


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    groups: int
    members: int
    prefix: int | tuple[int, int]  # shared tokens; (system, few-shot) for the two-level W-tree
    distinct: tuple[int, int]
    output: int
    subgroups: int = 1  # W-tree: few-shot blocks per system prompt


WORKLOADS = {w.name: w for w in [
    Workload("W-1B", "llama3.2-1b", 8, 16, 1024, (64, 128), 64),
    Workload("W-8B", "llama3-8b", 8, 32, 2048, (64, 192), 128),
    Workload("W-paper", "qwen2.5-7b", 50, 16, 2000, (200, 200), 100),
    Workload("W-noshare", "llama3.2-1b", 256, 1, 0, (512, 1024), 128),
    Workload("W-tree", "llama3.2-1b", 4, 16, (512, 1024), (32, 96), 32, subgroups=8),
    Workload("W-large", "llama3-8b", 64, 64, 1024, (32, 128), 64),
]}


def tiny_version(w: Workload) -> Workload:
    prefix = (32, 48) if isinstance(w.prefix, tuple) else min(w.prefix, 64)
    return Workload(w.name, "tiny", min(w.groups, 3), min(w.members, 4), prefix, (8, 16), 4, min(w.subgroups, 2))


def make_prompts(w: Workload, seed: int = 1) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Shuffled prompts, and the shared structure as (shared tokens, members) per sharing unit for the roofline."""
    rng = random.Random(seed)

    def draw(n):
        return [rng.randrange(1000, 100000) for _ in range(n)]

    rows, shared = [], []
    for _ in range(w.groups):
        if isinstance(w.prefix, tuple):  # system prompt, then few-shot blocks, then questions
            system = draw(w.prefix[0])
            shared.append((w.prefix[0], w.subgroups * w.members))
            for _ in range(w.subgroups):
                block = system + draw(w.prefix[1])
                shared.append((w.prefix[1], w.members))
                rows += [block + draw(rng.randint(*w.distinct)) for _ in range(w.members)]
        else:
            prefix = draw(w.prefix)
            shared.append((w.prefix, w.members))
            rows += [prefix + draw(rng.randint(*w.distinct)) for _ in range(w.members)]
    rng.shuffle(rows)
    return rows, shared


def build_model(name: str, device: str):
    config_class, shape = MODELS[name]
    config = config_class(rope_theta=500000.0, max_position_embeddings=32768, **shape)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def measure_ceilings(device: str) -> dict:
    """bf16 matmul FLOP/s and copy bandwidth (bytes read + written per second), measured now."""
    if device != "cuda":
        return {"matmul_flops": 1e12, "copy_bytes_per_s": 1e11}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def best(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / reps)
        return min(times)

    flops = 2 * 8192 ** 3 / best(lambda: a @ b)
    bandwidth = 2 * src.numel() / best(lambda: dst.copy_(src))
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_flops": flops, "copy_bytes_per_s": bandwidth}


def roofline(w: Workload, prompts: list[list[int]], shared: list[tuple[int, int]], model, ceilings: dict) -> dict:
    """workloads.md's lower bound: max(compute time, decode memory time), all requests in one batch."""
    config = model.config
    embed = config.vocab_size * config.hidden_size
    total = sum(p.numel() for p in model.parameters())
    lm_head = 0 if config.tie_word_embeddings else embed
    non_embedding = total - embed - lm_head
    requests, decode_tokens = len(prompts), len(prompts) * w.output
    shared_tokens = sum(n * (m - 1) for n, m in shared)  # tokens a request does not compute on its own
    unique_prefill = sum(map(len, prompts)) - shared_tokens
    flops = 2 * non_embedding * (unique_prefill + decode_tokens) + 2 * config.hidden_size * config.vocab_size * (
        requests + decode_tokens)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kappa = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    weight_bytes = (non_embedding + embed) * 2  # the lm head (or tied embedding) is read each step
    prefix_tokens = sum(n for n, _ in shared)
    own_tokens = sum(map(len, prompts)) - sum(n * m for n, m in shared)
    decode_bytes = sum(weight_bytes + kappa * (prefix_tokens + own_tokens + requests * t) for t in range(w.output))
    compute_s = flops / ceilings["matmul_flops"]
    memory_s = decode_bytes / ceilings["copy_bytes_per_s"]
    return {"compute_s": compute_s, "memory_s": memory_s, "lower_bound_s": max(compute_s, memory_s),
            "unique_prefill_tokens": unique_prefill, "decode_tokens": decode_tokens}
