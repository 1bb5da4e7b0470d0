import math

import pytest
import torch
from tiny_judge import build_judge, build_judge_tokenizer

from mcd_hf.evaluation import generative_perplexity


@pytest.fixture(scope="module")
def judge():
    return build_judge()


@pytest.fixture(scope="module")
def judge_tokenizer():
    return build_judge_tokenizer()


def sample_from_judge(judge, tokenizer, num_samples, max_new_tokens, seed):
    """Texts sampled from the judge, with the judge's own log-probs and entropies of the scored tokens."""
    torch.manual_seed(seed)
    start = torch.full((num_samples, 1), tokenizer.bos_token_id)
    output = judge.generate(
        start,
        attention_mask=torch.ones_like(start),
        do_sample=True,
        max_new_tokens=max_new_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = output.sequences[:, 1:]
    log_softmax = torch.stack(output.logits, dim=1).double().log_softmax(-1)  # raw logits: the model's p
    log_probs = log_softmax.gather(-1, tokens[..., None]).squeeze(-1)
    entropies = -(log_softmax.exp() * log_softmax).sum(-1)
    is_eos = tokens == tokenizer.eos_token_id
    scored = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
    # special tokens stay in the text ("<eos>", "<pad>", "<bos>") and retokenize to the same ids
    texts = [tokenizer.decode(row, skip_special_tokens=False) for row in tokens]
    return texts, log_probs, entropies, scored


def window_nll(judge, window):
    with torch.no_grad():
        logits = judge(torch.tensor([window])).logits[0].double()
    return -logits[:-1].log_softmax(-1).gather(-1, torch.tensor(window[1:])[:, None]).sum().item()


def test_equals_own_nll_from_generate(judge, judge_tokenizer):
    texts, log_probs, _, scored = sample_from_judge(judge, judge_tokenizer, 16, 40, seed=0)
    assert scored.sum() < scored.numel(), "some samples must end with an EOS for the cut to be tested"
    output = generative_perplexity(texts, judge, judge_tokenizer, return_per_sample=True)
    expected_total = -(log_probs * scored).sum().item()
    assert output.num_tokens == scored.sum().item()
    assert output.mean_nll == pytest.approx(expected_total / output.num_tokens, abs=1e-4)
    assert output.perplexity == pytest.approx(math.exp(expected_total / output.num_tokens), rel=1e-4)
    expected_per_sample = -(log_probs * scored).sum(1) / scored.sum(1)
    assert torch.allclose(output.per_sample_nll, expected_per_sample, atol=1e-4)
    assert torch.equal(output.per_sample_num_tokens, scored.sum(1))


def test_close_to_own_entropy(judge, judge_tokenizer):
    # On its own samples, each scored token's NLL minus the entropy of the distribution it was drawn from
    # has mean zero given the past (whether a position is scored depends only on earlier tokens), so the
    # per-sample sums are iid with mean zero: 5 standard errors bound their mean.
    texts, _, entropies, scored = sample_from_judge(judge, judge_tokenizer, 200, 30, seed=1)
    output = generative_perplexity(texts, judge, judge_tokenizer, batch_size=64, return_per_sample=True)
    gaps = output.per_sample_nll * output.per_sample_num_tokens - (entropies * scored).sum(1)
    assert abs(gaps.mean().item()) < 5 * gaps.std().item() / math.sqrt(len(gaps))
    own_entropy = (entropies * scored).sum().item() / scored.sum().item()
    assert abs(output.mean_nll - own_entropy) < 0.1


def test_batching_and_padding_do_not_change_the_result(judge, judge_tokenizer):
    texts, _, _, _ = sample_from_judge(judge, judge_tokenizer, 12, 30, seed=2)
    reference = generative_perplexity(texts, judge, judge_tokenizer, batch_size=1)
    for batch_size in (5, 64):
        output = generative_perplexity(texts, judge, judge_tokenizer, batch_size=batch_size)
        assert output.num_tokens == reference.num_tokens
        assert output.mean_nll == pytest.approx(reference.mean_nll, abs=1e-6)


def test_long_texts_are_scored_in_overlapping_windows(judge, judge_tokenizer):
    texts = ["abcdefghhgfedcba" * 2, "hhhhabab", "aceg"]
    output = generative_perplexity(texts, judge, judge_tokenizer, max_length=6, batch_size=3)
    # independent computation of the documented protocol: windows of 6 starting every 5 tokens
    total, count = 0.0, 0
    for text in texts:
        ids = [judge_tokenizer.bos_token_id] + judge_tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - 1, 5):
            window = ids[start : start + 6]
            total += window_nll(judge, window)
            count += len(window) - 1
    assert output.num_tokens == count == sum(len(text) for text in texts)
    assert output.mean_nll == pytest.approx(total / count, abs=1e-5)
    unchunked = generative_perplexity(texts, judge, judge_tokenizer)
    assert unchunked.num_tokens == count and abs(unchunked.mean_nll - output.mean_nll) > 1e-3


def test_default_window_is_the_judge_context(judge_tokenizer):
    short_judge = build_judge(n_positions=16)
    texts = ["abcdefgh" * 5, "abc"]  # 41 judge tokens with BOS: past the 16 positions
    output = generative_perplexity(texts, short_judge, judge_tokenizer)
    explicit = generative_perplexity(texts, short_judge, judge_tokenizer, max_length=16)
    assert output.num_tokens == 43 and output.mean_nll == explicit.mean_nll


def test_protocol_details(judge, judge_tokenizer):
    # BOS prepended: the first token is scored as p(x_1 | BOS)
    single = generative_perplexity(["a"], judge, judge_tokenizer)
    a_id = judge_tokenizer.convert_tokens_to_ids("a")
    assert single.num_tokens == 1
    assert single.mean_nll == pytest.approx(window_nll(judge, [judge_tokenizer.bos_token_id, a_id]), abs=1e-5)
    # without a BOS token, the EOS is the prefix (GPT-2 style)
    no_bos = generative_perplexity(["a"], judge, build_judge_tokenizer(with_bos=False))
    assert no_bos.mean_nll == pytest.approx(window_nll(judge, [judge_tokenizer.eos_token_id, a_id]), abs=1e-5)
    # cut after the first EOS, which is scored
    cut = generative_perplexity(["ab<eos>cd<eos>"], judge, judge_tokenizer)
    assert cut.num_tokens == 3
    assert cut.mean_nll == pytest.approx(generative_perplexity(["ab<eos>"], judge, judge_tokenizer).mean_nll, abs=1e-6)
    # an empty text contributes nothing
    with_empty = generative_perplexity(["ab", ""], judge, judge_tokenizer, return_per_sample=True)
    assert with_empty.num_tokens == 2 and math.isnan(with_empty.per_sample_nll[1])
    without_empty = generative_perplexity(["ab"], judge, judge_tokenizer)
    assert with_empty.mean_nll == pytest.approx(without_empty.mean_nll, abs=1e-6)


def test_judge_mode_restored_and_bad_input(judge_tokenizer):
    judge = build_judge().train()
    generative_perplexity(["abc"], judge, judge_tokenizer)
    assert judge.training
    with pytest.raises(ValueError, match="texts"):
        generative_perplexity("abc", judge, judge_tokenizer)
    with pytest.raises(ValueError, match="texts"):
        generative_perplexity([], judge, judge_tokenizer)
    with pytest.raises(ValueError, match="texts"):
        generative_perplexity([""], judge, judge_tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        generative_perplexity(["abc"], judge, judge_tokenizer, max_length=1)
