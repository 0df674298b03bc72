"""Where the engine's time goes on one workload (GPU diagnostics, not a test, not the benchmark of record).

    python benchmarks/profile_engine.py --workloads W-1B,W-8B [--out DIR] [--steps]
    python benchmarks/profile_engine.py --workloads W-paper --kernels [--decode-at 20,80] [--mixed-at 2,30]

Per workload: a warm-up run, then (1) a timed run split into engine construction and the step loop, with
every step synchronized and classed as decode-only or mixed, and (2) a cProfile of one more run (top
functions by own time written to DIR/profile_<workload>.txt). With --kernels instead: GPU time per kernel
and per category (matmul, our attention, our fused glue kernels, other) of 5 eager decode steps and 2
mixed (prefill) steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from batchllm_hf.bench import _free, _generation_config
from batchllm_hf.bench_workloads import WORKLOADS, build_model, make_prompts
from batchllm_hf.engine import Engine, EngineConfig
from batchllm_hf.engine import runner as runner_module


def timed_steps(model, prompts, new_tokens, config):
    """Runs the engine with a synchronize after every step; returns (construction s, loop s, per-kind stats)."""
    original = runner_module.ModelRunner.run
    steps = {"decode": [], "mixed": []}

    def run(self, chunks, *args):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = original(self, chunks, *args)
        torch.cuda.synchronize()
        kind = "decode" if all(c.length == 1 and c.sample for c in chunks) else "mixed"
        steps[kind].append((time.perf_counter() - t, len(chunks), sum(c.length for c in chunks)))
        return out

    runner_module.ModelRunner.run = run
    try:
        t0 = time.perf_counter()
        engine = Engine(model, config)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        engine.generate(prompts, _generation_config(new_tokens))
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    finally:
        runner_module.ModelRunner.run = original
    return t1 - t0, t2 - t1, steps, dict(engine.stats.seconds)


def _category(name: str) -> str:
    lowered = name.lower()
    if "_partial_attention" in name or "_merge_kernel" in name:
        return "attention (ours)"
    if any(key in lowered for key in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")):
        return "matmul"
    if name.startswith(("_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel")):
        return "fused norm / rotary / act (ours)"
    return "other (elementwise, copies)"


def gap_profile(model, prompts, new_tokens, config):
    """One unsynchronized run (as the benchmark runs it) with CUDA events around every step: per kind, the
    device time from the moment it reached the step to the step's end (includes any starving inside the
    step), the device time between steps (sampling kernels plus idle waiting for the host), and the host
    time spent inside the runner."""
    original = runner_module.ModelRunner.run
    marks = []

    def run(self, chunks, *args):
        kind = "decode" if all(c.length == 1 and c.sample for c in chunks) else "mixed"
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        t = time.perf_counter()
        out = original(self, chunks, *args)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        marks.append((kind, len(chunks), begin, end, time.perf_counter() - t))
        return out

    runner_module.ModelRunner.run = run
    try:
        engine = Engine(model, config)
        t0 = time.perf_counter()
        engine.generate(prompts, _generation_config(new_tokens))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        runner_module.ModelRunner.run = original
    rows = [f"  unsynchronized run {wall:.3f} s (max_graph_batch={config.max_graph_batch}); "
            f"phases {({k: round(v, 3) for k, v in engine.stats.seconds.items()})}"]
    for kind in ("mixed", "decode"):
        mine = [i for i, m in enumerate(marks) if m[0] == kind]
        if not mine:
            continue
        span = sum(marks[i][2].elapsed_time(marks[i][3]) for i in mine) / 1e3
        gap = sum(marks[i][3].elapsed_time(marks[i + 1][2]) for i in mine if i + 1 < len(marks)) / 1e3
        host = sum(marks[i][4] for i in mine)
        per = [f"{marks[i][2].elapsed_time(marks[i][3]):.1f}+{marks[i][3].elapsed_time(marks[i + 1][2]):.1f}"
               for i in mine[::10] if i + 1 < len(marks)]
        rows.append(f"  {kind}: {len(mine)} steps; device in steps {span:.3f} s, device after steps (sampling, "
                    f"idle) {gap:.3f} s; host in runner {host:.3f} s; every 10th step (ms in+after): {' '.join(per)}")
    return rows


def decode_host_profile(model, prompts, new_tokens, config, out_path):
    """cProfile of the host during decode-only steps (the runner's run() only) of an unsynchronized run:
    top functions by own time and by cumulative time, written to out_path; returns a short summary."""
    original = runner_module.ModelRunner.run
    profiler = cProfile.Profile()
    state = {"steps": 0, "seconds": 0.0}

    def run(self, chunks, *args):
        if not all(c.length == 1 and c.sample for c in chunks):
            return original(self, chunks, *args)
        t = time.perf_counter()
        profiler.enable()
        try:
            return original(self, chunks, *args)
        finally:
            profiler.disable()
            state["steps"] += 1
            state["seconds"] += time.perf_counter() - t

    runner_module.ModelRunner.run = run
    try:
        Engine(model, config).generate(prompts, _generation_config(new_tokens))
        torch.cuda.synchronize()
    finally:
        runner_module.ModelRunner.run = original
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    with open(out_path, "w") as f:
        f.write(text.getvalue())
    return [f"  host profile of {state['steps']} decode steps (max_graph_batch={config.max_graph_batch}): "
            f"{1e3 * state['seconds'] / max(1, state['steps']):.1f} ms per step in run() (profiled); {out_path}"]


def sync_points(model, prompts, new_tokens, config):
    """Runs once under torch.cuda.set_sync_debug_mode("warn") and lists each distinct stack that synchronized
    with the device (the engine's one intended wait per step, in `complete`, included)."""
    import traceback
    import warnings

    stacks = {}
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=9)[:-1])
        key = (str(message)[:80], stack)
        stacks[key] = stacks.get(key, 0) + 1

    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            engine = Engine(model, config)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                engine.generate(prompts, _generation_config(new_tokens))
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = shown
    rows = [f"  {len(stacks)} distinct synchronizing stacks (max_graph_batch={config.max_graph_batch}):"]
    for (message, stack), n in sorted(stacks.items(), key=lambda kv: -kv[1]):
        rows.append(f"  {n} x {message}\n{stack}")
    return rows


