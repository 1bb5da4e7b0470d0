import json
import os

import pytest
import torch

from mcd_hf import MaskedDiffusionLM, MaskedDiffusionLMConfig, MaskedDualityScheduler, MCDPipeline
from mcd_hf.hub import HubUnreachableError
from mcd_hf.tokenization import build_character_tokenizer

ALPHABET = "abcdefgh"
MASK_ID = len(ALPHABET)
SEQ_LEN = 12


def make_pipeline(time_conditioning=False, sampler="ancestral", seed=0, num_inference_steps=None):
    torch.manual_seed(seed)
    config = MaskedDiffusionLMConfig(
        vocab_size=len(ALPHABET) + 1, mask_token_id=MASK_ID, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, cond_dim=16, max_position_embeddings=SEQ_LEN, time_conditioning=time_conditioning,
        dropout=0.0,
    )
    model = MaskedDiffusionLM(config).eval()
    # adaLN-Zero and the zero output layer make a fresh model uniform; random weights make the test informative.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    scheduler = MaskedDualityScheduler(
        mask_token_id=MASK_ID, vocab_size=len(ALPHABET) + 1, sampler=sampler, num_inference_steps=num_inference_steps
    )
    tokenizer = build_character_tokenizer(ALPHABET)
    pipe = MCDPipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
def test_save_load_same_seed_same_sequences(tmp_path, sampler):
    pipe = make_pipeline(sampler=sampler)
    before = pipe(batch_size=3, num_inference_steps=6, generator=seeded(1), output_type="ids").sequences
    pipe.save_pretrained(tmp_path / "pipe", card_info={"method": "mdlm"})
    for name in ("model_index.json", "model", "scheduler", "tokenizer", "README.md"):
        assert (tmp_path / "pipe" / name).exists(), name
    loaded = MCDPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    after = loaded(batch_size=3, num_inference_steps=6, generator=seeded(1), output_type="ids").sequences
    assert torch.equal(before, after)
    assert (before != MASK_ID).all()
    assert loaded.scheduler.config.sampler == sampler
    # the model class is recorded by module path: model_index.json is a file format
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["model"] == ["mcd_hf.modeling_mcd", "MaskedDiffusionLM"]
    assert index["scheduler"] == ["mcd_hf.scheduling_mcd", "MaskedDualityScheduler"]


def test_model_card_records_steps_and_metadata(tmp_path):
    pipe = make_pipeline(num_inference_steps=4)
    pipe.save_pretrained(tmp_path, card_info={"method": "mcd", "base_model": "org/teacher", "rounds": 2})
    card = (tmp_path / "README.md").read_text()
    assert "library_name: mcd_hf" in card and "masked-diffusion" in card and "mcd" in card
    assert "base_model: org/teacher" in card
    assert "num_inference_steps=4" in card
    loaded = MCDPipeline.from_pretrained(tmp_path)
    assert loaded.card_info["rounds"] == 2 and loaded.card_info["method"] == "mcd"
    assert loaded.scheduler.config.num_inference_steps == 4


def test_save_keeps_a_readme_it_did_not_write(tmp_path):
    (tmp_path / "README.md").write_text("my own notes")
    make_pipeline().save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own notes"


def test_texts_decode_and_default_steps():
    pipe = make_pipeline(num_inference_steps=3)
    out = pipe(batch_size=2, generator=seeded(0))
    assert len(out.texts) == 2 and all(len(text) == SEQ_LEN for text in out.texts)
    assert all(set(text) <= set(ALPHABET) for text in out.texts)
    assert out.num_model_calls <= 3


def test_prefix_is_kept_verbatim():
    pipe = make_pipeline()
    out = pipe(["abc", "hgfed"], num_inference_steps=5, generator=seeded(3))
    assert out.texts[0].startswith("abc") and out.texts[1].startswith("hgfed")
    assert out.sequences.shape == (2, SEQ_LEN)


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
def test_infill_keeps_every_given_token(sampler):
    pipe = make_pipeline(sampler=sampler)
    canvas = torch.full((2, SEQ_LEN), MASK_ID)
    canvas[:, 0] = 1
    canvas[:, 5] = 7
    canvas[1, -1] = 3
    out = pipe(input_ids=canvas, num_inference_steps=4, generator=seeded(5), output_type="ids")
    given = canvas != MASK_ID
    assert torch.equal(out.sequences[given], canvas[given])
    assert (out.sequences != MASK_ID).all()


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
def test_generator_list_is_per_sequence(sampler):
    pipe = make_pipeline(sampler=sampler)
    three = pipe(batch_size=3, num_inference_steps=6, generator=[seeded(s) for s in (10, 11, 12)], output_type="ids")
    two = pipe(batch_size=2, num_inference_steps=6, generator=[seeded(s) for s in (12, 10)], output_type="ids")
    assert torch.equal(two.sequences[0], three.sequences[2])
    assert torch.equal(two.sequences[1], three.sequences[0])


