"""The Gaussian-discrete duality of masked diffusion: keep probabilities, schedules, latent shadows, SUBS.

Reference: "Latent Shadows: The Gaussian-Discrete Duality in Masked Diffusion" (arXiv 2602.00792), as
reconstructed in the project's DESIGN.md, sections 1 and 3. This module is the only place where this math lives;
training, distillation, the scheduler and the pipeline call it.

Notation: `K` real tokens `0..K-1` (the `vocab_size` argument of this module: real tokens only, the `[MASK]` id
excluded), a `[MASK]` id `m`, a clean token `x`. A variance-preserving Gaussian latent `w = a e_x + s eps`
(`a^2 + s^2 = 1`, signal-to-noise ratio `rho = a / s`) projects to `x` while `argmax(w) == x` and to `m` otherwise.
The token stays visible with probability

    A_K(rho) = integral phi(u - rho) Phi(u)^(K-1) du = P(D < rho),   D = max_{j != x} eps_j - eps_x,

so the projected process is a masked diffusion with keep probability `alpha_t = A_K(rho_t)`. The scalar `D` (or
`u = A_K(D)`, uniform on (0, 1)) is the position's *latent shadow*: it fixes the whole masking path, costs O(1)
memory per position, and two calls of `mask_from_shadow` with the same shadow give exactly coupled states.

All math is float64. `A_K` is computed once per `K` by quadrature, tabulated, and interpolated (never integrated
per call).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import log_ndtr

__all__ = [
    "NOISE_SCHEDULES",
    "NoiseSchedule",
    "get_noise_schedule",
    "inverse_cdf_tokens",
    "inverse_keep_probability",
    "keep_probability",
    "keep_probability_derivative",
    "mask_from_shadow",
    "project_gaussian_latent",
    "real_token_log_probs",
    "reveal_probability",
    "sample_gaussian_latent",
    "sample_shadow",
    "sample_threshold_shadow",
    "shadow_features",
    "shadow_reveal_index",
    "subs_log_probs",
    "threshold_to_uniform",
]

GeneratorLike = torch.Generator | list[torch.Generator] | None

# ---------------------------------------------------------------------------------------------------------------------
# A_K: quadrature table and interpolation

# The table is on a uniform grid in rho, not in log-SNR: A_K is analytic in rho across 0, the threshold form needs
# negative rho (D < 0 is common for small K), and log-SNR would spend points where A_K is flat. Cubic Hermite
# interpolation with exact derivatives (also by quadrature) has error <= h^4 max|A''''| / 384 ~ 1e-9 at h = 1/40.
_GRID_STEP = 1.0 / 40.0
# Below -14, A_K < P(eps_1 - eps_0 < -14) ~ 1e-23 for every K >= 2 (D is at least one difference of two normals).
_RHO_MIN = -14.0
# Quadrature over e = u - rho in [-10, 10] (phi(10) ~ 8e-23), trapezoid step 0.01: the integrand is entire and
# decays like a Gaussian, so the trapezoid rule converges geometrically (error far below 1e-12).
_QUAD_HALF_WIDTH = 10.0
_QUAD_STEP = 0.01


def _rho_max(vocab_size: int) -> float:
    # P(D > r) <= P(M > r/2) + P(-eps_x > r/2) <= K * Q(r/2); K * Q(x) < 1e-18 once x^2/2 > log K + 41.5.
    return 2.0 * math.sqrt(2.0 * (math.log(vocab_size) + 41.5)) + 1.0


@dataclass(frozen=True)
class _KeepTable:
    rho_min: float
    step: float
    # Columns on the grid rho_min + i * step (float64, CPU): A, A', A'', A''', A - 1. The last one, computed
    # directly (not as A - 1), keeps 1 - A exact to relative precision in the upper tail, so that the interpolant
    # is monotone to the last bit near 1. Segments from node `upper_start` on use it; there A is stored as
    # 1 + (A - 1), so both interpolants agree at the switch node.
    values: torch.Tensor
    upper_start: int


def _check_vocab_size(vocab_size: int) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 2:
        raise ValueError(f"`vocab_size` must be an integer >= 2 (number of real tokens), got {vocab_size!r}.")
    return int(vocab_size)


@functools.lru_cache(maxsize=32)
def _keep_table(vocab_size: int) -> _KeepTable:
    """A_K and its first three derivatives on a uniform rho grid, by one trapezoid quadrature per grid point.

    With F(u) = Phi(u)^(K-1) (the CDF of the max of K-1 normals) and e = u - rho,
    A = E[F(rho + e)], A' = E[e F], A'' = E[(e^2 - 1) F], A''' = E[(e^3 - 3e) F], A - 1 = -E[1 - F]
    (e ~ N(0, 1)), the derivatives being those of phi(u - rho) in rho (Hermite polynomials).
    """
    rho_max = _rho_max(vocab_size)
    num_points = int(math.ceil((rho_max - _RHO_MIN) / _GRID_STEP)) + 1
    rho = _RHO_MIN + _GRID_STEP * np.arange(num_points, dtype=np.float64)
    e = np.arange(-_QUAD_HALF_WIDTH, _QUAD_HALF_WIDTH + _QUAD_STEP / 2, _QUAD_STEP, dtype=np.float64)
    weights = np.exp(-0.5 * e**2)
    weights /= weights.sum()  # trapezoid weights of the normal pdf (end points are ~1e-22, negligible)
    moments = np.stack([np.ones_like(e), e, e**2 - 1.0, e**3 - 3.0 * e]) * weights  # (4, Q)
    columns = np.empty((num_points, 5), dtype=np.float64)
    complement = np.empty((num_points, 4), dtype=np.float64)
    for start in range(0, num_points, 256):  # chunks keep the (rho, e) matrix small
        log_cdf_of_max = (vocab_size - 1) * log_ndtr(rho[start : start + 256, None] + e[None, :])
        columns[start : start + 256, :4] = np.exp(log_cdf_of_max) @ moments.T
        # The same moments of F - 1 (the derivative weights sum to 0): exact to relative precision where F ~ 1.
        complement[start : start + 256] = np.expm1(log_cdf_of_max) @ moments.T
    columns[:, 4] = complement[:, 0]
    upper_start = int(np.argmax(columns[:, 0] >= 0.5))
    columns[upper_start:, 1:4] = complement[upper_start:, 1:4]
    columns[upper_start:, 0] = 1.0 + columns[upper_start:, 4]
    # The true values at the ends are within 1e-18 of these; exact ends make A = 0 and 1 exact beyond the grid.
    columns[0], columns[-1] = (0.0, 0.0, 0.0, 0.0, -1.0), (1.0, 0.0, 0.0, 0.0, 0.0)
    return _KeepTable(rho_min=_RHO_MIN, step=_GRID_STEP, values=torch.from_numpy(columns), upper_start=upper_start)


@functools.lru_cache(maxsize=64)
def _keep_table_on(vocab_size: int, device: torch.device) -> torch.Tensor:
    return _keep_table(vocab_size).values.to(device)


def _as_float64(value, device=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype=torch.float64, device=device if device is not None else value.device)
    return torch.as_tensor(value, dtype=torch.float64, device=device)


def _cubic(t, y0, y1, d0, d1, derivative: bool = False) -> torch.Tensor:
    """Cubic Hermite segment on t in [0, 1] (d0, d1: end slopes times the grid step), or its t-derivative."""
    t2, t3 = t * t, t * t * t
    if derivative:
        return (6 * t2 - 6 * t) * y0 + (3 * t2 - 4 * t + 1) * d0 + (-6 * t2 + 6 * t) * y1 + (3 * t2 - 2 * t) * d1
    return (2 * t3 - 3 * t2 + 1) * y0 + (t3 - 2 * t2 + t) * d0 + (-2 * t3 + 3 * t2) * y1 + (t3 - t2) * d1


def _table_segment(rho: torch.Tensor, vocab_size: int):
    """The table of A_K, its rows on `rho`'s device, and each `rho`'s segment index and offset `t` in [0, 1]."""
    table = _keep_table(vocab_size)
    values = _keep_table_on(vocab_size, rho.device)
    num_points = values.shape[0]
    position = (torch.nan_to_num(rho, nan=0.0).clamp(table.rho_min, table.rho_min + (num_points - 1) * table.step)
                - table.rho_min) / table.step
    index = position.floor().long().clamp(0, num_points - 2)
    return table, values, index, position - index


def _hermite(rho: torch.Tensor, vocab_size: int, order: int) -> torch.Tensor:
    """Cubic Hermite interpolation of A_K (order 0) or A_K' (order 1) from the value and slope columns."""
    table, values, index, t = _table_segment(rho, vocab_size)
    d0, d1 = values[index, order + 1] * table.step, values[index + 1, order + 1] * table.step
    result = _cubic(t, values[index, order], values[index + 1, order], d0, d1)
    if order == 0:  # upper segments: 1 + interpolated (A - 1), exact near 1
        upper = 1.0 + _cubic(t, values[index, 4], values[index + 1, 4], d0, d1)
        result = torch.where(index >= table.upper_start, upper, result)
    return torch.where(torch.isnan(rho), rho, result)


