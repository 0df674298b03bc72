"""Tests for batchllm_hf.clustering (global prefix identification, BatchLLM stage 1)."""
import ast
import pathlib
import random
import sys

import numpy as np
import pytest

from batchllm_hf.clustering import ClusterStats, PrefixPlan, cluster_prefixes

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- independent reference helpers
def lcp(a, b):
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def usable(length, min_prefix_len, align):
    length = length // align * align
    return length if length >= min_prefix_len else 0


def brute_force_saving(prompts, min_prefix_len=1, align=1):
    """Best sum over groups of (members - 1) * |prefix| over ALL single-level partitions."""
    best = 0
    for part in partitions(list(range(len(prompts)))):
        total = 0
        for block in part:
            if len(block) > 1:
                shared = min(len(prompts[i]) for i in block) - 1
                shared = min([shared] + [lcp(prompts[block[0]], prompts[i]) for i in block])
                total += (len(block) - 1) * usable(shared, min_prefix_len, align)
        best = max(best, total)
    return best


def distinct_prefixes(prompts):
    return len({tuple(p[:k]) for p in prompts for k in range(1, len(p) + 1)})


def as_lists(prompts):
    return [[int(t) for t in p] for p in prompts]


def check_plan(plan, prompts):
    """Invariants every plan must satisfy; returns the saving computed from the groups."""
    prompts = as_lists(prompts)
    assert isinstance(plan, PrefixPlan) and isinstance(plan.stats, ClusterStats)
    seen, saving = [], 0
    group_of = plan.group_of()
    for gi, group in enumerate(plan.groups):
        members = [int(m) for m in group.members]
        assert members == sorted(members) and len(group.suffixes) == len(members)
        prefix = [int(t) for t in group.prefix]
        if len(members) == 1:
            assert prefix == []
        for m, suffix in zip(members, group.suffixes):
            assert len(suffix) >= 1
            assert prefix + [int(t) for t in suffix] == prompts[m]
            assert group_of[m] == gi
            g, s = plan.locate(m)
            assert g == gi and [int(t) for t in s] == [int(t) for t in suffix]
        seen += members
        saving += (len(members) - 1) * len(prefix)
    assert sorted(seen) == list(range(len(prompts)))
    return saving


def random_tree_prompts(rng, n, vocab):
    """Prompts drawn around a few shared stems: multi-level trees, duplicates, nested prompts."""
    stems = [[rng.randrange(vocab) for _ in range(rng.randint(1, 9))] for _ in range(2)]
    prompts = []
    for _ in range(n):
        kind = rng.random()
        if prompts and kind < 0.15:
            prompts.append(list(rng.choice(prompts)))                       # duplicate
        elif prompts and kind < 0.3:
            donor = rng.choice(prompts)
            prompts.append(donor[:rng.randint(1, len(donor))])             # prefix of another
        else:
            stem = rng.choice(stems)
            tail = [rng.randrange(vocab) for _ in range(rng.randint(0, 4))]
            prompts.append((stem[:rng.randint(0, len(stem))] + tail) or [rng.randrange(vocab)])
    return prompts


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("min_prefix_len,align", [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3)])
def test_exact_optimum_vs_brute_force(min_prefix_len, align):
    rng = random.Random(1234 + 10 * min_prefix_len + align)
    features = {"duplicate": 0, "nested": 0, "multilevel": 0}
    for _ in range(200):
        prompts = random_tree_prompts(rng, rng.randint(1, 7), rng.choice([2, 3, 50]))
        plan = cluster_prefixes(prompts, min_prefix_len=min_prefix_len, align=align)
        saving = check_plan(plan, prompts)
        assert saving == plan.stats.logical_tokens - plan.stats.physical_tokens
        assert saving == brute_force_saving(prompts, min_prefix_len, align), prompts
        for group in plan.groups:
            assert len(group.prefix) == 0 or (len(group.prefix) >= min_prefix_len
                                              and len(group.prefix) % align == 0)
        tuples = [tuple(p) for p in prompts]
        features["duplicate"] += len(set(tuples)) < len(tuples)
        features["nested"] += any(a != b and b[:len(a)] == a for a in tuples for b in tuples)
        features["multilevel"] += distinct_prefixes(prompts) < plan.stats.physical_tokens
    assert min(features.values()) >= 5, features       # the generator covers the hard cases


