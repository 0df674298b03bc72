"""Group scheduling, KV page accounting and per-step token batching (pure Python: no torch).

A Group is a shared prefix plus its member Sequences (a group of one has an empty prefix). The prefix runs
as its own sequence: prefilled once (chunked), never decoded; its pages live until the group's last member
finishes. Policies (BatchLLM, arXiv 2412.03594, sec. 4):

- admission: whole groups, in decode-first order (largest expected decode / prefill ratio first), bounded
  by KV pages, not by a request count. A member reserves pages for its prompt + expected new tokens
  (max_new_tokens unless a hint says less); a group that does not fit whole is admitted member by member,
  its remaining members waiting at the head of the queue.
- steps: every running sequence's decode token first, then prefill chunks under the token budget, group by
  group in admission order (a group's prefix, then its members' suffixes, then the next group's), so
  decode-first's first groups start decoding while later groups still prefill.
- pages are allocated as KV grows; if a sequence outgrows its reservation and no page is free, the most
  recently admitted member is preempted: its own pages are freed and it is recomputed later (prompt +
  tokens generated so far), its group's prefix stays. Only when no other sequence runs (to grow one, or
  because the head of the admission queue does not fit) is the prefix of a group with no running member
  freed too, and prefilled again when the group is readmitted (counted in num_preemptions).

A step's result is recorded in two halves so the engine can schedule step N+1 while step N still runs on
the device: `advance(chunks)` when step N is launched (KV counted as computed; each sampled token enters
the output as the placeholder PENDING, which the next step reads from the device), and
`complete(records, tokens)` once its tokens reach the host (placeholders filled, finished sequences
retired; a sequence that finished at step N but was already scheduled in step N+1 has that extra result
dropped). A sequence whose pending token is its last by length is `closing` and is not scheduled again.
`update` is both halves at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

PENDING = -1  # an output token sampled by a step still running on the device


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PageAllocator:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV pages, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)


@dataclass(eq=False)
class Sequence:
    """One request (one sample of a prompt). Own tokens = prompt[prefix_len:] + output."""

    index: int
    prompt: list[int]
    max_new_tokens: int
    expected_new_tokens: int
    stop_ids: frozenset = frozenset()
    eos_ids: frozenset = frozenset()
    group: "Group | None" = None
    output: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    running: bool = False
    finish_reason: str | None = None
    closing: bool = False  # its pending token is its last (max_new_tokens): not scheduled again
    pending_index: int = -1  # where its PENDING token sits among the last launched step's sampled tokens

    @property
    def prefix_len(self) -> int:
        return len(self.group.prefix)

    @property
    def own_tokens(self) -> list[int]:
        return self.prompt[self.prefix_len:] + self.output

    @property
    def num_own_tokens(self) -> int:
        return len(self.prompt) - self.prefix_len + len(self.output)

    def own_slice(self, lo: int, hi: int) -> list[int]:
        """own_tokens[lo:hi] without building the whole list."""
        start = len(self.group.prefix)
        prompt_own = len(self.prompt) - start
        if hi <= prompt_own:
            return self.prompt[start + lo:start + hi]
        if lo >= prompt_own:
            return self.output[lo - prompt_own:hi - prompt_own]
        return self.prompt[start + lo:] + self.output[:hi - prompt_own]


@dataclass(eq=False)
class Group:
    prefix: list[int]
    members: list[Sequence]
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    admitted: bool = False
    num_unfinished: int = 0

    def __post_init__(self):
        self.num_unfinished = len(self.members)
        for seq in self.members:
            seq.group = self

    @property
    def prefix_done(self) -> bool:
        return self.num_computed >= len(self.prefix)

    def decode_ratio(self) -> float:
        decode = sum(s.expected_new_tokens for s in self.members)
        prefill = len(self.prefix) + sum(len(s.prompt) - len(self.prefix) for s in self.members)
        return decode / max(1, prefill)


@dataclass(frozen=True)
class Chunk:
    """`length` tokens of a sequence's own KV from `start`; `seq` is a Sequence or a Group (its prefix)."""

    seq: Sequence | Group
    start: int
    length: int
    sample: bool


