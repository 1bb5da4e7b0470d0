"""Tests of the MDLM importer against an independent forward written here from the reference's equations.

The checkpoints are random, in the published layout (`shared/reference/mdlm-checkpoint-format.md`), at tiny sizes,
with every weight non-zero (adaLN and output layers included) so that each term of the forward matters. The
reference forward below uses plain torch in float64 and imports nothing from `mcd_hf`.
"""

import json
import math
import pickle
import warnings

import pytest
import torch
from safetensors.torch import save_file

from mcd_hf.configuration_mcd import MaskedDiffusionLMConfig
from mcd_hf.conversion import convert_mdlm_checkpoint
from mcd_hf.hub import HubUnreachableError
from mcd_hf.modeling_mcd import MaskedDiffusionLM

VOCAB, HIDDEN, HEADS, COND, BLOCKS, LENGTH = 37, 32, 4, 16, 2, 64
SEQ_LENS = (1, 7, 64)


def published_state_dict(seed: int = 0, rotary: bool = True) -> dict[str, torch.Tensor]:
    """Random MDLM backbone weights with the reference's key names and shapes (no `backbone.` prefix)."""
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return torch.randn(shape, generator=generator) / math.sqrt(shape[-1])

    def near_one(size):
        return 1.0 + 0.1 * torch.randn(size, generator=generator)

    d, c = HIDDEN, COND
    state = {
        "vocab_embed.embedding": torch.randn(VOCAB, d, generator=generator),
        "sigma_map.mlp.0.weight": weight(c, 256), "sigma_map.mlp.0.bias": weight(c),
        "sigma_map.mlp.2.weight": weight(c, c), "sigma_map.mlp.2.bias": weight(c),
    }
    if rotary:
        head_dim = d // HEADS
        state["rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for i in range(BLOCKS):
        state |= {
            f"blocks.{i}.norm1.weight": near_one(d), f"blocks.{i}.attn_qkv.weight": weight(3 * d, d),
            f"blocks.{i}.attn_out.weight": weight(d, d), f"blocks.{i}.norm2.weight": near_one(d),
            f"blocks.{i}.mlp.0.weight": weight(4 * d, d), f"blocks.{i}.mlp.0.bias": weight(4 * d),
            f"blocks.{i}.mlp.2.weight": weight(d, 4 * d), f"blocks.{i}.mlp.2.bias": weight(d),
            f"blocks.{i}.adaLN_modulation.weight": 0.5 * weight(6 * d, c),
            f"blocks.{i}.adaLN_modulation.bias": 0.1 * weight(6 * d),
        }
    state |= {
        "output_layer.norm_final.weight": near_one(d), "output_layer.linear.weight": weight(VOCAB, d),
        "output_layer.linear.bias": weight(VOCAB), "output_layer.adaLN_modulation.weight": 0.5 * weight(2 * d, c),
        "output_layer.adaLN_modulation.bias": 0.1 * weight(2 * d),
    }
    return state


def reference_forward(state, input_ids, sigma, time_conditioning, num_heads=HEADS):
    """The reference's forward computation, step by step, in float64."""
    w = {key: value.double() for key, value in state.items()}
    batch, length = input_ids.shape
    d = w["vocab_embed.embedding"].shape[1]
    head_dim = d // num_heads

    def layer_norm(x, weight):  # eps 1e-5, weight only
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * weight

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def silu(x):
        return x * torch.sigmoid(x)

    # 1. embedding
    h = w["vocab_embed.embedding"][input_ids]
    # 2. time conditioning: [cos, sin] of sigma * exp(-ln(10000) k / 128), Linear, SiLU, Linear, then SiLU
    sigma = sigma.double() if time_conditioning else torch.zeros(batch, dtype=torch.float64)
    angles = sigma[:, None] * torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    hidden = silu(features @ w["sigma_map.mlp.0.weight"].T + w["sigma_map.mlp.0.bias"])
    c = silu(hidden @ w["sigma_map.mlp.2.weight"].T + w["sigma_map.mlp.2.bias"])
    # 3. rotary, non-interleaved halves, base 10000
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    position_angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None]  # (L, head_dim/2)
    cos, sin = torch.cos(position_angles)[None, :, None], torch.sin(position_angles)[None, :, None]

    def rotate(x):  # x: (B, L, H, head_dim); [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    # 4. blocks
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        modulation = c @ w[p + "adaLN_modulation.weight"].T + w[p + "adaLN_modulation.bias"]
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in modulation.split(d, dim=-1))
        a = layer_norm(h, w[p + "norm1.weight"]) * (1 + scale1) + shift1
        qkv = (a @ w[p + "attn_qkv.weight"].T).view(batch, length, 3, num_heads, head_dim)
        q, k, v = rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        attention = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(batch, length, d)
        h = h + gate1 * (attention @ w[p + "attn_out.weight"].T)
        b = layer_norm(h, w[p + "norm2.weight"]) * (1 + scale2) + shift2
        mlp = gelu_tanh(b @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"]) @ w[p + "mlp.2.weight"].T
        h = h + gate2 * (mlp + w[p + "mlp.2.bias"])
    # 5. final layer
    modulation = c @ w["output_layer.adaLN_modulation.weight"].T + w["output_layer.adaLN_modulation.bias"]
    shift, scale = (m[:, None] for m in modulation.split(d, dim=-1))
    out = layer_norm(h, w["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return out @ w["output_layer.linear.weight"].T + w["output_layer.linear.bias"]


def write_hf_folder(folder, state, time_conditioning, **config_changes):
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "mdlm", "architectures": ["MDLM"], "auto_map": {"AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
        "vocab_size": VOCAB, "model_length": LENGTH, "hidden_dim": HIDDEN, "cond_dim": COND, "n_blocks": BLOCKS,
        "n_heads": HEADS, "dropout": 0.1, "time_conditioning": time_conditioning, "return_dict": False,
        "torch_dtype": "float32", "transformers_version": "4.38.2",
    }
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({f"backbone.{key}": value.contiguous() for key, value in state.items()}, folder / "model.safetensors")
    return folder


def assert_matches_reference(model, state, time_conditioning, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for seq_len in SEQ_LENS:
        ids = torch.randint(0, VOCAB, (3, seq_len), generator=generator)
        ids[0, : seq_len // 2] = VOCAB - 1  # some [MASK] tokens, as the model sees them
        sigma = 7.0 * torch.rand(3, generator=generator)  # -log(alpha_t) of MDLM's schedule spans (0, 6.9]
        with torch.no_grad():
            logits = model(ids, sigma).logits
        expected = reference_forward(state, ids, sigma, time_conditioning)
        assert logits.dtype == torch.float32 and logits.shape == (3, seq_len, VOCAB)
        error = (logits.double() - expected).abs().max().item()
        assert error <= 1e-5, (seq_len, error)
        # Non-vacuous: the logits vary across positions and the conditioning actually enters.
        assert expected.std() > 0.3


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_hf_folder_converts_exactly(tmp_path, time_conditioning):
    state = published_state_dict(seed=1)
    folder = write_hf_folder(tmp_path / "mdlm", state, time_conditioning)
    model = convert_mdlm_checkpoint(folder)
    assert isinstance(model, MaskedDiffusionLM) and not model.training
    config = model.config
    assert (config.vocab_size, config.mask_token_id, config.hidden_size, config.num_attention_heads) == (37, 36, 32, 4)
    assert (config.cond_dim, config.num_hidden_layers, config.max_position_embeddings) == (16, 2, 64)
    assert config.time_conditioning is time_conditioning
    assert_matches_reference(model, state, time_conditioning)


def test_time_conditioning_matters_in_the_reference():
    # Guards the test above: with conditioning on, sigma changes the reference logits.
    state = published_state_dict(seed=1)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    low = reference_forward(state, ids, torch.full((2,), 0.1), True)
    high = reference_forward(state, ids, torch.full((2,), 5.0), True)
    assert (low - high).abs().max() > 0.1


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_raw_state_dict_without_prefix_converts_exactly(tmp_path, time_conditioning):
    state = published_state_dict(seed=2, rotary=False)
    path = tmp_path / "weights.safetensors"
    save_file(state, path)
    model = convert_mdlm_checkpoint(path, num_attention_heads=HEADS, time_conditioning=time_conditioning,
                                    max_position_embeddings=LENGTH)
    assert model.config.mask_token_id == VOCAB - 1 and model.config.intermediate_size == 4 * HIDDEN
    assert_matches_reference(model, state, time_conditioning)


def test_lightning_checkpoint_uses_ema_when_present(tmp_path):
    raw = published_state_dict(seed=3)
    ema = published_state_dict(seed=4, rotary=False)
    order = [key for key in raw if key != "rotary_emb.inv_freq"]  # the backbone's parameter order
    checkpoint = {
        "state_dict": {f"backbone.{key}": value for key, value in raw.items()},
        "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": [ema[key] for key in order]},
        "global_step": 10,
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    # num_attention_heads comes from the rotary buffer's size.
    assert_matches_reference(convert_mdlm_checkpoint(path, time_conditioning=True), ema, True)
    assert_matches_reference(convert_mdlm_checkpoint(path, time_conditioning=True, use_ema=False), raw, True)

    del checkpoint["ema"]
    torch.save(checkpoint, path)
    assert_matches_reference(convert_mdlm_checkpoint(path, time_conditioning=True), raw, True)
    with pytest.raises(ValueError, match="use_ema"):
        convert_mdlm_checkpoint(path, time_conditioning=True, use_ema=True)


class NotATensor:
    pass


def test_pickles_with_objects_are_refused(tmp_path):
    path = tmp_path / "weights.bin"
    torch.save({"state_dict": published_state_dict(), "hyper_parameters": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_mdlm_checkpoint(path, time_conditioning=False)
    with open(tmp_path / "plain.bin", "wb") as handle:
        pickle.dump({"x": NotATensor()}, handle, protocol=2)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_mdlm_checkpoint(tmp_path / "plain.bin", time_conditioning=False)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    state = published_state_dict()
    state["blocks.1.mlp.0.weight"] = torch.randn(100, HIDDEN)
    state["blocks.1.mlp.0.bias"] = torch.randn(100)
    expected = r"blocks\.1\.mlp\.0\.weight: source \(100, 32\) vs expected \(128, 32\)"
    with pytest.raises(ValueError, match=expected):
        convert_mdlm_checkpoint(write_hf_folder(tmp_path / "f", state, False))
    # A raw file reads intermediate_size from block 0, so block 1 is the one that does not fit.
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=expected):
        convert_mdlm_checkpoint(tmp_path / "w.safetensors", time_conditioning=False)


def test_vocab_size_and_mask_id_are_checked(tmp_path):
    state = published_state_dict()
    with pytest.raises(ValueError, match=r"vocab_embed\.embedding: source \(37, 32\) vs expected \(38, 32\)"):
        convert_mdlm_checkpoint(write_hf_folder(tmp_path / "a", state, False, vocab_size=38))
    with pytest.raises(ValueError, match="mask_token_id"):
        convert_mdlm_checkpoint(write_hf_folder(tmp_path / "b", state, False, mask_index=37))
    model = convert_mdlm_checkpoint(write_hf_folder(tmp_path / "c", state, False, mask_index=0))
    assert model.config.mask_token_id == 0
    with pytest.raises(ValueError, match="model_type"):
        convert_mdlm_checkpoint(write_hf_folder(tmp_path / "d", state, False, model_type="llama"))
    # A wrong head count shows in the rotary buffer's size.
    with pytest.raises(ValueError, match=r"rotary_emb\.inv_freq.*num_attention_heads"):
        convert_mdlm_checkpoint(write_hf_folder(tmp_path / "e", state, False, n_heads=2))


def test_extra_and_missing_keys_are_reported(tmp_path):
    state = published_state_dict()
    state["blocks.0.attn.bias"] = torch.zeros(3)
    state["noise.sigma_max"] = torch.zeros(1)
    folder = write_hf_folder(tmp_path / "extra", state, False)
    with pytest.raises(ValueError, match=r"2 key\(s\).*blocks\.0\.attn\.bias.*noise\.sigma_max.*strict=False"):
        convert_mdlm_checkpoint(folder)
    with pytest.warns(UserWarning, match=r"blocks\.0\.attn\.bias.*noise\.sigma_max"):
        model = convert_mdlm_checkpoint(folder, strict=False)
    assert_matches_reference(model, published_state_dict(), False)

    state = published_state_dict()
    del state["output_layer.linear.bias"], state["blocks.1.norm2.weight"]
    with pytest.raises(ValueError, match=r"lacks 2 weight\(s\).*blocks\.1\.norm2\.weight.*output_layer\.linear\.bias"):
        convert_mdlm_checkpoint(write_hf_folder(tmp_path / "missing", state, False))


def test_raw_file_needs_the_values_the_weights_do_not_record(tmp_path):
    save_file(published_state_dict(rotary=False), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="time_conditioning, num_attention_heads must be given"):
        convert_mdlm_checkpoint(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="time_conditioning must be given"):
        convert_mdlm_checkpoint(tmp_path / "w.safetensors", num_attention_heads=HEADS)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="source"):
        convert_mdlm_checkpoint(tmp_path / "nothing-here.safetensors")
    with pytest.raises(ValueError, match="config.json"):
        convert_mdlm_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a state dict"):
        convert_mdlm_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mdlm"}))
    with pytest.raises(ValueError, match="safetensors"):
        convert_mdlm_checkpoint(tmp_path)


def test_unreachable_hub_gives_one_clear_error(monkeypatch):
    import httpx2
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(HubUnreachableError, match="kuleshov-group/mdlm-owt.*cannot be reached"):
        convert_mdlm_checkpoint("kuleshov-group/mdlm-owt")


def test_offline_mode_gives_the_same_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match="kuleshov-group/mdlm-owt"):
        convert_mdlm_checkpoint("kuleshov-group/mdlm-owt")


def test_output_dir_and_from_mdlm(tmp_path):
    state = published_state_dict(seed=5)
    folder = write_hf_folder(tmp_path / "mdlm", state, True)
    model = MaskedDiffusionLM.from_mdlm(folder, output_dir=tmp_path / "out", dtype=torch.float32)
    loaded = MaskedDiffusionLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(loaded.config, MaskedDiffusionLMConfig) and loaded.config.time_conditioning
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids, torch.tensor([0.5, 3.0])).logits, model(ids, torch.tensor([0.5, 3.0])).logits)
    assert_matches_reference(loaded, state, True)


def test_config_overrides_and_attention_implementation(tmp_path):
    state = published_state_dict(seed=6)
    folder = write_hf_folder(tmp_path / "mdlm", state, False)
    model = convert_mdlm_checkpoint(folder, max_position_embeddings=128, attn_implementation="eager", dropout=0.0)
    assert model.config.max_position_embeddings == 128 and model.config.dropout == 0.0
    assert model.config._attn_implementation == "eager"
    assert_matches_reference(model, state, False)
    # A noise-conditioned student built from the checkpoint starts as the teacher (zero shadow embedding).
    student = convert_mdlm_checkpoint(folder, noise_conditioning=True)
    assert torch.count_nonzero(student.shadow_embed.linear.weight) == 0
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shadow = torch.rand(2, 7, 2)
        # (`model` runs eager attention, the student sdpa: equal up to float32 rounding)
        torch.testing.assert_close(student(ids, shadow_features=shadow).logits, model(ids).logits, atol=1e-5, rtol=0)
    bf16 = convert_mdlm_checkpoint(folder, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray warnings on a clean conversion
        convert_mdlm_checkpoint(folder)


def word_tokenizer(num_tokens: int):
    """A tokenizer with `num_tokens` words and no mask token, like GPT-2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(num_tokens)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_tokenizer_writes_a_pipeline_that_round_trips(tmp_path):
    from mcd_hf.pipeline_mcd import MCDPipeline
    from mcd_hf.scheduling_mcd import MaskedDualityScheduler

    state = published_state_dict(seed=7)
    folder = write_hf_folder(tmp_path / "mdlm", state, True)
    tokenizer = word_tokenizer(VOCAB - 1)
    model = convert_mdlm_checkpoint(folder, tmp_path / "pipe", tokenizer=tokenizer)
    assert tokenizer.mask_token is None  # the caller's tokenizer is left as it was

    pipe = MCDPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.model, MaskedDiffusionLM) and isinstance(pipe.scheduler, MaskedDualityScheduler)
    assert pipe.scheduler.config.noise_schedule == "loglinear" and pipe.scheduler.config.eps == 1e-3
    assert pipe.scheduler.config.mask_token_id == pipe.tokenizer.mask_token_id == VOCAB - 1
    assert pipe.scheduler.config.vocab_size == VOCAB
    assert str(folder) in (tmp_path / "pipe" / "README.md").read_text()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.equal(pipe.model.eval()(ids, sigma).logits, model(ids, sigma).logits)
    assert_matches_reference(pipe.model, state, True)

    # A tokenizer given by path works the same; one whose [MASK] lands elsewhere is refused.
    tokenizer.save_pretrained(tmp_path / "tok")
    convert_mdlm_checkpoint(folder, tmp_path / "pipe2", tokenizer=str(tmp_path / "tok"))
    assert MCDPipeline.from_pretrained(tmp_path / "pipe2").tokenizer.mask_token_id == VOCAB - 1
    with pytest.raises(ValueError, match="tokenizer.*mask token has id 40.*mask_token_id is 36"):
        convert_mdlm_checkpoint(folder, tmp_path / "pipe3", tokenizer=word_tokenizer(40))


def test_command_line(tmp_path):
    from mcd_hf.cli import main

    state = published_state_dict(seed=8)
    folder = write_hf_folder(tmp_path / "mdlm", state, False)
    word_tokenizer(VOCAB - 1).save_pretrained(tmp_path / "tok")
    assert main(["convert-mdlm", str(folder), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok")]) == 0
    from mcd_hf.pipeline_mcd import MCDPipeline

    assert_matches_reference(MCDPipeline.from_pretrained(tmp_path / "out").model, state, False)
