"""Where a decode step's time goes: its prefix items and its own items timed apart, and under other kernels.

    python benchmarks/decode_anatomy.py --out OUT_DIR [--set configs|own|persistent|merge]   # GPU machine

The planner puts a decode step's prefix items (a group's rows against its shared prefix) and own items (a
sequence's row against its own KV) into ONE launch. This script splits a step (same plan, items filtered by
kind, the same workspace; "only" rows skip the merge where they hold no own items) to find out which part
holds it, and times whole steps under other kernel configurations. Every variant is timed twice: launched
from Python and as a CUDA-graph replay (the engine's decode path; a launch from Python adds host time, TMA
launches most), and every whole-step variant is checked against the planner's output.
Sets (session 13, benchmarks/results/2026-11-30-session13): configs (call 3: tiles, stages, TMA, page ids
ahead, static plans), own (call 6: wide own items), persistent (call 8: programs looping over items), merge
(call 9: the merge launch's share and program size); session 14 (benchmarks/results/2026-11-30-session14): pack
(calls 3, 5, 6, 9: packed decode items, how long a packed own range may be, rows per packed tile, prefix chunks).
Fractions of copy bandwidth use the replay time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from bench_kernels import HEAD_DIM, _static_plan, device_ceilings, make_step, timed
from batchllm_hf.kernels import allocate_plan, attention_plan, plan_paged_attention
from batchllm_hf.kernels import shared_prefix_triton as kernels
from batchllm_hf.kernels.shared_prefix_triton import launch_shared_prefix_attention

MERGE_DEFAULT = kernels.MERGE_ELEMENTS

STEPS = [
    (256, 1, 2048, 64, 8, 8),    # groups of one: no regressions wanted
    (256, 1, 8192, 256, 4, 8),
    (64, 4, 2048, 1024, 4, 8),
    (8, 32, 2048, 1024, 4, 8),  # (G, B, P, S, GQA, Hkv); session 9's fraction of copy bandwidth in the comment
    (16, 16, 2048, 64, 4, 8),    # 28.5%
    (4, 64, 2048, 64, 4, 8),     # 25.6%
    (1, 256, 2048, 256, 4, 8),   # 46.5%
    (8, 32, 2048, 256, 4, 8),    # 50.9% (the 3x-SDPA row)
    (64, 4, 2048, 256, 4, 8),    # 58.6%
    (16, 16, 8192, 256, 8, 8),   # 53.6%
    (4, 64, 8192, 64, 4, 8),     # 23.1%
    (1, 256, 8192, 64, 8, 8),    # compute-bound (31% of max(bytes, FLOPs) bound)
    (50, 16, 2000, 250, 7, 4),   # W-paper's decode step
]
PREFIX_KINDS, OWN_KINDS = (1, 3, 5), (0, 2, 4, 8, 16)
PREFILL_TILES = dict(block_n=64, num_warps=4, num_stages=3, masked_stages=1, use_tma=True, prefetch_pages=True)
POINTER_3 = dict(block_n=64, num_warps=4, num_stages=3, masked_stages=1, use_tma=False, prefetch_pages=False)
WIDE_8 = dict(block_n=64, num_warps=8, num_stages=3, masked_stages=1, use_tma=True, prefetch_pages=True)
LEAN_OWN = dict(block_m=16, block_m_own=16)
ALL = PREFIX_KINDS + OWN_KINDS


OWN_STEPS = [  # session 13's grid (call 4) misses with short own KV, W-paper's step, groups of one
    (16, 16, 2048, 64, 4, 8), (4, 64, 2048, 64, 4, 8), (1, 256, 2048, 256, 4, 8), (16, 16, 2048, 64, 8, 8),
    (1, 256, 2048, 64, 8, 8), (4, 64, 8192, 256, 4, 8), (8, 32, 2048, 256, 4, 8), (64, 4, 2048, 64, 4, 8),
    (256, 1, 2048, 64, 8, 8), (256, 1, 512, 256, 4, 8), (50, 16, 2000, 250, 7, 4),
]


def OWN_VARIANTS(big, huge):  # own items: one KV head per item (the planner) or wide (all KV heads of a token)
    pointer_wide = dict(PREFILL_TILES, masked_stages=3)
    return {
        "planner (session 13 default)": [((None, None), ALL, True, {})],
        "planner, wide items": [((None, None, True), ALL, True, {})],
        "planner, wide items, masked loop 3 stages": [((None, None, True), ALL, True, pointer_wide)],
        "planner, wide items, masked 3 stages, 64-column blocks": [((None, None, True), ALL, True,
                                                                     dict(pointer_wide, block_n_wide=64))],
        "own only (planner)": [((None, None), OWN_KINDS, True, {})],
        "own only, wide": [((None, None, True), OWN_KINDS, True, {})],
        "own only, wide, masked 3 stages": [((None, None, True), OWN_KINDS, True, pointer_wide)],
        "prefix only (planner)": [((None, None), PREFIX_KINDS, False, {})],
    }


PERSISTENT_STEPS = [
    (1, 256, 2048, 64, 4, 8), (4, 64, 2048, 64, 4, 8), (16, 16, 2048, 64, 4, 8), (1, 256, 2048, 64, 8, 8),
    (4, 64, 8192, 256, 4, 8), (8, 32, 2048, 256, 4, 8), (256, 1, 2048, 64, 8, 8), (50, 16, 2000, 250, 7, 4),
]


def PERSISTENT_VARIANTS(big, huge):  # programs that loop over items (GRID_STRIDE) instead of one per item
    return {
        "planner (one program per item)": [((None, None), ALL, True, {})],
        **{f"planner, {n} programs per SM looping": [((None, None), ALL, True, {"num_programs": 132 * n})]
           for n in (2, 4, 8)},
        "own only (one program per item)": [((None, None), OWN_KINDS, True, {})],
        **{f"own only, {n} programs per SM looping": [((None, None), OWN_KINDS, True, {"num_programs": 132 * n})]
           for n in (2, 8)},
    }


MERGE_STEPS = PERSISTENT_STEPS
PACK_STEPS = OWN_STEPS + [(16, 16, 8192, 256, 8, 8), (4, 64, 8192, 64, 4, 8), (1, 256, 8192, 64, 8, 8),
                          (64, 4, 2048, 1024, 4, 8), (8, 32, 2048, 1024, 4, 8)]


def PACK_VARIANTS(big, huge):  # packed items: several decode tokens' own KV in one pipelined loop
    # pack: True packs own ranges up to attention_plan.PACK_MAX_KEYS, a number up to that many keys
    return {
        "planner, unpacked": [((None, None, False, False), ALL, True, {})],
        "planner, packed <= 128 keys": [((None, None, False, 128), ALL, True, {})],
        "planner, packed <= 128 keys, 32-row tiles": [((None, None, False, (128, 32)), ALL, True, {})],
        "planner, packed <= 128 keys, 64-row tiles": [((None, None, False, (128, 64)), ALL, True, {})],
        "planner, packed <= 256 keys, 32-row tiles": [((None, None, False, (256, 32)), ALL, True, {})],
        "own only, unpacked": [((None, None, False, False), OWN_KINDS, True, {})],
        "own only, packed": [((None, None, False, True), OWN_KINDS, True, {})],
        "own only, packed, 32-row tiles": [((None, None, False, (128, 32)), OWN_KINDS, True, {})],
    }


def MERGE_VARIANTS(big, huge):  # the merge launch's share of a step, and its program size
    return {
        "planner": [((None, None), ALL, True, {})],
        "planner, merge skipped (timing only: rows with partials left unmerged)": [((None, None), ALL, False, {})],
        **{f"planner, merge of {e} elements per program": [((None, None), ALL, True, {"merge_elements": e})]
           for e in (2048, 1024, 512)},
    }


PACK_TMA_STEPS = PACK_STEPS


def PACK_TMA_VARIANTS(big, huge):  # packed items whose whole blocks come through TMA (plans with TMA loads)
    pointer = {"pack_tma": False}
    return {
        "planner, unpacked": [((None, None, False, False), ALL, True, {})],
        "packed <= 128 keys, pointer loads (session 14)": [((None, None, False, 128), ALL, True, pointer)],
        "packed <= 128 keys, TMA blocks": [((None, None, False, 128), ALL, True, {})],
        "packed <= 256 keys, TMA blocks": [((None, None, False, 256), ALL, True, {})],
        "planner (packed <= PACK_MAX_KEYS_TMA keys, TMA blocks)": [((None, None, False, None), ALL, True, {})],
        "own only, unpacked": [((None, None, False, False), OWN_KINDS, True, {})],
        "own only, packed, TMA blocks": [((None, None, False, None), OWN_KINDS, True, {})],
    }


def PACK_TMA_ROWS_VARIANTS(big, huge):  # rows per packed tile with TMA blocks (sequences per pack: rows // GQA)
    keys = "PACK_MAX_KEYS_TMA"
    return {f"planner, packed tiles of {rows} rows": [((None, None, False, (keys, rows)), ALL, True, {})]
            for rows in (16, 32, 64)}


def PREFIX_PACK_VARIANTS(big, huge):  # packed items that also read their group's prefix: no prefix items, no merge
    keys = "PACK_MAX_KEYS_TMA"
    return {"planner": [((None, None, False, None), ALL, True, {})],
            **{f"prefix packs, {rows}-row tiles": [((None, None, False, (keys, rows), True), ALL, True, {})]
               for rows in (16, 32, 64)}}


MISS_STEPS = [  # session 15's grid misses (call 8): groups of 16-256 at P >= 2048
    (16, 16, 2048, 64, 4, 8), (4, 64, 2048, 64, 4, 8), (1, 256, 2048, 64, 4, 8), (1, 256, 2048, 256, 4, 8),
    (4, 64, 8192, 64, 4, 8), (4, 64, 8192, 256, 4, 8), (1, 256, 8192, 64, 4, 8), (1, 256, 8192, 256, 4, 8),
    (16, 16, 2048, 64, 8, 8), (4, 64, 2048, 64, 8, 8), (4, 64, 2048, 256, 8, 8), (1, 256, 2048, 64, 8, 8),
    (1, 256, 2048, 256, 8, 8), (4, 64, 8192, 64, 8, 8), (4, 64, 8192, 256, 8, 8), (1, 256, 8192, 64, 8, 8),
    (1, 256, 8192, 256, 8, 8), (1, 256, 8192, 1024, 8, 8),
]


def SPLIT_VARIANTS(big, huge):  # the misses' parts: prefix items alone, own items alone, the merge, KV chunks
    return {
        "planner": [((None, None), ALL, True, {})],
        "prefix only": [((None, None), PREFIX_KINDS, False, {})],
        "own only (with merge)": [((None, None), OWN_KINDS, True, {})],
        "merge skipped": [((None, None), ALL, False, {})],
        "planner, KV chunks of 1024": [((None, 1024), ALL, True, {})],
        "planner, KV chunks of 4096": [((None, 4096), ALL, True, {})],
        "planner, no prefix packs": [((None, None, False, None, False), ALL, True, {})],
    }


MIXED_STEPS = [  # own lengths drawn per sequence from [lo, hi] (the engine's workloads: suffix + tokens so far)
    (64, 64, 1024, (33, 192), 4, 8),   # W-large (suffixes 32-128, 64 new tokens)
    (16, 64, 1024, (33, 192), 4, 8),
    (8, 32, 2048, (65, 320), 4, 8),    # W-8B (suffixes 64-192, 128 new tokens)
    (50, 16, 2000, (201, 300), 7, 4),  # W-paper (suffix 200, 100 new tokens)
    (16, 16, 2048, (33, 192), 8, 8),   # GQA 8: prefix packs
    (256, 1, 0, (33, 192), 4, 8),      # no shared prefix
]


FILL_STEPS = [  # GQA 8 at long prefixes: prefix packs where the step would split the prefix but the packs fill the GPU
    (16, 16, 8192, 64, 8, 8), (16, 16, 8192, 256, 8, 8), (16, 16, 8192, 1024, 8, 8), (4, 64, 8192, 64, 8, 8),
    (1, 256, 8192, 256, 8, 8), (64, 4, 8192, 256, 8, 8), (2, 8, 32768, 64, 8, 8),
]


def FILL_VARIANTS(big, huge):
    return {"planner": [((None, None), ALL, True, {})],
            "no prefix packs": [((None, None, False, None, False), ALL, True, {})]}


def MIXED_VARIANTS(big, huge):  # packed items over members of different own lengths
    return {
        "planner": [((None, None), ALL, True, {})],
        "packs with pointer loads": [((None, None), ALL, True, {"pack_tma": False})],
        "unpacked": [((None, None, False, False), ALL, True, {})],
    }


def DEEP_VARIANTS(big, huge):  # more bytes in flight per SM: 4 stages; prefix packs of 128 rows (8 warps)
    keys = "PACK_MAX_KEYS_TMA"
    return {
        "planner": [((None, None), ALL, True, {})],
        "planner, 4 stages": [((None, None), ALL, True, {"num_stages": 4})],
        "prefix packs, 64 rows": [((None, None, False, (keys, 64), True), ALL, True, {})],
        "prefix packs, 128 rows, 8 warps": [((None, None, False, (keys, 128), True), ALL, True, {"num_warps": 8})],
        "prefix packs, 128 rows, 8 warps, 2 stages": [((None, None, False, (keys, 128), True), ALL, True,
                                                       {"num_warps": 8, "num_stages": 2})],
        "prefix packs, 128 rows, 8 warps, 4 stages": [((None, None, False, (keys, 128), True), ALL, True,
                                                       {"num_warps": 8, "num_stages": 4})],
    }


def VARIANTS(big, huge):  # name: [(planner args (block_m, chunk), item kinds, merge, kernel overrides)] per launch
    return {
        "planner": [((None, None), ALL, True, {})],
        "one launch, prefill config (64 rows, 3 stages, TMA, ids ahead)": [((big, None), ALL, True, PREFILL_TILES)],
        "one launch, prefill config, 2 stages": [((big, None), ALL, True, dict(PREFILL_TILES, num_stages=2))],
        "one launch, prefill config, ids not ahead": [((big, None), ALL, True, dict(PREFILL_TILES,
                                                                                    prefetch_pages=False))],
        "one launch, 64 rows, 3 stages, pointer loads": [((big, None), ALL, True, POINTER_3)],
        "one launch, 128 rows, 8 warps, TMA": [((huge, None), ALL, True, WIDE_8)],
        "prefix only, prefill config": [((big, None), PREFIX_KINDS, False, PREFILL_TILES)],
        "own only, prefill config": [((big, None), OWN_KINDS, True, PREFILL_TILES)],
        "own only, 16-row kernel, 1 stage": [((None, None), OWN_KINDS, True, dict(LEAN_OWN, num_stages=1))],
        "own only, 16-row kernel, 2 warps": [((None, None), OWN_KINDS, True, dict(LEAN_OWN, num_warps=2))],
        "own only, 16-row kernel, 1 stage, 32 keys": [((None, None), OWN_KINDS, True,
                                                       dict(LEAN_OWN, num_stages=1, block_n=32))],
    }


def subplan(plan, kinds, merge: bool, **config):
    """The plan's items of these kinds alone (same workspace slots), with kernel settings overridden."""
    items = plan.items[: int(plan.num_items.item())]
    keep = torch.isin(items[:, 0], torch.tensor(kinds, device=items.device, dtype=items.dtype))
    items = items[keep].contiguous()
    kinds_held = set(items[:, 0].tolist())
    sub = dataclasses.replace(plan, items=items, num_items=torch.tensor([items.shape[0]], dtype=torch.int32,
                                                                         device=items.device),
                              num_programs=max(1, items.shape[0]), needs_merge=merge and plan.needs_merge,
                              has_small=bool(kinds_held & {2, 3}), has_fused=8 in kinds_held,
                              has_packed=16 in kinds_held)
    block_m = config.pop("block_m", sub.block_m)
    sub.block_m = block_m
    sub.block_m_own = config.pop("block_m_own", block_m if set(kinds) == set(PREFIX_KINDS) else sub.block_m_own)
    for key, value in config.items():
        setattr(sub, key, value)
    return sub


