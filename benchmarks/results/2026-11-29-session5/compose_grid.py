"""How grid_final_rule_composed.json was made (run from the repo root): each decode row is taken from
whichever of the two grid runs made exactly the final planner's work plan (planned on the host for 132
SMs); prefill rows do not depend on the split rule and come from the first run."""

import json
import sys

import numpy as np
import torch

sys.path.insert(0, "benchmarks")
import bench_kernels as bk  # noqa: E402
import batchllm_hf.kernels.attention_plan as ap  # noqa: E402

D = "benchmarks/results/2026-11-29-session5/"
KEYS = ("kind", "G", "B", "P", "S", "gqa")


def plan_items(row, min_chunk_filled):
    """The work items the planner makes for a grid row with this floor (1 << 30: session 4's rule)."""
    groups, members, prefix, own, ratio = (row[k] for k in ("G", "B", "P", "S", "gqa"))
    n = groups * members
    ap._MIN_CHUNK_FILLED = min_chunk_filled
    try:
        plan = ap.plan_attention(np.arange(n + 1), np.full(n, own), np.repeat(np.arange(groups), members),
                                 np.full(groups, prefix), 8 * ratio, 8, 128, torch.device("cpu"), num_sms=132)
    finally:
        ap._MIN_CHUNK_FILLED = 2048
    return plan.items[: int(plan.num_items)].numpy().tobytes()


def main():
    old = json.load(open(D + "grid_rule3_bench_kernels.json"))
    floor256 = json.load(open(D + "grid_floor256_bench_kernels.json"))
    rows, sources = [], []
    for a, b in zip(old["rows"], floor256["rows"]):
        assert tuple(a.get(k) for k in KEYS) == tuple(b.get(k) for k in KEYS)
        if a["kind"] != "decode":
            rows.append(a)
            sources.append("prefill")
            continue
        final = plan_items(a, 2048)
        if final == plan_items(a, 1 << 30):
            rows.append(a)
            sources.append("rule3")
        elif final == plan_items(a, 256):
            rows.append(b)
            sources.append("floor256")
        else:
            sources.append("unmeasured")
    print({s: sources.count(s) for s in set(sources)})
    report = dict(ceilings=old["ceilings"], rows=rows, note="composed by compose_grid.py")
    for row in rows:
        if row["kind"] == "decode":
            row["frac_roofline"] = bk.decode_roofline_us(row, report["ceilings"]) / row["time_us"]
    json.dump(report, open(D + "grid_final_rule_composed.json", "w"), indent=1)
    bk.print_summary(report)


if __name__ == "__main__":
    main()
