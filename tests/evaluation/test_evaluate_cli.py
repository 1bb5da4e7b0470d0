import json

import pytest
import torch

from mcd_hf import MaskedDiffusionLM, MaskedDiffusionLMConfig, MaskedDualityScheduler, MCDPipeline
from mcd_hf.cli import main as mcd_hf_main
from mcd_hf.evaluation.evaluate_cli import main
from mcd_hf.evaluation.sources import get_source
from mcd_hf.tokenization import build_character_tokenizer


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny random pipeline over the default Markov source's 32 tokens, saved to a folder."""
    source = get_source("markov")
    torch.manual_seed(0)
    config = MaskedDiffusionLMConfig(
        vocab_size=source.vocab_size + 1, mask_token_id=source.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, cond_dim=16, max_position_embeddings=16, time_conditioning=False, dropout=0.0,
    )
    pipe = MCDPipeline(
        model=MaskedDiffusionLM(config).eval(),
        scheduler=MaskedDualityScheduler(mask_token_id=source.vocab_size, vocab_size=source.vocab_size + 1),
        tokenizer=build_character_tokenizer(source.alphabet),
    )
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    pipe.save_pretrained(folder)
    return str(folder)


def test_table_and_json(pipeline_dir, tmp_path, capsys):
    output = tmp_path / "out" / "eval.json"
    status = main([pipeline_dir, "--steps", "8,2", "--num_samples", "12", "--source", "markov",
                   "--temperatures", "1.0,0.5", "--batch_size", "5", "--output_json", str(output)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| steps | temp | NLL - H |" in printed
    assert printed.count("\n| 8 |") == 2 and printed.count("\n| 2 |") == 2  # 2 steps x 2 temperatures
    data = json.loads(output.read_text())
    reports = data["reports"]
    assert [(r["num_inference_steps"], r["temperature"]) for r in reports] == [(8, 1.0), (2, 1.0), (8, 0.5), (2, 0.5)]
    assert all(r["num_samples"] == 12 and r["sampler"] == "shadow" and r["seq_len"] == 16 for r in reports)
    assert all(set(r["excess_nll"]) == {"mean", "half_width"} for r in reports)
    assert data["paired_excess_nll_vs_first"][0] == "0" and len(data["paired_excess_nll_vs_first"]) == 4


def test_through_the_mcd_hf_command(pipeline_dir, capsys):
    assert mcd_hf_main(["evaluate", pipeline_dir, "--steps", "4", "--num_samples", "3", "--sampler", "ancestral"]) == 0
    printed = capsys.readouterr().out
    assert "sampler ancestral" in printed and "\n| 4 | 1 | - |" in printed  # no source: no NLL column value


def test_errors_are_one_line_and_non_zero(pipeline_dir, tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--steps", "4"]) != 0
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing" in error
    not_a_pipeline = tmp_path / "empty"
    not_a_pipeline.mkdir()
    assert main([str(not_a_pipeline), "--steps", "4"]) != 0
    assert capsys.readouterr().err.count("\n") == 1
    assert main([pipeline_dir, "--steps", "4", "--source", "nope"]) != 0
    assert "nope" in capsys.readouterr().err
    for bad_flags in (["--steps", "0"], ["--steps", "4", "--temperatures", "-1"], ["--steps", "4", "--bogus"]):
        with pytest.raises(SystemExit) as exit_info:
            main([pipeline_dir, *bad_flags])
        assert exit_info.value.code != 0
        assert capsys.readouterr().err.count("\n") == 1
