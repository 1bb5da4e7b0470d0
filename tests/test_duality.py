"""Tests of the duality core (DESIGN.md section 1): A_K, schedules, the three shadow forms, coupling, SUBS.

Statistical checks use fixed seeds. Binomial bounds are 4 standard deviations, sqrt(p (1 - p) / n), of an
empirical frequency (two-sided false-failure rate 6e-5 per check for a fresh seed); distribution checks are
Kolmogorov-Smirnov or chi-square tests at level 1e-3.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.integrate import quad

from mcd_hf.duality import (
    NOISE_SCHEDULES,
    NoiseSchedule,
    get_noise_schedule,
    inverse_cdf_tokens,
    inverse_keep_probability,
    keep_probability,
    keep_probability_derivative,
    mask_from_shadow,
    project_gaussian_latent,
    real_token_log_probs,
    reveal_probability,
    sample_gaussian_latent,
    sample_shadow,
    sample_threshold_shadow,
    subs_log_probs,
    threshold_to_uniform,
)

LEVEL = 1e-3


def binomial_bound(p, n):
    return 4.0 * torch.sqrt(p * (1.0 - p) / n) + 1e-12


def explicit_threshold(noise, x):
    """D = max_{j != x} eps_j - eps_x from explicit K-dimensional noise (the definition in DESIGN.md)."""
    own = noise.gather(-1, x.unsqueeze(-1)).squeeze(-1)
    others = noise.scatter(-1, x.unsqueeze(-1), -math.inf).amax(dim=-1)
    return others - own


# ---------------------------------------------------------------------------------------------------------------------
# A_K


def test_keep_probability_two_tokens_closed_form():
    # K = 2: D = eps_1 - eps_0 ~ N(0, 2), so A_2(rho) = Phi(rho / sqrt 2).
    rho = torch.linspace(-8.0, 14.0, 20001, dtype=torch.float64)
    expected = torch.from_numpy(stats.norm.cdf(rho.numpy() / math.sqrt(2.0)))
    assert (keep_probability(rho, 2) - expected).abs().max().item() < 1e-8
    expected_density = torch.from_numpy(stats.norm.pdf(rho.numpy() / math.sqrt(2.0)) / math.sqrt(2.0))
    assert (keep_probability_derivative(rho, 2) - expected_density).abs().max().item() < 1e-8


@pytest.mark.parametrize("vocab_size", [3, 10, 1000])
def test_keep_probability_monte_carlo(vocab_size):
    # The visible event at SNR rho is rho > D with D from explicit Gaussians; its frequency over n draws is
    # binomial(n, A_K(rho)) / n.
    generator = torch.Generator().manual_seed(vocab_size)
    num_samples, chunk = 20000, 2000
    thresholds = []
    for _ in range(num_samples // chunk):
        noise = torch.randn(chunk, vocab_size, generator=generator, dtype=torch.float64)
        thresholds.append(explicit_threshold(noise, torch.zeros(chunk, dtype=torch.long)))
    thresholds = torch.cat(thresholds)
    rho = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    frequency = (rho[:, None] > thresholds[None, :]).double().mean(dim=1)
    expected = keep_probability(rho, vocab_size)
    assert ((frequency - expected).abs() <= binomial_bound(expected, num_samples)).all(), (frequency, expected)


def test_keep_probability_large_vocab_matches_direct_quadrature():
    vocab_size = 50257

    def direct(rho):
        def integrand(u):
            return math.exp(stats.norm.logpdf(u - rho) + (vocab_size - 1) * stats.norm.logcdf(u))

        low, high = min(rho, 4.0) - 12.0, max(rho, 4.0) + 12.0
        return quad(integrand, low, high, points=[rho, 4.0], epsabs=1e-13, epsrel=1e-12, limit=500)[0]

    rho = np.linspace(-2.0, 12.0, 41) + 0.0137  # off the table's grid points
    expected = torch.tensor([direct(value) for value in rho], dtype=torch.float64)
    assert (keep_probability(torch.from_numpy(rho), vocab_size) - expected).abs().max().item() < 1e-6
    assert abs(keep_probability(0.0, vocab_size).item() - 1.0 / vocab_size) < 1e-12


@pytest.mark.parametrize("vocab_size", [2, 10, 50257])
def test_keep_probability_limits_and_monotone(vocab_size):
    assert abs(keep_probability(0.0, vocab_size).item() - 1.0 / vocab_size) < 1e-10
    assert keep_probability(math.inf, vocab_size).item() == 1.0
    assert keep_probability(-math.inf, vocab_size).item() == 0.0
    assert keep_probability(40.0, vocab_size).item() == 1.0
    assert torch.isnan(keep_probability(math.nan, vocab_size))
    fine = torch.linspace(-15.0, 30.0, 200001, dtype=torch.float64)
    assert (torch.diff(keep_probability(fine, vocab_size)) >= 0).all()


@pytest.mark.parametrize("vocab_size", [2, 10, 50257])
def test_inverse_keep_probability_round_trip(vocab_size):
    alpha = torch.linspace(1.0 / vocab_size + 1e-9, 1.0 - 1e-12, 5001, dtype=torch.float64)
    rho = inverse_keep_probability(alpha, vocab_size)
    assert (rho > 0).all()
    assert (keep_probability(rho, vocab_size) - alpha).abs().max().item() < 1e-13
    rho = torch.linspace(0.05, 6.0, 1001, dtype=torch.float64)  # where A_K' is not vanishingly small
    assert (inverse_keep_probability(keep_probability(rho, vocab_size), vocab_size) - rho).abs().max().item() < 1e-7


@pytest.mark.parametrize("alpha", [0.05, 1.0, 1.5, -0.1])
def test_inverse_keep_probability_rejects_out_of_range(alpha):
    with pytest.raises(ValueError, match="alpha"):
        inverse_keep_probability(alpha, 10)  # (1/K, 1) = (0.1, 1)


@pytest.mark.parametrize("vocab_size", [1, 0, 2.5, True])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        keep_probability(1.0, vocab_size)


# ---------------------------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("name", NOISE_SCHEDULES)
def test_schedule_is_consistent(name):
    vocab_size, eps = 50, 1e-3
    schedule = get_noise_schedule(name, vocab_size=vocab_size, eps=eps)
    t = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
    alpha = schedule.alpha(t)
    assert alpha.dtype == torch.float64 and alpha.shape == t.shape
    assert (torch.diff(alpha) <= 0).all() and alpha[0] > alpha[-1]  # gaussian_cosine is 1 to float64 near t = 0
    assert alpha[0].item() >= 1.0 - eps - 1e-12
    # derivative vs central differences of alpha (the Gaussian ones go through the A_K table: 1e-6)
    inner = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    step = 1e-5
    finite_difference = (schedule.alpha(inner + step) - schedule.alpha(inner - step)) / (2 * step)
    assert torch.allclose(schedule.alpha_derivative(inner), finite_difference, atol=1e-5, rtol=1e-5)
    assert torch.allclose(schedule.noise_level(t), -torch.log(alpha), atol=1e-12)
    masked = schedule.mask_probability(t)
    assert torch.allclose(masked, 1 - alpha, atol=1e-15, rtol=0) and (masked >= 0).all()
    weight = schedule.nelbo_weight(inner)
    assert torch.isfinite(weight).all() and (weight >= 0).all()
    masked = schedule.mask_probability(inner)
    expected = torch.where(masked > 0, -schedule.alpha_derivative(inner) / masked, torch.zeros_like(masked))
    assert torch.allclose(weight, expected)
    # the shadow SNR reproduces alpha through A_K (inf where alpha = 1)
    rho = schedule.rho(t)
    assert torch.allclose(keep_probability(rho, vocab_size), alpha, atol=1e-10)
    assert torch.allclose(schedule.snr(inner), schedule.rho(inner) ** 2)
    # scalar input
    assert schedule.alpha(0.5).shape == ()


def test_schedule_formulas():
    eps = 1e-3
    loglinear = NoiseSchedule("loglinear", eps=eps)
    assert loglinear.alpha(0.25).item() == pytest.approx(1 - (1 - eps) * 0.25, abs=1e-15)
    assert loglinear.alpha(1.0).item() == pytest.approx(eps, abs=1e-15)
    assert loglinear.nelbo_weight(0.5).item() == pytest.approx((1 - eps) / ((1 - eps) * 0.5))
    assert loglinear.noise_level(0.3).item() == pytest.approx(-math.log1p(-(1 - eps) * 0.3), rel=1e-14)
    assert NoiseSchedule("linear", eps=eps).alpha(1.0).item() == pytest.approx(eps)
    assert NoiseSchedule("cosine", eps=eps).alpha(1.0).item() == pytest.approx(eps)
    gaussian = NoiseSchedule("gaussian_cosine", vocab_size=7)
    assert gaussian.alpha(0.0).item() == 1.0
    assert gaussian.alpha(1.0).item() == pytest.approx(1 / 7, abs=1e-10)
    assert gaussian.rho(0.5).item() == pytest.approx(1.0)  # cot(pi/4)
    assert gaussian.alpha_derivative(0.0).item() == 0.0
    logsnr = NoiseSchedule("gaussian_linear_logsnr", vocab_size=7, eps=0.01)
    assert logsnr.alpha(0.0).item() == pytest.approx(0.99, abs=1e-12)
    assert logsnr.alpha(1.0).item() == pytest.approx(1 / 7 + 0.01 * 6 / 7, abs=1e-12)
    log_rho = torch.log(logsnr.rho(torch.linspace(0, 1, 5, dtype=torch.float64)))
    assert torch.allclose(torch.diff(log_rho), torch.full((4,), (log_rho[-1] - log_rho[0]).item() / 4, dtype=torch.float64))


def test_schedule_bad_arguments():
    with pytest.raises(ValueError, match="noise_schedule"):
        get_noise_schedule("nope")
    with pytest.raises(ValueError, match="vocab_size"):
        get_noise_schedule("gaussian_cosine")
    with pytest.raises(ValueError, match="eps"):
        get_noise_schedule("loglinear", eps=0.0)
    with pytest.raises(ValueError, match="`t`"):
        get_noise_schedule("loglinear").alpha(1.5)
    with pytest.raises(ValueError, match="vocab_size"):
        get_noise_schedule("loglinear").rho(0.5)


def test_reveal_probability():
    assert reveal_probability(0.2, 0.6).item() == pytest.approx(0.5)
    assert reveal_probability(0.2, 0.2).item() == 0.0
    assert reveal_probability(1.0, 1.0).item() == 1.0
    assert torch.allclose(reveal_probability(torch.tensor([0.0, 0.5]), 1.0), torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------------
# Shadows


def test_three_shadow_forms_have_the_same_law():
    vocab_size, num_samples = 10, 20000
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (num_samples,), generator=generator)
    uniform = sample_shadow((num_samples,), generator)
    threshold = threshold_to_uniform(sample_threshold_shadow((num_samples,), vocab_size, generator), vocab_size)
    noise = torch.randn(num_samples, vocab_size, generator=generator, dtype=torch.float64)
    explicit = threshold_to_uniform(explicit_threshold(noise, x), vocab_size)
    # u = A_K(D) is uniform iff A_K is D's CDF: one-sample KS for both D forms, two-sample KS between them.
    assert stats.kstest(uniform.numpy(), "uniform").pvalue > LEVEL
    assert stats.kstest(threshold.numpy(), "uniform").pvalue > LEVEL
    assert stats.kstest(explicit.numpy(), "uniform").pvalue > LEVEL
    assert stats.ks_2samp(threshold.numpy(), explicit.numpy()).pvalue > LEVEL
    # Masking frequency at several SNRs: uniform form via mask_from_shadow, explicit via the argmax projection.
    mask_id = vocab_size
    for rho in (0.3, 1.5, 3.0):
        alpha = keep_probability(rho, vocab_size)
        latent = sample_gaussian_latent(x, rho, vocab_size, noise=noise)
        for z in (mask_from_shadow(x, uniform, alpha, mask_id), mask_from_shadow(x, threshold, alpha, mask_id),
                  project_gaussian_latent(latent, x, mask_id)):
            assert abs((z == mask_id).double().mean() - (1 - alpha)) <= binomial_bound(alpha, num_samples)


def test_threshold_shadow_large_vocab_matches_explicit_gaussians():
    vocab_size, num_samples = 1000, 5000
    generator = torch.Generator().manual_seed(1)
    cheap = sample_threshold_shadow((num_samples,), vocab_size, generator)
    noise = torch.randn(num_samples, vocab_size, generator=generator, dtype=torch.float64)
    explicit = explicit_threshold(noise, torch.zeros(num_samples, dtype=torch.long))
    assert stats.ks_2samp(cheap.numpy(), explicit.numpy()).pvalue > LEVEL


def test_explicit_projection_is_argmax_and_threshold_event():
    vocab_size, mask_id = 6, 6
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(0, vocab_size, (64, 16), generator=generator)
    noise = torch.randn(64, 16, vocab_size, generator=generator, dtype=torch.float64)
    threshold = explicit_threshold(noise, x)
    rho_per_row = torch.rand(64, generator=generator, dtype=torch.float64) * 4
    for rho in (0.0, 0.7, 2.5, rho_per_row):
        w = sample_gaussian_latent(x, rho, vocab_size, noise=noise)
        assert w.shape == (64, 16, vocab_size)
        z = project_gaussian_latent(w, x, mask_id)
        assert torch.equal(z == x, w.argmax(-1) == x)
        assert torch.equal(z == mask_id, w.argmax(-1) != x)
        # same noise: visible iff rho > D (DESIGN.md's threshold form, pathwise)
        rho_tensor = torch.as_tensor(rho, dtype=torch.float64)
        rho_tensor = rho_tensor[:, None] if rho_tensor.ndim == 1 else rho_tensor
        assert torch.equal(z == x, rho_tensor > threshold)
    clean = sample_gaussian_latent(x, math.inf, vocab_size, generator=generator)
    assert torch.equal(clean, torch.nn.functional.one_hot(x, vocab_size).double())
    assert torch.equal(project_gaussian_latent(clean, x, mask_id), x)
    with pytest.raises(ValueError, match="x"):
        sample_gaussian_latent(torch.tensor([vocab_size]), 1.0, vocab_size)


def test_coupled_trajectories_are_monotone_and_have_the_right_rate():
    schedule = get_noise_schedule("loglinear", vocab_size=50)
    batch, length, mask_id = 64, 256, 50
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(0, 50, (batch, length), generator=generator)
    shadow = sample_shadow((batch, length), generator)
    threshold = sample_threshold_shadow((batch, length), 50, generator)
    times = torch.linspace(1.0, 0.0, 21, dtype=torch.float64)
    previous_uniform = previous_threshold = None
    for t in times:
        alpha = schedule.alpha(t)
        z = mask_from_shadow(x, shadow, alpha, mask_id)
        z_threshold = torch.where(schedule.rho(t) > threshold, x, mask_id)
        assert torch.equal(z_threshold, mask_from_shadow(x, threshold_to_uniform(threshold, 50), alpha, mask_id))
        # visible tokens are the clean ones
        assert torch.equal(z[z != mask_id], x[z != mask_id])
        if previous_uniform is not None:  # going to a smaller t reveals a superset: zero violations
            assert not ((previous_uniform != mask_id) & (z == mask_id)).any()
            assert not ((previous_threshold != mask_id) & (z_threshold == mask_id)).any()
        for state in (z, z_threshold):
            rate = (state == mask_id).double().mean()
            assert abs(rate - (1 - alpha)) <= binomial_bound(alpha, batch * length)
        previous_uniform, previous_threshold = z, z_threshold


def test_mask_from_shadow_alpha_shapes():
    x = torch.arange(6).reshape(2, 3)
    shadow = torch.tensor([[0.1, 0.5, 0.9], [0.1, 0.5, 0.9]], dtype=torch.float64)
    assert torch.equal(mask_from_shadow(x, shadow, 0.5, 9), torch.tensor([[0, 1, 9], [3, 4, 9]]))
    per_row = mask_from_shadow(x, shadow, torch.tensor([0.2, 0.95]), 9)
    assert torch.equal(per_row, torch.tensor([[0, 9, 9], [3, 4, 5]]))
    per_position = mask_from_shadow(x, shadow, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), 9)
    assert torch.equal(per_position, torch.tensor([[0, 9, 2], [9, 4, 9]]))
    with pytest.raises(ValueError, match="alpha"):
        mask_from_shadow(x, shadow, torch.ones(5), 9)
    with pytest.raises(ValueError, match="shadow"):
        mask_from_shadow(x, shadow[:, :2], 0.5, 9)


def test_shadows_with_per_sequence_generators():
    generators = [torch.Generator().manual_seed(seed) for seed in (5, 6, 7)]
    batch = sample_shadow((3, 8), generators)
    alone = sample_shadow((1, 8), [torch.Generator().manual_seed(6)])
    assert torch.equal(batch[1], alone[0])
    thresholds = sample_threshold_shadow((3, 8), 100, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    assert torch.equal(thresholds[2], sample_threshold_shadow((1, 8), 100, [torch.Generator().manual_seed(7)])[0])
    assert batch.dtype == thresholds.dtype == torch.float64
    with pytest.raises(ValueError, match="generator"):
        sample_shadow((2, 8), generators)


def test_shadows_never_allocate_vocabulary_sized_tensors():
    # K = 10^9: any (B, L, K) or even (K,) float64 tensor would need >= 8 GB per position row and fail, so passing
    # shows the threshold form, its uniform map and mask_from_shadow are O(B * L).
    vocab_size, batch, length = 10**9, 8, 1024
    generator = torch.Generator().manual_seed(4)
    threshold = sample_threshold_shadow((batch, length), vocab_size, generator)
    assert threshold.shape == (batch, length) and torch.isfinite(threshold).all()
    # max of K - 1 normals concentrates near sqrt(2 log K) ~ 6.4 (minus a normal for D)
    assert 5.0 < threshold.mean().item() < 7.0
    uniform = threshold_to_uniform(threshold, vocab_size)
    x = torch.randint(0, vocab_size, (batch, length), generator=generator)
    z = mask_from_shadow(x, uniform, keep_probability(6.0, vocab_size), vocab_size)
    assert z.shape == (batch, length)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        sample_threshold_shadow((batch, length), vocab_size, generator)
        mask_from_shadow(x, sample_shadow((batch, length), generator), 0.5, vocab_size)
    largest = max(event.cpu_memory_usage for event in profiler.key_averages())
    assert largest <= 16 * batch * length * 8  # a few (B, L) float64 buffers at most


# ---------------------------------------------------------------------------------------------------------------------
# SUBS and token draws


@pytest.mark.parametrize("mask_id", [4, 1])
def test_subs_log_probs(mask_id):
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 5, 5, generator=generator)
    input_ids = torch.tensor([[mask_id, 0, mask_id, 3, 2], [mask_id] * 5])
    input_ids[0, 1] = 0 if mask_id != 0 else 2
    log_probs = subs_log_probs(logits, input_ids, mask_id)
    assert log_probs.shape == logits.shape and log_probs.dtype == torch.float32
    masked = input_ids == mask_id
    assert (log_probs[..., mask_id] == -math.inf).all()
    assert torch.allclose(torch.logsumexp(log_probs[masked], dim=-1), torch.zeros(int(masked.sum())), atol=1e-6)
    visible = ~masked
    expected = torch.full((int(visible.sum()), 5), -math.inf).scatter_(-1, input_ids[visible][:, None], 0.0)
    assert torch.equal(log_probs[visible], expected)
    # the masked rows are the real-token log-softmax
    real = real_token_log_probs(logits, mask_id)
    assert real.shape == (2, 5, 4) and torch.isfinite(real).all()
    keep = [j for j in range(5) if j != mask_id]
    assert torch.allclose(log_probs[masked][:, keep], real[masked], atol=1e-6)


def test_subs_log_probs_gradient():
    logits = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(11), requires_grad=True)
    ids = torch.tensor([[5, 2, 5, 0]])
    log_probs = subs_log_probs(logits, ids, 5)
    log_probs[0, 0, 1].backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 1] == 0).all() and (logits.grad[0, 3] == 0).all()  # carry-over rows are constant
    assert (logits.grad[0, 0, :5] != 0).all() and logits.grad[0, 0, 5] == 0


def test_subs_log_probs_upcasts_low_precision():
    logits = torch.randn(1, 3, 9, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    ids = torch.full((1, 3), 8)
    log_probs = subs_log_probs(logits, ids, 8)
    assert log_probs.dtype == torch.float32
    assert torch.equal(log_probs, subs_log_probs(logits.float(), ids, 8))
    assert subs_log_probs(logits.double(), ids, 8).dtype == torch.float64
    with pytest.raises(ValueError, match="mask_token_id"):
        subs_log_probs(logits, ids, 9)
    with pytest.raises(ValueError, match="logits"):
        subs_log_probs(logits, ids[:, :2], 8)


def test_inverse_cdf_tokens_law_and_support():
    probs = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4, 0.0], dtype=torch.float64)
    log_probs = torch.log(probs)  # -inf at the zero-probability tokens
    num_samples = 40000
    uniform = torch.rand(num_samples, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    tokens = inverse_cdf_tokens(log_probs.expand(num_samples, -1), uniform)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0
    support = probs > 0
    assert stats.chisquare(counts[support].numpy(), (num_samples * probs[support]).numpy()).pvalue > LEVEL
    # id order and edge values: u = 0 gives the first supported token, u -> 1 the last one, never a zero token
    edges = inverse_cdf_tokens(log_probs.expand(3, -1), torch.tensor([0.0, 0.15, 1.0 - 2.0**-53], dtype=torch.float64))
    assert edges.tolist() == [0, 2, 4]
