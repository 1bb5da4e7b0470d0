import math
from statistics import NormalDist

import pytest
import torch

from mcd_hf import MaskedDiffusionLM, MaskedDiffusionLMConfig, MaskedDualityScheduler, MCDPipeline
from mcd_hf.evaluation import bigram_entropy, unigram_entropy
from mcd_hf.evaluation.quality import (
    NLL_FLOOR,
    evaluate_sampling,
    paired_comparison,
    reveal_pair_statistics,
)
from mcd_hf.evaluation.sources import MarkovChainSource
from mcd_hf.tokenization import build_character_tokenizer

VOCAB = 6  # real tokens; the mask is id 6
SEQ_LEN = 10
Z95 = NormalDist().inv_cdf(0.975)


@pytest.fixture(scope="module")
def source():
    return MarkovChainSource(vocab_size=VOCAB, num_successors=2, seed=3)


def make_pipeline(source, sampler="shadow", time_conditioning=False):
    torch.manual_seed(0)
    config = MaskedDiffusionLMConfig(
        vocab_size=VOCAB + 1, mask_token_id=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        cond_dim=16, max_position_embeddings=SEQ_LEN, time_conditioning=time_conditioning, dropout=0.0,
    )
    model = MaskedDiffusionLM(config).eval()
    with torch.no_grad():  # a fresh model is uniform (zero output layer); random weights make the tests informative
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    scheduler = MaskedDualityScheduler(mask_token_id=VOCAB, vocab_size=VOCAB + 1, sampler=sampler)
    return MCDPipeline(model=model, scheduler=scheduler, tokenizer=build_character_tokenizer(source.alphabet))


@pytest.fixture(scope="module")
def pipe(source):
    return make_pipeline(source)


def test_report_fields_agree_with_the_metrics(pipe, source):
    report = evaluate_sampling(pipe, num_inference_steps=5, num_samples=40, source=source, batch_size=16,
                               label="random", return_sequences=True)
    sequences = report.sequences
    assert sequences.shape == (40, SEQ_LEN) and (sequences < VOCAB).all()
    assert (report.label, report.num_inference_steps, report.num_samples, report.seq_len) == ("random", 5, 40, SEQ_LEN)
    assert report.sampler == "shadow" and report.temperature == 1.0
    # excess NLL: per-sample NLL/token - H_L, whose mean is the source's own `excess_nll`; 95% normal interval
    per_sample = report.per_sample["excess_nll"]
    assert report.excess_nll.mean == pytest.approx(source.excess_nll(sequences, floor=NLL_FLOOR), abs=1e-12)
    assert report.excess_nll.half_width == pytest.approx(Z95 * per_sample.std().item() / math.sqrt(40))
    assert report.impossible_pair_percent == pytest.approx(100 * source.impossible_pair_fraction(sequences))
    assert report.unigram_entropy.mean == pytest.approx(unigram_entropy(sequences))
    assert report.bigram_entropy == pytest.approx(bigram_entropy(sequences))
    assert report.reference_bigram_entropy == pytest.approx(source.bigram_entropy(SEQ_LEN))
    assert report.generative_perplexity is None and report.judge_nll is None
    # cost: 3 batches (16, 16, 8), at most 5 calls each; a sequence reveals in at most min(steps, L) steps
    assert 1 <= report.model_calls_per_batch <= 5
    assert 1 <= report.reveal_steps_per_sequence <= 5
    assert report.seconds_per_sample > 0
    pairs = report.reveal_pairs
    assert pairs.same_step_pairs + pairs.different_step_pairs == 40 * (SEQ_LEN - 1)
    data = report.to_dict()
    assert data["excess_nll"] == {"mean": report.excess_nll.mean, "half_width": report.excess_nll.half_width}
    assert "sequences" not in data and "per_sample" not in data
    assert data["reveal_pairs"]["same_step_pairs"] == pairs.same_step_pairs


