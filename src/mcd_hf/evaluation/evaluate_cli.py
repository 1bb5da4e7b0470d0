"""`mcd-hf evaluate`: quality, diversity and cost of a pipeline at several step counts and temperatures.

    mcd-hf evaluate PIPELINE_DIR --steps 1024,64,16 --num_samples 1000 --source markov
    mcd-hf evaluate PIPELINE_DIR --steps 64,4 --num_samples 256 --judge path/to/gpt2-large --temperatures 1.0,0.8

Prints one table row per (steps, temperature) and writes the reports as JSON (`--output_json`). Every row
uses the same seeds (sequence i: seed + i), so rows are paired; with a source, the last column gives the
paired difference of `NLL - H` against the first row. Measurement: `mcd_hf.evaluation.quality` and
DESIGN.md section 5.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

__all__ = ["build_parser", "main", "format_table"]


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive_floats(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}") from None
    if not values or any(not 0 < value < float("inf") for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a bad flag as one line (no usage dump) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="mcd-hf evaluate", description="Quality vs steps of an MCDPipeline (NLL - H on a source, gen-PPL)."
    )
    parser.add_argument("pipeline", help="an MCDPipeline folder (or a Hub id)")
    parser.add_argument("--steps", type=_positive_ints, required=True, help="comma-separated step counts, e.g. 64,16,4")
    parser.add_argument("--num_samples", type=_positive_int, default=256, help="samples per row")
    parser.add_argument("--source", default=None, help="a known-likelihood source name (markov, hmm): NLL - H")
    parser.add_argument("--judge", default=None, help="an AutoModelForCausalLM folder or id: generative perplexity")
    parser.add_argument("--temperatures", type=_positive_floats, default=[1.0], help="comma-separated, e.g. 1.0,0.8")
    parser.add_argument("--sampler", choices=["shadow", "ancestral"], default="shadow")
    parser.add_argument("--seq_len", type=_positive_int, default=None, help="default: the model's length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=_positive_int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--output_json", default=None, help="write the reports here")
    return parser


def _format_interval(interval) -> str:
    return "-" if interval is None else f"{interval.mean:.4f} +- {interval.half_width:.4f}"


def format_table(reports, paired=None) -> str:
    """A Markdown table of `SamplingReport`s (one row each); `paired`: optional per-row difference strings."""
    header = ["steps", "temp", "NLL - H", "impossible %", "unigram H", "bigram H", "gen-PPL", "calls/batch",
              "reveal steps/seq", "s/sample"]
    if paired is not None:
        header.append("paired NLL-H diff vs row 1")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, report in enumerate(reports):
        row = [
            str(report.num_inference_steps),
            f"{report.temperature:g}",
            _format_interval(report.excess_nll),
            "-" if report.impossible_pair_percent is None else f"{report.impossible_pair_percent:.2f}",
            _format_interval(report.unigram_entropy),
            f"{report.bigram_entropy:.3f}",
            "-" if report.generative_perplexity is None else f"{report.generative_perplexity:.2f}",
            f"{report.model_calls_per_batch:.1f}",
            f"{report.reveal_steps_per_sequence:.1f}",
            f"{report.seconds_per_sample:.2e}",
        ]
        if paired is not None:
            row.append(paired[index])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..pipeline_mcd import MCDPipeline
    from .quality import evaluate_sampling, paired_comparison
    from .sources import get_source

    if not os.path.isdir(args.pipeline) and (args.pipeline.startswith((".", "/")) or args.pipeline.count("/") != 1):
        raise ValueError(f"pipeline: {args.pipeline!r} is neither a folder nor a Hub id (org/name)")
    source = get_source(args.source) if args.source is not None else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = MCDPipeline.from_pretrained(args.pipeline).to(device)
    judge = judge_tokenizer = None
    if args.judge is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        judge_tokenizer = AutoTokenizer.from_pretrained(args.judge)
        judge = AutoModelForCausalLM.from_pretrained(args.judge).to(device).eval()

    reports = []
    for temperature in args.temperatures:
        for steps in args.steps:
            reports.append(evaluate_sampling(
                pipe, num_inference_steps=steps, num_samples=args.num_samples,
                seq_len=args.seq_len, source=source, judge=judge,
                judge_tokenizer=judge_tokenizer, temperature=temperature, batch_size=args.batch_size,
                seed=args.seed, sampler=args.sampler,
            ))
            print(f"# evaluated steps={steps} temperature={temperature:g}", file=sys.stderr)
    paired = None
    if source is not None:
        paired = ["0"] + [str(paired_comparison(report, reports[0])) for report in reports[1:]]
    print(f"pipeline: {args.pipeline}; {args.num_samples} samples per row, sampler {args.sampler}, seed {args.seed}"
          + (f"; source {args.source} (NLL - H: 95% intervals)" if source is not None else ""))
    print(format_table(reports, paired))
    if args.output_json is not None:
        folder = os.path.dirname(os.path.abspath(args.output_json))
        os.makedirs(folder, exist_ok=True)
        payload = {"pipeline": args.pipeline, "source": args.source, "judge": args.judge,
                   "reports": [report.to_dict() for report in reports]}
        if paired is not None:
            payload["paired_excess_nll_vs_first"] = paired
        with open(args.output_json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
        print(f"wrote {args.output_json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `mcd-hf evaluate`; returns the exit status (errors: one line on stderr, non-zero)."""
    args = build_parser().parse_args(argv)
    try:
        return _evaluate(args)
    except (ValueError, OSError, ConnectionError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"mcd-hf evaluate: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
