"""The whole loop, CI-sized: the tiny model through generate -> label -> export -> DPO -> evaluate, twice."""

from __future__ import annotations

import json

import pytest

from rlhf.cli import main
from rlhf.config import UserError, load_config
from rlhf.loop import LoopConfig, run


@pytest.mark.slow
def test_two_rounds_end_to_end_then_resume(tmp_path, tiny_model_dir, capsys):
    config = load_config(LoopConfig, name="ci", runs_dir=str(tmp_path), rounds=2, base_model=tiny_model_dir,
                         device="cpu", prompts_per_round=8, max_new_tokens=6, batch_size=8, dpo_epochs=1.0,
                         dpo_batch_size=4, max_length=64, eval_prompts=6)
    result = run(config)
    root = tmp_path / "ci"
    for k in (1, 2):
        for step in ("generate", "label", "export", "dpo", "evaluate"):
            assert (root / f"round-{k}" / f"{step}.json").is_file()
        assert (root / f"round-{k}" / "dpo" / "model.safetensors").is_file()
        assert (root / f"round-{k}" / "eval" / "report.html").is_file()
    first = json.loads((root / "round-1" / "generate.json").read_text())
    assert first["tasks"] == 8
    # Round 2 trained on both rounds' pairs, starting from round 1's policy, and was compared with it too.
    assert json.loads((root / "round-2" / "export.json").read_text())
    labels = [m["label"] for m in result["evaluation"]["models"]]
    assert labels == ["base", "prompt", "aligned 1", "aligned 2"]
    out = capsys.readouterr().out
    assert "wall time per stage" in out and "report:" in out and "prompt baseline" in out

    # Running it again resumes: every step is found done, nothing is recomputed.
    again = run(config)
    assert "done earlier, skipped" in capsys.readouterr().out
    assert again["policy"] == result["policy"]


def test_loop_options_are_checked():
    with pytest.raises(UserError):
        load_config(LoopConfig, labeler="crowd")
    with pytest.raises(UserError):
        load_config(LoopConfig, n=1)


def test_demo_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--prompts_per_round" in capsys.readouterr().out
