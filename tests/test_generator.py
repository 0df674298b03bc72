"""BatchGenerator against per-row plain generate (CPU, fp32), resume, errors, progress and stats."""

import json

import datasets
import pytest
import torch
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

from batchllm_hf import BatchGenerator
from batchllm_hf.engine import EngineConfig
from hf_models import model_pair, text_prompts, tiny_config, tiny_tokenizer

ENGINE = EngineConfig(page_size=4, max_batch_tokens=64, num_pages=512)


@pytest.fixture(scope="module")
def models():
    return model_pair(tiny_config("llama", num_kv_heads=2, ratio=2))


def plain_text(plain, tokenizer, ids, max_new_tokens):
    ids = torch.tensor([ids])
    out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_map_matches_per_row_generate(models):
    ours, plain = models
    tokenizer = tiny_tokenizer()
    texts = text_prompts(5, groups=((13, 4), (9, 3)), singles=2)
    ds = datasets.Dataset.from_dict({"prompt": texts, "id": list(range(len(texts)))})
    gen = BatchGenerator(ours, tokenizer, engine_config=ENGINE)
    out = gen.map(ds, generation_config=GenerationConfig(max_new_tokens=7, do_sample=False),
                  token_ids_column="ids")
    assert out.column_names == ["prompt", "id", "generation", "ids", "finish_reason"]
    assert out["id"] == list(range(len(texts)))
    for row in out:
        assert row["generation"] == plain_text(plain, tokenizer, tokenizer(row["prompt"]).input_ids, 7)
        assert row["finish_reason"] in ("eos", "length")
    assert (gen.stats.groups, gen.stats.ungrouped) == (2, 2)
    assert gen.stats.sharing_degree == pytest.approx(len(texts) / 4)
    assert 0 < gen.stats.physical_prompt_tokens < gen.stats.logical_prompt_tokens
    assert gen.stats.output_tokens == sum(len(i) for i in out["ids"])


def test_generate_with_chat_prompts_and_token_ids(models):
    ours, plain = models
    tokenizer = tiny_tokenizer()
    system = " ".join(f"w{i}" for i in range(20, 36))
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": f"w{7 + i} w{50 + i}"}]
             for i in range(4)]
    gen = BatchGenerator(ours, tokenizer, engine_config=ENGINE)
    texts = gen.generate(chats, max_new_tokens=6)
    for chat, text in zip(chats, texts):
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
        assert text == plain_text(plain, tokenizer, ids, 6)
    as_ids = gen.generate([[7, 8, 9, 10], [7, 8, 9, 11]], max_new_tokens=4)
    assert all(isinstance(t, int) for t in as_ids[0])


def test_seeded_sampling_does_not_depend_on_order_or_batching(models):
    ours, _ = models
    tokenizer = tiny_tokenizer()
    texts = text_prompts(8)
    config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50)
    first = BatchGenerator(ours, tokenizer, engine_config=ENGINE).generate(texts, config, seed=123)
    small = EngineConfig(page_size=8, max_batch_tokens=5, num_pages=256)
    order = list(reversed(range(len(texts))))
    second = BatchGenerator(ours, tokenizer, engine_config=small).generate([texts[i] for i in order], config, seed=123)
    assert [second[order.index(i)] for i in range(len(texts))] == first
    other_seed = BatchGenerator(ours, tokenizer, engine_config=ENGINE).generate(texts, config, seed=124)
    assert other_seed != first


def test_resume_after_interrupted_run_gives_identical_output(models, tmp_path):
    ours, _ = models
    tokenizer = tiny_tokenizer()
    ds = datasets.Dataset.from_dict({"prompt": text_prompts(9)})
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    clean = BatchGenerator(ours, tokenizer, engine_config=ENGINE).map(ds, generation_config=config)

    log_path = str(tmp_path / "progress.jsonl")
    gen = BatchGenerator(ours, tokenizer, engine_config=ENGINE)
    calls = {"n": 0}
    original = gen.engine.generate

    def crash_after_three(*args, on_finish, **kwargs):
        def hook(index, output):
            if calls["n"] == 3:
                raise KeyboardInterrupt
            calls["n"] += 1
            on_finish(index, output)
        return original(*args, on_finish=hook, **kwargs)

    gen.engine.generate = crash_after_three
    with pytest.raises(KeyboardInterrupt):
        gen.map(ds, generation_config=config, progress_path=log_path)
    with open(log_path) as f:
        saved = [json.loads(line) for line in f]
    assert len(saved) == 3
    with open(log_path, "a") as f:
        f.write('{"row": 99, "text": "torn')  # a crash mid-write leaves a cut line

    resumed_gen = BatchGenerator(ours, tokenizer, engine_config=ENGINE)
    resumed = resumed_gen.map(ds, generation_config=config, progress_path=log_path, resume=True)
    assert resumed_gen.stats.requests == len(ds) - 3  # the finished rows were not run again
    assert resumed.to_list() == clean.to_list()


