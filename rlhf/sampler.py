"""One sampler for candidates, rollouts, evaluation and the arena: a decode loop of our own over transformers' KV
cache, for any transformers causal LM.

Why not `model.generate`: on a CPU at the batch sizes used here (16 to 64 rows) a decoding step of a small model is
mostly not arithmetic. transformers draws each token with `torch.multinomial`, which makes one exponential variate
per vocabulary entry (16 x 49,152 for SmolLM2 at batch 16, every step), and every bf16 linear layer lays its weight
out again for oneDNN at every call. This loop draws one uniform number per row and inverts the cumulative
distribution (the same distribution, `draw`), and on a CPU in bf16 runs the linear layers on weights packed for
oneDNN once per call (`packed_linears`). What that buys, measured:
docs/performance.md and benchmarks/generate_bench.py.

A prompt prefix every row shares (a chat template's system prompt) is prefilled once, as one row, and copied
into every row's cache; so is a whole prompt that several rows repeat (n samples per prompt). For Llama-family
models (Llama, Qwen2, Mistral) each decoding step after the prompt runs as plain tensor operations with the q/k/v
and gate/up projections fused (`FusedDecoder`), a LoRA adapter's update merged into the fused weights (RL samples
its LoRA policy this way); other models, other adapters and training-mode models go through their own forward.

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

    layer = InPlaceLayer()
    layer.in_place = True  # what FusedDecoder reads and writes
    return layer


def kv_cache(model, capacity: int):
    """transformers' DynamicCache for `model` (its per-layer kinds: sliding windows stay as they are), its plain
    full-attention layers made in-place for at most `capacity` positions."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    cache.layers = [_in_place_layer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


# ---------------------------------------------------------------- a prompt prefix shared by every row

def last_position(length: int, device) -> torch.Tensor:
    """transformers' `logits_to_keep` for a forward's last position only, as an index tensor: the count 1 would
    slice the hidden states into a non-contiguous view, and torch's linear on such a view with a weight that
    requires no grad (a frozen LoRA base) copies the whole vocabulary projection once per row (2 s a prompt batch of
    32 rows for SmolLM2, where the product itself takes milliseconds; rollout.policy_logits avoids it the same
    way)."""
    return torch.tensor([length - 1], device=device)