def test_pairing_same_seed_same_sequences_whatever_the_batching(pipe, source):
    kwargs = dict(num_inference_steps=4, source=source, return_sequences=True)
    first = evaluate_sampling(pipe, num_samples=12, batch_size=5, seed=7, **kwargs)
    again = evaluate_sampling(pipe, num_samples=12, batch_size=12, seed=7, **kwargs)
    assert torch.equal(first.sequences, again.sequences)
    # sequence i depends only on seed + i: shifting the seed shifts the samples
    shifted = evaluate_sampling(pipe, num_samples=10, batch_size=3, seed=9, **kwargs)
    assert torch.equal(shifted.sequences, first.sequences[2:])
    other = evaluate_sampling(pipe, num_samples=12, batch_size=12, seed=100, **kwargs)
    assert not torch.equal(other.sequences, first.sequences)


def test_paired_comparison(pipe, source):
    many = evaluate_sampling(pipe, num_inference_steps=8, num_samples=30, source=source, batch_size=30)
    few = evaluate_sampling(pipe, num_inference_steps=2, num_samples=30, source=source, batch_size=30)
    difference = paired_comparison(many, few)
    expected = many.per_sample["excess_nll"] - few.per_sample["excess_nll"]
    assert difference.mean == pytest.approx(expected.mean().item())
    assert difference.half_width == pytest.approx(Z95 * expected.std().item() / math.sqrt(30))
    assert difference.mean == pytest.approx(many.excess_nll.mean - few.excess_nll.mean)
    same = paired_comparison(many, many, metric="unigram_entropy")
    assert same.mean == 0.0 and same.half_width == 0.0
    unpaired = evaluate_sampling(pipe, num_inference_steps=8, num_samples=30, source=source, seed=1)
    with pytest.raises(ValueError, match="seed"):
        paired_comparison(many, unpaired)
    with pytest.raises(ValueError, match="metric"):
        paired_comparison(many, few, metric="judge_nll")


def test_shadow_reveal_steps_are_the_first_step_whose_alpha_reaches_the_shadow(pipe, source):
    steps = 6
    report = evaluate_sampling(pipe, num_inference_steps=steps, num_samples=4, source=source, batch_size=4,
                               seed=11, return_sequences=True)
    # Recompute from the scheduler's documented noise: row b's shadows u come first from generator seed + b,
    # shifted to (alpha(1), 1); position i is revealed at the first step k with alpha(1 - (k + 1) / N) >= u_i.
    scheduler = pipe.scheduler
    alpha_start = float(scheduler.schedule.alpha(1.0))
    grid = 1.0 - torch.arange(1, steps + 1, dtype=torch.float64) / steps
    alphas = scheduler.schedule.alpha(grid)
    for row in range(4):
        uniform = torch.rand(SEQ_LEN, generator=torch.Generator().manual_seed(11 + row), dtype=torch.float64)
        shadow = alpha_start + (1 - alpha_start) * uniform
        expected = (alphas[None, :] >= shadow[:, None]).double().argmax(dim=1)
        assert torch.equal(report.reveal_steps[row], expected)
    distinct = [len(set(row.tolist())) for row in report.reveal_steps]
    assert report.reveal_steps_per_sequence == pytest.approx(sum(distinct) / 4)


def test_reveal_steps_per_sequence_is_what_a_lone_sequence_costs(pipe, source):
    # Without time conditioning the pipeline skips every step that reveals nothing: a sequence sampled alone
    # makes exactly as many forward passes as it has distinct reveal steps.
    report = evaluate_sampling(pipe, num_inference_steps=16, num_samples=6, source=source, batch_size=1)
    assert report.model_calls_per_batch == pytest.approx(report.reveal_steps_per_sequence)
    assert report.reveal_steps_per_sequence < 16