def test_out_of_memory_lowers_budgets_and_continues(models):
    ours, _ = models
    tokenizer = tiny_tokenizer()
    texts = text_prompts(2)
    expected = BatchGenerator(ours, tokenizer, engine_config=ENGINE).generate(texts, max_new_tokens=5)
    gen = BatchGenerator(ours, tokenizer, engine_config=ENGINE)
    original = gen.engine.generate

    def oom_after_two(*args, on_finish, **kwargs):
        def hook(index, output):
            on_finish(index, output)
            if hook.count == 1:
                raise torch.OutOfMemoryError("simulated")
            hook.count += 1
        hook.count = 0
        return original(*args, on_finish=hook, **kwargs)

    gen.engine.generate = oom_after_two
    ids = gen.generate(texts, max_new_tokens=5, return_token_ids=True)
    assert [tiny_tokenizer().decode(t, skip_special_tokens=True) for t in ids] == expected
    assert gen.stats.oom_retries == 1
    assert gen.stats.requests == len(texts)
    assert gen.stats.output_tokens == sum(map(len, ids))  # both attempts counted, nothing twice
    assert gen.engine_config.max_batch_tokens == ENGINE.max_batch_tokens // 2


def test_progress_bar_and_its_switch(models, capsys):
    ours, _ = models
    gen = BatchGenerator(ours, tiny_tokenizer(), engine_config=ENGINE)
    gen.generate(text_prompts(3), max_new_tokens=2)
    assert "batchllm_hf" in capsys.readouterr().err
    hf_logging.disable_progress_bar()
    try:
        gen.generate(text_prompts(3), max_new_tokens=2)
        assert "batchllm_hf" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
    assert "prefix groups" in str(gen.stats)


def test_iterable_dataset_in_windows(models):
    ours, plain = models
    tokenizer = tiny_tokenizer()
    texts = text_prompts(4)
    stream = datasets.Dataset.from_dict({"prompt": texts}).to_iterable_dataset()
    out = list(BatchGenerator(ours, tokenizer, engine_config=ENGINE).map(stream, max_new_tokens=4, window_size=4))
    assert [r["prompt"] for r in out] == texts
    for row in out:
        assert row["generation"] == plain_text(plain, tokenizer, tokenizer(row["prompt"]).input_ids, 4)


def test_per_row_max_new_tokens_column(models):
    ours, _ = models
    ds = datasets.Dataset.from_dict({"prompt": text_prompts(6)[:4], "n": [1, 3, 2, 5]})
    gen = BatchGenerator(ours, tiny_tokenizer(), engine_config=ENGINE)
    out = gen.map(ds, max_new_tokens=9, max_new_tokens_column="n", token_ids_column="ids",
                  generation_config=GenerationConfig(max_new_tokens=9, min_new_tokens=0))
    for n, ids, reason in zip(ds["n"], out["ids"], out["finish_reason"]):
        assert len(ids) == n or reason == "eos"


def test_tokenizer_without_pad_token_is_fine(models):
    ours, _ = models
    out = BatchGenerator(ours, tiny_tokenizer(pad=False), engine_config=ENGINE).generate(text_prompts(1)[:3],
                                                                                         max_new_tokens=3)
    assert len(out) == 3


@pytest.mark.parametrize("bad,match", [
    ({"column": "missing"}, "Column 'missing' is not in the dataset"),
    ({"rows": ["w7 w8", ""]}, "Row 1 of column 'prompt': the prompt is empty"),
    ({"rows": ["w7 w8", None]}, "Row 1 of column 'prompt': a prompt must be"),
    ({"rows": ["w7 w8", "w9 " * 600]}, "Row 1: prompt .* exceeds the model's context"),
    ({"gen": {"num_beams": 2}}, "beam search"),
    ({"gen": {"temperature": -1.0, "do_sample": True}}, "temperature"),
    ({"gen": {"max_new_tokens": None}}, "max_new_tokens"),
])
def test_bad_input_errors_before_model_work(models, bad, match):
    ours, _ = models
    gen = BatchGenerator(ours, tiny_tokenizer(), engine_config=ENGINE)

    def no_model_work(*args, **kwargs):
        raise AssertionError("the engine ran before the input was checked")

    gen.engine.generate = no_model_work
    ds = datasets.Dataset.from_dict({"prompt": bad.get("rows", ["w7 w8", "w9 w10"])})
    gen_kwargs = {"max_new_tokens": 4, **bad.get("gen", {})}
    with pytest.raises(ValueError, match=match):
        gen.map(ds, prompt_column=bad.get("column", "prompt"), **gen_kwargs)


def test_unknown_generation_argument_is_a_type_error(models):
    gen = BatchGenerator(models[0], tiny_tokenizer(), engine_config=ENGINE)
    with pytest.raises(TypeError, match="max_new_tokenz"):
        gen.generate(["w7"], max_new_tokens=2, max_new_tokenz=3)


def test_unsupported_model_refused_at_construction():
    config = tiny_config("mistral")
    config.sliding_window = 64
    model = model_pair(config)[0]
    with pytest.raises(ValueError, match="sliding"):
        BatchGenerator(model, tiny_tokenizer())
