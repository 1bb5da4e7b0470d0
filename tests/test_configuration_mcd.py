"""Tests of MaskedDiffusionLMConfig: MDLM-OWT defaults, validation, save/load."""

import pytest
import torch

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig


def test_defaults_are_mdlm_owt():
    config = MaskedDiffusionLMConfig()
    assert config.model_type == "mcd_masked_diffusion"
    assert (config.vocab_size, config.mask_token_id) == (50258, 50257)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.cond_dim, config.intermediate_size, config.max_position_embeddings) == (128, 3072, 1024)
    assert config.time_conditioning is False and config.tie_word_embeddings is False
    assert config.dropout == 0.1 and config.rope_theta == 10000.0
    assert config.noise_conditioning is False
    assert config.head_dim == 64


def test_derived_defaults_follow_the_given_sizes():
    config = MaskedDiffusionLMConfig(vocab_size=33, hidden_size=32, num_attention_heads=2)
    assert config.mask_token_id == 32
    assert config.intermediate_size == 128
    assert MaskedDiffusionLMConfig(vocab_size=33, mask_token_id=0).mask_token_id == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size"),
        ({"hidden_size": 6, "num_attention_heads": 2}, "rotary"),  # odd head size
        ({"vocab_size": 33, "mask_token_id": 33}, "mask_token_id"),
        ({"mask_token_id": -1}, "mask_token_id"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"hidden_size": -32}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"cond_dim": 0}, "cond_dim"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"dropout": 1.0}, "dropout"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"time_conditioning": "yes"}, "time_conditioning"),
        ({"shadow_feature_size": 0}, "shadow_feature_size"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MaskedDiffusionLMConfig(**kwargs)


def test_save_load_round_trip_keeps_fields_and_dtype(tmp_path):
    config = MaskedDiffusionLMConfig(
        vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, time_conditioning=True,
        noise_conditioning=True, dtype=torch.bfloat16,
    )
    config.save_pretrained(tmp_path)
    loaded = MaskedDiffusionLMConfig.from_pretrained(tmp_path)
    for name in ("vocab_size", "mask_token_id", "hidden_size", "num_hidden_layers", "num_attention_heads", "cond_dim",
                 "intermediate_size", "max_position_embeddings", "time_conditioning", "dropout", "rope_theta",
                 "tie_word_embeddings", "noise_conditioning", "shadow_feature_size"):
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.dtype == torch.bfloat16
    assert '"dtype": "bfloat16"' in (tmp_path / "config.json").read_text()


def test_validation_runs_again_before_saving(tmp_path):
    config = MaskedDiffusionLMConfig(vocab_size=33, hidden_size=32, num_attention_heads=2)
    config.mask_token_id = 40
    with pytest.raises(ValueError, match="mask_token_id"):
        config.save_pretrained(tmp_path)
