"""The bench's CPU dry run writes its reports; the roofline follows workloads.md's formula."""

import json
import time

from transformers import LlamaConfig

import pytest

from batchllm_hf.bench import _timed_runs, main
from batchllm_hf.bench_workloads import WORKLOADS, make_prompts, roofline


def test_bench_dry_run_writes_reports(tmp_path):
    assert main(["--tiny", "--workloads", "W-1B", "--skip-generate-batch", "--page-size", "16", "--warmup", "small",
                 "--repeat-under", "0.05",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    runs = data["workloads"][0]["runs"]
    assert set(runs) == {"batchllm", "batchllm (clustering off)", "batchllm (shared-prefix kernels off)",
                         "batchllm (decode-first off)", "batchllm (memory budget off)", "batchllm (cuda graphs off)",
                         "batchllm (step overlap off)", "batchllm (fused ops off)",
                         "batchllm (graphs up to 256 sequences)", "batchllm (TMA key loads everywhere)",
                         "batchllm (TMA key loads off)", "batchllm (packed decode items off)",
                         "batchllm (session 8 defaults: 8192 tokens, tail padding 2x)",
                         "batchllm (token budget 32768)", "batchllm (default again)",
                         "HF generate (sdpa, batch 64)"}
    assert list(runs)[-2:] == ["batchllm (default again)", "HF generate (sdpa, batch 64)"]  # after the variants
    ours = runs["batchllm"]
    assert ours["output_tokens"] == 3 * 4 * 4 and ours["physical_prompt_tokens"] < ours["logical_prompt_tokens"]
    assert ours["kv_timeline"] and runs["batchllm (clustering off)"]["groups"] == 0
    assert "| W-1B | batchllm |" in (tmp_path / "results.md").read_text()
    assert all(set(r["host_probe"]) == {"gc_collections", "gc_seconds", "triton_compiles", "pinned"}
               for r in runs.values())
    assert all(min(r["runs_seconds"]) <= r["seconds"] <= max(r["runs_seconds"])
               and len(r["runs_host_probe"]) == len(r["runs_seconds"]) for r in runs.values())


def test_short_runs_are_repeated_and_reported_as_their_median():
    durations = iter([0.05, 0.01, 0.03, 0.2, 0.02, 0.02])
    calls = []

    def fake_run():
        calls.append(1)
        time.sleep(next(durations))
        return 7, {"kv_timeline": [len(calls)]}

    seconds, tokens, peak, extra = _timed_runs("cpu", fake_run, repeat_under=0.15)
    # 0.05 + 0.01 + 0.03 < 0.15, then 0.2 ends it: four runs, median of (0.01, 0.03, 0.05, 0.2) = 0.04
    assert len(calls) == 4 and len(extra["runs_seconds"]) == 4
    assert seconds == pytest.approx(0.04, abs=0.012) and tokens == 7 and peak is None
    assert extra["kv_timeline"] == [4]  # the last run's details
    assert len(extra["runs_host_probe"]) == 4
    calls.clear()
    _timed_runs("cpu", lambda: (calls.append(1), (1, {}))[1], repeat_under=10.0, max_runs=3)
    assert len(calls) == 3

    def fails_second_time():  # a failing repeat keeps the runs before it
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return 5, {}

    calls.clear()
    seconds, tokens, _, extra = _timed_runs("cpu", fails_second_time, repeat_under=10.0)
    assert len(extra["runs_seconds"]) == 1 and tokens == 5 and "out of memory" in extra["repeat_error"]
    calls[:] = [1]  # its next call fails: a first run that fails is the run's error, as before
    with pytest.raises(RuntimeError):
        _timed_runs("cpu", fails_second_time, repeat_under=1.0)
    calls.clear()
    _timed_runs("cpu", lambda: (calls.append(1), (1, {}))[1], repeat_under=0.0)
    assert len(calls) == 1


def test_repeated_runs_report_their_highest_peak(monkeypatch):
    """On a GPU each run reports its peak memory: the repeated result keeps the highest (CPU runs have none)."""
    from batchllm_hf import bench

    runs = iter([(0.1, 9, 3.0), (0.3, 9, 5.5), (0.2, 9, 4.0)])

    def fake_timed(device, fn):
        seconds, tokens, peak = next(runs)
        return seconds, tokens, peak, {"host_probe": {}}

    monkeypatch.setattr(bench, "_timed", fake_timed)
    seconds, tokens, peak, extra = _timed_runs("cuda", None, repeat_under=0.6)
    assert extra["runs_seconds"] == [0.1, 0.3, 0.2] and seconds == 0.2 and peak == 5.5 and tokens == 9


def test_repeat_under_must_not_be_negative(tmp_path):
    with pytest.raises(SystemExit):
        main(["--tiny", "--workloads", "W-1B", "--repeat-under", "-1", "--out", str(tmp_path)])


def test_host_probe_counts_collections_and_compiles(monkeypatch):
    # The bench's per-run host probe: garbage collections inside the timed block, and Triton kernel variants
    # compiled for the package's kernels (the entries of each JITFunction's per-device kernel cache).
    import gc
    import sys
    import types

    pytest = __import__("pytest")
    jit = pytest.importorskip("triton.runtime.jit")
    from batchllm_hf.bench import _compiled_kernels, _HostProbe

    fake = types.ModuleType("batchllm_hf.kernels._probe_fake")
    kernel = object.__new__(jit.JITFunction)
    kernel.device_caches = {0: ({"variant a": 1, "variant b": 2}, {}, None, None, None)}
    fake.kernel = kernel
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    base = _compiled_kernels()
    assert base is not None and base >= 2
    with _HostProbe() as probe:
        gc.collect()
        gc.collect()
        kernel.device_caches[0][0]["variant c"] = 3  # a compile during the timed run
    assert probe.report["gc_collections"] >= 2 and probe.report["gc_seconds"] >= 0
    assert probe.report["triton_compiles"] == 1
    assert all(getattr(c, "__self__", None) is not probe for c in gc.callbacks)  # unregistered
    with pytest.raises(RuntimeError):  # an error in the timed run: the callback goes all the same
        with _HostProbe() as failed:
            raise RuntimeError("run failed")
    assert all(getattr(c, "__self__", None) is not failed for c in gc.callbacks)
    from batchllm_hf import bench  # pinned host blocks: counter deltas over the timed block, where CUDA keeps them
    counters = iter([{"new_blocks": 3, "freed_blocks": 0, "alloc_us": 10.0, "free_us": 0.0},
                     {"new_blocks": 5, "freed_blocks": 1, "alloc_us": 910.0, "free_us": 7.0}])
    monkeypatch.setattr(bench, "_pinned_stats", lambda: next(counters))
    with _HostProbe() as pinned:
        pass
    assert pinned.report["pinned"] == {"new_blocks": 2, "freed_blocks": 1, "alloc_us": 900.0, "free_us": 7.0}
    kernel.device_caches[1] = ("not a kernel cache",)  # a Triton whose caches look otherwise: unknown, not 0
    assert _compiled_kernels() is None


def test_workload_prompts_and_roofline():
    w = WORKLOADS["W-8B"]
    prompts, shared = make_prompts(w)
    assert len(prompts) == 256 and shared == [(2048, 32)] * 8
    assert all(2048 + 64 <= len(p) <= 2048 + 192 for p in prompts)
    assert prompts != sorted(prompts)  # shuffled

    class Fake:  # an 8B-shaped stand-in: parameter count only
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)

        def parameters(self):
            import torch
            yield torch.empty(8_030_261_248, dtype=torch.uint8, device="meta")

    bound = roofline(w, prompts, shared, Fake(), {"matmul_flops": 776e12, "copy_bytes_per_s": 4.2e12})
    assert abs(bound["lower_bound_s"] - 1.51) < 0.03  # workloads.md: W-8B lower bound 1.51 s
    tree, tree_shared = make_prompts(WORKLOADS["W-tree"])
    assert len(tree) == 512 and tree_shared[:2] == [(512, 128), (1024, 16)]