def keep_probability(rho: float | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Keep probability `A_K(rho)`: the chance that a token's Gaussian latent at SNR `rho` still has its argmax on it.

    Args:
        rho (`float` or `torch.Tensor`): signal-to-noise ratio `a / s`, any shape. Defined for every real value
            (`rho = +inf` gives 1; negative values, used by the threshold form, give less than `1 / K`).
        vocab_size (`int`): number of real tokens `K` (>= 2).

    Returns:
        `torch.Tensor` (float64, same shape and device as `rho`): `A_K(rho)`, interpolated from a table built once
        per `K`; absolute error below 1e-8, nondecreasing in `rho`.
    """
    vocab_size = _check_vocab_size(vocab_size)
    rho = _as_float64(rho)
    return _hermite(rho, vocab_size, order=0).clamp(0.0, 1.0)


def keep_probability_derivative(rho: float | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`dA_K / drho` (float64, same shape as `rho`), from the same table; 0 at `rho = +-inf`."""
    vocab_size = _check_vocab_size(vocab_size)
    rho = _as_float64(rho)
    result = _hermite(rho, vocab_size, order=1).clamp_min(0.0)
    return torch.where(torch.isinf(rho), torch.zeros_like(result), result)


def _mask_probability(rho: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`1 - A_K(rho)` with full relative precision in the upper tail (from the complement column)."""
    table, values, index, t = _table_segment(rho, vocab_size)
    d0, d1 = values[index, 1] * table.step, values[index + 1, 1] * table.step
    lower = 1.0 - _cubic(t, values[index, 0], values[index + 1, 0], d0, d1)
    upper = -_cubic(t, values[index, 4], values[index + 1, 4], d0, d1)
    result = torch.where(index >= table.upper_start, upper, lower).clamp(0.0, 1.0)
    return torch.where(torch.isnan(rho), rho, result)


def _inverse_keep_probability(alpha: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of the interpolated A_K on (0, 1), exact to float64 round-off (no range check)."""
    table = _keep_table(vocab_size)
    values = _keep_table_on(vocab_size, alpha.device)
    num_points = values.shape[0]
    # From the switch node on, solve (A - 1)(rho) = alpha - 1 (exact for alpha >= 1/2) on the complement column.
    upper = alpha >= values[table.upper_start, 0]
    column = torch.where(upper, 4, 0)
    target = torch.where(upper, alpha - 1.0, alpha)
    lower_index = torch.searchsorted(values[:, 0].contiguous(), alpha.contiguous()) - 1
    upper_index = torch.searchsorted(values[:, 4].contiguous(), target.contiguous()) - 1
    index = torch.where(upper, upper_index, lower_index).clamp(0, num_points - 2)
    y0, y1 = values[index, column], values[index + 1, column]
    d0, d1 = values[index, 1] * table.step, values[index + 1, 1] * table.step
    # Safeguarded Newton on the segment's cubic: bisection whenever Newton leaves the bracket.
    low, high = torch.zeros_like(alpha), torch.ones_like(alpha)
    t = ((target - y0) / (y1 - y0)).clamp(0.0, 1.0).nan_to_num(0.5)
    for _ in range(40):
        value, slope = _cubic(t, y0, y1, d0, d1), _cubic(t, y0, y1, d0, d1, derivative=True)
        too_high = value > target
        high = torch.where(too_high, t, high)
        low = torch.where(too_high, low, t)
        newton = t - (value - target) / slope
        inside = (newton > low) & (newton < high) & (slope > 0)
        t = torch.where(inside, newton, 0.5 * (low + high))
    return table.rho_min + (index + t) * table.step


def inverse_keep_probability(alpha: float | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The shadow SNR of a masked keep probability: `rho` with `A_K(rho) = alpha`.

    Args:
        alpha (`float` or `torch.Tensor`): keep probabilities in the open interval `(1/K, 1)`.
        vocab_size (`int`): number of real tokens `K`.

    Returns:
        `torch.Tensor` (float64, same shape as `alpha`): `rho > 0`, the exact inverse of `keep_probability`.

    Raises:
        ValueError: if some `alpha` is outside `(1/K, 1)` (no Gaussian shadow with `rho > 0` exists there).
    """
    vocab_size = _check_vocab_size(vocab_size)
    alpha = _as_float64(alpha)
    if not bool(((alpha > 1.0 / vocab_size) & (alpha < 1.0)).all()):
        raise ValueError(f"`alpha` must lie in (1/K, 1) = ({1.0 / vocab_size}, 1) for vocab_size={vocab_size}.")
    return _inverse_keep_probability(alpha, vocab_size)


# ---------------------------------------------------------------------------------------------------------------------
# Noise schedules

NOISE_SCHEDULES = ("loglinear", "linear", "cosine", "gaussian_cosine", "gaussian_linear_logsnr")
_GAUSSIAN_SCHEDULES = ("gaussian_cosine", "gaussian_linear_logsnr")


class NoiseSchedule:
    r"""A masking schedule `alpha(t)` on `t in [0, 1]` (the one schedule implementation of the package).

    Masked-space schedules (`alpha(0) = 1`, `alpha(1) = eps`; the MDLM noise schedules):
    - `loglinear`: `alpha = 1 - (1 - eps) t` (MDLM's default; `sigma = -log alpha` is the log of a linear function);
    - `linear`: `sigma = -log(eps) t`, i.e. `alpha = eps^t` (MDLM's `LinearNoise`: total noise linear in `t`);
    - `cosine`: `alpha = eps + (1 - eps) cos(pi t / 2)` (MDLM's `CosineNoise`).

    Gaussian-space schedules, whose masked keep probability is `alpha = A_K(rho_t)` (they need `vocab_size`):
    - `gaussian_cosine`: variance-preserving cosine, `a = cos(pi t / 2)`, `s = sin(pi t / 2)`, `rho = cot(pi t / 2)`;
      `alpha(0) = 1`, `alpha(1) = 1/K` (`eps` unused);
    - `gaussian_linear_logsnr`: log-SNR `log rho^2` linear in `t`, between the values where `alpha = 1 - eps` (at
      `t = 0`) and `alpha = 1/K + eps (1 - 1/K)` (at `t = 1`). Here `alpha(0) < 1`: a sampler ending at `t = 0` may
      leave tokens masked (the scheduler's `final_step` decides them).

    Every method takes `t` as a float or tensor in [0, 1] and returns a float64 tensor of the same shape.

    Args:
        name (`str`): one of `NOISE_SCHEDULES`.
        vocab_size (`int`, *optional*): number of real tokens `K`; required by the Gaussian schedules and by
            `rho`/`snr` of every schedule.
        eps (`float`, defaults to 1e-3): the schedule's floor, in (0, 1).
    """

    def __init__(self, name: str = "loglinear", vocab_size: int | None = None, eps: float = 1e-3):
        if name not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {name!r}.")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"`eps` must lie in (0, 1), got {eps!r}.")
        if vocab_size is not None:
            vocab_size = _check_vocab_size(vocab_size)
        elif name in _GAUSSIAN_SCHEDULES:
            raise ValueError(f"`vocab_size` (number of real tokens) is required by the {name!r} schedule.")
        self.name, self.vocab_size, self.eps = name, vocab_size, float(eps)
        if name == "gaussian_linear_logsnr":
            low_alpha = 1.0 / vocab_size + eps * (1.0 - 1.0 / vocab_size)
            rho_pair = _inverse_keep_probability(torch.tensor([1.0 - eps, low_alpha], dtype=torch.float64), vocab_size)
            self.logsnr_max, self.logsnr_min = (2.0 * torch.log(rho_pair)).tolist()

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, vocab_size={self.vocab_size}, eps={self.eps})"

    @staticmethod
    def _time(t: float | torch.Tensor) -> torch.Tensor:
        t = _as_float64(t)
        if not bool(((t >= 0.0) & (t <= 1.0)).all()):
            raise ValueError("`t` must lie in [0, 1].")
        return t

    def _gaussian_rho(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rho, drho/dt) of a Gaussian schedule."""
        if self.name == "gaussian_cosine":
            angle = 0.5 * math.pi * t
            rho = torch.cos(angle) / torch.sin(angle)  # +inf at t = 0
            return rho, -0.5 * math.pi / torch.sin(angle) ** 2
        logsnr = self.logsnr_max + (self.logsnr_min - self.logsnr_max) * t
        rho = torch.exp(0.5 * logsnr)
        return rho, 0.5 * rho * (self.logsnr_min - self.logsnr_max)

    def alpha(self, t: float | torch.Tensor) -> torch.Tensor:
        """Keep probability `alpha(t)` (decreasing in `t`)."""
        t = self._time(t)
        if self.name == "loglinear":
            return 1.0 - (1.0 - self.eps) * t
        if self.name == "linear":
            return torch.exp(math.log(self.eps) * t)
        if self.name == "cosine":
            return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)
        return keep_probability(self._gaussian_rho(t)[0], self.vocab_size)

    def alpha_derivative(self, t: float | torch.Tensor) -> torch.Tensor:
        """`d alpha / dt` (<= 0)."""
        t = self._time(t)
        if self.name == "loglinear":
            return torch.full_like(t, -(1.0 - self.eps))
        if self.name == "linear":
            return math.log(self.eps) * torch.exp(math.log(self.eps) * t)
        if self.name == "cosine":
            return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
        rho, rho_derivative = self._gaussian_rho(t)
        derivative = keep_probability_derivative(rho, self.vocab_size) * rho_derivative
        return torch.where(torch.isinf(rho), torch.zeros_like(derivative), derivative)  # 0 * inf at t = 0

    def mask_probability(self, t: float | torch.Tensor) -> torch.Tensor:
        """`1 - alpha(t)`, exact to relative precision where it is tiny (Gaussian schedules near `t = 0`)."""
        t = self._time(t)
        if self.name in _GAUSSIAN_SCHEDULES:
            return _mask_probability(self._gaussian_rho(t)[0], self.vocab_size)
        if self.name == "linear":
            return -torch.expm1(math.log(self.eps) * t)
        return 1.0 - self.alpha(t)

    def nelbo_weight(self, t: float | torch.Tensor) -> torch.Tensor:
        """MDLM's continuous-time NELBO weight `-alpha'(t) / (1 - alpha(t))` (`1/t`-like).

        +inf where `alpha = 1` and `alpha' < 0`; 0 where both vanish in float64 (no token can be masked there).
        """
        masked = self.mask_probability(t)
        rate = -self.alpha_derivative(t)
        weight = rate / masked
        return torch.where((masked == 0) & (rate == 0), torch.zeros_like(weight), weight)

    def noise_level(self, t: float | torch.Tensor) -> torch.Tensor:
        """MDLM's total noise `sigma(t) = -log alpha(t)`: the `timesteps` a time-conditioned model receives."""
        t = self._time(t)
        if self.name == "loglinear":
            return -torch.log1p(-(1.0 - self.eps) * t)
        if self.name == "linear":
            return -math.log(self.eps) * t
        return -torch.log1p(-self.mask_probability(t))

    def rho(self, t: float | torch.Tensor) -> torch.Tensor:
        """Shadow signal-to-noise ratio `rho_t` with `A_K(rho_t) = alpha(t)` (+inf where `alpha = 1`).

        Where a masked schedule goes below `1/K` (e.g. `loglinear` near `t = 1` for small `K`), `rho_t` is negative:
        the signal is reversed, and the threshold form (`visible iff rho_t > D`) still gives exactly `alpha(t)`.
        """
        t = self._time(t)
        if self.vocab_size is None:
            raise ValueError(f"`vocab_size` is required for the shadow SNR of the {self.name!r} schedule.")
        if self.name in _GAUSSIAN_SCHEDULES:
            return self._gaussian_rho(t)[0]
        alpha = self.alpha(t)
        rho = _inverse_keep_probability(alpha.clamp(1e-300, 1.0 - 1e-16), self.vocab_size)
        rho = torch.where(alpha <= 0.0, torch.full_like(rho, -math.inf), rho)
        return torch.where(alpha >= 1.0, torch.full_like(rho, math.inf), rho)

    def snr(self, t: float | torch.Tensor) -> torch.Tensor:
        """Shadow signal-to-noise ratio in power, `rho_t ** 2 = a_t^2 / s_t^2`."""
        return self.rho(t) ** 2


def get_noise_schedule(name: str = "loglinear", vocab_size: int | None = None, eps: float = 1e-3) -> NoiseSchedule:
    """Build a [`NoiseSchedule`] by name (see its docstring for the formulas)."""
    return NoiseSchedule(name, vocab_size=vocab_size, eps=eps)


def reveal_probability(alpha_t: float | torch.Tensor, alpha_s: float | torch.Tensor) -> torch.Tensor:
    """Chance that a token masked at time `t` is visible at `s < t`: `(alpha_s - alpha_t) / (1 - alpha_t)` (float64).

    Where `alpha_t = 1` (nothing can be masked) the result is 1.
    """
    alpha_t, alpha_s = _as_float64(alpha_t), _as_float64(alpha_s)
    masked = 1.0 - alpha_t
    probability = (alpha_s - alpha_t) / torch.where(masked > 0, masked, torch.ones_like(masked))
    return torch.where(masked > 0, probability, torch.ones_like(probability)).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Latent shadows


def _draw(kind: str, shape: tuple[int, ...], generator: GeneratorLike, device) -> torch.Tensor:
    """float64 uniform [0, 1) ("rand") or normal ("randn") noise; a list of generators gives one per row."""
    shape = tuple(int(size) for size in shape)
    function = torch.rand if kind == "rand" else torch.randn
    if isinstance(generator, (list, tuple)):
        if len(shape) == 0 or len(generator) != shape[0]:
            raise ValueError(f"`generator` is a list of {len(generator)} generators but the batch size is "
                             f"{shape[0] if shape else None}: give one generator per sequence.")
        if device is None:
            device = generator[0].device if generator else "cpu"
        rows = [function(shape[1:], generator=g, device=g.device, dtype=torch.float64).to(device) for g in generator]
        return torch.stack(rows) if rows else torch.empty(shape, dtype=torch.float64, device=device)
    if generator is not None:
        noise = function(shape, generator=generator, device=generator.device, dtype=torch.float64)
        return noise.to(device) if device is not None else noise
    return function(shape, device=device, dtype=torch.float64)


def sample_shadow(shape: tuple[int, ...], generator: GeneratorLike = None, device=None) -> torch.Tensor:
    """Uniform latent shadows `u ~ U[0, 1)` (float64): position masked at time `t` iff `u > alpha(t)`.

    Args:
        shape (`tuple`): e.g. `(batch_size, seq_len)`.
        generator (`torch.Generator` or list of them, *optional*): a list gives one generator per row of
            `shape[0]`, so each sequence's shadow depends only on its own generator.
        device (*optional*): output device (noise is drawn on the generator's device, then moved).
    """
    return _draw("rand", shape, generator, device)


def sample_threshold_shadow(
    shape: tuple[int, ...], vocab_size: int, generator: GeneratorLike = None, device=None
) -> torch.Tensor:
    """Threshold shadows `D = max_{j != x} eps_j - eps_x` in O(1) per position, without K Gaussians (float64).

    The max `M` of `K - 1` standard normals is `Phi^{-1}(U^(1/(K-1)))`, computed as `-ndtri(-expm1(log U / (K-1)))`
    so that it stays exact for huge `K`; `D = M - eps_x`. A token is visible at SNR `rho` iff `rho > D`.
    Noise order: all `U`, then all `eps_x` (per row, from that row's generator when a list is given).
    """
    vocab_size = _check_vocab_size(vocab_size)
    # Shift [0, 1) to (0, 1) by half an ulp of the 2^-53 lattice so log(U) is finite.
    uniform = sample_shadow(shape, generator, device) + 2.0**-54
    normal = _draw("randn", shape, generator, device)
    maximum = -torch.special.ndtri(-torch.expm1(torch.log(uniform) / (vocab_size - 1)))
    return maximum - normal


def threshold_to_uniform(threshold: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Map a threshold shadow `D` to the uniform shadow `u = A_K(D)` (same masking path: `rho > D` iff `alpha > u`)."""
    return keep_probability(threshold, vocab_size)


def _signal_noise(rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a = rho / sqrt(1 + rho^2), s = 1 / sqrt(1 + rho^2), written so that rho = 0 and rho = inf are exact.
    inverse = 1.0 / rho
    signal = torch.rsqrt(1.0 + inverse * inverse)
    return signal, torch.rsqrt(1.0 + rho * rho)


def sample_gaussian_latent(
    x: torch.Tensor,
    rho: float | torch.Tensor,
    vocab_size: int,
    generator: GeneratorLike = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The explicit K-dimensional Gaussian latent `w = a e_x + s eps` (float64, shape `x.shape + (K,)`).

    For tests and documentation with small `K` (it allocates `x.numel() * K` numbers; use the shadows otherwise).

    Args:
        x (`torch.LongTensor`): clean real tokens in `[0, K)`.
        rho (`float` or `torch.Tensor`): SNR, broadcastable to `x` (a `(B,)` tensor is taken per row).
        vocab_size (`int`): `K`.
        generator (*optional*): noise source, one per row when a list.
        noise (`torch.Tensor`, *optional*): `eps` of shape `x.shape + (K,)`; pass the same noise at several `rho`
            for a coupled trajectory.
    """
    vocab_size = _check_vocab_size(vocab_size)
    if bool(((x < 0) | (x >= vocab_size)).any()):
        raise ValueError(f"`x` must hold real tokens in [0, {vocab_size}).")
    rho = _per_row(_as_float64(rho, x.device), x)
    if noise is None:
        noise = _draw("randn", (*x.shape, vocab_size), generator, x.device)
    signal, scale = _signal_noise(rho)
    one_hot = torch.nn.functional.one_hot(x, vocab_size).to(torch.float64)
    return signal.unsqueeze(-1) * one_hot + scale.unsqueeze(-1) * noise


def project_gaussian_latent(w: torch.Tensor, x: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Maximum-value index preservation: `z = x` where `argmax(w) == x`, else `mask_token_id`."""
    return torch.where(w.argmax(dim=-1) == x, x, torch.full_like(x, mask_token_id))


def _per_row(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar, per-row `(B,)` or full tensor against `x` of shape `(B, ...)`."""
    if value.ndim == 1 and x.ndim >= 2 and value.shape[0] == x.shape[0]:
        value = value.reshape(value.shape[0], *([1] * (x.ndim - 1)))
    try:
        torch.broadcast_shapes(value.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"shape {tuple(value.shape)} does not broadcast against the tokens' {tuple(x.shape)}: "
                         "expected a scalar, one value per sequence (B,), or one per position.") from None
    return value


def mask_from_shadow(
    x: torch.Tensor, shadow: torch.Tensor, alpha: float | torch.Tensor, mask_token_id: int
) -> torch.Tensor:
    """The masked state `z_t` of clean tokens `x` with uniform shadow `u`: masked iff `u > alpha_t`.

    Two calls with the same shadow and `alpha_s >= alpha_t` give coupled states: every token visible in `z_t` is
    visible in `z_s`. Memory is O(B*L).

    Args:
        x (`torch.LongTensor` of shape `(B, L)`): clean tokens.
        shadow (`torch.Tensor` of shape `(B, L)`): uniform shadows (`sample_shadow`, or
            `threshold_to_uniform(D)`).
        alpha (`float` or `torch.Tensor`): keep probability, a scalar, `(B,)` per sequence or `(B, L)`.
        mask_token_id (`int`): the `[MASK]` id.

    Returns:
        `torch.LongTensor` of shape `(B, L)`.
    """
    if shadow.shape != x.shape:
        raise ValueError(f"`shadow` must have the shape of `x` {tuple(x.shape)}, got {tuple(shadow.shape)}.")
    try:
        alpha = _per_row(_as_float64(alpha, x.device), x)
    except ValueError as error:
        raise ValueError(f"`alpha`: {error}") from None
    return torch.where(shadow > alpha, torch.full_like(x, mask_token_id), x)


# ---------------------------------------------------------------------------------------------------------------------
# Shadow features: the noise as an input of a noise-conditioned student (issue 10)


def _grid_index(t: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Index `c` of times `t = 1 - c / grid_size` on the fine grid; ValueError for a time off the grid."""
    index = torch.round((1.0 - t) * grid_size)
    if bool(((index - (1.0 - t) * grid_size).abs() > 1e-6).any()) or bool(((index < 0) | (index > grid_size)).any()):
        raise ValueError(f"`t` must lie on the fine grid {{1 - c / {grid_size}}}, c = 0..{grid_size}.")
    return index.long()


def shadow_reveal_index(shadow: torch.Tensor, schedule: NoiseSchedule, grid_size: int) -> torch.Tensor:
    """The fine-grid index at which the shadow sampler reveals each position: the first `m` with `alpha(g_m) >= u`.

    The fine grid is `g_m = 1 - m / grid_size`, `m = 0..grid_size` (the shadow sampler's time grid at
    `grid_size` steps, and a refinement of its grid at every step count dividing `grid_size`). A position with
    `u > alpha(0)` (possible only when `alpha(0) < 1`) is decided by the last step: index `grid_size`.

    Args:
        shadow (`torch.Tensor`): uniform shadows `u`, any shape.
        schedule ([`NoiseSchedule`]): the masking schedule.
        grid_size (`int`): number of fine steps on [0, 1] (e.g. the teacher's step count `T`).

    Returns:
        `torch.LongTensor` of the shape of `shadow`, values in `[0, grid_size]`.
    """
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 1:
        raise ValueError(f"`grid_size` must be a positive integer (number of fine steps), got {grid_size!r}.")
    grid = 1.0 - torch.arange(grid_size + 1, dtype=torch.float64) / grid_size
    grid[-1] = 0.0  # as the scheduler's grid, so both compare the shadow against the same float64 alphas
    alphas = schedule.alpha(grid).to(shadow.device)
    index = torch.searchsorted(alphas, shadow.to(torch.float64).contiguous(), right=False)
    return index.clamp(max=grid_size)


def shadow_features(
    shadow: torch.Tensor,
    value_noise: torch.Tensor,
    t: float | torch.Tensor,
    schedule: NoiseSchedule,
    grid_size: int,
) -> torch.Tensor:
    """The per-position noise a noise-conditioned student reads at time `t` (one function for training and sampling).

    Feature 0 is the time until the shadow sampler reveals the position, counted in fine-grid steps and divided
    by `grid_size`: `k / grid_size` with `k = m - c >= 1` for a position masked at `t = 1 - c / grid_size` (`m`
    from [`shadow_reveal_index`]); 0 for a position already visible. Positions revealed in the same step of a
    sampler at `N` steps (`N` dividing `grid_size`) are those whose `k` falls in the same block of
    `grid_size / N`; within the block `k` is the order in which a `grid_size`-step sampler would reveal them.
    Feature 1 is the value noise `r` (the inverse-CDF uniform of the token's value).

    Args:
        shadow (`torch.Tensor` of shape `(B, L)`): uniform shadows `u`.
        value_noise (`torch.Tensor` of shape `(B, L)`): value noise `r` in [0, 1).
        t (`float` or `torch.Tensor`): the current time, a scalar or one per sequence `(B,)`, on the fine grid.
        schedule ([`NoiseSchedule`]): the masking schedule.
        grid_size (`int`): number of fine steps (the teacher's step count the student was distilled from).

    Returns:
        `torch.Tensor` of shape `(B, L, 2)`, float32, values in [0, 1].
    """
    if shadow.ndim != 2 or value_noise.shape != shadow.shape:
        raise ValueError(f"`shadow` and `value_noise` must both be (B, L), got {tuple(shadow.shape)} and "
                         f"{tuple(value_noise.shape)}.")
    current = _per_row(_grid_index(_as_float64(t, shadow.device), grid_size), shadow)
    steps_until_reveal = (shadow_reveal_index(shadow, schedule, grid_size) - current).clamp(min=0)
    features = torch.stack([steps_until_reveal.to(torch.float64) / grid_size, value_noise.to(torch.float64)], dim=-1)
    return features.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# SUBS parameterization and token draws


def _check_mask_id(logits: torch.Tensor, mask_token_id: int) -> None:
    if not 0 <= mask_token_id < logits.shape[-1]:
        raise ValueError(f"`mask_token_id` must index the logits' last dimension ({logits.shape[-1]}), "
                         f"got {mask_token_id}.")


def subs_log_probs(logits: torch.Tensor, input_ids: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The SUBS parameterization (MDLM): the denoiser's log-probabilities over clean tokens.

    The `[MASK]` logit is set to -inf, the rest log-normalized; at visible positions of `input_ids` the output is
    the one-hot of the visible token (0 there, -inf elsewhere; "carry-over"). Computed in float32 at least (float64
    logits stay float64), whatever the logits' dtype, so bf16 models give the same sampling distribution.

    KL-type losses should use [`real_token_log_probs`] at masked positions instead: the -inf entries here give
    `0 * (-inf) = NaN` in `sum(p * log p)`.

    Args:
        logits (`torch.Tensor` of shape `(B, L, V)`): raw model output, `V` including the mask id.
        input_ids (`torch.LongTensor` of shape `(B, L)`): the current state `z_t`.
        mask_token_id (`int`): the `[MASK]` id.

    Returns:
        `torch.Tensor` of shape `(B, L, V)`.
    """
    _check_mask_id(logits, mask_token_id)
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"`logits` {tuple(logits.shape)} must be `input_ids` {tuple(input_ids.shape)} plus a "
                         "vocabulary dimension.")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    is_mask_column = torch.arange(logits.shape[-1], device=logits.device) == mask_token_id
    log_probs = torch.log_softmax(logits.to(dtype).masked_fill(is_mask_column, -math.inf), dim=-1)
    # Carry-over: visible rows become -inf except 0 at the visible token. At masked rows the scatter writes -inf
    # into the mask column, which already holds -inf. In place when no gradient flows (one (B, L, V) buffer less).
    visible = (input_ids != mask_token_id).unsqueeze(-1)
    column = torch.where(visible, input_ids.unsqueeze(-1), mask_token_id)
    value = torch.zeros(visible.shape, dtype=dtype, device=logits.device).masked_fill(~visible, -math.inf)
    if log_probs.requires_grad:
        return log_probs.masked_fill(visible, -math.inf).scatter(-1, column, value)
    return log_probs.masked_fill_(visible, -math.inf).scatter_(-1, column, value)


def real_token_log_probs(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """Log-softmax over the real tokens only: the mask column dropped, no carry-over (float32 at least).

    For losses at masked positions (NELBO, KL/JSD distillation): every entry is finite, so `p * (log p - log q)`
    has no NaN. Column `j` is real token `j` for `j < mask_token_id` and token `j + 1` after it (the identity map
    when the mask is the last id, as in MDLM).

    Args:
        logits (`torch.Tensor` of shape `(..., V)`): raw model output.
        mask_token_id (`int`): the `[MASK]` id.

    Returns:
        `torch.Tensor` of shape `(..., V - 1)`.
    """
    _check_mask_id(logits, mask_token_id)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    real = torch.cat([logits[..., :mask_token_id], logits[..., mask_token_id + 1 :]], dim=-1)
    return torch.log_softmax(real, dim=-1)


def inverse_cdf_tokens(log_probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Draw tokens by inverse CDF: the first token id whose cumulative probability exceeds `uniform * total`.

    Tokens are accumulated in id order (fixed, so a small change of the distribution moves the draw little; a
    probability-sorted order flips at near-ties). Cumulation in float64. Never returns a zero-probability token.

    Args:
        log_probs (`torch.Tensor` of shape `(..., V)`): (unnormalized) log-probabilities.
        uniform (`torch.Tensor` of shape `(...)`): values in [0, 1).

    Returns:
        `torch.LongTensor` of shape `(...)`.
    """
    log_probs = log_probs.to(torch.float64)
    probs = torch.exp(log_probs - log_probs.amax(dim=-1, keepdim=True))
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[..., -1:].contiguous()
    target = uniform.to(torch.float64).unsqueeze(-1) * total
    tokens = torch.searchsorted(cdf, target, right=True)
    # Round-off can put the target at `total`; the last token with positive probability is where cdf reaches it.
    last_positive = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(tokens, last_positive).squeeze(-1)