def test_callback_receives_step_tensors():
    pipe = make_pipeline()
    seen = []

    def callback(pipeline, step_index, timestep, tensors):
        seen.append((step_index, float(timestep), tensors["sample"].clone(), tensors["pred_logits"].shape))
        return {}

    pipe(batch_size=2, num_inference_steps=4, generator=seeded(0), callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=["sample", "pred_logits"], output_type="ids")
    assert [s[0] for s in seen] == list(range(len(seen))) and 1 <= len(seen) <= 4
    assert seen[0][1] == pytest.approx(1.0)
    assert seen[0][3] == (2, SEQ_LEN, len(ALPHABET) + 1)
    masked = [int((s[2] == MASK_ID).sum()) for s in seen]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0


@pytest.mark.parametrize("sampler", ["ancestral", "shadow"])
@pytest.mark.parametrize("steps", [4, 64])
def test_model_calls_bounded_without_time_conditioning(sampler, steps):
    pipe = make_pipeline(sampler=sampler)
    out = pipe(batch_size=1, num_inference_steps=steps, generator=seeded(2), output_type="ids")
    assert 1 <= out.num_model_calls <= min(steps, SEQ_LEN)


def test_time_conditioned_model_calls_every_revealing_step():
    pipe = make_pipeline(time_conditioning=True, sampler="shadow")
    out = pipe(batch_size=1, num_inference_steps=64, generator=seeded(2), output_type="ids")
    # The shadow sampler knows which steps reveal nothing and skips them: at most one call per revealing step.
    assert 1 <= out.num_model_calls <= SEQ_LEN + 1


def test_bfloat16_pipeline_samples():
    pipe = make_pipeline(sampler="shadow").to(dtype=torch.bfloat16)
    out = pipe(batch_size=2, num_inference_steps=4, generator=seeded(0), output_type="ids")
    assert (out.sequences != MASK_ID).all()


def test_mask_id_disagreement_is_rejected():
    pipe = make_pipeline()
    scheduler = MaskedDualityScheduler(mask_token_id=0, vocab_size=len(ALPHABET) + 1)
    with pytest.raises(ValueError, match="mask token id"):
        MCDPipeline(model=pipe.model, scheduler=scheduler, tokenizer=pipe.tokenizer)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": SEQ_LEN + 1}, "seq_len"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "abcdefghabcdefgh"}, "prompt"),
        ({"input_ids": torch.tensor([[0, 1, 99]])}, "input_ids"),
        ({"input_ids": torch.tensor([[0, -1, MASK_ID]])}, "input_ids"),
        ({"batch_size": 2, "generator": [torch.Generator()]}, "generator"),
        ({"output_type": "pil"}, "output_type"),
        ({"callback_on_step_end_tensor_inputs": ["nope"]}, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, argument):
    pipe = make_pipeline()
    with pytest.raises(ValueError, match=argument):
        pipe(**kwargs)


@pytest.fixture
def unreachable_hub(monkeypatch):
    # Port 9 (discard) on loopback refuses at once: the real network code path, no network needed.
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_tests")


def test_push_without_hub_gives_one_clear_error(unreachable_hub):
    pipe = make_pipeline()
    with pytest.raises(HubUnreachableError, match="cannot be reached"):
        pipe.push_to_hub("someone/tiny-mcd")


def test_push_in_offline_mode_gives_one_clear_error(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match="cannot be reached"):
        make_pipeline().push_to_hub("someone/tiny-mcd")


def test_download_without_hub_gives_one_clear_error(unreachable_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubUnreachableError, match="cannot be reached"):
        MCDPipeline.from_pretrained("someone/not-here")


def test_loads_offline_from_a_local_folder(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    import subprocess
    import sys

    code = (
        "import sys, torch; from mcd_hf import MCDPipeline; p = MCDPipeline.from_pretrained(sys.argv[1]); "
        "p.set_progress_bar_config(disable=True); print(p(batch_size=1, num_inference_steps=2).texts[0])"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == SEQ_LEN
