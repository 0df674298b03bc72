"""Shared-prefix `model.generate` vs plain SDPA `generate` on the GPU (foundation issue, item 7).

1. Logits check, bf16: the first generated step's logits of SharedPrefixCache generate and of plain SDPA
   generate (both bf16, Llama-3-8B shape, random weights) against SDPA in fp32 on the same weights, so the
   tolerance is stated against bf16's own error.
2. Timing on a W-8B-like batch (../shared/bench/workloads.md: 8 groups x 32 members, shared prefix 2048,
   distinct 64-192, 128 new tokens, eos ignored), plain generate and shared-prefix generate side by side in
   one process, batches of 64 (and all 256 rows at once for the shared-prefix path).

    python benchmarks/bench_generate.py --out results/  [--model llama3-8b|llama3.2-1b] [--groups 8 --members 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import batchllm_hf  # noqa: F401
from batchllm_hf import SharedPrefixCache
from batchllm_hf.cache import cache_argument_name

MODELS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=100000),  # CPU dry runs of this script
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def workload(groups: int, members: int, prefix_len: int, distinct: tuple[int, int], seed: int = 1):
    rng = random.Random(seed)
    rows = []
    for _ in range(groups):
        prefix = [rng.randrange(1000, 100000) for _ in range(prefix_len)]
        for _ in range(members):
            rows.append(prefix + [rng.randrange(1000, 100000) for _ in range(rng.randint(*distinct))])
    rng.shuffle(rows)
    return rows


def left_pad(rows, device):
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def timed(fn):
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def plain_generate(model, rows, batch_size, new_tokens):
    model.set_attn_implementation("sdpa")
    outs = []
    for i in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[i:i + batch_size], model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        outs += out[:, ids.shape[1]:].tolist()
    return outs


def shared_generate(model, rows, batch_size, new_tokens, **extra):
    model.set_attn_implementation("batchllm")
    outs, stats = [], []
    for i in range(0, len(rows), batch_size):
        ids, mask = left_pad(rows[i:i + batch_size], model.device)
        cache, inputs = SharedPrefixCache.from_inputs(model, ids, mask)
        out = model.generate(**inputs, **{cache_argument_name(model): cache}, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
        stats.append(cache.stats)
        if extra.get("return_dict_in_generate"):
            return out, cache.stats
        outs += out[:, inputs["input_ids"].shape[1]:].tolist()
    return outs, stats


def logits_check(model, rows):
    """First-step logits of shared-prefix (bf16) and SDPA (bf16) against SDPA in fp32 (the same weights)."""
    ids, mask = left_pad(rows, model.device)
    kwargs = dict(max_new_tokens=1, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    model.set_attn_implementation("sdpa")
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs).logits[0].float()
    out, _ = shared_generate(model, rows, len(rows), 1, output_logits=True, return_dict_in_generate=True)
    ours = out.logits[0].float()
    model.float()
    model.set_attn_implementation("sdpa")
    exact = model.generate(input_ids=ids, attention_mask=mask, **kwargs).logits[0].float()
    model.to(torch.bfloat16)
    result = {"rows": len(rows), "logit_abs_max_fp32": exact.abs().max().item()}
    for name, logits in (("shared_bf16", ours), ("sdpa_bf16", plain)):
        result[f"{name}_vs_fp32_max_abs"] = (logits - exact).abs().max().item()
        result[f"{name}_vs_fp32_mean_abs"] = (logits - exact).abs().mean().item()
        result[f"{name}_top1_agreement_with_fp32"] = (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()
    result["shared_vs_sdpa_bf16_max_abs"] = (ours - plain).abs().max().item()
    return result


def cuda_parity() -> dict:
    """fp32 on the GPU: SharedPrefixCache generate (Triton kernels) token-identical to plain SDPA generate, on
    the tests' tiny configs (the CPU suite checks the torch-reference path the same way)."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from hf_models import left_pad as pad_rows, model_pair, shared_prefix_prompts, tiny_config

    modes = {"greedy": dict(do_sample=False, max_new_tokens=12),
             "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2, max_new_tokens=8),
             "sampling": dict(do_sample=True, num_return_sequences=2, max_new_tokens=10)}
    results = {}
    for kind, kv, ratio, head_dim in [("llama", 2, 1, 64), ("qwen2", 2, 4, 128), ("mistral", 1, 7, 64),
                                      ("llama", 2, 4, 128)]:
        ours, plain = model_pair(tiny_config(kind, num_kv_heads=kv, ratio=ratio, head_dim=head_dim))
        ours, plain = ours.cuda(), plain.cuda()
        rows = shared_prefix_prompts(seed=ratio + head_dim, groups=((40, 5), (23, 3), (17, 1)), singles=2)
        ids, mask = pad_rows(rows)
        ids, mask = ids.cuda(), mask.cuda()
        for mode, kwargs in modes.items():
            cache, inputs = SharedPrefixCache.from_inputs(ours, ids, mask)
            torch.manual_seed(0)
            out = ours.generate(**inputs, **{cache_argument_name(ours): cache}, **kwargs)
            torch.manual_seed(0)
            ref = plain.generate(input_ids=ids, attention_mask=mask, **kwargs)
            results[f"{kind}-gqa{ratio}-d{head_dim}-{mode}"] = torch.equal(out[:, inputs["input_ids"].shape[1]:],
                                                                           ref[:, ids.shape[1]:])
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    config = LlamaConfig(**MODELS[args.model], rope_theta=500000.0, max_position_embeddings=32768,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="batchllm",
                                                 dtype=torch.bfloat16).eval()
    parity = cuda_parity() if DEVICE == "cuda" else {}
    print("fp32 parity on the GPU (Triton path):", json.dumps(parity), flush=True)
    results = {"fp32_parity_cuda": parity, "model": args.model, "torch": torch.__version__, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"}
    results["logits"] = logits_check(model, workload(2, 4, args.prefix, (64, 192), seed=2))
    print("logits:", json.dumps(results["logits"]), flush=True)

    rows = workload(args.groups, args.members, args.prefix, (64, 192))
    out_tokens = len(rows) * args.new_tokens
    shared_generate(model, rows[:8], 8, 4)  # warm-up both paths
    plain_generate(model, rows[:8], 8, 4)
    timings = {}
    seconds, plain_out = timed(lambda: plain_generate(model, rows, args.batch_size, args.new_tokens))
    timings[f"plain generate (sdpa, batch {args.batch_size})"] = seconds
    seconds, (ours_out, stats) = timed(lambda: shared_generate(model, rows, args.batch_size, args.new_tokens))
    timings[f"SharedPrefixCache generate (batch {args.batch_size})"] = seconds
    seconds, (ours_all, stats_all) = timed(lambda: shared_generate(model, rows, len(rows), args.new_tokens))
    timings[f"SharedPrefixCache generate (batch {len(rows)})"] = seconds
    agree = sum(a == b for a, b in zip(plain_out, ours_out)) / len(rows)
    results.update(
        requests=len(rows), new_tokens=args.new_tokens, timings=timings,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None,
        saving_batch=[s.saving for s in stats], saving_all=stats_all[0].saving,
        rows_token_identical_bf16=agree,
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
        json.dump(results, f, indent=2)
    base = timings[f"plain generate (sdpa, batch {args.batch_size})"]
    print(f"\n| {args.model}, {len(rows)} requests, {args.new_tokens} new tokens | seconds | out tok/s | speedup vs plain |")
    print("|---|---|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.2f} | {out_tokens / seconds:.0f} | {base / seconds:.2f}x |")
    print(f"prompt-token saving: per batch of {args.batch_size} {sum(results['saving_batch']) / len(stats):.1%}, "
          f"all at once {results['saving_all']:.1%}; rows token-identical to plain (bf16): {agree:.1%}")


if __name__ == "__main__":
    main()
