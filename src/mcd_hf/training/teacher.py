"""MDLM teacher pretraining: :class:`MDLMTrainer` and the ``train_teacher`` command line.

``examples/train_teacher.py`` and ``mcd-hf train-teacher`` both call :func:`main`. Works with ``python`` and with
``accelerate launch`` (one or several processes, CPU or GPU). Flags follow diffusers' training examples.

    accelerate launch examples/train_teacher.py --train_file corpus.txt --seq_len 128 --max_train_steps 1000 \
        --output_dir teacher --checkpointing_steps 200 --resume_from_checkpoint latest
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from typing import Any, Sequence

import torch

from ..duality import NOISE_SCHEDULES, get_noise_schedule
from .arguments import MIXED_PRECISION_CHOICES, REPORT_TO_CHOICES, TrainingArguments
from .data import DataArguments, prepare_training_data
from .losses import DEFAULT_TIME_EPS, mdlm_loss
from .trainer import Trainer, TrainOutput, create_accelerator

logger = logging.getLogger(__name__)


class MDLMTrainer(Trainer):
    """Trains a masked diffusion LM with the MDLM NELBO; validates NELBO per token and its perplexity bound.

    Args:
        model: A ``MaskedDiffusionLM``.
        args: The training options.
        train_dataset, eval_dataset: Packed ``{"input_ids"}`` rows.
        noise_schedule: Name of the masking schedule (:data:`mcd_hf.duality.NOISE_SCHEDULES`); saved in the exported
            scheduler, so sampling uses the training schedule.
        schedule_eps: The schedule's ``eps``.
        time_eps: Smallest sampled diffusion time.
        card_info: Extra facts for the model card (e.g. ``datasets``).
        **kwargs: Passed to :class:`Trainer` (``tokenizer``, ``accelerator``, ``data_description``, ...).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        train_dataset,
        eval_dataset=None,
        *,
        noise_schedule: str = "loglinear",
        schedule_eps: float = 1e-3,
        time_eps: float = DEFAULT_TIME_EPS,
        card_info: dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(model, args, train_dataset, eval_dataset, **kwargs)
        self.mask_token_id = int(model.config.mask_token_id)
        self.vocab_size = int(model.config.vocab_size)
        self.noise_schedule_name = noise_schedule
        self.schedule_eps = schedule_eps
        self.schedule = get_noise_schedule(noise_schedule, vocab_size=self.vocab_size - 1, eps=schedule_eps)
        self.time_eps = time_eps
        self.card_info = dict(card_info or {})

    def compute_loss(self, batch, step, generator):
        return mdlm_loss(
            self.model, batch["input_ids"], self.schedule, mask_token_id=self.mask_token_id, generator=generator,
            time_eps=self.time_eps,
        )

    def evaluation_step(self, batch, weight, generator):
        per_sequence, _ = mdlm_loss(
            self.model, batch["input_ids"], self.schedule, mask_token_id=self.mask_token_id, generator=generator,
            time_eps=self.time_eps, reduction="sum",
        )
        seq_len = batch["input_ids"].shape[1]
        return {"nelbo_sum": (per_sequence.double() * weight.double()).sum(), "num_tokens": weight.double().sum() * seq_len}

    def finalize_evaluation(self, sums):
        nelbo = sums["nelbo_sum"] / max(sums["num_tokens"], 1.0)
        return {"val_nelbo": nelbo, "val_ppl_bound": math.exp(min(nelbo, 700.0))}

    def build_pipeline(self, model):
        from ..pipeline_mcd import MCDPipeline
        from ..scheduling_mcd import MaskedDualityScheduler

        scheduler = MaskedDualityScheduler(
            mask_token_id=self.mask_token_id, vocab_size=self.vocab_size, noise_schedule=self.noise_schedule_name,
            eps=self.schedule_eps,
        )
        return MCDPipeline(model=model, scheduler=scheduler, tokenizer=self.tokenizer)

    def model_card_info(self):
        info = {"method": "mdlm", "noise_schedule": self.noise_schedule_name, **super().model_card_info()}
        info.update(self.card_info)
        return info


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimisation and bookkeeping flags, one per `TrainingArguments` field (shared with `examples/distill.py`)."""
    defaults = TrainingArguments()
    group = parser.add_argument_group("optimisation and bookkeeping")
    group.add_argument("--output_dir", required=True)
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    group.add_argument("--lr_scheduler_type", default=defaults.lr_scheduler_type)
    group.add_argument("--lr_warmup_steps", type=int, default=defaults.lr_warmup_steps)
    group.add_argument("--weight_decay", type=float, default=defaults.weight_decay)
    group.add_argument("--adam_beta1", type=float, default=defaults.adam_beta1)
    group.add_argument("--adam_beta2", type=float, default=defaults.adam_beta2)
    group.add_argument("--adam_epsilon", type=float, default=defaults.adam_epsilon)
    group.add_argument("--train_batch_size", type=int, default=defaults.train_batch_size, help="per process")
    group.add_argument("--eval_batch_size", type=int, default=None)
    group.add_argument("--gradient_accumulation_steps", type=int, default=defaults.gradient_accumulation_steps)
    group.add_argument("--max_train_steps", type=int, default=defaults.max_train_steps)
    group.add_argument("--max_grad_norm", type=float, default=defaults.max_grad_norm)
    group.add_argument("--mixed_precision", choices=MIXED_PRECISION_CHOICES, default=defaults.mixed_precision)
    group.add_argument("--ema_decay", type=float, default=defaults.ema_decay, help="0 disables EMA (MDLM: 0.9999)")
    group.add_argument("--checkpointing_steps", type=int, default=None)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    group.add_argument("--validation_steps", type=int, default=None)
    group.add_argument("--max_validation_batches", type=int, default=None)
    group.add_argument("--logging_steps", type=int, default=defaults.logging_steps)
    group.add_argument("--report_to", choices=REPORT_TO_CHOICES, default=defaults.report_to)
    group.add_argument("--tracker_project_name", default=defaults.tracker_project_name)
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", default=None)
    group.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    group.add_argument("--disable_progress_bar", action="store_true")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Data and tokenizer flags (shared with ``examples/distill.py``)."""
    defaults = DataArguments()
    group = parser.add_argument_group("data")
    group.add_argument("--train_file", default=None, help="local .txt, .json, .jsonl or .csv")
    group.add_argument("--validation_file", default=None)
    group.add_argument("--dataset_name", default=None, help="a Hub dataset id or a local dataset folder")
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument("--text_column", default=defaults.text_column)
    group.add_argument("--streaming", action="store_true")
    group.add_argument("--source", default=None,
                       help="a known-likelihood source of mcd_hf.evaluation.sources (e.g. 'markov') instead of text")
    group.add_argument("--source_num_sequences", type=int, default=4096, help="training sequences drawn from --source")
    group.add_argument("--validation_split_percentage", type=float, default=defaults.validation_split_percentage)
    group.add_argument("--max_validation_blocks", type=int, default=defaults.max_validation_blocks)
    group.add_argument("--text_sample_by", choices=["line", "paragraph", "document"], default=defaults.text_sample_by)
    group.add_argument("--preprocessing_num_workers", type=int, default=None)
    group.add_argument("--cache_dir", default=None)
    group.add_argument("--overwrite_cache", action="store_true")
    group.add_argument("--seq_len", type=int, default=defaults.seq_len)
    group.add_argument("--tokenizer_name", default=None, help="a tokenizer folder or Hub id (a [MASK] is added if missing)")
    group.add_argument("--tokenizer_type", choices=["char", "bpe"], default="char",
                       help="tokenizer built from the training text when --tokenizer_name is not given")
    group.add_argument("--bpe_vocab_size", type=int, default=4096)
    group.add_argument("--tokenizer_train_samples", type=int, default=100_000,
                       help="rows of training text read to build a tokenizer")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model_name_or_path", default=None, help="continue training a MaskedDiffusionLM folder")
    group.add_argument("--config_name", default=None, help="a MaskedDiffusionLMConfig folder or JSON file")
    group.add_argument("--hidden_size", type=int, default=None, help="default 256 without --config_name")
    group.add_argument("--num_hidden_layers", type=int, default=None, help="default 4")
    group.add_argument("--num_attention_heads", type=int, default=None, help="default 4")
    group.add_argument("--cond_dim", type=int, default=None, help="default 128")
    group.add_argument("--dropout", type=float, default=None, help="default 0.1")
    group.add_argument("--time_conditioning", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--noise_schedule", choices=NOISE_SCHEDULES, default="loglinear")
    group.add_argument("--schedule_eps", type=float, default=1e-3)
    group.add_argument("--time_eps", type=float, default=DEFAULT_TIME_EPS)


_add_training_arguments = add_training_arguments  # the name distillation.py imported first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_teacher", description="Pretrain a masked diffusion LM (MDLM NELBO) with Accelerate."
    )
    add_data_arguments(parser)
    _add_model_arguments(parser)
    add_training_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def training_arguments_from(args: argparse.Namespace) -> TrainingArguments:
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return TrainingArguments(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def data_arguments_from(args: argparse.Namespace) -> DataArguments:
    names = {field.name for field in dataclasses.fields(DataArguments)}
    return DataArguments(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def _read_texts(data_args: DataArguments, limit: int) -> tuple[list[str], bool]:
    """Up to ``limit`` rows of raw training (and validation) text; also whether rows were left unread."""
    from .data import load_raw_datasets

    raw = load_raw_datasets(dataclasses.replace(data_args, streaming=True))
    texts: list[str] = []
    truncated = False
    for split in ("train", "validation"):
        if split not in raw:
            continue
        for row in raw[split]:
            if len(texts) >= limit:
                truncated = True
                break
            if row.get(data_args.text_column) is not None:
                texts.append(row[data_args.text_column])
    return texts, truncated


def load_or_build_tokenizer(args: argparse.Namespace, data_args: DataArguments):
    """The tokenizer of ``--tokenizer_name`` (with a mask token), or one built from the training text."""
    from ..tokenization import build_bpe_tokenizer, build_character_tokenizer, ensure_mask_token

    if args.tokenizer_name is not None:
        from transformers import AutoTokenizer

        from ..hub import hub_errors_as_unreachable

        with hub_errors_as_unreachable(f"load the tokenizer {args.tokenizer_name!r}"):
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
        return ensure_mask_token(tokenizer)
    texts, truncated = _read_texts(data_args, args.tokenizer_train_samples)
    if not any(texts):
        raise ValueError("the training data is empty: no text to build a tokenizer from")
    if args.tokenizer_type == "bpe":
        return build_bpe_tokenizer(texts, args.bpe_vocab_size)
    alphabet = "".join(sorted(set("".join(texts))))
    # Characters outside the read sample map to [UNK]; with the whole text read, every character is known.
    return build_character_tokenizer(
        alphabet, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]" if truncated else None
    )


def build_model(args: argparse.Namespace, tokenizer, seq_len: int):
    """A new ``MaskedDiffusionLM`` sized by ``--config_name`` and the size flags, for ``tokenizer``'s vocabulary."""
    from ..configuration_mcd import MaskedDiffusionLMConfig
    from ..modeling_mcd import MaskedDiffusionLM

    overrides = {name: getattr(args, name) for name in
                 ("hidden_size", "num_hidden_layers", "num_attention_heads", "cond_dim", "dropout", "time_conditioning")
                 if getattr(args, name) is not None}
    if args.model_name_or_path is not None:
        model = MaskedDiffusionLM.from_pretrained(args.model_name_or_path)
        if model.config.vocab_size != len(tokenizer) or model.config.mask_token_id != tokenizer.mask_token_id:
            raise ValueError(
                f"--model_name_or_path has vocab_size={model.config.vocab_size}, mask_token_id="
                f"{model.config.mask_token_id} but the tokenizer has {len(tokenizer)} ids and mask id "
                f"{tokenizer.mask_token_id}"
            )
        return model
    if args.config_name is not None:
        if not os.path.exists(args.config_name):
            raise ValueError(f"--config_name: {args.config_name!r} is neither a folder nor a JSON file")
        config = MaskedDiffusionLMConfig.from_pretrained(args.config_name)
        for name, value in overrides.items():
            setattr(config, name, value)
        config.vocab_size = len(tokenizer)
        config.mask_token_id = tokenizer.mask_token_id
        if config.max_position_embeddings < seq_len:
            raise ValueError(
                f"seq_len={seq_len} is larger than the config's max_position_embeddings={config.max_position_embeddings}"
            )
        config.validate()
    else:
        sizes = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "cond_dim": 128, **overrides}
        config = MaskedDiffusionLMConfig(
            vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, max_position_embeddings=seq_len, **sizes
        )
    return MaskedDiffusionLM(config)


