"""Tests of `MaskedDualityScheduler` (DESIGN.md section 3).

The exact-law tests run the scheduler on a toy context-dependent "model" with K = 2 real tokens, L = 3 (27 states)
and compare the distribution of final sequences with the one computed exactly by dynamic programming over all
states, with a chi-square test at level 1e-3 (fixed seeds). 20000 samples give power: the laws for different step
counts differ by far more than the test resolves (checked in `test_exact_law_tests_have_power`).
"""

import itertools
import math
from collections import defaultdict

import pytest
import torch
from scipy import stats

from mcd_hf.duality import get_noise_schedule, mask_from_shadow, reveal_probability, sample_shadow
from mcd_hf.scheduling_mcd import MaskedDualityScheduler, MaskedDualitySchedulerOutput, apply_sampling_controls

LEVEL = 1e-3
NUM_SAMPLES = 20000
MASK = 2
LENGTH = 3
BIAS = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
COUPLING = torch.tensor([[0.0, 2.0, -1.5], [2.0, 0.0, 1.5], [-1.5, 1.5, 0.0]], dtype=torch.float64)


def toy_logits(z):
    """Logits (B, 3, 3) over {0, 1, MASK}: token 1's logit is an Ising-like field of the visible neighbours."""
    spin = torch.where(z == MASK, 0.0, 2.0 * z.double() - 1.0)
    field = BIAS + spin @ COUPLING
    # the mask logit is large: SUBS must remove it
    return torch.stack([torch.zeros_like(field), field, torch.full_like(field, 4.0)], dim=-1).float()


def toy_probs(state, temperature=1.0):
    logits = toy_logits(torch.tensor([state]))[0, :, :2].double()
    return torch.softmax(logits / temperature, dim=-1)


def exact_law(alphas, final_step="greedy", temperature=1.0):
    """Distribution of the final sequence of the ancestral sampler, by dynamic programming over all 27 states."""
    distribution = {(MASK,) * LENGTH: 1.0}
    num_steps = len(alphas) - 1
    for index in range(num_steps):
        reveal = float(reveal_probability(alphas[index], alphas[index + 1]))
        last = index == num_steps - 1
        following = defaultdict(float)
        for state, state_probability in distribution.items():
            probs = toy_probs(state, temperature)
            greedy = toy_probs(state).argmax(-1)
            per_position = []
            for position, token in enumerate(state):
                if token != MASK:
                    per_position.append([(token, 1.0)])
                    continue
                options = [(value, reveal * float(probs[position, value])) for value in (0, 1)]
                if not last:
                    options.append((MASK, 1.0 - reveal))
                elif final_step == "greedy":
                    options.append((int(greedy[position]), 1.0 - reveal))
                else:
                    options += [(value, (1.0 - reveal) * float(probs[position, value])) for value in (0, 1)]
                per_position.append(options)
            for combination in itertools.product(*per_position):
                following[tuple(value for value, _ in combination)] += state_probability * math.prod(
                    probability for _, probability in combination)
        distribution = dict(following)
    law = torch.zeros(2**LENGTH, dtype=torch.float64)
    for state, probability in distribution.items():
        assert MASK not in state
        law[int("".join(map(str, state)), 2)] += probability
    return law


def run_sampler(scheduler, num_steps, batch_size, seed, temperature=1.0, top_k=None, top_p=None, canvas=None):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.full((batch_size, LENGTH), MASK) if canvas is None else canvas.clone()
    scheduler.set_timesteps(num_steps)
    scheduler.init_noise(sample, generator=generator)
    for timestep in scheduler.timesteps:
        output = scheduler.step(toy_logits(sample), timestep, sample, generator=generator, temperature=temperature,
                                top_k=top_k, top_p=top_p)
        sample = output.prev_sample
    return sample


def counts_of(samples):
    codes = (samples * torch.tensor([4, 2, 1])).sum(-1)
    return torch.bincount(codes, minlength=2**LENGTH).double()


