"""BASELINE ONLY: a straightforward per-token Python trie with the BatchLLM reference's greedy rule.

Our own implementation of the rule as the paper's reference code describes it (not its code), kept
for side-by-side comparison in bench_clustering.py: it is the thing batchllm_hf.clustering replaces.

Rule (bottom-up over the compressed tree): for node N, child C and grandchild G, promote G to be a
group of its own (prefix = path to C + G's tokens) when (leaves(G) - 1) * len(G) - len(C) > 0; the
grandchildren left under C join C's group; a C left with one child and no prompt ending at C is
merged with that child (longer prefix, same members). The root's children are the groups. Every
prefix is then capped at (shortest member - 1) so each suffix keeps one token, as ours does.
"""


def greedy_groups(prompts):
    """Returns a list of (prefix_len, [request indices]); every request appears exactly once.
    Prompts must be non-empty (as in cluster_prefixes), so no request ends at the root."""
    child = {}                      # (node, token) -> node; node 0 is the root
    ends = {}                       # node -> requests whose prompt ends there
    next_id = 1
    for i, prompt in enumerate(prompts):
        node = 0
        for token in prompt:       # one dict probe per token: the slow part, by design
            key = (node, int(token))
            nxt = child.get(key)
            if nxt is None:
                nxt = child[key] = next_id
                next_id += 1
            node = nxt
        ends.setdefault(node, []).append(i)
    kids = {}
    for (node, _), nxt in child.items():
        kids.setdefault(node, []).append(nxt)
    tree = _compress(kids, ends)
    _flatten(tree)
    groups = []
    lengths = [len(p) for p in prompts]
    for c in tree["kids"]:
        members = c["members"]
        cap = min(lengths[i] for i in members) - 1
        groups.append((min(c["len"], cap) if len(members) > 1 else 0, members))
    return groups


def _compress(kids, ends):
    """Per-token trie -> tree of segments: {'len', 'members' (ending here), 'kids'}."""
    root = {"len": 0, "members": list(ends.get(0, [])), "kids": []}
    todo = [(root, k) for k in kids.get(0, [])]
    while todo:
        parent, node = todo.pop()
        length = 1
        while node not in ends and len(kids.get(node, [])) == 1:
            node = kids[node][0]
            length += 1
        seg = {"len": length, "members": list(ends.get(node, [])), "kids": []}
        parent["kids"].append(seg)
        todo.extend((seg, k) for k in kids.get(node, []))
    return root


def _flatten(root):
    """Post-order: after a node is processed, every child of it is flat (members only)."""
    order, stack = [], [root]
    while stack:
        seg = stack.pop()
        order.append(seg)
        stack.extend(seg["kids"])
    for node in reversed(order):            # children before parents
        flat = []
        for c in node["kids"]:
            kept = []
            for g in c["kids"]:             # g is flat already (its parent c was processed)
                if (len(g["members"]) - 1) * g["len"] - c["len"] > 0:
                    flat.append({"len": c["len"] + g["len"], "members": g["members"], "kids": []})
                else:
                    kept.append(g)
            if len(kept) == 1 and not c["members"]:
                flat.append({"len": c["len"] + kept[0]["len"], "members": kept[0]["members"],
                             "kids": []})
            elif c["members"] or kept:
                members = list(c["members"])
                for g in kept:
                    members.extend(g["members"])
                flat.append({"len": c["len"], "members": members, "kids": []})
        node["kids"] = flat