def test_beats_greedy_where_greedy_is_suboptimal():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reference_greedy import greedy_groups
    rng = random.Random(7)
    strictly_better = 0
    for _ in range(150):
        prompts = random_tree_prompts(rng, rng.randint(2, 25), 3)
        greedy = sum((len(m) - 1) * k for k, m in greedy_groups(prompts))
        plan = cluster_prefixes(prompts, min_prefix_len=1)
        ours = plan.stats.logical_tokens - plan.stats.physical_tokens
        assert ours >= greedy
        strictly_better += ours > greedy
    assert strictly_better > 0


def test_known_example_prefers_the_deeper_split():
    # 3 prompts share 10 tokens; two of them share 100. Best: group the two on the 100-token prefix
    # (saves 100); grouping all three on 10 tokens saves only 20.
    common = list(range(1, 11))
    deep = common + list(range(100, 190))
    prompts = [deep + [7], deep + [8], common + [500, 501]]
    plan = cluster_prefixes(prompts, min_prefix_len=1)
    assert plan.stats.logical_tokens - plan.stats.physical_tokens == 100
    assert sorted(len(g.members) for g in plan.groups) == [1, 2]


# ---------------------------------------------------------------- invariants
@pytest.mark.parametrize("form", ["list", "int32", "int64", "torch"])
def test_invariants_and_input_forms(form):
    rng = random.Random(5)
    prompts = [p for _ in range(20) for p in random_tree_prompts(rng, 12, 4)]
    if form == "int32":
        inputs = [np.asarray(p, dtype=np.int32) for p in prompts]
    elif form == "int64":
        inputs = [np.asarray(p, dtype=np.int64) for p in prompts]
    elif form == "torch":
        torch = pytest.importorskip("torch")
        inputs = [torch.tensor(p) for p in prompts]
    else:
        inputs = prompts
    plan = cluster_prefixes(inputs, min_prefix_len=1)
    check_plan(plan, prompts)
    reference = cluster_prefixes(prompts, min_prefix_len=1)
    assert np.array_equal(plan.group_of(), reference.group_of())


def group_signature(plan, prompts):
    return sorted((tuple(int(t) for t in g.prefix),
                   tuple(sorted(tuple(prompts[m]) for m in g.members))) for g in plan.groups)


@pytest.mark.parametrize("options", [{}, {"min_prefix_len": 1}, {"align": 2, "min_prefix_len": 1},
                                     {"max_group_size": 3, "min_prefix_len": 1}])
def test_shuffle_gives_same_groups(options):
    rng = random.Random(11)
    prompts = [p * 6 for _ in range(8) for p in random_tree_prompts(rng, 15, 3)]
    plan = cluster_prefixes(prompts, **options)
    perm = list(range(len(prompts)))
    rng.shuffle(perm)
    shuffled = [prompts[i] for i in perm]
    plan2 = cluster_prefixes(shuffled, **options)
    check_plan(plan2, shuffled)
    assert group_signature(plan, prompts) == group_signature(plan2, shuffled)
    assert plan.stats == plan2.stats


# ---------------------------------------------------------------- options
def test_min_prefix_len_threshold():
    shared = [9, 8, 7, 6, 5]
    prompts = [shared + [1, 2], shared + [3, 4]]
    assert cluster_prefixes(prompts, min_prefix_len=6).stats.shared_groups == 0
    plan = cluster_prefixes(prompts, min_prefix_len=5)
    assert [list(g.prefix) for g in plan.groups] == [shared]


def test_align_moves_the_rest_to_suffixes():
    shared = list(range(10, 20))                          # 10 shared tokens
    prompts = [shared + [1], shared + [2], shared + [3]]
    plan = cluster_prefixes(prompts, min_prefix_len=1, align=4)
    (group,) = plan.groups
    assert list(group.prefix) == shared[:8]
    assert [list(s) for s in group.suffixes] == [shared[8:] + [k] for k in (1, 2, 3)]
    assert cluster_prefixes(prompts, min_prefix_len=9, align=4).stats.shared_groups == 0


