"""BatchGenerator.map over a datasets.Dataset vs the engine called directly, same prompts, same engine
(issue: the front end costs under 5%). W-8B prompts (workloads.md) on a random-weight Llama-3-8B shape.

    python benchmarks/bench_frontend.py [--workload W-8B] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import GenerationConfig

from batchllm_hf import BatchGenerator
from batchllm_hf.bench_workloads import WORKLOADS, build_model, make_prompts, tiny_version


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="W-8B")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run with a tiny model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-excluded", action="store_true",
                        help="time the front end alone (CPU is enough): the engine replaced by canned outputs")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import datasets

    device = "cuda" if torch.cuda.is_available() else "cpu"
    workload = tiny_version(WORKLOADS[args.workload]) if args.tiny else WORKLOADS[args.workload]
    # With the engine excluded only the model's config is read: a tiny model with the workload's prompts.
    model = build_model("tiny" if args.engine_excluded else workload.model, device)
    prompts, _ = make_prompts(workload)
    config = GenerationConfig(max_new_tokens=workload.output, min_new_tokens=workload.output, do_sample=False)
    generator = BatchGenerator(model)
    ds = datasets.Dataset.from_dict({"prompt": prompts})
    datasets.disable_progress_bars()

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    if args.engine_excluded:
        return front_end_alone(generator, ds, config, len(prompts), workload.output)
    generator.engine.generate(prompts[:16], config)  # warm-up (kernels compiled, pool allocated)
    # Alternate the two; the engine's own time varies run to run, so the front end's cost is also taken
    # inside each map call (map wall time minus the engine time of that same call).
    times = {"engine": [], "map": [], "engine_inside_map": []}
    for _ in range(args.repeats):
        seconds, direct = timed(lambda: generator.engine.generate(prompts, config))
        times["engine"].append(seconds)
        seconds, mapped = timed(lambda: generator.map(ds, generation_config=config, token_ids_column="ids"))
        times["map"].append(seconds)
        times["engine_inside_map"].append(generator.engine.stats.seconds["total"])
    same = [list(o.token_ids) for o in direct] == mapped["ids"]
    best = {k: min(v) for k, v in times.items()}
    inside = min(m / e - 1 for m, e in zip(times["map"], times["engine_inside_map"]))
    result = {"workload": workload.name, "requests": len(prompts), "seconds": times, "best": best,
              "front_end_overhead_best_vs_best": best["map"] / best["engine"] - 1,
              "front_end_overhead_same_call": inside, "outputs_identical": same, "stats": str(generator.stats)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_frontend.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"| {workload.name} | engine.generate {best['engine']:.2f} s | BatchGenerator.map {best['map']:.2f} s | "
          f"front end {result['front_end_overhead_best_vs_best']:+.1%} (best vs best), {inside:+.1%} (same call) | "
          f"outputs identical: {same} |")


def front_end_alone(generator, ds, config, count, new_tokens) -> None:
    """The front end's own cost: the same map() with the engine replaced by canned outputs."""
    from batchllm_hf.engine import RequestOutput

    canned = RequestOutput(list(range(new_tokens)), "length")

    def engine(prompts, config, *, on_finish=None, **kwargs):
        for index in range(len(prompts)):
            on_finish(index, canned)
        return [canned] * len(prompts)

    generator.engine.generate = engine
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        generator.map(ds, generation_config=config, token_ids_column="ids")
        seconds.append(time.perf_counter() - start)
    print(f"front end alone ({count} requests): best {min(seconds):.3f} s of {[round(s, 3) for s in seconds]}")


if __name__ == "__main__":
    main()
