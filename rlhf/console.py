"""What a command prints: our own lines, and one progress bar per long stage in our words.

The libraries' own progress bars (datasets' "Map", "Creating json from Arrow format", TRL's reference log-probs),
the trainer's per-step log dicts and the deprecation warnings the libraries raise about themselves are noise to a
user who did not call those libraries; `rlhf --verbose COMMAND` (or RLHF_VERBOSE=1) brings them all back. The
choice travels in the environment, so the stages a benchmark runs as subprocesses inherit it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

VERBOSE_ENV = "RLHF_VERBOSE"
# Deprecation warnings whose origin is one of these are about the library's own internals or its next release.
LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "torch", "huggingface_hub", "tokenizers",
             "gradio", "setuptools", "pkg_resources")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


def quiet_libraries(verbose_: bool | None = None) -> None:
    """Silence the libraries' progress bars, advisory logs and deprecation warnings unless verbose. Call it before
    they are imported: they read these environment variables at import time. `verbose_` sets the choice (for
    this process and its children); None keeps the environment's."""
    if verbose_ is not None:
        os.environ[VERBOSE_ENV] = "1" if verbose_ else "0"
    if verbose():
        return
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # DeepSpeed's logger warns on import that it found no GPU ("Setting accelerator to CPU"), on every CPU command
    # that imports accelerate's trainer; its level is set when DeepSpeed creates it, so a filter keeps it to errors.
    logging.getLogger("DeepSpeed").addFilter(_errors_only)
    origin = rf"({'|'.join(LIBRARIES)})(\.|$)"
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=origin)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


@contextlib.contextmanager
def without_library_bars():
    """Inside, the tqdm bars libraries draw with `disable=TQDM_DISABLE` (TRL's reference log-probs pass) stay off
    unless verbose; ours pass `disable` themselves."""
    if verbose():
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def stage_progress(desc: str):
    """A transformers TrainerCallback drawing one bar for a training run (steps, with the last logged loss beside
    it) in place of the trainer's bar, which also prints every log entry as a dict."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StageProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=desc, unit="step",
                            dynamic_ncols=True, disable=not state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return StageProgress()


def use_stage_progress(trainer, desc: str) -> None:
    """Give `trainer` our one bar (stage_progress) unless verbose, when it keeps its own bar and log lines."""
    if verbose():
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # The trainer has one of them: PrinterCallback (every log dict printed) where transformers' verbosity is above
    # warnings, as quiet_libraries sets it, else ProgressCallback (a bar, and every log dict written under it).
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(stage_progress(desc))
