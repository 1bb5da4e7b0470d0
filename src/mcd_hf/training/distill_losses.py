"""Distillation losses: Masked Consistency Distillation (MCD) and the SDTT baseline.

MCD (DESIGN.md section 4; "Latent Shadows: The Gaussian-Discrete Duality in Masked Diffusion", arXiv 2602.00792):
one latent shadow per position couples the noisy sequences at times ``t`` and ``s = t - dt`` exactly (``z_s`` reveals
a superset of ``z_t``). The student sees ``z_t`` and matches, per position masked in ``z_t``, the frozen teacher's
SUBS distribution on ``z_s`` (a divergence) where the position is still masked, and the token itself (a
cross-entropy, the consistency boundary) where it was revealed between ``t`` and ``s``.

SDTT (Deschenaux & Gulcehre, "Beyond Autoregression: Fast LLMs via Self-Distillation Through Time", ICLR 2025): from
``z_t`` the teacher takes two ancestral steps of ``dt / 2`` by sampling; the student matches in one step the
teacher distribution of each token at the step where it was revealed (the last one for tokens still masked).

All masking comes from `mcd_hf.duality` (``sample_shadow``, ``mask_from_shadow``, ``subs_log_probs``, the noise
schedules): building a coupled pair costs O(B*L) memory, whatever the vocabulary size.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..duality import NoiseSchedule, inverse_cdf_tokens, mask_from_shadow, real_token_log_probs, sample_shadow
from .losses import stratified_uniform

DIVERGENCES = ("kl-bwd", "kl-fwd", "jsd")
COUPLINGS = ("data", "teacher")
METHODS = ("mcd", "sdtt")


@dataclass
class CoupledPair:
    """Two noisy views of the same clean sequences on one shadow (all tensors (B, L)).

    Args:
        shadow: The float64 shadow ``u``; a position is masked at time ``t`` iff ``u > alpha(t)``.
        noisy_t: ``z_t`` (the student's input).
        noisy_s: ``z_s`` (the teacher's input); every token visible in ``z_t`` is visible here.
        masked_t: Positions masked in ``z_t`` (where the loss lives).
        revealed: Masked in ``z_t``, visible in ``z_s``: the shadows in ``(alpha_t, alpha_s]``.
        still_masked: Masked in both.
        value_noise: Uniform float64 noise ``r`` for inverse-CDF draws (teacher coupling, SDTT), else None.
    """

    shadow: torch.Tensor
    noisy_t: torch.LongTensor
    noisy_s: torch.LongTensor
    masked_t: torch.BoolTensor
    revealed: torch.BoolTensor
    still_masked: torch.BoolTensor
    value_noise: torch.Tensor | None = None


def _per_sequence(value: float | torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float64, device=device)
    return value.expand(batch_size).clone() if value.dim() == 0 else value.to(torch.float64)


def coupled_pair(
    input_ids: torch.LongTensor,
    schedule: NoiseSchedule,
    t: float | torch.Tensor,
    s: float | torch.Tensor,
    mask_token_id: int,
    *,
    shadow: torch.Tensor | None = None,
    value_noise: torch.Tensor | None = None,
    with_value_noise: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> CoupledPair:
    """Builds ``z_t`` and ``z_s`` from one shadow: O(B*L) memory, no tensor over the vocabulary.

    Args:
        input_ids: Clean tokens (B, L).
        schedule: The noise schedule giving ``alpha(t)``.
        t: The student's time per sequence, a float or (B,), in [0, 1].
        s: The teacher's time, ``s <= t`` elementwise.
        mask_token_id: The ``[MASK]`` id.
        shadow: A given shadow (B, L) in [0, 1); drawn from ``generator`` when None.
        value_noise: A given value noise (B, L); drawn after the shadow when None and ``with_value_noise``.
        with_value_noise: Also return a uniform value noise ``r`` per position.
        generator: Generator (or one per sequence) for the shadow and the value noise.

    Returns:
        A [`CoupledPair`].
    """
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must be (batch, seq_len), got shape {tuple(input_ids.shape)}.")
    batch_size, device = input_ids.shape[0], input_ids.device
    t = _per_sequence(t, batch_size, device)
    s = _per_sequence(s, batch_size, device)
    if t.shape != (batch_size,) or s.shape != (batch_size,):
        raise ValueError(f"`t` and `s` must be floats or ({batch_size},) tensors, got {tuple(t.shape)}, {tuple(s.shape)}.")
    if bool((s > t).any()) or bool((s < 0).any()) or bool((t > 1).any()):
        raise ValueError("Expected 0 <= s <= t <= 1 for every sequence (`s` is the teacher's, earlier, time).")
    if shadow is None:
        shadow = sample_shadow(input_ids.shape, generator=generator, device=device)
    elif shadow.shape != input_ids.shape:
        raise ValueError(f"`shadow` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(shadow.shape)}.")
    if value_noise is None and with_value_noise:
        value_noise = sample_shadow(input_ids.shape, generator=generator, device=device)
    noisy_t = mask_from_shadow(input_ids, shadow, schedule.alpha(t).to(device), mask_token_id)
    noisy_s = mask_from_shadow(input_ids, shadow, schedule.alpha(s).to(device), mask_token_id)
    masked_t = noisy_t == mask_token_id
    still_masked = noisy_s == mask_token_id
    return CoupledPair(shadow, noisy_t, noisy_s, masked_t, masked_t & ~still_masked, still_masked, value_noise)


def sample_times(
    batch_size: int,
    dt: float,
    *,
    antithetic: bool = True,
    on_grid: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The student's times ``t`` (float64, (B,)), uniform on ``(dt, 1]``.

    Args:
        batch_size: Number of sequences.
        dt: The round's step; ``s = t - dt``.
        antithetic: Stratify the batch (one uniform offset, ``B`` evenly spaced points) to cut the loss variance.
        on_grid: Draw instead from the sampler's times ``{dt, 2 dt, ..., 1}`` (``1 / dt`` must be an integer).
        generator: Source of the draw.
        device: Device of the result.
    """
    if not 0.0 <= dt < 1.0:
        raise ValueError(f"`dt` must be in [0, 1), got {dt}.")
    uniform = stratified_uniform(batch_size, generator=generator, device=device, antithetic=antithetic)
    if on_grid:
        num_steps = round(1.0 / dt) if dt > 0 else 0
        if num_steps < 1 or not math.isclose(num_steps * dt, 1.0, rel_tol=1e-9):
            raise ValueError(f"`on_grid` needs 1 / dt to be an integer, got dt = {dt}.")
        times = (torch.floor(uniform * num_steps) + 1) * dt
    else:
        times = 1.0 - (1.0 - dt) * uniform  # uniform in [0, 1) -> (dt, 1]
    return times.clamp(max=1.0).to(device)


def _column_to_token(column: torch.LongTensor, mask_token_id: int) -> torch.LongTensor:
    """Token id of a column of `real_token_log_probs` (the mask column is dropped, later ids shift down by one)."""
    return column + (column >= mask_token_id).long()


def _token_to_column(token: torch.LongTensor, mask_token_id: int) -> torch.LongTensor:
    return token - (token > mask_token_id).long()


def token_divergence(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-position divergence ``D(p_T || p_S)`` over the last dimension (log-probabilities of the real tokens).

    Args:
        teacher_log_probs: Target log-probabilities (N, K), no gradient needed.
        student_log_probs: Student log-probabilities (N, K).
        divergence: ``kl-bwd`` = KL(student || teacher) (mode seeking, as Duo's DCD and SDTT), ``kl-fwd`` =
            KL(teacher || student), ``jsd`` = Jensen-Shannon divergence (natural log).

    Returns:
        (N,) float32.
    """
    # A floor far below any real log-probability keeps a probability that underflowed to exactly 0 (log = -inf) from
    # making inf - inf or 0 * inf; p * (difference) stays finite because p is 0 there.
    floor = torch.finfo(torch.float32).min / 4
    teacher = teacher_log_probs.float().clamp(min=floor)
    student = student_log_probs.float().clamp(min=floor)
    if divergence == "kl-bwd":
        return (student.exp() * (student - teacher)).sum(-1)
    if divergence == "kl-fwd":
        return (teacher.exp() * (teacher - student)).sum(-1)
    if divergence == "jsd":
        mixture = torch.logaddexp(teacher, student) - math.log(2.0)
        return 0.5 * (teacher.exp() * (teacher - mixture)).sum(-1) + 0.5 * (student.exp() * (student - mixture)).sum(-1)
    raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}.")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Teacher forwards run in eval mode (no dropout); the previous mode is restored (the teacher may be the student)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_mask_token_id(model: nn.Module) -> int:
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if config is None:
        raise ValueError("Pass `mask_token_id`: the model has no `config` to read it from.")
    return config.mask_token_id


def _logits(model: nn.Module, noisy: torch.LongTensor, schedule: NoiseSchedule, times: torch.Tensor) -> torch.Tensor:
    noise_level = schedule.noise_level(times).to(device=noisy.device, dtype=torch.float32)
    return model(input_ids=noisy, timesteps=noise_level).logits


def _prepare(input_ids, schedule, dt, time, generator, antithetic, on_grid, mask_token_id, model):
    mask_token_id = _model_mask_token_id(model) if mask_token_id is None else mask_token_id
    if time is None:
        time = sample_times(input_ids.shape[0], dt, antithetic=antithetic, on_grid=on_grid, generator=_first(generator),
                            device=input_ids.device)
    t = _per_sequence(time, input_ids.shape[0], input_ids.device)
    if bool((t - dt < -1e-12).any()):
        raise ValueError(f"Every `time` must be >= dt ({dt}) so that s = t - dt >= 0.")
    return mask_token_id, t, (t - dt).clamp(min=0.0)


def _first(generator):
    return generator[0] if isinstance(generator, (list, tuple)) else generator


def mcd_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.LongTensor,
    schedule: NoiseSchedule,
    dt: float,
    *,
    divergence: str = "kl-bwd",
    coupling: str = "data",
    time: float | torch.Tensor | None = None,
    shadow: torch.Tensor | None = None,
    value_noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    antithetic: bool = True,
    on_grid: bool = False,
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Masked Consistency Distillation loss of one batch (DESIGN.md section 4).

    Args:
        student: The model being trained; sees ``z_t`` at time ``t`` (with gradient).
        teacher: The frozen teacher; sees ``z_s`` at ``s = t - dt`` under ``torch.no_grad`` in eval mode.
        input_ids: Clean tokens (B, L).
        schedule: The noise schedule (``alpha``, and ``noise_level`` for time-conditioned models).
        dt: The round's step on the sampler's time axis, in [0, 1).
        divergence: ``kl-bwd`` (default), ``kl-fwd`` or ``jsd`` on positions still masked in ``z_s``.
        coupling: ``data``: positions revealed between t and s hold the data's tokens. ``teacher``: they hold the
            teacher's own draw from ``p_T(. | z_t)`` by inverse CDF at the value noise (deterministic given the noise;
            one more teacher forward).
        time: The student's times (float or (B,)); drawn uniform on ``(dt, 1]`` when None.
        shadow: The shadow (B, L); drawn when None.
        value_noise: The value noise for ``coupling="teacher"``; drawn when None.
        generator: Generator for the times, shadow and value noise (a list: one per sequence, the first for times).
        antithetic: Stratified times over the batch.
        on_grid: Times on the sampler's grid ``{dt, ..., 1}`` instead of uniform.
        mask_token_id: The ``[MASK]`` id; read from ``student.config`` when None.

    Returns:
        ``(loss, logs)``: the loss averaged per token masked in ``z_t`` (``loss = boundary + divergence``), and
        detached logs ``boundary``, ``divergence`` (their shares of the loss), ``num_masked``, ``num_revealed``,
        ``num_still_masked``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}.")
    if coupling not in COUPLINGS:
        raise ValueError(f"`coupling` must be one of {COUPLINGS}, got {coupling!r}.")
    mask_token_id, t, s = _prepare(input_ids, schedule, dt, time, generator, antithetic, on_grid, mask_token_id, student)
    pair = coupled_pair(
        input_ids, schedule, t, s, mask_token_id, shadow=shadow, value_noise=value_noise,
        with_value_noise=coupling == "teacher", generator=generator,
    )
    targets = input_ids
    noisy_s = pair.noisy_s
    with torch.no_grad(), _eval_mode(teacher):
        if coupling == "teacher" and bool(pair.revealed.any()):
            # The teacher fills the revealed positions itself, one draw per position from p_T(. | z_t).
            teacher_at_t = real_token_log_probs(_logits(teacher, pair.noisy_t, schedule, t)[pair.revealed], mask_token_id)
            column = inverse_cdf_tokens(teacher_at_t, pair.value_noise[pair.revealed])
            drawn = _column_to_token(column, mask_token_id)
            targets = input_ids.clone()
            targets[pair.revealed] = drawn
            noisy_s = pair.noisy_s.clone()
            noisy_s[pair.revealed] = drawn
        teacher_log_probs = None
        if bool(pair.still_masked.any()):
            teacher_logits = _logits(teacher, noisy_s, schedule, s)
            teacher_log_probs = real_token_log_probs(teacher_logits[pair.still_masked], mask_token_id)
            del teacher_logits

    student_logits = _logits(student, pair.noisy_t, schedule, t)
    student_log_probs = real_token_log_probs(student_logits[pair.masked_t], mask_token_id)
    num_masked = pair.masked_t.sum()
    denominator = num_masked.clamp(min=1).to(student_log_probs.dtype)

    # Rows of student_log_probs follow masked_t in row-major order; pick the revealed / still-masked subsets.
    revealed_rows = pair.revealed[pair.masked_t]
    still_rows = pair.still_masked[pair.masked_t]
    target_columns = _token_to_column(targets[pair.revealed], mask_token_id)
    boundary = -student_log_probs[revealed_rows].gather(-1, target_columns.unsqueeze(-1)).squeeze(-1)
    boundary_part = boundary.sum() / denominator
    if teacher_log_probs is not None:
        divergence_part = token_divergence(teacher_log_probs, student_log_probs[still_rows], divergence).sum() / denominator
    else:
        divergence_part = student_log_probs.sum() * 0.0  # keeps the graph connected (DDP) when nothing is masked
    loss = boundary_part + divergence_part
    logs = {
        "loss": loss.detach(),
        "boundary": boundary_part.detach(),
        "divergence": divergence_part.detach(),
        "num_masked": num_masked.detach(),
        "num_revealed": pair.revealed.sum(),
        "num_still_masked": pair.still_masked.sum(),
    }
    return loss, logs


def sdtt_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.LongTensor,
    schedule: NoiseSchedule,
    dt: float,
    *,
    divergence: str = "kl-bwd",
    time: float | torch.Tensor | None = None,
    shadow: torch.Tensor | None = None,
    value_noise: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    antithetic: bool = True,
    on_grid: bool = False,
    mask_token_id: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SDTT loss of one batch: match two sampled teacher steps of ``dt / 2`` with one student step of ``dt``.

    Which tokens the teacher reveals in its two steps comes from the shadow through ``mask_from_shadow`` at
    ``alpha(t - dt/2)`` and ``alpha(t - dt)``: given ``z_t``, the shadow of a masked position is uniform on
    ``(alpha_t, 1]``, so it is revealed in a step ``t -> s`` with probability ``(alpha_s - alpha_t) / (1 - alpha_t)``,
    exactly the ancestral sampler's law. Revealed values are drawn from the teacher by inverse CDF at uniform value
    noise. Arguments are those of [`mcd_loss`] (no ``coupling``).

    Returns:
        ``(loss, logs)``: the divergence averaged per token masked in ``z_t``, and detached logs ``divergence``,
        ``num_masked``, ``num_revealed`` (by the two teacher steps), ``num_still_masked``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}.")
    mask_token_id, t, s = _prepare(input_ids, schedule, dt, time, generator, antithetic, on_grid, mask_token_id, student)
    middle = (t + s) / 2
    pair = coupled_pair(
        input_ids, schedule, t, middle, mask_token_id, shadow=shadow, value_noise=value_noise, with_value_noise=True,
        generator=generator,
    )
    masked_s = mask_from_shadow(input_ids, pair.shadow, schedule.alpha(s).to(input_ids.device), mask_token_id)
    masked_s = masked_s == mask_token_id
    first_step = pair.revealed  # revealed in t -> middle
    second_step = pair.still_masked & ~masked_s  # revealed in middle -> s
    with torch.no_grad(), _eval_mode(teacher):
        first_log_probs = real_token_log_probs(_logits(teacher, pair.noisy_t, schedule, t)[pair.masked_t], mask_token_id)
        first_rows = first_step[pair.masked_t]
        noisy_middle = pair.noisy_t.clone()
        column = inverse_cdf_tokens(first_log_probs[first_rows], pair.value_noise[first_step])
        noisy_middle[first_step] = _column_to_token(column, mask_token_id)
        second_log_probs = real_token_log_probs(_logits(teacher, noisy_middle, schedule, middle)[pair.masked_t], mask_token_id)
        # Each token's target: the teacher's distribution at the step that revealed it; the last one otherwise.
        targets = torch.where(first_rows.unsqueeze(-1), first_log_probs, second_log_probs)
        del first_log_probs, second_log_probs

    student_logits = _logits(student, pair.noisy_t, schedule, t)
    student_log_probs = real_token_log_probs(student_logits[pair.masked_t], mask_token_id)
    num_masked = pair.masked_t.sum()
    loss = token_divergence(targets, student_log_probs, divergence).sum() / num_masked.clamp(min=1).to(student_log_probs.dtype)
    logs = {
        "loss": loss.detach(),
        "divergence": loss.detach(),
        "num_masked": num_masked.detach(),
        "num_revealed": first_step.sum() + second_step.sum(),
        "num_still_masked": masked_s.sum(),
    }
    return loss, logs


def distillation_loss(method: str, *args, coupling: str = "data", **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dispatch to [`mcd_loss`] (``method="mcd"``) or [`sdtt_loss`] (``method="sdtt"``, coupling must be ``data``)."""
    if method == "mcd":
        return mcd_loss(*args, coupling=coupling, **kwargs)
    if method == "sdtt":
        if coupling != "data":
            raise ValueError(f"`coupling` {coupling!r} applies to method 'mcd' only; SDTT samples its own targets.")
        return sdtt_loss(*args, **kwargs)
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")


__all__ = [
    "COUPLINGS",
    "CoupledPair",
    "DIVERGENCES",
    "METHODS",
    "coupled_pair",
    "distillation_loss",
    "mcd_loss",
    "sample_times",
    "sdtt_loss",
    "token_divergence",
]
