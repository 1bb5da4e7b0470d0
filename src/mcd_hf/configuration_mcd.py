"""Configuration of the masked diffusion denoiser (the MDLM diffusion transformer).

The field names follow transformers' conventions; the defaults reproduce the MDLM OpenWebText model
(Sahoo et al., "Simple and Effective Masked Diffusion Language Models", NeurIPS 2024,
Hub id `kuleshov-group/mdlm-owt`): a 12-block DiT of width 768 over GPT-2's 50257 tokens plus `[MASK]`.

This file imports only transformers so that it can be copied next to saved weights as remote code
(see `MaskedDiffusionLM.register_for_auto_class`).
"""

from transformers import PreTrainedConfig


class MaskedDiffusionLMConfig(PreTrainedConfig):
    r"""Configuration of a [`MaskedDiffusionLM`].

    Args:
        vocab_size (`int`, defaults to 50258):
            Number of token ids the model reads and scores, the `[MASK]` id included.
        mask_token_id (`int`, *optional*):
            Id of the `[MASK]` token. Defaults to `vocab_size - 1`, MDLM's convention.
        hidden_size (`int`, defaults to 768):
            Width of the transformer.
        num_hidden_layers (`int`, defaults to 12):
            Number of DiT blocks.
        num_attention_heads (`int`, defaults to 12):
            Attention heads per block; must divide `hidden_size` into an even head size (rotary halves).
        cond_dim (`int`, defaults to 128):
            Width of the time-conditioning vector fed to the adaLN layers.
        intermediate_size (`int`, *optional*):
            Hidden width of the MLP. Defaults to `4 * hidden_size`.
        max_position_embeddings (`int`, defaults to 1024):
            Longest sequence accepted by `forward` (MDLM's `model_length`).
        time_conditioning (`bool`, defaults to `False`):
            Whether the model reads the noise level. When `False` (as MDLM-OWT) the noise level is taken as zero,
            so the model sees only the mask pattern.
        dropout (`float`, defaults to 0.1):
            Dropout after attention and MLP, in training mode only.
        rope_theta (`float`, defaults to 10000.0):
            Base of the rotary position embedding.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the (float32, weight-only) LayerNorms.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of linear and embedding weights. The adaLN layers and
            the output layer start at zero (adaLN-Zero), as in MDLM.
        tie_word_embeddings (`bool`, defaults to `False`):
            Share the output projection with the token embedding. MDLM does not.
        noise_conditioning (`bool`, defaults to `False`):
            Adds a shadow embedding (see issue 10): `forward` then takes `shadow_features`, per-position values of
            the latent shadow, embedded and added to the input at masked positions. Zero-initialised, so a model
            that gains it keeps its outputs until it is trained.
        shadow_feature_size (`int`, defaults to 2):
            Number of shadow features per position (e.g. the normalised time until the token is revealed and its
            value noise), used when `noise_conditioning` is True.
        shadow_grid_size (`int`, *optional*):
            The fine time grid of the shadow features (the teacher's step count a noise-conditioned student was
            distilled from): the time until a position is revealed is counted in steps of `1 / shadow_grid_size`.
            Samplers of such a model use a step count dividing it.

    Example:

    ```python
    >>> from mcd_hf import MaskedDiffusionLMConfig, MaskedDiffusionLM
    >>> config = MaskedDiffusionLMConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    >>> model = MaskedDiffusionLM(config)
    ```
    """

    model_type = "mcd_masked_diffusion"

    vocab_size: int = 50258
    mask_token_id: int | None = None
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    cond_dim: int = 128
    intermediate_size: int | None = None
    max_position_embeddings: int = 1024
    time_conditioning: bool = False
    dropout: float = 0.1
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    noise_conditioning: bool = False
    shadow_feature_size: int = 2
    shadow_grid_size: int | None = None

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None and _is_int(self.vocab_size):
            self.mask_token_id = self.vocab_size - 1
        if self.intermediate_size is None and _is_int(self.hidden_size):
            self.intermediate_size = 4 * self.hidden_size
        self._validate_fields()
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Checks every field (transformers also calls this before saving); raises `ValueError` naming the field."""
        self._validate_fields()
        super().validate()

    def _validate_fields(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "cond_dim",
            "intermediate_size",
            "max_position_embeddings",
            "shadow_feature_size",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 (one real token plus [MASK]), got {self.vocab_size}")
        if not _is_int(self.mask_token_id) or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"mask_token_id must be an id in [0, vocab_size={self.vocab_size}), got {self.mask_token_id!r}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            # Rotary embeddings rotate the two halves of each head against each other.
            raise ValueError(
                f"hidden_size / num_attention_heads must be even for rotary embeddings, got "
                f"{self.hidden_size} / {self.num_attention_heads} = {self.hidden_size // self.num_attention_heads}"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        for name in ("rope_theta", "layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.shadow_grid_size is not None and (not _is_int(self.shadow_grid_size) or self.shadow_grid_size <= 0):
            raise ValueError(f"shadow_grid_size must be a positive integer or None, got {self.shadow_grid_size!r}")
        for name in ("time_conditioning", "tie_word_embeddings", "noise_conditioning"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["MaskedDiffusionLMConfig"]
