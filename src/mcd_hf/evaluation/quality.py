"""Measure a sampler: quality, diversity and cost of `MCDPipeline` samples at a given step count.

`evaluate_sampling` is the one measurement used by `mcd-hf evaluate`, the quickstart and the benchmarks
(DESIGN.md section 5):

- quality on a known-likelihood source: `NLL - H` per sample (the source's exact NLL per token minus the
  per-token entropy of length-L sequences, impossible transitions floored at 1e-6), and the percentage of
  adjacent pairs the source can never produce; with an autoregressive judge, generative perplexity;
- diversity: unigram entropy per sample (as MDLM reports it) and the pooled bigram entropy;
- cost: model calls per batch, the steps that reveal tokens per sequence (the forward passes one sequence
  needs when steps that reveal nothing are skipped), and seconds per sample.

Evaluations are paired: sequence `i` is always drawn with its own `torch.Generator().manual_seed(seed + i)`,
whatever the batch size. With the shadow sampler that fixes each position's shadow `u_i` and value noise
`r_i`, so the teacher at T steps and a student at T/16 steps sample from the same noise and
`paired_comparison` measures their difference with the shared noise cancelled.

The reveal diagnostic (`RevealPairStatistics`) splits adjacent pairs by whether both tokens were revealed in
the same sampler step: tokens drawn in the same step are drawn independently given the state, so that is
where a few-step sampler loses coherence (the prototype: 45% impossible pairs among same-step pairs at 4
steps, 3.5% among the rest).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

import torch

from .metrics import MeanInterval, bigram_entropy, mean_and_interval, paired_difference, unigram_entropy
from .sources import KnownLikelihoodSource, get_source

__all__ = [
    "NLL_FLOOR",
    "RevealPairStatistics",
    "SamplingReport",
    "evaluate_sampling",
    "paired_comparison",
    "reveal_pair_statistics",
]

# Probability given to impossible transitions when scoring samples (as in the prototype): finite penalties.
NLL_FLOOR = 1e-6

SAMPLERS = ("shadow", "ancestral")


@dataclass
class RevealPairStatistics:
    """Adjacent pairs split by whether both tokens were revealed in the same sampler step.

    For the pair (x_i, x_i+1), its "NLL contribution" is the source's conditional NLL of x_i+1 given
    x_1..x_i (floored at `NLL_FLOOR`); for a Markov chain that is -log P(x_i -> x_i+1). An exact sampler has
    the same mean in both groups (about the entropy rate).

    Attributes:
        same_step_pairs, different_step_pairs: pair counts (they add up to N * (L - 1)).
        same_step_impossible_percent, different_step_impossible_percent: % of the group's pairs the source
            never produces (nan for an empty group).
        same_step_nll, different_step_nll: mean NLL contribution of the group's pairs, nats (nan if empty).
    """

    same_step_pairs: int
    different_step_pairs: int
    same_step_impossible_percent: float
    different_step_impossible_percent: float
    same_step_nll: float
    different_step_nll: float

    @property
    def same_step_fraction(self) -> float:
        total = self.same_step_pairs + self.different_step_pairs
        return self.same_step_pairs / total if total else math.nan


def reveal_pair_statistics(
    sequences: torch.Tensor, reveal_steps: torch.Tensor, source: KnownLikelihoodSource
) -> RevealPairStatistics:
    """Error rate of adjacent pairs revealed in the same step vs in different steps.

    Args:
        sequences: (N, L) token ids of the samples.
        reveal_steps: (N, L) the sampler step at which each position was revealed (any integers; only
            equality matters).
        source: the known-likelihood source that scores the pairs.
    """
    sequences = torch.as_tensor(sequences).long().cpu()
    reveal_steps = torch.as_tensor(reveal_steps).cpu()
    if sequences.ndim != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must have shape (N, L) with L >= 2, got {tuple(sequences.shape)}")
    if reveal_steps.shape != sequences.shape:
        raise ValueError(
            f"reveal_steps must have the shape of sequences {tuple(sequences.shape)}, got {tuple(reveal_steps.shape)}"
        )
    same = (reveal_steps[:, 1:] == reveal_steps[:, :-1]).reshape(-1)
    possible = source.pair_probabilities() > 0
    impossible = (~possible[sequences[:, :-1], sequences[:, 1:]]).reshape(-1).double()
    nll = (-source.token_log_probs(sequences, floor=NLL_FLOOR)[:, 1:]).reshape(-1)

    def group_mean(values: torch.Tensor, selection: torch.Tensor) -> float:
        return values[selection].mean().item() if bool(selection.any()) else math.nan

    return RevealPairStatistics(
        same_step_pairs=int(same.sum()),
        different_step_pairs=int((~same).sum()),
        same_step_impossible_percent=100.0 * group_mean(impossible, same),
        different_step_impossible_percent=100.0 * group_mean(impossible, ~same),
        same_step_nll=group_mean(nll, same),
        different_step_nll=group_mean(nll, ~same),
    )


@dataclass
class SamplingReport:
    """What `evaluate_sampling` measured for one (pipeline, steps, temperature) setting.

    Intervals are `MeanInterval(mean, half_width)` at 95% over samples. Fields that need a source or a judge
    are None without one.

    Attributes:
        label: free name of the system (e.g. "teacher", "mcd"), for tables.
        num_inference_steps, temperature, sampler, num_samples, seq_len, seed, batch_size: the setting.
        excess_nll: per-sample NLL per token under the source minus its per-token entropy at `seq_len`.
        impossible_pair_percent: % of adjacent pairs the source never produces.
        reference_bigram_entropy: exact pooled bigram entropy of the source at `seq_len` (the target of
            `bigram_entropy`).
        unigram_entropy: per-sample unigram entropy (nats).
        bigram_entropy: pooled bigram entropy of all samples (nats).
        generative_perplexity: exp of the judge's token-weighted mean NLL, with a judge.
        judge_nll: per-sample mean judge NLL per token, with a judge.
        model_calls_per_batch: mean forward passes the pipeline made per batch call.
        reveal_steps_per_sequence: mean number of steps that reveal tokens of a sequence: the forward passes a
            sequence needs alone when steps that reveal nothing are skipped (model without time conditioning).
        seconds_per_sample: wall time of the pipeline calls divided by `num_samples`.
        reveal_pairs: the same-step / different-step split of adjacent pairs, with a source.
        per_sample: per-sample values ("excess_nll", "unigram_entropy", "judge_nll") for `paired_comparison`.
        sequences: the (N, L) samples when `return_sequences=True`.
        reveal_steps: with `return_sequences=True`, (N, L) the step index at which each position was revealed
            (-1 for tokens given in advance).
    """

    label: str
    num_inference_steps: int
    temperature: float
    sampler: str
    num_samples: int
    seq_len: int
    seed: int
    batch_size: int
    excess_nll: Optional[MeanInterval]
    impossible_pair_percent: Optional[float]
    reference_bigram_entropy: Optional[float]
    unigram_entropy: MeanInterval
    bigram_entropy: float
    generative_perplexity: Optional[float]
    judge_nll: Optional[MeanInterval]
    model_calls_per_batch: float
    reveal_steps_per_sequence: float
    seconds_per_sample: float
    reveal_pairs: Optional[RevealPairStatistics]
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    sequences: Optional[torch.Tensor] = field(default=None, repr=False)
    reveal_steps: Optional[torch.Tensor] = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (intervals as {"mean", "half_width"}; no tensors)."""
        result: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name in ("per_sample", "sequences", "reveal_steps"):
                continue
            if isinstance(value, MeanInterval):
                value = {"mean": value.mean, "half_width": value.half_width}
            elif isinstance(value, RevealPairStatistics):
                value = {**asdict(value), "same_step_fraction": value.same_step_fraction}
            result[item.name] = value
        return result


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def _runner(pipe, sampler: Optional[str]):
    """A pipeline sharing `pipe`'s components (no copy), with the given sampler and no progress bar.

    `pipe` itself is left unchanged (its scheduler config and progress bar setting).
    """
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"`sampler` must be one of {SAMPLERS} or None, got {sampler!r}.")
    components = dict(pipe.components)
    if sampler is not None and pipe.scheduler.config.sampler != sampler:
        components["scheduler"] = type(pipe.scheduler).from_config(pipe.scheduler.config, sampler=sampler)
    runner = type(pipe)(**components)
    runner.set_progress_bar_config(disable=True)
    return runner