def train_teacher(argv: Sequence[str] | None = None) -> TrainOutput:
    """Parses ``argv``, prepares data, tokenizer and model, trains, and exports an ``MCDPipeline``."""
    from transformers import set_seed

    from ..tokenization import build_character_tokenizer, check_mask_token

    args = parse_args(argv)
    training_args = training_arguments_from(args)
    data_args = data_arguments_from(args)
    sources = [name for name, value in (("--train_file", args.train_file), ("--dataset_name", args.dataset_name),
                                        ("--source", args.source)) if value is not None]
    if len(sources) != 1:
        raise ValueError(f"give exactly one data source among --train_file, --dataset_name, --source (got {sources})")
    accelerator = create_accelerator(training_args)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    card_info: dict[str, Any] = {}
    train_dataset = validation_dataset = None
    if args.source is not None:
        from ..evaluation.sources import get_source

        source = get_source(args.source)
        tokenizer = build_character_tokenizer(source.alphabet)
        train_dataset = source.to_dataset(args.source_num_sequences, args.seq_len, seed=args.seed)
        validation_count = max(1, args.source_num_sequences // 20)
        validation_dataset = source.to_dataset(validation_count, args.seq_len, seed=args.seed + 1)
        description = f"known-likelihood source {args.source!r} (entropy rate {source.entropy_rate():.4f} nats/token)"
        card_info["source_entropy_rate"] = round(float(source.entropy_rate()), 6)
    else:
        with accelerator.main_process_first():
            tokenizer = load_or_build_tokenizer(args, data_args)
        description = None
        if args.dataset_name is not None:
            card_info["datasets"] = [args.dataset_name]
    check_mask_token(tokenizer)

    set_seed(args.seed)  # the same initial weights on every process
    model = build_model(args, tokenizer, args.seq_len)
    data = prepare_training_data(
        data_args, tokenizer, max_position_embeddings=model.config.max_position_embeddings,
        vocab_size=model.config.vocab_size, main_process_first=accelerator.main_process_first,
        train_dataset=train_dataset, validation_dataset=validation_dataset,
    )
    trainer = MDLMTrainer(
        model, training_args, data.train, data.validation, tokenizer=tokenizer, accelerator=accelerator,
        data_description=description or data.description, noise_schedule=args.noise_schedule,
        schedule_eps=args.schedule_eps, time_eps=args.time_eps, card_info=card_info,
        shuffle_buffer_size=data_args.shuffle_buffer_size,
    )
    return trainer.train()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``examples/train_teacher.py`` and ``mcd-hf train-teacher``."""
    train_teacher(argv)
    return 0


__all__ = ["MDLMTrainer", "train_teacher", "main", "build_parser", "parse_args", "add_data_arguments",
           "add_training_arguments", "training_arguments_from", "data_arguments_from",
           "load_or_build_tokenizer", "build_model"]
