"""Prompt encoding and per-row checks for BatchGenerator: all of it runs before any model work.

A prompt is a string (tokenized as the tokenizer does by default), a chat (a list of {"role", "content"}
messages, through the tokenizer's chat template with the generation prompt added), or a list of token ids.
Errors name the row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def encode_prompts(prompts: Sequence, tokenizer, *, column: str | None = None) -> list[list[int]]:
    where = f" of column {column!r}" if column else ""
    encoded = []
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"Row {row}{where}: the prompt is empty.")
            _need_tokenizer(tokenizer, row, where)
            ids = tokenizer(prompt).input_ids
        elif _is_chat(prompt):
            _need_tokenizer(tokenizer, row, where)
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(f"Row {row}{where} is a chat, but the tokenizer has no chat_template.")
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        elif _is_token_ids(prompt):
            ids = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
        else:
            raise ValueError(
                f"Row {row}{where}: a prompt must be a string, a chat (list of role/content dicts) or a list of "
                f"token ids, got {type(prompt).__name__}: {str(prompt)[:80]!r}."
            )
        if len(ids) == 0:
            raise ValueError(f"Row {row}{where}: the prompt is empty (no tokens).")
        encoded.append(list(ids))
    return encoded


def check_lengths(prompts: list[list[int]], max_new_tokens: list[int], context: int | None, vocab_size: int) -> None:
    for row, (ids, new) in enumerate(zip(prompts, max_new_tokens)):
        if context is not None and len(ids) + new > context:
            raise ValueError(
                f"Row {row}: prompt ({len(ids)} tokens) + max_new_tokens ({new}) = {len(ids) + new} exceeds the "
                f"model's context of {context} tokens (config.max_position_embeddings)."
            )
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            raise ValueError(f"Row {row}: token id {low if low < 0 else high} is outside the vocabulary [0, {vocab_size}).")


def row_seeds(prompts: list[list[int]], seed: int) -> list[int]:
    """One seed per row, a function of (seed, the prompt's tokens, which duplicate of it this is): a row's
    sample does not depend on row order, grouping or batch sizes."""
    seen: dict[bytes, int] = {}
    seeds = []
    for ids in prompts:
        digest = hashlib.blake2b(repr((seed, ids)).encode(), digest_size=8).digest()
        copy = seen.get(digest, 0)
        seen[digest] = copy + 1
        mixed = hashlib.blake2b(digest + copy.to_bytes(8, "little"), digest_size=8).digest()
        seeds.append(int.from_bytes(mixed, "little") >> 1)
    return seeds


def _need_tokenizer(tokenizer, row: int, where: str) -> None:
    if tokenizer is None:
        raise ValueError(f"Row {row}{where} is text; pass a tokenizer to BatchGenerator(model, tokenizer).")


def _is_chat(prompt) -> bool:
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt))


def _is_token_ids(prompt) -> bool:
    if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):
        prompt = prompt.tolist()
    return isinstance(prompt, (list, tuple)) and all(type(t) is int for t in prompt)
