"""The engine against plain HF generate (sdpa), token for token, per prompt (CPU, fp32, greedy)."""

import contextlib
import random

import pytest
import torch

from batchllm_hf.engine import Engine, EngineConfig
from engine_helpers import EOS, greedy, hf_generate, prompt_set, tiny_model

SHAPES = [  # (kind, num_kv_heads, ratio, head_dim)
    ("llama", 2, 1, 64),
    ("llama", 1, 7, 64),
    ("qwen2", 2, 2, 128),
    ("mistral", 1, 4, 64),
    ("llama", 2, 4, 128),
]


def reference(model, prompts, max_new, **gen):
    return [hf_generate(model, p, greedy(m, **gen)) for p, m in zip(prompts, max_new)]


@pytest.mark.parametrize("kind,num_kv_heads,ratio,head_dim", SHAPES)
def test_matches_hf_generate(kind, num_kv_heads, ratio, head_dim):
    model = tiny_model(kind, num_kv_heads=num_kv_heads, ratio=ratio, head_dim=head_dim)
    prompts = prompt_set(seed=ratio * 10 + head_dim)
    rng = random.Random(1)
    max_new = [rng.randint(1, 9) for _ in prompts]
    engine = Engine(model, EngineConfig(page_size=8, max_batch_tokens=24, num_pages=128))
    outputs = engine.generate(prompts, greedy(9), max_new_tokens_per_request=max_new)
    assert [o.token_ids for o in outputs] == reference(model, prompts, max_new)
    for out, limit in zip(outputs, max_new):
        ended = out.token_ids[-1] == EOS
        assert out.finish_reason == ("eos" if ended else "length")
        assert ended or len(out.token_ids) == limit
    stats = engine.stats
    assert stats.groups == 3  # prefixes of 40, 21 and 9 tokens, kept whole (not cut to pages of 8)
    # each prefix is prefilled once, at its full length: only the members' suffixes add to it
    assert stats.logical_prompt_tokens - stats.physical_prompt_tokens == 3 * 40 + 2 * 21 + 1 * 9
    assert model.config._attn_implementation == "sdpa"  # restored after the run


@pytest.mark.parametrize("option", [
    {"decode_first": False}, {"use_shared_prefix": False}, {"cluster": False}, {"max_num_seqs": 3},
    {"attention_backend": "reference"}, {"page_size": 4, "max_batch_tokens": 7}, {"page_size": 64},
])
def test_ablations_and_layouts_match(option):
    model = tiny_model("llama", num_kv_heads=2, ratio=2)
    prompts = prompt_set(seed=3)
    max_new = [1 + i % 6 for i in range(len(prompts))]
    config = EngineConfig(**{"page_size": 8, "max_batch_tokens": 32, "num_pages": 256, **option})
    outputs = Engine(model, config).generate(prompts, greedy(6), max_new_tokens_per_request=max_new)
    assert [o.token_ids for o in outputs] == reference(model, prompts, max_new)


def test_tiny_pool_admits_in_turns_and_preempts():
    model = tiny_model("qwen2", num_kv_heads=1, ratio=2)
    prompts = prompt_set(seed=5)
    expected = reference(model, prompts, [12] * len(prompts))
    # 12 pages of 4 tokens: one group at a time; expected_new_tokens=1 under-reserves, so decode growth preempts
    engine = Engine(model, EngineConfig(page_size=4, max_batch_tokens=16, num_pages=24))
    outputs = engine.generate(prompts, greedy(12), expected_new_tokens=[1] * len(prompts))
    assert [o.token_ids for o in outputs] == expected
    assert engine.stats.preemptions > 0
    peak = max(prefix + own for _, prefix, own, _ in engine.stats.kv_timeline)
    assert peak <= 24
    assert engine.stats.kv_timeline[-1][1:3] == (0, 0)


def test_idle_prefix_evicted_and_prefilled_again_matches_hf(monkeypatch):
    """A request that outgrows its hint in a pool of 14 pages, beside a group of two whose prefix (40 tokens)
    waits with no member running: the scheduler frees that prefix (it used to stall and the engine raised
    "KV pool is too small") and prefills it again later; tokens still equal HF generate's."""
    from batchllm_hf.engine import scheduler

    evicted = []
    original = scheduler.Scheduler._evict_idle_prefix
    monkeypatch.setattr(scheduler.Scheduler, "_evict_idle_prefix",
                        lambda self, keep: evicted.append(original(self, keep)) or evicted[-1])
    model = tiny_model("llama", num_kv_heads=2, ratio=2)
    rng = random.Random(3)
    prefix = [rng.randrange(1, 200) for _ in range(40)]
    prompts = [[rng.randrange(1, 200) for _ in range(4)], prefix + [rng.randrange(1, 200) for _ in range(4)],
               prefix + [rng.randrange(1, 200) for _ in range(5)]]
    max_new = [20, 5, 5]
    engine = Engine(model, EngineConfig(page_size=4, max_batch_tokens=3, num_pages=14))
    outputs = engine.generate(prompts, greedy(20), max_new_tokens_per_request=max_new, expected_new_tokens=[1, 1, 1])
    assert [o.token_ids for o in outputs] == reference(model, prompts, max_new)
    assert True in evicted and engine.stats.preemptions >= 2
    # the prefix was computed more than once: more prompt tokens than the 53 a single prefill of it takes
    assert engine.stats.physical_prompt_tokens > sum(map(len, prompts)) - len(prefix)


