"""Generative evaluation inside transformers' Trainer, through BatchGenerator.

`BatchLLMSeq2SeqTrainer` is a `Seq2SeqTrainer` whose `evaluate()` / `predict()` with
`predict_with_generate=True` first generate for EVERY prompt of the (per-process) eval set in one
BatchGenerator run, so prefix grouping spans the whole set rather than one eval batch. The stock loop then
runs unchanged (eval loss, padding, gathering across processes, compute_metrics, callbacks); its
`prediction_step` only takes each row's generation from that run instead of calling `model.generate`,
and lays it out exactly as `generate` would: the prompt as given, then the new tokens, shorter rows
filled with the pad token.

Under several processes the prompts of all ranks are clustered together and whole prefix groups are
dealt to ranks; each rank generates its groups, the generations are exchanged, and the stock loop gathers
the predictions in order.

`GenerationEvalCallback` does the same for a plain `Trainer`: at each evaluation it generates for a fixed
prompt set and adds the metrics a user function computes from the texts.
"""

from __future__ import annotations

import copy
from collections import defaultdict, deque

import torch
from transformers import GenerationConfig, Seq2SeqTrainer, TrainerCallback

from .clustering import cluster_prefixes
from .engine import EngineConfig
from .generator import BatchGenerator


class BatchLLMSeq2SeqTrainer(Seq2SeqTrainer):
    def __init__(self, *args, engine_config: EngineConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine_config = engine_config
        self.generation_stats = None
        self._generated: dict[tuple, deque] | None = None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        loss_only = prediction_loss_only if prediction_loss_only is not None else self.args.prediction_loss_only
        if self.args.predict_with_generate and not loss_only:
            self._generated = self._generate_all(dataloader)
        try:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        finally:
            self._generated = None

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not self.args.predict_with_generate or prediction_loss_only or self._generated is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)
        inputs = self._prepare_inputs(inputs)
        loss = self._eval_loss(model, inputs)
        generated = self._layout_like_generate(inputs["input_ids"], inputs.get("attention_mask"))
        # Pad as Seq2SeqTrainer.prediction_step does, with the generation defaults filled in as it fills them.
        gen_config = self.model.generation_config
        gen_config.update(**gen_config._get_default_generation_params(), defaults_only=True)
        labels = inputs.get("labels")
        padded = []
        for tensor in (generated, labels):
            if tensor is not None and tensor.shape[-1] < gen_config.max_length:
                tensor = self._pad_tensors_to_max_len(tensor, gen_config.max_length)
            elif (tensor is not None and gen_config.max_new_tokens is not None
                  and tensor.shape[-1] < gen_config.max_new_tokens + 1):
                tensor = self._pad_tensors_to_max_len(tensor, gen_config.max_new_tokens + 1)
            padded.append(tensor)
        return loss, padded[0], padded[1]

    # ---- internals -----------------------------------------------------------------------------------------

    def _eval_loss(self, model, inputs):
        """The eval loss exactly as Seq2SeqTrainer.prediction_step computes it (a plain forward with labels)."""
        if "labels" not in inputs:
            return None
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        if self.label_smoother is not None:
            return self.label_smoother(outputs, inputs["labels"]).detach().mean()
        return (outputs["loss"] if isinstance(outputs, dict) else outputs[0]).detach().mean()

    def _generation_config(self) -> GenerationConfig:
        config = copy.deepcopy(self.model.generation_config)
        kwargs = {k: v for k, v in getattr(self, "_gen_kwargs", {}).items() if v is not None and k != "synced_gpus"}
        unused = config.update(**kwargs)
        if unused:
            raise TypeError(f"Generation arguments BatchGenerator does not take: {sorted(unused)}.")
        if config.max_new_tokens is None:
            raise ValueError("BatchLLMSeq2SeqTrainer needs max_new_tokens: set model.generation_config.max_new_tokens "
                             "or pass max_new_tokens to evaluate()/predict().")
        return config

    def _generate_all(self, dataloader) -> dict[tuple, deque]:
        was_training = self.model.training
        self.model.eval()
        try:
            prompts = []
            for batch in dataloader:
                ids = batch["input_ids"]
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
                prompts += [row[m].tolist() for row, m in zip(ids, mask)]
            outputs = self._generate_shared(prompts)
        finally:
            self.model.train(was_training)
        generated: dict[tuple, deque] = defaultdict(deque)
        for prompt, output in zip(prompts, outputs):
            generated[tuple(prompt)].append(output)
        return generated

    def _generate_shared(self, prompts: list[list[int]]) -> list[list[int]]:
        """Generations for this process's prompts. With several processes, the prompts of all ranks are
        clustered together and whole prefix groups are dealt to ranks (balanced by prompt tokens); each rank
        generates its groups and the results are exchanged, so a group is never split across ranks."""
        config = self._generation_config()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            generator = BatchGenerator(self.model, None, engine_config=self.engine_config)
            outputs = generator.generate(prompts, config, return_token_ids=True)
            self.generation_stats = generator.stats
            return outputs
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        per_rank = [None] * world
        torch.distributed.all_gather_object(per_rank, prompts)
        everything = [p for rank_prompts in per_rank for p in rank_prompts]
        engine = (self.engine_config or EngineConfig()).for_device(self.model.device)  # as the engine will group
        mine = _deal_groups(everything, world, min_prefix_len=engine.min_prefix_len or engine.page_size,
                            align=engine.page_size)[rank]
        generator = BatchGenerator(self.model, None, engine_config=self.engine_config)
        outputs = generator.generate([everything[row] for row in mine], config, return_token_ids=True) if mine else []
        self.generation_stats = generator.stats
        results = [None] * world
        torch.distributed.all_gather_object(results, dict(zip(mine, outputs)))
        merged = {row: output for part in results for row, output in part.items()}
        offset = sum(len(p) for p in per_rank[:rank])
        return [merged[offset + i] for i in range(len(prompts))]

    def _layout_like_generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        new = [self._generated[tuple(row[m].tolist())].popleft() for row, m in zip(input_ids, mask)]
        config = self._generation_config()
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
        width = max(map(len, new))
        tail = torch.full((len(new), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for i, tokens in enumerate(new):
            tail[i, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, tail], dim=1)


def _deal_groups(prompts: list[list[int]], world: int, **clustering) -> list[list[int]]:
    """Row indices per rank: whole prefix groups, largest first, each to the rank with the fewest tokens."""
    groups = [list(map(int, g.members)) for g in cluster_prefixes(prompts, **clustering).groups] if prompts else []
    groups.sort(key=lambda rows: -sum(len(prompts[r]) for r in rows))
    shares, load = [[] for _ in range(world)], [0] * world
    for rows in groups:
        target = load.index(min(load))
        shares[target] += rows
        load[target] += sum(len(prompts[r]) for r in rows)
    return shares


class GenerationEvalCallback(TrainerCallback):
    """At each evaluation, generate for `prompts` with BatchGenerator and add `metric_fn(texts)`'s metrics
    (prefixed with `metric_key_prefix`) to the evaluation's metrics and the trainer's log history."""

    def __init__(self, prompts, metric_fn, tokenizer=None, generation_config: GenerationConfig | None = None, *,
                 metric_key_prefix: str = "eval_gen", engine_config: EngineConfig | None = None, **generation_kwargs):
        if not callable(metric_fn):
            raise ValueError("metric_fn must be a function of the list of generations, returning a dict of floats.")
        self.prompts = list(prompts)
        self.metric_fn = metric_fn
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.generation_kwargs = generation_kwargs
        self.metric_key_prefix = metric_key_prefix
        self.engine_config = engine_config

    def on_evaluate(self, args, state, control, model=None, metrics=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        was_training = model.training
        model.eval()
        try:
            generator = BatchGenerator(model, tokenizer, engine_config=self.engine_config)
            texts = generator.generate(self.prompts, self.generation_config, **self.generation_kwargs)
        finally:
            model.train(was_training)
        computed = {f"{self.metric_key_prefix}_{k}": v for k, v in self.metric_fn(texts).items()}
        if metrics is not None:
            metrics.update(computed)
        state.log_history.append({**computed, "step": state.global_step})
        return control