class Scheduler:
    def __init__(self, num_pages: int, page_size: int, max_batch_tokens: int, max_num_seqs: int | None = None,
                 decode_first: bool = True):
        self.allocator = PageAllocator(num_pages)
        self.page_size = page_size
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.decode_first = decode_first
        self.groups: list[Group] = []   # not yet admitted, in admission order
        self.open: deque[Group] = deque()  # admitted, with members still waiting (e.g. preempted)
        self.running: list[Sequence] = []  # admitted members in admission order
        self.prefilling: list[Group] = []   # admitted groups whose prefix is not complete
        self.num_preemptions = 0
        self.num_unfinished = 0

    # ---- input -------------------------------------------------------------------------------------
    def add_group(self, group: Group) -> None:
        for seq in group.members:
            need = pages_for(len(group.prefix), self.page_size) + self._pages_needed(seq, seq.max_new_tokens)
            if need > self.allocator.num_pages:
                raise ValueError(
                    f"Request {seq.index} needs {need} KV pages (prompt {len(seq.prompt)} + {seq.max_new_tokens} new "
                    f"tokens) but the pool has {self.allocator.num_pages}: lower max_new_tokens or give more KV memory."
                )
        self.groups.append(group)
        self.num_unfinished += len(group.members)

    def _pages_needed(self, seq: Sequence, new_tokens: int) -> int:
        return pages_for(len(seq.prompt) - len(seq.group.prefix) + new_tokens, self.page_size)

    @property
    def done(self) -> bool:
        return self.num_unfinished == 0

    # ---- admission ---------------------------------------------------------------------------------
    def _outstanding(self) -> int:
        """Pages promised to running sequences but not allocated yet (prefix pages are allocated at admission)."""
        total = 0
        for seq in self.running:
            total += max(0, self._pages_needed(seq, seq.expected_new_tokens) - len(seq.pages))
        return total

    def _admit(self) -> None:
        if not (self.open or self.groups):  # everything admitted (a decode phase): skip the page accounting
            return
        if self.decode_first and self.groups:
            self.groups.sort(key=lambda g: (-g.decode_ratio(), min(s.index for s in g.members)))
        available = self.allocator.num_free - self._outstanding()
        while self.open or self.groups:
            group = self.open[0] if self.open else self.groups[0]
            cost = 0 if group.admitted else pages_for(len(group.prefix), self.page_size)
            waiting = [s for s in group.members if not s.running and s.finish_reason is None]
            taken = []
            for seq in waiting:
                need = max(self._pages_needed(seq, seq.expected_new_tokens), self._pages_needed(seq, len(seq.output) + 1))
                if cost + need > available:
                    break
                if self.max_num_seqs is not None and len(self.running) + len(taken) >= self.max_num_seqs:
                    break
                cost += need
                taken.append(seq)
            if not taken:
                # nothing runs, so nothing will free pages: free an idle group's prefix for the head of the queue
                if not self.running and self._evict_idle_prefix(group):
                    available = self.allocator.num_free - self._outstanding()
                    continue
                return
            available -= cost
            if not group.admitted:
                group.admitted = True
                group.pages = self.allocator.allocate(pages_for(len(group.prefix), self.page_size))
                if group.prefix:
                    self.prefilling.append(group)
                self.groups.pop(0)
                if len(taken) < len(waiting):
                    self.open.append(group)
            elif len(taken) == len(waiting):
                self.open.popleft()
            for seq in taken:
                seq.running = True
                self.running.append(seq)

    # ---- pages and preemption ----------------------------------------------------------------------
    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` pages for `num_tokens` own tokens, preempting later-admitted members if needed."""
        need = pages_for(num_tokens, self.page_size) - len(seq.pages)
        while need > self.allocator.num_free:
            victim = next((s for s in reversed(self.running) if s is not seq), None)
            if victim is not None:
                self._preempt(victim)
            elif not self._evict_idle_prefix(seq.group):
                return False
        if need > 0:
            seq.pages += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.pages)
        seq.pages, seq.num_computed, seq.running = [], 0, False
        if seq.group not in self.open:
            self.open.appendleft(seq.group)
        self.num_preemptions += 1

    def _evict_idle_prefix(self, keep: Group) -> bool:
        """The last resort when no running sequence is left to preempt (or none runs, and the head of the
        admission queue does not fit): free the prefix pages of a group other than `keep` none of whose
        members runs, which then waits to be admitted and prefilled again. Without it, a member that outgrows
        its reservation (a hint below max_new_tokens) could wait forever on pages that such a group holds."""
        for group in self.open:
            if group is not keep and group.pages and not any(s.running for s in group.members):
                self.allocator.free(group.pages)
                group.pages, group.num_computed, group.admitted = [], 0, False
                self.open.remove(group)
                if group in self.prefilling:
                    self.prefilling.remove(group)
                self.groups.insert(0, group)
                self.num_preemptions += 1
                return True
        return False

    # ---- one step ----------------------------------------------------------------------------------
    def schedule(self) -> list[Chunk]:
        """Admit what fits, then plan one step: decode tokens first, then prefill chunks under the budget,
        group by group in admission order."""
        self._admit()
        budget = self.max_batch_tokens
        decodes = []
        for seq in list(self.running):
            if (seq.running and seq.output and not seq.closing and seq.num_computed == seq.num_own_tokens - 1
                    and budget > 0):
                if self._grow(seq, seq.num_own_tokens):
                    decodes.append(seq)
                    budget -= 1
        decodes = [s for s in decodes if s.running]  # a later _grow may have preempted an earlier one
        chunks = [Chunk(s, s.num_computed, 1, True) for s in self._by_group(decodes)]
        # Prefill group by group, in admission order: a group's prefix, then its members' suffixes, then the
        # next group's. The group admitted first (decode-first: the most decode-heavy) then starts decoding
        # while later groups still prefill, instead of waiting behind every admitted group's prefix.
        unstarted = set(self.prefilling)  # groups whose prefix has no chunk in this step yet
        for seq in self.running:
            if budget <= 0:
                break
            if seq.group in unstarted:
                unstarted.discard(seq.group)
                budget = self._prefix_chunk(seq.group, budget, chunks)
            pending = seq.num_own_tokens - seq.num_computed
            if budget <= 0 or seq.output and pending == 1 or not self._prefix_ready(seq, chunks):
                continue
            n = min(budget, pending)
            if not self._grow(seq, seq.num_computed + n):
                break
            chunks.append(Chunk(seq, seq.num_computed, n, seq.num_computed + n == seq.num_own_tokens))
            budget -= n
        for group in self.prefilling:  # prefixes not reached above (no member running, or a full pool)
            if budget <= 0:
                break
            if group in unstarted:
                budget = self._prefix_chunk(group, budget, chunks)
        running = set(self.running)  # a later _grow may have preempted a sequence or evicted a prefix
        return [c for c in chunks if (c.seq.admitted if isinstance(c.seq, Group) else c.seq in running)]

    @staticmethod
    def _prefix_chunk(group: Group, budget: int, chunks: list[Chunk]) -> int:
        """Append the next chunk of `group`'s prefix that fits `budget`; return the budget left."""
        n = min(budget, len(group.prefix) - group.num_computed)
        chunks.append(Chunk(group, group.num_computed, n, False))
        return budget - n

    def decode_batch_ahead(self) -> list[Sequence] | None:
        """The sequences of the decode-only step to come once the admitted prompts are prefilled (every
        running one not finishing: not closing, and not ending at its first token), in schedule()'s group
        order; None while groups still wait for admission (the batch is not known yet)."""
        if self.open or self.groups:
            return None
        return self._by_group([s for s in self.running if not s.closing and (s.output or s.max_new_tokens > 1)])

    @staticmethod
    def _prefix_ready(seq: Sequence, chunks: list[Chunk]) -> bool:
        group = seq.group
        if group.prefix_done:
            return True
        return any(c.seq is group and c.start + c.length == len(group.prefix) for c in chunks)

    @staticmethod
    def _by_group(seqs: list[Sequence]) -> list[Sequence]:
        order: dict[int, int] = {}
        for s in seqs:
            order.setdefault(id(s.group), len(order))
        return sorted(seqs, key=lambda s: order[id(s.group)])

    def update(self, chunks: list[Chunk], sampled: list[int]) -> list[Sequence]:
        """Record a finished step: `sampled` holds one token per chunk with `sample`, in chunk order.
        Returns the sequences that finished."""
        return self.complete(self.advance(chunks), sampled)

    def advance(self, chunks: list[Chunk]) -> list[tuple[Sequence, int]]:
        """A step was launched: its KV counts as computed and each sampled token enters its sequence's
        output as PENDING. Returns (sequence, output index) per sampled token, in chunk order."""
        records = []
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed = chunk.start + chunk.length
            if isinstance(seq, Group):
                if seq.prefix_done:
                    self.prefilling.remove(seq)
                continue
            if chunk.sample:
                seq.pending_index = len(records)
                records.append((seq, len(seq.output)))
                seq.output.append(PENDING)
                seq.closing = len(seq.output) >= seq.max_new_tokens
        return records

    def complete(self, records: list[tuple[Sequence, int]], sampled: list[int]) -> list[Sequence]:
        """The tokens of an advanced step arrived: fill them in and retire finished sequences (returned)."""
        finished = []
        for (seq, index), token in zip(records, sampled, strict=True):
            if seq.finish_reason is not None:  # finished at an earlier step; this result was speculative
                continue
            seq.output[index] = token
            reason = self._finish_reason(seq, token, index + 1)
            if reason is not None:
                del seq.output[index + 1:]
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    @staticmethod
    def _finish_reason(seq: Sequence, token: int, num_generated: int) -> str | None:
        # min_new_tokens is enforced by the sampler (eos and stop ids masked until then).
        if token in seq.eos_ids:
            return "eos"
        if token in seq.stop_ids:
            return "stop"
        if num_generated >= seq.max_new_tokens:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.running:
            self.running.remove(seq)
        else:  # preempted while its last token was pending: it waits in its open group no more
            group = seq.group
            if group in self.open and not any(not s.running and s.finish_reason is None for s in group.members):
                self.open.remove(group)
        seq.running = False
        self.allocator.free(seq.pages)
        seq.pages = []
        self.num_unfinished -= 1
        group = seq.group
        group.num_unfinished -= 1
        if group.num_unfinished == 0:
            self.allocator.free(group.pages)
            group.pages = []

    # ---- accounting --------------------------------------------------------------------------------
    def pages_in_use(self) -> tuple[int, int]:
        """(prefix pages, own pages) currently allocated."""
        own = sum(len(s.pages) for s in self.running)
        return self.allocator.num_pages - self.allocator.num_free - own, own
