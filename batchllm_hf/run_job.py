"""`batchllm-hf run`: a whole file of prompts through a local model, resumable.

Finished rows go to `<output>.progress.jsonl` as they finish; the output file (.jsonl, .parquet or .csv,
by extension) is written once at the end, in input order, atomically (temporary file + rename), and the
progress log is then removed. `--resume` after a crash or Ctrl-C skips the rows already in the log.
"""

from __future__ import annotations

import os

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _format(path: str, what: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{what} {path!r}: use a .jsonl, .parquet or .csv file.")
    return FORMATS[ext]


def run_job(model_path: str, data: str, prompt_column: str, output: str, *, max_new_tokens: int = 128,
            temperature: float | None = None, seed: int | None = None, resume: bool = False) -> None:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from .generator import BatchGenerator

    data_format, output_format = _format(data, "--data"), _format(output, "--output")
    if not os.path.exists(data):
        raise ValueError(f"--data {data!r} does not exist.")
    dataset = datasets.load_dataset(data_format, data_files=data, split="train")
    if prompt_column not in dataset.column_names:
        raise ValueError(f"--prompt-column {prompt_column!r} is not in {data} (columns: {dataset.column_names}).")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature is not None and temperature > 0,
                              temperature=temperature if temperature else 1.0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto" if device == "cuda" else torch.float32)
    model = model.to(device).eval()
    generator = BatchGenerator(model, tokenizer)
    progress = output + ".progress.jsonl"
    result = generator.map(dataset, prompt_column=prompt_column, generation_config=config, seed=seed,
                           progress_path=progress, resume=resume)
    tmp = output + ".tmp"
    getattr(result, {"json": "to_json", "parquet": "to_parquet", "csv": "to_csv"}[output_format])(tmp)
    os.replace(tmp, output)
    os.remove(progress)
    print(generator.stats)
