"""One sampler for candidates, rollouts, evaluation and the arena: a decode loop of our own over transformers' KV
cache, for any transformers causal LM.

Why not `model.generate`: on a CPU at the batch sizes used here (16 to 64 rows) a decoding step of a small model is
mostly not arithmetic. transformers draws each token with `torch.multinomial`, which makes one exponential variate
per vocabulary entry (16 x 49,152 for SmolLM2 at batch 16, every step), and every bf16 linear layer lays its weight
out again for oneDNN at every call. This loop draws one uniform number per row and inverts the cumulative
distribution (the same distribution, `draw`), and on a CPU in bf16 runs the linear layers on weights packed for
oneDNN once per call (`packed_linears`). What that buys, measured:
docs/performance.md and benchmarks/generate_bench.py.

The log-prob of every sampled token at the sampling temperature is recorded as it is drawn (RL needs it as the
behaviour policy's, without a second forward pass). Where packing does not apply (fp32, where oneDNN was measured
slower than the default; GPUs; a layer oneDNN refuses) the layers run unchanged. Under FSDP or DeepSpeed, where
every process must run each forward in step to gather sharded weights, RL keeps transformers' generate.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class Samples:
    tokens: torch.Tensor  # (B, R) sampled ids, pad_id after a row's EOS; R <= max_new_tokens (all rows ended)
    logprobs: torch.Tensor  # (B, R) float32 log pi(y_t) at the sampling temperature, 0 after a row's end
    ended: torch.Tensor  # (B,) bool: the row emitted an EOS
    lengths: torch.Tensor  # (B,) the row's tokens, through its EOS


def nucleus(probs: torch.Tensor, top_p: float, k: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of `probs` (B, V): the smallest set of most likely tokens whose total is at least
    top_p (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", eq. 3), as (probabilities, token
    ids), both (B, k'), zero beyond a row's nucleus. A token is kept when the tokens more likely than it hold less
    than top_p, transformers' TopPLogitsWarper's rule, so both sample from one distribution (tested). Found among
    the top k tokens, k growing fourfold until every row's nucleus ends inside: a full sort of a 49k vocabulary
    costs more than the whole rest of a decoding step."""
    k = min(k, probs.shape[-1])
    while True:
        top, ids = probs.topk(k, -1)  # descending
        keep = top.cumsum(-1) - top < top_p  # the mass above each token
        if k == probs.shape[-1] or not bool(keep[:, -1].any()):
            return top.masked_fill_(~keep, 0.0), ids
        k = min(4 * k, probs.shape[-1])


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A token per row of `logits` (B, V), from softmax(logits / temperature) restricted to the top_p nucleus
    (temperature 0: the most likely token), and its log-prob under the whole temperature-scaled distribution
    (before the nucleus: the behaviour policy RL's ratios are taken against, as transformers' logits processors
    see it)."""
    logits = logits.float()
    scaled = logits / temperature if temperature > 0 else logits
    lse = scaled.logsumexp(-1, keepdim=True)
    if temperature <= 0:
        token = logits.argmax(-1)
    elif top_p >= 1.0:
        token = draw((scaled - lse).exp_(), generator)
    else:
        kept, ids = nucleus((scaled - lse).exp_(), top_p)
        token = ids.gather(1, draw(kept, generator)[:, None]).squeeze(1)
    return token, (scaled.gather(1, token[:, None]) - lse).squeeze(1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), unnormalised, by inverse-CDF sampling: the first index whose
    cumulative probability exceeds u ~ U(0, total). One random number per row where multinomial makes one per
    vocabulary entry; the cumulative sum in float32, the precision multinomial works in."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(1)


# Generation-config settings that change what transformers' generate samples and that this loop does not implement,
# with their neutral values: `rlhf.sample.generate_batch` samples a model that sets one with transformers instead,
# so that a model's own sampling rules are never dropped silently.
_NOT_IMPLEMENTED = {"min_length": 0, "min_new_tokens": 0, "min_p": None, "top_h": None, "typical_p": 1.0,
                    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0,
                    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
                    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
                    "begin_suppress_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
                    "guidance_scale": 1.0, "watermarking_config": None}


def unimplemented_settings(model) -> list[str]:
    """The settings of `model.generation_config` this sampler would ignore (see _NOT_IMPLEMENTED)."""
    config = getattr(model, "generation_config", None)
    return [name for name, neutral in _NOT_IMPLEMENTED.items()
            if getattr(config, name, None) not in (None, neutral, [], {})]


# ---------------------------------------------------------------- packed linear layers (CPU, bf16)

def _pack_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype the linear layers compute in during sampling when packing pays, else None. Only bf16 on a CPU with
    oneDNN's bf16 kernels: for fp32, oneDNN's packed path measured slower than the default (docs/performance.md)."""
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    if dtype != torch.bfloat16 or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return dtype


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                    x: torch.Tensor) -> torch.Tensor:
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).to(dtype), weight, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, rows: int):
    """Within the block, every plain `nn.Linear` of `model` runs on a copy of its weight packed for oneDNN
    (a no-op where `_pack_dtype` says packing does not pay). Packed afresh on every entry: a decode saves more than
    the packing costs, and no cheaper test tells reliably that weights changed (the fused AdamW that RL trains with
    updates them without bumping their version counters). `rows`: the decoding batch, oneDNN's layout hint."""
    dtype = _pack_dtype(model)
    if dtype is None:
        yield
        return
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]  # subclasses (quantised ones) as they are
    for m in linears:
        try:
            weight = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(dtype), rows)
        except RuntimeError:  # a shape or layout oneDNN will not pack: that layer runs unchanged
            continue
        bias = None if m.bias is None else m.bias.detach().to(dtype)
        m.forward = functools.partial(_packed_forward, weight, bias, dtype)
    try:
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


