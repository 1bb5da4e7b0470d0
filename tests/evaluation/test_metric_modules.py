"""The `evaluate` metric folders load offline from their paths and return the library's numbers."""

from pathlib import Path

import evaluate
import pytest
from tiny_judge import build_judge, build_judge_tokenizer

from mcd_hf.evaluation import generative_perplexity, unigram_entropy

METRICS = Path(__file__).resolve().parents[2] / "metrics"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_unigram_entropy_module():
    metric = evaluate.load(str(METRICS / "unigram_entropy"))
    texts = ["aaaa", "abab", "abcdefgh"]
    assert metric.compute(predictions=texts) == {"unigram_entropy": unigram_entropy(texts)}
    ids = [[0, 0, 1, 2], [3, 3, 3, 3]]
    assert metric.compute(predictions=ids)["unigram_entropy"] == pytest.approx(unigram_entropy(ids))


def test_generative_perplexity_module(tmp_path):
    judge, tokenizer = build_judge(), build_judge_tokenizer()
    judge.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    texts = ["abcabc", "hgfe<eos>ab", "dddddddd"]
    metric = evaluate.load(str(METRICS / "generative_perplexity"))
    result = metric.compute(predictions=texts, judge=str(tmp_path), batch_size=2)
    expected = generative_perplexity(texts, judge, tokenizer)
    assert result["num_tokens"] == expected.num_tokens == 6 + 5 + 8
    assert result["mean_nll"] == pytest.approx(expected.mean_nll, abs=1e-6)
    assert result["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    # a loaded model and tokenizer work too
    result = metric.compute(predictions=texts, judge=judge, judge_tokenizer=tokenizer)
    assert result["mean_nll"] == pytest.approx(expected.mean_nll, abs=1e-6)
