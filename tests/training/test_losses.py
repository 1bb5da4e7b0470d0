"""The MDLM NELBO against a direct formula, exact values for a uniform model, time sampling, precision."""

import math

import pytest
import torch

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.duality import get_noise_schedule, mask_from_shadow, sample_shadow, subs_log_probs
from mcd_hf.modeling_mcd import MaskedDiffusionLM
from mcd_hf.training.losses import mdlm_loss, sample_times

K = 10  # real tokens; mask id = K


def _model(time_conditioning=True):
    torch.manual_seed(0)
    config = MaskedDiffusionLMConfig(vocab_size=K + 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     max_position_embeddings=16, time_conditioning=time_conditioning, dropout=0.0)
    model = MaskedDiffusionLM(config)
    with torch.no_grad():  # adaLN-Zero starts the output layer at 0; give it weights so logits vary
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


class UniformModel(torch.nn.Module):
    """Zero logits: SUBS gives 1/K to every real token at masked positions."""

    def forward(self, input_ids, timesteps=None):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, K + 1)})()


@pytest.mark.parametrize("schedule_name", ["loglinear", "cosine", "gaussian_cosine"])
def test_loss_matches_direct_formula_with_subs(schedule_name):
    model = _model()
    schedule = get_noise_schedule(schedule_name, vocab_size=K)
    x = torch.randint(0, K, (4, 16), generator=torch.Generator().manual_seed(1))
    loss, logs = mdlm_loss(model, x, schedule, generator=torch.Generator().manual_seed(7), reduction="none")

    # Replay the same draws (times first, then shadows) and evaluate eq. 10 with subs_log_probs directly.
    generator = torch.Generator().manual_seed(7)
    t = sample_times(4, generator=generator)
    z = mask_from_shadow(x, sample_shadow((4, 16), generator=generator), schedule.alpha(t), K)
    log_p = subs_log_probs(model(input_ids=z, timesteps=schedule.noise_level(t).float()).logits, z, K)
    log_p_x = log_p.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    weight = (-schedule.alpha_derivative(t) / (1 - schedule.alpha(t))).float().unsqueeze(-1)
    expected = torch.where(z == K, -log_p_x * weight, torch.zeros_like(log_p_x))
    assert torch.allclose(loss, expected, atol=1e-6, rtol=1e-5)
    assert bool((loss[z != K] == 0).all())  # visible positions carry no loss
    assert math.isclose(float(logs["nelbo"]), float(expected.detach().mean()), rel_tol=1e-5)
    assert math.isclose(float(logs["masked_fraction"]), float((z == K).float().mean()), rel_tol=1e-6)


def test_uniform_model_loss_is_exact_at_fixed_time():
    # At fixed t (loglinear), each masked token costs (1/t) * log K.
    schedule = get_noise_schedule("loglinear")
    x = torch.randint(0, K, (8, 16))
    for t in (0.1, 0.5, 0.9):
        loss, logs = mdlm_loss(UniformModel(), x, schedule, mask_token_id=K, time=t,
                               generator=torch.Generator().manual_seed(0))
        assert math.isclose(float(loss), float(logs["masked_fraction"]) * math.log(K) / t, rel_tol=1e-5)


def test_uniform_model_expected_loss_is_log_k():
    # E[1{masked} / t] = (1 - eps) for loglinear, so E[loss] = (1 - eps) log K. Per-token terms X = log K * B / t have
    # E[X^2] = log^2 K * ln(1/t_eps) (t ~ U[t_eps, 1]), so a mean over n independent sequences has sd at most
    # log K * sqrt(ln(1000) / n): with n = 4000, 4 sd = 0.17 log K.
    schedule = get_noise_schedule("loglinear")
    x = torch.randint(0, K, (4000, 4))
    loss, _ = mdlm_loss(UniformModel(), x, schedule, mask_token_id=K, generator=torch.Generator().manual_seed(3),
                        antithetic=False)
    assert abs(float(loss) - 0.999 * math.log(K)) < 4 * math.log(K) * math.sqrt(math.log(1000) / 4000)


def test_antithetic_times_cover_strata():
    t = sample_times(8, generator=torch.Generator().manual_seed(0), time_eps=0.0)
    assert t.dtype == torch.float64
    # One offset r in [0, 1): t_i = (r + i) / 8 mod 1, so the sorted times are 1/8 apart, one per stratum.
    gaps = torch.diff(torch.sort(t).values)
    assert torch.allclose(gaps, torch.full_like(gaps, 1 / 8), atol=1e-12)
    t = sample_times(1000, generator=torch.Generator().manual_seed(1), antithetic=False)
    assert float(t.min()) >= 1e-3 and float(t.max()) <= 1.0


def test_reproducible_from_generator_and_reductions_agree():
    model = _model(time_conditioning=False)
    schedule = get_noise_schedule("loglinear")
    x = torch.randint(0, K, (3, 16), generator=torch.Generator().manual_seed(2))
    a, _ = mdlm_loss(model, x, schedule, generator=torch.Generator().manual_seed(5))
    b, _ = mdlm_loss(model, x, schedule, generator=torch.Generator().manual_seed(5))
    c, _ = mdlm_loss(model, x, schedule, generator=torch.Generator().manual_seed(6))
    per_sequence, _ = mdlm_loss(model, x, schedule, generator=torch.Generator().manual_seed(5), reduction="sum")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(per_sequence.sum() / x.numel(), a, rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        mdlm_loss(model, x, schedule, reduction="max")


def test_loss_is_float32_under_bf16_autocast_and_backpropagates():
    model = _model()
    model.train()
    x = torch.randint(0, K, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = mdlm_loss(model, x, get_noise_schedule("loglinear"), generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
