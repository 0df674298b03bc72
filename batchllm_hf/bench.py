"""`batchllm-hf bench`: the workloads of shared/bench/workloads.md with engines side by side in one process.

    batchllm-hf bench --workloads W-1B,W-8B --out bench_results [--skip-baselines] [--skip-generate-batch]

Per workload: plain HF generate (sdpa, left-padded batches of 64), HF generate_batch (continuous batching,
block sharing on and off), this engine, and its ablations (clustering off, shared-prefix kernels off,
decode-first off, memory budget off = admission capped at 64 running requests, CUDA graphs off, step overlap
off; each warmed up with a full untimed run first). Each run: wall time,
output and total tokens/s, ratio to the roofline lower bound (ceilings measured at the start of the run),
peak GPU memory; a run shorter than --repeat-under seconds (default 1) runs again until its runs add up to
that (at most 9), and its time is their median. Writes results.json, results.md, results.png (if matplotlib imports) and
kv_timeline.png (the engine's KV pages over time, prefix vs own). Greedy, eos ignored
(min_new_tokens = max_new_tokens) so every engine does the same work.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch
from transformers import GenerationConfig

from .bench_workloads import WORKLOADS, build_model, make_prompts, measure_ceilings, roofline, tiny_version
from .engine import Engine, EngineConfig

ABLATIONS = {
    "batchllm": {},
    "batchllm (clustering off)": {"cluster": False},
    "batchllm (shared-prefix kernels off)": {"use_shared_prefix": False},
    "batchllm (decode-first off)": {"decode_first": False},
    "batchllm (memory budget off)": {"max_num_seqs": 64},
    "batchllm (cuda graphs off)": {"cuda_graphs": False},
    "batchllm (step overlap off)": {"overlap_steps": False},
    "batchllm (fused ops off)": {"fused_ops": False},
    # not an ablation: session 3's default (decode steps of over 256 sequences, as in W-paper, ran eagerly)
    "batchllm (graphs up to 256 sequences)": {"max_graph_batch": 256},
    # not ablations: TMA key loads in the attention kernel in every step (the default: prefill steps and, since
    # session 13, CUDA-graph decode steps, where pages hold whole 64-key blocks), or never (decode steps as in
    # session 12: pointer loads, 128-row tiles for large groups, 2 stages; prefill steps without TMA too)
    "batchllm (TMA key loads everywhere)": {"attention_tma": True},
    "batchllm (TMA key loads off)": {"attention_tma": False},
    # session 14: decode tokens whose own KV is <= 128 keys (256 with TMA key loads, session 15) read it in
    # packed items (several sequences per program, one pipelined loop) unless this is off
    "batchllm (packed decode items off)": {"attention_pack": False},
    # not ablations: session 8's defaults (steps of 8192 tokens; the shrinking tail padded into a captured
    # graph only up to 2x its batch, so W-paper's last 12 steps ran eagerly), and a larger token budget
    "batchllm (session 8 defaults: 8192 tokens, tail padding 2x)": {"max_batch_tokens": 8192,
                                                                    "graph_tail_padding": 2.0},
    "batchllm (token budget 32768)": {"max_batch_tokens": 32768},
    # not an ablation: the default again, after the variants before it (the first engine run of a workload had
    # slower host phases than a variant run after it in session 7; this shows whether order alone does that)
    "batchllm (default again)": {},
}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _generation_config(new_tokens: int, **extra) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0, **extra)


def run_hf_generate(model, prompts, new_tokens, batch_size=64):
    device = model.device
    out_tokens = 0
    for lo in range(0, len(prompts), batch_size):
        rows = prompts[lo:lo + batch_size]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=_generation_config(new_tokens))
        out_tokens += (out.shape[1] - width) * len(rows)
    return out_tokens, {}


def run_generate_batch(model, prompts, new_tokens, sharing: bool):
    from transformers import ContinuousBatchingConfig

    config = ContinuousBatchingConfig(allow_block_sharing=sharing)
    # no inference_mode here: generate_batch updates its static tensors from a worker thread, outside it
    result = model.generate_batch(prompts, generation_config=_generation_config(new_tokens),
                                  continuous_batching_config=config, progress_bar=False)
    return sum(len(r.generated_tokens) for r in result.values()), {}


def run_engine(model, prompts, new_tokens, engine_config: EngineConfig):
    engine = Engine(model, engine_config)
    outputs = engine.generate(prompts, _generation_config(new_tokens))
    s = engine.stats
    graphs = engine.decode_graphs
    extra = {"cuda_graphs": None if graphs is None else {"enabled": graphs.enabled, "sizes": sorted(graphs.graphs),
                                                     "error": graphs.error, "setup_s": graphs.setup_seconds,
                                                     "captured_ahead": graphs.ahead, "plan_misses": graphs.plan_misses},
             "steps": s.steps, "groups": s.groups, "preemptions": s.preemptions, "num_pages": s.num_pages,
             "logical_prompt_tokens": s.logical_prompt_tokens, "physical_prompt_tokens": s.physical_prompt_tokens,
             "phase_seconds": dict(s.seconds), "kv_timeline": _thin(s.kv_timeline, 400),
             "page_size": engine_config.page_size}
    del engine
    return sum(len(o.token_ids) for o in outputs), extra


def _thin(points, limit):
    step = max(1, len(points) // limit)
    return [list(p) for p in points[::step]]


def _compiled_kernels() -> int | None:
    """Triton kernel variants compiled so far in this process for the package's kernels (None: this Triton
    keeps its cache elsewhere). A timed run that compiles was not warmed up for what it ran."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    total, found = 0, False
    for name, module in list(sys.modules.items()):
        if not name.startswith("batchllm_hf.kernels") or module is None:
            continue
        for obj in list(vars(module).values()):
            caches = getattr(obj, "device_caches", None) if isinstance(obj, JITFunction) else None
            if not isinstance(caches, dict):
                continue
            entries = [c[0] for c in caches.values() if isinstance(c, tuple) and c and isinstance(c[0], dict)]
            if len(entries) < len(caches):  # a cache laid out otherwise: the count would be wrong
                return None
            found = True
            total += sum(map(len, entries))
    return total if found else None


