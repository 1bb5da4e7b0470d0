"""The masked diffusion denoiser: MDLM's diffusion transformer as a transformers `PreTrainedModel`.

Architecture (Sahoo et al., "Simple and Effective Masked Diffusion Language Models", NeurIPS 2024; the DiT of
Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023): token embedding, a sinusoidal embedding
of the noise level mapped to a conditioning vector, pre-norm blocks with adaLN-Zero modulation, rotary attention
without causal mask, a GELU-tanh MLP, and an adaLN-modulated untied output head with bias. The parameter names
follow the published MDLM checkpoints (see `mcd_hf.conversion`) except the token embedding, which is an
`nn.Embedding` here (`vocab_embed.weight` instead of MDLM's bare `vocab_embed.embedding`).

Single-file policy: this module imports only torch, transformers and (relatively) `configuration_mcd`, so that
`save_pretrained` can copy it next to the weights as remote code for users without `mcd_hf` installed.
"""

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_mcd import MaskedDiffusionLMConfig


# MDLM embeds the noise level with 256 sinusoidal features and a maximum period of 10000 (as DiT does).
TIMESTEP_EMBEDDING_DIM = 256
TIMESTEP_MAX_PERIOD = 10000.0


def timestep_embedding(timesteps: torch.Tensor, dim: int = TIMESTEP_EMBEDDING_DIM) -> torch.Tensor:
    """Sinusoidal features `[cos(t * f_k), sin(t * f_k)]` with `f_k = exp(-ln(10000) k / (dim/2))`, in float32."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(TIMESTEP_MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    angles = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension (non-interleaved rotary convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates `x` (B, H, L, D) by the angles whose cos/sin are given as (L, D)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; `attention_mask` is additive (B, 1, L, L) or None. Returns (B, L, H, D)."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


class MCDZeroInitLinear(nn.Linear):
    """A linear layer that `_init_weights` starts at zero: the adaLN modulations and the output head (adaLN-Zero)."""


class MCDLayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (as MDLM) and cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.eps)
        return (normed * self.weight.float()).to(hidden_states.dtype)


class MCDTimestepEmbedder(nn.Module):
    """Noise level -> sinusoidal features -> Linear -> SiLU -> Linear (MDLM's `sigma_map`)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_EMBEDDING_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(timesteps).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class MCDShadowEmbedder(nn.Module):
    """Embeds per-position shadow features (values in [0, 1]) for a noise-conditioned model (issue 10).

    Each feature gets Fourier features `[cos(pi 2^k x), sin(pi 2^k x)]`, k < 16, resolving differences down to about
    2^-16; one zero-initialised linear layer maps them to the hidden size.
    """

    num_frequencies = 16

    def __init__(self, num_features: int, hidden_size: int):
        super().__init__()
        self.linear = MCDZeroInitLinear(2 * self.num_frequencies * num_features, hidden_size)

    def forward(self, shadow_features: torch.Tensor) -> torch.Tensor:
        frequencies = math.pi * 2.0 ** torch.arange(
            self.num_frequencies, dtype=torch.float32, device=shadow_features.device
        )
        angles = shadow_features.float()[..., None] * frequencies  # (B, L, F, num_frequencies)
        features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).flatten(-2)
        return self.linear(features.to(self.linear.weight.dtype))


