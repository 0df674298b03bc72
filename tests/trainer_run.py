"""Stock Seq2SeqTrainer.predict vs BatchLLMSeq2SeqTrainer.predict on one tiny model (a script, so the
distributed test can run it under torchrun; the single-process test imports `compare`)."""

import json
import os
import sys

import datasets
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from batchllm_hf.engine import EngineConfig
from batchllm_hf.trainer import BatchLLMSeq2SeqTrainer
from hf_models import model_pair, shared_prefix_prompts, tiny_config


def collate(rows):
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([[0] * (length - len(r["input_ids"])) + r["input_ids"] for r in rows])
    mask = torch.tensor([[0] * (length - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def compare(output_dir: str, max_new_tokens: int = 6) -> dict:
    model, _ = model_pair(tiny_config("llama"), seed=4)
    model.generation_config.max_new_tokens = max_new_tokens
    model.generation_config.do_sample = False
    rows = shared_prefix_prompts(seed=12, groups=((14, 5), (9, 4)), singles=3)
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    calls = []

    def metrics(prediction):
        calls.append(1)
        return {"pred_tokens": float((prediction.predictions != 0).sum())}

    args = Seq2SeqTrainingArguments(output_dir=output_dir, per_device_eval_batch_size=3, predict_with_generate=True,
                                    use_cpu=True, report_to=[], remove_unused_columns=False,
                                    ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    common = dict(model=model, args=args, data_collator=collate, compute_metrics=metrics)
    stock = Seq2SeqTrainer(**common).predict(dataset)
    ours_trainer = BatchLLMSeq2SeqTrainer(**common, engine_config=EngineConfig(page_size=4, num_pages=256))
    ours = ours_trainer.predict(dataset)
    return {
        "stock_predictions": stock.predictions.tolist(), "ours_predictions": ours.predictions.tolist(),
        "stock_labels": stock.label_ids.tolist(), "ours_labels": ours.label_ids.tolist(),
        "stock_metrics": stock.metrics, "ours_metrics": ours.metrics, "metric_calls": len(calls),
        "groups": ours_trainer.generation_stats.groups,
        "per_rank": _per_rank((ours_trainer.generation_stats.groups, ours_trainer.generation_stats.requests)),
    }


def _per_rank(value):
    """[value of each rank] (one entry without torch.distributed)."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


if __name__ == "__main__":
    result = compare(sys.argv[2])
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    if torch.distributed.is_initialized():
        # every rank leaves the process group together: a rank that exited with gloo's threads still
        # running aborted once in CI ("terminate called without an active exception", SIGABRT)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
