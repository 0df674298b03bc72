"""BatchGenerator: the user-facing batch API over the engine.

    gen = BatchGenerator(model, tokenizer)
    ds = gen.map(ds, prompt_column="prompt", output_column="generation",
                 generation_config=GenerationConfig(max_new_tokens=128))
    texts = gen.generate(prompts, max_new_tokens=64)

Everything about the input is checked before the model runs (errors name the row). The whole set (or a
large window of an IterableDataset) goes to the engine at once, so prefix grouping is dataset-wide.
Finished rows can be logged as they finish (`progress_path`), and `resume=True` skips rows already there.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.utils import logging

from .engine import Engine, EngineConfig
from .jobs import ProgressLog
from .prompts import check_lengths, encode_prompts, row_seeds
from .validation import check_model_supported

logger = logging.get_logger(__name__)


@dataclass
class GeneratorStats:
    requests: int = 0
    groups: int = 0  # groups with a shared prefix
    ungrouped: int = 0  # requests that share no prefix
    logical_prompt_tokens: int = 0
    physical_prompt_tokens: int = 0
    output_tokens: int = 0
    oom_retries: int = 0
    seconds: dict = field(default_factory=dict)

    @property
    def sharing_degree(self) -> float:
        """Mean requests per prefill unit (a shared group or a request of its own)."""
        return self.requests / max(1, self.groups + self.ungrouped)

    @property
    def saving(self) -> float:
        return 1.0 - self.physical_prompt_tokens / max(1, self.logical_prompt_tokens)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / max(1e-9, self.seconds.get("engine", 0.0))

    def __str__(self) -> str:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
        return (f"{self.requests} requests: {self.groups} prefix groups + {self.ungrouped} alone (sharing degree "
                f"{self.sharing_degree:.1f}); "
                f"prompt tokens {self.logical_prompt_tokens} logical -> {self.physical_prompt_tokens} computed "
                f"(saving {self.saving:.1%}); {self.output_tokens} output tokens at {self.output_tokens_per_s:.0f} tok/s; "
                f"{phases}")


class BatchGenerator:
    def __init__(self, model, tokenizer=None, *, engine_config: EngineConfig | None = None):
        check_model_supported(model)
        self.model = model
        self.tokenizer = tokenizer
        self.engine_config = engine_config or EngineConfig()
        self.engine = Engine(model, self.engine_config)
        self.stats = GeneratorStats()

    # ---- public API -------------------------------------------------------------------------------------

    def generate(self, prompts, generation_config: GenerationConfig | None = None, *, seed: int | None = None,
                 return_token_ids: bool = False, **generation_kwargs) -> list:
        """Generate for a list of prompts; results in input order (a list of n results per prompt when
        num_return_sequences = n > 1). Text in, text out (token ids with return_token_ids=True or when the
        prompts are token ids)."""
        config = self._generation_config(generation_config, generation_kwargs)
        encoded = encode_prompts(prompts, self.tokenizer)
        records = self._run(encoded, config, seed=seed)
        as_ids = return_token_ids or self.tokenizer is None or all(_is_ids(p) for p in prompts)
        return [records[row]["token_ids" if as_ids else "text"] for row in range(len(encoded))]

    def map(self, dataset, prompt_column: str = "prompt", output_column: str = "generation",
            generation_config: GenerationConfig | None = None, *, seed: int | None = None,
            max_new_tokens_column: str | None = None, seed_column: str | None = None,
            token_ids_column: str | None = None, finish_reason_column: str | None = "finish_reason",
            progress_path: str | None = None, resume: bool = False, window_size: int = 100_000,
            **generation_kwargs):
        """A new Dataset with the generations as new columns, rows in input order."""
        import datasets

        config = self._generation_config(generation_config, generation_kwargs)
        columns = {"prompt_column": prompt_column, "max_new_tokens_column": max_new_tokens_column,
                   "seed_column": seed_column}
        if isinstance(dataset, datasets.IterableDataset):
            return self._map_iterable(dataset, columns, output_column, token_ids_column, finish_reason_column,
                                      config, seed, window_size)
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(f"map() takes a datasets.Dataset or IterableDataset, got {type(dataset).__name__}.")
        for name in filter(None, columns.values()):
            if name not in dataset.column_names:
                raise ValueError(f"Column {name!r} is not in the dataset (columns: {dataset.column_names}).")
        records = self._run_rows({name: dataset[name] for name in filter(None, columns.values())}, columns, config,
                                 seed, progress_path, resume)
        new = self._output_columns(records, len(dataset), output_column, token_ids_column, finish_reason_column)
        fingerprint = hashlib.sha256(repr((dataset._fingerprint, sorted(columns.items()), output_column,
                                           config.to_json_string(), seed)).encode()).hexdigest()[:16]
        return dataset.map(lambda batch, rows: {k: [v[i] for i in rows] for k, v in new.items()}, batched=True,
                           with_indices=True, new_fingerprint=fingerprint, desc="batchllm_hf outputs")

    # ---- internals -----------------------------------------------------------------------------------------

    def _generation_config(self, generation_config, kwargs) -> GenerationConfig:
        config = copy.deepcopy(generation_config or self.model.generation_config)
        unused = config.update(**kwargs)
        if unused:
            raise TypeError(f"Unknown generation arguments: {sorted(unused)}.")
        if config.max_new_tokens is None:
            raise ValueError("Set max_new_tokens (in the GenerationConfig or as an argument).")
        if (config.num_beams or 1) > 1:
            raise ValueError("BatchGenerator does not do beam search (num_beams > 1); use model.generate with a "
                             "SharedPrefixCache for that.")
        if config.do_sample and config.temperature is not None and config.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {config.temperature}.")
        if config.top_p is not None and not 0.0 < config.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {config.top_p}.")
        if config.top_k is not None and config.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {config.top_k}.")
        if config.repetition_penalty is not None and config.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {config.repetition_penalty}.")
        config.validate(strict=True)
        return config

    def _run_rows(self, table: dict, columns: dict, config, seed, progress_path=None, resume=False) -> dict:
        encoded = encode_prompts(table[columns["prompt_column"]], self.tokenizer, column=columns["prompt_column"])
        max_new = _column_ints(table, columns["max_new_tokens_column"], len(encoded), config.max_new_tokens)
        seeds = _column_ints(table, columns["seed_column"], len(encoded), None)
        return self._run(encoded, config, seed=seed, max_new=max_new, seeds=seeds, progress_path=progress_path,
                         resume=resume)

    def _run(self, encoded, config, *, seed=None, max_new=None, seeds=None, progress_path=None, resume=False):
        """Run the engine on every row not already done; returns {row: record}."""
        text_config = self.model.config.get_text_config()
        max_new = max_new or [config.max_new_tokens] * len(encoded)
        check_lengths(encoded, max_new, getattr(text_config, "max_position_embeddings", None), text_config.vocab_size)
        if seeds is None or all(s is None for s in seeds):
            # Per-row seeds matter only when sampling; hashing every prompt costs time on long prompts.
            seeds = row_seeds(encoded, seed if seed is not None else 0) if config.do_sample else [0] * len(encoded)
        n = int(config.num_return_sequences or 1)
        log = ProgressLog(progress_path, resume=resume) if progress_path else None
        records = dict(log.done) if log else {}
        todo = [row for row in range(len(encoded)) if row not in records]
        samples: dict[int, list] = {}
        bar = _progress_bar(len(encoded), len(encoded) - len(todo))
        start = time.perf_counter()

        def finished(index, output):
            row = todo[index // n]
            samples.setdefault(row, [None] * n)[index % n] = output
            if all(s is not None for s in samples[row]):
                record = self._record(row, samples.pop(row), n)
                records[row] = record
                if log:
                    log.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{self.engine.stats.output_tokens / max(1e-9, time.perf_counter() - start):.0f}")

        attempts = []  # the engine's stats of each attempt (more than one after an out-of-memory error)
        try:
            self._engine_with_oom_retry([encoded[r] for r in todo], config, [max_new[r] for r in todo],
                                        [seeds[r] for r in todo], finished, todo, n, records, attempts)
        finally:
            if log:
                log.close()
            if bar is not None:
                bar.close()
        self._update_stats(attempts, time.perf_counter() - start)
        return records

    def _engine_with_oom_retry(self, prompts, config, max_new, seeds, finished, todo, n, records, attempts):
        while True:
            try:
                self.engine.generate(prompts, config, max_new_tokens_per_request=max_new, seeds=seeds,
                                     on_finish=finished)
                attempts.append(self.engine.stats)
                return
            except torch.OutOfMemoryError:
                attempts.append(self.engine.stats)
                keep = [i for i, row in enumerate(todo) if row not in records]
                if not keep:
                    return
                old = self.engine_config
                self.engine_config = EngineConfig(**{**old.__dict__, "max_batch_tokens": max(1, old.max_batch_tokens // 2),
                                                     "kv_memory_fraction": old.kv_memory_fraction * 0.8,
                                                     "num_pages": old.num_pages // 2 if old.num_pages else None})
                logger.warning("Out of memory: retrying %d unfinished rows with max_batch_tokens=%d, "
                               "kv_memory_fraction=%.2f.", len(keep), self.engine_config.max_batch_tokens,
                               self.engine_config.kv_memory_fraction)
                self.engine = Engine(self.model, self.engine_config)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                todo[:] = [todo[i] for i in keep]
                prompts, max_new, seeds = ([v[i] for i in keep] for v in (prompts, max_new, seeds))

    def _record(self, row: int, outputs: list, n: int) -> dict:
        ids = [list(o.token_ids) for o in outputs]
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in ids] if self.tokenizer else [None] * n
        reasons = [o.finish_reason for o in outputs]
        if n == 1:
            return {"row": row, "text": texts[0], "token_ids": ids[0], "finish_reason": reasons[0]}
        return {"row": row, "text": texts, "token_ids": ids, "finish_reason": reasons}

    def _output_columns(self, records, count, output_column, token_ids_column, finish_reason_column) -> dict:
        ordered = [records[i] for i in range(count)]
        new = {output_column: [r["text"] if self.tokenizer else r["token_ids"] for r in ordered]}
        if token_ids_column:
            new[token_ids_column] = [r["token_ids"] for r in ordered]
        if finish_reason_column:
            new[finish_reason_column] = [r["finish_reason"] for r in ordered]
        return new

    def _map_iterable(self, dataset, columns, output_column, token_ids_column, finish_reason_column, config, seed,
                      window_size):
        import datasets

        def windows():
            window = []
            for example in dataset:
                window.append(example)
                if len(window) == window_size:
                    yield from self._window(window, columns, output_column, token_ids_column, finish_reason_column,
                                            config, seed)
                    window = []
            if window:
                yield from self._window(window, columns, output_column, token_ids_column, finish_reason_column,
                                        config, seed)

        return datasets.IterableDataset.from_generator(windows)

    def _window(self, rows, columns, output_column, token_ids_column, finish_reason_column, config, seed):
        for name in filter(None, columns.values()):
            if name not in rows[0]:
                raise ValueError(f"Column {name!r} is not in the dataset (columns: {list(rows[0])}).")
        table = {k: [r[k] for r in rows] for k in rows[0]}
        records = self._run_rows(table, columns, config, seed)
        new = self._output_columns(records, len(rows), output_column, token_ids_column, finish_reason_column)
        for i, row in enumerate(rows):
            yield {**row, **{k: v[i] for k, v in new.items()}}

    def _update_stats(self, attempts: list, seconds: float) -> None:
        """Stats of one call: grouping from the first engine attempt, work and time summed over attempts."""
        first = attempts[0] if attempts else self.engine.stats
        phases: dict[str, float] = {}
        for attempt in attempts:
            for name, value in attempt.seconds.items():
                key = "engine" if name == "total" else name
                phases[key] = phases.get(key, 0.0) + value
        self.stats = GeneratorStats(
            requests=first.requests, groups=first.groups, ungrouped=first.ungrouped,
            logical_prompt_tokens=first.logical_prompt_tokens,
            physical_prompt_tokens=sum(a.physical_prompt_tokens for a in attempts),
            output_tokens=sum(a.output_tokens for a in attempts), oom_retries=max(0, len(attempts) - 1),
            seconds={**phases, "generator": seconds},
        )


def _column_ints(table: dict, column: str | None, count: int, default) -> list:
    if column is None:
        return [default] * count
    values = table[column]
    for row, value in enumerate(values):
        if value is None and default is not None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Row {row} of column {column!r}: expected a non-negative integer, got {value!r}.")
    return [default if v is None else v for v in values]


def _is_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt)


def _progress_bar(total: int, done: int):
    import datasets
    from tqdm.auto import tqdm

    if not (logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()):
        return None
    return tqdm(total=total, initial=done, unit="req", desc="batchllm_hf")
