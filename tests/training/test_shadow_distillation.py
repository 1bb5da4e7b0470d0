"""Tests of shadow-conditioned distillation (`mcd_hf.training.shadow_distillation`, `--method shadow`, issue 10).

The targets are checked by hand on a toy target model whose logits are a simple function of the visible tokens; the
end-to-end run is a few optimizer steps of a tiny random teacher (plumbing, not quality).
"""

import math
import os
from types import SimpleNamespace

import pytest
import torch

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.duality import get_noise_schedule, shadow_reveal_index
from mcd_hf.evaluation.sources import get_source
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.pipeline_mcd import MCDPipeline
from mcd_hf.scheduling_mcd import MaskedDualityScheduler
from mcd_hf.tokenization import build_character_tokenizer
from mcd_hf.training.distillation import main
from mcd_hf.training.shadow_distillation import (
    ShadowArguments,
    make_noise_conditioned_student,
    shadow_distillation_loss,
    shadow_targets,
)

MASK = 3  # K = 3 real tokens, the mask last
GRID = 8
SCHEDULE = get_noise_schedule("loglinear")
# alpha(1 - m/8) = 1 - 0.999 (1 - m/8): these shadows are revealed at fine indices 1, 2, 5 and 0 (visible at t = 1).
SHADOW = torch.tensor([[0.1, 0.2, 0.6, 0.0005]], dtype=torch.float64)
VALUE_NOISE = torch.tensor([[0.7, 0.01, 0.2, 0.9]], dtype=torch.float64)
CLEAN = torch.tensor([[0, 0, 1, 2]])


class ToyModel(torch.nn.Module):
    """Logits of every position: 2 * (count of each visible token) + a position ramp; ignores time (and shadow)."""

    def __init__(self, noise_conditioning: bool = False):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=MASK, noise_conditioning=noise_conditioning)
        self.seen_features = []

    def forward(self, input_ids, timesteps=None, shadow_features=None):
        if shadow_features is not None:
            self.seen_features.append(shadow_features.clone())
        counts = torch.nn.functional.one_hot(input_ids, MASK + 1).sum(1, keepdim=True).float()  # (B, 1, V)
        ramp = 0.5 * torch.arange(input_ids.shape[1]).float()[None, :, None] * torch.arange(MASK + 1).float()
        return SimpleNamespace(logits=2.0 * counts + ramp)


def toy_probs(state: list[int]) -> torch.Tensor:
    """The toy model's real-token distribution at every position of `state`, by hand: (L, K)."""
    rows = []
    for position in range(len(state)):
        logits = [2.0 * sum(1 for token in state if token == k) + 0.5 * position * k for k in range(MASK)]
        total = sum(math.exp(v) for v in logits)
        rows.append([math.exp(v) / total for v in logits])
    return torch.tensor(rows, dtype=torch.float64)


def inverse_cdf(probs: torch.Tensor, uniform: float) -> int:
    return int((torch.cumsum(probs, 0) <= uniform).sum())  # first token whose cumulative mass exceeds `uniform`


def test_targets_are_the_target_models_two_deterministic_steps():
    # Starting at t = 1 (fine index 0), steps of one fine step: position 0 is revealed by the first target step,
    # position 1 by the second, position 2 stays masked, position 3 is visible from the start.
    assert shadow_reveal_index(SHADOW, SCHEDULE, GRID).tolist() == [[1, 2, 5, 0]]
    noisy = torch.tensor([[MASK, MASK, MASK, 2]])
    targets = shadow_targets(ToyModel(), noisy, torch.tensor([0]), 1, SHADOW, VALUE_NOISE, SCHEDULE, GRID, MASK)

    # By hand: step 1 from z_t, position 0 drawn by inverse CDF at r_0; step 2 from the new state.
    first = toy_probs([MASK, MASK, MASK, 2])
    token_0 = inverse_cdf(first[0], 0.7)
    second = toy_probs([token_0, MASK, MASK, 2])
    token_1 = inverse_cdf(second[1], 0.01)
    assert (token_0, token_1) == (2, 1)  # the target's own draws, not the data's tokens (0, 0)
    assert targets.sample.tolist() == [[token_0, token_1, MASK, 2]]
    assert targets.masked.tolist() == [[True, True, True, False]]
    assert targets.first_step.tolist() == [[True, False, False, False]]
    assert targets.second_step.tolist() == [[False, True, False, False]]
    assert targets.still_masked.tolist() == [[False, False, True, False]]
    # Each position's target: the distribution at the state where it was revealed (the last one if still masked).
    expected = torch.stack([first[0], second[1], second[2]]).log()
    assert torch.allclose(targets.log_probs.double(), expected, atol=1e-6)