def chi_square_pvalue(counts, law):
    return stats.chisquare(counts.numpy(), (law * counts.sum()).numpy()).pvalue


# ---------------------------------------------------------------------------------------------------------------------
# Exact law


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
@pytest.mark.parametrize("num_steps", [1, 2, LENGTH, 4 * LENGTH])
def test_sampler_matches_exact_law(sampler, num_steps):
    scheduler = MaskedDualityScheduler(vocab_size=3, mask_token_id=MASK, sampler=sampler)
    samples = run_sampler(scheduler, num_steps, NUM_SAMPLES, seed=num_steps)
    law = exact_law(scheduler._alphas.tolist())
    assert (law * NUM_SAMPLES > 5).all()  # the usual condition for the chi-square approximation
    assert chi_square_pvalue(counts_of(samples), law) > LEVEL


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
def test_temperature_is_applied_to_the_subs_distribution(sampler):
    scheduler = MaskedDualityScheduler(vocab_size=3, mask_token_id=MASK, sampler=sampler)
    samples = run_sampler(scheduler, 2, NUM_SAMPLES, seed=11, temperature=0.6)
    law = exact_law(scheduler._alphas.tolist(), temperature=0.6)
    assert chi_square_pvalue(counts_of(samples), law) > LEVEL
    assert chi_square_pvalue(counts_of(samples), exact_law(scheduler._alphas.tolist())) < 1e-6


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
@pytest.mark.parametrize("final_step", ["greedy", "sample"])
def test_final_step_with_a_gaussian_schedule(sampler, final_step):
    # gaussian_linear_logsnr has alpha(0) = 1 - eps: with eps = 0.3 about 30% of tokens are still masked after the
    # last step, and the two final_step rules give visibly different laws.
    scheduler = MaskedDualityScheduler(vocab_size=3, mask_token_id=MASK, sampler=sampler, final_step=final_step,
                                       noise_schedule="gaussian_linear_logsnr", eps=0.3)
    samples = run_sampler(scheduler, 2, NUM_SAMPLES, seed=21)
    assert (samples != MASK).all()
    alphas = scheduler._alphas.tolist()
    assert alphas[-1] == pytest.approx(0.7)
    assert chi_square_pvalue(counts_of(samples), exact_law(alphas, final_step)) > LEVEL
    other = "sample" if final_step == "greedy" else "greedy"
    assert chi_square_pvalue(counts_of(samples), exact_law(alphas, other)) < 1e-6


def test_exact_law_tests_have_power():
    scheduler = MaskedDualityScheduler(vocab_size=3, mask_token_id=MASK, sampler="ancestral")
    scheduler.set_timesteps(1)
    one_step = exact_law(scheduler._alphas.tolist())
    scheduler.set_timesteps(4 * LENGTH)
    many_steps = exact_law(scheduler._alphas.tolist())
    assert 0.5 * (one_step - many_steps).abs().sum() > 0.05
    samples = run_sampler(scheduler, 1, NUM_SAMPLES, seed=0)
    assert chi_square_pvalue(counts_of(samples), many_steps) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Determinism, conditioning, skipping


def random_model(vocab_size, length, seed):
    """A context-dependent model over `vocab_size` ids (last = mask): logits from the visible tokens' embeddings."""
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.randn(vocab_size, 8, generator=generator)
    embedding[-1] = 0
    mixing = torch.randn(length, length, generator=generator)
    readout = torch.randn(8, vocab_size, generator=generator) * 2
    bias = torch.randn(length, vocab_size, generator=generator)

    def model(z):
        return (mixing @ embedding[z]) @ readout + bias

    return model