SETS = {  # --set name: (steps, variants)
    "configs": (STEPS, VARIANTS), "own": (OWN_STEPS, OWN_VARIANTS), "persistent": (PERSISTENT_STEPS, PERSISTENT_VARIANTS),
    "merge": (MERGE_STEPS, MERGE_VARIANTS), "pack": (PACK_STEPS, PACK_VARIANTS),
    "packtma": (PACK_TMA_STEPS, PACK_TMA_VARIANTS), "packrows": (PACK_TMA_STEPS, PACK_TMA_ROWS_VARIANTS),
    "prefixpack": (PACK_TMA_STEPS, PREFIX_PACK_VARIANTS), "split": (MISS_STEPS, SPLIT_VARIANTS),
    "deep": (MISS_STEPS, DEEP_VARIANTS), "mixed": (MIXED_STEPS, MIXED_VARIANTS), "fill": (FILL_STEPS, FILL_VARIANTS),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=None, help="only the first N steps")
    parser.add_argument("--tma", action="store_const", const=True, default=None,
                        help="plan with use_tma=True (the engine's CUDA-graph decode configuration); calls 6, 8 "
                             "and 9 ran when that was the per-step default, so repeat them with --tma")
    parser.add_argument("--set", choices=list(SETS), default="configs",
                        help="configs: session 13's tile/TMA variants (call 3); own: own-item variants (call 6); "
                             "persistent: programs looping over items (call 8); merge: the merge launch (call 9); "
                             "pack: packed decode items (session 14); packtma: packed items through TMA "
                             "(session 15); split / deep / mixed / fill: the session-15 grid misses taken apart, more bytes in "
                             "flight, mixed own lengths, prefix packs that fill the GPU (session 16)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ceilings = device_ceilings()
    print(json.dumps(ceilings), flush=True)
    rows, table = [], []
    steps, chosen = SETS[args.set]
    for groups, members, prefix, own, ratio, kv_heads in steps[: args.steps]:
        lengths = own if isinstance(own, tuple) else (own, own)
        q, k_cache, v_cache, meta = make_step(groups, members, prefix, lengths[1], 1, ratio, num_kv_heads=kv_heads)
        if lengths[0] != lengths[1]:
            meta = dataclasses.replace(meta, own_lens=torch.randint(lengths[0], lengths[1] + 1, meta.own_lens.shape,
                                                                    generator=torch.Generator().manual_seed(1)).to(
                                                                        meta.own_lens))
        scale = HEAD_DIM ** -0.5
        own_keys = int(meta.own_lens.sum())
        must_read = (2 * kv_heads * HEAD_DIM * q.element_size() * (groups * prefix + own_keys)
                     + 2 * q.numel() * q.element_size())
        base = plan_paged_attention(meta, q.shape[1], kv_heads, HEAD_DIM, use_tma=args.tma)
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2], device="cuda")
        launch_shared_prefix_attention(q, k_cache, v_cache, meta, scale, base, out=out, lse=lse)
        expected = out.clone()

        def run(*plans):
            for p in plans:
                launch_shared_prefix_attention(q, k_cache, v_cache, meta, scale, p, out=out, lse=lse)

        plans = {}

        def planned(block_m=None, chunk=None, wide=False, pack=None, prefix=None):  # None: the planner's default
            if (block_m, chunk, wide, pack, prefix) not in plans:
                longest, longest_tma, rows, prefix_rows = (attention_plan.PACK_MAX_KEYS, attention_plan.PACK_MAX_KEYS_TMA,
                                                           attention_plan.PACK_ROWS, attention_plan.PACK_PREFIX_ROWS)
                if pack is not True and pack:  # keys, or (keys, rows): pack own ranges up to that many keys
                    keys, attention_plan.PACK_ROWS = pack if isinstance(pack, tuple) else (pack, rows)
                    attention_plan.PACK_PREFIX_ROWS = attention_plan.PACK_ROWS if isinstance(pack, tuple) else prefix_rows
                    if keys != "PACK_MAX_KEYS_TMA":  # that name: keep the planner's key limits
                        attention_plan.PACK_MAX_KEYS = attention_plan.PACK_MAX_KEYS_TMA = keys
                try:
                    plans[block_m, chunk, wide, pack, prefix] = plan_paged_attention(
                        meta, q.shape[1], kv_heads, HEAD_DIM, block_m=block_m, chunk=chunk, wide=wide,
                        use_tma=args.tma, pack=None if pack is None else bool(pack), pack_prefix=prefix)
                finally:
                    attention_plan.PACK_MAX_KEYS, attention_plan.PACK_ROWS = longest, rows
                    attention_plan.PACK_MAX_KEYS_TMA, attention_plan.PACK_PREFIX_ROWS = longest_tma, prefix_rows
            return plans[block_m, chunk, wide, pack, prefix]

        def static(**config):
            seqs = meta.own_lens.shape[0]
            capacity = 2 * kv_heads * seqs + 4096
            buffers = allocate_plan(seqs, capacity, 4 * seqs + 4096, q.shape[1], HEAD_DIM, q.device, **config)
            return plan_paged_attention(meta, q.shape[1], kv_heads, HEAD_DIM, buffers=buffers)

        big = 64 if members * ratio > 16 else None
        huge = 128 if members * ratio >= 128 else big
        variants = {name: [subplan(planned(*args), kinds, merge, **config) for args, kinds, merge, config in spec]
                    for name, spec in chosen(big, huge).items()}
        if args.set in ("pack", "packtma", "mixed"):
            variants["CUDA-graph static plan (engine)"] = [_static_plan(meta, q, kv_heads, None)]
        if args.set == "configs":
            variants["CUDA-graph static plan (engine today)"] = [_static_plan(meta, q, kv_heads, None)]
            variants["static plan, prefill config"] = [static(block_m=64, block_m_own=16, **PREFILL_TILES)]
            variants["static plan, prefill config, 2 stages"] = [static(block_m=64, block_m_own=16,
                                                                       **dict(PREFILL_TILES, num_stages=2))]
        step = [groups, members, prefix, list(lengths) if lengths[0] != lengths[1] else own, ratio, kv_heads]
        cells = []
        for name, plans in variants.items():
            kernels.MERGE_ELEMENTS = getattr(plans[-1], "merge_elements", MERGE_DEFAULT)
            try:
                out.fill_(float("nan"))
                seconds = timed(lambda: run(*plans))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run(*plans)
                out.fill_(float("nan"))
                replay_seconds = timed(graph.replay)
                err = (out.float() - expected.float()).abs().max().item() if "only" not in name and "skipped" not in name else None
            except Exception as error:  # noqa: BLE001 - one variant failing must not lose the rest
                seconds = replay_seconds = float("nan")
                err = repr(error)[:160]
            finally:
                kernels.MERGE_ELEMENTS = MERGE_DEFAULT
            row = dict(step=step, variant=name, time_us=seconds * 1e6, graph_us=replay_seconds * 1e6,
                       frac_copy_bw=must_read / replay_seconds / 1e9
                       / ceilings["copy_GBps"], max_err_vs_planner=err,
                       items=[int(p.num_items.item()) for p in plans],
                       programs=[min(p.num_programs, p.items.shape[0]) for p in plans],
                       tiles=[[p.block_m, p.block_m_own, p.block_n, p.num_warps, p.num_stages, p.use_tma]
                              for p in plans])
            rows.append(row)
            print("  ", row, flush=True)
            cells.append(f"{row['time_us']:.0f} / {row['graph_us']:.0f}")
        table.append((step, cells, list(variants)))
        with open(os.path.join(args.out, "decode_anatomy.json"), "w") as f:
            json.dump({"ceilings": ceilings, "rows": rows}, f, indent=1)
        del q, k_cache, v_cache
        torch.cuda.empty_cache()
    names = table[0][2]
    print("\ntime per step (us), launched from Python / as a CUDA-graph replay; columns:")
    for i, name in enumerate(names):
        print(f"  c{i}: {name}")
    print("| step (G, B, P, S, GQA, Hkv) | " + " | ".join(f"c{i}" for i in range(len(names))) + " |")
    print("|---" * (len(names) + 1) + "|")
    for step, cells, _ in table:
        print(f"| {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
