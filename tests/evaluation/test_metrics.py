import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from mcd_hf.evaluation import (
    bigram_entropy,
    get_source,
    mean_and_interval,
    ngram_diversity,
    paired_difference,
    unigram_entropy,
)


class CharPairTokenizer:
    """Stand-in tokenizer: one token per two characters, to check that `tokenizer` is used."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [text[i : i + 2] for i in range(0, len(text), 2)]}


def test_unigram_entropy_hand_made_cases():
    assert unigram_entropy(["aaaa"]) == 0.0
    assert unigram_entropy(["abab"]) == pytest.approx(math.log(2))
    assert unigram_entropy(["abcd"]) == pytest.approx(math.log(4))
    assert unigram_entropy(["aaaa", "abab"]) == pytest.approx(math.log(2) / 2)
    per_sample = unigram_entropy(["aaaa", "abab"], reduction="none")
    assert per_sample.dtype == torch.float64
    assert torch.allclose(per_sample, torch.tensor([0.0, math.log(2)], dtype=torch.float64))
    # ids as tensor, numpy and lists agree with the texts
    ids = [[0, 0, 0, 0], [0, 1, 0, 1]]
    for batch in (ids, torch.tensor(ids), np.array(ids)):
        assert unigram_entropy(batch) == pytest.approx(math.log(2) / 2)
    # "abab" as two-character tokens "ab", "ab": one distinct token
    assert unigram_entropy(["abab"], tokenizer=CharPairTokenizer()) == 0.0


def test_bigram_entropy_hand_made_cases():
    assert bigram_entropy(["abab"]) == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert bigram_entropy(["aaaa"]) == 0.0
    # pooled: pairs aa x3 and bb x3 -> log 2; per sample each is 0
    assert bigram_entropy(["aaaa", "bbbb"]) == pytest.approx(math.log(2))
    assert bigram_entropy(["aaaa", "bbbb"], per_sample=True) == 0.0
    assert bigram_entropy(torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])) == pytest.approx(math.log(2))


def test_ngram_diversity_hand_made_cases():
    assert ngram_diversity(["abab"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert ngram_diversity(["abab"], 1) == pytest.approx(2 / 4)
    assert ngram_diversity(["abcd", "abcd"], 4) == pytest.approx(1 / 2)
    assert ngram_diversity(torch.tensor([[0, 1, 2, 3]]), 3) == 1.0


def test_bigram_entropy_estimates_the_source_value():
    source = get_source("markov")
    num_sequences, seq_len = 2000, 64
    samples = source.sample(num_sequences, seq_len, generator=torch.Generator().manual_seed(0))
    true_value = source.bigram_entropy(seq_len)
    pair_probs = source.pair_probabilities(seq_len)
    num_pairs = num_sequences * (seq_len - 1)
    # plug-in entropy ~ H - (support - 1) / (2 n) + mean of (-log p(pair) - H) (delta method); the pairs of
    # one sequence are dependent but sequences are independent, so the noise is the spread of per-sequence sums
    bias = -((pair_probs > 0).sum().item() - 1) / (2 * num_pairs)
    per_sequence = (-pair_probs[samples[:, :-1], samples[:, 1:]].log() - true_value).sum(-1)
    standard_error = per_sequence.std().item() * math.sqrt(num_sequences) / num_pairs
    assert abs(bigram_entropy(samples) - (true_value + bias)) < 5 * standard_error + abs(bias)


def test_mean_and_interval():
    interval = mean_and_interval([1.0, 2.0, 3.0, 4.0])
    expected_half_width = NormalDist().inv_cdf(0.975) * math.sqrt(5 / 3) / 2
    assert interval.mean == 2.5 and interval.half_width == pytest.approx(expected_half_width)
    assert interval.lower == pytest.approx(2.5 - expected_half_width) and "+-" in str(interval)
    mean, half_width = mean_and_interval(torch.tensor([3.0]))
    assert mean == 3.0 and half_width == math.inf
    assert mean_and_interval([1.0, 2.0], confidence=0.5).half_width < mean_and_interval([1.0, 2.0]).half_width


def test_interval_coverage():
    # 1000 intervals of 50 normal draws: coverage ~ binomial(1000, 0.95) (z interval with n = 50 covers
    # 94.4%, t-quantile effect), sd 0.007, so [0.92, 0.98] is beyond 3.5 sigma either way.
    generator = torch.Generator().manual_seed(0)
    draws = torch.randn(1000, 50, generator=generator, dtype=torch.float64) + 1.5
    covered = sum(interval.lower <= 1.5 <= interval.upper for interval in map(mean_and_interval, draws))
    assert 920 <= covered <= 980


def test_paired_difference_cancels_shared_noise():
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(400, generator=generator, dtype=torch.float64) * 10
    values_a = shared + 0.3 + 0.1 * torch.randn(400, generator=generator, dtype=torch.float64)
    values_b = shared
    paired = paired_difference(values_a, values_b)
    assert abs(paired.mean - 0.3) < paired.half_width * 5 / 1.96  # 5 sigma
    unpaired = math.hypot(mean_and_interval(values_a).half_width, mean_and_interval(values_b).half_width)
    assert paired.half_width < unpaired / 20 and paired.lower > 0
    assert paired_difference([1.0, 2.0, 4.0], [0.0, 1.0, 3.0]) == (1.0, 0.0)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="sequences"):
        unigram_entropy("abab")
    with pytest.raises(ValueError, match="sequences"):
        unigram_entropy(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="sequences"):
        bigram_entropy(["a", "b"])
    with pytest.raises(ValueError, match="reduction"):
        unigram_entropy(["ab"], reduction="sum")
    with pytest.raises(ValueError, match="n must"):
        ngram_diversity(["ab"], 0)
    with pytest.raises(ValueError, match="values_a"):
        paired_difference([1.0], [1.0, 2.0])
