"""Generative perplexity: the perplexity of generated texts under an autoregressive judge.

The protocol follows MDLM (Sahoo et al., 2024, arXiv 2406.07524, GPT-2 Large as judge) with two fixes
that make the number well defined for any `AutoModelForCausalLM`: the judge's BOS is prepended so the
first token is scored, and tokens at a chunk boundary are scored too. Report it together with
`metrics.unigram_entropy`: low generative perplexity with low entropy is collapse (DESIGN.md section 5).
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


@dataclass
class GenerativePerplexityOutput:
    """Result of `generative_perplexity`.

    Attributes:
        perplexity: exp(mean_nll).
        mean_nll: token-weighted mean NLL (nats) over all scored tokens of all texts.
        num_tokens: number of scored judge tokens.
        per_sample_nll: (N,) float64 mean NLL per token of each text (nan for a text with no tokens), only
            with `return_per_sample=True`.
        per_sample_num_tokens: (N,) long, scored tokens per text, only with `return_per_sample=True`.
    """

    perplexity: float
    mean_nll: float
    num_tokens: int
    per_sample_nll: Optional[torch.Tensor] = None
    per_sample_num_tokens: Optional[torch.Tensor] = None


def _judge_context_length(judge) -> Optional[int]:
    config = getattr(judge, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _chunks(ids: list[int], max_length: int) -> list[list[int]]:
    """Split [BOS, x_1..x_n] into windows of at most `max_length` that overlap by one token.

    Window k starts where window k-1 ended, so its first token is context only and every x_i is scored
    exactly once, predicted from the tokens before it in its own window.
    """
    stride = max_length - 1
    return [ids[start : start + max_length] for start in range(0, len(ids) - 1, stride)]


@torch.inference_mode()
def _score_batch(judge, chunks: list[list[int]], pad_token_id: int, device) -> torch.Tensor:
    """Summed NLL (float64) of tokens 1.. of each chunk, in one padded forward pass."""
    width = max(len(chunk) for chunk in chunks)
    input_ids = torch.full((len(chunks), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        input_ids[row, : len(chunk)] = torch.tensor(chunk)
        attention_mask[row, : len(chunk)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Right padding: with causal attention, padding after a chunk cannot change the logits inside it.
    logits = judge(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return (nll.double() * attention_mask[:, 1:]).sum(-1).cpu()


def generative_perplexity(
    texts: Sequence[str],
    judge,
    judge_tokenizer,
    *,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    return_per_sample: bool = False,
) -> GenerativePerplexityOutput:
    """Perplexity of `texts` under an autoregressive judge (any `AutoModelForCausalLM`).

    Protocol:
        1. Retokenize each text with `judge_tokenizer` (no special tokens added by the tokenizer).
        2. Cut it after the first EOS token, if any: the EOS itself is scored, what follows is not a sample.
        3. Prepend the judge's BOS token (its EOS when it has no BOS, as for GPT-2 where they coincide), so
           the first text token is scored as p(x_1 | BOS).
        4. A sequence longer than `max_length` (default: the judge's context, `max_position_embeddings` /
           `n_positions`) is split into windows overlapping by one token; every window after the first
           keeps scoring: each token is scored exactly once, conditioned on the preceding tokens of its
           window only (no state is carried across windows).
        5. Windows are batched with right padding and an attention mask, NLLs computed in float32 from the
           judge's logits and accumulated in float64.
        6. mean_nll = total NLL / total scored tokens (token-weighted over all texts), perplexity =
           exp(mean_nll).

    Args:
        texts: generated texts (a list of strings).
        judge: a causal LM returning `.logits`; put it on its device beforehand.
        judge_tokenizer: the judge's tokenizer; must have a BOS or EOS token.
        batch_size: windows per forward pass.
        max_length: window length in judge tokens (>= 2), BOS included.
        device: where to run; default the judge's device.
        return_per_sample: also return per-text mean NLLs and token counts.

    Returns:
        `GenerativePerplexityOutput`.
    """
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise ValueError("texts must be a list of strings")
    if len(texts) == 0:
        raise ValueError("texts must hold at least one text")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length if max_length is not None else _judge_context_length(judge)
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS plus one scored token), got {max_length}")
    eos_token_id = judge_tokenizer.eos_token_id
    start_token_id = judge_tokenizer.bos_token_id if judge_tokenizer.bos_token_id is not None else eos_token_id
    if start_token_id is None:
        raise ValueError("judge_tokenizer must have a bos_token or an eos_token to prepend")
    pad_token_id = judge_tokenizer.pad_token_id if judge_tokenizer.pad_token_id is not None else start_token_id
    if device is None:
        device = getattr(judge, "device", None) or next(judge.parameters()).device

    windows, owners = [], []
    num_tokens = torch.zeros(len(texts), dtype=torch.long)
    for index, text in enumerate(texts):
        ids = list(judge_tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos_token_id is not None and eos_token_id in ids:
            ids = ids[: ids.index(eos_token_id) + 1]
        num_tokens[index] = len(ids)
        ids = [start_token_id] + ids
        for window in _chunks(ids, max_length or max(len(ids), 2)):
            windows.append(window)
            owners.append(index)
    if num_tokens.sum() == 0:
        raise ValueError("texts must contain at least one judge token")

    # Longest first, so each batch pads little.
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    total_nll = torch.zeros(len(texts), dtype=torch.float64)
    was_training = judge.training
    judge.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            sums = _score_batch(judge, [windows[i] for i in batch], pad_token_id, device)
            total_nll.index_add_(0, torch.tensor([owners[i] for i in batch]), sums)
    finally:
        judge.train(was_training)

    mean_nll = total_nll.sum().item() / num_tokens.sum().item()
    output = GenerativePerplexityOutput(
        perplexity=math.exp(mean_nll), mean_nll=mean_nll, num_tokens=int(num_tokens.sum())
    )
    if return_per_sample:
        output.per_sample_nll = total_nll / num_tokens.double()  # 0 / 0 = nan for an empty text
        output.per_sample_num_tokens = num_tokens
    return output
