"""Sample responses from a model for a few prompts and print them: the quickest look at a policy.

Prompts go through the model's chat template (a user turn, after an optional system prompt) and are generated
in one left-padded batch; `generate.py` uses the same `generate_batch` to fill the preference store.

Three backends: `sampler` (rlhf.sampler, our own decode loop, the default: the fastest measured on these CPUs), `hf`
(transformers' generate, kept as the reference path) and `vllm` (`pip install vllm`, for users with GPUs:
PagedAttention and continuous batching). vllm is imported only when asked for; where it is not installed the
request falls back to `sampler` with a one-time warning. The vLLM path is written against vLLM's documented offline API
(LLM, SamplingParams, LLM.generate with token-id prompts) and has not been run here: no vLLM on these machines.

    rlhf sample --prompt "Write a short review of the film Alien." --max_new_tokens 48
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from rlhf.config import UserError, field
from rlhf.models import DEFAULT_MODEL, Loaded, load, load_tokenizer, pick_dtype, resolve

BACKENDS = ("sampler", "hf", "vllm")
BACKEND_HELP = ("sampler (rlhf.sampler: our decode loop, the fastest measured on CPUs), hf (transformers' generate) "
                "or vllm (`pip install vllm`, GPU; falls back to sampler with a warning where vllm is not installed).")


@dataclass
class SampleConfig:
    # Model
    model: str = field(DEFAULT_MODEL, "Model spec: the embedded default, a local model directory, or a Hub id.")
    device: str = field("auto", "auto, cpu, cuda, cuda:1, mps.")
    precision: str = field("auto", "auto (bf16 where the hardware has it, else fp32), fp32, bf16 or fp16.")
    # Data
    prompt: list[str] = field(["Write a short review of the film Alien."], "One or more user prompts.")
    system: str = field("", "Optional system prompt put before each user turn.")
    # Generation
    n: int = field(1, "Responses per prompt.")
    max_new_tokens: int = field(64, "Maximum new tokens per response.")
    temperature: float = field(0.7, "Sampling temperature; 0 means greedy decoding.")
    top_p: float = field(0.95, "Nucleus sampling: keep the smallest token set with this total probability.")
    seed: int = field(0, "Random seed, for reproducible samples.")
    backend: Literal["sampler", "hf", "vllm"] = field("sampler", BACKEND_HELP)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
        if not self.prompt or any(not p.strip() for p in self.prompt):
            raise ValueError("every prompt must be non-empty text")
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


def to_messages(prompt: str | list[dict], system: str = "") -> list[dict]:
    """A prompt (plain text or chat messages) as chat messages, with the system prompt first if given."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return messages


