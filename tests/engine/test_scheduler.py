"""Scheduler unit tests: pure Python, a fake model that 'samples' token 7 (never a stop token)."""

import subprocess
import sys
from pathlib import Path

import pytest

from batchllm_hf.engine.scheduler import Group, Scheduler, Sequence, pages_for


def make_group(prefix_len, suffix_lens, new_tokens, start_index, expected=None):
    prefix = list(range(100, 100 + prefix_len))
    members = [Sequence(index=start_index + i, prompt=prefix + [5] * n, max_new_tokens=new_tokens,
                        expected_new_tokens=expected or new_tokens)
               for i, n in enumerate(suffix_lens)]
    return Group(prefix, members)


def run(scheduler, on_step=None, limit=10_000):
    steps = []
    while not scheduler.done:
        chunks = scheduler.schedule()
        assert chunks, "no progress"
        steps.append(chunks)
        if on_step:
            on_step(scheduler, chunks)
        scheduler.update(chunks, [7] * sum(c.sample for c in chunks))
        assert len(steps) < limit
    return steps


def test_scheduler_imports_no_torch():
    # importing the package imports torch (batchllm_hf/__init__), so load the file on its own
    path = Path(__file__).parents[2] / "batchllm_hf" / "engine" / "scheduler.py"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('s', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['s'] = m; spec.loader.exec_module(m); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_step_plan_decode_first_then_prefix_then_suffixes_under_budget():
    s = Scheduler(num_pages=100, page_size=4, max_batch_tokens=10)
    s.add_group(make_group(16, [3, 2], 5, 0))
    steps = run(s)
    first = steps[0]
    assert isinstance(first[0].seq, Group) and first[0].length == 10 and not first[0].sample
    assert isinstance(steps[1][0].seq, Group) and steps[1][0].length == 6
    assert [(c.seq.index, c.length, c.sample) for c in steps[1][1:]] == [(0, 3, True), (1, 1, False)]
    decode_then_prefill = steps[2]
    assert [(c.seq.index, c.length) for c in decode_then_prefill] == [(0, 1), (1, 1)]
    assert decode_then_prefill[1].sample  # member 1 finished its prompt: its first token is sampled
    for chunks in steps:
        assert sum(c.length for c in chunks) <= 10
        kinds = [c.length == 1 and c.sample and c.seq.output for c in chunks if not isinstance(c.seq, Group)]
        assert kinds == sorted(kinds, key=lambda k: not k)  # decode tokens come first
    assert all(len(m.output) == 5 for m in s.running) or s.done


def test_prefix_pages_freed_exactly_when_last_member_finishes():
    s = Scheduler(num_pages=100, page_size=4, max_batch_tokens=64)
    group = make_group(16, [1, 1, 1], 2, 0)
    group.members[2].max_new_tokens = 6
    group.members[2].expected_new_tokens = 6
    s.add_group(group)
    seen = []

    def check(scheduler, chunks):
        prefix, own = scheduler.pages_in_use()
        seen.append((prefix, [m.finish_reason for m in group.members]))

    run(s, check)
    # prefix pages held while any member runs, released at the step the last one finished
    for prefix, reasons in seen:
        assert prefix == 4
    assert s.pages_in_use() == (0, 0) and group.pages == []
    assert [len(m.output) for m in group.members] == [2, 2, 6]
    assert s.allocator.num_free == 100


def test_decode_first_orders_groups_by_decode_to_prefill_ratio():
    prefill_heavy = make_group(64, [8] * 2, 2, 0)
    decode_heavy = make_group(8, [1] * 2, 50, 2)
    single = make_group(0, [4], 10, 4)
    for decode_first, expected in ((True, [2, 3, 4, 0, 1]), (False, [0, 1, 2, 3, 4])):
        s = Scheduler(num_pages=12, page_size=8, max_batch_tokens=256, decode_first=decode_first)
        for g in (make_group(64, [8] * 2, 2, 0), make_group(8, [1] * 2, 50, 2), make_group(0, [4], 10, 4)):
            s.add_group(g)
        order = []
        while not s.done:
            chunks = s.schedule()
            order += [c.seq.index for c in chunks if not isinstance(c.seq, Group) and c.seq.index not in order]
            s.update(chunks, [7] * sum(c.sample for c in chunks))
        assert order == expected, decode_first
    assert prefill_heavy.decode_ratio() < single.decode_ratio() < decode_heavy.decode_ratio()


def test_prefill_runs_group_by_group_so_the_first_group_decodes_early():
    """A step's prefill chunks go group by group in admission order (prefix, its members' suffixes, then the
    next group's prefix), so with decode-first the decode-heavy group decodes while the prefill-heavy
    group's long prefix is still being prefilled, not after it."""
    for decode_first in (True, False):
        s = Scheduler(num_pages=200, page_size=4, max_batch_tokens=16, decode_first=decode_first)
        prefill_heavy = make_group(64, [8, 8], 2, 0)
        decode_heavy = make_group(8, [2, 2], 20, 2)
        s.add_group(prefill_heavy)
        s.add_group(decode_heavy)
        first = s.schedule()
        order = [(c.seq is prefill_heavy or c.seq is decode_heavy, c.length) for c in first]
        assert sum(length for _, length in order) == 16
        if decode_first:  # the decode-heavy group whole (prefix 8, suffixes 2 + 2), then 4 prefix tokens
            assert [c.seq for c in first] == [decode_heavy, *decode_heavy.members, prefill_heavy]
            assert [c.length for c in first] == [8, 2, 2, 4]
        else:  # the prefill-heavy prefix takes the whole budget
            assert [c.seq for c in first] == [prefill_heavy] and first[0].length == 16
        s.update(first, [7] * sum(c.sample for c in first))
        decoded_at = None
        while not s.done:
            chunks = s.schedule()
            if decoded_at is None and any(c.seq in decode_heavy.members and c.seq.output for c in chunks):
                decoded_at = prefill_heavy.num_computed  # prefix tokens of the other group done by then
            s.update(chunks, [7] * sum(c.sample for c in chunks))
        assert (decoded_at < 64) == decode_first, (decode_first, decoded_at)
        assert [len(m.output) for m in prefill_heavy.members + decode_heavy.members] == [2, 2, 20, 20]


def test_admission_bounded_by_pages_and_by_max_num_seqs():
    def peak_running(**kwargs):
        s = Scheduler(page_size=4, max_batch_tokens=1000, **kwargs)
        for g in range(4):
            s.add_group(make_group(8, [4] * 4, 4, g * 4))
        peak = []
        run(s, lambda sch, _: peak.append((len(sch.running), sum(sch.pages_in_use()))))
        return max(r for r, _ in peak), max(p for _, p in peak)

    # a member reserves ceil((4 + 4) / 4) = 2 pages, a prefix 2 pages: one group = 10 pages; 25 pages hold
    # two groups + the third's prefix and one member (a group that does not fit whole is admitted in parts)
    assert peak_running(num_pages=25) == (9, 24)
    assert peak_running(num_pages=1000) == (16, 40)
    assert peak_running(num_pages=1000, max_num_seqs=5)[0] == 5


def test_group_larger_than_pool_is_admitted_in_parts():
    s = Scheduler(num_pages=7, page_size=4, max_batch_tokens=100)
    group = make_group(8, [4] * 5, 4, 0)  # 2 prefix pages + 5 x 2
    s.add_group(group)
    run(s, lambda sch, _: assert_le(sum(sch.pages_in_use()), 7))
    assert all(len(m.output) == 4 for m in group.members) and s.allocator.num_free == 7


def assert_le(a, b):
    assert a <= b


def test_preemption_recomputes_and_keeps_the_prefix():
    s = Scheduler(num_pages=8, page_size=2, max_batch_tokens=100)
    group = make_group(4, [2, 2, 2], 6, 0, expected=1)  # reserves 2 pages each, grows to 4
    s.add_group(group)
    recomputed = []

    def check(scheduler, chunks):
        assert sum(scheduler.pages_in_use()) <= 8
        assert scheduler.pages_in_use()[0] == 2
        recomputed.extend(c.length for c in chunks if not isinstance(c.seq, Group) and c.seq.output and c.length > 1)

    run(s, check)
    assert s.num_preemptions > 0 and recomputed  # prompt + generated tokens prefilled again
    assert all(m.output == [7] * 6 and m.finish_reason == "length" for m in group.members)
    assert s.allocator.num_free == 8


@pytest.mark.parametrize("b_new_tokens", [1, 5])
def test_idle_prefix_is_freed_when_nothing_else_can_be_preempted(b_new_tokens):
    """A request that outgrows its hint (expected 1 of 20 tokens) in a small pool, beside a group whose only
    member was preempted: once no running sequence is left to preempt, the idle group's prefix pages are
    freed (and prefilled again later) instead of the scheduler stalling with nothing to run."""
    a = Group([], [Sequence(index=0, prompt=[1] * 4, max_new_tokens=20, expected_new_tokens=1)])
    prefix = [2] * 40
    b = Group(prefix, [Sequence(index=1, prompt=prefix + [3] * 4, max_new_tokens=b_new_tokens, expected_new_tokens=1)])
    s = Scheduler(num_pages=14, page_size=4, max_batch_tokens=3)
    s.add_group(a)
    s.add_group(b)
    prefix_chunks = []
    run(s, lambda sched, chunks: prefix_chunks.extend(c.start for c in chunks if c.seq is b))
    assert [len(m.output) for m in a.members + b.members] == [20, b_new_tokens]
    assert s.num_preemptions >= 2 and prefix_chunks.count(0) == 2  # b's prefix was prefilled twice
    assert s.allocator.num_free == 14 and not b.pages


def test_idle_prefix_is_freed_for_the_head_of_the_admission_queue():
    """Nothing runs and the preempted request at the head of the queue needs more pages than are free, while
    a group whose members wait holds its prefix pages: that prefix is freed so the queue moves."""
    long = Group([], [Sequence(index=0, prompt=[1] * 10, max_new_tokens=12, expected_new_tokens=2)])
    prefix = [2] * 21
    shared = Group(prefix, [Sequence(index=1, prompt=prefix + [3] * 6, max_new_tokens=2, expected_new_tokens=2),
                            Sequence(index=2, prompt=prefix + [3] * 7, max_new_tokens=6, expected_new_tokens=2)])
    others = [Group([], [Sequence(index=3, prompt=[4] * 2, max_new_tokens=8, expected_new_tokens=3)]),
              Group([], [Sequence(index=4, prompt=[5] * 2, max_new_tokens=4, expected_new_tokens=2)])]
    s = Scheduler(num_pages=11, page_size=4, max_batch_tokens=4)
    for group in (others[0], shared, others[1], long):
        s.add_group(group)
    run(s)
    assert [len(q.output) for g in (long, shared, *others) for q in g.members] == [12, 2, 6, 8, 4]
    assert s.allocator.num_free == 11


def test_request_larger_than_pool_is_refused():
    s = Scheduler(num_pages=4, page_size=4, max_batch_tokens=100)
    with pytest.raises(ValueError, match="KV pages"):
        s.add_group(make_group(8, [4], 8, 0))
    assert pages_for(9, 4) == 3


def test_stop_reasons():
    s = Scheduler(num_pages=10, page_size=4, max_batch_tokens=100)
    seq = Sequence(index=0, prompt=[1, 2], max_new_tokens=5, expected_new_tokens=5, eos_ids=frozenset({9}),
                   stop_ids=frozenset({8}))
    s.add_group(Group([], [seq]))
    chunks = s.schedule()
    s.update(chunks, [8])
    assert seq.finish_reason == "stop" and seq.output == [8] and s.done


def test_own_slice_is_a_slice_of_own_tokens():
    import random

    rng = random.Random(0)
    for _ in range(300):
        group = make_group(rng.randint(0, 9), [rng.randint(0, 6)], 5, 0)
        seq = group.members[0]
        seq.output = [rng.randint(0, 50) for _ in range(rng.randint(0, 5))]
        own = seq.own_tokens
        lo = rng.randint(0, len(own))
        hi = rng.randint(lo, len(own))
        assert seq.own_slice(lo, hi) == own[lo:hi]


def test_advance_then_complete_drops_results_of_a_finished_sequence():
    """Step N+1 is scheduled before step N's tokens are known: a sequence that finished at step N (eos)
    gets a speculative slot in N+1, whose result is dropped; one that reached max_new_tokens is closing
    and is not scheduled again."""
    group = make_group(8, [3, 4], new_tokens=3, start_index=0)
    group.members[0].eos_ids = frozenset([9])
    s = Scheduler(num_pages=64, page_size=4, max_batch_tokens=64)
    s.add_group(group)
    first = s.schedule()
    records_1 = s.advance(first)
    assert [seq.output for seq, _ in records_1] == [[-1], [-1]]
    second = s.schedule()  # both decode their pending token
    assert [c.seq.index for c in second] == [0, 1]
    records_2 = s.advance(second)
    assert s.complete(records_1, [9, 7]) == [group.members[0]]  # member 0 hit eos at step 1
    assert group.members[0].output == [9] and group.members[0].pages == []
    third = s.schedule()
    assert [c.seq.index for c in third] == [1]
    records_3 = s.advance(third)
    assert group.members[1].closing  # its third token is pending: not scheduled again
    assert s.complete(records_2, [5, 7]) == []  # member 0's speculative token is dropped
    assert group.members[0].output == [9]
    assert s.schedule() == []
    assert s.complete(records_3, [8]) == [group.members[1]]
    assert group.members[1].output == [7, 7, 8] and s.done and s.pages_in_use() == (0, 0)


@pytest.mark.parametrize("num_pages", [1000, 70])
def test_decode_batch_ahead_is_the_next_decode_only_step(num_pages):
    """The batch the engine captures a graph for ahead of time: unknown while groups wait for admission
    (70 pages hold two of the three groups), then the sequences, in order, of the next decode-only step,
    but for those that finish before it (the last group's prefill outlasts some earlier members). Members
    whose only token is their first (max_new_tokens 1) are never predicted."""
    s = Scheduler(num_pages=num_pages, page_size=4, max_batch_tokens=12)
    for g in range(3):
        s.add_group(make_group(8, [4, 6, 5], 30, g * 3))
    s.add_group(make_group(8, [3, 2], 1, 9))  # these end at their first token: never in a decode step
    steps = []  # (the step's sequences if decode-only else None, the prediction made after it)
    inflight = None
    while not s.done:  # as the engine overlaps steps: launch step N, take step N-1's tokens, then predict
        chunks = s.schedule()
        if not chunks:
            s.complete(inflight, [7] * len(inflight))
            inflight = None
            continue
        # decode-only: every chunk a generated token's (a prompt's last token alone in a chunk is prefill)
        decode_only = all(not isinstance(c.seq, Group) and c.seq.output and c.length == 1 for c in chunks)
        records = s.advance(chunks)
        if inflight is not None:
            s.complete(inflight, [7] * len(inflight))
        inflight = records
        ahead = s.decode_batch_ahead()
        steps.append(([c.seq.index for c in chunks] if decode_only else None,
                      None if ahead is None else [q.index for q in ahead]))
    known = [i for i, (_, ahead) in enumerate(steps) if ahead is not None]
    assert (known[0] == 0) == (num_pages == 1000)
    following = next(decode for decode, _ in steps[known[0] + 1:] if decode is not None)
    predicted = steps[known[0]][1]
    assert [i for i in predicted if i in following] == following
    if num_pages == 1000:
        assert predicted == following and sorted(following) == list(range(9))
    # a prediction made right before a decode-only step is that step exactly
    pairs = [(ahead, decode) for (_, ahead), (decode, _) in zip(steps, steps[1:]) if None not in (ahead, decode)]
    assert pairs and all(ahead == decode for ahead, decode in pairs)
