"""`evaluate` metric: generative perplexity of texts under an autoregressive judge.

Loads offline from its folder: `evaluate.load("metrics/generative_perplexity")`. The computation and its
protocol (BOS prepended, cut at the first EOS, windows past the judge's context) are those of
`mcd_hf.evaluation.generative_perplexity`.
"""

import datasets
import evaluate

from mcd_hf.evaluation import generative_perplexity

_DESCRIPTION = """\
Perplexity of generated texts under a causal language model (the judge, e.g. GPT-2 Large): texts are
retokenized with the judge's tokenizer, its BOS is prepended so the first token is scored, each text stops
at its first EOS, and the NLL is averaged over all scored tokens (token-weighted). Report it together with
the unigram entropy of the samples.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated texts (list of str).
    judge: a local folder holding an `AutoModelForCausalLM` and its tokenizer, or a loaded model.
    judge_tokenizer: the tokenizer (object or folder); default: loaded from `judge` when it is a folder.
    batch_size: windows per forward pass (default 8).
    max_length: window length in judge tokens (default: the judge's context length).
    device: where to run the judge (default: where it is).
Returns:
    perplexity: exp(mean_nll).
    mean_nll: token-weighted mean negative log-likelihood in nats.
    num_tokens: number of scored judge tokens.
Examples:
    >>> metric = evaluate.load("metrics/generative_perplexity")
    >>> metric.compute(predictions=texts, judge="path/to/gpt2-large")
"""

_CITATION = """\
@inproceedings{sahoo2024simple,
  title={Simple and Effective Masked Diffusion Language Models},
  author={Sahoo, Subham Sekhar and others},
  booktitle={NeurIPS},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GenerativePerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, judge=None, judge_tokenizer=None, batch_size=8, max_length=None, device=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if judge is None:
            raise ValueError("judge must be given: a local model folder or a loaded AutoModelForCausalLM")
        if isinstance(judge, str):
            judge_tokenizer = judge_tokenizer if judge_tokenizer is not None else judge
            judge = AutoModelForCausalLM.from_pretrained(judge)
            if device is not None:
                judge = judge.to(device)
        if judge_tokenizer is None:
            raise ValueError("judge_tokenizer must be given when judge is a loaded model")
        if isinstance(judge_tokenizer, str):
            judge_tokenizer = AutoTokenizer.from_pretrained(judge_tokenizer)
        result = generative_perplexity(
            list(predictions), judge, judge_tokenizer, batch_size=batch_size, max_length=max_length, device=device
        )
        return {"perplexity": result.perplexity, "mean_nll": result.mean_nll, "num_tokens": result.num_tokens}
