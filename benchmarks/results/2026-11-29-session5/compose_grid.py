"""How grid_final_rule_composed.json was made (run from the repo root): each decode row of the two grid runs
whose work plan (planned on the host for 132 SMs) equals the final planner's; prefill rows are rule-independent."""
import json, sys, numpy as np, torch
sys.path.insert(0, "benchmarks")
import bench_kernels as bk
import batchllm_hf.kernels.attention_plan as ap
D = "benchmarks/results/2026-11-29-session5/"
old = json.load(open(D + "grid_rule3_bench_kernels.json")); new = json.load(open(D + "grid_floor256_bench_kernels.json"))
def plan_items(row, floor, filled_split):
    G, B, P, S, r = row["G"], row["B"], row["P"], row["S"], row["gqa"]
    n = G * B
    ap._MIN_CHUNK_FILLED = floor
    p = ap.plan_attention(np.arange(n + 1), np.full(n, S), np.repeat(np.arange(G), B), np.full(G, P), 8 * r, 8, 128,
                          torch.device("cpu"), num_sms=132)
    ap._MIN_CHUNK_FILLED = 2048
    it = p.items[: int(p.num_items)].numpy()
    return it.tobytes()
out = []
for a, b in zip(old["rows"], new["rows"]):
    assert (a["kind"], a.get("G"), a.get("B"), a.get("P"), a.get("S"), a.get("gqa")) == (b["kind"], b.get("G"), b.get("B"), b.get("P"), b.get("S"), b.get("gqa"))
    if a["kind"] != "decode":
        out.append(dict(a, source="session 3 rule run (prefill: rule-independent)")); continue
    final = plan_items(a, 2048, True)
    if final == plan_items(a, 1 << 30, False):
        out.append(dict(a, source="rule3"))
    elif final == plan_items(a, 256, True):
        out.append(dict(b, source="floor256"))
    else:
        out.append(dict(a, source="UNMEASURED", time_us=float("nan")))
from collections import Counter
print(Counter(r["source"] for r in out))
for r in out:
    if r["kind"] == "decode" and r["source"] != "rule3":
        ra = [x for x in old["rows"] if x.get("G")==r["G"] and x.get("B")==r["B"] and x.get("P")==r["P"] and x.get("S")==r["S"] and x.get("gqa")==r["gqa"]][0]
        print(r["source"], r["G"], r["B"], r["P"], r["S"], r["gqa"], "final", round(r["time_us"],1), "rule3", round(ra["time_us"],1))
comp = dict(ceilings=old["ceilings"], rows=[r for r in out if r["source"] != "UNMEASURED"],
            note="composed: each decode row from the run whose plan equals the final planner's (session 3 rule run or floor-256 run)")
for r in comp["rows"]:
    if r["kind"] == "decode": r["frac_roofline"] = bk.decode_roofline_us(r, comp["ceilings"]) / r["time_us"]
json.dump(comp, open(D + "grid_final_rule_composed.json", "w"), indent=1)
bk.print_summary(comp)
