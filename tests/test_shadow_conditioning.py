"""Tests of the noise-conditioned (shadow) student's inputs: `duality.shadow_features`, the scheduler's
`shadow_features`, and the pipeline passing them (issue 10).

The inverse-CDF token rule itself (law and support, token-id order) is tested in tests/test_duality.py
(`test_inverse_cdf_tokens_law_and_support`), and the shadow sampler's exact law in tests/test_scheduling_mcd.py.
"""

import pytest
import torch

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.duality import get_noise_schedule, shadow_features, shadow_reveal_index
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.pipeline_mcd import MCDPipeline
from mcd_hf.scheduling_mcd import MaskedDualityScheduler
from mcd_hf.training.shadow_distillation import make_noise_conditioned_student

VOCAB_SIZE = 9  # 8 real tokens and the mask
SEQ_LEN = 12
GRID_SIZE = 16


def random_teacher(seed: int = 0) -> MaskedDiffusionLM:
    config = MaskedDiffusionLMConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     cond_dim=16, max_position_embeddings=SEQ_LEN, dropout=0.0)
    model = MaskedDiffusionLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # O(1) random weights: a fresh adaLN-Zero model would give uniform logits
        for parameter in model.parameters():
            fan_in = parameter.shape[-1] if parameter.dim() > 1 else 1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
    return model


def sample(model, num_steps: int, sampler: str = "shadow", batch_size: int = 6):
    scheduler = MaskedDualityScheduler(vocab_size=VOCAB_SIZE, sampler=sampler)
    pipe = MCDPipeline(model=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in range(batch_size)]
    return pipe(batch_size=batch_size, seq_len=SEQ_LEN, num_inference_steps=num_steps, generator=generators,
                output_type="ids")


@pytest.mark.parametrize("schedule_name", ["loglinear", "cosine", "gaussian_cosine"])
def test_reveal_index_is_the_shadow_samplers_reveal_step(schedule_name):
    # The scheduler at N steps reveals position i in the step ending at fine index m_i rounded up to a multiple of
    # GRID_SIZE / N: shadow_reveal_index is the shadow sampler's own reveal rule on the fine grid.
    class Uniform(torch.nn.Module):
        def forward(self, sample):
            return torch.zeros(*sample.shape, VOCAB_SIZE)

    for num_steps in (GRID_SIZE, 4):
        scheduler = MaskedDualityScheduler(vocab_size=VOCAB_SIZE, sampler="shadow", noise_schedule=schedule_name)
        scheduler.set_timesteps(num_steps)
        state = torch.full((8, 50), VOCAB_SIZE - 1)
        shadow, _ = scheduler.init_noise(state, generator=torch.Generator().manual_seed(1))
        reveal_step = torch.full(state.shape, -1)
        for step, timestep in enumerate(scheduler.timesteps):
            state_after = scheduler.step(Uniform()(state), timestep, state).prev_sample
            reveal_step[(state_after != state)] = step
            state = state_after
        block = GRID_SIZE // num_steps
        expected = (shadow_reveal_index(shadow, scheduler.schedule, GRID_SIZE) + block - 1) // block - 1
        assert torch.equal(reveal_step, expected)


def test_shadow_features_count_fine_steps_until_reveal():
    schedule = get_noise_schedule("loglinear")
    grid = 8
    # alpha(1 - m/8) = 1 - 0.999 (1 - m/8): shadows 0.1, 0.2, 0.6, 0.0005 are revealed at fine indices 1, 2, 5, 0.
    shadow = torch.tensor([[0.1, 0.2, 0.6, 0.0005]], dtype=torch.float64)
    value_noise = torch.tensor([[0.3, 0.9, 0.0, 0.5]], dtype=torch.float64)
    assert shadow_reveal_index(shadow, schedule, grid).tolist() == [[1, 2, 5, 0]]
    at_start = shadow_features(shadow, value_noise, 1.0, schedule, grid)
    assert at_start.dtype == torch.float32 and at_start.shape == (1, 4, 2)
    assert at_start[0, :, 0].tolist() == [1 / 8, 2 / 8, 5 / 8, 0.0]
    assert torch.equal(at_start[..., 1], value_noise.float())
    # Per-sequence times: at t = 1 - 1/8, position 0 is visible (0) and the others one step closer.
    later = shadow_features(shadow.expand(2, 4), value_noise.expand(2, 4), torch.tensor([1.0, 0.875]), schedule, grid)
    assert later[1, :, 0].tolist() == [0.0, 1 / 8, 4 / 8, 0.0]
    assert torch.equal(later[0], at_start[0])


