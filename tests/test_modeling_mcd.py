"""Tests of MaskedDiffusionLM: save/load, Auto classes, remote code, attention behaviour, conditioning, bad inputs.

A freshly initialised model is adaLN-Zero (blocks are identities and logits are all zero), which would make most
behaviours invisible, so the tests overwrite every parameter with random values first.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.modeling_mcd import MaskedDiffusionLM, register_auto_classes

VOCAB_SIZE = 33


def tiny_config(**overrides) -> MaskedDiffusionLMConfig:
    values = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, cond_dim=16,
                  max_position_embeddings=64, dropout=0.0)
    values.update(overrides)
    return MaskedDiffusionLMConfig(**values)


def randomize(model: MaskedDiffusionLM, seed: int = 0) -> MaskedDiffusionLM:
    """Every parameter random and O(1) in effect, so each term of the forward changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
                parameter.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = parameter.shape[-1] if parameter.dim() > 1 else 1
                parameter.copy_(noise / fan_in**0.5)
    return model


def tiny_model(seed: int = 0, **overrides) -> MaskedDiffusionLM:
    torch.manual_seed(seed)
    return randomize(MaskedDiffusionLM(tiny_config(**overrides)), seed).eval()


def random_ids(batch_size: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_adaln_zero_init():
    model = MaskedDiffusionLM(tiny_config()).eval()
    output = model(random_ids(2, 10))
    assert output.logits.shape == (2, 10, VOCAB_SIZE)
    # adaLN-Zero: the output head and every modulation start at zero, so the untrained model is uniform.
    assert torch.count_nonzero(output.logits) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation.weight) == 0
    assert torch.count_nonzero(model.vocab_embed.weight) > 0
    assert torch.all(model.blocks[0].norm1.weight == 1)