def sample_with(scheduler, model, sample, num_steps, generator, skip=False):
    scheduler.set_timesteps(num_steps)
    scheduler.init_noise(sample, generator=generator)
    logits, calls = None, 0
    for timestep in scheduler.timesteps:
        reveals = scheduler.step_reveals_tokens(timestep, sample)
        if not skip or logits is None or reveals is None or bool(reveals.any()):
            logits, calls = model(sample), calls + 1
        output = scheduler.step(logits, timestep, sample, generator=generator)
        if reveals is not None:
            assert torch.equal(reveals, (output.prev_sample != sample).any(-1))
        sample = output.prev_sample
    return sample, calls


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
def test_same_seed_same_sample(sampler):
    scheduler = MaskedDualityScheduler(vocab_size=17, sampler=sampler)
    model = random_model(17, 12, seed=0)
    start = torch.full((4, 12), 16)
    first, _ = sample_with(scheduler, model, start, 12, torch.Generator().manual_seed(5))
    second, _ = sample_with(scheduler, model, start, 12, torch.Generator().manual_seed(5))
    third, _ = sample_with(scheduler, model, start, 12, torch.Generator().manual_seed(6))
    assert torch.equal(first, second) and not torch.equal(first, third)


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
def test_per_sequence_generators(sampler):
    scheduler = MaskedDualityScheduler(vocab_size=17, sampler=sampler)
    model = random_model(17, 12, seed=1)
    batch, _ = sample_with(scheduler, model, torch.full((3, 12), 16), 8,
                           [torch.Generator().manual_seed(seed) for seed in (1, 2, 3)])
    alone, _ = sample_with(scheduler, model, torch.full((1, 12), 16), 8, [torch.Generator().manual_seed(2)])
    assert torch.equal(batch[1], alone[0])


def test_shadow_sampler_skips_steps_that_reveal_nothing():
    # A model without time conditioning: skipping the forward pass where nothing is revealed changes nothing, and
    # at most min(N, L) forward passes remain.
    scheduler = MaskedDualityScheduler(vocab_size=17, sampler="shadow")
    model = random_model(17, 8, seed=2)
    start = torch.full((2, 8), 16)
    full, full_calls = sample_with(scheduler, model, start, 64, torch.Generator().manual_seed(3))
    skipped, calls = sample_with(scheduler, model, start, 64, torch.Generator().manual_seed(3), skip=True)
    assert torch.equal(full, skipped)
    assert full_calls == 64 and calls <= 2 * 8  # the union over both sequences of their <= 8 reveal steps
    assert scheduler.step_reveals_tokens(scheduler.timesteps[0], start) is not None
    assert MaskedDualityScheduler(vocab_size=17).step_reveals_tokens(0.5, start) is None


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
@pytest.mark.parametrize("unmasking", ["random", "confidence"])
def test_fixed_tokens_never_change(sampler, unmasking):
    scheduler = MaskedDualityScheduler(vocab_size=17, sampler=sampler, unmasking=unmasking)
    model = random_model(17, 12, seed=3)
    generator = torch.Generator().manual_seed(4)
    canvas = torch.full((5, 12), 16)
    canvas[:, :3] = torch.tensor([1, 2, 3])  # prefix
    canvas[:, 7] = 9  # infill anchor
    fixed = canvas != 16
    sample = canvas.clone()
    scheduler.set_timesteps(6)
    scheduler.init_noise(sample, generator=generator)
    for timestep in scheduler.timesteps:
        output = scheduler.step(model(sample), timestep, sample, generator=generator)
        assert torch.equal(output.prev_sample[fixed], canvas[fixed])
        assert torch.equal(output.pred_original_sample[fixed], canvas[fixed])
        assert torch.equal(output.prev_sample[sample != 16], sample[sample != 16])  # revealed stay revealed
        sample = output.prev_sample
    assert (sample != 16).all()