# ---------------------------------------------------------------- the KV cache


def _in_place_layer(capacity: int):
    """A transformers DynamicLayer whose keys and values live in buffers sized once for the whole sequence: each
    step writes its new positions in place and attends over a view of the filled part, where DynamicLayer
    concatenates (copying the whole cache, every layer, every step)."""
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                B, H, _, _ = key_states.shape
                self.buffers = (key_states.new_empty(B, H, capacity, key_states.shape[-1]),
                                value_states.new_empty(B, H, capacity, value_states.shape[-1]))
                self.length = 0
            end = self.length + key_states.shape[-2]
            self.buffers[0][:, :, self.length : end] = key_states
            self.buffers[1][:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self.buffers[0][:, :, :end], self.buffers[1][:, :, :end]
            return self.keys, self.values

    return InPlaceLayer()


def kv_cache(model, capacity: int):
    """transformers' DynamicCache for `model` (its per-layer kinds: sliding windows stay as they are), its plain
    full-attention layers made in-place for at most `capacity` positions."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    cache.layers = [_in_place_layer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


# ---------------------------------------------------------------- the decode loop


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, top_p: float = 1.0, eos_ids: Iterable[int] = (), pad_id: int = 0,
           generator: torch.Generator | None = None) -> Samples:
    """Continue each left-padded row of `input_ids` (B, Q) by up to max_new_tokens tokens, drawn from
    softmax(logits / temperature) restricted to the top_p nucleus (temperature 0: greedy), until every row has
    emitted one of `eos_ids` (none given: exactly max_new_tokens). Position ids follow the attention mask, so a
    padded row continues as it would alone (tested). `generator` seeds the draws (None: torch's global RNG)."""
    B, Q = input_ids.shape
    device = input_ids.device
    mask = attention_mask.new_zeros(B, Q + max_new_tokens)
    mask[:, :Q] = attention_mask
    position = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    # transformers 5.x calls the cache argument `cache` (`past_key_values` is deprecated); older models, the old name.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it on
    cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    cached = {cache_arg: kv_cache(model, Q + max_new_tokens), "use_cache": True}
    steps = 0
    with packed_linears(model, B):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, logits_to_keep=1,
                       **cached).logits[:, -1]
        position = position[:, -1:]
        for t in range(max_new_tokens):
            steps = t + 1
            token, logp = next_tokens(logits, temperature, top_p, generator)
            tokens[:, t] = token.masked_fill(done, pad_id)
            logprobs[:, t] = logp.masked_fill(done, 0.0)
            ending = ~done & torch.isin(token, eos)
            lengths[ending] = t + 1
            done |= ending
            if bool(done.all()) or t + 1 == max_new_tokens:
                break
            mask[:, Q + t] = 1
            position = position + 1
            logits = model(input_ids=tokens[:, t : t + 1], attention_mask=mask[:, : Q + t + 1],
                           position_ids=position, **cached).logits[:, -1]
    return Samples(tokens=tokens[:, :steps], logprobs=logprobs[:, :steps], ended=done,
                   lengths=lengths.clamp(max=steps))