def test_max_group_size_splits_in_sorted_order():
    base = list(range(1, 21))
    # 10 prompts share 20 tokens; within them, pairs share 5 more
    prompts = [base + [100 + k // 2] * 5 + [k] for k in range(10)]
    random.Random(2).shuffle(prompts)
    plan = cluster_prefixes(prompts, min_prefix_len=1, max_group_size=4)
    check_plan(plan, prompts)
    assert sorted(len(g.members) for g in plan.groups) == [3, 3, 4]   # near-equal parts
    unsplit = cluster_prefixes(prompts, min_prefix_len=1)
    assert plan.stats.physical_tokens > unsplit.stats.physical_tokens  # splitting costs prefixes
    assert cluster_prefixes(prompts, min_prefix_len=1, max_group_size=10).stats == unsplit.stats
    plan2 = cluster_prefixes(prompts, min_prefix_len=1, max_group_size=2)
    assert sorted(len(g.prefix) for g in plan2.groups) == [25] * 5     # pairs share 25 tokens
    # requests left ungrouped (prefix below min_prefix_len) are not grouped by the split
    assert cluster_prefixes(prompts, min_prefix_len=26, max_group_size=2).stats.shared_groups == 0


def test_min_group_size_dissolves_small_groups():
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 9, 9, 1], [9, 9, 9, 2], [9, 9, 9, 3]]
    plan = cluster_prefixes(prompts, min_prefix_len=1, min_group_size=3)
    check_plan(plan, prompts)
    assert sorted(len(g.members) for g in plan.groups) == [1, 1, 3]


@pytest.mark.parametrize("kwargs", [{"min_prefix_len": 0}, {"align": 0}, {"min_group_size": 1},
                                    {"max_group_size": 1}, {"min_prefix_len": 2.5},
                                    {"align": True}])
def test_bad_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        cluster_prefixes([[1, 2]], **kwargs)


def test_unknown_option_is_type_error():
    with pytest.raises(TypeError):
        cluster_prefixes([[1, 2]], block_size=16)


# ---------------------------------------------------------------- stats
def test_stats_match_an_independent_count():
    rng = random.Random(3)
    prompts = [p for _ in range(30) for p in random_tree_prompts(rng, 10, 3)]
    for options in ({"min_prefix_len": 1}, {"min_prefix_len": 2, "align": 2}, {}):
        plan = cluster_prefixes(prompts, **options)
        check_plan(plan, prompts)
        logical = sum(map(len, prompts))
        physical = sum(len(g.prefix) + sum(map(len, g.suffixes)) for g in plan.groups)
        multi = distinct_prefixes(prompts)
        s = plan.stats
        assert (s.requests, s.groups) == (len(prompts), len(plan.groups))
        assert s.shared_groups == sum(len(g.prefix) > 0 for g in plan.groups)
        assert s.mean_sharing_degree == pytest.approx(len(prompts) / len(plan.groups))
        assert (s.logical_tokens, s.physical_tokens, s.multilevel_tokens) == (logical, physical, multi)
        assert s.saving_ratio == pytest.approx(1 - physical / logical)
        assert s.multilevel_saving_ratio == pytest.approx(1 - multi / logical)
        assert s.multilevel_tokens <= s.physical_tokens


def test_stats_on_a_hand_computed_workload():
    # 3 groups x 4 members: 50 shared + 5 own tokens each; plus 2 unrelated prompts of 7 tokens
    rng = random.Random(9)
    prompts = []
    for g in range(3):
        prefix = [1000 * g + k for k in range(1, 51)]
        prompts += [prefix + [rng.randrange(10 ** 5, 10 ** 6) for _ in range(5)] for _ in range(4)]
    prompts += [[7, 100 + k, 1, 2, 3, 4, 5] for k in range(2)]
    s = cluster_prefixes(prompts).stats
    assert (s.requests, s.groups, s.shared_groups) == (14, 5, 3)
    assert s.logical_tokens == 12 * 55 + 14
    assert s.physical_tokens == 3 * 50 + 12 * 5 + 14
    assert s.multilevel_tokens == 3 * 50 + 12 * 5 + 13       # the two strays share token 7


# ---------------------------------------------------------------- edge cases
def test_empty_input_gives_empty_plan():
    plan = cluster_prefixes([])
    assert plan.groups == () and len(plan.group_of()) == 0
    assert (plan.stats.requests, plan.stats.groups, plan.stats.logical_tokens) == (0, 0, 0)


def test_empty_prompt_raises_with_its_index():
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        cluster_prefixes([[1, 2], [3], [], [4]])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        cluster_prefixes([np.array([1]), np.array([], dtype=np.int64)])


