"""`evaluate` metric: unigram entropy of generated samples (per sample, in nats, averaged).

Loads offline from its folder: `evaluate.load("metrics/unigram_entropy")`. The computation is
`mcd_hf.evaluation.unigram_entropy` (definition: MDLM, Sahoo et al., 2024, arXiv 2406.07524).
"""

import datasets
import evaluate

from mcd_hf.evaluation import unigram_entropy

_DESCRIPTION = """\
Entropy (nats) of each sample's own token histogram, averaged over samples. Report it next to
generative perplexity: low perplexity with low entropy is mode collapse, not quality.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: samples, either texts (list of str) or token ids (list of lists of int).
    tokenizer: optional, for texts: a tokenizer object or a local tokenizer folder; texts are split into
        characters when omitted.
Returns:
    unigram_entropy: float, the mean per-sample entropy in nats.
Examples:
    >>> metric = evaluate.load("metrics/unigram_entropy")
    >>> metric.compute(predictions=["aaaa", "abab"])
    {'unigram_entropy': 0.34657359027997264}
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
class UnigramEntropy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
            ],
        )

    def _compute(self, predictions, tokenizer=None):
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        return {"unigram_entropy": unigram_entropy(predictions, tokenizer=tokenizer)}