def test_eos_and_stop_tokens():
    model = tiny_model("llama")
    prompts = prompt_set(seed=7)
    plain = reference(model, prompts, [10] * len(prompts))
    eos = plain[0][3]  # a token the model does produce
    with_eos = reference(model, prompts, [10] * len(prompts), eos_token_id=eos)
    outputs = Engine(model, EngineConfig(page_size=8, num_pages=128)).generate(
        prompts, greedy(10, eos_token_id=[eos, EOS]))
    assert [o.token_ids for o in outputs] == with_eos
    assert outputs[0].finish_reason == "eos" and outputs[0].token_ids[-1] == eos
    stop = plain[1][2]
    outputs = Engine(model, EngineConfig(page_size=8, num_pages=128)).generate(prompts, greedy(10),
                                                                               stop_token_ids=[stop])
    for out, ref in zip(outputs, plain):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert out.token_ids == ref[:cut]
        assert out.finish_reason == ("stop" if stop in ref else "eos" if ref[-1] == EOS else "length")


def test_min_new_tokens_and_repetition_penalty_match_hf():
    model = tiny_model("llama", ratio=4)
    prompts = prompt_set(seed=9)
    gen = dict(eos_token_id=EOS, min_new_tokens=4, repetition_penalty=1.7)
    expected = reference(model, prompts, [8] * len(prompts), **gen)
    outputs = Engine(model, EngineConfig(page_size=8, num_pages=128)).generate(prompts, greedy(8, **gen))
    assert [o.token_ids for o in outputs] == expected


def test_on_finish_callback_and_input_order():
    model = tiny_model("llama")
    prompts = prompt_set(seed=11)
    seen = {}
    outputs = Engine(model, EngineConfig(page_size=8, num_pages=128)).generate(
        prompts, greedy(4), max_new_tokens_per_request=[1 + i % 4 for i in range(len(prompts))],
        on_finish=lambda i, out: seen.setdefault(i, out))
    assert sorted(seen) == list(range(len(prompts)))
    assert [seen[i] for i in range(len(prompts))] == outputs
    assert [len(o.token_ids) for o in outputs] == [1 + i % 4 for i in range(len(prompts))]


def test_rejects_bad_input():
    model = tiny_model("llama")
    engine = Engine(model, EngineConfig(page_size=8, num_pages=4))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[5, 6], []], greedy(2))
    with pytest.raises(ValueError, match="token id"):
        engine.generate([[5, 999]], greedy(2))
    with pytest.raises(ValueError, match=r"Prompt 2 holds -1, not a token id in \[0, "):
        engine.generate([[5, 6], [7], [8, 9, -1, 999]], greedy(2))
    with pytest.raises(ValueError, match="integers"):
        engine.generate([[5, 6.5]], greedy(2))
    with pytest.raises(ValueError, match="KV pages"):
        engine.generate([[5] * 40], greedy(2))
    with pytest.raises(TypeError):
        EngineConfig(pages=3)
    with pytest.raises(ValueError, match="power of two"):
        EngineConfig(page_size=12)
    with pytest.raises(ValueError, match="beam"):
        engine.generate([[5, 6]], greedy(2, num_beams=2))
    sliding = tiny_model("mistral")
    sliding.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding"):
        Engine(sliding)


def test_page_size_default_follows_the_device():
    # pages of 64 on CUDA (the prefill attention's TMA key loads need whole 64-key blocks), 16 elsewhere
    assert EngineConfig().page_size is None
    assert EngineConfig().for_device("cpu").page_size == 16
    assert EngineConfig().for_device(torch.device("cuda", 0)).page_size == 64
    assert EngineConfig(page_size=32).for_device("cuda").page_size == 32
    assert Engine(tiny_model("llama"), EngineConfig(num_pages=8)).config.page_size == 16


def test_attention_mask_is_not_materialized():
    """sdpa_mask must skip the mask for the packed step: PagedKV.attend raises if one arrives."""
    model = tiny_model("llama")
    calls = []
    from batchllm_hf.engine import kv_pool

    original = kv_pool.PagedKV.attend

    def spy(self, query, attention_mask, scaling):
        calls.append(attention_mask)
        return original(self, query, attention_mask, scaling)

    kv_pool.PagedKV.attend = spy
    try:
        Engine(model, EngineConfig(page_size=8, num_pages=64)).generate(prompt_set(seed=1), greedy(2))
    finally:
        kv_pool.PagedKV.attend = original
    assert calls and all(mask is None for mask in calls)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("shared,backend", [(True, None), (False, None), (True, "triton")])
def test_decode_graph_static_buffers_match(shared, backend):
    """The CUDA-graph path's static buffers and padding rows, run eagerly (CPU has no graphs). With the
    "triton" backend the static work plan is refilled from host arrays each step (on CPU the attention
    itself then runs the torch reference on the uninitialised pool, so a read past a length would show)."""
    from batchllm_hf.engine.decode_graphs import DecodeGraphs

    model = tiny_model("llama", num_kv_heads=2, ratio=2)
    prompts = prompt_set(seed=13)
    max_new = [2 + i % 7 for i in range(len(prompts))]
    engine = Engine(model, EngineConfig(page_size=4, max_batch_tokens=16, num_pages=256, use_shared_prefix=shared,
                                        attention_backend=backend))
    graphs = DecodeGraphs(model, engine._kv_cache(), None, max_size=8, table_width=64, capture=False,
                          min_capture_steps=0)
    engine.decode_graphs = graphs
    calls = []
    original = graphs.run
    graphs.run = lambda *a: calls.append(a[0].shape[1]) or original(*a)
    outputs = engine.generate(prompts, greedy(8), max_new_tokens_per_request=max_new)
    assert [o.token_ids for o in outputs] == reference(model, prompts, max_new)
    assert calls and set(calls) - {1, 2, 4, 8}  # padded sizes were used (n below a captured size)
    assert graphs.admitted and not graphs.skipped  # min_capture_steps=0: every decode step took the static path


