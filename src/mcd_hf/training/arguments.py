"""Optimisation and bookkeeping options of the Accelerate trainers (teacher pretraining and distillation).

Names follow transformers' ``TrainingArguments`` and diffusers' training examples so that flags read the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
REPORT_TO_CHOICES = ("none", "tensorboard", "wandb", "all")


@dataclass
class TrainingArguments:
    """Optimisation and bookkeeping options (names as transformers' ``TrainingArguments`` / diffusers' examples).

    Args:
        output_dir: Checkpoints, logs and the final pipeline go here.
        seed: Seeds the model init, the data order and every noise draw.
        learning_rate: Peak AdamW learning rate.
        lr_scheduler_type: A transformers schedule name (``constant_with_warmup``, ``linear``, ``cosine``, ...).
        lr_warmup_steps: Linear warm-up steps.
        weight_decay: AdamW decoupled weight decay, applied to matrices only (not to norms and biases).
        adam_beta1, adam_beta2, adam_epsilon: AdamW constants.
        train_batch_size: Sequences per process per micro-batch.
        eval_batch_size: Sequences per process per validation batch (default: ``train_batch_size``).
        gradient_accumulation_steps: Micro-batches per optimizer step.
        max_train_steps: Optimizer steps in total.
        max_grad_norm: Gradient clipping norm (None or 0: no clipping).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (fp16 needs a GPU).
        ema_decay: Decay of the weight EMA; 0 disables it. With EMA, validation and the export use the EMA weights.
        checkpointing_steps: Save a checkpoint every N steps (None: never).
        checkpoints_total_limit: Keep at most this many checkpoints.
        resume_from_checkpoint: ``latest`` or a checkpoint folder.
        validation_steps: Validate every N steps (None: only at the end).
        max_validation_batches: Cap on validation batches per process (None: the whole validation set).
        logging_steps: Send training logs to the trackers every N steps (the JSONL log gets every step).
        report_to: ``none``, ``tensorboard``, ``wandb`` or ``all``.
        tracker_project_name: Run name for the trackers.
        push_to_hub: Upload the final pipeline to ``hub_model_id``.
        hub_model_id: Hub repository id (default: the output folder's name).
        cpu: Force CPU even when a GPU is present.
        disable_progress_bar: Hide the tqdm bar.
    """

    output_dir: str = "mcd-output"
    seed: int = 0
    learning_rate: float = 3e-4
    lr_scheduler_type: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    train_batch_size: int = 16
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    ema_decay: float = 0.0
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int | None = None
    max_validation_batches: int | None = None
    logging_steps: int = 10
    report_to: str = "none"
    tracker_project_name: str = "mcd_hf"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    cpu: bool = False
    disable_progress_bar: bool = False

    def __post_init__(self):
        positive = ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "logging_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_batch_size", "checkpointing_steps", "checkpoints_total_limit", "validation_steps",
                     "max_validation_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be an int >= 0, got {self.lr_warmup_steps!r}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        if self.report_to not in REPORT_TO_CHOICES:
            raise ValueError(f"report_to must be one of {REPORT_TO_CHOICES}, got {self.report_to!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables EMA), got {self.ema_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm}")
        if not self.output_dir:
            raise ValueError("output_dir must be a folder path")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["TrainingArguments", "MIXED_PRECISION_CHOICES", "REPORT_TO_CHOICES"]
