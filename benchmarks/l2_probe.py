"""How the L2 state before a timed decode step changes its time (the GPU machine).

    python benchmarks/l2_probe.py --out OUT_DIR [--ncu]

`triton.testing.do_bench` (what bench_kernels.py times with) clears the L2 before every run by writing
zeros over a 256 MB buffer, so each timed step starts with an L2 full of DIRTY lines: its reads evict them
and the L2 writes them back to DRAM while the step reads. A step that reads ~70 MB (a large group's decode
step) may then share DRAM with ~50 MB of write-backs. In the engine the step before an attention layer's is
a projection reading weights: an L2 full of clean lines. This script times the same CUDA-graph replays four
ways, side by side:

  dirty    do_bench as bench_kernels.py uses it (zeros written over 256 MB before each run)
  clean    a 256 MB buffer READ before each run (an L2 of clean lines, nothing to write back)
  rotate   K copies of the KV pool, one launch on each in one graph, replays back to back without any
           flush, time / K (each launch finds the L2 holding the other copies: layers of a model do this)
  hot      the same launch replayed back to back without a flush (what is left in L2 is its own data)

for whole steps, their own items alone and their prefix items alone (decode_anatomy.subplan), and SDPA's
flash decode on duplicated KV for the issue's 3x row. --ncu instead launches each variant once (for
`ncu -k regex:partial_attention`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bench_kernels import HEAD_DIM, device_ceilings, duplicated_kv, make_step, sdpa_flash
from decode_anatomy import OWN_KINDS, PREFIX_KINDS, subplan
from batchllm_hf.kernels import plan_paged_attention
from batchllm_hf.kernels.shared_prefix_triton import launch_shared_prefix_attention

STEPS = [  # (G, B, P, S, GQA, Hkv)
    (4, 64, 2048, 64, 4, 8), (16, 16, 2048, 64, 4, 8), (1, 256, 2048, 256, 4, 8), (8, 32, 2048, 256, 4, 8),
    (4, 64, 8192, 64, 4, 8), (1, 256, 8192, 64, 8, 8), (256, 1, 2048, 64, 8, 8), (64, 4, 2048, 256, 4, 8),
    (50, 16, 2000, 250, 7, 4),
]
FLUSH_BYTES = 256 << 20


def events_time(fn, reps: int, before=None) -> float:
    """Mean seconds of fn over reps runs, each timed by its own events; `before` runs untimed ahead of each."""
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if before is not None:
            before()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2] * 1e-3  # median


def four_ways(launch, pools, must_read: int, flush: torch.Tensor) -> dict:
    """launch(pool_index) enqueues one step on copy pool_index of the KV; times in us (medians)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(0)
    rotate = torch.cuda.CUDAGraph()
    with torch.cuda.graph(rotate):
        for i in range(len(pools)):
            launch(i)
    dirty = events_time(graph.replay, 40, before=lambda: flush.zero_())
    clean = events_time(graph.replay, 40, before=flush.sum)
    rotated = events_time(rotate.replay, 20) / len(pools)
    hot = events_time(graph.replay, 40)
    row = dict(dirty_us=dirty * 1e6, clean_us=clean * 1e6, rotate_us=rotated * 1e6, hot_us=hot * 1e6, copies=len(pools))
    row.update({f"{k}_GBps": must_read / v / 1e9 for k, v in (("dirty", dirty), ("clean", clean), ("rotate", rotated))})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--ncu", action="store_true", help="launch each variant once, untimed (run under ncu)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ceilings = {} if args.ncu else device_ceilings()
    print(json.dumps(ceilings), flush=True)
    flush = torch.empty(FLUSH_BYTES // 8, device="cuda", dtype=torch.int64)
    flush.fill_(1)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    steps = STEPS[:1] if args.ncu else STEPS[: args.steps]
    for groups, members, prefix, own, ratio, kv_heads in steps:
        q, k_cache, v_cache, meta = make_step(groups, members, prefix, own, 1, ratio, num_kv_heads=kv_heads)
        scale = HEAD_DIM ** -0.5
        kv_bytes = 2 * kv_heads * HEAD_DIM * q.element_size() * groups * (prefix + members * own)
        must_read = kv_bytes + 2 * q.numel() * q.element_size()
        copies = 1 if args.ncu else max(2, min(8, -(-4 * l2 // must_read)))
        pools = [(k_cache, v_cache)] + [(k_cache.clone(), v_cache.clone()) for _ in range(copies - 1)]
        plan = plan_paged_attention(meta, q.shape[1], kv_heads, HEAD_DIM, use_tma=True)
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")
        variants = {"step": plan, "own only": subplan(plan, OWN_KINDS, True),
                    "prefix only": subplan(plan, PREFIX_KINDS, False)}
        if args.ncu:  # session 14: packed own items, with the step's kernel and with a 16-row one
            packed = plan_paged_attention(meta, q.shape[1], kv_heads, HEAD_DIM, use_tma=True, pack=True)
            variants = {"own only": variants["own only"], "own packed": subplan(packed, OWN_KINDS, True),
                        "own packed, 16-row kernel": subplan(packed, OWN_KINDS, True, block_m=16, block_m_own=16)}
        step = [groups, members, prefix, own, ratio, kv_heads]
        for name, p in variants.items():
            def launch(i, p=p):
                launch_shared_prefix_attention(q, pools[i][0], pools[i][1], meta, scale, p, out=out, lse=lse)
            if args.ncu:
                launch(0)
                torch.cuda.synchronize()
                continue
            row = dict(step=step, variant=name, **four_ways(launch, pools, must_read, flush))
            rows.append(row)
            print("  ", row, flush=True)
        if not args.ncu and (groups, members, prefix, own) == (8, 32, 2048, 256):
            dense = [tuple(duplicated_kv(c, meta, members, prefix, own) for c in pool) for pool in pools[:2]]
            qd = q.unsqueeze(2)  # (N, Hq, 1, D)
            row = dict(step=step, variant="SDPA flash, duplicated KV", **four_ways(
                lambda i: sdpa_flash(qd, dense[i][0], dense[i][1], scale), dense, must_read, flush))
            rows.append(row)
            print("  ", row, flush=True)
            del dense
        with open(os.path.join(args.out, "l2_probe.json"), "w") as f:
            json.dump({"ceilings": ceilings, "l2_bytes": l2, "rows": rows}, f, indent=1)
        del q, k_cache, v_cache, pools
        torch.cuda.empty_cache()
    if args.ncu:
        return
    copy = ceilings["copy_GBps"]
    print("\ntime (us) and fraction of copy bandwidth on the must-read bytes, by the L2 state before each run")
    print("| step (G, B, P, S, GQA, Hkv) | variant | dirty | clean | rotate (copies) | hot | dirty / rotate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['variant']} | {r['dirty_us']:.0f} ({r['dirty_GBps'] / copy:.0%}) | "
              f"{r['clean_us']:.0f} ({r['clean_GBps'] / copy:.0%}) | {r['rotate_us']:.0f} "
              f"({r['rotate_GBps'] / copy:.0%}, {r['copies']}) | {r['hot_us']:.0f} | "
              f"{r['dirty_us'] / r['rotate_us']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
