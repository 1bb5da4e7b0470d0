"""End-to-end tests of the distillation trainer (`mcd_hf.training.distillation`) and `examples/distill.py`.

A tiny random teacher (hidden 32, 2 layers) on the default Markov source (K = 32) is saved as an MCDPipeline folder;
the runs are a few optimizer steps, so they check plumbing (rounds, teacher refresh, resume, export), not quality.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.evaluation.sources import get_source
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.pipeline_mcd import MCDPipeline
from mcd_hf.scheduling_mcd import MaskedDualityScheduler
from mcd_hf.tokenization import build_character_tokenizer
from mcd_hf.training import checkpointing
from mcd_hf.training.distillation import DistillationArguments, DistillationTrainer, load_teacher, main
from mcd_hf.training.trainer import TrainingArguments

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LEN = 32
TEACHER_STEPS = 16


def make_teacher(folder: str, time_conditioning: bool = True) -> str:
    source = get_source("markov")
    tokenizer = build_character_tokenizer(source.alphabet)
    config = MaskedDiffusionLMConfig(
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, cond_dim=16, max_position_embeddings=SEQ_LEN, dropout=0.0,
        time_conditioning=time_conditioning,
    )
    model = MaskedDiffusionLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random O(1) weights: a fresh adaLN-Zero model would output zero logits
        for parameter in model.parameters():
            fan_in = parameter.shape[-1] if parameter.dim() > 1 else 1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
    scheduler = MaskedDualityScheduler(mask_token_id=config.mask_token_id, vocab_size=config.vocab_size,
                                       sampler="shadow")
    MCDPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    return make_teacher(str(tmp_path_factory.mktemp("teacher") / "pipeline"))


def distill_argv(teacher: str, output_dir: str, *extra: str) -> list[str]:
    return [
        "--teacher", teacher, "--source", "markov", "--source_num_sequences", "64", "--seq_len", str(SEQ_LEN),
        "--num_rounds", "2", "--steps_per_round", "3", "--teacher_steps", str(TEACHER_STEPS),
        "--train_batch_size", "4", "--validation_num_samples", "8", "--learning_rate", "1e-3",
        "--output_dir", output_dir, "--disable_progress_bar", *extra,
    ]


def read_log(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "train_log.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def check_student(output_dir: str, expected_card: dict) -> None:
    pipe = MCDPipeline.from_pretrained(output_dir)
    recommended = TEACHER_STEPS // 2**2
    assert pipe.scheduler.config.num_inference_steps == recommended
    out = pipe(batch_size=3, seq_len=SEQ_LEN, generator=torch.Generator().manual_seed(0), output_type="ids")
    assert out.sequences.shape == (3, SEQ_LEN)
    assert not bool((out.sequences == pipe.mask_token_id).any())
    assert 1 <= out.num_model_calls <= recommended
    card = pipe.card_info
    for key, value in expected_card.items():
        assert card[key] == value, key
    for key in ("teacher", "divergence", "training_data", "val_unigram_entropy", "val_excess_nll"):
        assert key in card, key


def test_python_run_exports_a_pipeline_with_the_recommended_steps(teacher_folder, tmp_path):
    output_dir = str(tmp_path / "student")
    assert main(distill_argv(teacher_folder, output_dir, "--coupling", "teacher", "--teacher_update", "ema",
                             "--ema_decay", "0.5")) == 0
    check_student(output_dir, {"method": "mcd", "coupling": "teacher", "num_rounds": 2, "teacher_update": "ema",
                               "recommended_num_inference_steps": 4, "training_steps": 6})
    log = read_log(output_dir)
    train = [row for row in log if "loss" in row]
    assert [row["round"] for row in train] == [0, 0, 0, 1, 1, 1]
    assert [row["dt"] for row in train] == [1 / 16] * 3 + [2 / 16] * 3
    # Validation after each round samples with T / 2^(r+1) steps.
    assert [row["val_sampling_steps"] for row in log if "val_sampling_steps" in row] == [8, 4]


def _tiny_trainer(teacher_folder, output_dir, **distill_kwargs):
    pipe = MCDPipeline.from_pretrained(teacher_folder)
    source = get_source("markov")
    distill_args = DistillationArguments(num_rounds=2, steps_per_round=2, teacher_steps=TEACHER_STEPS,
                                         validation_num_samples=0, **distill_kwargs)
    args = TrainingArguments(output_dir=output_dir, max_train_steps=4, train_batch_size=4, learning_rate=1e-2,
                             disable_progress_bar=True)
    return DistillationTrainer(pipe.model.float().train(), args, distill_args, source.to_dataset(32, SEQ_LEN),
                               scheduler=pipe.scheduler, tokenizer=pipe.tokenizer, source=source)


def test_round_teacher_is_a_frozen_copy_of_the_student_at_the_round_start(teacher_folder, tmp_path):
    trainer = _tiny_trainer(teacher_folder, str(tmp_path / "run"))
    initial = {key: value.clone() for key, value in trainer.model.state_dict().items()}
    seen = {}
    original_step_end = trainer.on_train_step_end

    def record(step, logs):
        original_step_end(step, logs)
        seen[step] = {
            "student": {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()},
        }

    trainer.on_train_step_end = record
    trainer.train()
    # Round 0 (steps 1-2): the original model. Round 1 (steps 3-4): the student as it was after step 2.
    for step in (1, 2):
        assert all(torch.equal(seen[step]["teacher"][k], initial[k]) for k in initial)
    for step in (3, 4):
        assert all(torch.equal(seen[step]["teacher"][k], seen[2]["student"][k]) for k in initial)
    assert not any(torch.equal(seen[2]["student"][k], initial[k]) for k in initial if k.endswith("weight"))
    assert not trainer.teacher.training
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


@pytest.mark.parametrize("method,teacher_update", [("mcd", "raw"), ("sdtt", "ema")])
def test_resume_mid_round_continues_exactly(teacher_folder, tmp_path, method, teacher_update):
    extra = ["--method", method, "--teacher_update", teacher_update, "--ema_decay", "0.5", "--validation_num_samples",
             "0"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    main(distill_argv(teacher_folder, full, *extra))
    # Stop after step 4 (one step into round 1, whose teacher was taken at step 4's start), then resume to the end.
    main(distill_argv(teacher_folder, resumed, *extra, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    assert os.path.isdir(os.path.join(resumed, "checkpoint-4"))
    main(distill_argv(teacher_folder, resumed, *extra, "--resume_from_checkpoint", "latest"))

    losses = {path: [row["loss"] for row in read_log(path) if "loss" in row] for path in (full, resumed)}
    assert len(losses[full]) == 6
    assert losses[resumed] == losses[full]
    weights = [load_file(os.path.join(path, "model", "model.safetensors")) for path in (full, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


@pytest.mark.parametrize("method", ["mcd", "sdtt"])
def test_accelerate_launch_two_processes(teacher_folder, tmp_path, method):
    output_dir = str(tmp_path / f"student-{method}")
    # `--multi_gpu`: accelerate 1.x starts a single process for `--num_processes 2 --cpu`; on a CPU-only machine
    # the trainer's Accelerator(cpu=True) makes the two processes a gloo group.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.join(REPO, "examples", "distill.py"),
               *distill_argv(teacher_folder, output_dir, "--method", method, "--steps_per_round", "2",
                             "--checkpointing_steps", "4")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    check_student(output_dir, {"method": method, "training_steps": 4})
    with open(os.path.join(output_dir, "checkpoint-4", checkpointing.COMPLETE_MARKER)) as handle:
        assert json.load(handle)["num_processes"] == 2


def test_load_teacher_from_a_pipeline_a_model_folder_or_an_mdlm_checkpoint(teacher_folder, tmp_path):
    pipe = MCDPipeline.from_pretrained(teacher_folder)
    model_folder = str(tmp_path / "model")
    pipe.model.save_pretrained(model_folder)
    pipe.tokenizer.save_pretrained(model_folder)
    # An MDLM raw state dict: keys under `backbone.`, the embedding as a bare `vocab_embed.embedding`.
    mdlm_file = str(tmp_path / "mdlm.pt")
    torch.save({("backbone." + key).replace("vocab_embed.weight", "vocab_embed.embedding"): value
                for key, value in pipe.model.state_dict().items()}, mdlm_file)
    x = torch.randint(0, pipe.mask_token_id, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    x[:, ::3] = pipe.mask_token_id
    expected = pipe.model(input_ids=x, timesteps=torch.ones(2)).logits
    loaded = {
        "pipeline": load_teacher(teacher_folder),
        "model": load_teacher(model_folder, noise_schedule="linear"),
        "mdlm": load_teacher(mdlm_file, mdlm_overrides={"num_attention_heads": 2, "time_conditioning": True}),
    }
    for name, (model, scheduler, tokenizer, _) in loaded.items():
        assert torch.allclose(model(input_ids=x, timesteps=torch.ones(2)).logits, expected, atol=1e-6), name
        assert scheduler.config.mask_token_id == pipe.mask_token_id
    assert loaded["pipeline"][1].config.sampler == "shadow"  # the pipeline's own scheduler
    assert loaded["model"][1].config.noise_schedule == "linear"
    assert loaded["model"][2] is not None and loaded["mdlm"][2] is None


def test_bad_arguments(teacher_folder, tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        DistillationArguments(num_rounds=3, teacher_steps=12)
    with pytest.raises(ValueError, match="coupling"):
        DistillationArguments(method="sdtt", coupling="teacher")
    with pytest.raises(ValueError, match="divergence"):
        DistillationArguments(divergence="kl")
    output_dir = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="ema_decay"):
        main(distill_argv(teacher_folder, output_dir, "--teacher_update", "ema"))
    with pytest.raises(ValueError, match="max_train_steps"):
        main(distill_argv(teacher_folder, output_dir, "--max_train_steps", "7"))
    with pytest.raises(ValueError, match="--teacher"):
        main(distill_argv(str(tmp_path / "missing" / "folder"), output_dir))