@pytest.mark.parametrize("backend", [None, "triton"])
def test_decode_graph_size_is_taken_ahead_during_prefill(backend):
    """After launching a prefill step with every request admitted, the engine hands the coming decode batch
    to DecodeGraphs.prepare (on a GPU: the capture then hides behind the queued prefill). Its groups, as
    numbered for the static plan's tiles, are the first decode-only step's; the size is taken before that
    step, which then just uses it. capture=False: the static path runs eagerly (CPU)."""
    from batchllm_hf.engine.decode_graphs import DecodeGraphs

    model = tiny_model("llama", num_kv_heads=2, ratio=2)
    prompts = prompt_set(seed=17)
    engine = Engine(model, EngineConfig(page_size=4, max_batch_tokens=16, num_pages=256, attention_backend=backend))
    graphs = DecodeGraphs(model, engine._kv_cache(), None, max_size=16, table_width=64, capture=False,
                          min_capture_steps=3)
    engine.decode_graphs = graphs
    events = []
    prepare, run = graphs.prepare, graphs.run
    graphs.prepare = lambda seq_group, remaining: events.append(
        ("prepare", seq_group.tolist(), prepare(seq_group, remaining), set(graphs.admitted))) or events[-1][2]
    graphs.run = lambda ids, pos, step, host, remaining=None: events.append(
        ("run", host.seq_group.tolist(), remaining is None)) or run(ids, pos, step, host, remaining)
    # 16 new tokens: no request finishes while the last groups still prefill (prefill runs group by group, so
    # the first groups decode meanwhile; with 8, some finished before the first decode-only step)
    outputs = engine.generate(prompts, greedy(16))
    assert [o.token_ids for o in outputs] == reference(model, prompts, [16] * len(prompts))
    first_run = next(i for i, e in enumerate(events) if e[0] == "run")
    taken = [e for e in events[:first_run] if e[0] == "prepare" and e[2]]
    assert len(taken) == 1 and taken[0][3] == {16}  # 12 sequences: size 16, admitted ahead
    assert taken[0][1] == events[first_run][1]  # the predicted groups are the first decode step's
    assert sorted(set(taken[0][1])) == [-1, 0, 1, 2]  # three groups and the ungrouped prompts
    assert events[first_run][2]  # the step found its size taken: no capture decision left to make
    assert 16 in graphs.admitted and not graphs.skipped  # (the shrinking tail takes smaller sizes later)


def test_decode_graph_sizes_follow_max_graph_batch():
    from batchllm_hf.engine.decode_graphs import DecodeGraphs

    model = tiny_model("llama")
    cache = Engine(model, EngineConfig(page_size=4, num_pages=64))._kv_cache()
    sizes = {n: DecodeGraphs(model, cache, None, max_size=n, table_width=8, capture=False).sizes for n in (1, 6, 1024)}
    assert sizes == {1: [1], 6: [1, 2, 4, 6],
                     1024: [1, 2, 4, 8, 16, 32, 64, 128, 256] + list(range(320, 1025, 64))}
    assert DecodeGraphs(model, cache, None, max_size=300, table_width=8, capture=False).sizes[-2:] == [256, 300]


@pytest.mark.parametrize("members,ratio,n", [(16, 7, 768), (4, 2, 768), (1, 4, 768), (256, 1, 768), (256, 4, 768),
                                             (16, 8, 160), (16, 8, 112), (64, 4, 256)])
