"""Prefix-tree machinery behind `clustering.cluster_prefixes` (pure numpy, no torch).

Three steps, none with a Python loop per token:
1. `sort_prompts`: lexicographic order of the prompts and the longest common prefix (LCP) of every
   neighbouring pair, by a vectorised most-significant-first radix sort over chunks of tokens
   (exact comparisons, no hashing).
2. `build_tree`: the compressed prefix tree from the sorted lengths and LCP array (one stack pass,
   O(1) Python work per prompt).
3. `solve_groups`: the exact one-level grouping by dynamic programming over the tree (see its docstring).
"""
import numpy as np


def _gather(tokens, starts, counts, width):
    """Next `width` tokens of each row (starts[i] .. starts[i] + counts[i]); mask of real ones."""
    cols = np.arange(width)
    valid = cols < counts[:, None]
    idx = np.minimum(starts[:, None] + cols, len(tokens) - 1)
    return tokens[idx], valid


def _agrees(tokens, starts, rem, lead_starts, lead_rem, width):
    """Per row: do its next `width` tokens all exist and equal its bucket's first row's?"""
    own, own_ok = _gather(tokens, starts, rem, width)
    lead, lead_ok = _gather(tokens, lead_starts, lead_rem, width)
    return (own_ok & lead_ok & (own == lead)).all(axis=1)


def _sort_rows(bucket, chunk, ok):
    """Stable order of rows by (bucket, chunk), a shorter (ended) row before its extensions.

    Each row becomes big-endian unsigned words compared as raw bytes: one argsort of a void array,
    ~15x faster than np.lexsort over the columns."""
    if chunk.dtype.itemsize <= 4:             # (present, token) packed into one word per column
        words = ((chunk.astype(np.int64) + (2 ** 31 + 1)) * ok).astype(np.uint64)
    else:                                     # presence word, then the sign-flipped token
        flipped = (chunk.astype(np.int64).view(np.uint64) ^ np.uint64(2 ** 63)) * ok
        words = np.stack([ok.astype(np.uint64), flipped], axis=2).reshape(len(chunk), -1)
    rows = np.hstack([bucket[:, None].astype(np.uint64), words]).astype(">u8")
    return np.argsort(rows.view(np.dtype((np.void, rows.shape[1] * 8))).ravel(), kind="stable")