def _resolve_source(source: Union[str, KnownLikelihoodSource, None], pipe) -> Optional[KnownLikelihoodSource]:
    if source is None:
        return None
    if isinstance(source, str):
        source = get_source(source)
    if not isinstance(source, KnownLikelihoodSource):
        raise ValueError(f"`source` must be a source name or a KnownLikelihoodSource, got {type(source).__name__}.")
    mask_id, vocab_size = pipe.model.config.mask_token_id, pipe.model.config.vocab_size
    if mask_id != vocab_size - 1 or vocab_size - 1 != source.vocab_size:
        raise ValueError(
            f"`source` has {source.vocab_size} tokens but the pipeline's model has vocab_size={vocab_size} with "
            f"mask_token_id={mask_id}; expected vocab_size = source tokens + 1 with the mask last."
        )
    return source


def _sample_batch(runner, generators, seq_len, num_inference_steps, temperature):
    """One pipeline call; returns (sequences, reveal_steps, num_model_calls, seconds)."""
    mask_id = runner.mask_token_id
    reveal_steps = torch.full((len(generators), seq_len), -1, dtype=torch.long)

    def record_reveals(pipe, step_index, timestep, callback_kwargs):
        # A position's reveal step: the first step after which it is no longer the mask id.
        sample = callback_kwargs["sample"].cpu()
        newly_revealed = (reveal_steps < 0) & (sample != mask_id)
        reveal_steps[newly_revealed] = step_index
        return None

    start = time.perf_counter()
    output = runner(
        batch_size=len(generators), seq_len=seq_len, num_inference_steps=num_inference_steps, generator=generators,
        temperature=temperature, output_type="ids", callback_on_step_end=record_reveals,
        callback_on_step_end_tensor_inputs=["sample"],
    )
    seconds = time.perf_counter() - start
    return output.sequences.cpu(), reveal_steps, output.num_model_calls, seconds


