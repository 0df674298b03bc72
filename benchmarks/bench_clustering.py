"""Speed, memory and saving of batchllm_hf.clustering.cluster_prefixes (CPU, one core: numpy only).

    python benchmarks/bench_clustering.py [--out bench_clustering.json] [--quick]

Workloads: 100k prompts of ~2k tokens in groups of 1000 (numpy RNG), 100k all-distinct prompts of ~2k,
the W-* prompt sets of /work/shared/bench/workloads.md (random.Random(1), token ids in
[1000, 100000), shuffled), and W-chat (ours: nested multi-turn prompts). Side by side: reference_greedy.py, a per-token Python trie with the
reference code's greedy rule (BASELINE), on the full input when small, else on a subsample, with ours
timed on the SAME subsample. Also sweeps min_prefix_len and align (the measurements behind the defaults).
"""
import argparse
import json
import os
import random
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference_greedy import greedy_groups  # noqa: E402

from batchllm_hf.clustering import cluster_prefixes  # noqa: E402

GREEDY_TOKEN_BUDGET = 3_000_000     # the Python trie runs at ~1M tokens/s: subsample above this


def big_grouped(seed=1, groups=100, members=1000):
    rng = np.random.default_rng(seed)
    prefix_len = rng.integers(1024, 1537, size=groups)
    lengths = (prefix_len[:, None] + rng.integers(256, 769, size=(groups, members))).ravel()
    tokens = rng.integers(1000, 100000, size=int(lengths.sum()), dtype=np.int32)
    starts = np.r_[0, np.cumsum(lengths)[:-1]].reshape(groups, members)
    for g in range(groups):
        prefix = tokens[starts[g, 0]:starts[g, 0] + prefix_len[g]].copy()
        tokens[(starts[g][:, None] + np.arange(prefix_len[g])).ravel()] = np.tile(prefix, members)
    prompts = [tokens[s:s + n] for s, n in zip(starts.ravel(), lengths)]
    return [prompts[i] for i in rng.permutation(len(prompts))]


def big_distinct(seed=2, n=100000):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1536, 2561, size=n)
    tokens = rng.integers(1000, 100000, size=int(lengths.sum()), dtype=np.int32)
    return [tokens[s:s + k] for s, k in zip(np.r_[0, np.cumsum(lengths)[:-1]], lengths)]


def w_set(groups, members, shared, distinct, seed=1):
    """workloads.md: each group draws its prefix, each member its own length and tokens; shuffled."""
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(1000, 100000) for _ in range(k)]  # noqa: E731
    prompts = []
    for _ in range(groups):
        prefix = draw(shared)
        prompts += [prefix + draw(rng.randint(*distinct)) for _ in range(members)]
    rng.shuffle(prompts)
    return [np.asarray(p, dtype=np.int32) for p in prompts]


def w_tree(seed=1):
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(1000, 100000) for _ in range(k)]  # noqa: E731
    prompts = []
    for _ in range(4):
        system = draw(512)
        for _ in range(8):
            shots = system + draw(1024)
            prompts += [shots + draw(rng.randint(32, 96)) for _ in range(16)]
    rng.shuffle(prompts)
    return [np.asarray(p, dtype=np.int32) for p in prompts]


def w_chat(conversations=200, max_turns=8, seed=1):
    """Not in workloads.md: multi-turn chats, each turn's prompt extends the previous one (nested
    prompts under a 256-token system prompt), where the greedy rule is measurably suboptimal."""
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(1000, 100000) for _ in range(k)]  # noqa: E731
    system, prompts = draw(256), []
    for _ in range(conversations):
        prompt = system
        for _ in range(rng.randint(1, max_turns)):
            prompt = prompt + draw(rng.randint(64, 256))
            prompts.append(prompt)
    rng.shuffle(prompts)
    return [np.asarray(p, dtype=np.int32) for p in prompts]


