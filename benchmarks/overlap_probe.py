"""Probe (GPU, not a test): can a decode step's memory-bound attention hide under its compute-bound matmuls
if the batch is split into two halves that run on two CUDA streams (NanoFlow-style nano-batching)?

    python benchmarks/overlap_probe.py [--out DIR]

W-paper's decode step (Qwen2.5-7B shapes, 800 rows in 50 groups of 16, prefix 2000, own KV 250) per layer:
the layer's matmuls (qkv, o, gate+up, down) and our shared-prefix decode attention. Timed, each over 28
layers:
  full    : matmuls at M = 800, then attention of all 800 rows (what the engine does now);
  halves  : the same work as two halves of 400 rows, one after the other on one stream;
  streams : the two halves on two streams, offset so one half's attention can run beside the other's
            matmuls (no dependency between the streams; within a stream the order is a layer's).
  streams, N SMs for attention: as `streams`, with cuBLAS told to leave N SMs free
            (torch._C._set_sm_carveout_experimental) and the attention launched as 4 * N programs that loop
            over its items (a static plan, as in CUDA graphs), so the two can share the GPU.
If `streams` is well under `full`, splitting decode steps into two overlapped halves is worth building;
if it is near `halves`, the GPU does not run the two kernels side by side and it is not.
Session 11 (one H200): streams 24.86 ms, halves 24.90, full 22.48. Session 12: full 22.20, streams with 16 / 32 / 48
SMs for attention 33.18 / 28.00 / 27.22 (the matmuls took as long with the carveout as without: it freed no SMs).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from batchllm_hf.kernels import paged_attention, plan_paged_attention

HIDDEN, INTER, HQ, HKV, D, LAYERS = 3584, 18944, 28, 4, 128, 28


def make_attention(groups: int, members: int, prefix: int, own: int, seed: int, programs: int | None = None):
    """One decode step's inputs in the paged layout (pages of 64) and a closure that runs the kernel
    (`programs`: that many programs looping over a static plan's items, else the per-step plan)."""
    from bench_kernels import _static_plan, make_step

    q, k_cache, v_cache, meta = make_step(groups, members, prefix, own, 1, HQ // HKV, num_kv_heads=HKV,
                                          page_size=64, seed=seed)
    plan = plan_paged_attention(meta, HQ, HKV, D) if programs is None else _static_plan(meta, q, HKV, programs)
    out = torch.empty_like(q)
    return lambda: paged_attention(q, k_cache, v_cache, meta, D ** -0.5, out=out, plan=plan)


def make_matmuls(rows: int):
    w = {name: torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02 for name, shape in
         {"qkv": (HIDDEN, HIDDEN + 2 * HKV * D), "o": (HIDDEN, HIDDEN), "gate_up": (HIDDEN, 2 * INTER),
          "down": (INTER, HIDDEN)}.items()}
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)

    def run():
        x @ w["qkv"]
        x @ w["o"]
        h = x @ w["gate_up"]
        h[:, :INTER] @ w["down"]
    return run


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="overlap_out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    full_mm, full_attn = make_matmuls(800), make_attention(50, 16, 2000, 250, seed=0)
    half_mm = [make_matmuls(400), make_matmuls(400)]
    half_attn = [make_attention(25, 16, 2000, 250, seed=1), make_attention(25, 16, 2000, 250, seed=2)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]

    def full():
        for _ in range(LAYERS):
            full_mm()
            full_attn()

    def halves():
        for _ in range(LAYERS):
            for h in (0, 1):
                half_mm[h]()
                half_attn[h]()

    def two_streams(attention):
        def run():
            main_stream = torch.cuda.current_stream()
            for s in streams:
                s.wait_stream(main_stream)
            with torch.cuda.stream(streams[0]):  # half 0: matmuls then attention, layer after layer
                for _ in range(LAYERS):
                    half_mm[0]()
                    attention[0]()
            with torch.cuda.stream(streams[1]):  # half 1: attention first, so it starts beside half 0's matmuls
                for _ in range(LAYERS):
                    attention[1]()
                    half_mm[1]()
            for s in streams:
                main_stream.wait_stream(s)
        return run

    parts = {"matmuls M=800": lambda: [full_mm() for _ in range(LAYERS)],
             "attention 800 rows": lambda: [full_attn() for _ in range(LAYERS)],
             "matmuls M=400": lambda: [half_mm[0]() for _ in range(LAYERS)],
             "attention 400 rows": lambda: [half_attn[0]() for _ in range(LAYERS)]}
    results = {name: timed(fn) for name, fn in parts.items()}
    results.update({"full": timed(full), "halves": timed(halves), "streams": timed(two_streams(half_attn))})
    for free_sms in (16, 32, 48):
        attention = [make_attention(25, 16, 2000, 250, seed=1 + h, programs=4 * free_sms) for h in (0, 1)]
        run = two_streams(attention)
        results[f"attention 400 rows, {4 * free_sms} programs"] = timed(lambda: [attention[0]() for _ in range(LAYERS)])
        try:
            torch._C._set_sm_carveout_experimental(free_sms)
            results[f"matmuls M=400, {free_sms} SMs left free"] = timed(
                lambda: [half_mm[0]() for _ in range(LAYERS)])
            results[f"streams, {free_sms} SMs for attention"] = timed(run)
        except Exception as error:  # noqa: BLE001 - a torch without the carveout: report, go on
            print(f"carveout {free_sms}: {error!r}")
        finally:
            torch._C._set_sm_carveout_experimental(None)
    with open(os.path.join(args.out, "overlap_probe.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("| variant (28 layers of W-paper's decode step) | ms | vs full |")
    print("|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / results['full']:.2f} |")


if __name__ == "__main__":
    main()