def test_decode_graph_sizes_take_the_planners_tiles(members, ratio, n):
    """Each admitted size's static plan takes the tiles the per-step planner picks for its first step (W-paper's
    groups of 16 x GQA 7 get 128-row prefix tiles, not the 64 every size used to share), over shared buffers."""
    import numpy as np

    from batchllm_hf.engine.decode_graphs import DecodeGraphs
    from batchllm_hf.kernels.attention_plan import plan_attention

    model = tiny_model("llama", num_kv_heads=2, ratio=ratio, head_dim=64)
    cache = Engine(model, EngineConfig(page_size=4, num_pages=64, attention_backend="triton"))._kv_cache()
    graphs = DecodeGraphs(model, cache, None, max_size=1024, table_width=8, capture=False)
    seq_group = np.repeat(np.arange(n // members), members) if members > 1 else np.full(n, -1)
    static = graphs._plan_for(seq_group)
    per_step = plan_attention(np.arange(n + 1), np.full(n, 5), seq_group, np.full(max(1, n // members), 64),
                              *cache.num_heads, torch.device("cpu"), page_size=4)
    tiles = lambda plan: (plan.block_m, plan.block_n, plan.num_warps, plan.num_stages)  # noqa: E731
    # prefix tiles floor at 64 rows (row sets of <= 16 rows take the 16-row branch either way)
    assert tiles(static) == (max(64, per_step.block_m),) + tiles(per_step)[1:]
    assert static.items is graphs.plan.items and static.part_out is graphs.plan.part_out  # buffers shared
    if (members, ratio) in ((16, 7), (16, 8)):  # 112 / 128 rows per group; 160 x 8 x 2 rows > 2048 in all
        assert static.block_m == (128 if n * ratio * 2 > 2048 else 64) and graphs.plan.block_m == 64


def test_decode_graphs_skip_sizes_that_serve_few_steps():
    # A size is taken (captured, on CUDA) only when the running sequences' expected remaining tokens say it
    # will serve at least min_capture_steps steps before the batch shrinks below the next smaller size.
    import numpy as np

    from batchllm_hf.engine.decode_graphs import DecodeGraphs

    model = tiny_model("llama")
    cache = Engine(model, EngineConfig(page_size=4, num_pages=64))._kv_cache()
    graphs = DecodeGraphs(model, cache, None, max_size=1024, table_width=8, capture=False, min_capture_steps=6,
                          tail_padding=2.0)
    # 800 running: size 832, next smaller 768; 800 - 768 = 32 sequences must finish first
    remaining = np.concatenate([np.full(32, 40), np.full(768, 90)])
    assert graphs.expected_steps(800, remaining) == 40
    assert graphs.expected_steps(800, np.concatenate([np.full(32, 3), np.full(768, 90)])) == 3
    assert graphs.expected_steps(5, np.array([9, 1, 7, 2, 5])) == 1  # size 8, next smaller 4: one must finish
    rng = np.random.default_rng(0)
    assert graphs.expected_steps(3, rng.permutation([4, 8, 6])) == 4  # size 4, next smaller 2: one must finish

    calls = []
    graphs._run_static = lambda b, step: calls.append(b) or torch.zeros(b, 2)
    taken = graphs.run(torch.zeros((1, 5), dtype=torch.long), torch.zeros((1, 5), dtype=torch.long), None, None,
                       np.array([9, 1, 7, 2, 5]))
    assert taken is None and graphs.skipped == 1 and not calls and not graphs.admitted
    # once a size is taken, a shrinking batch pads into it while it is at most twice the batch
    graphs.admitted.add(8)
    step = lambda n: (torch.zeros((1, n), dtype=torch.long), torch.zeros((1, n), dtype=torch.long))  # noqa: E731
    graphs._reset_padding = lambda lo, hi: None
    from types import SimpleNamespace
    meta = SimpleNamespace(own_lens=torch.ones(3), own_pages=torch.zeros((3, 1)), seq_group=torch.full((3,), -1),
                           prefix_pages=torch.zeros((1, 1)), prefix_lens=torch.zeros(1))
    fake = SimpleNamespace(slots=torch.zeros(3), meta=meta, shape=None)
    graphs.run(*step(3), fake, None, np.array([2, 1, 1]))  # 3 -> size 4, 2 steps: 8 is at most 2 x 3? no
    assert calls == [] and graphs.skipped == 2
    meta.own_lens, meta.own_pages, meta.seq_group = torch.ones(5), torch.zeros((5, 1)), torch.full((5,), -1)
    fake.slots = torch.zeros(5)
    graphs.run(*step(5), fake, None, np.array([9, 1, 7, 2, 5]))  # 5 -> size 8 itself (taken)
    meta.own_lens, meta.own_pages, meta.seq_group = torch.ones(4), torch.zeros((4, 1)), torch.full((4,), -1)
    fake.slots = torch.zeros(4)
    graphs.run(*step(4), fake, None, np.array([2, 1, 1, 1]))  # 4 -> size 4 serves 1 step: pads into 8
    assert calls == [8, 8] and graphs.skipped == 2 and graphs.admitted == {8}
    meta.own_lens, meta.own_pages, meta.seq_group = torch.ones(3), torch.zeros((3, 1)), torch.full((3,), -1)
    fake.slots = torch.zeros(3)
    graphs.run(*step(3), fake, None, np.array([2, 1, 1]))  # 8 is more than 2 x 3: eager, as above
    assert calls == [8, 8] and graphs.skipped == 3
    graphs.tail_padding = 4.0  # EngineConfig.graph_tail_padding: 8 is at most 4 x 3
    graphs.run(*step(3), fake, None, np.array([2, 1, 1]))
    assert calls == [8, 8, 8] and graphs.skipped == 3
    with pytest.raises(ValueError, match="max_graph_batch"):
        EngineConfig(max_graph_batch=0)
    with pytest.raises(ValueError, match="graph_tail_padding"):
        EngineConfig(graph_tail_padding=0.5)


def test_decode_graphs_take_exact_sizes_for_steady_large_batches():
    # A batch of more than 256 that no running sequence expects to leave for EXACT_SIZE_STEPS steps runs at
    # its own size (rounded up to 16), not at the next multiple of 64: W-paper's 800 at 800, not 832. One per
    # 64-wide bucket; small batches, and batches about to shrink, keep the standard sizes.
    from types import SimpleNamespace

    import numpy as np

    from batchllm_hf.engine.decode_graphs import EXACT_SIZE_STEPS, DecodeGraphs

    model = tiny_model("llama")
    cache = Engine(model, EngineConfig(page_size=4, num_pages=64))._kv_cache()
    graphs = DecodeGraphs(model, cache, None, max_size=1024, table_width=8, capture=False, min_capture_steps=6)
    calls = []
    graphs._run_static = lambda b, step: calls.append(b) or torch.zeros(b, 2)
    graphs._reset_padding = lambda lo, hi: None

    def run(n, remaining):
        meta = SimpleNamespace(own_lens=torch.ones(n), own_pages=torch.zeros((n, 1)), seq_group=torch.full((n,), -1),
                               prefix_pages=torch.zeros((1, 1)), prefix_lens=torch.zeros(1))
        ids = torch.zeros((1, n), dtype=torch.long)
        remaining = np.full(n, remaining) if np.isscalar(remaining) else remaining
        graphs.run(ids, ids, SimpleNamespace(slots=torch.zeros(n), meta=meta, shape=None), None,
                   None if graphs.admitted_size(n) else remaining)  # as the runner passes it
        return calls[-1]

    assert run(800, EXACT_SIZE_STEPS) == 800 and graphs.admitted == {800} and 800 in graphs.sizes
    assert run(790, 3) == 800  # a shrinking batch pads into it
    assert run(810, 90) == 832  # its bucket (768, 832] already has a size taken: the bucket's own
    steps = np.concatenate([np.full(1, EXACT_SIZE_STEPS - 1), np.full(649, 90)])
    assert run(650, steps) == 704  # one sequence leaves before EXACT_SIZE_STEPS: the standard size
    assert run(300, 90) == 304 and run(200, 90) == 256  # above 256 only (powers of two below)
    assert graphs.admitted == {800, 832, 704, 304, 256} and graphs.skipped == 0
    # a size too short-lived to capture (min_capture_steps above EXACT_SIZE_STEPS) is not added either
    strict = DecodeGraphs(model, cache, None, max_size=1024, table_width=8, capture=False, min_capture_steps=20)
    assert strict.run(torch.zeros((1, 300), dtype=torch.long), None, None, None, np.full(300, 15)) is None
    assert 304 not in strict.sizes and not strict.admitted and strict.skipped == 1


def sampled(max_new_tokens, **kwargs):
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.9, top_k=20,
                            pad_token_id=0, **kwargs)


@pytest.mark.parametrize("case", ["eos", "preempt", "sampling", "n_samples"])
def test_overlapped_steps_match_one_step_at_a_time(case):
    """Launching step N+1 before step N's tokens are read back changes nothing: same tokens, finish reasons
    and page accounting, including sequences that finish by eos while a speculative step holds them and
    members preempted while their last token was still pending."""
    model = tiny_model("llama", num_kv_heads=1, ratio=2)
    prompts = prompt_set(seed=21)
    plain = reference(model, prompts, [10] * len(prompts))
    config = dict(page_size=8, num_pages=128)
    kwargs = {}
    if case == "eos":
        gen = greedy(10, eos_token_id=[plain[0][2], plain[3][1], EOS])
        kwargs["max_new_tokens_per_request"] = [3 + i % 8 for i in range(len(prompts))]
    elif case == "preempt":
        gen, config = greedy(12, eos_token_id=[plain[2][4], EOS]), dict(page_size=4, max_batch_tokens=16, num_pages=24)
        kwargs["expected_new_tokens"] = [1] * len(prompts)
    elif case == "sampling":
        gen = sampled(9, eos_token_id=EOS)
        kwargs["seeds"] = list(range(len(prompts)))
    else:
        gen = sampled(7, eos_token_id=EOS, num_return_sequences=2)
    runs = []
    for overlap in (False, True):
        engine = Engine(model, EngineConfig(overlap_steps=overlap, **config))
        outputs = engine.generate(prompts, gen, **kwargs)
        runs.append((outputs, engine.stats))
    (one, one_stats), (over, over_stats) = runs
    assert over == one
    assert over_stats.output_tokens == one_stats.output_tokens == sum(len(o.token_ids) for o in one)
    assert over_stats.kv_timeline[-1][1:3] == (0, 0)
    if case == "eos":
        assert {o.finish_reason for o in one} == {"eos", "length"}
        assert one[0].token_ids == plain[0][:3] and one[0].finish_reason == "eos"
    if case == "preempt":
        assert over_stats.preemptions > 0
        assert [o.token_ids for o in over] == reference(model, prompts, [12] * len(prompts),
                                                        eos_token_id=[plain[2][4], EOS])


def test_pool_is_capped_by_what_the_job_can_hold():
    """Without num_pages the pool is sized from memory but never beyond what the job could hold at once
    (prefix pages + every member's prompt and max_new_tokens); a larger later job gets a larger pool."""
    model = tiny_model("llama")
    engine = Engine(model, EngineConfig(page_size=8))
    small = prompt_set(seed=2, groups=((20, 2),), singles=1)
    engine.generate(small, greedy(3))
    first = engine.stats.num_pages
    assert first < 4096 and first == engine._kv_cache().num_pages
    prompts = prompt_set(seed=3)
    outputs = engine.generate(prompts, greedy(5))
    assert engine.stats.num_pages > first
    assert [o.token_ids for o in outputs] == reference(model, prompts, [5] * len(prompts))
    engine.generate(small, greedy(3))
    assert engine.stats.num_pages > first  # the larger pool is kept


@pytest.mark.parametrize("static", [False, True])
def test_a_step_reads_nothing_back_from_the_device(monkeypatch, static):
    """Packing, planning, the forward and sampling of a step call none of the tensor -> host conversions
    (each is a device sync on a GPU, which would stall the overlap of host and device work); only the
    engine's one read of the previous step's tokens does. Checked on CPU by making them raise, except
    inside the attention math itself (on CPU the torch reference; on CUDA the Triton launcher)."""
    from batchllm_hf.engine import engine as engine_module
    from batchllm_hf.engine import kv_pool
    from batchllm_hf.engine import runner as runner_module

    model = tiny_model("llama")
    prompts = prompt_set(seed=17)
    expected = reference(model, prompts, [4] * len(prompts))
    state = {"inside": False}

    def guard(name):
        original = getattr(torch.Tensor, name)

        def checked(self, *args, **kwargs):
            if state["inside"]:
                raise AssertionError(f"Tensor.{name} inside a step")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, checked)

    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__index__"):
        guard(name)

    def inside(fn):
        def wrapped(*args, **kwargs):
            state["inside"] = True
            try:
                return fn(*args, **kwargs)
            finally:
                state["inside"] = False
        return wrapped

    def outside(fn):  # the attention math: on CPU the torch reference (which reads lengths back), on CUDA
        def wrapped(*args, **kwargs):  # the Triton launcher
            saved, state["inside"] = state["inside"], False
            try:
                return fn(*args, **kwargs)
            finally:
                state["inside"] = saved
        return wrapped

    monkeypatch.setattr(kv_pool, "paged_attention_reference", outside(kv_pool.paged_attention_reference))
    monkeypatch.setattr(kv_pool, "paged_attention", outside(kv_pool.paged_attention))
    monkeypatch.setattr(runner_module.ModelRunner, "run", inside(runner_module.ModelRunner.run))
    monkeypatch.setattr(engine_module, "sample_tensor", inside(engine_module.sample_tensor))
    engine = Engine(model, EngineConfig(page_size=8, num_pages=128, attention_backend="triton"))
    if static:  # decode steps through the CUDA-graph path's static buffers and static plan, run eagerly
        from batchllm_hf.engine.decode_graphs import DecodeGraphs

        graphs = DecodeGraphs(model, engine._kv_cache(), None, max_size=16, table_width=16, capture=False,
                              min_capture_steps=0)
        engine.decode_graphs = graphs
        calls = []
        original_run = graphs.run
        graphs.run = lambda *a: calls.append(1) or original_run(*a)
    outputs = engine.generate(prompts, greedy(4))
    assert [o.token_ids for o in outputs] == expected
    assert not static or len(calls) >= 3


def test_decode_graph_static_plan_holds_a_full_batch_of_groups_of_one():
    # Items carry one KV head each: a captured batch of sequences that each have their own prefix needs
    # 2 items per sequence and KV head unsplit. With 8 KV heads (MHA) the static plan must still take it.
    import numpy as np

    from batchllm_hf.engine.decode_graphs import DecodeGraphs
    from batchllm_hf.kernels.attention_plan import plan_attention

    model = tiny_model("llama", num_kv_heads=8, ratio=1, head_dim=16)
    cache = Engine(model, EngineConfig(page_size=4, num_pages=64, attention_backend="triton"))._kv_cache()
    b = 1024
    graphs = DecodeGraphs(model, cache, None, max_size=b, table_width=8, capture=False)
    plan_attention(np.arange(b + 1), np.full(b, 300), np.arange(b), np.full(b, 2000), *cache.num_heads,
                   model.device, buffers=graphs.plan, num_sms=132)
    assert int(graphs.plan.num_items) >= 2 * 8 * b


def test_decode_graph_static_plan_takes_a_w_paper_step_and_a_long_single_sequence():
    # W-paper's decode step (800 sequences in 50 groups of 16, GQA 28/4, prefix 2000) on the 1024 graph's
    # static plan, and one sequence of 30k own tokens (split into many KV chunks) on the same buffers.
    import numpy as np

    from batchllm_hf.engine.decode_graphs import DecodeGraphs
    from batchllm_hf.kernels.attention_plan import plan_attention

    model = tiny_model("qwen2", num_kv_heads=4, ratio=7, head_dim=16)
    cache = Engine(model, EngineConfig(page_size=4, num_pages=64, attention_backend="triton"))._kv_cache()
    b = 1024
    graphs = DecodeGraphs(model, cache, None, max_size=b, table_width=8, capture=False)
    n = 800
    rng = np.random.default_rng(3)
    own = np.concatenate([rng.integers(200, 300, n), np.ones(b - n, dtype=np.int64)])
    groups = np.concatenate([np.repeat(np.arange(50), 16), np.full(b - n, -1)])
    plan = plan_attention(np.arange(b + 1), own, groups, np.full(50, 2000), *cache.num_heads, model.device,
                          buffers=graphs.plan, num_sms=132)
    parts = plan.num_parts[:b].numpy()
    assert (parts[:n] == 2).all() and (parts[n:] == 1).all()  # prefix + own per member, unsplit
    plan = plan_attention(np.arange(2), np.array([30000]), np.array([-1]), np.zeros(1, dtype=np.int64),
                          *cache.num_heads, model.device, buffers=graphs.plan, num_sms=132)
    assert int(plan.num_parts[0]) > 8  # the long sequence was split across programs


@pytest.mark.parametrize("kernel", [False, True])
def test_ahead_capture_check_step_runs_prefix_tiles_and_the_merge(monkeypatch, kernel):
    """An ahead capture's warm-up and check replay run on padding inputs, half of them in one group whose
    prefix is the scratch page's first token: every row sees the same key (once or twice), so every row's
    logits are the same, and the static plan (prefix tiles of the size's predicted groups) holds the step.
    kernel: through the Triton kernel (CPU interpreter) instead of the torch reference."""
    import numpy as np

    from batchllm_hf.engine.decode_graphs import DecodeGraphs
    from batchllm_hf.engine.engine import ATTN_IMPLEMENTATION

    if kernel:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        pytest.importorskip("triton")
        from batchllm_hf.kernels import attention_ops

        monkeypatch.setattr(attention_ops, "use_triton", lambda q: True)
    model = tiny_model("qwen2", num_kv_heads=2, ratio=7, head_dim=16)
    engine = Engine(model, EngineConfig(page_size=4, num_pages=64, attention_backend="triton"))
    runner = engine._runner(engine._kv_cache())
    graphs = DecodeGraphs(model, runner.cache, runner.forward, max_size=64, table_width=8, capture=False)
    seq_group = np.repeat(np.arange(3), 16)  # 48 sequences in 3 groups of 16: size 64
    assert graphs.prepare(seq_group, np.full(48, 50)) and graphs.admitted == {64}
    step = graphs._check_step(64)
    assert graphs.seq_group[:32].eq(0).all() and graphs.seq_group[32:].eq(-1).all()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)  # as Engine.generate does for its run
    with torch.no_grad():
        logits = graphs._run_static(64, step).float()
    model.set_attn_implementation("sdpa")
    assert torch.isfinite(logits).all() and logits.std() > 0
    torch.testing.assert_close(logits, logits[:1].expand_as(logits), rtol=0, atol=1e-4)


@pytest.mark.parametrize("agrees", [True, False])
def test_ahead_capture_check_result_is_read_at_first_use(monkeypatch, agrees):
    """The capture=True path of an ahead capture on the CPU, with a stand-in for the CUDA graph (its replay
    runs the static step eagerly) and for the check's pinned flag: a check that agreed lets the size's first
    decode step use the graph; one that disagreed turns graphs off, and that step runs eagerly. Either way
    the tokens equal HF generate's."""
    from types import SimpleNamespace

    from batchllm_hf.engine import decode_graphs

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *args: (1 << 40, 1 << 40))

    def capture(self, b, static, ahead=False):  # later sizes (the shrinking tail) are captured at first use
        eager = self._run_static(b, static)
        logits = eager.clone()
        graph = SimpleNamespace(replay=lambda: logits.copy_(self._run_static(b, self._step(b, None))))
        check = (torch.tensor(agrees), SimpleNamespace(synchronize=lambda: None)) if ahead else eager
        self.graphs[b] = (graph, logits, check)

    monkeypatch.setattr(decode_graphs.DecodeGraphs, "_capture", capture)
    model = tiny_model("llama", num_kv_heads=2, ratio=2)
    prompts = prompt_set(seed=19)
    engine = Engine(model, EngineConfig(page_size=4, max_batch_tokens=16, num_pages=256, attention_backend="triton"))
    graphs = decode_graphs.DecodeGraphs(model, engine._kv_cache(), None, max_size=16, table_width=64, capture=True,
                                        min_capture_steps=3)
    engine.decode_graphs = graphs
    with pytest.warns(UserWarning, match="differs from eager") if not agrees else contextlib.nullcontext():
        outputs = engine.generate(prompts, greedy(16))  # 16: no request finishes during prefill (one prediction)
    assert [o.token_ids for o in outputs] == reference(model, prompts, [16] * len(prompts))
    assert graphs.ahead == 1 and graphs.setup_seconds > 0
    if agrees:
        assert graphs.enabled and graphs.graphs[16][2] is None  # checked once, at the first use
    else:
        assert not graphs.enabled and not graphs.graphs and "differs from eager" in graphs.error


