"""The shared Trainer: exact resume, atomic checkpoints, NaN stop, rotation, EMA export, argument checks."""

import json
import os

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.tokenization import build_character_tokenizer
from mcd_hf.training import checkpointing
from mcd_hf.training.teacher import MDLMTrainer
from mcd_hf.training.trainer import NonFiniteLossError, TrainingArguments, create_accelerator

K, L = 12, 16


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def datasets_():
    # Sequences counting up mod K from a random start: learnable in a few steps.
    starts = torch.randint(0, K, (72, 1), generator=torch.Generator().manual_seed(0))
    rows = ((starts + torch.arange(L)) % K).tolist()
    return Dataset.from_dict({"input_ids": rows[:64]}), Dataset.from_dict({"input_ids": rows[64:]})


def _model():
    torch.manual_seed(0)
    config = MaskedDiffusionLMConfig(vocab_size=K + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     max_position_embeddings=L, dropout=0.1)
    return MaskedDiffusionLM(config)


def _args(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), max_train_steps=8, train_batch_size=4, gradient_accumulation_steps=2,
                  learning_rate=3e-3, lr_scheduler_type="linear", lr_warmup_steps=2, ema_decay=0.9,
                  checkpointing_steps=4, validation_steps=4, disable_progress_bar=True)
    values.update(overrides)
    return TrainingArguments(**values)


def _run(datasets_, output_dir, trainer_class=MDLMTrainer, **overrides):
    train, validation = datasets_
    tokenizer = build_character_tokenizer("abcdefghijkl")
    trainer = trainer_class(_model(), _args(output_dir, **overrides), train, validation, tokenizer=tokenizer)
    return trainer, trainer.train()


def _log(output_dir):
    with open(os.path.join(output_dir, "train_log.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference_run(datasets_, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("reference")
    trainer, result = _run(datasets_, output_dir)
    return output_dir, trainer, result


def test_resume_after_interruption_is_exact(datasets_, reference_run, tmp_path):
    reference_dir, _, reference = reference_run

    class StopAtStep5(MDLMTrainer):
        def on_train_step_start(self, step):
            if step == 5:
                raise Interrupt

    with pytest.raises(Interrupt):
        _run(datasets_, tmp_path, StopAtStep5)
    assert checkpointing.latest_checkpoint(tmp_path).endswith("checkpoint-4")
    _, resumed = _run(datasets_, tmp_path, resume_from_checkpoint="latest")

    assert resumed.global_step == 8
    assert _log(tmp_path) == _log(reference_dir)  # every step's loss, lr, grad norm and the validations
    _assert_same_weights(_weights(os.path.join(tmp_path, "model")), _weights(os.path.join(reference_dir, "model")))
    _assert_same_weights(_weights(os.path.join(tmp_path, "checkpoint-8")),
                         _weights(os.path.join(reference_dir, "checkpoint-8")))
    assert resumed.metrics == reference.metrics


def test_crash_while_saving_leaves_no_checkpoint_that_resume_picks(datasets_, reference_run, tmp_path, monkeypatch):
    reference_dir, _, _ = reference_run
    original = MDLMTrainer._write_trainer_state

    def crash_at_step_8(self, folder):
        if self.global_step == 8:
            raise Interrupt  # e.g. the machine dies after the weights were written, before the marker
        original(self, folder)

    monkeypatch.setattr(MDLMTrainer, "_write_trainer_state", crash_at_step_8)
    with pytest.raises(Interrupt):
        _run(datasets_, tmp_path)
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(tmp_path, ".tmp-checkpoint-8", "model.safetensors"))  # partial write
    assert not os.path.exists(os.path.join(tmp_path, "checkpoint-8"))
    os.makedirs(os.path.join(tmp_path, "checkpoint-99"))  # a folder without marker is never picked either
    assert checkpointing.latest_checkpoint(tmp_path) == os.path.join(tmp_path, "checkpoint-4")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpointing.resolve_resume_path(str(tmp_path), os.path.join(tmp_path, "checkpoint-99"))

    _run(datasets_, tmp_path, resume_from_checkpoint="latest")
    assert not os.path.exists(os.path.join(tmp_path, ".tmp-checkpoint-8"))
    assert _log(tmp_path) == _log(reference_dir)
    _assert_same_weights(_weights(os.path.join(tmp_path, "model")), _weights(os.path.join(reference_dir, "model")))


def test_publish_refuses_a_checkpoint_without_marker(tmp_path):
    temporary = tmp_path / ".tmp-checkpoint-3"
    temporary.mkdir()
    (temporary / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(RuntimeError, match="trainer_state.json"):
        checkpointing.publish_checkpoint(str(temporary), str(tmp_path / "checkpoint-3"))
    assert checkpointing.list_checkpoints(str(tmp_path)) == []


def test_nan_loss_stops_before_any_checkpoint_of_that_step(datasets_, tmp_path):
    class NanAtStep3(MDLMTrainer):
        def compute_loss(self, batch, step, generator):
            loss, logs = super().compute_loss(batch, step, generator)
            return (loss * float("nan") if step == 3 else loss), logs

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 3.*last complete checkpoint is .*checkpoint-2"):
        _run(datasets_, tmp_path, NanAtStep3, checkpointing_steps=1)
    assert [step for step, _ in checkpointing.list_checkpoints(str(tmp_path))] == [1, 2]
    assert max(entry["step"] for entry in _log(tmp_path)) == 2
    assert not os.path.exists(os.path.join(tmp_path, "model_index.json"))  # nothing exported


def test_rotation_keeps_the_newest_checkpoints(datasets_, tmp_path):
    _run(datasets_, tmp_path, checkpointing_steps=2, checkpoints_total_limit=2, validation_steps=None)
    assert [step for step, _ in checkpointing.list_checkpoints(str(tmp_path))] == [6, 8]


def test_export_uses_ema_weights_and_checkpoint_holds_raw_and_ema(reference_run):
    output_dir, trainer, _ = reference_run
    exported = _weights(os.path.join(output_dir, "model"))
    raw = _weights(os.path.join(output_dir, "checkpoint-8"))
    for name, average in zip(trainer.ema.names, trainer.ema.shadow):
        torch.testing.assert_close(exported[name], average, rtol=0, atol=0)
    assert any(not torch.equal(exported[name], raw[name]) for name in trainer.ema.names)
    extra = torch.load(os.path.join(output_dir, "checkpoint-8", "trainer_extra_state.pt"), weights_only=True)
    assert extra["ema"]["num_updates"] == 8


def test_validation_reports_nelbo_and_bound(reference_run):
    output_dir, _, result = reference_run
    metrics = result.metrics
    assert set(metrics) == {"val_nelbo", "val_ppl_bound"}
    assert metrics["val_ppl_bound"] == pytest.approx(torch.tensor(metrics["val_nelbo"]).exp().item())
    with open(os.path.join(output_dir, "README.md")) as handle:
        assert "val_nelbo" in handle.read()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"report_to": "comet"}, "report_to"),
        ({"checkpointing_steps": 0}, "checkpointing_steps"),
        ({"learning_rate": 0.0}, "learning_rate"),
    ],
)
def test_bad_training_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **overrides)


def test_bad_resume_path_and_fp16_on_cpu(datasets_, tmp_path):
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        _run(datasets_, tmp_path, resume_from_checkpoint=str(tmp_path / "nowhere"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16"):
            create_accelerator(_args(tmp_path, mixed_precision="fp16"))
