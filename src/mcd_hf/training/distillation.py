"""Distillation of a masked diffusion LM into a few-step student: MCD and the SDTT baseline, in rounds.

Round ``r`` (of ``num_rounds``, ``steps_per_round`` optimizer steps each) trains the student to do in one step of
``dt_r = 2^r / T`` what the round's teacher does (``T``: the teacher's step count). The round's teacher is a frozen
copy of the student (raw weights or their EMA) taken at the round start; round 0's teacher is the original model,
from which the student starts. After round ``r`` the student samples with ``T / 2^(r+1)`` steps; the exported
pipeline records ``T / 2^num_rounds`` as its recommended step count. DESIGN.md section 4; losses in
:mod:`mcd_hf.training.distill_losses`.

``examples/distill.py`` and ``mcd-hf distill`` both call :func:`main`; it runs with ``python`` and with
``accelerate launch`` (one or several processes, CPU or GPU):

    accelerate launch examples/distill.py --teacher path/to/teacher --source markov --seq_len 64 \
        --method mcd --num_rounds 2 --steps_per_round 400 --teacher_steps 64 --output_dir student
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from accelerate.utils import DistributedType

from ..duality import NOISE_SCHEDULES
from .distill_losses import COUPLINGS, DIVERGENCES, METHODS, distillation_loss
from .seeding import derive_seed, make_generator
from .trainer import Trainer, TrainingArguments, TrainOutput, create_accelerator

logger = logging.getLogger(__name__)

TEACHER_UPDATES = ("raw", "ema")
# "shadow": the noise-conditioned student of issue 10, in mcd_hf.training.shadow_distillation.
DISTILL_METHODS = (*METHODS, "shadow")
TIME_SAMPLING = ("uniform", "grid")


@dataclass
class DistillationArguments:
    """What is distilled and how.

    Args:
        method: ``mcd`` (Masked Consistency Distillation) or ``sdtt`` (two sampled teacher steps per student step).
        divergence: ``kl-bwd`` (KL(student || teacher)), ``kl-fwd`` or ``jsd``.
        coupling: MCD only: ``data`` (revealed positions hold the data's tokens) or ``teacher`` (the teacher's draw).
        num_rounds: Rounds; each halves the student's step count.
        steps_per_round: Optimizer steps per round.
        teacher_steps: ``T``, the teacher's sampling step count; must be divisible by ``2^num_rounds``.
        teacher_update: The round's teacher is a copy of the student's ``raw`` weights or of their ``ema``.
        time_sampling: Student times ``uniform`` on ``(dt, 1]`` or on the sampler's ``grid`` ``{dt, ..., 1}``.
        antithetic: Stratified times over each batch.
        validation_num_samples: Sequences sampled by the student at each validation (0: no sampling).
        validation_seq_len: Their length (default: the model's ``max_position_embeddings``).
        teacher_name: Where the teacher came from (recorded in the model card).
    """

    method: str = "mcd"
    divergence: str = "kl-bwd"
    coupling: str = "data"
    num_rounds: int = 2
    steps_per_round: int = 500
    teacher_steps: int = 1024
    teacher_update: str = "raw"
    time_sampling: str = "uniform"
    antithetic: bool = True
    validation_num_samples: int = 32
    validation_seq_len: int | None = None
    teacher_name: str | None = None

    def __post_init__(self):
        for name, choices in (("method", DISTILL_METHODS), ("divergence", DIVERGENCES), ("coupling", COUPLINGS),
                              ("teacher_update", TEACHER_UPDATES), ("time_sampling", TIME_SAMPLING)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.method == "sdtt" and self.coupling != "data":
            raise ValueError("coupling='teacher' applies to method 'mcd' only (SDTT samples its own targets)")
        for name in ("num_rounds", "steps_per_round", "teacher_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.teacher_steps % 2**self.num_rounds != 0:
            raise ValueError(
                f"teacher_steps ({self.teacher_steps}) must be divisible by 2^num_rounds ({2**self.num_rounds}) so "
                "that every round's student step count is an integer"
            )
        if not isinstance(self.validation_num_samples, int) or self.validation_num_samples < 0:
            raise ValueError(f"validation_num_samples must be an int >= 0, got {self.validation_num_samples!r}")

    @property
    def total_steps(self) -> int:
        return self.num_rounds * self.steps_per_round

    def round_of(self, step: int) -> int:
        """The round of optimizer step ``step`` (1-based)."""
        return min(max(step - 1, 0) // self.steps_per_round, self.num_rounds - 1)

    def step_size(self, round_index: int) -> float:
        """``dt_r = 2^r / T`` on the sampler's time axis."""
        return 2**round_index / self.teacher_steps

    def student_steps(self, round_index: int) -> int:
        """Sampling steps of the student after round ``round_index``: ``T / 2^(r+1)``."""
        return self.teacher_steps // 2 ** (round_index + 1)


class DistillationTrainer(Trainer):
    """Distils ``model`` (the teacher, from which the student starts) with MCD or SDTT, round by round.

    Checkpoints carry the round and the round's teacher weights, so a run resumed mid-round continues exactly. One
    frozen teacher copy per process, in the student's dtype, eval mode, run under ``torch.no_grad`` and the same
    autocast (mixed precision) as the student.

    Args:
        model: The teacher ``MaskedDiffusionLM``; trained in place as the student.
        args: The optimisation options; ``max_train_steps`` may stop before ``distill_args.total_steps``.
        distill_args: The method and round options.
        train_dataset, eval_dataset: Packed ``{"input_ids"}`` rows.
        scheduler: The teacher's ``MaskedDualityScheduler`` (its noise schedule is the one distilled); the export
            and validation use a copy.
        source: A known-likelihood source (``mcd_hf.evaluation.sources``) for exact NLL - H of validation samples.
        card_info: Extra facts for the model card.
        **kwargs: Passed to :class:`Trainer` (``tokenizer``, ``accelerator``, ``data_description``, ...).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        distill_args: DistillationArguments,
        train_dataset,
        eval_dataset=None,
        *,
        scheduler,
        source=None,
        card_info: dict[str, Any] | None = None,
        **kwargs,
    ):
        if args.max_train_steps > distill_args.total_steps:
            raise ValueError(
                f"max_train_steps ({args.max_train_steps}) exceeds num_rounds * steps_per_round "
                f"({distill_args.total_steps})"
            )
        super().__init__(model, args, train_dataset, eval_dataset, **kwargs)
        self.distill_args = distill_args
        self.mask_token_id = int(model.config.mask_token_id)
        self.vocab_size = int(model.config.vocab_size)
        if scheduler.config.mask_token_id != self.mask_token_id or scheduler.config.vocab_size != self.vocab_size:
            raise ValueError("scheduler: its mask_token_id and vocab_size must be the model's")
        self.scheduler = scheduler
        self.schedule = scheduler.schedule  # the teacher's masking schedule, the one being distilled
        if source is not None and source.vocab_size != self.vocab_size - 1:
            raise ValueError(
                f"source: {source.vocab_size} tokens, but the model has {self.vocab_size - 1} real tokens"
            )
        self.source = source
        self.card_info = dict(card_info or {})
        self.teacher: torch.nn.Module | None = None
        self.current_round: int | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Teacher and rounds

    def prepare(self) -> None:
        if self._prepared:
            return
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("distillation does not support FSDP (the round's teacher is a full copy); use DDP")
        # The one teacher copy of this process, taken before the student is wrapped for distribution.
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        super().prepare()
        self.teacher.to(self.device)

    @torch.no_grad()
    def start_round(self, round_index: int) -> None:
        """Makes the round's teacher: a frozen copy of the student (raw or EMA weights); round 0 keeps the original."""
        if round_index > 0:
            self.teacher.load_state_dict(self.unwrapped_model.state_dict())
            if self.distill_args.teacher_update == "ema":
                if self.ema is None:
                    raise ValueError("teacher_update='ema' needs ema_decay > 0")
                self.ema.copy_to(self.teacher)
        self.current_round = round_index
        if self.is_main_process:
            logger.info(
                f"round {round_index}: dt = {self.distill_args.step_size(round_index):.6g}, student sampling steps "
                f"{self.distill_args.student_steps(round_index)}"
            )

    def on_train_step_start(self, step: int) -> None:
        round_index = self.distill_args.round_of(step)
        if round_index != self.current_round:
            self.start_round(round_index)

    def state_dict(self) -> dict[str, Any]:
        teacher = {key: value.detach().cpu() for key, value in self.teacher.state_dict().items()}
        return {"round": -1 if self.current_round is None else self.current_round, "teacher": teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "teacher" not in state:
            raise ValueError("the checkpoint holds no distillation state (is it a teacher-training checkpoint?)")
        self.teacher.load_state_dict(state["teacher"])
        self.current_round = None if int(state["round"]) < 0 else int(state["round"])

    # ------------------------------------------------------------------------------------------------------------
    # Loss and validation

    def _loss(self, model, input_ids, step, generator):
        distill = self.distill_args
        with self.accelerator.autocast():
            return distillation_loss(
                distill.method, model, self.teacher, input_ids, self.schedule,
                distill.step_size(distill.round_of(step)), divergence=distill.divergence, coupling=distill.coupling,
                generator=generator, antithetic=distill.antithetic, on_grid=distill.time_sampling == "grid",
                mask_token_id=self.mask_token_id,
            )

    def compute_loss(self, batch, step, generator):
        loss, logs = self._loss(self.model, batch["input_ids"], step, generator)
        logs = {key: value.float() for key, value in logs.items() if key != "loss"}
        round_index = self.distill_args.round_of(step)
        logs.update(round=float(round_index), dt=self.distill_args.step_size(round_index))
        return loss, logs

    def evaluation_step(self, batch, weight, generator):
        rows = weight > 0  # padding rows of the last batch carry weight 0
        input_ids = batch["input_ids"][rows]
        count = rows.sum().double()
        if input_ids.shape[0] == 0:
            return {"distill_loss_sum": count * 0.0, "num_sequences": count}
        loss, _ = self._loss(self.model, input_ids, max(self.global_step, 1), generator)
        return {"distill_loss_sum": loss.double() * count, "num_sequences": count}

    def finalize_evaluation(self, sums):
        return {"val_distill_loss": sums["distill_loss_sum"] / max(sums["num_sequences"], 1.0)}

    def sampling_pipeline(self, model: torch.nn.Module, num_inference_steps: int | None = None):
        """An ``MCDPipeline`` of ``model`` with a copy of the teacher's scheduler (no shared sampler state)."""
        from ..pipeline_mcd import MCDPipeline

        overrides = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
        scheduler = type(self.scheduler).from_config(self.scheduler.config, **overrides)
        return MCDPipeline(model=model, scheduler=scheduler, tokenizer=self.tokenizer)

    @torch.no_grad()
    def sample_metrics(self) -> dict[str, float]:
        """Samples with the student at the round's step count; unigram entropy, and NLL - H with a source."""
        from ..evaluation.metrics import bigram_entropy, unigram_entropy

        distill = self.distill_args
        total = distill.validation_num_samples
        if total == 0:
            return {}
        steps = distill.student_steps(distill.round_of(max(self.global_step, 1)))
        model = self.unwrapped_model
        seq_len = distill.validation_seq_len or model.config.max_position_embeddings
        num_processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_process = math.ceil(total / num_processes)
        # One generator per sequence, keyed by its global index: the samples do not depend on the process count.
        generators = [make_generator(derive_seed(self.args.seed, "validation-samples", rank * per_process + i))
                      for i in range(per_process)]
        was_training = model.training
        model.eval()
        pipeline = self.sampling_pipeline(model)
        pipeline.set_progress_bar_config(disable=True)
        output = pipeline(batch_size=per_process, seq_len=seq_len, num_inference_steps=steps, generator=generators,
                          output_type="ids")
        model.train(was_training)
        sequences = self.accelerator.gather(output.sequences.to(self.device).contiguous())[:total].cpu()
        calls = self.accelerator.reduce(torch.tensor([float(output.num_model_calls)], device=self.device), "mean")
        metrics = {
            "val_sampling_steps": float(steps),
            "val_model_calls": float(calls.item()),
            "val_unigram_entropy": unigram_entropy(sequences),
            "val_bigram_entropy": bigram_entropy(sequences),
        }
        if self.source is not None:
            metrics["val_excess_nll"] = float(self.source.excess_nll(sequences))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate()
        if self.ema is not None:
            with self.ema.average_parameters(self.unwrapped_model):
                metrics.update(self.sample_metrics())
        else:
            metrics.update(self.sample_metrics())
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # Export

    def recommended_steps(self) -> int:
        """``T / 2^(rounds done)``: ``T / 2^num_rounds`` after a complete run."""
        return self.distill_args.student_steps(self.distill_args.round_of(max(self.global_step, 1)))

    def build_pipeline(self, model):
        return self.sampling_pipeline(model, self.recommended_steps())

    def model_card_info(self) -> dict[str, Any]:
        distill = self.distill_args
        info: dict[str, Any] = {
            "method": distill.method,
            "teacher": distill.teacher_name,
            "divergence": distill.divergence,
            "num_rounds": distill.num_rounds,
            "rounds_completed": self.global_step // distill.steps_per_round,
            "steps_per_round": distill.steps_per_round,
            "teacher_steps": distill.teacher_steps,
            "teacher_update": distill.teacher_update,
            "recommended_num_inference_steps": self.recommended_steps(),
        }
        if distill.method == "mcd":
            info["coupling"] = distill.coupling
        info.update(super().model_card_info())
        info.update(self.card_info)
        return {key: value for key, value in info.items() if value is not None}


# ---------------------------------------------------------------------------------------------------------------
# Loading the teacher


def load_teacher(
    teacher: str,
    *,
    noise_schedule: str = "loglinear",
    schedule_eps: float = 1e-3,
    mdlm_overrides: dict[str, Any] | None = None,
):
    """Loads ``--teacher``: an ``MCDPipeline`` folder or Hub id, a ``MaskedDiffusionLM`` folder, or an MDLM
    checkpoint (HF MDLM folder, Hub id or raw state-dict file) through ``mcd_hf.conversion``.

    Args:
        teacher: The path or Hub id.
        noise_schedule, schedule_eps: The schedule when the teacher brings no scheduler.
        mdlm_overrides: ``MaskedDiffusionLMConfig`` values for the MDLM converter (raw files need
            ``num_attention_heads`` and ``time_conditioning``).

    Returns:
        ``(model, scheduler, tokenizer_or_None, card_info)``.
    """
    from ..modeling_mcd import MaskedDiffusionLM
    from ..pipeline_mcd import MCDPipeline
    from ..scheduling_mcd import MaskedDualityScheduler

    def default_scheduler(model):
        return MaskedDualityScheduler(mask_token_id=model.config.mask_token_id, vocab_size=model.config.vocab_size,
                                      noise_schedule=noise_schedule, eps=schedule_eps)

    def convert():
        from ..conversion import convert_mdlm_checkpoint

        model = convert_mdlm_checkpoint(teacher, **(mdlm_overrides or {}))
        return model, default_scheduler(model), None, {"converted_from": teacher}

    def tokenizer_in(folder):
        if not any(os.path.isfile(os.path.join(folder, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)

    if os.path.isfile(teacher):
        return convert()
    if os.path.isdir(teacher):
        if os.path.isfile(os.path.join(teacher, "model_index.json")):
            pipe = MCDPipeline.from_pretrained(teacher)
            return pipe.model, pipe.scheduler, pipe.tokenizer, dict(pipe.card_info)
        config_path = os.path.join(teacher, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"--teacher: {teacher!r} holds neither model_index.json nor config.json")
        with open(config_path, encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
        if model_type == "mcd_masked_diffusion":
            model = MaskedDiffusionLM.from_pretrained(teacher)
            return model, default_scheduler(model), tokenizer_in(teacher), {}
        return convert()
    if not re.fullmatch(r"[\w][\w.-]*(/[\w][\w.-]*)?", teacher):
        raise ValueError(f"--teacher: {teacher!r} is not an existing file or folder, nor a Hub id")
    # A Hub id: an MCDPipeline repo, else an MDLM checkpoint repo (HubUnreachableError when offline).
    from ..hub import HubUnreachableError

    try:
        pipe = MCDPipeline.from_pretrained(teacher)
    except HubUnreachableError:
        raise
    except (OSError, ValueError):
        return convert()
    return pipe.model, pipe.scheduler, pipe.tokenizer, {"base_model": teacher, **pipe.card_info}


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from .teacher import _add_training_arguments, add_data_arguments

    parser = argparse.ArgumentParser(
        prog="distill", description="Distil a masked diffusion LM into a few-step student (MCD or SDTT)."
    )
    group = parser.add_argument_group("teacher")
    group.add_argument("--teacher", required=True,
                       help="an MCDPipeline folder or Hub id, a MaskedDiffusionLM folder, or an MDLM checkpoint")
    group.add_argument("--noise_schedule", choices=NOISE_SCHEDULES, default="loglinear",
                       help="schedule of a teacher that brings no scheduler")
    group.add_argument("--schedule_eps", type=float, default=1e-3)
    group.add_argument("--teacher_num_attention_heads", type=int, default=None, help="MDLM raw checkpoints only")
    group.add_argument("--teacher_time_conditioning", action=argparse.BooleanOptionalAction, default=None,
                       help="MDLM raw checkpoints only")
    add_data_arguments(parser)
    defaults = DistillationArguments()
    group = parser.add_argument_group("distillation")
    group.add_argument("--method", choices=DISTILL_METHODS, default=defaults.method)
    group.add_argument("--divergence", choices=DIVERGENCES, default=defaults.divergence)
    group.add_argument("--coupling", choices=COUPLINGS, default=defaults.coupling)
    group.add_argument("--num_rounds", type=int, default=defaults.num_rounds)
    group.add_argument("--steps_per_round", type=int, default=defaults.steps_per_round)
    group.add_argument("--teacher_steps", type=int, default=None,
                       help="T, the teacher's step count (default: its scheduler's num_inference_steps, else seq_len)")
    group.add_argument("--teacher_update", choices=TEACHER_UPDATES, default=defaults.teacher_update)
    group.add_argument("--time_sampling", choices=TIME_SAMPLING, default=defaults.time_sampling)
    group.add_argument("--no_antithetic", dest="antithetic", action="store_false")
    group.add_argument("--validation_num_samples", type=int, default=defaults.validation_num_samples)
    group.add_argument("--validation_seq_len", type=int, default=None)
    from .shadow_distillation import add_shadow_arguments

    add_shadow_arguments(parser)
    _add_training_arguments(parser)
    # Distillation fine-tunes: a lower default rate than pretraining; the length comes from the rounds.
    parser.set_defaults(learning_rate=1e-4, max_train_steps=None)
    return parser


def distill(argv: Sequence[str] | None = None) -> TrainOutput:
    """Parses ``argv``, loads the teacher and the data, distils, and exports an ``MCDPipeline``."""
    from ..tokenization import build_character_tokenizer, check_mask_token
    from .data import prepare_training_data
    from .teacher import data_arguments_from, training_arguments_from

    args = build_parser().parse_args(argv)
    if args.train_file is None and args.dataset_name is None and args.source is None:
        raise ValueError("give a data source: --train_file, --dataset_name or --source")
    if args.train_file is not None and args.dataset_name is not None:
        raise ValueError("give only one of --train_file and --dataset_name")
    mdlm_overrides = {name: value for name, value in (("num_attention_heads", args.teacher_num_attention_heads),
                                                      ("time_conditioning", args.teacher_time_conditioning))
                      if value is not None}
    model, scheduler, tokenizer, teacher_card = load_teacher(
        args.teacher, noise_schedule=args.noise_schedule, schedule_eps=args.schedule_eps, mdlm_overrides=mdlm_overrides
    )
    teacher_steps = args.teacher_steps or scheduler.config.num_inference_steps or args.seq_len
    distill_args = DistillationArguments(
        method=args.method, divergence=args.divergence, coupling=args.coupling, num_rounds=args.num_rounds,
        steps_per_round=args.steps_per_round, teacher_steps=teacher_steps, teacher_update=args.teacher_update,
        time_sampling=args.time_sampling, antithetic=args.antithetic,
        validation_num_samples=args.validation_num_samples, validation_seq_len=args.validation_seq_len,
        teacher_name=args.teacher,
    )
    if args.max_train_steps is None:
        args.max_train_steps = distill_args.total_steps
    if args.validation_steps is None:
        args.validation_steps = args.steps_per_round  # validate at the end of every round
    training_args = training_arguments_from(args)
    if args.teacher_update == "ema" and training_args.ema_decay == 0:
        raise ValueError("--teacher_update ema needs --ema_decay > 0")
    data_args = data_arguments_from(args)
    accelerator = create_accelerator(training_args)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.tokenizer_name is not None:
        from transformers import AutoTokenizer

        from ..hub import hub_errors_as_unreachable
        from ..tokenization import ensure_mask_token

        with hub_errors_as_unreachable(f"load the tokenizer {args.tokenizer_name!r}"):
            tokenizer = ensure_mask_token(AutoTokenizer.from_pretrained(args.tokenizer_name))
    source = None
    card_info: dict[str, Any] = {}
    if teacher_card.get("base_model"):
        card_info["base_model"] = teacher_card["base_model"]
    train_dataset = validation_dataset = None
    description = None
    if args.source is not None:
        from ..evaluation.sources import get_source

        source = get_source(args.source)
        if tokenizer is None:
            tokenizer = build_character_tokenizer(source.alphabet)
        card_info["source_entropy_rate"] = round(float(source.entropy_rate()), 6)
        if args.train_file is None and args.dataset_name is None:
            train_dataset = source.to_dataset(args.source_num_sequences, args.seq_len, seed=args.seed)
            validation_dataset = source.to_dataset(max(1, args.source_num_sequences // 20), args.seq_len,
                                                   seed=args.seed + 1)
            description = f"known-likelihood source {args.source!r} (entropy rate {source.entropy_rate():.4f} nats/token)"
    if tokenizer is None:
        raise ValueError("--teacher brings no tokenizer: pass --tokenizer_name")
    check_mask_token(tokenizer)
    if tokenizer.mask_token_id != model.config.mask_token_id:
        raise ValueError(
            f"the tokenizer's mask id {tokenizer.mask_token_id} is not the teacher's mask_token_id "
            f"{model.config.mask_token_id}"
        )
    if args.dataset_name is not None:
        card_info["datasets"] = [args.dataset_name]
    data = prepare_training_data(
        data_args, tokenizer, max_position_embeddings=model.config.max_position_embeddings,
        vocab_size=model.config.vocab_size, main_process_first=accelerator.main_process_first,
        train_dataset=train_dataset, validation_dataset=validation_dataset,
    )
    model = model.float().train()
    trainer_class, extra = DistillationTrainer, {}
    if args.method == "shadow":
        from .shadow_distillation import shadow_trainer_setup

        model, trainer_class, extra = shadow_trainer_setup(model, args, distill_args)
    trainer = trainer_class(
        model, training_args, distill_args, data.train, data.validation, scheduler=scheduler, source=source,
        card_info=card_info, tokenizer=tokenizer, accelerator=accelerator,
        data_description=description or data.description, shuffle_buffer_size=data_args.shuffle_buffer_size,
        **extra,
    )
    return trainer.train()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``examples/distill.py`` and ``mcd-hf distill``."""
    distill(argv)
    return 0


__all__ = ["DistillationArguments", "DistillationTrainer", "build_parser", "distill", "load_teacher", "main"]