def _pinned_stats() -> dict | None:
    """The pinned host allocator's counters (CUDA; None elsewhere or where torch does not keep them)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None
    return {"new_blocks": stats.get("num_host_alloc", 0), "freed_blocks": stats.get("num_host_free", 0),
            "alloc_us": stats.get("host_alloc_time.total", 0), "free_us": stats.get("host_free_time.total", 0)}


class _HostProbe:
    """What a timed run spent on the host besides its own work: Python garbage collections (count and
    seconds), Triton compilations, and pinned host blocks newly allocated (or freed) by CUDA with the time
    those calls took (every host-to-device copy goes through `pin_memory()`). Sessions 7-8: the first timed
    engine run of a workload had slower host phases than the same configuration run later, after a full
    warm-up each (W-paper's eager tail steps: 40-53 ms against 25), while its graph and prefill steps took
    the same time; this records three suspects."""

    def __enter__(self):
        self.collections, self.gc_seconds, self._start = 0, 0.0, None
        self.compiled = _compiled_kernels()
        self.pinned = _pinned_stats()
        gc.callbacks.append(self._on_gc)
        return self

    def _on_gc(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.collections += 1
            self.gc_seconds += time.perf_counter() - self._start
            self._start = None

    def __exit__(self, *exc):
        gc.callbacks.remove(self._on_gc)
        after, pinned = _compiled_kernels(), _pinned_stats()
        self.report = {"gc_collections": self.collections, "gc_seconds": round(self.gc_seconds, 4),
                       "triton_compiles": None if after is None or self.compiled is None else after - self.compiled,
                       "pinned": None if pinned is None or self.pinned is None else
                       {key: pinned[key] - self.pinned[key] for key in pinned}}
        return False


def _timed(device, fn):
    _free(device)
    _sync(device)
    with _HostProbe() as probe:
        start = time.perf_counter()
        out_tokens, extra = fn()
        _sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return seconds, out_tokens, peak, {**extra, "host_probe": probe.report}


def _timed_runs(device, fn, repeat_under: float, max_runs: int = 9):
    """`_timed`, run again while the runs so far add up to less than `repeat_under` seconds (at most
    `max_runs`): a run of a quarter second moves by tens of percent between runs. Returns the median
    seconds, the last run's output tokens, the highest peak, and the last run's extra with every run's time
    and host probe. A repeat that fails keeps the runs before it (its error under "repeat_error")."""
    times, peaks, probes = [], [], []
    while True:
        try:
            seconds, out_tokens, peak, extra = _timed(device, fn)
        except Exception as error:
            if not times:
                raise
            last["repeat_error"] = f"{type(error).__name__}: {error}"[:500]
            break
        last = extra
        times.append(seconds)
        peaks.append(peak)
        probes.append(extra["host_probe"])
        if sum(times) >= repeat_under or len(times) >= max_runs:
            break
    peak = None if peaks[0] is None else max(peaks)
    return statistics.median(times), out_tokens, peak, {**last, "runs_seconds": times, "runs_host_probe": probes}


def bench_workload(w, args, ceilings, device, log, all_results):
    prompts, shared = make_prompts(w)
    model = build_model(w.model, device)
    bound = roofline(w, prompts, shared, model, ceilings)
    prompt_tokens = sum(map(len, prompts))
    base = EngineConfig(page_size=args.page_size, max_batch_tokens=args.max_batch_tokens,
                        attention_backend=args.attention_backend)
    # warm-up (not timed): the Triton kernels compile one variant per tile configuration a step needs, so a
    # short warm-up leaves compilation inside the first timed run; --warmup full runs the whole workload once.
    # A failing default backend falls back to sdpa.
    try:
        if args.warmup == "full":
            run_engine(model, prompts, w.output, base)
        else:
            run_engine(model, prompts[:16], 4, base)
    except Exception as error:
        if args.attention_backend == "sdpa":
            raise
        log(f"{w.name}: engine warm-up failed with backend {base.attention_backend} ({error!r}); using 'sdpa'")
        args.attention_backend = "sdpa"
        base = EngineConfig(**{**base.__dict__, "attention_backend": "sdpa"})
    runs = {}  # the engine first: its numbers survive a time limit hit during the slow baselines
    warmups = {}
    for name, change in ABLATIONS.items():
        if name != "batchllm" and (args.skip_ablations or (args.ablations and not any(
                part.strip() in name for part in args.ablations.split(",") if part.strip()))):
            continue
        config = EngineConfig(**{**base.__dict__, **change})
        runs[name] = (lambda c: lambda: run_engine(model, prompts, w.output, c))(config)
        if name != "batchllm" and args.warmup == "full":
            # each ablation compiles its own kernel variants (other tile shapes, eager decode steps): warm it
            # up too, or its timed run would carry seconds of compilation (seen on the H200)
            warmups[name] = runs[name]
    if not args.skip_baselines:
        runs["HF generate (sdpa, batch 64)"] = lambda: run_hf_generate(model, prompts, w.output)
        if not args.skip_generate_batch:
            runs["HF generate_batch (sharing on)"] = lambda: run_generate_batch(model, prompts, w.output, True)
            runs["HF generate_batch (sharing off)"] = lambda: run_generate_batch(model, prompts, w.output, False)
    results = {"workload": w.name, "model": w.model, "attention_backend": args.attention_backend or "default",
               "requests": len(prompts), "prompt_tokens": prompt_tokens,
               "roofline": bound, "runs": {}}
    all_results.append(results)
    for name, fn in runs.items():
        try:
            if name in warmups:
                warmups[name]()
            seconds, out_tokens, peak, extra = _timed_runs(device, fn, args.repeat_under)
        except Exception as error:  # a failing baseline must not lose the other results
            results["runs"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            log(f"{w.name} {name}: FAILED {error}")
            continue
        results["runs"][name] = {
            "seconds": seconds, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / seconds,
            "total_tokens_per_s": (out_tokens + prompt_tokens) / seconds,
            "x_lower_bound": seconds / bound["lower_bound_s"], "peak_gpu_gib": peak, **extra}
        write_reports(all_results, ceilings, args.out)  # after each run: partial results survive a time limit
        runs_note = f" (median of {len(extra['runs_seconds'])} runs)" if len(extra["runs_seconds"]) > 1 else ""
        log(f"{w.name} {name}: {seconds:.2f} s{runs_note}, {out_tokens / seconds:,.0f} out tok/s, "
            f"{seconds / bound['lower_bound_s']:.1f}x bound, peak {peak} GiB, host probe {extra['host_probe']}")
    del model
    _free(device)


def write_reports(all_results, ceilings, out_dir):
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"ceilings": ceilings, "workloads": all_results}, f, indent=1)
    lines = [f"Ceilings: matmul {ceilings['matmul_flops'] / 1e12:.0f} TFLOP/s, copy "
             f"{ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s", "",
             "| workload | engine | seconds | out tok/s | total tok/s | x lower bound | speedup vs HF generate | "
             "peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for res in all_results:
        ref = res["runs"].get("HF generate (sdpa, batch 64)", {}).get("seconds")
        lines.append(f"| {res['workload']} | roofline lower bound | {res['roofline']['lower_bound_s']:.3f} | | | 1.0 | | |")
        for name, r in res["runs"].items():
            if "error" in r:
                lines.append(f"| {res['workload']} | {name} | failed: {r['error'][:80]} | | | | | |")
                continue
            speedup = f"{ref / r['seconds']:.1f}x" if ref else ""
            peak = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else ""
            lines.append(f"| {res['workload']} | {name} | {r['seconds']:.2f} | {r['output_tokens_per_s']:,.0f} | "
                         f"{r['total_tokens_per_s']:,.0f} | {r['x_lower_bound']:.1f} | {speedup} | {peak} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _charts(all_results, out_dir)
    return "\n".join(lines)


def _charts(all_results, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4), squeeze=False)
    for ax, res in zip(axes[0], all_results):
        names = [n for n, r in res["runs"].items() if "seconds" in r]
        ax.barh(names, [res["runs"][n]["output_tokens_per_s"] for n in names])
        ax.set_title(f"{res['workload']} (output tokens/s)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"))
    fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 4), squeeze=False)
    for ax, res in zip(axes[0], all_results):
        timeline = res["runs"].get("batchllm", {}).get("kv_timeline")
        if timeline:
            t = [p[0] for p in timeline]
            ax.stackplot(t, [p[1] for p in timeline], [p[2] for p in timeline], labels=["prefix pages", "own pages"])
            ax.set_title(f"{res['workload']}: KV pages in use")
            ax.set_xlabel("seconds")
            ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kv_timeline.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="batchllm-hf bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W-1B,W-8B", help=f"comma-separated, from {sorted(WORKLOADS)}")
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--skip-baselines", action="store_true", help="skip HF generate and generate_batch")
    parser.add_argument("--skip-generate-batch", action="store_true", help="skip only HF generate_batch")
    parser.add_argument("--skip-ablations", action="store_true")
    parser.add_argument("--ablations", default="", help="comma-separated parts of ablation names to run (default: all)")
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=EngineConfig.max_batch_tokens)
    parser.add_argument("--attention-backend", choices=["triton", "sdpa", "reference"], default=None)
    parser.add_argument("--warmup", choices=["full", "small"], default="full",
                        help="untimed engine run before timing: the whole workload (default) or 16 prompts")
    parser.add_argument("--repeat-under", type=float, default=1.0,
                        help="seconds: a shorter run is repeated until its runs add up to this (at most 9) and "
                             "reported as their median; 0 runs everything once")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: tiny model and workloads")
    args = parser.parse_args(argv)
    if args.repeat_under < 0:
        parser.error(f"--repeat-under must be >= 0, got {args.repeat_under}")
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.out, exist_ok=True)

    def log(message):
        print(message, flush=True)
        with open(os.path.join(args.out, "log.txt"), "a") as f:
            f.write(message + "\n")

    ceilings = measure_ceilings(device)
    log(f"device {device}; ceilings {ceilings}")
    all_results = []
    for name in names:
        w = tiny_version(WORKLOADS[name]) if args.tiny else WORKLOADS[name]
        bench_workload(w, args, ceilings, device, log, all_results)
    print(write_reports(all_results, ceilings, args.out))
    return 0