def render_prompt(tokenizer, prompt: str | list[dict], system: str = "") -> str:
    """The text the model sees: its chat template applied, ending where the assistant turn begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(to_messages(prompt, system), tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise UserError("this model's tokenizer has no chat template, so prompts must be plain text")
    return (system + "\n\n" if system else "") + prompt


_warned_no_vllm = False
_warned_settings: list[str] = []  # the last generation-config settings warned about (once, not per batch)


def vllm_engine(spec: str, precision: str = "auto", memory: float = 0.8):
    """A vLLM engine (`vllm.LLM`) on a model spec, or None where vllm is not installed (a warning, once per process;
    the caller then samples with transformers). `memory`: the share of GPU memory vLLM may take for weights and KV
    cache (its own default is 0.9; less leaves room for a reward model or a second engine beside it)."""
    global _warned_no_vllm
    try:
        import vllm
    except ImportError:
        if not _warned_no_vllm:
            _warned_no_vllm = True
            warnings.warn("backend vllm: vllm is not installed (pip install vllm); sampling with rlhf.sampler",
                          stacklevel=2)
        return None
    # vLLM runs on the GPU; `auto` there is bf16 where supported. Weights load from the model directory as for hf.
    dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(pick_dtype("cuda", precision), "float32")
    path = resolve(spec)
    return vllm.LLM(model=path, tokenizer=path, dtype=dtype, gpu_memory_utilization=memory)


def load_for_sampling(spec: str, device: str = "auto", precision: str = "auto", backend: str = "sampler",
                      memory: float = 0.8) -> Loaded:
    """What `generate_batch` samples from: a transformers model, or with backend vllm a vLLM engine in its place
    (then the model is loaded only once, by vLLM; without vllm installed, the transformers model)."""
    if backend == "vllm":
        engine = vllm_engine(spec, precision, memory)
        if engine is not None:
            path = resolve(spec)
            return Loaded(model=engine, tokenizer=load_tokenizer(path), path=path)
    return load(spec, device=device, precision=precision)


def _generate_vllm(engine, tokenizer, texts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                   generator_seed: int | None) -> list[dict]:
    """generate_batch on a vLLM engine: the same prompts, the same result dicts. Not run here (no vLLM)."""
    from vllm import SamplingParams

    # Token ids, not text: vLLM would tokenize text with special tokens added (a second BOS before the chat
    # template's own), which transformers' path leaves out.
    prompts = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    sampling = temperature > 0
    # One seed per prompt: a prompt repeated n times (rlhf sample --n, generate's candidates) must get n samples,
    # and one shared seed would give n copies of one.
    params = [SamplingParams(n=1, temperature=temperature if sampling else 0.0, top_p=top_p if sampling else 1.0,
                             max_tokens=max_new_tokens, stop_token_ids=[tokenizer.eos_token_id],
                             seed=None if generator_seed is None else generator_seed + i)
              for i in range(len(texts))]
    results = []
    for request in engine.generate(prompts, params, use_tqdm=False):
        completion = request.outputs[0]
        ids = list(completion.token_ids)
        ended = completion.finish_reason == "stop"
        if ended and ids[-1:] != [tokenizer.eos_token_id]:
            ids.append(tokenizer.eos_token_id)  # through the EOS, as transformers' path counts it
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append({"text": text, "token_ids": ids, "new_tokens": len(ids), "ended_with_eos": ended})
    return results


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    texts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    generator_seed: int | None = None,
    backend: str = "sampler",
) -> list[dict]:
    """Generate one continuation per rendered prompt text, in one left-padded batch with the KV cache.

    Returns, per prompt, the decoded text, its token ids (through the EOS, if any), the number of new tokens, and
    whether it ended with EOS. Left padding keeps every prompt's last token next to its first generated one, and
    position ids follow the attention mask, so padded rows continue as they would alone. `backend`: `sampler`
    (rlhf.sampler, our decode loop) or `hf` (transformers' generate); `model` may instead be a vLLM engine from
    `load_for_sampling`, which batches by itself (seeded per prompt: the samples differ from transformers' own).
    """
    if not isinstance(model, torch.nn.Module):
        return _generate_vllm(model, tokenizer, texts, max_new_tokens, temperature, top_p, generator_seed)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = temperature > 0
    from rlhf.sampler import sample, unimplemented_settings

    ignored = unimplemented_settings(model) if backend != "hf" else []
    if ignored and ignored != _warned_settings:
        _warned_settings[:] = ignored
        warnings.warn(f"the model's generation config sets {', '.join(ignored)}, which rlhf.sampler does not "
                      "implement: sampling with transformers' generate", stacklevel=2)
    if backend == "hf" or ignored:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]  # (B, T_new)
    else:
        generator = None if generator_seed is None else torch.Generator(model.device).manual_seed(generator_seed)
        new = sample(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, eos_ids=[tokenizer.eos_token_id],
                     pad_id=tokenizer.pad_token_id, generator=generator).tokens
    results = []
    for row in new:
        is_eos = row == tokenizer.eos_token_id
        ended = bool(is_eos.any())
        length = int(is_eos.nonzero()[0, 0]) + 1 if ended else int((row != tokenizer.pad_token_id).sum())
        text = tokenizer.decode(row[:length], skip_special_tokens=True).strip()
        results.append({"text": text, "token_ids": row[:length].tolist(), "new_tokens": length,
                        "ended_with_eos": ended})
    return results


def run(config: SampleConfig) -> list[dict]:
    loaded = load_for_sampling(config.model, config.device, config.precision, config.backend)
    prompts = [p for p in config.prompt for _ in range(config.n)]
    texts = [render_prompt(loaded.tokenizer, p, config.system) for p in prompts]
    results = generate_batch(
        loaded.model,
        loaded.tokenizer,
        texts,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        generator_seed=config.seed,
        backend=config.backend,
    )
    for prompt, result in zip(prompts, results):
        result["prompt"] = prompt
    return results
