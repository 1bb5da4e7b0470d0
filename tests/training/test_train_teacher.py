"""End to end: `train_teacher` on a local text file and on a known-likelihood source, and its input errors."""

import json
import math
import os

import pytest
import torch

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.pipeline_mcd import MCDPipeline
from mcd_hf.training.data import DataArguments, prepare_training_data
from mcd_hf.training.teacher import MDLMTrainer, main, train_teacher
from mcd_hf.training.trainer import TrainingArguments

TINY = ["--seq_len", "16", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--dropout", "0.0", "--disable_progress_bar"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # Lines are rotations of a 16-letter alphabet: any visible letter determines its neighbours, so a model that
    # uses context goes far below log K, while one that only learns letter frequencies gains nothing.
    letters = "abcdefghijklmnop"
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("".join(letters[i % 16 :] + letters[: i % 16] + "\n" for i in range(300)), encoding="utf-8")
    return str(path)


def _uniform_baseline(pipe, corpus, cache_dir):
    """Validation NELBO of a model with zero logits (uniform over the K real tokens) on the *same* validation
    blocks and noise as the trained model: a paired comparison, free of the 1/t-weighted sampling noise."""
    config = MaskedDiffusionLMConfig(**{**pipe.model.config.to_dict(), "num_hidden_layers": 1})
    model = MaskedDiffusionLM(config)  # adaLN-Zero: the output layer starts at zero, so the logits are all 0
    data = prepare_training_data(DataArguments(train_file=corpus, seq_len=16, validation_split_percentage=20,
                                               cache_dir=cache_dir), pipe.tokenizer)
    args = TrainingArguments(output_dir=cache_dir, train_batch_size=16, seed=0)
    return MDLMTrainer(model, args, data.train, data.validation).evaluate()["val_nelbo"]


def test_tiny_run_beats_uniform_and_exports_a_sampling_pipeline(corpus, tmp_path):
    output_dir = tmp_path / "teacher"
    result = train_teacher(["--train_file", corpus, "--output_dir", str(output_dir), "--max_train_steps", "150",
                            "--train_batch_size", "16", "--learning_rate", "3e-3", "--adam_beta2", "0.99",
                            "--lr_warmup_steps", "10", "--validation_steps", "75", "--validation_split_percentage", "20",
                            "--cache_dir", str(tmp_path / "cache"), *TINY])
    pipe = MCDPipeline.from_pretrained(output_dir)
    num_real_tokens = pipe.model.config.vocab_size - 1
    baseline = _uniform_baseline(pipe, corpus, str(tmp_path / "cache"))
    # The uniform model's expected NELBO is (1 - 1e-3) log K; its realized value on these blocks is `baseline`.
    assert abs(baseline - math.log(num_real_tokens)) < 0.5 * math.log(num_real_tokens)
    assert result.metrics["val_nelbo"] < baseline - 0.5, (result.metrics, baseline)

    # The folder is a complete pipeline: model, scheduler with the training schedule, tokenizer, card.
    assert pipe.scheduler.config.noise_schedule == "loglinear"
    assert pipe.scheduler.config.mask_token_id == pipe.tokenizer.mask_token_id == num_real_tokens
    assert pipe.card_info["training_steps"] == 150
    assert pipe.card_info["training_data"] == corpus
    assert pipe.card_info["val_nelbo"] == pytest.approx(result.metrics["val_nelbo"], abs=1e-5)
    out = pipe(batch_size=2, seq_len=16, num_inference_steps=16, generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (2, 16) and not bool((out.sequences == pipe.mask_token_id).any())
    assert all(len(text) > 0 for text in out.texts)
    with open(os.path.join(output_dir, "train_log.jsonl")) as handle:
        steps = [json.loads(line)["step"] for line in handle]
    assert steps.count(150) == 2  # the step's training log and its validation


def test_known_likelihood_source_run(tmp_path):
    result = train_teacher(["--source", "markov", "--source_num_sequences", "64", "--output_dir", str(tmp_path),
                            "--max_train_steps", "3", "--train_batch_size", "8", "--time_conditioning", *TINY])
    pipe = MCDPipeline.from_pretrained(tmp_path)
    assert pipe.model.config.vocab_size == 33 and pipe.model.config.time_conditioning
    assert pipe.tokenizer.decode([0, 1, 2]) == "abc"
    assert "known-likelihood source 'markov'" in pipe.card_info["training_data"]
    assert math.isfinite(result.metrics["val_nelbo"])


def test_command_line_errors_come_before_training(corpus, tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="train_file: file .*does not exist"):
        main(["--train_file", str(tmp_path / "missing.txt"), "--output_dir", str(output_dir), *TINY])
    with pytest.raises(ValueError, match="exactly one data source"):
        main(["--train_file", corpus, "--source", "markov", "--output_dir", str(output_dir), *TINY])
    config = tmp_path / "config.json"
    MaskedDiffusionLMConfig(vocab_size=5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=8).to_json_file(str(config))
    with pytest.raises(ValueError, match="seq_len=16 is larger than .*max_position_embeddings=8"):
        main(["--train_file", corpus, "--config_name", str(config), "--output_dir", str(output_dir), *TINY])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        main(["--train_file", str(empty), "--output_dir", str(output_dir), *TINY])
    with pytest.raises(ValueError, match="max_train_steps"):
        main(["--train_file", corpus, "--output_dir", str(output_dir), "--max_train_steps", "0", *TINY])
    assert not output_dir.exists() or not any(output_dir.iterdir())  # nothing was trained or written
