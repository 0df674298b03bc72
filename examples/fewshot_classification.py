"""Few-shot classification with one long shared instruction, scored by accuracy during training.

Every eval prompt is the same long instruction + few-shot examples, then one item to label. A
BatchLLMSeq2SeqTrainer fine-tunes the model and, at each evaluation, generates the labels of the WHOLE
eval set through BatchGenerator (the instruction is prefilled once), and compute_metrics reports accuracy.
With the default tiny random model and 20 steps the model has not learned the labels (accuracy near 0);
the point is the loop. With --model PATH and more steps it measures a real model.

    python examples/fewshot_classification.py [--model PATH] [--steps 20]
"""

import random
import tempfile

import datasets
import numpy as np
import torch
from transformers import Seq2SeqTrainingArguments

from _common import load, parser
from batchllm_hf.trainer import BatchLLMSeq2SeqTrainer


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=24)
    p.add_argument("--instruction-words", type=int, default=150)
    args = p.parse_args(argv)
    model, tokenizer, word = load(args.model)
    rng = random.Random(0)
    labels = [word(900), word(901)]
    label_ids = [tokenizer(label, add_special_tokens=False).input_ids[0] for label in labels]
    instruction = " ".join(word(rng.randrange(800)) for _ in range(args.instruction_words))

    def example(i, with_label):
        item = " ".join(word(rng.randrange(800)) for _ in range(6))
        gold = i % 2
        prompt_ids = tokenizer(f"{instruction} {item}").input_ids
        # Training rows end with their label; eval rows are the prompt alone (the model must generate it).
        return {"input_ids": prompt_ids + [label_ids[gold]] if with_label else prompt_ids, "gold": gold}

    train = datasets.Dataset.from_list([example(i, True) for i in range(64)])
    evaluation = datasets.Dataset.from_list([example(i, False) for i in range(args.eval_rows)])

    def collate(rows):
        length = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (length - len(r["input_ids"])) + r["input_ids"] for r in rows])
        mask = torch.tensor([[0] * (length - len(r["input_ids"])) + [1] * len(r["input_ids"]) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def compute_metrics(prediction):
        # predictions are the (left-padded) prompt + generation; the first generated token is the label. All
        # eval prompts have the same length here, so it sits in one column.
        width = max(len(r) for r in evaluation["input_ids"])
        gold = np.array([label_ids[g] for g in evaluation["gold"]])
        return {"accuracy": float((prediction.predictions[:, width] == gold).mean())}

    model.generation_config.max_new_tokens = 1
    model.generation_config.do_sample = False
    with tempfile.TemporaryDirectory() as out:
        training = Seq2SeqTrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=8, per_device_eval_batch_size=8,
            learning_rate=1e-3, eval_strategy="steps", eval_steps=max(1, args.steps // 2), logging_steps=5,
            predict_with_generate=True, report_to=[], remove_unused_columns=False, save_strategy="no",
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = BatchLLMSeq2SeqTrainer(model=model, args=training, train_dataset=train, eval_dataset=evaluation,
                                         data_collator=collate, compute_metrics=compute_metrics)
        trainer.train()
        metrics = trainer.evaluate()
    print({k: v for k, v in metrics.items() if k in ("eval_loss", "eval_accuracy")})
    print(trainer.generation_stats)
    return metrics


if __name__ == "__main__":
    main()