def test_confidence_unmasking_reveals_the_most_confident_positions():
    model = random_model(17, 12, seed=5)
    generator = torch.Generator().manual_seed(6)
    start = torch.full((8, 12), 16)
    confident = MaskedDualityScheduler(vocab_size=17, sampler="shadow", unmasking="confidence")
    plain = MaskedDualityScheduler(vocab_size=17, sampler="shadow")
    confident.set_timesteps(6)
    plain.set_timesteps(6)
    noise = confident.init_noise(start, generator=generator)
    plain.init_noise(start, *(), shadow=noise[0], value_noise=noise[1])
    sample = plain_sample = start
    for timestep in confident.timesteps:
        logits = model(sample)
        reveals = confident.step_reveals_tokens(timestep, sample)
        output = confident.step(logits, timestep, sample)
        assert torch.equal(reveals, (output.prev_sample != sample).any(-1))
        revealed = output.prev_sample != sample
        plain_output = plain.step(model(plain_sample), timestep, plain_sample)
        # as many visible tokens after each step as the shadow sampler has
        assert torch.equal((output.prev_sample != 16).sum(-1), (plain_output.prev_sample != 16).sum(-1))
        confidence = output.pred_logits.amax(-1)
        still_masked = output.prev_sample == 16
        for row in range(8):
            if revealed[row].any() and still_masked[row].any():
                assert confidence[row][revealed[row]].min() >= confidence[row][still_masked[row]].max()
        sample, plain_sample = output.prev_sample, plain_output.prev_sample


def test_top_k_one_is_greedy_and_pred_outputs():
    scheduler = MaskedDualityScheduler(vocab_size=17, sampler="ancestral")
    model = random_model(17, 12, seed=7)
    sample = torch.full((4, 12), 16)
    scheduler.set_timesteps(3)
    generator = torch.Generator().manual_seed(8)
    for timestep in scheduler.timesteps:
        logits = model(sample)
        output = scheduler.step(logits, timestep, sample, generator=generator, top_k=1)
        assert isinstance(output, MaskedDualitySchedulerOutput)
        greedy = logits[..., :16].argmax(-1)
        masked = sample == 16
        assert torch.equal(output.pred_original_sample[masked], greedy[masked])
        changed = output.prev_sample != sample
        assert torch.equal(output.prev_sample[changed], greedy[changed])
        assert output.pred_logits.shape == (4, 12, 17) and output.pred_logits.dtype == torch.float32
        assert (output.pred_logits[..., 16] == -math.inf).all()
        sample = output.prev_sample
    as_tuple = scheduler.step(model(sample), scheduler.timesteps[-1], sample, generator=generator, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3


def test_apply_sampling_controls():
    log_probs = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]], dtype=torch.float64))
    kept = apply_sampling_controls(log_probs, top_p=0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_sampling_controls(log_probs, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(apply_sampling_controls(log_probs, top_p=1.0)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(apply_sampling_controls(log_probs, top_k=2)).tolist() == [[True, True, False, False]]
    tempered = torch.softmax(apply_sampling_controls(log_probs, temperature=0.5), dim=-1)
    expected = torch.tensor([0.25, 0.09, 0.04, 0.0], dtype=torch.float64) / 0.38
    assert torch.allclose(tempered, expected[None])


def test_precision_float32_and_low_precision_logits():
    scheduler = MaskedDualityScheduler(vocab_size=17, sampler="ancestral", precision="float32")
    model = random_model(17, 12, seed=9)
    sample = torch.full((2, 12), 16)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(1)
    for timestep in scheduler.timesteps:
        sample = scheduler.step(model(sample).bfloat16(), timestep, sample, generator=generator).prev_sample
    assert ((sample >= 0) & (sample < 16)).all()


# ---------------------------------------------------------------------------------------------------------------------
# Timesteps, noise level, add_noise, config


def test_timesteps_and_state_reset():
    scheduler = MaskedDualityScheduler(vocab_size=17, sampler="shadow", num_inference_steps=4)
    assert scheduler.timesteps.tolist() == [1.0, 0.75, 0.5, 0.25]
    schedule = get_noise_schedule("loglinear")
    assert torch.allclose(scheduler._alphas, schedule.alpha(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])))
    scheduler.init_noise(torch.full((2, 5), 16), generator=torch.Generator().manual_seed(0))
    assert scheduler.shadow.shape == (2, 5) and (scheduler.shadow > schedule.alpha(1.0)).all()
    scheduler.set_timesteps(8, device="cpu")
    assert len(scheduler.timesteps) == 8 and scheduler.shadow is None and scheduler.step_index is None
    assert scheduler.index_for_timestep(scheduler.timesteps[3]) == 3
    assert MaskedDualityScheduler(vocab_size=17).init_noise(torch.full((1, 3), 16)) is None


def test_noise_level():
    scheduler = MaskedDualityScheduler(vocab_size=17, num_inference_steps=4)
    level = scheduler.noise_level(scheduler.timesteps[1], 3)
    assert level.shape == (3,) and level.dtype == torch.float32
    assert level[0].item() == pytest.approx(-math.log(1 - (1 - 1e-3) * 0.75), rel=1e-6)


def test_add_noise():
    scheduler = MaskedDualityScheduler(vocab_size=51)
    generator = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 50, (32, 256), generator=generator)
    t = torch.rand(32, generator=generator, dtype=torch.float64)
    noisy = scheduler.add_noise(clean, t, generator=generator)
    alpha = scheduler.schedule.alpha(t)
    masked_rate = (noisy == 50).double().mean()
    expected = (1 - alpha).mean()
    # each of the 32 * 256 positions is masked independently; the variance of the rate is at most 1/(4 n)
    assert abs(masked_rate - expected) <= 4 * math.sqrt(0.25 / clean.numel())
    assert torch.equal(noisy[noisy != 50], clean[noisy != 50])
    shadow = sample_shadow((32, 256), generator)
    later, earlier = scheduler.add_noise(clean, 0.8, shadow=shadow), scheduler.add_noise(clean, 0.3, shadow=shadow)
    assert torch.equal(later, mask_from_shadow(clean, shadow, scheduler.schedule.alpha(0.8), 50))
    assert not ((later != 50) & (earlier == 50)).any()


