"""Tests of the MCD and SDTT losses (`mcd_hf.training.distill_losses`): masks, targets, divergences, memory."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.duality import get_noise_schedule, reveal_probability, sample_shadow
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.training.distill_losses import (
    coupled_pair,
    distillation_loss,
    mcd_loss,
    sample_times,
    sdtt_loss,
    token_divergence,
)

VOCAB_SIZE = 17  # 16 real tokens + [MASK]
MASK = VOCAB_SIZE - 1
SEQ_LEN = 24


def tiny_model(seed: int = 0, time_conditioning: bool = False) -> MaskedDiffusionLM:
    config = MaskedDiffusionLMConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
        max_position_embeddings=SEQ_LEN, dropout=0.0, time_conditioning=time_conditioning,
    )
    model = MaskedDiffusionLM(config)
    # A fresh adaLN-Zero model outputs zero logits; random O(1) weights make every input matter.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            fan_in = parameter.shape[-1] if parameter.dim() > 1 else 1
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
    return model


class TableModel(nn.Module):
    """Logits = a fixed (L, V) table times (1 + time_scale * noise level): ignores the tokens, known exactly."""

    def __init__(self, table: torch.Tensor, time_scale: float = 0.0):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=table.shape[-1] - 1)
        self.table = nn.Parameter(table.clone())
        self.time_scale = time_scale

    def forward(self, input_ids, timesteps=None):
        scale = 1.0 + self.time_scale * timesteps.float().view(-1, 1, 1)
        return SimpleNamespace(logits=self.table.expand(input_ids.shape[0], -1, -1) * scale)


def clean_batch(batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK, (batch_size, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Coupled pairs


def test_coupled_pair_masks_follow_the_shadow():
    schedule = get_noise_schedule("loglinear")
    x = clean_batch(16)
    t = torch.linspace(0.2, 1.0, 16, dtype=torch.float64)
    s = t - 0.15
    pair = coupled_pair(x, schedule, t, s, MASK, generator=torch.Generator().manual_seed(1))
    alpha_t, alpha_s = schedule.alpha(t)[:, None], schedule.alpha(s)[:, None]
    visible_t = pair.noisy_t != MASK
    # z_s reveals a superset of z_t, and every visible token is the clean one.
    assert torch.equal(pair.noisy_s[visible_t], pair.noisy_t[visible_t])
    assert torch.equal(pair.noisy_t[visible_t], x[visible_t])
    assert torch.equal(pair.noisy_s[pair.noisy_s != MASK], x[pair.noisy_s != MASK])
    assert torch.equal(pair.masked_t, pair.shadow > alpha_t)
    # The revealed set is exactly the shadows in (alpha_t, alpha_s].
    assert torch.equal(pair.revealed, (pair.shadow > alpha_t) & (pair.shadow <= alpha_s))
    assert torch.equal(pair.still_masked, pair.shadow > alpha_s)
    assert 0 < int(pair.revealed.sum()) < int(pair.masked_t.sum())


def test_coupled_pair_is_deterministic_given_the_shadow_and_rejects_bad_times():
    schedule = get_noise_schedule("loglinear")
    x = clean_batch()
    shadow = sample_shadow(x.shape, generator=torch.Generator().manual_seed(3))
    first = coupled_pair(x, schedule, 0.7, 0.5, MASK, shadow=shadow)
    second = coupled_pair(x, schedule, 0.7, 0.5, MASK, shadow=shadow.clone())
    assert torch.equal(first.noisy_t, second.noisy_t) and torch.equal(first.noisy_s, second.noisy_s)
    with pytest.raises(ValueError, match="s <= t"):
        coupled_pair(x, schedule, 0.5, 0.7, MASK, shadow=shadow)
    with pytest.raises(ValueError, match="shadow"):
        coupled_pair(x, schedule, 0.7, 0.5, MASK, shadow=shadow[:, :3])


def _largest_allocation(vocab_size: int, batch_size: int = 4, seq_len: int = 1024) -> int:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size - 1, (batch_size, seq_len), generator=generator)
    schedule = get_noise_schedule("loglinear")
    t = sample_times(batch_size, 1 / 64, generator=generator)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        coupled_pair(x, schedule, t, t - 1 / 64, vocab_size - 1, generator=generator, with_value_noise=True)
    return max(event.self_cpu_memory_usage for event in prof.events())


def test_coupled_pair_memory_does_not_depend_on_the_vocabulary():
    # GPT-2's vocabulary: one (B, L, K) tensor would be >= 4 * 1024 * 50257 bytes = 206 MB even as bool.
    batch_size, seq_len, vocab_size = 4, 1024, 50258
    large = _largest_allocation(vocab_size, batch_size, seq_len)
    small = _largest_allocation(33, batch_size, seq_len)
    assert large == small
    assert large <= batch_size * seq_len * 8  # one float64 (B, L) tensor: the shadow


# ---------------------------------------------------------------------------------------------------------------------
# Times


def test_sample_times_range_antithetic_and_grid():
    generator = torch.Generator().manual_seed(0)
    dt = 1 / 16
    times = sample_times(8, dt, generator=generator)
    assert times.dtype == torch.float64 and bool((times > dt).all()) and bool((times <= 1).all())
    # Antithetic: the 8 times are evenly spaced by (1 - dt) / 8 modulo the interval.
    gaps = torch.diff(torch.sort(times).values)
    assert torch.allclose(gaps, torch.full_like(gaps, (1 - dt) / 8))
    grid = sample_times(64, dt, on_grid=True, antithetic=False, generator=generator)
    steps = grid / dt
    assert torch.allclose(steps, steps.round()) and bool((steps >= 1).all()) and bool((steps <= 16).all())
    with pytest.raises(ValueError, match="dt"):
        sample_times(4, 1.5)
    with pytest.raises(ValueError, match="integer"):
        sample_times(4, 0.3, on_grid=True)


# ---------------------------------------------------------------------------------------------------------------------
# Divergences


@pytest.mark.parametrize("divergence", ["kl-bwd", "kl-fwd", "jsd"])
def test_divergences_match_direct_formulas(divergence):
    generator = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(5, 7, generator=generator, dtype=torch.float64), -1)
    student = torch.log_softmax(torch.randn(5, 7, generator=generator, dtype=torch.float64), -1)
    p, q = teacher.exp(), student.exp()  # p = teacher, q = student
    if divergence == "kl-bwd":
        expected = (q * torch.log(q / p)).sum(-1)
    elif divergence == "kl-fwd":
        expected = (p * torch.log(p / q)).sum(-1)
    else:
        m = (p + q) / 2
        expected = 0.5 * (p * torch.log(p / m)).sum(-1) + 0.5 * (q * torch.log(q / m)).sum(-1)
    got = token_divergence(teacher.float(), student.float(), divergence)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert bool((got >= -1e-6).all())
    assert torch.allclose(token_divergence(teacher.float(), teacher.float(), divergence), torch.zeros(5), atol=1e-7)
    with pytest.raises(ValueError, match="divergence"):
        token_divergence(teacher, student, "kl")


@pytest.mark.parametrize("method,coupling", [("mcd", "data"), ("mcd", "teacher"), ("sdtt", "data")])
@pytest.mark.parametrize("divergence", ["kl-bwd", "kl-fwd", "jsd"])
def test_no_nan_with_extreme_logits(method, coupling, divergence):
    for scale in (1e30, 1e37):
        generator = torch.Generator().manual_seed(0)
        # Logits spread over +-scale: probabilities underflow to exactly 0 for all but one token per row.
        student = TableModel(torch.randn(SEQ_LEN, VOCAB_SIZE, generator=generator) * scale)
        teacher = TableModel(torch.randn(SEQ_LEN, VOCAB_SIZE, generator=generator) * scale)
        with torch.no_grad():  # a banned token (-inf logit in both), as models with padded vocabularies emit
            student.table[:, 5] = -math.inf
            teacher.table[:, 5] = -math.inf
        x = clean_batch().clamp(max=4)  # the data never holds the banned token (else its cross-entropy is +inf)
        loss, logs = distillation_loss(method, student, teacher, x, get_noise_schedule("loglinear"), 0.25,
                                       divergence=divergence, coupling=coupling, generator=generator)
        loss.backward()
        assert not torch.isnan(loss) and not bool(torch.isnan(student.table.grad).any())
        if scale == 1e30:  # at 1e37 a sum of ~1e37 cross-entropies may overflow to +inf, which is not a NaN
            assert torch.isfinite(loss) and bool(torch.isfinite(student.table.grad).all())


# ---------------------------------------------------------------------------------------------------------------------
# The MCD loss


@pytest.mark.parametrize("divergence", ["kl-bwd", "kl-fwd", "jsd"])
@pytest.mark.parametrize("time_conditioning", [False, True])
def test_student_equal_to_teacher_with_s_equal_t_gives_zero_loss(divergence, time_conditioning):
    student = tiny_model(time_conditioning=time_conditioning)
    teacher = copy.deepcopy(student)
    schedule = get_noise_schedule("loglinear")
    x = clean_batch()
    for method in ("mcd", "sdtt"):
        loss, logs = distillation_loss(method, student, teacher, x, schedule, 0.0, divergence=divergence,
                                       generator=torch.Generator().manual_seed(0))
        assert int(logs["num_masked"]) > 0 and int(logs["num_revealed"]) == 0
        assert abs(loss.item()) < 1e-5, (method, loss.item())


def test_loss_with_s_before_t_is_positive_and_its_boundary_is_the_cross_entropy():
    student = tiny_model(seed=0, time_conditioning=True)
    teacher = copy.deepcopy(student)
    schedule = get_noise_schedule("loglinear")
    x = clean_batch()
    t = torch.full((x.shape[0],), 0.6, dtype=torch.float64)
    shadow = sample_shadow(x.shape, generator=torch.Generator().manual_seed(5))
    loss, logs = mcd_loss(student, teacher, x, schedule, 0.3, time=t, shadow=shadow)
    assert float(loss) > 0

    pair = coupled_pair(x, schedule, t, t - 0.3, MASK, shadow=shadow)
    logits = student(input_ids=pair.noisy_t, timesteps=schedule.noise_level(t).float()).logits
    log_probs = torch.log_softmax(logits[..., :MASK].double(), -1)  # the mask id is the last column
    cross_entropy = -log_probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)[pair.revealed]
    assert int(logs["num_revealed"]) == int(pair.revealed.sum()) > 0
    expected_boundary = cross_entropy.sum() / pair.masked_t.sum()
    assert math.isclose(float(logs["boundary"]), float(expected_boundary), rel_tol=1e-5)
    assert math.isclose(float(loss), float(logs["boundary"] + logs["divergence"]), rel_tol=1e-6)
    assert float(logs["divergence"]) > 0  # the teacher sees more tokens than the student


def test_divergence_part_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    student = TableModel(torch.randn(SEQ_LEN, VOCAB_SIZE, generator=generator))
    teacher = TableModel(torch.randn(SEQ_LEN, VOCAB_SIZE, generator=generator))
    schedule = get_noise_schedule("loglinear")
    x = clean_batch()
    t = torch.full((x.shape[0],), 0.8, dtype=torch.float64)
    shadow = sample_shadow(x.shape, generator=generator)
    loss, logs = mcd_loss(student, teacher, x, schedule, 0.25, time=t, shadow=shadow, divergence="kl-fwd")
    pair = coupled_pair(x, schedule, t, t - 0.25, MASK, shadow=shadow)
    p = torch.softmax(teacher.table[:, :MASK].double(), -1).expand(x.shape[0], -1, -1)
    q = torch.softmax(student.table[:, :MASK].double(), -1).expand(x.shape[0], -1, -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    expected = kl[pair.still_masked].sum() / pair.masked_t.sum()
    assert math.isclose(float(logs["divergence"]), float(expected), rel_tol=1e-5)


def test_teacher_coupling_uses_the_teacher_draw():
    generator = torch.Generator().manual_seed(0)
    # The teacher puts all its mass on token 3 everywhere, so its draw is 3 whatever the value noise.
    table = torch.full((SEQ_LEN, VOCAB_SIZE), -50.0)
    table[:, 3] = 50.0
    teacher = TableModel(table)
    student = TableModel(torch.randn(SEQ_LEN, VOCAB_SIZE, generator=generator))
    schedule = get_noise_schedule("loglinear")
    x = clean_batch()
    t = torch.full((x.shape[0],), 0.9, dtype=torch.float64)
    shadow = sample_shadow(x.shape, generator=generator)
    _, logs = mcd_loss(student, teacher, x, schedule, 0.5, time=t, shadow=shadow, coupling="teacher", generator=generator)
    pair = coupled_pair(x, schedule, t, t - 0.5, MASK, shadow=shadow)
    log_q = torch.log_softmax(student.table[:, :MASK].double(), -1).expand(x.shape[0], -1, -1)
    expected = -log_q[..., 3][pair.revealed].sum() / pair.masked_t.sum()
    assert math.isclose(float(logs["boundary"]), float(expected), rel_tol=1e-5)
    # Deterministic given the shadow and the value noise.
    noise = sample_shadow(x.shape, generator=torch.Generator().manual_seed(9))
    teacher_random = TableModel(torch.randn(SEQ_LEN, VOCAB_SIZE, generator=generator))
    runs = [mcd_loss(student, teacher_random, x, schedule, 0.5, time=t, shadow=shadow, value_noise=noise,
                     coupling="teacher")[0] for _ in range(2)]
    assert float(runs[0]) == float(runs[1])


def test_gradient_flows_to_the_student_only():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    loss, _ = mcd_loss(student, teacher, clean_batch(), get_noise_schedule("loglinear"), 0.25,
                       generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters())
    assert teacher.training  # the teacher's mode is restored after its eval-mode forward


def test_bad_arguments():
    student = tiny_model()
    schedule = get_noise_schedule("loglinear")
    with pytest.raises(ValueError, match="divergence"):
        mcd_loss(student, student, clean_batch(), schedule, 0.1, divergence="kl")
    with pytest.raises(ValueError, match="coupling"):
        mcd_loss(student, student, clean_batch(), schedule, 0.1, coupling="model")
    with pytest.raises(ValueError, match="time"):
        mcd_loss(student, student, clean_batch(), schedule, 0.5, time=0.2)
    with pytest.raises(ValueError, match="method"):
        distillation_loss("dcd", student, student, clean_batch(), schedule, 0.1)
    with pytest.raises(ValueError, match="coupling"):
        distillation_loss("sdtt", student, student, clean_batch(), schedule, 0.1, coupling="teacher")


# ---------------------------------------------------------------------------------------------------------------------
# The SDTT loss


def test_sdtt_targets_are_the_teacher_at_the_revealing_step():
    generator = torch.Generator().manual_seed(0)
    # The teacher's logits depend on the time, so its two steps give different targets.
    teacher = TableModel(torch.randn(SEQ_LEN, VOCAB_SIZE, generator=generator), time_scale=1.0)
    student = TableModel(torch.randn(SEQ_LEN, VOCAB_SIZE, generator=generator))
    schedule = get_noise_schedule("loglinear")
    x = clean_batch()
    t = torch.full((x.shape[0],), 0.9, dtype=torch.float64)
    dt = 0.6
    shadow = sample_shadow(x.shape, generator=generator)
    loss, logs = sdtt_loss(student, teacher, x, schedule, dt, time=t, shadow=shadow, divergence="kl-fwd",
                           generator=generator)
    middle = t - dt / 2
    alpha_t, alpha_m, alpha_s = (schedule.alpha(v)[:, None] for v in (t, middle, t - dt))
    masked_t = shadow > alpha_t
    first_step = masked_t & (shadow <= alpha_m)

    def teacher_probs(time):
        scale = 1.0 + schedule.noise_level(time).float().view(-1, 1, 1)
        return torch.softmax((teacher.table * scale)[..., :MASK].double(), -1)

    target = torch.where(first_step.unsqueeze(-1), teacher_probs(t), teacher_probs(middle))
    q = torch.softmax(student.table[:, :MASK].double(), -1).expand(x.shape[0], -1, -1)
    kl = (target * (target.log() - q.log())).sum(-1)
    expected = kl[masked_t].sum() / masked_t.sum()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
    assert int(logs["num_revealed"]) == int((masked_t & (shadow <= alpha_s)).sum())
    assert int(first_step.sum()) > 0 and int((masked_t & (shadow > alpha_m) & (shadow <= alpha_s)).sum()) > 0


def test_sdtt_reveals_at_the_ancestral_rate():
    # Given z_t, a masked token is revealed by the two teacher steps with probability (alpha_s - alpha_t)/(1 - alpha_t).
    table = torch.zeros(SEQ_LEN, VOCAB_SIZE)
    model = TableModel(table)
    schedule = get_noise_schedule("loglinear")
    x = clean_batch(batch_size=256)
    t = torch.full((x.shape[0],), 0.8, dtype=torch.float64)
    _, logs = sdtt_loss(model, model, x, schedule, 0.4, time=t, generator=torch.Generator().manual_seed(2))
    probability = float(reveal_probability(schedule.alpha(0.8), schedule.alpha(0.4)))
    masked = int(logs["num_masked"])
    # Binomial(masked, probability): the observed count is within 4 standard deviations.
    sigma = math.sqrt(masked * probability * (1 - probability))
    assert abs(int(logs["num_revealed"]) - masked * probability) < 4 * sigma
