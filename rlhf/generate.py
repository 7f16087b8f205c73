"""Candidate generation into the preference store.

`rlhf generate` samples `n` responses per prompt from the policy in left-padded batches with the KV cache
(rlhf.sample.generate_batch), stores them with the model name and generation parameters, and pairs them into
labeling tasks (rlhf.pairing): a random pair among one model's samples, one response from each of two models,
or, given a reward model, the closest-scored pair (given an ensemble, the pair its members disagree on most) with a
`random_share` of prompts kept random. The models load before anything is written; then each prompt's responses and
tasks are written in one transaction
(Store.add_candidates) as soon as its batch is done, so Ctrl+C keeps everything finished so far and leaves nothing
half-written. The default `backend: sampler` samples with rlhf.sampler, `hf` with transformers' generate, `vllm`
with vLLM where it is installed (rlhf.sample.load_for_sampling; the sampler otherwise, with a warning).

    rlhf generate --model smollm2-135m-instruct --prompts sentiment --limit 32 --n 2 --max_new_tokens 48
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from rlhf.config import field
from rlhf.data import read_prompts
from rlhf.models import DEFAULT_MODEL
from rlhf.pairing import across_pairs, active_or_random_pair, random_pairs
from rlhf.sample import BACKEND_HELP, BACKENDS, generate_batch, load_for_sampling, render_prompt
from rlhf.sampler import unimplemented_settings
from rlhf.store import Store, masked_url


@dataclass
class GenerateConfig:
    # Model
    model: str = field(DEFAULT_MODEL, "The policy to sample from (spec or directory).")
    second_model: str = field("", "For pairing=across: the other model (e.g. the aligned one against the base).")
    reward_model: str = field("", "For pairing=active: the reward model directory that scores candidates (an "
                              "ensemble: the pair its members disagree on most).")
    device: str = field("auto", "auto, cpu, cuda, mps.")
    precision: str = field("auto", "auto, fp32, bf16 or fp16.")
    # Data
    db: str = field("", "Database URL ('' = sqlite under $RLHF_HOME).")
    prompts: str = field("sentiment", "Prompts: 'sentiment' (shipped set) or a .jsonl/.csv/.txt file.")
    split: str = field("train", "Use prompts of this split when the file has one ('' keeps all).")
    limit: int = field(0, "At most this many prompts (0: all).")
    system: str = field("", "Optional system prompt.")
    # Generation
    n: int = field(2, "Responses per prompt (per model with pairing=across).")
    max_new_tokens: int = field(48, "Maximum new tokens per response.")
    temperature: float = field(0.8, "Sampling temperature.")
    top_p: float = field(0.95, "Nucleus sampling.")
    batch_size: int = field(16, "Sequences generated per batch.")
    seed: int = field(0, "Random seed (sampling and pairing).")
    backend: Literal["sampler", "hf", "vllm"] = field("sampler", BACKEND_HELP)
    # Tasks
    pairing: str = field("random", "random (within one model), across (one per model) or active (closest reward).")
    random_share: float = field(0.25, "With pairing=active: share of prompts that keep a random pair (unbiased eval).")
    pairs_per_prompt: int = field(1, "Tasks made per prompt (disjoint pairs; needs n >= 2 x this).")
    rank: int = field(0, "Instead of pairs, one ranking task per prompt of this many responses (3-9; needs n >= "
                         "rank and pairing=random; 0: pairs). The export expands a ranking into its pairs.")
    rate: bool = field(False, "Also a rating task for every response (thumbs up or down and a Likert score on the "
                              "app's Rate page; KTO's data), beside the pairs or rankings.")
    overlap: int = field(1, "Votes wanted per task (several annotators: agreement figures).")
    round: int = field(0, "Round number stored with the tasks.")
    skip_existing: bool = field(False, "Skip prompts that already have a task in this round (resume a generation).")

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
        if self.pairing not in ("random", "across", "active"):
            raise ValueError("pairing must be random, across or active")
        if self.pairing == "across" and not self.second_model:
            raise ValueError("pairing=across needs second_model")
        if self.pairing == "active" and not self.reward_model:
            raise ValueError("pairing=active needs reward_model")
        if self.pairing != "across" and self.n < 2 * self.pairs_per_prompt:
            raise ValueError("n must be at least 2 x pairs_per_prompt")
        if self.rank and (not 3 <= self.rank <= 9 or self.n < self.rank or self.pairing != "random"):
            raise ValueError("rank must be 0 (pairs) or 3-9, with n >= rank and pairing=random")
        if min(self.n, self.max_new_tokens, self.batch_size, self.overlap, self.pairs_per_prompt) < 1:
            raise ValueError("n, max_new_tokens, batch_size, overlap and pairs_per_prompt must be >= 1")
        if not 0 <= self.random_share <= 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("random_share in [0, 1], temperature > 0 and top_p in (0, 1] please")


def _generate_for(loaded, prompts: list, config: GenerateConfig, seed: int) -> tuple[list[list[dict]], int]:
    """`n` samples for each prompt, batched; returns them grouped per prompt, and the new-token count."""
    texts = [render_prompt(loaded.tokenizer, p, config.system) for p in prompts for _ in range(config.n)]
    results = []
    for start in range(0, len(texts), config.batch_size):
        results += generate_batch(loaded.model, loaded.tokenizer, texts[start : start + config.batch_size],
                                  max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, generator_seed=seed + start, backend=config.backend)
    grouped = [results[i * config.n : (i + 1) * config.n] for i in range(len(prompts))]
    return grouped, sum(r["new_tokens"] for r in results)


def run(config: GenerateConfig) -> dict:
    store = Store(config.db or None)
    prompts = read_prompts(config.prompts, config.split, config.limit)
    # Every model loads before the first write: a missing or broken model leaves the store as it was.
    # Two vLLM engines (pairing=across) share the GPU; one leaves room for an active pairing's reward model.
    memory = 0.4 if config.pairing == "across" else 0.8
    policy = load_for_sampling(config.model, config.device, config.precision, config.backend, memory)
    second = (load_for_sampling(config.second_model, config.device, config.precision, config.backend, memory)
              if config.pairing == "across" else None)
    scorer = None
    if config.pairing == "active":
        from rlhf.reward import RewardModel

        scorer = RewardModel.load(config.reward_model, device=config.device, precision=config.precision)
    prompt_ids = store.add_prompts(prompts, source=config.prompts, split=config.split or "train")
    if config.skip_existing:
        done = store.prompts_with_tasks(config.round)
        kept = [(p, i) for p, i in zip(prompts, prompt_ids) if i not in done]
        prompts, prompt_ids = [p for p, _ in kept], [i for _, i in kept]
    params = {k: getattr(config, k) for k in ("temperature", "top_p", "max_new_tokens", "seed", "system")}
    # The backend that actually sampled (a vllm request without vllm installed samples with the sampler): same
    # seed, different samples.
    params["backend"] = "vllm" if not isinstance(policy.model, torch.nn.Module) else (
        "hf" if config.backend == "hf" or unimplemented_settings(policy.model) else "sampler")
    rng = random.Random(config.seed)
    written = {"prompts": 0, "responses": 0, "tasks": 0}
    start = time.perf_counter()
    # One batch of prompts at a time: each prompt's responses and tasks are stored before the next batch starts.
    per_batch = max(1, config.batch_size // config.n)
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt")
    tokens = 0
    try:
        for first in range(0, len(prompts), per_batch):
            chunk, chunk_ids = prompts[first : first + per_batch], prompt_ids[first : first + per_batch]
            samples, n_tokens = _generate_for(policy, chunk, config, config.seed + 7919 * first)
            tokens += n_tokens
            other = None
            if second is not None:
                other, n_tokens = _generate_for(second, chunk, config, config.seed + 7919 * first)
                tokens += n_tokens
            for i, (prompt, pid) in enumerate(zip(chunk, chunk_ids)):
                # Pairs are made of positions into this prompt's answers (the pairing draws the same random numbers
                # whatever it pairs), then the answers and their tasks are stored in one transaction.
                answers = [(r["text"], config.model, params) for r in samples[i]]
                mine = list(range(len(answers)))
                kind = "pair"
                if other is not None:
                    answers += [(r["text"], config.second_model, params) for r in other[i]]
                    theirs = list(range(len(mine), len(answers)))
                    pairs = [(p, "across") for p in across_pairs(mine, theirs, rng, config.pairs_per_prompt)]
                elif scorer is not None:
                    members = scorer.score_members([prompt] * len(mine), [r["text"] for r in samples[i]])
                    pairs = [active_or_random_pair(mine, members.mean(0).tolist(), config.random_share, rng,
                                                   members.tolist() if scorer.size > 1 else None)]
                elif config.rank:
                    # One task of `rank` responses in a random order (the app shuffles them again per annotator).
                    pairs, kind = [(rng.sample(mine, config.rank), "random")], "rank"
                else:
                    pairs = [(p, "random") for p in random_pairs(mine, rng, config.pairs_per_prompt)]
                tasks = []
                for pair, how in pairs:
                    # Which response is A is random, so position never correlates with the pairing strategy.
                    if kind == "pair":
                        pair = list(pair) if rng.random() < 0.5 else list(reversed(pair))
                    tasks.append((list(pair), how))
                ids, task_ids = store.add_candidates(pid, answers, tasks, round=config.round, overlap=config.overlap,
                                                     kind=kind, rate=config.rate)
                written["responses"] += len(ids)
                written["tasks"] += len(task_ids)
                written["prompts"] += 1
                bar.update(1)
            bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}")
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: kept {written['prompts']} prompts, {written['responses']} responses, "
              f"{written['tasks']} tasks (all complete)")
        written["interrupted"] = True
        return written
    bar.close()
    seconds = time.perf_counter() - start
    written.update(seconds=round(seconds, 1), tokens_per_s=round(tokens / seconds, 1))
    rated = ", a rating task per response" if config.rate else ""
    print(f"generated {written['responses']} responses to {written['prompts']} prompts and made {written['tasks']} "
          f"tasks (round {config.round}, {config.pairing}{rated}) in {seconds:.0f} s, "
          f"{written['tokens_per_s']} tokens/s -> {masked_url(store.url)}")
    return written
