"""`batchllm-hf demo` (the README's main command) runs and checks itself against plain generate."""

from batchllm_hf.cli import main


def test_demo_runs_and_matches_plain_generate(capsys):
    assert main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "groups 4" in out
    assert "outputs identical to plain generate: True" in out


def _save_tiny_model(path):
    from hf_models import model_pair, tiny_config, tiny_tokenizer

    model, _ = model_pair(tiny_config("llama"))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)


def test_run_writes_output_and_resume_gives_the_same_file(tmp_path, monkeypatch):
    import datasets
    import pytest

    from batchllm_hf.engine import Engine
    from hf_models import text_prompts

    model_dir, data = tmp_path / "model", tmp_path / "data.jsonl"
    _save_tiny_model(model_dir)
    datasets.Dataset.from_dict({"question": text_prompts(3)}).to_json(str(data))
    args = ["run", "--model", str(model_dir), "--data", str(data), "--prompt-column", "question",
            "--max-new-tokens", "4"]
    assert main(args + ["--output", str(tmp_path / "clean.jsonl")]) == 0
    clean = (tmp_path / "clean.jsonl").read_text()
    assert len(clean.splitlines()) == len(text_prompts(3))

    original = Engine.generate

    def crash_after_two(self, *a, on_finish, **k):
        seen = []

        def hook(index, output):
            if len(seen) == 2:
                raise KeyboardInterrupt
            seen.append(index)
            on_finish(index, output)
        return original(self, *a, on_finish=hook, **k)

    monkeypatch.setattr(Engine, "generate", crash_after_two)
    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--output", str(out)])
    assert not out.exists()
    assert len((tmp_path / "resumed.jsonl.progress.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(Engine, "generate", original)
    assert main(args + ["--output", str(out), "--resume"]) == 0
    assert out.read_text() == clean
    assert not (tmp_path / "resumed.jsonl.progress.jsonl").exists()


def test_run_refuses_a_missing_column(tmp_path):
    import datasets
    import pytest

    data = tmp_path / "data.jsonl"
    datasets.Dataset.from_dict({"text": ["w7 w8"]}).to_json(str(data))
    with pytest.raises(ValueError, match="--prompt-column 'prompt' is not in"):
        main(["run", "--model", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "o.jsonl")])
