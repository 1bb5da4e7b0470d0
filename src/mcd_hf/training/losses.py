"""The MDLM continuous-time NELBO (the teacher's training loss), DESIGN.md section 2.

For clean tokens ``x``, ``t ~ U[eps, 1]`` and ``z_t`` masking each token with probability ``1 - alpha(t)``
(through the latent shadow: masked iff ``u > alpha(t)``), the NELBO per token is

    (1 / L) * sum over positions masked in z_t of  (-alpha'(t) / (1 - alpha(t))) * (-log p_theta(x_i | z_t))

with ``p_theta`` the SUBS parameterization. Only masked positions contribute (SUBS carries visible tokens over with
probability one), so the loss reads SUBS at masked positions, which is :func:`mcd_hf.duality.real_token_log_probs`
(the log-softmax over real tokens, equal to :func:`~mcd_hf.duality.subs_log_probs` there, and never ``-inf`` so no
``0 * inf``). All schedule and masking math comes from :mod:`mcd_hf.duality`.

Reference: Sahoo et al., "Simple and Effective Masked Diffusion Language Models" (NeurIPS 2024), eq. 10, and
``mdlm/diffusion.py`` (antithetic time sampling).
"""

from __future__ import annotations

import torch

from ..duality import NoiseSchedule, mask_from_shadow, real_token_log_probs, sample_shadow

DEFAULT_TIME_EPS = 1e-3


def stratified_uniform(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    antithetic: bool = True,
) -> torch.Tensor:
    """`batch_size` uniforms on [0, 1) (float64, on the generator's device), the one draw behind every training time.

    Antithetic (MDLM's low-discrepancy sampler): one uniform offset `r`, then `u_i = (r + i) / B`, so the batch
    covers [0, 1) evenly while each `u_i` is still marginally uniform; this lowers the loss variance.
    """
    draw_device = generator.device if generator is not None else device  # a generator draws on its own device
    if antithetic:
        offset = torch.rand(1, generator=generator, device=draw_device, dtype=torch.float64)
        return (offset + torch.arange(batch_size, device=draw_device, dtype=torch.float64)) / batch_size
    return torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float64)


def sample_times(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    time_eps: float = DEFAULT_TIME_EPS,
    antithetic: bool = True,
) -> torch.Tensor:
    """Diffusion times `t ~ U[time_eps, 1]` (float64, shape `(batch_size,)`), stratified when `antithetic`."""
    if not 0.0 <= time_eps < 1.0:
        raise ValueError(f"time_eps must be in [0, 1), got {time_eps}")
    uniform = stratified_uniform(batch_size, generator=generator, device=device, antithetic=antithetic)
    t = (1.0 - time_eps) * uniform + time_eps
    return t.to(device) if device is not None else t


def _mask_token_id(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if config is None:
        raise ValueError("mask_token_id is required when the model has no `config`")
    return int(config.mask_token_id)


def mdlm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    mask_token_id: int | None = None,
    time: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    time_eps: float = DEFAULT_TIME_EPS,
    antithetic: bool = True,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MDLM's continuous-time NELBO of ``input_ids`` under ``model``.

    Args:
        model: A denoiser called as ``model(input_ids=z_t, timesteps=sigma_t).logits`` (e.g. ``MaskedDiffusionLM``,
            possibly wrapped by DDP; a model without time conditioning ignores ``timesteps``).
        input_ids: Clean tokens ``(B, L)`` (no mask ids).
        schedule: The masking schedule (:func:`mcd_hf.duality.get_noise_schedule`).
        mask_token_id: The ``[MASK]`` id (default: ``model.config.mask_token_id``).
        time: Fixed diffusion times (a float or ``(B,)``) instead of sampled ones.
        generator: The only randomness used (times, then shadows), so the loss is reproducible from its seed.
        time_eps: Smallest sampled time (MDLM's ``sampling_eps``).
        antithetic: Antithetic time sampling over the batch.
        reduction: ``mean`` (NELBO per token, a scalar), ``sum`` (per sequence, ``(B,)``) or ``none`` (``(B, L)``).

    Returns:
        ``(loss, logs)``: the float32 loss, and detached logs ``nelbo`` (per token, batch mean) and
        ``masked_fraction``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch_size, seq_len), got {tuple(input_ids.shape)}")
    mask_token_id = _mask_token_id(model) if mask_token_id is None else int(mask_token_id)
    batch_size, seq_len = input_ids.shape
    device = input_ids.device
    if time is None:
        t = sample_times(batch_size, generator=generator, device=device, time_eps=time_eps, antithetic=antithetic)
    else:
        t = torch.as_tensor(time, dtype=torch.float64, device=device).expand(batch_size)
    alpha = schedule.alpha(t)
    shadow = sample_shadow((batch_size, seq_len), generator=generator, device=device)
    noisy = mask_from_shadow(input_ids, shadow, alpha, mask_token_id)
    logits = model(input_ids=noisy, timesteps=schedule.noise_level(t).float()).logits

    log_probs = real_token_log_probs(logits, mask_token_id)  # (B, L, V - 1), float32 even under bf16 autocast
    target = input_ids - (input_ids > mask_token_id).long()  # real-token column of each id
    token_log_probs = log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    masked = noisy == mask_token_id
    weight = schedule.nelbo_weight(t).float().unsqueeze(-1)
    per_token = torch.where(masked, -token_log_probs * weight, torch.zeros_like(token_log_probs))

    nelbo = per_token.mean()
    logs = {"nelbo": nelbo.detach(), "masked_fraction": masked.float().mean().detach()}
    if reduction == "mean":
        return nelbo, logs
    if reduction == "sum":
        return per_token.sum(dim=-1), logs
    return per_token, logs


__all__ = ["mdlm_loss", "sample_times", "DEFAULT_TIME_EPS"]