class MCDRotaryEmbedding(nn.Module):
    """cos/sin tables of the rotary embedding, recomputed per call in float32 (cheap, and no buffer to load)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        self.base = base

    def inverse_frequencies(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponents)

    def forward(self, seq_len: int, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, self.inverse_frequencies(device))
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


class MCDTransformerBlock(GradientCheckpointingLayer):
    """Pre-norm DiT block with adaLN-Zero modulation, bidirectional rotary attention and a GELU-tanh MLP."""

    def __init__(self, config: MaskedDiffusionLMConfig, layer_idx: int):
        super().__init__()
        hidden = config.hidden_size
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        # Read by transformers' attention functions: full (not causal) attention, no grouped key/value heads.
        self.is_causal = False
        self.num_key_value_groups = 1

        self.norm1 = MCDLayerNorm(hidden, config.layer_norm_eps)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = MCDLayerNorm(hidden, config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, config.intermediate_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.intermediate_size, hidden),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.adaLN_modulation = MCDZeroInitLinear(config.cond_dim, 6 * hidden)

    def forward(
        self,
        hidden_states: torch.Tensor,
        conditioning: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(conditioning)[:, None].chunk(6, dim=2)

        attn_input = self.norm1(hidden_states) * (1 + scale1) + shift1
        # MDLM lays the fused projection out as (3, heads, head_dim).
        qkv = self.attn_qkv(attn_input).view(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, is_causal=False
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1)
        hidden_states = hidden_states + gate1 * self.dropout(self.attn_out(attn_output))

        mlp_input = self.norm2(hidden_states) * (1 + scale2) + shift2
        hidden_states = hidden_states + gate2 * self.dropout(self.mlp(mlp_input))
        return hidden_states


class MCDFinalLayer(nn.Module):
    """Final adaLN-modulated LayerNorm and the output projection (with bias) to the vocabulary."""

    def __init__(self, config: MaskedDiffusionLMConfig):
        super().__init__()
        self.norm_final = MCDLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.linear = MCDZeroInitLinear(config.hidden_size, config.vocab_size)
        self.adaLN_modulation = MCDZeroInitLinear(config.cond_dim, 2 * config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(conditioning)[:, None].chunk(2, dim=2)
        return self.linear(self.norm_final(hidden_states) * (1 + scale) + shift)


class MaskedDiffusionLM(PreTrainedModel):
    r"""Masked diffusion denoiser: maps a partly masked sequence (and its noise level) to logits over all ids.

    The logits are raw (the `[MASK]` column included); the SUBS parameterization is applied by
    `mcd_hf.duality.subs_log_probs`, not here, exactly as MDLM separates backbone and parameterization.

    Example:

    ```python
    >>> import torch
    >>> from mcd_hf import MaskedDiffusionLMConfig, MaskedDiffusionLM
    >>> config = MaskedDiffusionLMConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    >>> model = MaskedDiffusionLM(config)
    >>> model(torch.randint(0, 33, (2, 16))).logits.shape
    torch.Size([2, 16, 33])
    ```
    """

    config_class = MaskedDiffusionLMConfig
    config: MaskedDiffusionLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MCDTransformerBlock"]
    _supports_sdpa = True
    # Only tied when `config.tie_word_embeddings` is True (never for MDLM checkpoints).
    _tied_weights_keys = {"output_layer.linear.weight": "vocab_embed.weight"}

    def __init__(self, config: MaskedDiffusionLMConfig):
        super().__init__(config)
        self.vocab_embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.sigma_map = MCDTimestepEmbedder(config.cond_dim)
        self.rotary_emb = MCDRotaryEmbedding(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList(
            [MCDTransformerBlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.output_layer = MCDFinalLayer(config)
        if config.noise_conditioning:
            self.shadow_embed = MCDShadowEmbedder(config.shadow_feature_size, config.hidden_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # adaLN-Zero, as MDLM: every block starts as the identity and the output as uniform logits. The zeros are
        # set on the linear layers themselves because transformers skips parameter-less container modules.
        if isinstance(module, MCDZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        else:
            # Linear/Embedding: normal(0, initializer_range); MCDLayerNorm: ones (matched by class name).
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.vocab_embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.vocab_embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.output_layer.linear

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.output_layer.linear = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        timesteps: torch.Tensor | float | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        shadow_features: torch.Tensor | None = None,
    ) -> MaskedLMOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Token ids in `[0, vocab_size)`, masked positions holding `config.mask_token_id`.
            timesteps (`torch.Tensor` of shape `(batch_size,)` or `(batch_size, 1)`, or a scalar, *optional*):
                The noise level sigma of each sequence (`-log alpha_t` for MDLM's schedules). Required when
                `config.time_conditioning` is True; otherwise ignored (the model uses sigma = 0, as MDLM-OWT).
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
                Padding mask, 1 for tokens to attend to and 0 for padding. Padding positions get logits too,
                which are meaningless. Omit it for full sequences (MDLM never pads).
            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Target ids; the loss is the mean cross entropy of the raw logits over positions whose label is not
                -100. This is a plain token loss for convenience; the diffusion NELBO lives in `mcd_hf.training`.
            return_dict (`bool`, *optional*):
                Return a `MaskedLMOutput` (default) instead of a tuple.
            shadow_features (`torch.Tensor` of shape `(batch_size, seq_len, config.shadow_feature_size)`, *optional*):
                Only for `config.noise_conditioning` (and then required): the latent shadow of each position as
                values in [0, 1]; embedded and added to the input of masked positions only.

        Returns:
            `MaskedLMOutput` with `logits` of shape `(batch_size, seq_len, vocab_size)` and `loss` when `labels`
            is given.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_input_ids(input_ids)
        batch_size, seq_len = input_ids.shape
        sigma = self._noise_levels(timesteps, batch_size, input_ids.device)
        if attention_mask is not None:
            attention_mask = self._check_attention_mask(attention_mask, input_ids)

        hidden_states = self.vocab_embed(input_ids)
        if self.config.noise_conditioning:
            hidden_states = hidden_states + self._shadow_embedding(shadow_features, input_ids)
        elif shadow_features is not None:
            raise ValueError("shadow_features is only read by a model with config.noise_conditioning=True")
        conditioning = F.silu(self.sigma_map(sigma)).to(hidden_states.dtype)
        position_embeddings = self.rotary_emb(seq_len, device=hidden_states.device, dtype=hidden_states.dtype)
        attention_mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask
        )
        for block in self.blocks:
            hidden_states = block(hidden_states, conditioning, position_embeddings, attention_mask)
        logits = self.output_layer(hidden_states, conditioning)

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(logits.device), ignore_index=-100)

        if not return_dict:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits)

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a LongTensor of shape (batch_size, seq_len), got {shape}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer ids, got dtype {input_ids.dtype}")
        seq_len = input_ids.shape[1]
        if seq_len == 0 or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has seq_len {seq_len}, longer than max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        if torch.compiler.is_compiling():
            return  # the value check reads the ids back to the host, which would break the compiled graph
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size, [MASK] included), "
                f"got ids in [{low}, {high}]"
            )

    def _noise_levels(self, timesteps, batch_size: int, device: torch.device) -> torch.Tensor:
        """Validates `timesteps` and returns the float32 noise level per sequence, zeros without conditioning."""
        if timesteps is None:
            if self.config.time_conditioning:
                raise ValueError("timesteps (the noise level per sequence) is required when time_conditioning is True")
            return torch.zeros(batch_size, device=device)
        timesteps = torch.as_tensor(timesteps, device=device)
        if timesteps.dim() == 2 and timesteps.shape[1] == 1:
            timesteps = timesteps[:, 0]
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch_size)
        if timesteps.shape != (batch_size,):
            raise ValueError(
                f"timesteps must be a scalar or have shape ({batch_size},) or ({batch_size}, 1), "
                f"got {tuple(timesteps.shape)}"
            )
        if not self.config.time_conditioning:
            return torch.zeros(batch_size, device=device)
        return timesteps.float()

    def _shadow_embedding(self, shadow_features: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
        expected = (*input_ids.shape, self.config.shadow_feature_size)
        if shadow_features is None:
            raise ValueError("shadow_features is required when noise_conditioning is True")
        if tuple(shadow_features.shape) != expected:
            raise ValueError(f"shadow_features must have shape {expected}, got {tuple(shadow_features.shape)}")
        # Visible tokens are fixed whatever the shadow says, so only masked positions read it.
        is_masked = (input_ids == self.config.mask_token_id).unsqueeze(-1)
        return self.shadow_embed(shadow_features.to(input_ids.device)) * is_masked

    def _check_attention_mask(self, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)} (1 = keep, 0 = padding), "
                f"got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.bool()
        # A row with no visible key would softmax over nothing and produce NaN.
        if not torch.compiler.is_compiling() and not bool(attention_mask.any(dim=1).all()):
            raise ValueError("attention_mask must keep at least one token in every sequence")
        return attention_mask

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModelForMaskedLM") -> None:
        """Makes `save_pretrained` write `auto_map` and copy this file and `configuration_mcd.py` next to the weights,
        so that `AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)` works without `mcd_hf`.

        Also registers the config class for `AutoConfig`, which the remote loader needs first.
        """
        cls.config_class.register_for_auto_class("AutoConfig")
        super().register_for_auto_class(auto_class)

    @classmethod
    def from_mdlm(cls, source: str, **kwargs) -> "MaskedDiffusionLM":
        """Imports a published MDLM checkpoint (Hub id, HF MDLM folder or raw state dict file).

        Args:
            source (`str`): See `mcd_hf.conversion.convert_mdlm_checkpoint`.
            **kwargs: Passed on to `convert_mdlm_checkpoint` (`output_dir`, `tokenizer`, `strict`, config values).
        """
        # Imported by name so the remote-code copy of this file does not depend on mcd_hf.
        try:
            conversion = importlib.import_module("mcd_hf.conversion")
        except ImportError as error:
            raise ImportError("MaskedDiffusionLM.from_mdlm needs the mcd_hf package (`pip install mcd_hf`)") from error
        return conversion.convert_mdlm_checkpoint(source, **kwargs)


def register_auto_classes() -> None:
    """Registers the config and model with `AutoConfig`, `AutoModel` and `AutoModelForMaskedLM` (idempotent)."""
    AutoConfig.register(MaskedDiffusionLMConfig.model_type, MaskedDiffusionLMConfig, exist_ok=True)
    AutoModel.register(MaskedDiffusionLMConfig, MaskedDiffusionLM, exist_ok=True)
    AutoModelForMaskedLM.register(MaskedDiffusionLMConfig, MaskedDiffusionLM, exist_ok=True)


__all__ = ["MaskedDiffusionLM", "register_auto_classes"]