def test_config_round_trip(tmp_path):
    scheduler = MaskedDualityScheduler(vocab_size=33, mask_token_id=5, noise_schedule="gaussian_cosine",
                                       sampler="shadow", final_step="sample", precision="float32",
                                       unmasking="confidence", num_inference_steps=16, eps=0.01)
    scheduler.save_config(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = MaskedDualityScheduler.from_pretrained(tmp_path)
    keys = ("mask_token_id", "vocab_size", "noise_schedule", "sampler", "final_step", "precision", "unmasking",
            "num_inference_steps", "eps")
    assert {key: loaded.config[key] for key in keys} == {key: scheduler.config[key] for key in keys}
    assert len(loaded.timesteps) == 16
    assert MaskedDualityScheduler(vocab_size=33).config.mask_token_id == 32
    assert MaskedDualityScheduler.from_config(scheduler.config).config.sampler == "shadow"


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"sampler": "euler"}, "sampler"),
        ({"noise_schedule": "sigmoid"}, "noise_schedule"),
        ({"final_step": "argmax"}, "final_step"),
        ({"precision": "float16"}, "precision"),
        ({"unmasking": "entropy"}, "unmasking"),
        ({"mask_token_id": 17}, "mask_token_id"),
        ({"vocab_size": 2}, "vocab_size"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"eps": 1.5}, "eps"),
    ],
)
def test_bad_config_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        MaskedDualityScheduler(**{"vocab_size": 17, **kwargs})


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_step_arguments(kwargs, argument):
    scheduler = MaskedDualityScheduler(vocab_size=17, num_inference_steps=4)
    sample = torch.full((1, 5), 16)
    with pytest.raises(ValueError, match=argument):
        scheduler.step(torch.zeros(1, 5, 17), scheduler.timesteps[0], sample, **kwargs)


def test_bad_step_inputs():
    scheduler = MaskedDualityScheduler(vocab_size=17)
    sample = torch.full((1, 5), 16)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 5, 17), 1.0, sample)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps()
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.zeros(1, 5, 16), 1.0, sample)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(torch.zeros(1, 5, 17), 0.6, sample)
