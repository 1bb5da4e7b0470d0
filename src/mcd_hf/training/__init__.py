"""Training with Accelerate: data packing, the MDLM NELBO, the shared Trainer, teacher pretraining.

Distillation (MCD, SDTT) builds on the same :class:`Trainer` (see ``training/distillation.py``).
"""

from .arguments import TrainingArguments
from .checkpointing import latest_checkpoint, list_checkpoints
from .data import DataArguments, TrainingData, pack_blocks, prepare_training_data
from .ema import ExponentialMovingAverage
from .losses import mdlm_loss, sample_times
from .seeding import derive_seed
from .teacher import MDLMTrainer, train_teacher
from .trainer import NonFiniteLossError, Trainer, TrainOutput, create_accelerator

__all__ = [
    "DataArguments",
    "ExponentialMovingAverage",
    "MDLMTrainer",
    "NonFiniteLossError",
    "Trainer",
    "TrainingArguments",
    "TrainingData",
    "TrainOutput",
    "create_accelerator",
    "derive_seed",
    "latest_checkpoint",
    "list_checkpoints",
    "mdlm_loss",
    "pack_blocks",
    "prepare_training_data",
    "sample_times",
    "train_teacher",
]