def test_loss_by_hand_and_the_data_only_sets_the_mask():
    student, target = ToyModel(), ToyModel()
    first = toy_probs([MASK, MASK, MASK, 2])
    second = toy_probs([2, MASK, MASK, 2])

    def kl(p, q):
        return float((p * (p / q).log()).sum())

    for weight in (1.0, 0.0):
        loss, logs = shadow_distillation_loss(
            student, target, CLEAN, SCHEDULE, 1, GRID, grid_index=torch.tensor([0]), shadow=SHADOW,
            value_noise=VALUE_NOISE, still_masked_weight=weight,
        )
        # The student sees z_t (its distribution is `first`); position 0's target is `first` itself (zero KL).
        expected = (kl(second[1], first[1]) + weight * kl(second[2], first[2])) / 3
        assert loss.item() == pytest.approx(expected, rel=1e-5)
        assert logs["num_masked"] == 3 and logs["num_revealed"] == 2 and logs["num_still_masked"] == 1
    # Other clean tokens at masked positions change nothing: the targets come from the target model, not the data.
    other, _ = shadow_distillation_loss(student, target, torch.tensor([[1, 2, 0, 2]]), SCHEDULE, 1, GRID,
                                        grid_index=torch.tensor([0]), shadow=SHADOW, value_noise=VALUE_NOISE)
    reference, _ = shadow_distillation_loss(student, target, CLEAN, SCHEDULE, 1, GRID, grid_index=torch.tensor([0]),
                                            shadow=SHADOW, value_noise=VALUE_NOISE)
    assert other.item() == reference.item()


def test_a_noise_conditioned_target_reads_the_features_of_its_own_steps():
    target = ToyModel(noise_conditioning=True)
    shadow = SHADOW.expand(2, 4).clone()
    value_noise = VALUE_NOISE.expand(2, 4).clone()
    grid_index = torch.tensor([0, 2])  # t = 1 and t = 0.75, steps of two fine steps
    noisy = torch.tensor([[MASK, MASK, MASK, 2], [0, 0, MASK, 2]])
    shadow_targets(target, noisy, grid_index, 2, shadow, value_noise, SCHEDULE, GRID, MASK)
    reveal_index = torch.tensor([1, 2, 5, 0])
    for step, features in enumerate(target.seen_features):
        current = (grid_index + 2 * step).unsqueeze(-1)
        assert torch.allclose(features[..., 0], ((reveal_index - current).clamp(min=0) / GRID).float())
        assert torch.equal(features[..., 1], value_noise.float())
    assert len(target.seen_features) == 2


def test_context_free_target_is_a_fixed_point():
    # A target whose distribution does not depend on the state gives both steps the same distribution: the student
    # equal to it has zero loss and draws exactly the target's tokens.
    class ContextFree(ToyModel):
        def forward(self, input_ids, timesteps=None, shadow_features=None):
            ramp = torch.arange(input_ids.shape[1]).float()[None, :, None] * torch.arange(MASK + 1).float()
            return SimpleNamespace(logits=(0.3 * ramp).expand(input_ids.shape[0], -1, -1))

    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, MASK, (16, 10), generator=generator)
    loss, logs = shadow_distillation_loss(ContextFree(), ContextFree(), clean, SCHEDULE, 2, GRID, generator=generator)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert logs["token_agreement"].item() == 1.0 and logs["num_revealed"] > 0


