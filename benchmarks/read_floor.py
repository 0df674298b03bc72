"""The floor for reading a decode step's own KV: plain Triton read kernels, no attention (the GPU machine).

    python benchmarks/read_floor.py --out OUT_DIR

Session 14 found the own items of large-group decode steps (one program per sequence and KV head, 64 own
keys) reading at ~1.5-1.9 TB/s whatever the kernel did around the loads. This times kernels that only READ
the same bytes (each program sums what it reads and writes one float), as CUDA-graph replays after a clean
L2 (a 256 MB read before each run), to separate what the memory system gives for the access pattern and the
step's size from what the attention kernel adds:

  contiguous   one flat buffer of the same size, 32 KB per program
  per head     the paged pool (pages, 64 keys, Hkv, D): a program reads one (page, KV head): 64 rows of
               D * 2 bytes at a stride of Hkv * D * 2 (what an own item reads at S = 64)
  per page     the same pool, a program reads 8 keys of a page, all KV heads: 16 KB contiguous
  head-major   a pool laid out (pages, Hkv, 64 keys, D): one (page, KV head) is 16 KB contiguous
for K and V (two loads per program), at several numbers of sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

from bench_kernels import device_ceilings
from l2_probe import FLUSH_BYTES, events_time


@triton.jit
def _read_tiles(k_ptr, v_ptr, pages_ptr, out_ptr, stride_page, stride_token, stride_head, num_heads,
                TOKENS: tl.constexpr, WIDTH: tl.constexpr):
    """Program i: page pages[i // num_heads], head i % num_heads; a TOKENS x WIDTH tile of K and one of V."""
    item = tl.program_id(0)
    page = tl.load(pages_ptr + item // num_heads).to(tl.int64)
    head = item % num_heads
    rows = tl.arange(0, TOKENS)
    cols = tl.arange(0, WIDTH)
    offsets = page * stride_page + head * stride_head + rows[:, None] * stride_token + cols[None, :]
    k = tl.load(k_ptr + offsets).to(tl.float32)
    v = tl.load(v_ptr + offsets).to(tl.float32)
    tl.store(out_ptr + item, tl.sum(tl.sum(k + v, 1), 0))


def read_time(k, v, pages, heads_per_program_grid, stride, tokens, width, flush) -> float:
    out = torch.empty(pages.shape[0] * heads_per_program_grid, device="cuda")

    def launch():
        _read_tiles[(out.shape[0],)](k, v, pages, out, *stride, heads_per_program_grid, TOKENS=tokens, WIDTH=width,
                                     num_warps=4)
    launch()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    return events_time(graph.replay, 40, before=flush.sum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ceilings = device_ceilings()
    copy = ceilings["copy_GBps"]
    flush = torch.empty(FLUSH_BYTES // 8, device="cuda", dtype=torch.int64).fill_(1)
    kv_heads, head_dim, page = 8, 128, 64
    rows = []
    for seqs in (256, 512, 1024, 4096):
        num_pages = 4 * seqs + 1  # own pages of `seqs` sequences among others (random order)
        pages = torch.randperm(num_pages, device="cuda")[:seqs].to(torch.int32)
        nhd = [torch.randn(num_pages, page, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        hnd = [t.transpose(1, 2).contiguous() for t in nhd]
        must = 2 * seqs * page * kv_heads * head_dim * 2
        flat = [torch.randn(must // 4, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        flat_pages = torch.arange(seqs * kv_heads, device="cuda", dtype=torch.int32)
        s = nhd[0].stride()
        cases = {
            "contiguous": read_time(*flat, flat_pages, 1, (page * head_dim, head_dim, 0), page, head_dim, flush),
            "per head": read_time(*nhd, pages, kv_heads, (s[0], s[1], s[2]), page, head_dim, flush),
            # a page's K is 64 x Hkv x D contiguous: 8 programs of 8 keys x all heads (16 KB contiguous) each
            "per page": read_time(*nhd, pages, 8, (s[0], s[1], 8 * s[1]), 8, kv_heads * head_dim, flush),
            "head-major": read_time(*hnd, pages, kv_heads, (hnd[0].stride(0), hnd[0].stride(2), hnd[0].stride(1)),
                                    page, head_dim, flush),
        }
        for name, t in cases.items():
            row = dict(seqs=seqs, MB=must / 1e6, pattern=name, us=t * 1e6, frac_copy=must / t / 1e9 / copy)
            rows.append(row)
            print(row, flush=True)
        del nhd, hnd, flat
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "read_floor.json"), "w") as f:
        json.dump({"ceilings": ceilings, "rows": rows}, f, indent=1)
    print("\n| sequences (MB) | " + " | ".join(dict.fromkeys(r["pattern"] for r in rows)) + " |")
    print("|---" * 5 + "|")
    for seqs in dict.fromkeys(r["seqs"] for r in rows):
        cells = [f"{r['us']:.1f} us ({r['frac_copy']:.0%})" for r in rows if r["seqs"] == seqs]
        print(f"| {seqs} ({[r['MB'] for r in rows if r['seqs'] == seqs][0]:.0f}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
