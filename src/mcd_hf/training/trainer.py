"""The Accelerate training loop shared by teacher pretraining (MDLM) and distillation (MCD, SDTT).

Subclasses implement :meth:`Trainer.compute_loss` and, as needed, the hooks :meth:`on_train_begin`,
:meth:`on_train_step_start`, :meth:`on_train_step_end`, :meth:`evaluation_step`/:meth:`evaluate`,
:meth:`state_dict`/:meth:`load_state_dict` (extra checkpoint state, tensors allowed) and :meth:`build_pipeline`
(the final export). The base class owns everything else: AdamW with warmup, gradient accumulation, clipping,
mixed precision, EMA, trackers, progress bar, periodic validation, atomic checkpoints and exact resume.

Exact resume rests on three rules: (1) the data order is a pure function of ``(seed, epoch)`` and a resumed run
starts at the first unconsumed batch (:mod:`mcd_hf.training.data`); (2) every random draw of step ``k`` comes from
a generator seeded by ``(seed, k, process, micro-batch)`` (:mod:`mcd_hf.training.seeding`), and the global torch RNG
(dropout) is re-seeded the same way at every step; (3) a checkpoint holds the model, optimizer, LR schedule, EMA and
the subclass state. Structure after diffusers' ``train_text_to_image.py`` and nanoGPT's ``train.py``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import checkpointing
from .arguments import MIXED_PRECISION_CHOICES, REPORT_TO_CHOICES, TrainingArguments
from .data import iterate_eval_batches, iterate_train_batches
from .ema import ExponentialMovingAverage
from .seeding import derive_seed, make_generator

logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.jsonl"
EXTRA_STATE_NAME = "trainer_extra_state.pt"


class NonFiniteLossError(FloatingPointError):
    """The training loss (or gradient norm) became NaN or infinite; raised before any checkpoint of that step."""


def create_accelerator(args: TrainingArguments) -> Accelerator:
    """An ``Accelerator`` for ``args``: CPU (gloo DDP under ``accelerate launch``) when no GPU is available."""
    use_cpu = args.cpu or not torch.cuda.is_available()
    if args.mixed_precision == "fp16" and use_cpu:
        raise ValueError("mixed_precision='fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    log_with = None if args.report_to == "none" else args.report_to
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs"))
    return Accelerator(
        cpu=use_cpu, mixed_precision=args.mixed_precision, log_with=log_with, project_config=project
    )


@dataclass
class TrainOutput:
    """What :meth:`Trainer.train` returns."""

    global_step: int
    final_loss: float | None
    metrics: dict[str, float]
    output_dir: str


class Trainer:
    """Accelerate training loop with exact resume; subclass and implement :meth:`compute_loss`.

    Args:
        model: The model to train (unwrapped; it is prepared here).
        args: Optimisation and bookkeeping options.
        train_dataset: Packed ``{"input_ids"}`` rows (``datasets.Dataset`` or ``IterableDataset``).
        eval_dataset: Packed validation rows, or None.
        tokenizer: Saved with the final pipeline.
        accelerator: An existing ``Accelerator`` (default: :func:`create_accelerator`).
        data_description: What the data was (recorded in the model card).
        shuffle_buffer_size: Shuffle buffer for streaming data.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        args: TrainingArguments,
        train_dataset,
        eval_dataset=None,
        *,
        tokenizer=None,
        accelerator: Accelerator | None = None,
        data_description: str | None = None,
        shuffle_buffer_size: int = 10_000,
    ):
        self.args = args
        self.accelerator = accelerator if accelerator is not None else create_accelerator(args)
        self.model = model
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.tokenizer = tokenizer
        self.data_description = data_description
        self.shuffle_buffer_size = shuffle_buffer_size
        self.global_step = 0
        self.optimizer = None
        self.lr_scheduler = None
        self.ema: ExponentialMovingAverage | None = None
        self.history: deque[dict[str, float]] = deque(maxlen=10_000)
        self.last_metrics: dict[str, float] = {}
        self._prepared = False

    # ------------------------------------------------------------------------------------------------------------
    # Properties

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------------------------
    # Hooks for subclasses

    def compute_loss(
        self, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The loss of one micro-batch at optimizer step ``step`` (1-based).

        Args:
            batch: ``{"input_ids": (B, L) long}`` on :attr:`device`.
            step: The optimizer step being computed.
            generator: The only source of randomness to use (seeded by seed, step, process and micro-batch).

        Returns:
            ``(loss, logs)``: a scalar float32 loss to minimise, and scalar logs with the same keys on every call.
        """
        raise NotImplementedError("subclasses implement compute_loss(batch, step, generator)")

    def on_train_begin(self, resumed_from: str | None) -> None:
        """Called once after preparation and resume, before the first step."""

    def on_train_step_start(self, step: int) -> None:
        """Called before the micro-batches of optimizer step ``step`` (e.g. to start a distillation round)."""

    def on_train_step_end(self, step: int, logs: dict[str, float]) -> None:
        """Called after the optimizer step ``step`` with its reduced logs."""

    def evaluation_step(
        self, batch: dict[str, torch.Tensor], weight: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """Weighted *sums* over one validation batch (``weight`` (B,) is 0 on padding rows); reduced by summing."""
        raise NotImplementedError("subclasses implement evaluation_step or override evaluate")

    def finalize_evaluation(self, sums: dict[str, float]) -> dict[str, float]:
        """Turns the summed validation quantities into metrics."""
        return sums

    def state_dict(self) -> dict[str, Any]:
        """Extra state of the subclass saved in checkpoints (tensors and plain Python values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` on resume."""

    def build_pipeline(self, model: torch.nn.Module):
        """The object whose ``save_pretrained(output_dir, card_info=...)`` writes the final export."""
        raise NotImplementedError("subclasses implement build_pipeline(model)")

    def model_card_info(self) -> dict[str, Any]:
        """Facts for the model card of the final export."""
        info: dict[str, Any] = {"training_steps": self.global_step}
        if self.data_description:
            info["training_data"] = self.data_description
        info.update({key: round(value, 6) for key, value in self.last_metrics.items()})
        return info

    def create_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW; weight decay on matrices only (nanoGPT's grouping)."""
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(
            groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Setup

    def step_generator(self, step: int, micro_step: int = 0, purpose: str = "train") -> torch.Generator:
        """The generator of (``purpose``, ``step``, this process, ``micro_step``), on :attr:`device`."""
        seed = derive_seed(self.args.seed, purpose, step, self.accelerator.process_index, micro_step)
        return make_generator(seed, self.device)

    def prepare(self) -> None:
        """Creates optimizer, LR schedule and EMA, and wraps the model for the distributed setup (idempotent)."""
        if self._prepared:
            return
        args = self.args
        if args.ema_decay > 0 and self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("ema_decay > 0 is not supported with FSDP (sharded parameters); set ema_decay=0")
        optimizer = self.create_optimizer(self.model)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        # Not prepared: accelerate's scheduler wrapper steps once per process; this one steps once per update.
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler_type, self.optimizer, num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=args.max_train_steps,
        )
        if args.ema_decay > 0:
            self.ema = ExponentialMovingAverage(self.unwrapped_model, args.ema_decay)
        self._prepared = True

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self) -> str:
        """Writes ``checkpoint-{global_step}`` atomically (every process must call it); returns its path."""
        accelerator = self.accelerator
        output_dir = self.args.output_dir
        temporary = checkpointing.temporary_checkpoint_path(output_dir, self.global_step)
        final = checkpointing.checkpoint_path(output_dir, self.global_step)
        if accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            checkpointing.remove_stale_temporaries(output_dir)
        accelerator.wait_for_everyone()
        accelerator.save_state(temporary)
        if accelerator.is_main_process:
            extra = {"lr_scheduler": self.lr_scheduler.state_dict(), "trainer": self.state_dict()}
            if self.ema is not None:
                extra["ema"] = self.ema.state_dict()
            with open(os.path.join(temporary, EXTRA_STATE_NAME), "wb") as handle:
                torch.save(extra, handle)
            self._write_trainer_state(temporary)  # the completeness marker, written last
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpointing.publish_checkpoint(temporary, final)
            for removed in checkpointing.rotate_checkpoints(output_dir, self.args.checkpoints_total_limit):
                logger.info(f"removed old checkpoint {removed}")
        accelerator.wait_for_everyone()
        return final

    def _write_trainer_state(self, folder: str) -> None:
        state = {
            "global_step": self.global_step,
            "num_processes": self.accelerator.num_processes,
            "train_batch_size": self.args.train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "seed": self.args.seed,
            "last_metrics": self.last_metrics,
            "args": self.args.to_dict(),
        }
        checkpointing.write_json(os.path.join(folder, checkpointing.COMPLETE_MARKER), state)

    def load_checkpoint(self, path: str) -> None:
        """Restores a checkpoint written by :meth:`save_checkpoint` (model, optimizer, schedule, EMA, subclass)."""
        with open(os.path.join(path, checkpointing.COMPLETE_MARKER), encoding="utf-8") as handle:
            state = json.load(handle)
        for key in ("num_processes", "train_batch_size", "gradient_accumulation_steps", "seed"):
            current = self.accelerator.num_processes if key == "num_processes" else getattr(self.args, key)
            if state.get(key) != current:
                logger.warning(
                    f"resuming with {key}={current} but the checkpoint used {state.get(key)}: the run continues but "
                    "will not reproduce an uninterrupted run exactly"
                )
        self.accelerator.load_state(path)
        extra = torch.load(os.path.join(path, EXTRA_STATE_NAME), map_location="cpu", weights_only=True)
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        if self.ema is not None:
            if "ema" not in extra:
                raise ValueError(f"{path} holds no EMA state but ema_decay={self.args.ema_decay}")
            self.ema.load_state_dict(extra["ema"])
        self.load_state_dict(extra.get("trainer", {}))
        self.global_step = int(state["global_step"])
        self.last_metrics = dict(state.get("last_metrics", {}))

    # ------------------------------------------------------------------------------------------------------------
    # Logging

    def _log_path(self) -> str:
        return os.path.join(self.args.output_dir, TRAIN_LOG_NAME)

    def _truncate_log(self, step: int) -> None:
        """Drops log lines after ``step`` (written by a run that crashed after its last checkpoint)."""
        path = self._log_path()
        if not self.is_main_process or not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as handle:
            kept = [line for line in handle if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)

    def log(self, logs: dict[str, float], step: int) -> None:
        """Appends ``logs`` to the JSONL log and sends them to the trackers (main process)."""
        if not self.is_main_process:
            return
        with open(self._log_path(), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **logs}) + "\n")

    # ------------------------------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Runs :meth:`evaluation_step` over the validation set (EMA weights when enabled); same noise every call."""
        if self.eval_dataset is None:
            return {}
        batch_size = self.args.eval_batch_size or self.args.train_batch_size
        model = self.model
        was_training = model.training
        model.eval()
        ema_context = self.ema.average_parameters(self.unwrapped_model) if self.ema is not None else contextlib.nullcontext()
        totals: dict[str, torch.Tensor] = {}
        with ema_context:
            batches = iterate_eval_batches(
                self.eval_dataset, batch_size, num_processes=self.accelerator.num_processes,
                process_index=self.accelerator.process_index,
            )
            for index, (input_ids, weight) in enumerate(batches):
                if self.args.max_validation_batches is not None and index >= self.args.max_validation_batches:
                    break
                generator = self.step_generator(index, purpose="validation")
                batch = {"input_ids": input_ids.to(self.device)}
                sums = self.evaluation_step(batch, weight.to(self.device), generator)
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value.detach().double()
        model.train(was_training)
        if not totals:
            return {}
        keys = sorted(totals)
        reduced = self.accelerator.reduce(torch.stack([totals[k] for k in keys]).to(self.device), reduction="sum")
        return self.finalize_evaluation({key: float(value) for key, value in zip(keys, reduced.tolist())})

    def _validate(self, step: int) -> dict[str, float]:
        metrics = self.evaluate()
        if metrics:
            self.last_metrics = metrics
            self.log(metrics, step)
            self.accelerator.log(metrics, step=step)
            if self.is_main_process:
                summary = ", ".join(f"{key}={value:.4f}" for key, value in metrics.items())
                logger.info(f"step {step}: {summary}")
        return metrics

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def _raise_non_finite(self, what: str, value: float, step: int) -> None:
        latest = checkpointing.latest_checkpoint(self.args.output_dir)
        raise NonFiniteLossError(
            f"training stopped: the {what} is {value} at step {step}. No checkpoint was written for this step; the "
            f"last complete checkpoint is {latest or 'none'}. Try a lower learning_rate, bf16 instead of fp16, "
            "gradient clipping, or check the data."
        )

    def train(self) -> TrainOutput:
        """Runs (or resumes) training to ``max_train_steps``, validates, and exports the final pipeline."""
        args = self.args
        accelerator = self.accelerator
        if accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
        if self.device.type == "cpu":
            # Adam's second moments and small gradients go subnormal; x86 kernels slow down 5x on them.
            torch.set_flush_denormal(True)
        self.prepare()
        resume_path = checkpointing.resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
        if resume_path is not None:
            self.load_checkpoint(resume_path)
            logger.info(f"resumed from {resume_path} at step {self.global_step}")
        if accelerator.is_main_process:
            if resume_path is None and os.path.exists(self._log_path()):
                os.remove(self._log_path())  # a fresh run starts a fresh log
            self._truncate_log(self.global_step)
        if args.report_to != "none":
            config = {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(args.tracker_project_name, config=config)
        self.on_train_begin(resume_path)

        accumulation = args.gradient_accumulation_steps
        batches = iterate_train_batches(
            self.train_dataset, args.train_batch_size, seed=args.seed, start_batch=self.global_step * accumulation,
            num_processes=accelerator.num_processes, process_index=accelerator.process_index,
            shuffle_buffer_size=self.shuffle_buffer_size,
        )
        progress = tqdm(
            total=args.max_train_steps, initial=self.global_step, desc="Steps",
            disable=args.disable_progress_bar or not accelerator.is_local_main_process,
        )
        final_loss = None
        self.model.train()
        while self.global_step < args.max_train_steps:
            step = self.global_step + 1
            self.on_train_step_start(step)
            # Dropout and any other global-RNG use: re-seeded per step so that a resume replays it.
            torch.manual_seed(derive_seed(args.seed, "global-rng", step, accelerator.process_index))
            totals: dict[str, torch.Tensor] = {}
            for micro_step in range(accumulation):
                epoch, input_ids = next(batches)
                batch = {"input_ids": input_ids.to(self.device)}
                generator = self.step_generator(step, micro_step)
                sync = micro_step == accumulation - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(self.model):
                    loss, logs = self.compute_loss(batch, step, generator)
                    accelerator.backward(loss / accumulation)
                for key, value in {"loss": loss, **logs}.items():
                    value = torch.as_tensor(value, device=self.device).detach().float()
                    totals[key] = totals.get(key, 0.0) + value / accumulation
            keys = list(totals)
            reduced = accelerator.reduce(torch.stack([totals[k] for k in keys]), reduction="mean").tolist()
            step_logs = dict(zip(keys, reduced))
            if not math.isfinite(step_logs["loss"]):
                self.optimizer.zero_grad(set_to_none=True)
                self._raise_non_finite("loss", step_logs["loss"], step)
            if args.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                step_logs["grad_norm"] = grad_norm
                if not math.isfinite(grad_norm) and args.mixed_precision != "fp16":
                    self.optimizer.zero_grad(set_to_none=True)
                    self._raise_non_finite("gradient norm", grad_norm, step)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.unwrapped_model)
            self.global_step = step
            step_logs["lr"] = self.lr_scheduler.get_last_lr()[0]
            step_logs["epoch"] = epoch
            final_loss = step_logs["loss"]
            self.history.append({"step": step, **step_logs})
            self.log(step_logs, step)
            if step % args.logging_steps == 0:
                accelerator.log(step_logs, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_logs['loss']:.4f}", lr=f"{step_logs['lr']:.2e}")
            self.on_train_step_end(step, step_logs)
            if args.validation_steps and step % args.validation_steps == 0:
                self._validate(step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                self.save_checkpoint()
        progress.close()

        if not (args.validation_steps and self.global_step % args.validation_steps == 0 and self.last_metrics):
            self._validate(self.global_step)
        self.export(args.output_dir)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        if accelerator.is_main_process:
            summary = ", ".join(f"{k}={v:.4f}" for k, v in self.last_metrics.items())
            logger.info(f"done: {self.global_step} steps, {summary}; pipeline saved to {args.output_dir}")
        return TrainOutput(self.global_step, final_loss, dict(self.last_metrics), args.output_dir)

    # ------------------------------------------------------------------------------------------------------------
    # Export

    def final_model(self) -> torch.nn.Module | None:
        """A fresh float32 CPU copy of the trained model for export (the EMA weights when EMA is on).

        Every process must call it (FSDP gathers the full state dict); non-main processes get None.
        """
        state = self.accelerator.get_state_dict(self.model)
        if not self.is_main_process:
            return None
        source = self.unwrapped_model
        if hasattr(source, "config"):  # a fresh PreTrainedModel: no accelerate forward wrappers, no hooks
            model = type(source)(copy.deepcopy(source.config))
        else:
            model = copy.deepcopy(source)
        model.load_state_dict({key: value.detach().cpu() for key, value in state.items()})
        model = model.float().eval()
        if self.ema is not None:
            self.ema.copy_to(model)
        return model

    def export(self, output_dir: str) -> None:
        """Saves :meth:`build_pipeline` of :meth:`final_model` to ``output_dir`` (main process) and pushes it if
        ``push_to_hub``."""
        model = self.final_model()
        if not self.is_main_process:
            return
        pipeline = self.build_pipeline(model)
        card_info = self.model_card_info()
        pipeline.save_pretrained(output_dir, card_info=card_info)
        logger.info(f"saved the final pipeline to {output_dir}")
        if self.args.push_to_hub:
            repo_id = self.args.hub_model_id or os.path.basename(os.path.normpath(output_dir))
            url = pipeline.push_to_hub(repo_id, card_info=card_info)
            logger.info(f"pushed to {url}")


__all__ = ["Trainer", "TrainingArguments", "TrainOutput", "NonFiniteLossError", "create_accelerator"]