def kernel_profile(model, prompts, new_tokens, config, first=20, count=5, kind="decode", graphs=False):
    """GPU kernel time by kernel name over steps first..first+count of one kind ("decode" or "mixed"),
    eager so that every launch is seen (graphs=True: as configured, kernels inside graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    original = runner_module.ModelRunner.run
    state = {"seen": 0, "prof": None, "tokens": 0}

    def run(self, chunks, *args):
        decode = all(c.length == 1 and c.sample for c in chunks)
        mine = decode == (kind == "decode")
        if mine:
            state["seen"] += 1
            if state["seen"] == first:
                torch.cuda.synchronize()
                state["prof"] = profile(activities=[ProfilerActivity.CUDA])
                state["prof"].start()
            if first <= state["seen"] < first + count:
                state["tokens"] += sum(c.length for c in chunks)
        out = original(self, chunks, *args)
        if mine and state["seen"] == first + count - 1:
            torch.cuda.synchronize()
            state["prof"].stop()
            state["stopped"] = True
        return out

    runner_module.ModelRunner.run = run
    try:
        engine = Engine(model, EngineConfig(**{**config.__dict__, "cuda_graphs": graphs and config.cuda_graphs}))
        engine.generate(prompts, _generation_config(new_tokens))
    finally:
        runner_module.ModelRunner.run = original
        if state["prof"] is not None and not state.get("stopped"):
            torch.cuda.synchronize()
            state["prof"].stop()  # the run had fewer steps than the window: profile what it saw
    if state["prof"] is None:
        return [f"  no {kind} step {first} in this run ({state['seen']} {kind} steps): nothing profiled"]
    count = min(count, state["seen"] - first + 1)
    totals = {}
    for event in state["prof"].events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:90]
            n, t = totals.get(name, (0, 0.0))
            totals[name] = (n + 1, t + event.device_time)
    total = sum(t for _, t in totals.values())
    rows = [f"  GPU time per {kind} step: {total / count / 1e3:.2f} ms ({state['tokens'] / count:.0f} tokens per step)"]
    categories = {}
    for name, (_, t) in totals.items():
        categories[_category(name)] = categories.get(_category(name), 0.0) + t
    rows += [f"    {t / count / 1e3:7.3f} ms  {100 * t / total:4.1f}%  [{cat}]" for cat, t in
             sorted(categories.items(), key=lambda kv: -kv[1])]
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:14]:
        rows.append(f"    {t / count / 1e3:7.3f} ms  {n // count:5d} launches  {name}")
    return rows


def sized_configs(model, prompts, new_tokens, config, sizes: str):
    """(size, config) per max_graph_batch in the comma-separated `sizes`; a size other than the default
    (which main's warm-up ran) gets its own untimed run first, to compile the kernels it adds (graph
    captures happen again in the measured run, as in the benchmark: each Engine has its own)."""
    for size in map(int, sizes.split(",")):
        sized = EngineConfig(**{**config.__dict__, "max_graph_batch": size})
        if size != EngineConfig().max_graph_batch:
            Engine(model, sized).generate(prompts, _generation_config(new_tokens))
            _free("cuda")
        yield size, sized


def kernels_mode(name, model, prompts, new_tokens, config, args, lines):
    lines.append(f"{name}:")
    for first in map(int, args.decode_at.split(",")):
        lines.append(f"  decode steps {first}..{first + 4}:")
        lines += kernel_profile(model, prompts, new_tokens, config, first=first)
    for first in map(int, args.mixed_at.split(",")):
        lines.append(f"  mixed steps {first}..{first + 1}:")
        lines += kernel_profile(model, prompts, new_tokens, config, first=first, count=2, kind="mixed")
    print(*lines, sep="\n", flush=True)


def host_mode(name, model, prompts, new_tokens, config, args, lines):
    for size, sized in sized_configs(model, prompts, new_tokens, config, args.graph_batch):
        lines += decode_host_profile(model, prompts, new_tokens, sized, f"{args.out}/host_{name}_{size}.txt")
        _free("cuda")
    print(*lines, sep="\n", flush=True)


def gaps_mode(name, model, prompts, new_tokens, config, args, lines):
    lines.append(f"{name}:")
    for size, sized in sized_configs(model, prompts, new_tokens, config, args.graph_batch):
        lines += gap_profile(model, prompts, new_tokens, sized)
        print(*lines[-3:], sep="\n", flush=True)
        _free("cuda")
        lines += kernel_profile(model, prompts, new_tokens, sized, first=10, graphs=True)
        print(*lines[-20:], sep="\n", flush=True)
        _free("cuda")
    lines += sync_points(model, prompts, new_tokens, config)
    print(*lines, sep="\n", flush=True)


def steps_mode(name, model, prompts, new_tokens, config, args, lines):
    for size, sized in sized_configs(model, prompts, new_tokens, config, args.graph_batch):
        build, loop, steps, phases = timed_steps(model, prompts, new_tokens, sized)
        lines.append(f"{name} max_graph_batch={size}: construction {build:.3f} s, loop {loop:.3f} s")
        for kind, items in steps.items():
            total = sum(s for s, _, _ in items)
            lines.append(f"  {kind}: {len(items)} steps, {total:.3f} s; ms/seqs/tokens per step: " +
                         " ".join(f"{1e3 * s:.1f}/{n}/{k}" for s, n, k in items))
        print(*lines[-3:], sep="\n", flush=True)
        _free("cuda")


# --kernels / --host / --gaps / --steps, in this precedence; none: the default timing and cProfile
MODES = {"kernels": kernels_mode, "host": host_mode, "gaps": gaps_mode, "steps": steps_mode}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workloads", default="W-1B")
    parser.add_argument("--out", default="profile_out")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=EngineConfig.max_batch_tokens)
    parser.add_argument("--kernels", action="store_true", help="only the per-kernel GPU time of decode and mixed steps")
    parser.add_argument("--decode-at", default="20", help="--kernels: first decode step of each 5-step window")
    parser.add_argument("--mixed-at", default="2", help="--kernels: first mixed step of each 2-step window")
    parser.add_argument("--steps", action="store_true",
                        help="only the synchronized per-step wall times (every decode step listed)")
    parser.add_argument("--graph-batch", default="1024", help="--steps / --gaps: max_graph_batch values to compare")
    parser.add_argument("--host", action="store_true", help="only a cProfile of the host in decode steps")
    parser.add_argument("--gaps", action="store_true", help="only the unsynchronized run's device busy / idle time "
                        "per step kind, a sync-debug run, and a kernel profile of graphed decode steps")
    args = parser.parse_args()
    import os
    os.makedirs(args.out, exist_ok=True)
    lines = []
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        prompts, _ = make_prompts(w)
        model = build_model(w.model, "cuda")
        config = EngineConfig(page_size=args.page_size, max_batch_tokens=args.max_batch_tokens)
        engine = Engine(model, config)
        engine.generate(prompts, _generation_config(w.output))  # warm-up: compile kernels
        del engine
        _free("cuda")
        mode = next((m for m in MODES if getattr(args, m)), None)
        if mode is not None:
            MODES[mode](name, model, prompts, w.output, config, args, lines)
            del model
            _free("cuda")
            continue
        t = time.perf_counter()
        engine = Engine(model, config)
        engine.generate(prompts, _generation_config(w.output))
        torch.cuda.synchronize()
        plain = time.perf_counter() - t
        print(f"{name}: plain run {plain:.3f} s, phases {({k: round(v, 3) for k, v in engine.stats.seconds.items()})}",
              flush=True)
        del engine
        _free("cuda")
        build, loop, steps, phases = timed_steps(model, prompts, w.output, config)
        lines.append(f"{name}: plain run {plain:.3f} s; synced run: construction {build:.3f} s, loop {loop:.3f} s; "
                     f"phases {({k: round(v, 3) for k, v in phases.items()})}")
        for kind, items in steps.items():
            if items:
                total = sum(s for s, _, _ in items)
                lines.append(f"  {kind}: {len(items)} steps, {total:.3f} s, mean {1e3 * total / len(items):.2f} ms, "
                             f"first {[round(1e3 * s, 1) for s, _, _ in items[:4]]} ms, "
                             f"seqs {[n for _, n, _ in items[:4]]}, tokens {[k for _, _, k in items[:4]]}")
        _free("cuda")
        profiler = cProfile.Profile()
        engine = Engine(model, config)
        profiler.enable()
        engine.generate(prompts, _generation_config(w.output))
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        with open(f"{args.out}/profile_{name}.txt", "w") as f:
            f.write(text.getvalue())
        del engine, model
        _free("cuda")
        print(*lines[-3:], sep="\n", flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
