"""Evaluation: known-likelihood sources, sample diversity metrics and generative perplexity.

Method of measurement: DESIGN.md section 5 (gen-PPL always with unigram entropy; `NLL - H` on sources
whose exact likelihood is known; paired comparisons on the same shadows).
"""

from .generative_perplexity import GenerativePerplexityOutput, generative_perplexity
from .metrics import (
    MeanInterval,
    bigram_entropy,
    mean_and_interval,
    ngram_diversity,
    paired_difference,
    unigram_entropy,
)
from .quality import RevealPairStatistics, SamplingReport, evaluate_sampling, paired_comparison, reveal_pair_statistics
from .sources import HiddenMarkovSource, KnownLikelihoodSource, MarkovChainSource, get_source

__all__ = [
    "GenerativePerplexityOutput",
    "HiddenMarkovSource",
    "KnownLikelihoodSource",
    "MarkovChainSource",
    "MeanInterval",
    "RevealPairStatistics",
    "SamplingReport",
    "bigram_entropy",
    "evaluate_sampling",
    "generative_perplexity",
    "get_source",
    "mean_and_interval",
    "ngram_diversity",
    "paired_comparison",
    "paired_difference",
    "reveal_pair_statistics",
    "unigram_entropy",
]