def evaluate_sampling(
    pipe,
    *,
    num_inference_steps: int,
    num_samples: int,
    seq_len: Optional[int] = None,
    source: Union[str, KnownLikelihoodSource, None] = None,
    judge=None,
    judge_tokenizer=None,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    sampler: Optional[str] = "shadow",
    label: str = "",
    return_sequences: bool = False,
) -> SamplingReport:
    """Sample `num_samples` sequences from `pipe` and measure quality, diversity and cost.

    Sequence `i` uses `torch.Generator().manual_seed(seed + i)` (CPU generators: the same noise on any device),
    so two calls with the same `seed` and `num_samples` are paired sample by sample.

    Args:
        pipe: an `MCDPipeline` (or a subclass).
        num_inference_steps: sampler steps.
        num_samples: sequences to draw.
        seq_len: tokens per sequence; defaults to the model's `max_position_embeddings`.
        source: a known-likelihood source (or its name for `get_source`) whose tokens are the model's ids
            0..K-1 (mask last): gives `excess_nll`, `impossible_pair_percent` and the reveal-pair split.
        judge, judge_tokenizer: an autoregressive judge (`AutoModelForCausalLM`) and its tokenizer: gives
            generative perplexity of the decoded samples (needs `pipe.tokenizer`).
        temperature: sampling temperature.
        batch_size: sequences per pipeline call (does not change the samples, only speed).
        seed: the first sequence's seed.
        sampler: "shadow" (default; paired noise across step counts), "ancestral", or None for the pipeline's
            own scheduler setting. The pipeline passed in is not modified.
        label: a name carried into the report.
        return_sequences: keep the samples and their reveal steps in the report.

    Returns:
        `SamplingReport`.
    """
    _check_positive_int("num_inference_steps", num_inference_steps)
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    if (judge is None) != (judge_tokenizer is None):
        raise ValueError("`judge` and `judge_tokenizer` must be given together.")
    if judge is not None and pipe.tokenizer is None:
        raise ValueError("a `judge` needs `pipe.tokenizer` to decode the samples into text.")
    seq_len = pipe.model.config.max_position_embeddings if seq_len is None else seq_len
    _check_positive_int("seq_len", seq_len)
    if seq_len < 2:
        raise ValueError(f"`seq_len` must be >= 2 (pair statistics), got {seq_len}.")
    source = _resolve_source(source, pipe)
    runner = _runner(pipe, sampler)

    sequences, reveal_steps, calls, seconds = [], [], [], 0.0
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        generators = [torch.Generator().manual_seed(seed + start + offset) for offset in range(count)]
        batch, steps, num_calls, elapsed = _sample_batch(runner, generators, seq_len, num_inference_steps, temperature)
        sequences.append(batch)
        reveal_steps.append(steps)
        calls.append(num_calls)
        seconds += elapsed
    sequences = torch.cat(sequences)
    reveal_steps = torch.cat(reveal_steps)
    # Distinct reveal steps per sequence (given tokens, step -1, are not revealed by the sampler).
    sorted_steps = reveal_steps.sort(dim=1).values
    distinct = ((sorted_steps[:, 1:] != sorted_steps[:, :-1]) & (sorted_steps[:, 1:] >= 0)).sum(1)
    distinct += (sorted_steps[:, 0] >= 0).long()

    per_sample = {"unigram_entropy": unigram_entropy(sequences, reduction="none")}
    excess = impossible = reference_bigram = pairs = None
    if source is not None:
        per_sample["excess_nll"] = (
            source.nll_per_token(sequences, floor=NLL_FLOOR) - source.sequence_entropy_per_token(seq_len)
        )
        excess = mean_and_interval(per_sample["excess_nll"])
        impossible = 100.0 * source.impossible_pair_fraction(sequences)
        reference_bigram = source.bigram_entropy(seq_len)
        pairs = reveal_pair_statistics(sequences, reveal_steps, source)
    perplexity = judge_nll = None
    if judge is not None:
        from .generative_perplexity import generative_perplexity

        texts = pipe.tokenizer.batch_decode(sequences.tolist(), skip_special_tokens=True)
        scored = generative_perplexity(texts, judge, judge_tokenizer, return_per_sample=True)
        perplexity = scored.perplexity
        per_sample["judge_nll"] = scored.per_sample_nll
        judge_nll = mean_and_interval(scored.per_sample_nll[~scored.per_sample_nll.isnan()])

    return SamplingReport(
        label=label,
        num_inference_steps=num_inference_steps,
        temperature=float(temperature),
        sampler=runner.scheduler.config.sampler,
        num_samples=num_samples,
        seq_len=seq_len,
        seed=seed,
        batch_size=batch_size,
        excess_nll=excess,
        impossible_pair_percent=impossible,
        reference_bigram_entropy=reference_bigram,
        unigram_entropy=mean_and_interval(per_sample["unigram_entropy"]),
        bigram_entropy=bigram_entropy(sequences),
        generative_perplexity=perplexity,
        judge_nll=judge_nll,
        model_calls_per_batch=sum(calls) / len(calls),
        reveal_steps_per_sequence=distinct.double().mean().item(),
        seconds_per_sample=seconds / num_samples,
        reveal_pairs=pairs,
        per_sample=per_sample,
        sequences=sequences if return_sequences else None,
        reveal_steps=reveal_steps if return_sequences else None,
    )


def paired_comparison(
    report_a: SamplingReport, report_b: SamplingReport, metric: str = "excess_nll", confidence: float = 0.95
) -> MeanInterval:
    """Mean per-sample difference `a - b` of `metric` with its interval, over samples drawn with the same seeds.

    Args:
        report_a, report_b: two reports of `evaluate_sampling` with the same `seed`, `num_samples` and `seq_len`.
        metric: "excess_nll", "unigram_entropy" or "judge_nll".
        confidence: level of the interval.
    """
    for name in ("seed", "num_samples", "seq_len"):
        if getattr(report_a, name) != getattr(report_b, name):
            raise ValueError(
                f"reports are not paired: {name} differs ({getattr(report_a, name)} vs {getattr(report_b, name)})."
            )
    if metric not in report_a.per_sample or metric not in report_b.per_sample:
        available = sorted(set(report_a.per_sample) & set(report_b.per_sample))
        raise ValueError(f"`metric` must be one both reports measured, among {available}; got {metric!r}.")
    return paired_difference(report_a.per_sample[metric], report_b.per_sample[metric], confidence)