# Below this many shared tokens a separate forward for the prefix costs more than it saves.
MIN_SHARED_PREFIX = 8


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many tokens every left-padded row's prompt starts with in common (a chat template's system prompt and
    role markers), at most one fewer than the shortest prompt, so every row keeps a token of its own to prefill."""
    lengths = attention_mask.sum(1)
    Q, shortest = input_ids.shape[1], int(lengths.min())
    if input_ids.shape[0] < 2 or shortest < 2:
        return 0
    starts = (Q - lengths).tolist()
    first = input_ids[0, starts[0] :]
    common = shortest - 1
    for row, start in enumerate(starts[1:], 1):
        same = (input_ids[row, start : start + common] == first[:common]).long()
        common = int(same.cumprod(0).sum())
        if common == 0:
            break
    return common


def prefill_shared_prefix(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache_arg: str,
                          p: int) -> None:
    """Fill the first p columns of every row's cache from one forward pass over the rows' shared p-token prefix,
    so the prompt's own forward runs over the remaining columns only. A row with k pads holds the prefix's first
    p - k tokens in columns k..p-1 (the rest of its prefix falls in the remaining columns and is computed there
    again); its keys and values are the one row's, since a token's keys depend only on the tokens before it and on
    its position, which the attention mask's positions make the same in every row."""
    B, Q = input_ids.shape
    pads = (Q - attention_mask.sum(1)).tolist()
    prefix = input_ids[:1, pads[0] : pads[0] + p]  # (1, p)
    one_row = kv_cache(model, p)
    positions = torch.arange(p, device=input_ids.device)[None]
    model(input_ids=prefix, attention_mask=torch.ones_like(prefix), position_ids=positions,
          logits_to_keep=last_position(p, input_ids.device),
          **{cache_arg: one_row, "use_cache": True})
    for layer, source in zip(cache.layers, one_row.layers):
        keys = source.keys.new_zeros(B, *source.keys.shape[1:])  # (B, Hkv, p, d); pads stay zero, masked
        values = source.values.new_zeros(B, *source.values.shape[1:])
        for row, k in enumerate(pads):
            k = min(k, p)
            keys[row, :, k:] = source.keys[0, :, : p - k]
            values[row, :, k:] = source.values[0, :, : p - k]
        layer.update(keys, values)


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a prompt batch (B, Q) up to repeats: (U,) the first row of each distinct prompt, and (B,) for
    every row the position of its prompt among those U."""
    B = input_ids.shape[0]
    key = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], 1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)  # (B,)
    first = torch.full((int(inverse.max()) + 1,), B, dtype=torch.long, device=input_ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(B, device=input_ids.device), "amin")
    return first, inverse


def prefill(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, position: torch.Tensor,
            cache_arg: str, p: int, distinct: bool) -> torch.Tensor:
    """The prompt's forward pass: fills every row's keys and values in `cache` and returns the logits (B, V) of each
    row's last position. The first p columns, a prefix every row shares, go through the model once
    (`prefill_shared_prefix`); with `distinct` (an in-place cache), a prompt that several rows repeat (n samples per
    prompt) goes through it once too, and its keys and values are copied into each of those rows: a row's keys and
    values depend only on its own tokens."""
    B, Q = input_ids.shape
    first, inverse = distinct_rows(input_ids, attention_mask) if distinct else (None, None)
    target = cache
    if first is not None and len(first) < B:
        input_ids, attention_mask, position = input_ids[first], attention_mask[first], position[first]
        target = kv_cache(model, Q)
    if p:
        prefill_shared_prefix(model, target, input_ids, attention_mask, cache_arg, p)
    logits = model(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=position[:, p:],
                   logits_to_keep=last_position(Q - p, input_ids.device),
                   **{cache_arg: target, "use_cache": True}).logits[:, -1]
    if target is cache:
        return logits
    for layer, source in zip(cache.layers, target.layers):
        layer.update(source.keys[inverse], source.values[inverse])
    return logits[inverse]


# ---------------------------------------------------------------- a fused decoding step (Llama-family models)

# The architectures whose decoder layer is exactly: RMSNorm, q/k/v projections (biases allowed), rotary embedding,
# grouped-query softmax attention, o projection, residual; RMSNorm, SiLU-gated MLP, residual (transformers'
# modeling_llama.py, modeling_qwen2.py, modeling_mistral.py). Sliding-window layers are left to transformers: their
# caches are not in-place layers, which `FusedDecoder.build` requires.
FUSED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def _lora_linear_type():
    try:
        from peft.tuners.lora import Linear
    except ImportError:  # peft absent: no LoRA layer can be there
        return None
    return Linear


def _lora_parts(m) -> tuple[torch.nn.Linear, list[str]] | None:
    """PEFT's LoRA Linear over a plain nn.Linear, as (the frozen layer, its active adapters), or None: not a LoRA
    layer, or one whose map is not W0 + s B A (merged, DoRA-style, fan-in-fan-out, a quantised base)."""
    lora = _lora_linear_type()
    if lora is None or type(m) is not lora or type(m.base_layer) is not torch.nn.Linear:
        return None
    active = [a for a in m.active_adapters if a in m.lora_A]
    if m.merged or m.fan_in_fan_out or any(m.use_dora.get(a, False) or a in getattr(m, "lora_variant", {})
                                           for a in active):
        return None
    return m.base_layer, [] if m.disable_adapters else active


def fusable(m) -> bool:
    """Whether FusedDecoder can take the layer: a plain nn.Linear, or a LoRA layer `linear_map` merges."""
    return type(m) is torch.nn.Linear or _lora_parts(m) is not None


def linear_map(m) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of the affine map a `fusable` layer computes: a LoRA layer's active adapters' updates
    s * B A added to the frozen weight in float32 (Hu et al. 2021, "LoRA", eq. 3: h = W0 x + B A x; the same map as
    the adapter's forward in eval mode, where its dropout is the identity)."""
    if type(m) is torch.nn.Linear:
        return m.weight.detach(), m.bias
    base, active = _lora_parts(m)
    if not active:  # adapters switched off (the reference policy)
        return base.weight.detach(), base.bias
    with torch.no_grad():
        weight = base.weight.float() + sum(m.get_delta_weight(a).float() for a in active)
    return weight, base.bias