def sort_prompts(tokens, starts, lengths, chunk=64, batch_elems=1 << 21):
    """Returns (order, lcp): prompts in lexicographic order (a shorter prompt before its extensions,
    equal prompts by index) and lcp[i] = LCP(order[i], order[i + 1]).

    Each round looks at the next `width` tokens of every row still in an ambiguous bucket. Buckets
    whose rows all agree on them advance without reordering (cheap: one compare per token); the
    others are sorted (stably) on the whole chunk and cut where neighbours differ. Work is about
    the tokens that neighbours share, so nested prompts (chains) do not make it quadratic."""
    n = len(lengths)
    order = np.arange(n, dtype=np.int64)
    lcp = np.zeros(max(n - 1, 0), dtype=np.int64)
    pos = order.copy()                      # positions (in `order`) of the rows still ambiguous
    bucket = np.zeros(n, dtype=np.int64)    # bucket label per active row, nondecreasing
    depth = np.zeros(n, dtype=np.int64)     # tokens already known equal inside the bucket
    while len(pos) > 1:
        rid = order[pos]
        is_first = np.empty(len(pos), dtype=bool)
        is_first[0] = True
        np.not_equal(bucket[1:], bucket[:-1], out=is_first[1:])
        first = np.flatnonzero(is_first)
        of_bucket = np.cumsum(is_first) - 1
        lead = rid[first][of_bucket]
        rem = lengths[rid] - depth
        width = int(min(chunk, max(rem.max(), 1)))   # short prompts: gather no padding
        rows = max(1, batch_elems // width)
        agrees = np.empty(len(pos), dtype=bool)
        for a in range(0, len(pos), rows):
            b = slice(a, a + rows)
            agrees[b] = _agrees(tokens, starts[rid[b]] + depth[b], rem[b],
                                starts[lead[b]] + depth[b], lengths[lead[b]] - depth[b], width)
        full = np.logical_and.reduceat(agrees, first)[of_bucket]
        split = np.flatnonzero(~full)       # buckets whose rows differ within the chunk
        new_first = is_first.copy()
        heads = np.flatnonzero(np.r_[True, bucket[split][1:] != bucket[split][:-1]])
        cuts = heads[np.searchsorted(heads, np.arange(0, len(split), rows), side="right") - 1]
        cuts = np.unique(np.r_[cuts, len(split)])              # batches of whole buckets
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            _split(tokens, starts, lengths, order, lcp, pos, bucket, depth, split[a:b], width,
                   new_first)
        label = np.cumsum(new_first)
        keep = np.bincount(label)[label] >= 2    # a run of rows equal on the whole chunk
        pos, bucket, depth = pos[keep], label[keep], depth[keep] + width
    return order, lcp


def _split(tokens, starts, lengths, order, lcp, pos, bucket, depth, rows, width, new_first):
    """Sort `rows` (whole buckets) on their chunk; record neighbour LCPs and the new bucket cuts."""
    rid = order[pos[rows]]
    chunk, ok = _gather(tokens, starts[rid] + depth[rows], lengths[rid] - depth[rows], width)
    perm = _sort_rows(bucket[rows], chunk, ok)
    order[pos[rows]] = rid[perm]
    chunk, ok = chunk[perm], ok[perm]
    same = ok[1:] & ok[:-1] & (chunk[1:] == chunk[:-1])
    common = np.where(same.all(axis=1), width, np.argmin(same, axis=1))
    cut = (bucket[rows[1:]] == bucket[rows[:-1]]) & (common < width)
    lcp[pos[rows[1:]][cut] - 1] = depth[rows[1:]][cut] + common[cut]
    new_first[rows[1:][cut]] = True


def build_tree(qlen, hq):
    """Compressed tree of the strings with lengths `qlen` (sorted order) and neighbour LCPs `hq`.

    Returns (parent, depth, ends, leaf): node 0 is the root (its parent is itself); depth = string
    depth; ends = strings ending exactly at the node; leaf[i] = node where string i ends."""
    n = len(qlen)
    parent, depth, ends = [0], [0], [0]
    leaf = [0] * n
    stack, stack_d = [0], [0]
    hq = hq.tolist() + [0]
    for i, length in enumerate(qlen.tolist()):
        if stack_d[-1] == length:
            ends[stack[-1]] += 1
            leaf[i] = stack[-1]
        else:
            leaf[i] = len(depth)
            parent.append(stack[-1]), depth.append(length), ends.append(1)
            stack.append(leaf[i]), stack_d.append(length)
        h = hq[i]
        if stack_d[-1] > h:
            while stack_d[-1] > h:
                last = stack.pop()
                stack_d.pop()
            if stack_d[-1] < h:     # branch point inside an edge: new internal node
                parent[last] = len(depth)
                stack.append(len(depth)), stack_d.append(h)
                parent.append(stack[-2]), depth.append(h), ends.append(0)
    as_np = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return as_np(parent), as_np(depth), as_np(ends), as_np(leaf)


def node_levels(parent):
    """Number of edges from each node to the root, by pointer doubling."""
    dist = (np.arange(len(parent)) != 0).astype(np.int64)
    jump = parent.copy()
    while np.any(jump != 0):
        dist += dist[jump]
        jump = jump[jump]
    return dist


def solve_groups(parent, gain, ends, level):
    """Exact one-level grouping: for each node, the node whose group takes its requests.

    A group placed at node v saves gain[v] tokens per member minus one gain[v] (its prefix runs once),
    where gain is the usable (aligned, thresholded) prefix length, nondecreasing with depth. Once a
    group sits at v, taking every request below v that no deeper group took is never worse (it earns
    gain[v] there instead of an ancestor's smaller gain), so each node either closes (groups everything
    passed up to it) or passes everything up. F_v(k) = best value of v's subtree when what it passes
    up is grouped by its ancestor at level k; F_v(k) = max(A_v, sum_c F_c(k) + ends_v * gain[anc_k]),
    A_v = sum_c F_c(level v) + (ends_v - 1) * gain[v]. Work and memory: sum of node levels.
    Returns, per node, the node whose group takes the requests ending there (0: the root, no group)."""
    num = len(parent)
    by_level = np.argsort(level, kind="stable")
    bounds = np.searchsorted(level[by_level], np.arange(level.max() + 2))
    nodes = [by_level[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)]
    slot = np.empty(num, dtype=np.int64)
    for ids in nodes:
        slot[ids] = np.arange(len(ids))
    anc_gain = [np.zeros((1, 0), dtype=np.int64)]
    for k in range(1, len(nodes)):
        par = parent[nodes[k]]
        anc_gain.append(np.hstack([anc_gain[k - 1][slot[par]], gain[par][:, None]]))
    close = [None] * len(nodes)
    below = None                             # F of the level under the current one
    for k in range(len(nodes) - 1, -1, -1):
        ids = nodes[k]
        child_sum = np.zeros((len(ids), k + 1), dtype=np.int64)
        if below is not None:
            kids = nodes[k + 1]
            srt = np.argsort(slot[parent[kids]], kind="stable")
            par_slot = slot[parent[kids]][srt]
            starts = np.flatnonzero(np.r_[True, par_slot[1:] != par_slot[:-1]])
            child_sum[par_slot[starts]] = np.add.reduceat(below[srt], starts, axis=0)
        if k == 0:
            return _assign(parent, nodes, close, level)   # child_sum[0, 0]: the optimum
        e = ends[ids]
        take = child_sum[:, k] + (e - 1) * gain[ids]
        pass_up = child_sum[:, :k] + e[:, None] * anc_gain[k]
        close[k] = take[:, None] >= pass_up
        below = np.maximum(take[:, None], pass_up)


def _assign(parent, nodes, close, level):
    """Top-down: which node's group takes the requests ending at each node (root = no group)."""
    num = len(parent)
    incoming = np.zeros(num, dtype=np.int64)    # nearest closed strict ancestor
    owner = np.zeros(num, dtype=np.int64)
    for k in range(1, len(nodes)):
        ids = nodes[k]
        incoming[ids] = owner[parent[ids]]
        closes = close[k][np.arange(len(ids)), level[incoming[ids]]]
        owner[ids] = np.where(closes, ids, incoming[ids])
    return owner
