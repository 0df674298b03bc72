"""Every example runs on CPU with the embedded tiny model (small settings)."""

import importlib
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)
    return lambda name: importlib.import_module(name)


def test_document_questions(example):
    out = example("document_questions").main(["--documents", "2", "--questions", "3", "--document-words", "40",
                                              "--max-new-tokens", "3"])
    assert len(out) == 6 and all(isinstance(g, str) and g for g in out["generation"])


def test_best_of_n(example):
    best = example("best_of_n").main(["--n", "3", "--max-new-tokens", "4"])
    assert len(best) == 4 and all(best)


def test_fewshot_classification_in_a_trainer(example):
    metrics = example("fewshot_classification").main(["--steps", "2", "--eval-rows", "6", "--instruction-words", "30"])
    assert "eval_accuracy" in metrics and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["eval_loss"] > 0
