"""The quiet CLI: our own lines and one bar per training stage; the libraries' bars, log dicts and deprecation
warnings only with --verbose."""

from __future__ import annotations

import json
import warnings

import pytest

from rlhf import cli, console


def _pairs(path, n: int = 16):
    rows = [{"prompt": f"Review film {i}", "chosen": "a wonderful film", "rejected": "a dull film"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def clean_env(monkeypatch):
    """The variables quiet_libraries sets, absent now and restored after the test (setenv first, so that
    monkeypatch records them even where they were absent)."""
    for name in (console.VERBOSE_ENV, "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS",
                 "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TQDM_DISABLE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_quiet_silences_library_deprecations_but_not_ours_and_verbose_keeps_everything(clean_env):
    import os

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_libraries()
        assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        warnings.warn_explicit("old", FutureWarning, "x.py", 1, module="transformers.trainer")
        warnings.warn_explicit("mine", FutureWarning, "x.py", 1, module="rlhf.ppo")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="transformers.trainer")
    assert [str(w.message) for w in caught] == ["mine", "ours"]  # only the libraries' deprecations go
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        clean_env.delenv(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_libraries(True)
        assert console.verbose() and "TRANSFORMERS_VERBOSITY" not in os.environ
        warnings.warn_explicit("old", FutureWarning, "x.py", 1, module="transformers.trainer")
    assert [str(w.message) for w in caught] == ["old"]


def test_quiet_keeps_deepspeeds_logger_to_errors(clean_env):
    """DeepSpeed warns that it found no GPU on every CPU command that imports accelerate's trainer: quiet drops its
    warnings and keeps its errors."""
    import logging

    ds = logging.getLogger("DeepSpeed")
    clean_env.setattr(ds, "filters", [])
    console.quiet_libraries()
    warning = logging.LogRecord("DeepSpeed", logging.WARNING, "x.py", 1, "Setting accelerator to CPU.", None, None)
    error = logging.LogRecord("DeepSpeed", logging.ERROR, "x.py", 1, "a real failure", None, None)
    assert not ds.filter(warning) and ds.filter(error)


def test_a_training_stage_draws_one_bar_and_prints_no_log_dicts_unless_verbose(tmp_path, tiny_model_dir, capfd,
                                                                               clean_env):
    data = _pairs(tmp_path / "pairs.jsonl")
    argv = ["dpo", "--model", tiny_model_dir, "--data", data, "--device", "cpu", "--precision", "fp32",
            "--max_steps", "2", "--batch_size", "4", "--logging_steps", "1", "--max_length", "64"]
    assert cli.main(argv + ["--output_dir", str(tmp_path / "quiet")]) == 0
    out, err = capfd.readouterr()
    assert "2 steps on 8 pairs" in out and "reference log-probs of 8 training" in out
    assert "{'loss'" not in out + err and "Computing reference log probs" not in err  # the libraries' own
    assert "DPO: 100%" in err  # our one bar, in our words
    clean_env.delenv(console.VERBOSE_ENV, raising=False)
    assert cli.main(argv + ["--output_dir", str(tmp_path / "loud"), "--verbose"]) == 0
    out, err = capfd.readouterr()
    assert "'loss'" in out + err and "Computing reference log probs" in err


def test_verbose_is_in_the_help_of_rlhf_and_of_each_stage(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "--verbose" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["reward", "--help"])
    assert "--verbose" in capsys.readouterr().out