def test_loss_argument_checks():
    model = ToyModel()
    with pytest.raises(ValueError, match="half_step"):
        shadow_distillation_loss(model, model, CLEAN, SCHEDULE, 3, GRID)
    with pytest.raises(ValueError, match="grid_index"):
        shadow_distillation_loss(model, model, CLEAN, SCHEDULE, 1, GRID, grid_index=torch.tensor([1]))
    with pytest.raises(ValueError, match="divergence"):
        shadow_distillation_loss(model, model, CLEAN, SCHEDULE, 1, GRID, divergence="l2")
    with pytest.raises(ValueError, match="lr_multiplier"):
        ShadowArguments(lr_multiplier=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# The student and the trainer

SEQ_LEN = 16
TEACHER_STEPS = 16


def make_teacher(folder: str) -> str:
    source = get_source("markov")
    tokenizer = build_character_tokenizer(source.alphabet)
    config = MaskedDiffusionLMConfig(
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, cond_dim=16, max_position_embeddings=SEQ_LEN, dropout=0.0, time_conditioning=False,
    )
    model = MaskedDiffusionLM(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            fan_in = parameter.shape[-1] if parameter.dim() > 1 else 1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
    scheduler = MaskedDualityScheduler(mask_token_id=config.mask_token_id, vocab_size=config.vocab_size)
    MCDPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra_layers", [0, 2])
def test_student_starts_as_the_teacher(tmp_path, extra_layers):
    teacher = MCDPipeline.from_pretrained(make_teacher(str(tmp_path / "teacher"))).model
    student = make_noise_conditioned_student(teacher, TEACHER_STEPS, extra_layers=extra_layers)
    assert student.config.noise_conditioning and student.config.shadow_grid_size == TEACHER_STEPS
    assert student.config.num_hidden_layers == teacher.config.num_hidden_layers + extra_layers
    assert not teacher.config.noise_conditioning  # the teacher's config is not touched
    ids = torch.randint(0, student.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    features = torch.rand(2, SEQ_LEN, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(student.eval()(ids, shadow_features=features).logits, teacher.eval()(ids).logits)
    with pytest.raises(ValueError, match="already noise-conditioned"):
        make_noise_conditioned_student(student, TEACHER_STEPS)


def test_distill_method_shadow_end_to_end(tmp_path):
    teacher = make_teacher(str(tmp_path / "teacher"))
    output_dir = str(tmp_path / "student")
    main([
        "--teacher", teacher, "--source", "markov", "--source_num_sequences", "32", "--seq_len", str(SEQ_LEN),
        "--method", "shadow", "--num_rounds", "2", "--steps_per_round", "2", "--teacher_steps", str(TEACHER_STEPS),
        "--train_batch_size", "4", "--validation_num_samples", "4", "--learning_rate", "1e-3",
        "--shadow_lr_multiplier", "5", "--output_dir", output_dir, "--disable_progress_bar",
    ])
    pipe = MCDPipeline.from_pretrained(output_dir)
    assert pipe.model.config.noise_conditioning and pipe.model.config.shadow_grid_size == TEACHER_STEPS
    assert pipe.scheduler.config.sampler == "shadow"
    assert pipe.scheduler.config.num_inference_steps == TEACHER_STEPS // 4
    assert pipe.card_info["method"] == "shadow" and pipe.card_info["divergence"] == "kl-fwd"
    assert pipe.card_info["shadow_lr_multiplier"] == 5.0
    # The shadow embedding learned (it started at zero), and the student samples in the recommended steps.
    assert pipe.model.shadow_embed.linear.weight.abs().sum() > 0
    out = pipe(batch_size=3, seq_len=SEQ_LEN, generator=torch.Generator().manual_seed(0), output_type="ids")
    assert not bool((out.sequences == pipe.mask_token_id).any()) and out.num_model_calls <= TEACHER_STEPS // 4
    assert os.path.isfile(os.path.join(output_dir, "train_log.jsonl"))


def test_new_layers_get_the_higher_learning_rate(tmp_path):
    from mcd_hf.training.distillation import DistillationArguments
    from mcd_hf.training.shadow_distillation import ShadowDistillationTrainer
    from mcd_hf.training.trainer import TrainingArguments

    pipe = MCDPipeline.from_pretrained(make_teacher(str(tmp_path / "teacher")))
    student = make_noise_conditioned_student(pipe.model, TEACHER_STEPS, extra_layers=1)
    trainer = ShadowDistillationTrainer(
        student, TrainingArguments(output_dir=str(tmp_path / "out"), learning_rate=1e-4, max_train_steps=2, cpu=True),
        DistillationArguments(method="shadow", num_rounds=1, steps_per_round=2, teacher_steps=TEACHER_STEPS),
        [], shadow_args=ShadowArguments(lr_multiplier=10.0, extra_layers=1), scheduler=pipe.scheduler,
    )
    optimizer = trainer.create_optimizer(student)
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    new = ("shadow_embed.", "blocks.2.")  # the teacher has blocks 0 and 1
    for name, parameter in student.named_parameters():
        assert rates[id(parameter)] == pytest.approx(1e-3 if name.startswith(new) else 1e-4), name
    assert trainer.scheduler.config.sampler == "shadow"
    with pytest.raises(ValueError, match="noise-conditioned student"):
        ShadowDistillationTrainer(
            pipe.model, TrainingArguments(output_dir=str(tmp_path / "o2"), max_train_steps=2, cpu=True),
            DistillationArguments(method="shadow", num_rounds=1, steps_per_round=2, teacher_steps=TEACHER_STEPS),
            [], scheduler=pipe.scheduler,
        )