def test_decode_graph_static_plan_holds_groups_of_one_at_a_large_gqa_ratio():
    # GQA ratio 64: a decode row set of one token is 64 rows, so 4 own tiles of 16 rows plus a 64-row prefix
    # tile per sequence and KV head, unsplit; the 1024 graph's static plan must take such a step.
    import numpy as np

    from batchllm_hf.engine.decode_graphs import DecodeGraphs
    from batchllm_hf.kernels.attention_plan import plan_attention

    model = tiny_model("llama", num_kv_heads=2, ratio=64, head_dim=16)
    cache = Engine(model, EngineConfig(page_size=4, num_pages=64, attention_backend="triton"))._kv_cache()
    b = 1024
    graphs = DecodeGraphs(model, cache, None, max_size=b, table_width=8, capture=False)
    plan = plan_attention(np.arange(b + 1), np.full(b, 300), np.arange(b), np.full(b, 2000), *cache.num_heads,
                          model.device, buffers=graphs.plan, num_sms=132)
    assert int(plan.num_items) == (4 + 1) * 2 * b


@pytest.mark.parametrize("tma,static,fused,pad", [(False, False, False, False), (True, False, False, False),
                                                  (True, True, False, False), (None, True, False, False),
                                                  (None, False, True, False), (True, False, True, False),
                                                  (None, True, False, 2.0), (None, True, False, 32.0)])
