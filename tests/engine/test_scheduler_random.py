"""The scheduler on random jobs in small KV pools (preemption, prefix eviction, hints below max_new_tokens,
eos, request caps), stepped as the engine steps it (one step at a time, or overlapped: advance, then the
previous step's complete). Each step's invariants are checked against a simulated KV: the budget, chunks
that continue exactly where their sequence's KV ends, a member's chunks only after its group's whole prefix
KV, pages for every computed token, no page held twice or lost; at the end every output is exact and every
page free. Pure Python: hundreds of jobs in seconds."""

import random

import pytest

from batchllm_hf.engine.scheduler import PENDING, Group, Scheduler, Sequence, pages_for

PAGE = 4


def sampled_token(index: int, k: int) -> int:
    return 1000 + (index * 31 + k * 7) % 50  # the "model": a fixed token per (request, position)


def random_job(rng: random.Random) -> list[Group]:
    groups, index = [], 0
    for _ in range(rng.randint(1, 7)):
        prefix_len = rng.choice([0, 0, rng.randint(1, 40)])
        prefix = [rng.randint(0, 99) for _ in range(prefix_len)]
        members = []
        for _ in range(1 if not prefix else rng.randint(1, 6)):
            limit = rng.randint(1, 12)
            eos = frozenset([1000 + rng.randint(0, 49)]) if rng.random() < 0.3 else frozenset()
            members.append(Sequence(index=index, prompt=prefix + [rng.randint(0, 99) for _ in range(rng.randint(1, 10))],
                                    max_new_tokens=limit, expected_new_tokens=rng.choice([limit, rng.randint(1, limit)]),
                                    eos_ids=eos))
            index += 1
        groups.append(Group(prefix, members))
    return groups


def expected_output(seq: Sequence) -> list[int]:
    out = []
    for k in range(seq.max_new_tokens):
        out.append(sampled_token(seq.index, k))
        if out[-1] in seq.eos_ids:
            break
    return out


def run_job(seed: int, overlap: bool) -> int:
    rng = random.Random(seed)
    groups = random_job(rng)
    seqs = [s for g in groups for s in g.members]
    largest = max(pages_for(len(g.prefix), PAGE) + pages_for(len(s.prompt) - len(g.prefix) + s.max_new_tokens, PAGE)
                  for g in groups for s in g.members)
    num_pages = largest + rng.choice([0, 0, 1, 2, 4, 30])
    budget = rng.randint(3, 40)
    s = Scheduler(num_pages, PAGE, budget, max_num_seqs=rng.choice([None, None, rng.randint(1, 8)]),
                  decode_first=rng.random() < 0.5)
    for g in groups:
        s.add_group(g)
    kv = {id(x): [] for x in seqs + groups}  # tokens whose KV the steps so far computed
    inflight, steps = None, 0
    while not s.done:
        steps += 1
        assert steps < 5000, "no progress"
        chunks = s.schedule()
        for x in seqs + groups:  # preempted sequences and evicted prefixes lost their KV
            if x.num_computed == 0:
                kv[id(x)] = []
        if not chunks:
            assert inflight is not None, "stalled: nothing to run and nothing in flight"
            s.complete(*inflight)
            inflight = None
            continue
        assert sum(c.length for c in chunks) <= budget
        assert len({id(c.seq) for c in chunks}) == len(chunks)
        for c in chunks:
            x = c.seq
            assert c.length >= 1 and c.start == x.num_computed == len(kv[id(x)])
            if isinstance(x, Group):
                assert x.admitted and not c.sample and c.start + c.length <= len(x.prefix)
                assert len(x.pages) * PAGE >= c.start + c.length
                kv[id(x)] += x.prefix[c.start:c.start + c.length]
            else:
                assert x in s.running and not x.closing and c.start + c.length <= x.num_own_tokens
                assert c.sample == (c.start + c.length == x.num_own_tokens)
                assert len(x.pages) * PAGE >= c.start + c.length
                assert kv[id(x.group)] == x.group.prefix, "a member's chunk before its group's whole prefix"
                kv[id(x)] += x.own_slice(c.start, c.start + c.length)
        held = [p for x in seqs + groups for p in x.pages]
        assert len(held) == len(set(held)) and len(held) + s.allocator.num_free == num_pages
        assert all(not x.pages for x in seqs if not x.running)
        records = s.advance(chunks)
        result = (records, [sampled_token(x.index, i) for x, i in records])
        if overlap:
            if inflight is not None:
                s.complete(*inflight)
            inflight = result
        else:
            s.complete(*result)
        for x in seqs:  # placeholders the device has filled in since
            own = x.own_tokens
            kv[id(x)] = [own[j] if t == PENDING and j < len(own) else t for j, t in enumerate(kv[id(x)])]
    if inflight is not None:
        s.complete(*inflight)
    for x in seqs:
        assert x.output == expected_output(x) and x.finish_reason in ("eos", "length") and not x.pages
    assert s.allocator.num_free == num_pages and not (s.running or s.prefilling or s.open or s.groups)
    return s.num_preemptions


@pytest.mark.parametrize("overlap", [False, True])
def test_random_jobs_in_small_pools(overlap):
    preempted = sum(run_job(seed, overlap) > 0 for seed in range(400))
    assert preempted > 20  # the pools are small enough to preempt in a good share of the jobs