def test_save_load_round_trip_float32_is_exact(tmp_path):
    model = tiny_model()
    ids = random_ids(3, 12)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = MaskedDiffusionLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bfloat16_loading_matches_float32_within_tolerance(tmp_path):
    model = tiny_model()
    ids = random_ids(2, 16)
    model.save_pretrained(tmp_path)
    loaded = MaskedDiffusionLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        reference = model(ids).logits
        logits = loaded(ids).logits
    assert logits.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); through ~20 roundings on O(1) logits
    # errors of a few percent of the logit scale are expected, a wrong computation would be O(100%).
    error = (logits.float() - reference).abs().max() / reference.abs().max()
    assert error < 0.05, error
    # A bf16 model saves and reloads exactly, with its dtype recorded in the config.
    loaded.save_pretrained(tmp_path / "bf16")
    assert '"dtype": "bfloat16"' in (tmp_path / "bf16" / "config.json").read_text()
    reloaded = MaskedDiffusionLM.from_pretrained(tmp_path / "bf16").eval()
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_auto_classes_round_trip(tmp_path):
    register_auto_classes()
    register_auto_classes()  # idempotent
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MaskedDiffusionLMConfig)
    ids = random_ids(2, 8)
    for auto_class in (AutoModelForMaskedLM, AutoModel):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is MaskedDiffusionLM
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_remote_code_folder_loads_without_mcd_hf(tmp_path):
    model = tiny_model(time_conditioning=True)
    ids = random_ids(2, 9)
    timesteps = torch.tensor([0.3, 2.0])
    folder = tmp_path / "remote"
    MaskedDiffusionLM.register_for_auto_class()
    try:
        model.save_pretrained(folder)
    finally:
        MaskedDiffusionLM._auto_class = None
        MaskedDiffusionLMConfig._auto_class = None
    assert (folder / "modeling_mcd.py").exists() and (folder / "configuration_mcd.py").exists()
    torch.save({"ids": ids, "timesteps": timesteps}, tmp_path / "inputs.pt")

    # A fresh interpreter in which `import mcd_hf` fails: only the copied files can define the model.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["mcd_hf"] = None
        import torch
        from transformers import AutoModelForMaskedLM
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        model = AutoModelForMaskedLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save(model(inputs["ids"], inputs["timesteps"]).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids, timesteps).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_saving_without_registration_writes_no_code(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert not (tmp_path / "modeling_mcd.py").exists()
    assert "auto_map" not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_attention_is_bidirectional(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    ids = random_ids(1, 10)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB_SIZE
    with torch.no_grad():
        first, second = model(ids).logits, model(changed).logits
    # The first position reads the last token: a causal model would leave it unchanged.
    assert (first[0, 0] - second[0, 0]).abs().max() > 1e-3


def test_attention_is_position_aware():
    # Rotary embeddings: the same tokens in a different order give different logits at the same token.
    model = tiny_model()
    ids = random_ids(1, 8)
    rolled = ids.roll(1, dims=1)
    with torch.no_grad():
        assert (model(ids).logits[0, 0] - model(rolled).logits[0, 1]).abs().max() > 1e-3


def test_eager_and_sdpa_agree():
    sdpa = tiny_model()
    eager = tiny_model(attn_implementation="eager")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    ids = random_ids(3, 20)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 15:] = 0
    with torch.no_grad():
        for mask in (None, attention_mask):
            torch.testing.assert_close(eager(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_leaves_unpadded_logits_unchanged(attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    ids = random_ids(2, 11)
    lengths = [11, 6]
    with torch.no_grad():
        alone = [model(ids[i : i + 1, :n]).logits[0] for i, n in enumerate(lengths)]
        padded = torch.cat([ids, torch.full((2, 5), model.config.mask_token_id)], dim=1)
        attention_mask = torch.zeros_like(padded)
        for i, n in enumerate(lengths):
            attention_mask[i, :n] = 1
        logits = model(padded, attention_mask=attention_mask).logits
        unmasked = model(padded).logits
    for i, n in enumerate(lengths):
        torch.testing.assert_close(logits[i, :n], alone[i], atol=1e-5, rtol=1e-5)
    # Without the mask the padding is attended to and changes the logits (so the check above is not vacuous).
    assert (unmasked[0, :11] - alone[0]).abs().max() > 1e-3


def test_time_conditioning_off_ignores_timesteps():
    model = tiny_model(time_conditioning=False)
    ids = random_ids(2, 8)
    with torch.no_grad():
        reference = model(ids).logits
        for timesteps in (torch.tensor([0.1, 5.0]), 3.0, torch.zeros(2)):
            assert torch.equal(model(ids, timesteps).logits, reference)


def test_time_conditioning_on_uses_timesteps():
    model = tiny_model(time_conditioning=True)
    ids = random_ids(2, 8)
    with torch.no_grad():
        low, high = model(ids, torch.tensor([0.1, 0.1])).logits, model(ids, torch.tensor([2.0, 2.0])).logits
        assert (low - high).abs().max() > 1e-3
        # A scalar, (B,) and (B, 1) are the same noise level; rows are conditioned separately.
        scalar = model(ids, 0.1).logits
        column = model(ids, torch.tensor([[0.1], [0.1]])).logits
        mixed = model(ids, torch.tensor([0.1, 2.0])).logits
    torch.testing.assert_close(scalar, low, atol=0, rtol=0)
    torch.testing.assert_close(column, low, atol=0, rtol=0)
    torch.testing.assert_close(mixed[0], low[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed[1], high[1], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="timesteps"):
        model(ids)


def test_bad_input_ids_name_the_range():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[0, 33\).*\[0, 33\]"):
        model(torch.tensor([[0, 33, 4]]))
    with pytest.raises(ValueError, match=r"\[0, 33\).*\[-1, 4\]"):
        model(torch.tensor([[-1, 2, 4]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.rand(1, 3))


def test_bad_timesteps_shape():
    model = tiny_model(time_conditioning=True)
    ids = random_ids(2, 5)
    for timesteps in (torch.rand(3), torch.rand(2, 2), torch.rand(1, 2, 1)):
        with pytest.raises(ValueError, match="timesteps"):
            model(ids, timesteps)
    # Checked even when time conditioning is off: a wrong shape is a caller bug either way.
    with pytest.raises(ValueError, match="timesteps"):
        tiny_model()(ids, torch.rand(3))


def test_too_long_sequence_and_bad_masks():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(random_ids(1, 65))
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))


def test_labels_give_cross_entropy_over_kept_positions():
    model = tiny_model()
    ids = random_ids(2, 7)
    labels = random_ids(2, 7, seed=5)
    labels[0, :3] = -100
    with torch.no_grad():
        output = model(ids, labels=labels)
        keep = labels != -100
        expected = torch.nn.functional.cross_entropy(output.logits[keep], labels[keep])
        loss, logits = model(ids, labels=labels, return_dict=False)
    torch.testing.assert_close(output.loss, expected)
    assert torch.equal(logits, output.logits) and torch.equal(loss, output.loss)
    assert model(ids, return_dict=False)[0].shape == (2, 7, VOCAB_SIZE)


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = random_ids(2, 12)
    labels = random_ids(2, 12, seed=3)
    gradients, projection_calls = [], []
    for checkpointing in (False, True):
        model = tiny_model(time_conditioning=True).train()
        assert model.supports_gradient_checkpointing
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.blocks[0].gradient_checkpointing
        calls = []
        for block in model.blocks:
            block.attn_qkv.register_forward_hook(lambda *args: calls.append(1))
        model(ids, torch.full((2,), 0.7), labels=labels).loss.backward()
        projection_calls.append(len(calls))
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    # Checkpointing recomputes each block during the backward pass: twice the projections, the same gradients.
    assert projection_calls == [2, 4]
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_tied_embeddings_share_the_weight(tmp_path):
    model = MaskedDiffusionLM(tiny_config(tie_word_embeddings=True))
    assert model.output_layer.linear.weight is model.vocab_embed.weight
    model.save_pretrained(tmp_path)
    loaded = MaskedDiffusionLM.from_pretrained(tmp_path)
    assert loaded.output_layer.linear.weight is loaded.vocab_embed.weight
    assert torch.equal(loaded.vocab_embed.weight, model.vocab_embed.weight)


def test_model_metadata():
    assert MaskedDiffusionLM._no_split_modules == ["MCDTransformerBlock"]
    assert MaskedDiffusionLM._supports_sdpa
    model = MaskedDiffusionLM(tiny_config())
    assert model.get_input_embeddings() is model.vocab_embed
    assert model.get_output_embeddings() is model.output_layer.linear
    # Untied by default, as MDLM: the output head and embedding are separate tensors.
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def shadow_student(teacher: MaskedDiffusionLM) -> MaskedDiffusionLM:
    student = MaskedDiffusionLM(tiny_config(**{**teacher.config.to_diff_dict(), "noise_conditioning": True}))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert sorted(missing) == ["shadow_embed.linear.bias", "shadow_embed.linear.weight"] and not unexpected
    return student.eval()


def test_zero_initialised_shadow_embedding_keeps_the_teacher():
    teacher = tiny_model(time_conditioning=True)
    student = shadow_student(teacher)
    ids = random_ids(2, 10)
    ids[:, ::2] = teacher.config.mask_token_id
    shadow = torch.rand(2, 10, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(ids, 0.5, shadow_features=shadow).logits, teacher(ids, 0.5).logits)


def test_shadow_embedding_reads_masked_positions_only(tmp_path):
    student = shadow_student(tiny_model())
    with torch.no_grad():
        student.shadow_embed.linear.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    ids = random_ids(2, 10)
    first, second = torch.rand(2, 2, 10, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # No masked token: the shadow has nothing to act on.
        assert torch.equal(student(ids, shadow_features=first).logits, student(ids, shadow_features=second).logits)
        masked = ids.clone()
        masked[:, 3] = student.config.mask_token_id
        changed = student(masked, shadow_features=first).logits - student(masked, shadow_features=second).logits
    assert changed.abs().max() > 1e-3
    # Only position 3's shadow matters: changing the others' leaves the logits as they were.
    third = first.clone()
    third[:, [0, 1, 2, 4]] = second[:, [0, 1, 2, 4]]
    with torch.no_grad():
        assert torch.equal(student(masked, shadow_features=third).logits, student(masked, shadow_features=first).logits)
        student.save_pretrained(tmp_path)
        loaded = MaskedDiffusionLM.from_pretrained(tmp_path).eval()
        assert torch.equal(loaded(masked, shadow_features=first).logits, student(masked, shadow_features=first).logits)


def test_shadow_features_are_checked():
    student = shadow_student(tiny_model())
    ids = random_ids(2, 6)
    with pytest.raises(ValueError, match="shadow_features is required"):
        student(ids)
    with pytest.raises(ValueError, match=r"shadow_features must have shape \(2, 6, 2\)"):
        student(ids, shadow_features=torch.rand(2, 6))
    with pytest.raises(ValueError, match="noise_conditioning"):
        tiny_model()(ids, shadow_features=torch.rand(2, 6, 2))