class FusedDecoder:
    """One decoding step of a Llama-family model written out as plain tensor operations over the in-place KV cache:
    the q, k and v projections as one matrix product and the MLP's gate and up projections as another (weights
    concatenated, and packed for oneDNN on a CPU in bf16), the attention as two matrix products over the filled part
    of the cache. It computes what the model's forward computes for one new token per row (tested against it in
    fp32, with and without a LoRA adapter), with four linear products a layer instead of seven (a LoRA layer's
    three become one) and without the modules' Python around them; what that saves, and how much of a step is the
    linear products' arithmetic, is in docs/performance.md."""

    def __init__(self, model, cache, rows: int, dtype: torch.dtype, pack: bool):
        """rows: the decoding batch, oneDNN's layout hint for the packed weights."""
        inner = model.model
        config = model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.rotary, self.embed, self.cache = inner.rotary_emb, inner.embed_tokens.weight, cache
        self.dtype, self.pack = dtype, pack

        def weight(*linears):
            maps = [linear_map(m) for m in linears]
            w = torch.cat([m_w.to(dtype) for m_w, _ in maps])
            b = None if maps[0][1] is None else torch.cat([m_b.detach() for _, m_b in maps]).to(dtype)
            return (torch.ops.mkldnn._reorder_linear_weight(w, rows) if pack else w), b

        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm, weight(a.q_proj, a.k_proj, a.v_proj), weight(a.o_proj),
                                layer.post_attention_layernorm, weight(m.gate_proj, m.up_proj), weight(m.down_proj)))
        self.norm, self.head = inner.norm, weight(model.lm_head)

    @staticmethod
    def build(model, cache, rows: int) -> FusedDecoder | None:
        """The fused step for `model` (a PEFT model: the model its adapters sit in) and its cache, or None where it
        does not apply: another architecture, a layer that is not `fusable` (a quantised layer, a DoRA
        adapter), a cache layer that is not in place (sliding windows), a model in training mode (dropout), or
        autocast to a dtype other than the weights' (RL's LoRA policy on a bf16 base, autocast to bf16, computes in
        bf16 throughout, as the fused step does)."""
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        inner = getattr(model, "model", None)
        config = getattr(model, "config", None)
        if (getattr(config, "model_type", None) not in FUSED_MODEL_TYPES
                or getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1
                or model.training or not hasattr(inner, "rotary_emb")
                or type(getattr(model, "lm_head", None)) is not torch.nn.Linear
                or len(cache.layers) != len(inner.layers)
                or not all(getattr(layer, "in_place", False) for layer in cache.layers)):
            return None
        for layer in inner.layers:
            a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            names = [(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
                (m, n) for n in ("gate_proj", "up_proj", "down_proj")]
            if a is None or m is None or not all(fusable(getattr(mod, n, None)) for mod, n in names):
                return None
        weight = model.lm_head.weight
        device = weight.device.type
        if torch.is_autocast_enabled(device) and (torch.get_autocast_dtype(device) != weight.dtype
                                                  or inner.embed_tokens.weight.dtype != weight.dtype):
            return None  # weights of one dtype computing in another
        return FusedDecoder(model, cache, rows, weight.dtype, pack=_pack_dtype(model) is not None)

    def _linear(self, x: torch.Tensor, weight_bias) -> torch.Tensor:
        weight, bias = weight_bias
        if not self.pack:
            return torch.nn.functional.linear(x, weight, bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def _rms(norm, x: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm: in float32, scaled back in the input's dtype."""
        xf = x.float()
        return norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def __call__(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after feeding `token` (B,) at `position` (B, 1); `mask` (B, n): the cache's filled part
        including this token, which is written at index n - 1 of every layer's buffers."""
        with torch.autocast(mask.device.type, enabled=False):  # the weights are in self.dtype already
            return self._step(token, position, mask)

    def _step(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, n = mask.shape
        H, Hkv, d = self.heads, self.kv_heads, self.head_dim
        bias = torch.zeros(B, 1, 1, n, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask.bool()[:, None, None, :], float("-inf"))
        h = torch.nn.functional.embedding(token[:, None], self.embed).to(self.dtype)  # (B, 1, D)
        cos, sin = self.rotary(h, position)  # (B, 1, d)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, d): over heads
        for i, (norm_in, qkv_w, o_w, norm_post, gate_up_w, down_w) in enumerate(self.layers):
            qkv = self._linear(self._rms(norm_in, h), qkv_w).view(B, H + 2 * Hkv, 1, d)
            q = self._rotate(qkv[:, :H], cos, sin)  # (B, H, 1, d)
            keys, values = self.cache.layers[i].buffers  # (B, Hkv, capacity, d)
            keys[:, :, n - 1 : n] = self._rotate(qkv[:, H : H + Hkv], cos, sin)
            values[:, :, n - 1 : n] = qkv[:, H + Hkv :]
            # Grouped-query attention without repeating the keys: each kv head's G query heads as G rows.
            scores = torch.matmul(q.view(B, Hkv, H // Hkv, d), keys[:, :, :n].transpose(-1, -2)).float()
            probs = (scores * self.scale + bias).softmax(-1).to(values.dtype)  # (B, Hkv, G, n)
            attended = torch.matmul(probs, values[:, :, :n]).view(B, 1, H * d)
            h = h + self._linear(attended, o_w)
            gate, up = self._linear(self._rms(norm_post, h), gate_up_w).chunk(2, -1)
            h = h + self._linear(torch.nn.functional.silu(gate) * up, down_w)
        return self._linear(self._rms(self.norm, h), self.head)[:, 0]


# ---------------------------------------------------------------- the decode loop


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, top_p: float = 1.0, eos_ids: Iterable[int] = (), pad_id: int = 0,
           generator: torch.Generator | None = None, fused: bool = True) -> Samples:
    """Continue each left-padded row of `input_ids` (B, Q) by up to max_new_tokens tokens, drawn from
    softmax(logits / temperature) restricted to the top_p nucleus (temperature 0: greedy), until every row has
    emitted one of `eos_ids` (none given: exactly max_new_tokens). Position ids follow the attention mask, so a
    padded row continues as it would alone (tested). `generator` seeds the draws (None: torch's global RNG).
    `fused`: decode with FusedDecoder where it applies (False: always through the model's forward, for comparison)."""
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
    cache = kv_cache(model, Q + max_new_tokens)
    cached = {cache_arg: cache, "use_cache": True}
    fused = FusedDecoder.build(model, cache, B) if fused and max_new_tokens > 1 else None
    steps = 0
    # The prompt goes through the model's own forward; with the fused step, on unpacked weights (at a prompt's
    # number of rows a linear layer's own weight reorder costs what packing does, and the fused step packs its own).
    # A prefix every row shares (a chat template's system prompt) goes through the model once, as one row.
    # Rows that repeat a prompt (several samples per prompt) share its forward.
    in_place = all(getattr(layer, "in_place", False) for layer in cache.layers)
    p = shared_prefix(input_ids, attention_mask)
    if p < MIN_SHARED_PREFIX or not in_place:
        p = 0
    with packed_linears(model, B) if fused is None else contextlib.nullcontext():
        logits = prefill(model, cache, input_ids, attention_mask, position, cache_arg, p, distinct=in_place)
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
            if fused is not None:
                logits = fused(tokens[:, t], position, mask[:, : Q + t + 1])
            else:
                logits = model(input_ids=tokens[:, t : t + 1], attention_mask=mask[:, : Q + t + 1],
                               position_ids=position, **cached).logits[:, -1]
    return Samples(tokens=tokens[:, :steps], logprobs=logprobs[:, :steps], ended=done,
                   lengths=lengths.clamp(max=steps))
