"""Teacher-training throughput (tokens per second) of the MDLM trainer on this machine.

Measures full optimizer steps of :class:`mcd_hf.training.MDLMTrainer` (forward, NELBO, backward, clipping, AdamW,
bookkeeping) on random tokens, after a warm-up, and prints tokens/s. Nothing is asserted: the number depends on the
machine (and on other load). Default config (stated in the output): K = 32 real tokens, L = 128, hidden 128,
4 layers, 4 heads, batch 16, float32, one process.

    python benchmarks/training_throughput.py
    python benchmarks/training_throughput.py --hidden_size 768 --num_hidden_layers 12 --num_attention_heads 12 \
        --seq_len 1024 --vocab_size 50258 --batch_size 8 --mixed_precision bf16     # a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from datasets import Dataset

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.training.teacher import MDLMTrainer
from mcd_hf.training.trainer import TrainingArguments


class _TimedTrainer(MDLMTrainer):
    """Records the wall time at each step end; skips the export (not part of throughput)."""

    def on_train_step_end(self, step, logs):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step_times.append(time.perf_counter())

    def export(self, output_dir):
        pass


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=33, help="ids including [MASK]")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--time_conditioning", action="store_true")
    args = parser.parse_args(argv)

    config = MaskedDiffusionLMConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, max_position_embeddings=args.seq_len,
        time_conditioning=args.time_conditioning,
    )
    torch.manual_seed(0)
    model = MaskedDiffusionLM(config)
    num_rows = args.batch_size * (args.steps + args.warmup_steps)
    rows = torch.randint(0, args.vocab_size - 1, (num_rows, args.seq_len)).tolist()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, max_train_steps=args.steps + args.warmup_steps, train_batch_size=args.batch_size,
            mixed_precision=args.mixed_precision, disable_progress_bar=True, logging_steps=10**9,
        )
        trainer = _TimedTrainer(model, training_args, Dataset.from_dict({"input_ids": rows}))
        trainer.step_times = []
        trainer.train()
    times = trainer.step_times[args.warmup_steps - 1 :]
    seconds = times[-1] - times[0]
    steps = len(times) - 1
    tokens = steps * args.batch_size * args.seq_len * trainer.accelerator.num_processes
    result = {
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "config": {k: getattr(args, k) for k in ("vocab_size", "seq_len", "hidden_size", "num_hidden_layers",
                                                 "num_attention_heads", "batch_size", "mixed_precision")},
        "steps_timed": steps,
        "seconds_per_step": round(seconds / steps, 4),
        "tokens_per_second": round(tokens / seconds, 1),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
