"""`MaskedDualityScheduler`: ancestral and shadow (deterministic-given-noise) samplers for masked diffusion LMs.

Reference: MDLM's ancestral sampler (Sahoo et al., "Simple and Effective Masked Diffusion Language Models",
NeurIPS 2024) and the latent-shadow sampler of "Latent Shadows: The Gaussian-Discrete Duality in Masked Diffusion"
(arXiv 2602.00792) as reconstructed in DESIGN.md section 3. All math (schedules, shadows, SUBS, the reveal
probability, inverse-CDF draws) comes from `mcd_hf.duality`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .duality import (
    NoiseSchedule,
    inverse_cdf_tokens,
    mask_from_shadow,
    reveal_probability,
    sample_shadow,
    shadow_features,
    subs_log_probs,
)

__all__ = ["MaskedDualityScheduler", "MaskedDualitySchedulerOutput", "apply_sampling_controls"]

GeneratorLike = torch.Generator | list[torch.Generator] | None

_SAMPLERS = ("ancestral", "shadow")
_FINAL_STEPS = ("greedy", "sample")
_PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
_UNMASKINGS = ("random", "confidence")


@dataclass
class MaskedDualitySchedulerOutput(BaseOutput):
    """
    Output of [`MaskedDualityScheduler.step`].

    Args:
        prev_sample (`torch.LongTensor` of shape `(batch_size, seq_len)`):
            The state `z_s` after the step: the input with some masked positions revealed; visible tokens unchanged.
        pred_original_sample (`torch.LongTensor` of shape `(batch_size, seq_len)`):
            The predicted clean sequence: visible tokens, the drawn values at positions revealed in this step, and
            the SUBS argmax at positions still masked.
        pred_logits (`torch.Tensor` of shape `(batch_size, seq_len, vocab_size)`):
            The SUBS log-probabilities of the model output (float32; before temperature / top-k / top-p).
    """

    prev_sample: torch.LongTensor
    pred_original_sample: torch.LongTensor
    pred_logits: torch.Tensor


def apply_sampling_controls(
    log_probs: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on log-probabilities over the last dimension.

    Returns unnormalized log-probabilities (removed tokens at -inf). The argmax never changes.
    """
    if temperature != 1.0:
        log_probs = log_probs / temperature
    vocab_size = log_probs.shape[-1]
    if top_k is not None and top_k < vocab_size:
        kth_largest = torch.topk(log_probs, top_k, dim=-1).values[..., -1:]
        log_probs = log_probs.masked_fill(log_probs < kth_largest, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_log_probs, order = torch.sort(log_probs, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_log_probs, dim=-1)
        # drop a token when the mass of the more likely tokens already reaches top_p (the first is always kept)
        remove_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        log_probs = log_probs.masked_fill(remove, -math.inf)
    return log_probs


def _check_sampling_controls(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"`temperature` must be a positive finite number, got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"`top_k` must be None or an integer >= 1, got {top_k!r}.")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"`top_p` must be None or a number in (0, 1], got {top_p!r}.")


class MaskedDualityScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Sampler for masked diffusion language models on the time grid `t_i = 1 - i / N`, `i = 0..N-1` (decreasing, in
    (0, 1]); the step at `t_i` goes to `s = t_i - 1/N`, the last one to `s = 0`.

    - `sampler="ancestral"` (MDLM): at each step every masked token is revealed with probability
      `(alpha_s - alpha_t) / (1 - alpha_t)`, its value drawn from the SUBS distribution (after temperature, top-k,
      top-p). Fresh noise each step, from the `generator` given to `step`.
    - `sampler="shadow"` (DESIGN.md section 3): `init_noise` draws, once, a shadow `u_i` (uniform on
      `(alpha(1), 1)`, i.e. conditioned on being masked at `t = 1`) and a value noise `r_i` per position. Token `i`
      is revealed at the first step whose `alpha_s >= u_i`, with value the inverse CDF of its distribution at
      `r_i`, tokens in id order. Given that `u_i > alpha_t`, `P(u_i <= alpha_s)` is the ancestral reveal
      probability, so the law is exactly the ancestral one; but the sample is a deterministic function of the
      noise (same noise, same sample; paired comparisons across step counts), and steps that reveal nothing are
      known in advance (`step_reveals_tokens`).

    Values are drawn by inverse CDF with one uniform per position (float64 by default): the same law as Gumbel-max
    with O(B*L) noise instead of O(B*L*V). Positions the law leaves masked after the last step (possible only when
    `alpha(0) < 1`, e.g. `gaussian_linear_logsnr`) take the SUBS argmax (`final_step="greedy"`) or a draw
    (`"sample"`). Visible tokens of `sample` (prefix or infill conditioning) never change.

    `unmasking="confidence"` reveals, at each step, as many tokens as the sampler's reveal draw would (a
    binomial count for ancestral; for shadow, enough that as many generated positions are visible at `s` as there
    are shadows `u_i <= alpha_s`), but at the masked positions whose most likely token (under SUBS, before
    temperature) is most probable. It often reads better at few steps but does not preserve the model's law.

    Args:
        mask_token_id (`int`, *optional*):
            Id of `[MASK]`. Defaults to `vocab_size - 1` (MDLM's convention).
        vocab_size (`int`, defaults to 50258):
            Size of the model's output, the mask id included (`K = vocab_size - 1` real tokens).
        noise_schedule (`str`, defaults to `"loglinear"`):
            One of `mcd_hf.duality.NOISE_SCHEDULES`; the masking schedule `alpha(t)` the model was trained with.
        sampler (`str`, defaults to `"ancestral"`):
            `"ancestral"` or `"shadow"`.
        final_step (`str`, defaults to `"greedy"`):
            `"greedy"` or `"sample"`: how positions still masked after the last step are decided.
        precision (`str`, defaults to `"float64"`):
            dtype of the noise and of the probabilities the draws are made from (`"float64"` or `"float32"`).
        unmasking (`str`, defaults to `"random"`):
            `"random"` (law-preserving) or `"confidence"` (most confident first; not law-preserving).
        num_inference_steps (`int`, *optional*):
            Recommended number of steps (e.g. stored by a distilled student); the default of `set_timesteps`.
        eps (`float`, defaults to 1e-3):
            The schedule's `eps` (`alpha(1) = eps` for the masked-space schedules).
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(
        self,
        mask_token_id: int | None = None,
        vocab_size: int = 50258,
        noise_schedule: str = "loglinear",
        sampler: str = "ancestral",
        final_step: str = "greedy",
        precision: str = "float64",
        unmasking: str = "random",
        num_inference_steps: int | None = None,
        eps: float = 1e-3,
    ):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 3:
            raise ValueError(f"`vocab_size` must be an integer >= 3 (two real tokens and the mask), got {vocab_size!r}.")
        if mask_token_id is None:
            mask_token_id = vocab_size - 1
            self.register_to_config(mask_token_id=mask_token_id)
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"`mask_token_id` must be an integer in [0, vocab_size={vocab_size}), got {mask_token_id!r}.")
        for name, value, allowed in (("sampler", sampler, _SAMPLERS), ("final_step", final_step, _FINAL_STEPS),
                                     ("precision", precision, tuple(_PRECISIONS)),
                                     ("unmasking", unmasking, _UNMASKINGS)):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
        self._check_num_inference_steps(num_inference_steps, allow_none=True)
        self.schedule = NoiseSchedule(noise_schedule, vocab_size=vocab_size - 1, eps=eps)
        self.num_inference_steps = None
        self.timesteps = torch.empty(0, dtype=torch.float64)
        self._alphas = None
        self._reset_state()
        if num_inference_steps is not None:
            self.set_timesteps(num_inference_steps)

    # ------------------------------------------------------------------------------------------------------------
    # Time grid and runtime state

    @staticmethod
    def _check_num_inference_steps(num_inference_steps, allow_none: bool = False) -> None:
        if num_inference_steps is None and allow_none:
            return
        if (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int)
                or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}.")

    def _reset_state(self) -> None:
        self._step_index = None
        self._shadow = None
        self._value_noise = None
        self._initially_masked = None

    @property
    def step_index(self) -> int | None:
        """Index of the next step (counts calls of `step` since `set_timesteps`)."""
        return self._step_index

    @property
    def shadow(self) -> torch.Tensor | None:
        """The shadow sampler's per-position shadows `u` (float64, (B, L)), once `init_noise` has run."""
        return self._shadow

    @property
    def value_noise(self) -> torch.Tensor | None:
        """The shadow sampler's per-position value noise `r` (float64, (B, L)), once `init_noise` has run."""
        return self._value_noise

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Set the time grid `t_i = 1 - i/N` and reset the runtime state (step index, shadow noise).

        Args:
            num_inference_steps (`int`, *optional*): `N`; defaults to `config.num_inference_steps`.
            device (*optional*): device of `timesteps`.
        """
        if num_inference_steps is None:
            num_inference_steps = self.config.num_inference_steps
            if num_inference_steps is None:
                raise ValueError("`num_inference_steps` must be given: the scheduler config stores no default.")
        self._check_num_inference_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        grid = 1.0 - torch.arange(num_inference_steps + 1, dtype=torch.float64) / num_inference_steps
        grid[-1] = 0.0
        self.timesteps = grid[:-1].to(device)
        self._alphas = self.schedule.alpha(grid).to(device)
        self._reset_state()

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Position of `timestep` in `self.timesteps`."""
        if self.num_inference_steps is None:
            raise ValueError("call `set_timesteps` before stepping.")
        value = float(timestep)
        index = round((1.0 - value) * self.num_inference_steps)
        if not 0 <= index < self.num_inference_steps or abs(float(self.timesteps[index]) - value) > 1e-6:
            raise ValueError(f"`timestep` {value} is not in the scheduler's timesteps (1 - i/{self.num_inference_steps}).")
        return index

    def _step_alphas(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._alphas[index], self._alphas[index + 1]

    def noise_level(self, timestep: float | torch.Tensor, batch_size: int) -> torch.Tensor:
        """The `timesteps` argument of a time-conditioned model at `timestep`: MDLM's `sigma = -log alpha(t)`.

        Returns:
            `torch.Tensor` of shape `(batch_size,)`, float32, on the device of `self.timesteps`.
        """
        sigma = self.schedule.noise_level(float(timestep))
        return sigma.to(torch.float32).expand(batch_size).to(self.timesteps.device).clone()

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity (discrete tokens are not scaled); for interchangeability with diffusers pipelines."""
        return sample

    # ------------------------------------------------------------------------------------------------------------
    # Noise

    def init_noise(
        self,
        sample: torch.LongTensor,
        generator: GeneratorLike = None,
        shadow: torch.Tensor | None = None,
        value_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Draw the shadow sampler's noise once per sequence (a no-op for the ancestral sampler, returns None).

        Noise order: all shadows `u`, then all value noises `r`; with a list of generators, row `b` of both comes
        from `generator[b]` only, so a sequence's sample does not depend on the rest of the batch.

        Args:
            sample (`torch.LongTensor` of shape `(B, L)`): the initial state (shape and device).
            generator (`torch.Generator` or list of them, *optional*).
            shadow (`torch.Tensor` of shape `(B, L)`, *optional*): given shadows in `(alpha(1), 1]` (e.g. to pair
                two runs); drawn when None.
            value_noise (`torch.Tensor` of shape `(B, L)`, *optional*): given value noise in [0, 1).

        Returns:
            `(shadow, value_noise)`, float64 `(B, L)` each.
        """
        if self.config.sampler != "shadow":
            return None
        shape, device = tuple(sample.shape), sample.device
        alpha_start = float(self.schedule.alpha(1.0))
        if shadow is None:
            shadow = alpha_start + (1.0 - alpha_start) * sample_shadow(shape, generator, device)
        if value_noise is None:
            value_noise = sample_shadow(shape, generator, device)
        for name, value in (("shadow", shadow), ("value_noise", value_noise)):
            if tuple(value.shape) != shape:
                raise ValueError(f"`{name}` must have the shape of `sample` {shape}, got {tuple(value.shape)}.")
        self._shadow = shadow.to(device=device, dtype=torch.float64)
        self._initially_masked = sample == self.config.mask_token_id
        self._value_noise = value_noise.to(device=device, dtype=torch.float64)
        return self._shadow, self._value_noise

    def step_reveals_tokens(self, timestep: float | torch.Tensor, sample: torch.LongTensor) -> torch.Tensor | None:
        """Whether the step at `timestep` changes each sequence of `sample` (shadow sampler).

        Returns:
            `torch.Tensor` of shape `(B,)` bool, or None when unknown in advance (ancestral sampler, or shadow noise
            not drawn yet). A step that reveals nothing needs no model output: `step` ignores it then.
        """
        if self.config.sampler != "shadow" or self._shadow is None:
            return None
        index = self.index_for_timestep(timestep)
        masked = sample == self.config.mask_token_id
        if index == self.num_inference_steps - 1:
            return masked.any(dim=-1)  # the last step decides every remaining position
        _, alpha_s = self._step_alphas(index)
        if self.config.unmasking == "confidence":
            return self._confidence_count(masked, alpha_s).squeeze(-1) > 0
        return (masked & (self._shadow <= alpha_s)).any(dim=-1)

    def shadow_features(self, timestep: float | torch.Tensor, grid_size: int) -> torch.Tensor:
        """The shadow features a noise-conditioned model reads at `timestep` (shadow sampler, after `init_noise`).

        `mcd_hf.duality.shadow_features` of this sampler's shadows and value noise: per position, the fine-grid
        steps until it is revealed (over `grid_size`) and its value noise. They change with `timestep` even when the
        tokens do not, so a noise-conditioned model's output cannot be reused across steps that reveal tokens.

        Args:
            timestep (`float` or `torch.Tensor`): an element of `self.timesteps`.
            grid_size (`int`): the fine grid the model was trained on (its `config.shadow_grid_size`); a multiple
                of `num_inference_steps`.

        Returns:
            `torch.Tensor` of shape `(B, L, 2)`, float32, on the device of the noise.
        """
        if self.config.sampler != "shadow":
            raise ValueError("a noise-conditioned model reads the shadow sampler's noise: use "
                             "`MaskedDualityScheduler(sampler='shadow')` (e.g. `from_config(config, sampler='shadow')`).")
        if self._shadow is None:
            raise ValueError("call `init_noise` before `shadow_features`: the shadow noise is not drawn yet.")
        index = self.index_for_timestep(timestep)
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size % self.num_inference_steps:
            raise ValueError(f"`grid_size` must be a multiple of num_inference_steps ({self.num_inference_steps}), "
                             f"got {grid_size!r}: the model's fine grid must refine the sampler's.")
        return shadow_features(self._shadow, self._value_noise, self.timesteps[index].item(), self.schedule, grid_size)

    def _confidence_count(self, masked: torch.Tensor, alpha_s: torch.Tensor) -> torch.Tensor:
        # Shadow sampler, confidence order: reveal enough that as many generated (initially masked) positions are
        # visible at s as there are shadows u <= alpha_s among them; (B, 1).
        generated = self._initially_masked
        due = (generated & (self._shadow <= alpha_s)).sum(dim=-1, keepdim=True)
        return (due - (generated & ~masked).sum(dim=-1, keepdim=True)).clamp_min(0)

    # ------------------------------------------------------------------------------------------------------------
    # The step

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.LongTensor,
        *,
        generator: GeneratorLike = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        return_dict: bool = True,
    ) -> MaskedDualitySchedulerOutput | tuple:
        """One step from `z_t` (`sample`) at `timestep` to `z_s`, `s = t - 1/N`.

        Args:
            model_output (`torch.Tensor` of shape `(B, L, vocab_size)`): the model's logits at `sample`.
            timestep (`float` or `torch.Tensor`): an element of `self.timesteps`.
            sample (`torch.LongTensor` of shape `(B, L)`): the current state; mask ids are generated, other tokens
                are kept.
            generator (`torch.Generator` or list of them, *optional*): the ancestral sampler's noise (one per
                sequence when a list); for the shadow sampler, only used if `init_noise` was not called.
            temperature (`float`): divides the SUBS log-probabilities before drawing (> 0).
            top_k (`int`, *optional*): keep the `top_k` most likely tokens.
            top_p (`float`, *optional*): keep the smallest set of most likely tokens with mass >= `top_p`.
            return_dict (`bool`): return a [`MaskedDualitySchedulerOutput`] instead of a tuple.

        Returns:
            [`MaskedDualitySchedulerOutput`] or `(prev_sample, pred_original_sample, pred_logits)`.
        """
        _check_sampling_controls(temperature, top_k, top_p)
        mask_id, vocab_size = self.config.mask_token_id, self.config.vocab_size
        if sample.ndim != 2 or model_output.shape != (*sample.shape, vocab_size):
            raise ValueError(f"`model_output` must have shape (B, L, vocab_size) = {(*sample.shape, vocab_size)} "
                             f"for a (B, L) `sample`, got {tuple(model_output.shape)} and {tuple(sample.shape)}.")
        index = self.index_for_timestep(timestep)
        is_last = index == self.num_inference_steps - 1
        alpha_t, alpha_s = self._step_alphas(index)
        dtype, device, shape = _PRECISIONS[self.config.precision], sample.device, tuple(sample.shape)

        log_probs = subs_log_probs(model_output, sample, mask_id)
        masked = sample == mask_id
        if self.config.sampler == "ancestral":
            reveal_noise = sample_shadow(shape, generator, device).to(dtype)
            value_noise = sample_shadow(shape, generator, device).to(dtype)
            probability = reveal_probability(alpha_t, alpha_s).to(device=device, dtype=dtype)
            reveal = masked & (reveal_noise < probability)
        else:
            if self._shadow is None or tuple(self._shadow.shape) != shape:
                self.init_noise(sample, generator)
            reveal = masked & (self._shadow <= alpha_s)
            value_noise = self._value_noise.to(dtype)

        if self.config.unmasking == "confidence":
            if self.config.sampler == "ancestral":
                count = reveal.sum(dim=-1, keepdim=True)  # binomial(#masked, reveal probability), as ancestral
            else:
                count = self._confidence_count(masked, alpha_s)
            confidence = log_probs.amax(dim=-1).masked_fill(~masked, -math.inf)
            order = torch.argsort(confidence, dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, torch.arange(shape[-1], device=device).expand(shape))
            reveal = masked & (rank < count)

        greedy_tokens = log_probs.argmax(dim=-1)
        left_masked = masked & ~reveal if is_last else torch.zeros_like(masked)
        drawn_positions = reveal | left_masked if self.config.final_step == "sample" else reveal
        tokens = greedy_tokens.clone()
        if bool(drawn_positions.any()):
            rows = apply_sampling_controls(log_probs[drawn_positions].to(dtype), temperature, top_k, top_p)
            tokens[drawn_positions] = inverse_cdf_tokens(rows, value_noise[drawn_positions])

        prev_sample = torch.where(reveal | left_masked, tokens, sample)
        pred_original_sample = torch.where(masked, tokens, sample)
        self._step_index = index + 1

        if not return_dict:
            return prev_sample, pred_original_sample, log_probs
        return MaskedDualitySchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample, pred_logits=log_probs
        )

    # ------------------------------------------------------------------------------------------------------------
    # Training-time corruption

    def add_noise(
        self,
        original_samples: torch.LongTensor,
        timesteps: float | torch.Tensor,
        shadow: torch.Tensor | None = None,
        generator: GeneratorLike = None,
    ) -> torch.LongTensor:
        """Mask clean tokens to time `t`: position masked iff its shadow `u > alpha(t)` (probability `1 - alpha_t`).

        Args:
            original_samples (`torch.LongTensor` of shape `(B, L)`): clean tokens.
            timesteps (`float` or `torch.Tensor`): `t` in [0, 1], a scalar, `(B,)` or `(B, L)`.
            shadow (`torch.Tensor` of shape `(B, L)`, *optional*): uniform shadows; the same shadow at two times
                gives coupled states. Drawn from `generator` when None.
            generator (*optional*): one generator or one per sequence.

        Returns:
            `torch.LongTensor` of shape `(B, L)`.
        """
        if shadow is None:
            shadow = sample_shadow(tuple(original_samples.shape), generator, original_samples.device)
        timesteps = torch.as_tensor(timesteps, dtype=torch.float64).to(original_samples.device)
        alpha = self.schedule.alpha(timesteps)
        return mask_from_shadow(original_samples, shadow, alpha, self.config.mask_token_id)