def test_triton_kernel_in_the_engine_matches_hf(monkeypatch, tma, static, fused, pad):
    """The engine's steps through the real Triton kernel (the CPU interpreter stands in for CUDA), with and
    without TMA key loads (EngineConfig.attention_tma): pages of 64 tokens, prefixes of over two key blocks
    that end inside a page (180 and 100 tokens), so prefill and decode both run unmasked blocks and a masked
    prefix tail; tokens equal HF generate's (fp32). static: decode steps through the CUDA-graph path's
    static plan (allocated with the engine's TMA setting, one program per item slot), run eagerly. None (the
    default) uses TMA in static plans and in prefill tile configurations (pages of 64, head_dim 32), which
    these tiny steps reach only in pad's one prefill step of 693 tokens (tests/kernels has the rule). fused: members' prefill chunks of >= 128 rows
    read their group's prefix in fused items (the planner's GPU-filling condition lowered to this scale).
    pad (the tail padding): once the first decode step took size 8, later steps of 4 sequences pad into it
    (their own size would serve too few steps); 3 sequences run eagerly at 2x (8 > 2 x 3), and pad into 8 at
    32x, the default."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from batchllm_hf.kernels import attention_ops, shared_prefix_triton

    monkeypatch.setattr(attention_ops, "use_triton", lambda q: True)
    from batchllm_hf.engine import runner as runner_module

    plans = []
    real_plan = runner_module.plan_attention
    scale = {"num_sms": 1} if fused else {}  # 4 programs fill this "GPU": fusing needs filled steps

    def plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs, **scale))
        return plans[-1]

    monkeypatch.setattr(runner_module, "plan_attention", plan)
    descriptors = []
    real = shared_prefix_triton._pool_descriptor
    monkeypatch.setattr(shared_prefix_triton, "_pool_descriptor", lambda *a: descriptors.append(a[1]) or real(*a))
    model = tiny_model("llama", num_kv_heads=2, ratio=2, head_dim=32)
    prompts = prompt_set(seed=5, groups=((180, 3), (100, 2)), singles=1, suffix=(70, 90))
    max_new = [2, 2, 3, 4, 4, 4] if pad else [3] * len(prompts)
    expected = reference(model, prompts, max_new)
    # pad: one prefill step, so the first decode-only step holds all 6 sequences
    engine = Engine(model, EngineConfig(page_size=64, num_pages=64, max_batch_tokens=1024 if pad else 256,
                                        attention_backend="triton", attention_tma=tma))
    graphs = None
    if static:
        from batchllm_hf.engine.decode_graphs import DecodeGraphs

        cache = engine._kv_cache()
        cache.attention_tma = tma  # as Engine._runner sets it before it builds the graphs
        graphs = engine.decode_graphs = DecodeGraphs(model, cache, None, max_size=8, table_width=16, capture=False,
                                                     min_capture_steps=0, **({"tail_padding": pad} if pad == 2.0 else {}))
        if pad == 32.0:  # the default, the engine's as the graphs'
            assert graphs.tail_padding == EngineConfig().graph_tail_padding == 32.0
        sizes = []
        if pad:  # after the first decode step no size is worth a capture of its own
            real_run, real_static = graphs.run, graphs._run_static

            def run(*args):
                out = real_run(*args)
                graphs.min_capture_steps = 1000
                return out

            graphs.run = run
            graphs._run_static = lambda b, step: sizes.append((b, step.meta.own_lens.shape[0])) or real_static(b, step)
    outputs = engine.generate(prompts, greedy(4), max_new_tokens_per_request=max_new)
    assert [o.token_ids for o in outputs] == expected
    if not static:  # decode tokens of 70-100 own keys: packed items (several sequences per program), the default
        assert any(16 in p.items[: int(p.num_items), 0].tolist() for p in plans)
    stats = engine.stats  # the prefixes are computed once each, at full length: 180 x 3 members, 100 x 2
    assert stats.logical_prompt_tokens - stats.physical_prompt_tokens == 2 * 180 + 1 * 100
    if pad:
        padded, eager = ([(8, 8)] * 2, 1) if pad == 2.0 else ([(8, 8)] * 3, 0)
        assert sizes == padded and graphs.admitted == {8} and graphs.skipped == eager, (sizes, graphs.skipped)
    assert bool(descriptors) == (tma is True or (tma is None and (static or bool(pad))))
    assert any(p.has_fused for p in plans) == fused
    assert not static or (graphs.admitted and graphs.plan.use_tma == (tma is not False)
                          and graphs.plan.num_programs == graphs.plan.items.shape[0])


def test_exact_graph_size_through_the_kernel_matches_hf(monkeypatch):
    """A steady batch's own graph size (decode_graphs._exact_size), end to end through the real Triton kernel
    (CPU interpreter), at a scale the interpreter runs: the size rules shrunk (powers of two up to 2, then
    steps of 8; exact sizes rounded to 2, taken when 2 steps are sure). Six sequences decode at size 6, not
    10; once one finishes, five pad into 6. Tokens equal HF generate's (fp32)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from batchllm_hf.engine import decode_graphs
    from batchllm_hf.kernels import attention_ops

    monkeypatch.setattr(attention_ops, "use_triton", lambda q: True)
    for name, value in (("_POWER_SIZES_UP_TO", 2), ("_SIZE_STEP", 8), ("_EXACT_MULTIPLE", 2), ("EXACT_SIZE_STEPS", 2)):
        monkeypatch.setattr(decode_graphs, name, value)
    model = tiny_model("llama", num_kv_heads=2, ratio=2, head_dim=32)
    prompts = prompt_set(seed=5, groups=((180, 3), (100, 2)), singles=1, suffix=(70, 90))
    max_new = [3, 4, 4, 4, 4, 4]
    expected = reference(model, prompts, max_new)
    # one prefill step (1024 tokens), so the first decode-only step holds all 6 sequences
    engine = Engine(model, EngineConfig(page_size=64, num_pages=64, max_batch_tokens=1024, attention_backend="triton"))
    graphs = engine.decode_graphs = decode_graphs.DecodeGraphs(model, engine._kv_cache(), None, max_size=16,
                                                               table_width=16, capture=False, min_capture_steps=0)
    assert graphs.sizes == [1, 2, 10, 16]
    steps = []  # (sequences, static size) of each decode step on the static path
    real_run, real_static = graphs.run, graphs._run_static
    graphs.run = lambda input_ids, *args: steps.append([input_ids.shape[1]]) or real_run(input_ids, *args)
    graphs._run_static = lambda b, step: steps[-1].append(b) or real_static(b, step)
    outputs = engine.generate(prompts, greedy(4), max_new_tokens_per_request=max_new)
    assert [o.token_ids for o in outputs] == expected
    assert steps[0] == [6, 6] and [5, 6] in steps and all(len(s) == 2 and s[1] == 6 for s in steps), steps
    assert graphs.admitted == {6} and graphs.sizes == [1, 2, 6, 10, 16]
