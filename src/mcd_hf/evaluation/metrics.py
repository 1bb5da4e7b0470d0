"""Diversity metrics of samples and confidence intervals for comparing samplers.

`unigram_entropy` follows MDLM (Sahoo et al., 2024, arXiv 2406.07524) and Duo (Sahoo et al., 2025,
arXiv 2506.10892): the entropy of each sample's own token histogram, averaged over samples. Low
generative perplexity with low unigram entropy is collapse, not quality (DESIGN.md section 5).
`ngram_diversity` is "distinct-n" (Li et al., 2016, arXiv 1510.03055).

All metrics take token ids as a LongTensor / array (N, L) or a list of id lists, or texts (a list of
strings): a text is split into characters unless `tokenizer` is given, in which case it is tokenized
without special tokens.
"""

import math
from collections import Counter
from statistics import NormalDist
from typing import NamedTuple, Sequence, Union

import numpy as np
import torch

SequencesLike = Union[torch.Tensor, np.ndarray, Sequence[Sequence[int]], Sequence[str]]


def _as_lists(sequences: SequencesLike, tokenizer=None) -> list[list]:
    """Normalise any accepted input to a list of token lists (ints, or characters for raw texts)."""
    if isinstance(sequences, str):
        raise ValueError("sequences must be a batch (a list of strings or of id lists), got a single string")
    if isinstance(sequences, (torch.Tensor, np.ndarray)):
        if sequences.ndim != 2:
            raise ValueError(f"sequences must have shape (num_sequences, seq_len), got {tuple(sequences.shape)}")
        sequences = sequences.tolist()
    sequences = list(sequences)
    if not sequences:
        raise ValueError("sequences must hold at least one sequence")
    if all(isinstance(item, str) for item in sequences):
        if tokenizer is None:
            return [list(text) for text in sequences]
        return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in sequences]
    return [list(item.tolist() if isinstance(item, torch.Tensor) else item) for item in sequences]


def _plug_in_entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(count / total * math.log(count / total) for count in counts.values())


def unigram_entropy(
    sequences: SequencesLike, tokenizer=None, reduction: str = "mean"
) -> Union[float, torch.Tensor]:
    """Entropy (nats) of each sample's token histogram, averaged over samples.

    "aaaa" -> 0, "abab" -> log 2. For a sample of length L the value is at most log L.

    Args:
        sequences: (N, L) ids, a list of id lists, or a list of texts.
        tokenizer: tokenizes texts (e.g. the judge's, as in the literature); None splits them into characters.
        reduction: "mean" -> float; "none" -> float64 tensor (N,) of per-sample values (for intervals).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    lists = _as_lists(sequences, tokenizer)
    if any(len(tokens) == 0 for tokens in lists):
        raise ValueError("sequences must all be non-empty")
    values = torch.tensor([_plug_in_entropy(Counter(tokens)) for tokens in lists], dtype=torch.float64)
    return values.mean().item() if reduction == "mean" else values


def bigram_entropy(sequences: SequencesLike, tokenizer=None, per_sample: bool = False) -> float:
    """Entropy (nats) of the adjacent-pair distribution of the samples.

    Default (pooled, as in the prototype's table): count every pair (x_t, x_t+1) of every sample, t = 1..L-1,
    in one histogram and take its plug-in entropy. Its true value for a source is
    `source.bigram_entropy(seq_len)`; the plug-in estimate is biased low by about (support - 1) / (2 * pairs),
    negligible for thousands of samples. "abab" -> log 2 (pairs ab, ba, ab).

    Args:
        sequences: (N, L) ids, a list of id lists, or a list of texts.
        tokenizer: as in `unigram_entropy`.
        per_sample: instead, the entropy of each sample's own pair histogram, averaged over samples
            (bounded by log(L - 1), so much lower than the pooled value for short samples).
    """
    lists = _as_lists(sequences, tokenizer)
    pairs_per_sample = [Counter(zip(tokens[:-1], tokens[1:])) for tokens in lists]
    if per_sample:
        if any(not pairs for pairs in pairs_per_sample):
            raise ValueError("with per_sample=True every sequence must have length >= 2")
        return sum(_plug_in_entropy(pairs) for pairs in pairs_per_sample) / len(pairs_per_sample)
    pooled = Counter()
    for pairs in pairs_per_sample:
        pooled.update(pairs)
    if not pooled:
        raise ValueError("sequences must have at least one adjacent pair (a sequence of length >= 2)")
    return _plug_in_entropy(pooled)


def ngram_diversity(sequences: SequencesLike, n: int, tokenizer=None) -> float:
    """Distinct n-grams / total n-grams, pooled over all samples ("distinct-n"; 1 = no n-gram repeats)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lists = _as_lists(sequences, tokenizer)
    ngrams = [tuple(tokens[i : i + n]) for tokens in lists for i in range(len(tokens) - n + 1)]
    if not ngrams:
        raise ValueError(f"sequences must have at least one {n}-gram (a sequence of length >= {n})")
    return len(set(ngrams)) / len(ngrams)


class MeanInterval(NamedTuple):
    """A mean and the half-width of its normal confidence interval: `mean +- half_width`."""

    mean: float
    half_width: float

    @property
    def lower(self) -> float:
        return self.mean - self.half_width

    @property
    def upper(self) -> float:
        return self.mean + self.half_width

    def __str__(self) -> str:
        return f"{self.mean:.4g} +- {self.half_width:.2g}"


def mean_and_interval(
    values: Union[torch.Tensor, np.ndarray, Sequence[float]], confidence: float = 0.95
) -> MeanInterval:
    """Mean and the half-width of its normal-approximation interval, z * std / sqrt(n) (z = 1.96 at 95%).

    The std is the sample std (n - 1). With a single value the half-width is inf (no spread to judge from).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = torch.as_tensor(np.asarray(values, dtype=np.float64)).reshape(-1)
    if values.numel() == 0:
        raise ValueError("values must hold at least one number")
    mean = values.mean().item()
    if values.numel() == 1:
        return MeanInterval(mean, math.inf)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return MeanInterval(mean, z * values.std().item() / math.sqrt(values.numel()))


def paired_difference(
    values_a: Union[torch.Tensor, np.ndarray, Sequence[float]],
    values_b: Union[torch.Tensor, np.ndarray, Sequence[float]],
    confidence: float = 0.95,
) -> MeanInterval:
    """Mean of a - b over paired samples (e.g. two samplers on the same shadows) with its interval.

    Pairing cancels the noise the two share, so the interval is much narrower than combining two
    independent intervals whenever the per-sample values are positively correlated.
    """
    values_a = np.asarray(values_a, dtype=np.float64).reshape(-1)
    values_b = np.asarray(values_b, dtype=np.float64).reshape(-1)
    if values_a.shape != values_b.shape:
        raise ValueError(f"values_a and values_b must pair up (same length), got {len(values_a)} and {len(values_b)}")
    return mean_and_interval(values_a - values_b, confidence)