WORKLOADS = {
    "grouped-100k": big_grouped,
    "distinct-100k": big_distinct,
    "W-1B": lambda: w_set(8, 16, 1024, (64, 128)),
    "W-8B": lambda: w_set(8, 32, 2048, (64, 192)),
    "W-paper": lambda: w_set(50, 16, 2000, (200, 200)),
    "W-noshare": lambda: w_set(256, 1, 0, (512, 1024)),
    "W-tree": w_tree,
    "W-large": lambda: w_set(64, 64, 1024, (32, 128)),
    "W-chat": w_chat,
}


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def peak_extra_bytes(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def stats_pair(plan):
    return [plan.stats.saving_ratio, plan.stats.shared_groups]


def saved(plan):
    return plan.stats.logical_tokens - plan.stats.physical_tokens


def run_workload(name, prompts, quick):
    tokens = sum(len(p) for p in prompts)
    token_bytes = sum(p.nbytes for p in prompts)
    big = tokens > 20_000_000
    t_ours, plan = timed(lambda: cluster_prefixes(prompts), 1 if big else 3)
    t_one, plan1 = timed(lambda: cluster_prefixes(prompts, min_prefix_len=1), 1 if big else 3)
    row = dict(workload=name, requests=len(prompts), tokens=tokens, seconds=t_ours,
               mtok_per_s=tokens / t_ours / 1e6, groups=plan.stats.shared_groups,
               saving=plan.stats.saving_ratio, saving_mpl1=plan1.stats.saving_ratio,
               multilevel_saving=plan.stats.multilevel_saving_ratio,
               memory_ratio=peak_extra_bytes(lambda: cluster_prefixes(prompts)) / token_bytes)
    # greedy baseline, at equal size; min_prefix_len=1 for ours (the greedy has no threshold)
    sample = prompts
    if tokens > GREEDY_TOKEN_BUDGET:
        sample = prompts[:max(2, int(len(prompts) * GREEDY_TOKEN_BUDGET / tokens))]
    lists = [p.tolist() for p in sample]
    t_greedy, greedy = timed(lambda: greedy_groups(lists), 1)
    t_same, ours_same = timed(lambda: cluster_prefixes(sample, min_prefix_len=1), 3)
    greedy_saved = sum((len(m) - 1) * k for k, m in greedy)
    row.update(greedy_requests=len(sample), greedy_saved=greedy_saved, ours_saved=saved(ours_same),
               greedy_seconds=t_greedy, ours_seconds_same=t_same, speedup=t_greedy / t_same)
    row["sweep_min_prefix_len"] = {} if quick and big else {
        str(m): stats_pair(cluster_prefixes(prompts, min_prefix_len=m)) for m in (1, 2, 4, 16, 64, 512)}
    row["sweep_align"] = {} if big else {
        str(a): cluster_prefixes(prompts, align=a).stats.saving_ratio for a in (1, 16, 64, 256)}
    lists = [p.tolist() for p in prompts[:max(2, int(len(prompts) * 10_000_000 / tokens))]]
    t_lists, _ = timed(lambda: cluster_prefixes(lists), 1)
    row["mtok_per_s_lists"] = sum(map(len, lists)) / t_lists / 1e6
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_clustering.json")
    parser.add_argument("--quick", action="store_true", help="skip the sweep on the 100k sets")
    args = parser.parse_args()
    rows = []
    for name, make in WORKLOADS.items():
        prompts = make()
        rows.append(run_workload(name, prompts, args.quick))
        del prompts
        r = rows[-1]
        print(f"{name:14s} done: {r['mtok_per_s']:.1f} Mtok/s", file=sys.stderr, flush=True)
    head = (f"{'workload':14s} {'requests':>8s} {'tokens':>11s} {'s':>6s} {'Mtok/s':>7s} "
            f"{'lists':>6s} {'mem/x':>5s} {'groups':>6s} {'saving':>7s} {'multi':>7s} | {'greedy n':>8s} "
            f"{'saved ours':>10s} {'saved grdy':>10s} {'grdy s':>7s} {'ours s':>7s} {'speedup':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['workload']:14s} {r['requests']:8d} {r['tokens']:11d} {r['seconds']:6.2f} "
              f"{r['mtok_per_s']:7.1f} {r['mtok_per_s_lists']:6.1f} {r['memory_ratio']:5.2f} {r['groups']:6d} "
              f"{r['saving']:7.2%} {r['multilevel_saving']:7.2%} | {r['greedy_requests']:8d} "
              f"{r['ours_saved']:10d} {r['greedy_saved']:10d} {r['greedy_seconds']:7.2f} "
              f"{r['ours_seconds_same']:7.3f} {r['speedup']:6.0f}x")
    print("\nMtok/s: numpy int32 prompts; lists: Mtok/s for Python lists of ints (<= 10M tokens "
          "subsample); saving is with defaults (min_prefix_len=16); mem/x = peak extra bytes (tracemalloc) / "
          "int32 token bytes; greedy columns: reference-greedy BASELINE vs ours (min_prefix_len=1) "
          "on the same first `greedy n` prompts (a subsample where the input exceeds "
          f"{GREEDY_TOKEN_BUDGET:,} tokens).")
    print("\nsingle-level (exact, min_prefix_len=1) vs multi-level optimum saving:")
    for r in rows:
        if r["workload"] in ("W-tree", "W-paper", "W-chat"):
            print(f"  {r['workload']:8s} single {r['saving_mpl1']:.4%}  multi "
                  f"{r['multilevel_saving']:.4%}  single/multi {r['saving_mpl1'] / r['multilevel_saving']:.4f}")
    print("\nmin_prefix_len sweep (saving, shared groups):")
    for r in rows:
        if r["sweep_min_prefix_len"]:
            print(f"  {r['workload']:14s} " + "  ".join(
                f"{m}:{s:.3%}/{g}" for m, (s, g) in r["sweep_min_prefix_len"].items()))
    print("\nalign sweep (saving):")
    for r in rows:
        if r["sweep_align"]:
            print(f"  {r['workload']:14s} " + "  ".join(
                f"{a}:{s:.3%}" for a, s in r["sweep_align"].items()))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
