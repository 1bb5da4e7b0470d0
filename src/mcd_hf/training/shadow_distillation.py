"""Shadow-conditioned distillation (``--method shadow``): a few-step student that reads the sampler's noise.

Beyond the paper (issue 10). Students whose output is one independent distribution per token (MCD, SDTT) can only
trade diversity for coherence: tokens revealed in the same step are drawn independently. The shadow sampler
(DESIGN.md section 3) makes sampling a deterministic map from per-position noise, the shadow ``u_i`` (when the token
is revealed) and the value noise ``r_i`` (which token, by inverse CDF in token-id order). A noise-conditioned student
(``MaskedDiffusionLMConfig(noise_conditioning=True)``) reads that noise as input (``duality.shadow_features``: the
fine-grid steps until each reveal, and ``r_i``) and so can coordinate the tokens it reveals together, as consistency
models do in continuous space.

Training is progressive (as SDTT's rounds; Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion
Models", ICLR 2022): in round ``r`` the target model (the frozen previous student; the teacher in round 0) takes two
deterministic shadow-sampler steps of ``h = 2^r`` fine steps from ``z_t``, and the student learns to produce in one
step of ``2h`` what the target produced. The loss is soft: per position, ``D(p_target || p_student)`` with
``p_target`` the target's distribution at the state where it revealed the token (forward KL by default). Its
deterministic end point is the target's token (the same inverse CDF at the same ``r_i``), and it stays consistent
with the inverse-CDF rule where a hard cross-entropy on the drawn tokens does not (the prototype's lesson).

The student starts as the teacher plus a zero-initialised shadow embedding (identical samples), whose layers learn
with a higher learning rate (``--shadow_lr_multiplier``).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..duality import (
    NoiseSchedule,
    inverse_cdf_tokens,
    real_token_log_probs,
    sample_shadow,
    shadow_features,
    shadow_reveal_index,
)
from .distill_losses import DIVERGENCES, _column_to_token, _eval_mode, sample_times, token_divergence
from .distillation import DistillationArguments, DistillationTrainer

__all__ = [
    "ShadowArguments",
    "ShadowDistillationTrainer",
    "ShadowTargets",
    "add_shadow_arguments",
    "make_noise_conditioned_student",
    "shadow_distillation_loss",
    "shadow_targets",
    "shadow_trainer_setup",
]

SHADOW_EMBEDDING_PREFIX = "shadow_embed."


@dataclass
class ShadowArguments:
    """Options of ``--method shadow``.

    Args:
        divergence: ``D(p_target || p_student)`` per position: ``kl-fwd`` (default; KL(target || student), the
            soft loss whose end point is the target's token), ``kl-bwd`` or ``jsd``.
        lr_multiplier: Learning-rate factor of the new shadow-embedding layers (they start at zero and learn slowly).
        still_masked_weight: Weight of positions the target leaves masked after its two steps (their target is its
            last distribution); 0 trains only the positions the student reveals.
        extra_layers: Transformer blocks appended to the student (identity at the start: adaLN-Zero gates), so it
            has depth to combine its neighbours' value noise with their distributions. Each costs a block per call.
    """

    divergence: str = "kl-fwd"
    lr_multiplier: float = 10.0
    still_masked_weight: float = 1.0
    extra_layers: int = 0

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"shadow divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not self.lr_multiplier > 0:
            raise ValueError(f"shadow lr_multiplier must be > 0, got {self.lr_multiplier!r}")
        if not self.still_masked_weight >= 0:
            raise ValueError(f"shadow still_masked_weight must be >= 0, got {self.still_masked_weight!r}")
        if isinstance(self.extra_layers, bool) or not isinstance(self.extra_layers, int) or self.extra_layers < 0:
            raise ValueError(f"shadow extra_layers must be an int >= 0, got {self.extra_layers!r}")


def _config(model: nn.Module):
    return getattr(model, "config", None) or model.module.config  # DDP wraps the model in `.module`


def _new_prefixes(num_layers: int, extra_layers: int) -> tuple[str, ...]:
    """Parameter-name prefixes of the layers a noise-conditioned student adds to its teacher."""
    return (SHADOW_EMBEDDING_PREFIX, *(f"blocks.{index}." for index in range(num_layers - extra_layers, num_layers)))


def make_noise_conditioned_student(teacher: nn.Module, grid_size: int, extra_layers: int = 0) -> nn.Module:
    """A noise-conditioned copy of ``teacher``: its weights plus a zero shadow embedding (same outputs, same samples).

    Args:
        teacher: A ``MaskedDiffusionLM`` (not noise-conditioned).
        grid_size: The fine time grid of the shadow features (the teacher's step count ``T``).
        extra_layers: Blocks appended after the teacher's, with zero adaLN modulation (each is the identity until
            trained).
    """
    config = copy.deepcopy(_config(teacher))
    if config.noise_conditioning:
        raise ValueError("teacher: already noise-conditioned; distil a plain MaskedDiffusionLM")
    config.noise_conditioning = True
    config.shadow_grid_size = int(grid_size)
    config.num_hidden_layers += extra_layers
    config.validate()
    student = type(teacher)(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = _new_prefixes(config.num_hidden_layers, extra_layers)
    if unexpected or any(not key.startswith(new) for key in missing):
        raise ValueError(f"teacher: its weights do not fit the student (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():  # the student must start as the teacher exactly
        for parameter in student.shadow_embed.parameters():
            parameter.zero_()
        for block in student.blocks[len(student.blocks) - extra_layers:]:
            block.adaLN_modulation.weight.zero_()
            block.adaLN_modulation.bias.zero_()
    return student.to(next(teacher.parameters()).device).train(teacher.training)


def _logits(
    model: nn.Module,
    noisy: torch.LongTensor,
    grid_index: torch.LongTensor,
    schedule: NoiseSchedule,
    shadow: torch.Tensor,
    value_noise: torch.Tensor,
    grid_size: int,
) -> torch.Tensor:
    """The model's logits at ``noisy`` at times ``1 - grid_index / grid_size``, with shadow features if it reads them."""
    times = 1.0 - grid_index.double() / grid_size
    noise_level = schedule.noise_level(times).to(device=noisy.device, dtype=torch.float32)
    if not getattr(_config(model), "noise_conditioning", False):
        return model(input_ids=noisy, timesteps=noise_level).logits
    features = shadow_features(shadow, value_noise, times, schedule, grid_size).to(noisy.device)
    return model(input_ids=noisy, timesteps=noise_level, shadow_features=features).logits


@dataclass
class ShadowTargets:
    """What the target model did in its two deterministic steps from ``z_t`` (masks (B, L) bool).

    Args:
        masked: Positions masked in ``z_t`` (where the loss lives).
        first_step: Revealed by the target's first step.
        second_step: Revealed by its second step.
        still_masked: Masked after both.
        log_probs: (number of masked positions, K) float32, rows in row-major order of ``masked``: the target's
            real-token log-probabilities at the state where it revealed the position (first or second step), the
            second step's for positions still masked.
        sample: (B, L) the target's state after the two steps (its drawn tokens at revealed positions).
    """

    masked: torch.BoolTensor
    first_step: torch.BoolTensor
    second_step: torch.BoolTensor
    still_masked: torch.BoolTensor
    log_probs: torch.Tensor
    sample: torch.LongTensor


@torch.no_grad()
def shadow_targets(
    target: nn.Module,
    noisy: torch.LongTensor,
    grid_index: torch.LongTensor,
    half_step: int,
    shadow: torch.Tensor,
    value_noise: torch.Tensor,
    schedule: NoiseSchedule,
    grid_size: int,
    mask_token_id: int,
) -> ShadowTargets:
    """Two shadow-sampler steps of ``half_step`` fine steps each by ``target`` from ``noisy`` (eval mode, no grad).

    The shadow sampler's rule: a position is revealed by the step ending at fine index ``c'`` when its reveal index
    (``duality.shadow_reveal_index``) is ``<= c'``, with value the inverse CDF at its value noise of the target's
    distribution at the step's start state, tokens in id order.

    Args:
        target: The round's frozen target model.
        noisy: ``z_t`` (B, L).
        grid_index: (B,) fine index ``c`` of each sequence's time ``t = 1 - c / grid_size``.
        half_step: Fine steps per target step (``2^r`` in round ``r``).
        shadow, value_noise: (B, L) the noise (float64).
        schedule: The masking schedule.
        grid_size: The fine grid.
        mask_token_id: The ``[MASK]`` id.
    """
    if bool((grid_index + 2 * half_step > grid_size).any()):
        raise ValueError(f"every time needs two steps of {half_step} fine steps before t = 0 (grid {grid_size})")
    reveal_index = shadow_reveal_index(shadow, schedule, grid_size)
    masked = noisy == mask_token_id
    state = noisy
    step_log_probs, step_reveals = [], []
    for step in (1, 2):
        logits = _logits(target, state, grid_index + (step - 1) * half_step, schedule, shadow, value_noise, grid_size)
        log_probs = real_token_log_probs(logits[masked], mask_token_id)
        del logits
        reveal = (state == mask_token_id) & (reveal_index <= (grid_index + step * half_step).unsqueeze(-1))
        columns = inverse_cdf_tokens(log_probs[reveal[masked]], value_noise[reveal])
        state = state.clone()
        state[reveal] = _column_to_token(columns, mask_token_id)
        step_log_probs.append(log_probs)
        step_reveals.append(reveal)
    first_rows = step_reveals[0][masked].unsqueeze(-1)
    return ShadowTargets(
        masked=masked,
        first_step=step_reveals[0],
        second_step=step_reveals[1],
        still_masked=state == mask_token_id,
        log_probs=torch.where(first_rows, step_log_probs[0], step_log_probs[1]),
        sample=state,
    )


def shadow_distillation_loss(
    student: nn.Module,
    target: nn.Module,
    input_ids: torch.LongTensor,
    schedule: NoiseSchedule,
    half_step: int,
    grid_size: int,
    *,
    divergence: str = "kl-fwd",
    still_masked_weight: float = 1.0,
    grid_index: torch.LongTensor | None = None,
    shadow: torch.Tensor | None = None,
    value_noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    antithetic: bool = True,
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The shadow-distillation loss of one batch: one student step of ``2 * half_step`` vs two target steps.

    Args:
        student: The noise-conditioned model being trained; sees ``z_t`` and the shadow features at ``t``.
        target: The round's frozen target (the teacher, or the previous round's student).
        input_ids: Clean tokens (B, L); ``z_t`` masks them with the shadow.
        schedule: The masking schedule.
        half_step: Fine steps per target step (``2^r`` in round ``r``); ``grid_size`` must be a multiple of
            ``2 * half_step``.
        grid_size: The fine grid (the teacher's step count ``T``).
        divergence: ``kl-fwd`` (default), ``kl-bwd`` or ``jsd``, ``D(p_target || p_student)`` per position.
        still_masked_weight: Weight of positions still masked after the target's two steps.
        grid_index: (B,) fine indices ``c`` of the times ``t = 1 - c / grid_size``, multiples of ``2 * half_step``;
            drawn uniformly on the student's grid when None.
        shadow: (B, L) shadows ``u``; drawn uniform on ``(alpha(1), 1)`` as the sampler's when None.
        value_noise: (B, L) value noise ``r``; drawn when None.
        generator: The only source of randomness (times from the first generator of a list).
        antithetic: Stratified times over the batch.
        mask_token_id: The ``[MASK]`` id; read from the student's config when None.

    Returns:
        ``(loss, logs)``: the loss averaged per position masked in ``z_t``, and detached logs ``num_masked``,
        ``num_revealed`` (by the two target steps), ``num_still_masked`` and ``token_agreement`` (fraction of
        revealed positions where the student's own inverse-CDF draw is the target's token).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}.")
    if isinstance(half_step, bool) or not isinstance(half_step, int) or half_step < 1 or grid_size % (2 * half_step):
        raise ValueError(f"`half_step` must be a positive int with grid_size ({grid_size}) a multiple of 2 * half_step, "
                         f"got {half_step!r}.")
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be (batch, seq_len), got shape {tuple(input_ids.shape)}.")
    mask_token_id = _config(student).mask_token_id if mask_token_id is None else mask_token_id
    batch_size, device = input_ids.shape[0], input_ids.device
    student_step = 2 * half_step
    if grid_index is None:
        first = generator[0] if isinstance(generator, (list, tuple)) else generator
        times = sample_times(batch_size, student_step / grid_size, antithetic=antithetic, on_grid=True,
                             generator=first, device=device)
        grid_index = torch.round((1.0 - times) * grid_size).long()
    grid_index = torch.as_tensor(grid_index, device=device).long().expand(batch_size)
    if bool((grid_index % student_step != 0).any()) or bool(((grid_index < 0) | (grid_index >= grid_size)).any()):
        raise ValueError(f"`grid_index` must hold multiples of 2 * half_step = {student_step} in [0, {grid_size}).")
    if shadow is None:
        alpha_start = float(schedule.alpha(1.0))  # the sampler's shadows: every position masked at t = 1
        shadow = alpha_start + (1.0 - alpha_start) * sample_shadow(input_ids.shape, generator, device)
    if value_noise is None:
        value_noise = sample_shadow(input_ids.shape, generator, device)
    for name, value in (("shadow", shadow), ("value_noise", value_noise)):
        if value.shape != input_ids.shape:
            raise ValueError(f"`{name}` must have the shape of `input_ids` {tuple(input_ids.shape)}, "
                             f"got {tuple(value.shape)}.")
    shadow, value_noise = shadow.to(device, torch.float64), value_noise.to(device, torch.float64)

    reveal_index = shadow_reveal_index(shadow, schedule, grid_size)
    noisy = torch.where(reveal_index > grid_index.unsqueeze(-1), torch.full_like(input_ids, mask_token_id), input_ids)
    with _eval_mode(target):
        targets = shadow_targets(target, noisy, grid_index, half_step, shadow, value_noise, schedule, grid_size,
                                 mask_token_id)

    student_logits = _logits(student, noisy, grid_index, schedule, shadow, value_noise, grid_size)
    student_log_probs = real_token_log_probs(student_logits[targets.masked], mask_token_id)
    per_position = token_divergence(targets.log_probs, student_log_probs, divergence)
    still_rows = targets.still_masked[targets.masked]
    weights = torch.where(still_rows, still_masked_weight, 1.0).to(per_position.dtype)
    num_masked = targets.masked.sum()
    loss = (weights * per_position).sum() / num_masked.clamp(min=1).to(per_position.dtype)

    with torch.no_grad():
        revealed = targets.first_step | targets.second_step
        columns = inverse_cdf_tokens(student_log_probs.detach()[revealed[targets.masked]], value_noise[revealed])
        agree = (_column_to_token(columns, mask_token_id) == targets.sample[revealed]).float()
        agreement = agree.mean() if agree.numel() else agree.sum()
    logs = {
        "loss": loss.detach(),
        "num_masked": num_masked.detach(),
        "num_revealed": revealed.sum(),
        "num_still_masked": targets.still_masked.sum(),
        "token_agreement": agreement,
    }
    return loss, logs


class ShadowDistillationTrainer(DistillationTrainer):
    """Progressive shadow distillation of a noise-conditioned student (see the module docstring).

    Round ``r`` (``distill_args.step_size(r) = 2^r / T``) trains one student step of ``2^(r+1)`` fine steps against
    two target steps of ``2^r``; after it the student samples with ``T / 2^(r+1)`` steps, as the other methods. The
    round's target is a frozen copy of the student (raw or EMA) taken at the round start; in round 0 it is the
    student's initial state, i.e. the teacher. Times are always drawn on the student's grid (the shadow features
    count fine steps). Validation and the export sample with the shadow sampler.

    Args:
        model: The noise-conditioned student ([`make_noise_conditioned_student`] of the teacher).
        args, distill_args, train_dataset, eval_dataset: As [`DistillationTrainer`] (``distill_args.method``
            is ``"shadow"``).
        shadow_args: The method's options.
        scheduler: The teacher's scheduler; copied with ``sampler="shadow"``.
        **kwargs: Passed to [`DistillationTrainer`].
    """

    def __init__(self, model, args, distill_args: DistillationArguments, train_dataset, eval_dataset=None, *,
                 shadow_args: ShadowArguments | None = None, scheduler, **kwargs):
        config = _config(model)
        if not config.noise_conditioning or config.shadow_grid_size != distill_args.teacher_steps:
            raise ValueError("model: pass the noise-conditioned student, make_noise_conditioned_student(teacher, "
                             f"grid_size=teacher_steps={distill_args.teacher_steps})")
        scheduler = type(scheduler).from_config(scheduler.config, sampler="shadow")
        super().__init__(model, args, distill_args, train_dataset, eval_dataset, scheduler=scheduler, **kwargs)
        self.shadow_args = shadow_args or ShadowArguments()

    def create_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW as the base trainer, with the new layers (shadow embedding, extra blocks) at ``lr * lr_multiplier``."""
        groups = []
        new_rate = self.args.learning_rate * self.shadow_args.lr_multiplier
        new = _new_prefixes(_config(model).num_hidden_layers, self.shadow_args.extra_layers)
        for is_new, rate in ((False, self.args.learning_rate), (True, new_rate)):
            named = [(name, p) for name, p in model.named_parameters()
                     if p.requires_grad and name.removeprefix("module.").startswith(new) == is_new]
            groups.append({"params": [p for _, p in named if p.ndim >= 2], "weight_decay": self.args.weight_decay,
                           "lr": rate})
            groups.append({"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0, "lr": rate})
        return torch.optim.AdamW(
            [group for group in groups if group["params"]], lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
        )

    def _loss(self, model, input_ids, step, generator):
        distill = self.distill_args
        round_index = distill.round_of(step)
        with self.accelerator.autocast():
            return shadow_distillation_loss(
                model, self.teacher, input_ids, self.schedule, 2**round_index, distill.teacher_steps,
                divergence=self.shadow_args.divergence, still_masked_weight=self.shadow_args.still_masked_weight,
                generator=generator, antithetic=distill.antithetic, mask_token_id=self.mask_token_id,
            )

    def compute_loss(self, batch, step, generator):
        loss, logs = super().compute_loss(batch, step, generator)
        logs["dt"] = 2 * logs["dt"]  # the student's step (the base class logs the round's half step)
        return loss, logs

    def model_card_info(self) -> dict[str, Any]:
        info = super().model_card_info()
        info.update(divergence=self.shadow_args.divergence, shadow_lr_multiplier=self.shadow_args.lr_multiplier,
                    shadow_still_masked_weight=self.shadow_args.still_masked_weight,
                    shadow_grid_size=self.distill_args.teacher_steps, shadow_extra_layers=self.shadow_args.extra_layers,
                    sampler="shadow (noise-conditioned student)")
        return info


def add_shadow_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--method shadow`` flags of the distillation command line."""
    defaults = ShadowArguments()
    group = parser.add_argument_group("shadow method (--method shadow; issue 10)")
    group.add_argument("--shadow_divergence", choices=DIVERGENCES, default=defaults.divergence,
                       help="D(p_target || p_student) of --method shadow (replaces --divergence there)")
    group.add_argument("--shadow_lr_multiplier", type=float, default=defaults.lr_multiplier,
                       help="learning-rate factor of the new shadow-embedding layers")
    group.add_argument("--shadow_still_masked_weight", type=float, default=defaults.still_masked_weight,
                       help="loss weight of positions the target leaves masked")
    group.add_argument("--shadow_extra_layers", type=int, default=defaults.extra_layers,
                       help="blocks appended to the student (identity at the start; each costs one block per call)")


def shadow_trainer_setup(model: nn.Module, args: argparse.Namespace, distill_args: DistillationArguments):
    """``--method shadow`` in ``distillation.distill``: the student, the trainer class and its extra arguments."""
    shadow_args = ShadowArguments(divergence=args.shadow_divergence, lr_multiplier=args.shadow_lr_multiplier,
                                  still_masked_weight=args.shadow_still_masked_weight,
                                  extra_layers=args.shadow_extra_layers)
    student = make_noise_conditioned_student(model, grid_size=distill_args.teacher_steps,
                                             extra_layers=shadow_args.extra_layers)
    return student, ShadowDistillationTrainer, {"shadow_args": shadow_args}
