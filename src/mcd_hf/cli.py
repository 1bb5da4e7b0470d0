"""The `mcd-hf` command: thin subcommands over the library (the examples call the same functions).

    mcd-hf demo            train a teacher, distill it with MCD, compare them (examples/quickstart.py)
    mcd-hf train-teacher   MDLM teacher pretraining (examples/train_teacher.py)
    mcd-hf distill         MCD / SDTT distillation (examples/distill.py)
    mcd-hf sample          sample from a pipeline folder or Hub id (examples/sample.py)
    mcd-hf evaluate        quality vs steps of a pipeline on a known-likelihood source or with a judge
    mcd-hf convert-mdlm    import a published MDLM checkpoint
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# Subcommands whose flags are owned by a library module with its own parser: `mcd-hf NAME ...` == `MODULE.main(...)`.
DELEGATED = {
    "demo": ("mcd_hf.quickstart", "main", "train a teacher, distill it with MCD, compare them (offline, CPU)"),
    "train-teacher": ("mcd_hf.training.teacher", "main", "pretrain an MDLM teacher with Accelerate"),
    "distill": ("mcd_hf.training.distillation", "main", "distill a teacher with MCD or SDTT"),
    "evaluate": ("mcd_hf.evaluation.evaluate_cli", "main", "quality vs steps of a pipeline"),
}


class CommandError(Exception):
    """A user error: printed as one line, exit code 2."""


def _steps(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="an MCDPipeline folder or Hub id")
    parser.add_argument("--prompt", default=None, help="prefix every sample with this text")
    parser.add_argument("--num_samples", type=_steps, default=4)
    parser.add_argument("--seq_len", type=_steps, default=None, help="default: the model's length")
    parser.add_argument("--num_inference_steps", type=_steps, default=None, help="default: the recommended count")
    parser.add_argument("--sampler", choices=["ancestral", "shadow"], default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sample_command(args: argparse.Namespace) -> int:
    import os

    import torch

    from . import MaskedDualityScheduler, MCDPipeline

    if not os.path.isdir(args.pipeline) and (args.pipeline.startswith((".", "/")) or args.pipeline.count("/") != 1):
        raise CommandError(f"pipeline: {args.pipeline!r} is neither a folder nor a Hub id (org/name)")
    pipe = MCDPipeline.from_pretrained(args.pipeline, dtype=getattr(torch, args.dtype)).to(args.device)
    if args.sampler is not None:
        pipe.scheduler = MaskedDualityScheduler.from_config(pipe.scheduler.config, sampler=args.sampler)
    out = pipe(
        args.prompt if args.prompt is None else [args.prompt] * args.num_samples,
        batch_size=args.num_samples,
        seq_len=args.seq_len,
        num_inference_steps=args.num_inference_steps,
        generator=torch.Generator(args.device).manual_seed(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    for index, text in enumerate(out.texts):
        print(f"[{index}] {text}")
    print(f"# {out.num_model_calls} model calls for {args.num_samples} samples", file=sys.stderr)
    return 0


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="an HF MDLM folder, a Hub id, or a state-dict file (.safetensors/.bin/.ckpt)")
    parser.add_argument("output_dir")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or id: writes a full MCDPipeline")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="raw state-dict files only")
    parser.add_argument("--time_conditioning", action=argparse.BooleanOptionalAction, default=None,
                        help="raw state-dict files only (MDLM-OWT: --no-time_conditioning)")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=None,
                        help="take the EMA weights of a Lightning checkpoint (default: when present)")
    parser.add_argument("--no_strict", action="store_true", help="warn about unknown keys instead of failing")


def convert_command(args: argparse.Namespace) -> int:
    from .conversion import convert_mdlm_checkpoint

    overrides = {name: getattr(args, name) for name in ("num_attention_heads", "time_conditioning")
                 if getattr(args, name) is not None}
    convert_mdlm_checkpoint(args.source, args.output_dir, tokenizer=args.tokenizer, strict=not args.no_strict,
                            use_ema=args.use_ema, **overrides)
    print(f"wrote {args.output_dir}")
    return 0


LOCAL = {
    "sample": (add_sample_arguments, sample_command, "sample from a pipeline folder or Hub id"),
    "convert-mdlm": (add_convert_arguments, convert_command, "import a published MDLM checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcd-hf", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in DELEGATED.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    for name, (add_arguments, _, help_text) in LOCAL.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def _delegate(name: str) -> Callable[[Sequence[str]], int | None]:
    module_name, function, _ = DELEGATED[name]
    return getattr(importlib.import_module(module_name), function)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] in DELEGATED:
            return int(_delegate(argv[0])(argv[1:]) or 0)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return LOCAL[args.command][1](args)
    except CommandError as error:
        print(f"mcd-hf: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ConnectionError, OSError) as error:
        print(f"mcd-hf {argv[0]}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
