"""Sample responses from a model for a few prompts and print them: the quickest look at a policy.

Prompts go through the model's chat template (a user turn, after an optional system prompt) and are generated
in one left-padded batch; `generate.py` uses the same `generate_batch` to fill the preference store.

    rlhf sample --prompt "Write a short review of the film Alien." --max_new_tokens 48
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.config import UserError, field
from rlhf.models import DEFAULT_MODEL, load


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

    def __post_init__(self):
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
) -> list[dict]:
    """Generate one continuation per rendered prompt text, in one left-padded batch with the KV cache.

    Returns, per prompt, the decoded text, its token ids (through the EOS, if any), the number of new tokens, and
    whether it ended with EOS. Left padding
    keeps every prompt's last token next to its first generated one; `generate` derives position ids from the
    attention mask, so padded rows see the same positions as unpadded ones.
    """
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    sampling = temperature > 0
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
    results = []
    for row in new:
        is_eos = row == tokenizer.eos_token_id
        ended = bool(is_eos.any())
        length = int(is_eos.nonzero()[0, 0]) + 1 if ended else int((row != tokenizer.pad_token_id).sum())
        text = tokenizer.decode(row[:length], skip_special_tokens=True).strip()
        results.append({"text": text, "token_ids": row[:length].tolist(), "new_tokens": length, "ended_with_eos": ended})
    return results


def run(config: SampleConfig) -> list[dict]:
    loaded = load(config.model, device=config.device, precision=config.precision)
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
    )
    for prompt, result in zip(prompts, results):
        result["prompt"] = prompt
    return results
