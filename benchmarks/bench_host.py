"""Host (CPU) time of the engine's per-step bookkeeping, without a model: scheduling, packing the step,
the attention work plan, and recording its tokens. CPU only; no GPU needed.

    python benchmarks/bench_host.py [--groups 50 --members 16 --prefix 2000 --suffix 200 --steps 50]

Defaults are W-paper's shape (800 requests decoding at once). On the H200 (session 3) W-paper's 99
decode-only steps took 28-59 ms each, 40 ms on average, where weights + KV bytes allow about 8 ms; this
measures whether the engine's own bookkeeping explains that. It does not: 3.6 ms per step here (2-core CPU
machine: schedule 1.6, packing 1.1, work plan 0.7, recording 0.3). Prints milliseconds per decode step for
each part.
"""

from __future__ import annotations

import argparse
import random
import time

from batchllm_hf.engine.runner import build_host_step
from batchllm_hf.engine.scheduler import Group, Scheduler, Sequence
from batchllm_hf.kernels.attention_plan import plan_attention


def decode_ready_scheduler(groups: int, members: int, prefix: int, suffix: int, page_size: int, new_tokens: int):
    rng = random.Random(0)
    scheduler = Scheduler(num_pages=10 ** 6, page_size=page_size, max_batch_tokens=8192)
    for _ in range(groups):
        head = [rng.randrange(3, 1000) for _ in range(prefix)]
        seqs = [Sequence(index=0, prompt=head + [rng.randrange(3, 1000) for _ in range(suffix)],
                         max_new_tokens=new_tokens, expected_new_tokens=new_tokens) for _ in range(members)]
        scheduler.add_group(Group(head, seqs))
    while True:  # prefill everything (no model: tokens are made up)
        chunks = scheduler.schedule()
        scheduler.update(chunks, [7] * sum(c.sample for c in chunks))
        if all(c.length == 1 for c in chunks):
            return scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=2000)
    parser.add_argument("--suffix", type=int, default=200)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    scheduler = decode_ready_scheduler(args.groups, args.members, args.prefix, args.suffix, args.page_size,
                                       args.steps + 200)
    parts = {"schedule": 0.0, "build_host_step": 0.0, "plan_attention": 0.0, "advance+complete": 0.0}
    import torch

    for step in range(args.steps + 5):  # the first 5 are a warm-up
        if step == 5:
            parts = dict.fromkeys(parts, 0.0)
        t0 = time.perf_counter()
        chunks = scheduler.schedule()
        t1 = time.perf_counter()
        host = build_host_step(chunks, args.page_size, True)
        t2 = time.perf_counter()
        plan_attention(host.q_starts, host.own_lens, host.seq_group, host.prefix_lens, 28, 4, 128,
                       torch.device("cpu"), num_sms=132)
        t3 = time.perf_counter()
        records = scheduler.advance(chunks)
        scheduler.complete(records, [7] * len(records))
        t4 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name] += dt
    seqs = len(chunks)
    print(f"{seqs} sequences decoding, page_size {args.page_size}: ms per step " +
          ", ".join(f"{k} {1e3 * v / args.steps:.2f}" for k, v in parts.items()) +
          f"; total {1e3 * sum(parts.values()) / args.steps:.2f}")


if __name__ == "__main__":
    main()
