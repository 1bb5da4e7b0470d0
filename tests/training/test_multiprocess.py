"""Two CPU processes (gloo DDP) through `accelerate launch`: both ranks end with identical weights."""

import os
import subprocess
import sys

import pytest
import torch

from mcd_hf.pipeline_mcd import MCDPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "examples", "accelerate_configs", "cpu_ddp_2proc.yaml")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")


def test_two_process_cpu_run_keeps_replicas_identical(tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG, "--main_process_port", "29517",
        WORKER, "--source", "markov", "--source_num_sequences", "64", "--seq_len", "16", "--hidden_size", "32",
        "--num_hidden_layers", "2", "--num_attention_heads", "2", "--max_train_steps", "4", "--train_batch_size", "4",
        "--checkpointing_steps", "2", "--validation_steps", "2", "--ema_decay", "0.9", "--cpu",
        "--disable_progress_bar", "--output_dir", str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert process.returncode == 0, process.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0]["num_processes"] == ranks[1]["num_processes"] == 2
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
    assert (tmp_path / "checkpoint-4" / "random_states_1.pkl").is_file()  # both ranks wrote their state
    pipe = MCDPipeline.from_pretrained(tmp_path)
    out = pipe(batch_size=1, seq_len=16, num_inference_steps=4, output_type="ids", generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (1, 16)