@pytest.mark.parametrize("bad", [[[1.5, 2.0]], [[1, 2], [[1, 2]]], [["a"]], [[2 ** 64 - 1]]])
def test_non_integer_or_badly_shaped_prompts_raise(bad):
    with pytest.raises(ValueError):
        cluster_prefixes(bad)


def test_one_token_prompts_never_share():
    prompts = [[5], [5], [6], [5]]
    plan = cluster_prefixes(prompts, min_prefix_len=1)
    check_plan(plan, prompts)
    assert len(plan.groups) == 4 and plan.stats.physical_tokens == 4


def test_identical_prompts_share_all_but_the_last_token():
    prompts = [[3, 1, 4, 1, 5]] * 6
    plan = cluster_prefixes(prompts, min_prefix_len=1)
    (group,) = plan.groups
    assert list(group.prefix) == [3, 1, 4, 1] and [list(s) for s in group.suffixes] == [[5]] * 6
    assert plan.stats.physical_tokens == 4 + 6 and plan.stats.multilevel_tokens == 5


def test_very_large_token_ids_and_int64_arrays():
    big = 2 ** 62
    # ids equal in their low 32 bits: a silent int32 cast would merge these prompts
    a = np.array([big + 1, big + 2, big + 3, 1], dtype=np.int64)
    b = np.array([1, big + 2, big + 3, 2], dtype=np.int64)
    c = np.array([big + 1, big + 2, 2 ** 63 - 1, 3], dtype=np.int64)
    d = np.array([big + 1, big + 2, 2 ** 63 - 1, 4], dtype=np.uint64)
    plan = cluster_prefixes([a, b, c, d], min_prefix_len=1)
    check_plan(plan, [a, b, c, d])
    # best: a, c, d on their 2 shared ids (saves 4), not c, d on 3 (saves 3); b shares nothing
    assert plan.stats.logical_tokens - plan.stats.physical_tokens == 4
    assert sorted(list(g.members) for g in plan.groups) == [[0, 2, 3], [1]]
    assert plan.groups[0].prefix.dtype == np.int64


def test_a_million_tiny_prompts():
    rng = np.random.default_rng(0)
    n = 1_000_000
    first = rng.integers(0, 10, size=n)
    second = rng.integers(0, 2 ** 31, size=n)
    width = rng.integers(1, 3, size=n)                  # 1- and 2-token prompts
    prompts = [row[:w] for row, w in zip(np.stack([first, second], axis=1), width)]
    plan = cluster_prefixes(prompts, min_prefix_len=1)
    two = width == 2
    per_first = np.bincount(first[two], minlength=10)
    s = plan.stats
    assert s.requests == n and s.logical_tokens == int(width.sum())
    assert s.groups == int((~two).sum() + np.count_nonzero(per_first))
    assert s.logical_tokens - s.physical_tokens == int((per_first - 1).clip(0).sum())
    group_of = plan.group_of()
    for i in rng.integers(0, n, size=200):
        g, suffix = plan.locate(i)
        assert g == group_of[i]
        assert list(suffix) == (list(prompts[i][1:]) if two[i] else list(prompts[i]))


def test_module_does_not_import_torch():
    for name in ("clustering.py", "clustering_tree.py"):
        tree = ast.parse((ROOT / "batchllm_hf" / name).read_text())
        imported = {a.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert "torch" not in imported


def test_flattened_prompts_given_once_give_the_same_plan():
    from batchllm_hf.clustering import flatten_prompts

    rng = np.random.default_rng(5)
    shared = [list(rng.integers(0, 50, 30)) for _ in range(3)]
    prompts = [shared[i % 3][:20 + i % 7] + list(rng.integers(0, 50, 5)) for i in range(40)]
    tokens, lengths = flatten_prompts(prompts)
    assert tokens.tolist() == [t for p in prompts for t in p] and lengths.tolist() == [len(p) for p in prompts]
    plain, given = (cluster_prefixes(prompts, min_prefix_len=4, **kw) for kw in ({}, {"flat": (tokens, lengths)}))
    assert [(g.prefix.tolist(), g.members.tolist()) for g in given.groups] == [
        (g.prefix.tolist(), g.members.tolist()) for g in plain.groups]
    assert given.stats == plain.stats
