import json

import pytest

from mcd_hf.quickstart import main

TINY = ["--teacher_train_steps", "4", "--steps_per_round", "2", "--num_samples", "8", "--hidden_size", "32",
        "--num_hidden_layers", "1", "--seq_len", "16", "--teacher_steps", "16", "--disable_progress_bar"]


def test_demo_end_to_end_and_rerun_reuses(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path), *TINY]) == 0
    results = json.loads((tmp_path / "quickstart.json").read_text())
    systems = [(row["system"], row["steps"]) for row in results["rows"]]
    assert systems == [("teacher", 16), ("teacher", 1), ("MCD student", 1)]
    for row in results["rows"]:
        assert row["excess_nll"] > -0.5  # NLL - H can dip below 0 only by noise on 8 samples
        assert 0 < row["entropy"] <= 3.47  # at most log(32)
    assert (tmp_path / "quickstart.png").stat().st_size > 0
    assert (tmp_path / "student" / "model_index.json").exists()
    teacher_weights = (tmp_path / "teacher" / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()

    assert main(["--output_dir", str(tmp_path), *TINY]) == 0
    assert "reusing the teacher" in capsys.readouterr().out
    assert (tmp_path / "teacher" / "model" / "model.safetensors").stat().st_mtime_ns == teacher_weights


@pytest.mark.parametrize("flag, value", [("--num_rounds", "0"), ("--teacher_steps", "12")])
def test_demo_rejects_bad_arguments(tmp_path, flag, value):
    with pytest.raises(ValueError, match=flag):
        main(["--output_dir", str(tmp_path), *TINY, flag, value])