def test_shadow_features_reject_bad_arguments():
    schedule = get_noise_schedule("loglinear")
    shadow = torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="fine grid"):
        shadow_features(shadow, shadow, 0.3, schedule, 8)  # 0.3 is not 1 - c/8
    with pytest.raises(ValueError, match="grid_size"):
        shadow_features(shadow, shadow, 0.5, schedule, 0)
    with pytest.raises(ValueError, match="value_noise"):
        shadow_features(shadow, shadow[:, :2], 0.5, schedule, 8)


def test_scheduler_shadow_features_checks():
    scheduler = MaskedDualityScheduler(vocab_size=VOCAB_SIZE, sampler="shadow")
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="init_noise"):
        scheduler.shadow_features(scheduler.timesteps[0], 16)
    state = torch.full((2, 5), VOCAB_SIZE - 1)
    shadow, value_noise = scheduler.init_noise(state, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="multiple of num_inference_steps"):
        scheduler.shadow_features(scheduler.timesteps[0], 6)
    features = scheduler.shadow_features(scheduler.timesteps[1], 16)
    assert torch.equal(features, shadow_features(shadow, value_noise, 0.75, scheduler.schedule, 16))
    ancestral = MaskedDualityScheduler(vocab_size=VOCAB_SIZE)
    ancestral.set_timesteps(4)
    with pytest.raises(ValueError, match="sampler='shadow'"):
        ancestral.shadow_features(ancestral.timesteps[0], 16)


@pytest.mark.parametrize("num_steps", [16, 4, 1])
def test_zero_embedding_student_samples_equal_the_teachers(num_steps, tmp_path):
    teacher = random_teacher()
    student = make_noise_conditioned_student(teacher, GRID_SIZE).eval()
    reference = sample(teacher, num_steps)
    output = sample(student, num_steps)
    assert torch.equal(output.sequences, reference.sequences)
    assert output.num_model_calls == reference.num_model_calls
    # Saved and reloaded (the fine grid travels in the config), still the teacher's samples.
    MCDPipeline(model=student, scheduler=MaskedDualityScheduler(vocab_size=VOCAB_SIZE, sampler="shadow")).save_pretrained(
        tmp_path / "student")
    loaded = MCDPipeline.from_pretrained(tmp_path / "student")
    assert loaded.model.config.noise_conditioning and loaded.model.config.shadow_grid_size == GRID_SIZE
    assert torch.equal(sample(loaded.model, num_steps).sequences, reference.sequences)


def test_the_pipeline_feeds_the_noise_to_the_student():
    teacher = random_teacher()
    student = make_noise_conditioned_student(teacher, GRID_SIZE).eval()
    with torch.no_grad():
        student.shadow_embed.linear.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    first, second = sample(student, 4), sample(student, 4)
    assert torch.equal(first.sequences, second.sequences)  # still deterministic given the noise
    assert not torch.equal(first.sequences, sample(teacher, 4).sequences)  # but the noise now changes the output

    # The features the model reads at each call are the scheduler's at that step (fine steps until reveal, r).
    seen = []
    original_forward = student.forward

    def recording_forward(*args, shadow_features=None, **kwargs):
        seen.append(shadow_features.clone())
        return original_forward(*args, shadow_features=shadow_features, **kwargs)

    student.forward = recording_forward
    scheduler = MaskedDualityScheduler(vocab_size=VOCAB_SIZE, sampler="shadow")
    pipe = MCDPipeline(model=student, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe(batch_size=2, seq_len=SEQ_LEN, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
         output_type="ids")
    reveal_index = shadow_reveal_index(scheduler.shadow, scheduler.schedule, GRID_SIZE)
    for call, features in enumerate(seen):  # every step of this sampler reveals something, so one call per step
        assert torch.allclose(features[..., 0], ((reveal_index - 4 * call).clamp(min=0) / GRID_SIZE).float())
        assert torch.equal(features[..., 1], scheduler.value_noise.float())
    assert len(seen) == 4


def test_noise_conditioned_model_needs_the_shadow_sampler_and_a_grid():
    student = make_noise_conditioned_student(random_teacher(), GRID_SIZE).eval()
    with pytest.raises(ValueError, match="sampler='shadow'"):
        sample(student, 4, sampler="ancestral")
    with pytest.raises(ValueError, match="multiple of num_inference_steps"):
        sample(student, 3)
    student.config.shadow_grid_size = None
    with pytest.raises(ValueError, match="shadow_grid_size"):
        sample(student, 4)
