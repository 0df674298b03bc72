"""BatchLLMSeq2SeqTrainer against stock Seq2SeqTrainer, and the generation callback for a plain Trainer."""

import json
import os
import socket
import subprocess
import sys

import datasets
import pytest
from transformers import Trainer, TrainingArguments

from batchllm_hf.engine import EngineConfig
from batchllm_hf.trainer import GenerationEvalCallback
from hf_models import model_pair, text_prompts, tiny_config, tiny_tokenizer
from trainer_run import collate, compare

HERE = os.path.dirname(os.path.abspath(__file__))


def check(result, min_groups=2):
    assert result["ours_predictions"] == result["stock_predictions"]
    assert result["ours_labels"] == result["stock_labels"]
    for key in ("test_loss", "test_pred_tokens"):
        assert result["ours_metrics"][key] == pytest.approx(result["stock_metrics"][key], rel=1e-5)
    assert result["groups"] >= min_groups  # the (per-process) eval set was grouped by shared prefix


def test_predictions_identical_to_stock_seq2seq_trainer(tmp_path):
    result = compare(str(tmp_path))
    check(result)
    assert result["metric_calls"] == 2


def test_two_processes_gloo(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as probe:  # a free port: a fixed one can still be held by an earlier run
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           os.path.join(HERE, "trainer_run.py"), str(out), str(tmp_path / "trainer")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    check(result, min_groups=0)
    assert len(result["ours_predictions"]) == 12  # every row once, gathered in order
    # Whole prefix groups were dealt to ranks: together they hold the 2 groups and the 12 rows, none split.
    groups, requests = zip(*result["per_rank"])
    assert sum(groups) == 2 and sum(requests) == 12 and all(r > 0 for r in requests)


def test_generation_callback_on_plain_trainer(tmp_path):
    model, _ = model_pair(tiny_config("llama"))
    tokenizer = tiny_tokenizer()
    texts = text_prompts(2)
    ids = [tokenizer(t).input_ids for t in texts]
    dataset = datasets.Dataset.from_dict({"input_ids": ids})
    seen = []

    def metric_fn(generations):
        seen.append(generations)
        return {"mean_words": sum(len(g.split()) for g in generations) / len(generations)}

    callback = GenerationEvalCallback(texts, metric_fn, tokenizer, max_new_tokens=5,
                                      engine_config=EngineConfig(page_size=4, num_pages=256))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, use_cpu=True, report_to=[],
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, data_collator=collate, eval_dataset=dataset, callbacks=[callback])
    metrics = trainer.evaluate()
    assert len(seen) == 1 and len(seen[0]) == len(texts)
    assert metrics["eval_gen_mean_words"] == pytest.approx(sum(len(g.split()) for g in seen[0]) / len(texts))
    assert "eval_loss" in metrics
    assert any("eval_gen_mean_words" in entry for entry in trainer.state.log_history)
