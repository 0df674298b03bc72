"""Probe (not a test): what decode-first admission is worth on a workload built for it, predicted by a cost
model of the scheduler's steps and measured on the GPU, side by side.

    python benchmarks/decode_first_probe.py [--out DIR] [--model-only] [--tiny]

Every workload of shared/bench/workloads.md gives all requests one output length, so decode-first has
nothing to reorder there (session 11's ablations: 1.00x). W-mixed gives it something: Llama-3-8B shapes
(random weights, synthetic ids as workloads.md), 24 groups of 16 "document questions" (prefix 4096, own
64-128 tokens, 16 new tokens) and 8 groups of 16 "long answers" (prefix 256, own 64-128, 512 new tokens),
groups shuffled. Decode-first admits and prefills the long-answer groups first, so their 512 decode steps
run beside the document groups' prefill; without it the groups go in the clustering's order.

Rows: decode-first on / off, at the engine's token budget (16384) and at 2048 (more, smaller prefill steps,
as in vLLM-style engines), each with every request admitted at once and with a KV pool of 1024 pages of 64
(about a quarter of the 3,713 the whole job needs).
  model    : the scheduler itself (pure Python) on the groups the engine forms, stepped with a roofline cost
             per step: max(matmul FLOPs / (peak x 0.88), (weights + the KV pages allocated) / copy bandwidth)
             + 0.4 ms. Simplified: no step overlap (update() per step), attention FLOPs left out, prefix pages
             counted as read from admission on.
  measured : `Engine.generate` (session 12: one H200, two runs per row), each row after a full untimed run
             (Triton compiles; each run builds its own Engine, KV pool and graphs, as `batchllm-hf bench`
             does), timed three times; the median. Both off / on ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from batchllm_hf.engine import EngineConfig
from batchllm_hf.engine.grouping import build_groups
from batchllm_hf.engine.scheduler import Scheduler, Sequence

# (groups, members, prefix, own tokens range, new tokens)
W_MIXED = [(24, 16, 4096, (64, 128), 16), (8, 16, 256, (64, 128), 512)]
W_MIXED_TINY = [(3, 4, 64, (8, 16), 2), (1, 4, 16, (8, 16), 12)]  # 45 pages of 16
ROWS = [(16384, None), (16384, 1024), (2048, None), (2048, 1024)]  # (token budget, KV pages or None: all)
# Llama-3-8B: non-embedding and LM-head parameters, K+V bytes per token over all layers (bf16)
PARAMS, HEAD_PARAMS, KV_BYTES_PER_TOKEN = 6.98e9, 0.525e9, 131072
PEAK_FLOPS, COPY_BYTES_PER_S, STEP_OVERHEAD_S = 794e12 * 0.88, 4.26e12, 0.4e-3


def make_requests(parts, seed: int = 1) -> tuple[list[list[int]], list[int]]:
    """Shuffled prompts (each group's prefix + its own tokens) and each one's new-token count."""
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(1000, 100000) for _ in range(n)]  # noqa: E731
    rows = []
    for groups, members, prefix, own, new_tokens in parts:
        for _ in range(groups):
            shared = draw(prefix)
            rows += [(shared + draw(rng.randint(*own)), new_tokens) for _ in range(members)]
    rng.shuffle(rows)
    return [p for p, _ in rows], [n for _, n in rows]


def model_seconds(prompts, outputs, budget: int, pages: int | None, decode_first: bool, page_size: int):
    """(predicted seconds, steps): the scheduler stepped on the groups the engine forms (its clustering),
    each step costed by the roofline above."""
    sequences = [Sequence(i, p, n, n) for i, (p, n) in enumerate(zip(prompts, outputs))]
    groups = build_groups(sequences, 1, EngineConfig(page_size=page_size))
    total_pages = sum(-(-len(g.prefix) // page_size) + sum(-(-(len(s.prompt) - len(g.prefix) + s.max_new_tokens)
                                                          // page_size) for s in g.members) for g in groups)
    scheduler = Scheduler(pages or total_pages, page_size, budget, decode_first=decode_first)
    for g in groups:
        scheduler.add_group(g)
    seconds, steps = 0.0, 0
    while not scheduler.done:
        chunks = scheduler.schedule()
        tokens = sum(c.length for c in chunks)
        sampled = sum(c.sample for c in chunks)
        kv_tokens = sum(scheduler.pages_in_use()) * page_size
        flops = 2 * PARAMS * tokens + 2 * HEAD_PARAMS * sampled
        read = 2 * (PARAMS + HEAD_PARAMS) + KV_BYTES_PER_TOKEN * kv_tokens
        seconds += max(flops / PEAK_FLOPS, read / COPY_BYTES_PER_S) + STEP_OVERHEAD_S
        steps += 1
        scheduler.update(chunks, [5] * sampled)
    return seconds, steps


def measured_seconds(model, prompts, outputs, budget: int, pages: int | None, decode_first: bool, page_size: int,
                     runs: int = 3):
    import torch
    from transformers import GenerationConfig

    from batchllm_hf.engine import Engine

    config = EngineConfig(page_size=page_size, max_batch_tokens=budget, num_pages=pages, decode_first=decode_first)
    # eos masked for every request's whole length (min_new_tokens), as the bench does: the model's default eos
    # (Llama's 2) would otherwise end random-weight outputs early
    gen = GenerationConfig(max_new_tokens=max(outputs), min_new_tokens=max(outputs), do_sample=False,
                           eos_token_id=None, pad_token_id=0)

    def once():
        engine = Engine(model, config)
        start = time.perf_counter()
        out = engine.generate(prompts, gen, max_new_tokens_per_request=outputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert [len(o.token_ids) for o in out] == outputs
        return seconds, engine.stats.steps, engine.stats.preemptions

    once()  # warm-up: compiles this configuration's Triton kernels
    results = [once() for _ in range(runs)]
    return statistics.median(r[0] for r in results), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="decode_first_out")
    parser.add_argument("--model-only", action="store_true", help="the cost model only (no model, no GPU)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model and workload")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    parts = W_MIXED_TINY if args.tiny else W_MIXED
    rows = [(64, None), (64, 12)] if args.tiny else ROWS
    prompts, outputs = make_requests(parts)
    model = None
    page_size = 64  # the engine's on a GPU
    if not args.model_only:
        from batchllm_hf.bench_workloads import build_model
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = build_model("tiny" if args.tiny else "llama3-8b", device)
        page_size = EngineConfig().for_device(device).page_size
    report = []
    for budget, pages in rows:
        for decode_first in (True, False):
            row = {"budget": budget, "pages": pages, "decode_first": decode_first}
            row["model_s"], row["model_steps"] = model_seconds(prompts, outputs, budget, pages, decode_first, page_size)
            if model is not None:
                row["measured_s"], row["measured_runs"] = measured_seconds(model, prompts, outputs, budget, pages,
                                                                           decode_first, page_size)
            report.append(row)
            print(row, flush=True)
    with open(os.path.join(args.out, "decode_first_probe.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n| token budget | KV pages of {page_size} | decode-first | model s (steps) | measured s (runs) | "
          "model off / on | measured off / on |")
    print("|---|---|---|---|---|---|---|")
    for on, off in zip(report[::2], report[1::2]):  # rows come in (on, off) pairs
        for row in (on, off):
            runs = ", ".join(f"{r[0]:.2f}" for r in row.get("measured_runs", []))
            measured = f"{row['measured_s']:.2f} ({runs})" if "measured_s" in row else ""
            ratios = ["", ""]
            if row is off:
                ratios = [f"{off['model_s'] / on['model_s']:.3f}",
                          f"{off['measured_s'] / on['measured_s']:.3f}" if "measured_s" in off else ""]
            print(f"| {row['budget']} | {row['pages'] or 'all'} | {'on' if row['decode_first'] else 'off'} | "
                  f"{row['model_s']:.2f} ({row['model_steps']}) | {measured} | {ratios[0]} | {ratios[1]} |")


if __name__ == "__main__":
    main()