def test_reveal_pair_statistics_hand_made(source):
    transition = source.transition
    possible = source.pair_probabilities() > 0
    # pick one possible and one impossible transition of the source
    a, b = [int(i) for i in torch.nonzero(possible)[0]]
    c, d = [int(i) for i in torch.nonzero(~possible)[0]]
    sequences = torch.tensor([[a, b, c, d], [c, d, a, b]])
    # row 0: steps 0,0,1,1 -> pairs (a,b) same, (b,c) different, (c,d) same
    # row 1: steps 2,0,0,1 -> pairs (c,d) different, (d,a) same, (a,b) different
    reveal_steps = torch.tensor([[0, 0, 1, 1], [2, 0, 0, 1]])
    stats = reveal_pair_statistics(sequences, reveal_steps, source)
    assert (stats.same_step_pairs, stats.different_step_pairs) == (3, 3)
    assert stats.same_step_fraction == 0.5
    impossible = lambda x, y: float(not possible[x, y])  # noqa: E731
    nll = lambda x, y: -math.log(max(transition[x, y].item(), NLL_FLOOR))  # noqa: E731
    same, different = [(a, b), (c, d), (d, a)], [(b, c), (c, d), (a, b)]
    assert stats.same_step_impossible_percent == pytest.approx(100 * sum(impossible(*p) for p in same) / 3)
    assert stats.different_step_impossible_percent == pytest.approx(100 * sum(impossible(*p) for p in different) / 3)
    assert stats.same_step_nll == pytest.approx(sum(nll(*p) for p in same) / 3)
    assert stats.different_step_nll == pytest.approx(sum(nll(*p) for p in different) / 3)
    # all pairs in one step: the other group is empty (nan), never a division error
    together = reveal_pair_statistics(sequences, torch.zeros_like(sequences), source)
    assert together.different_step_pairs == 0 and math.isnan(together.different_step_nll)
    with pytest.raises(ValueError, match="reveal_steps"):
        reveal_pair_statistics(sequences, reveal_steps[:, :3], source)


def test_sampler_override_leaves_the_pipeline_unchanged(pipe, source):
    report = evaluate_sampling(pipe, num_inference_steps=4, num_samples=4, sampler="ancestral", source=source)
    assert report.sampler == "ancestral"
    assert pipe.scheduler.config.sampler == "shadow"
    kept = evaluate_sampling(pipe, num_inference_steps=4, num_samples=4, sampler=None, source=source)
    assert kept.sampler == "shadow"


def test_generative_perplexity_with_a_judge(pipe, source):
    from transformers import GPT2Config, GPT2LMHeadModel

    judge_tokenizer = build_character_tokenizer(source.alphabet, bos_token="[BOS]", eos_token="[EOS]")
    torch.manual_seed(0)
    judge = GPT2LMHeadModel(GPT2Config(vocab_size=len(judge_tokenizer), n_positions=32, n_embd=16, n_layer=1,
                                       n_head=2)).eval()
    report = evaluate_sampling(pipe, num_inference_steps=4, num_samples=8, judge=judge,
                               judge_tokenizer=judge_tokenizer)
    assert report.excess_nll is None and report.reveal_pairs is None
    # equal-length texts: the token-weighted mean NLL is the mean of the per-sample NLLs
    assert report.generative_perplexity == pytest.approx(math.exp(report.judge_nll.mean))
    assert report.generative_perplexity > 1


def test_bad_arguments(pipe, source):
    with pytest.raises(ValueError, match="source"):
        evaluate_sampling(pipe, num_inference_steps=4, num_samples=4, source=MarkovChainSource(vocab_size=5))
    with pytest.raises(ValueError, match="judge"):
        evaluate_sampling(pipe, num_inference_steps=4, num_samples=4, judge=object())
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_sampling(pipe, num_inference_steps=4, num_samples=0)
    with pytest.raises(ValueError, match="sampler"):
        evaluate_sampling(pipe, num_inference_steps=4, num_samples=4, sampler="euler")
