"""Shared frozen trunk: evaluate the decoder layers below the first adapted layer once for all adapter states.

When LoRA adapts only the top layers of a decoder (`adapter.layers`, e.g. the last 4 of SmolLM2's 30), S adapter
states (SWAG draws, ensemble members, MC-dropout passes) produce identical hidden states up to the first adapted
layer L₀. Instead of running the whole stack S times, the batch's hidden states h_{L₀} (B, T, H) are computed once
and only layers L₀..N−1, the final norm and the answer head run per state. On a compute-bound device this divides
the per-state cost by about N / (N − L₀) (SmolLM2, last 4 layers: 30 / 4 ≈ 7.5).

The decoder's parts are found by structure, not by name (:func:`decoder_parts`): transformers' `base_model`
(the decoder under the LM head), the one ModuleList of `num_hidden_layers` blocks in it, the first norm
registered after that list, the input embeddings and the output head. That covers Llama, Mistral, Qwen2, Gemma,
Phi-3, GPT-2 and GPT-NeoX layouts alike; a model without them is refused naming what is missing. Hidden states
enter a window of layers through a pre-hook on its first layer, after the model's own embedding step, so
whatever the model does between its embeddings and its first layer (GPT-2's position embeddings, dropout) is
never applied twice.

The other end of the stack, the *tail*: answer scoring reads the logits of the last position only (a generation
target's, of its last few), so the last decoder layer's queries, attention output, MLP and final norm are needed
only there; its keys and values are needed at every position. :func:`tail_hidden` runs it so (exact: the skipped
outputs feed nothing), saving about (1 − k/v share) of one layer per prompt, a quarter of the adapted compute with
LoRA on the last 4 layers. The tail is written for pre-norm rotary decoders (:data:`TAIL_MODEL_TYPES`); the others
run the full last layer.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

_ADAPTER_TAGS = ("lora_", "prompt_encoder", "modules_to_save")
"""Name parts of PEFT adapter parameters, which count as adapted even when frozen (e.g. at serving time)."""


class UnsupportedArchitecture(ValueError):
    """The model is not a decoder-only causal LM laid out as :func:`decoder_parts` needs."""


@dataclass(frozen=True)
class DecoderParts:
    """Where a causal LM keeps its decoder: `inner` (transformers' `base_model`, e.g. LlamaModel, GPT2Model)
    holds its blocks in the ModuleList attribute `layers_name` and its final norm in `norm_name`; `head` is
    the LM head (H -> V)."""

    inner: nn.Module
    layers_name: str
    norm_name: str
    head: nn.Module

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.inner, self.layers_name)

    @property
    def norm(self) -> nn.Module:
        return getattr(self.inner, self.norm_name)

    @property
    def embed(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    @property
    def layer_index(self) -> re.Pattern:
        """Matches a parameter name inside decoder block i, group 1 = i (e.g. `.layers.3.`, GPT-2's `.h.3.`)."""
        return re.compile(rf"\.{re.escape(self.layers_name)}\.(\d+)\.")


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _missing_parts(causal_lm: nn.Module) -> tuple[list[str], dict[str, str]]:
    """What :func:`decoder_parts` cannot find in `causal_lm` (empty when nothing), and the names it found."""
    inner = getattr(causal_lm, "base_model", None)
    if inner is None or inner is causal_lm:
        return ["a decoder under the LM head (transformers' `base_model_prefix`)"], {}
    count = getattr(getattr(causal_lm, "config", None), "num_hidden_layers", None)
    names = [n for n, m in inner.named_children() if isinstance(m, nn.ModuleList) and len(m) == count]
    missing, found = [], {}
    if len(names) != 1:
        missing.append(f"one ModuleList of its {count} decoder layers (found {names or 'none'})")
    else:
        children = [n for n, _ in inner.named_children()]
        after = children[children.index(names[0]) + 1:]
        norms = [n for n in after if "norm" in type(getattr(inner, n)).__name__.lower()]
        found["layers"] = names[0]
        if norms:
            found["norm"] = norms[0]
        else:
            missing.append("a final norm registered after the decoder layers")
    if not hasattr(inner, "get_input_embeddings") or inner.get_input_embeddings() is None:
        missing.append("input embeddings")
    if not hasattr(causal_lm, "get_output_embeddings") or causal_lm.get_output_embeddings() is None:
        missing.append("an LM head (output embeddings)")
    return missing, found


def decoder_parts(model: nn.Module) -> DecoderParts:
    """The decoder parts of a (PEFT-wrapped) causal LM; UnsupportedArchitecture naming what is missing."""
    causal_lm = _causal_lm(model)
    missing, found = _missing_parts(causal_lm)
    if missing:
        kind = getattr(getattr(causal_lm, "config", None), "model_type", "?")
        raise UnsupportedArchitecture(f"{type(causal_lm).__name__} (model_type {kind!r}) is not a decoder-only causal "
                                      f"LM rayblora can split into layers: missing {'; '.join(missing)}")
    return DecoderParts(causal_lm.base_model, found["layers"], found["norm"], causal_lm.get_output_embeddings())


def decoder_stack(peft_model: nn.Module) -> DecoderParts | None:
    """:func:`decoder_parts`, or None for a model that has none (it then runs whole, with no shared trunk)."""
    try:
        return decoder_parts(peft_model)
    except UnsupportedArchitecture:
        return None


def first_adapted_layer(peft_model: nn.Module) -> int:
    """Index L₀ of the lowest decoder layer holding trainable adapter weights; 0 when nothing can be shared.

    0 also when a trainable parameter lies outside the decoder layers (embeddings, head, prefix tokens), since
    then even the first layer's input depends on the adapter state.
    """
    parts = decoder_stack(peft_model)
    if parts is None:
        return 0
    indices = []
    for name, param in peft_model.named_parameters():
        if not (param.requires_grad or any(tag in name for tag in _ADAPTER_TAGS)):
            continue
        match = parts.layer_index.search(name)
        if match is None:
            return 0
        indices.append(int(match.group(1)))
    return min(indices, default=0)


@contextmanager
def layer_window(parts: DecoderParts, start: int, stop: int | None, final_norm: bool = True,
                 hidden: torch.Tensor | None = None) -> Iterator[None]:
    """Within the block, the decoder runs only layers [start, stop) and, unless `final_norm`, no final norm;
    with `hidden` (B, T, H), layer `start` takes it as its input in place of what comes from below."""
    layers, norm = parts.layers, parts.norm
    handle = None
    try:
        setattr(parts.inner, parts.layers_name, nn.ModuleList(list(layers)[start:stop]))
        if not final_norm:
            setattr(parts.inner, parts.norm_name, nn.Identity())
        if hidden is not None:
            handle = layers[start].register_forward_pre_hook(_entering(hidden), with_kwargs=True)
        yield
    finally:
        setattr(parts.inner, parts.layers_name, layers)
        setattr(parts.inner, parts.norm_name, norm)
        if handle is not None:
            handle.remove()


def _entering(hidden: torch.Tensor):
    """A forward pre-hook giving a decoder layer `hidden` as its hidden-states input (first positional or
    `hidden_states` keyword, as the decoders call their layers)."""
    def hook(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return hook


@torch.no_grad()
def trunk_hidden(peft_model: nn.Module, batch: dict[str, torch.Tensor], position_ids: torch.Tensor,
                 start: int) -> torch.Tensor:
    """Hidden states entering decoder layer `start`, (B, T, H): embeddings followed by layers 0..start−1."""
    parts = decoder_parts(peft_model)
    with layer_window(parts, 0, start, final_norm=False):
        out = parts.inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


@contextmanager
def above_trunk(peft_model: nn.Module, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward of the model (from its `input_ids`, whose embedding step is then discarded)
    runs layers start..N−1 only, on `hidden` (B, T, H), the trunk's hidden states entering layer `start`."""
    with layer_window(decoder_parts(peft_model), start, None, hidden=hidden):
        yield


def trunk_dropout(peft_model: nn.Module, start: int) -> float:
    """The largest dropout probability active below layer `start` (embeddings, layers 0..start−1, attention
    dropout of the config); > 0 means the trunk's output is random in training mode and cannot be cached."""
    parts = decoder_stack(peft_model)
    if parts is None:
        return 0.0
    above = {id(m) for layer in list(parts.layers)[start:] for m in layer.modules()}
    above |= {id(m) for m in parts.norm.modules()}
    rates = [m.p for m in parts.inner.modules() if isinstance(m, nn.Dropout) and id(m) not in above]
    config = getattr(getattr(peft_model, "config", None), "attention_dropout", 0.0) or 0.0
    return max([float(config), *rates])


def trunk_dtype(peft_model: nn.Module) -> torch.dtype:
    """The dtype the frozen trunk computes in (its embedding weights')."""
    return decoder_parts(peft_model).embed.weight.dtype


# --- the tail: the last decoder layer at the read positions only --------------------------------------------------
TAIL_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""Decoders whose last layer :func:`tail_hidden` reproduces: pre-norm, rotary q / k, grouped-query SDPA, no
q / k norm, no logit soft-capping."""


def _hooked(module: nn.Module) -> bool:
    """Whether any forward hook is registered on `module` or a submodule (they would see other shapes)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _random(module: nn.Module) -> bool:
    """Whether a dropout inside `module` is active (its draws depend on how many positions run)."""
    return any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in module.modules())


def tail_ready(peft_model: nn.Module, length: int) -> bool:
    """Whether :func:`tail_hidden` computes exactly what the full forward does for sequences of `length` tokens:
    a supported decoder, no sliding window shorter than the sequence, no attention dropout in training, and no
    hook or active dropout on the last layer's parts that it runs at the read positions only (the query
    projection may have either: it then runs at every position, as in the full forward)."""
    parts = decoder_stack(peft_model)
    config = getattr(peft_model, "config", None)
    if parts is None or getattr(config, "model_type", None) not in TAIL_MODEL_TYPES or not hasattr(parts.inner,
                                                                                                   "rotary_emb"):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < length:
        return False
    last = parts.layers[-1]
    attn = getattr(last, "self_attn", None)
    if attn is None or any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return False
    if attn.training and (getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    exact_parts = [last.input_layernorm, attn.o_proj, last.post_attention_layernorm, last.mlp, parts.norm]
    if last._forward_hooks or last._forward_pre_hooks or attn._forward_hooks or attn._forward_pre_hooks:
        return False
    return not any(_hooked(m) or _random(m) for m in exact_parts) and not nn.modules.module._global_forward_hooks


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (N, heads, T, d) with cos / sin (N, T, d) (Su et al., RoFormer, eq. 34)."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]


def _tail_mask(attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean (N, 1, keep, T): query i (position T − keep + i) sees real keys at or before it, and itself (so a
    padded query row is never fully masked); from an additive (N, 1, T, T) mask, its last `keep` query rows."""
    if attention_mask.dim() == 4:
        return attention_mask[:, :, -keep:] == 0
    length = attention_mask.shape[-1]
    queries = torch.arange(length - keep, length, device=attention_mask.device)
    keys = torch.arange(length, device=attention_mask.device)
    causal = keys[None, :] <= queries[:, None]
    mask = causal[None] & attention_mask.bool()[:, None, :]
    return (mask | (keys[None, :] == queries[:, None])[None])[:, None]


def _last_layer_tail(layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                     rotary: tuple[torch.Tensor, torch.Tensor], keep: int) -> torch.Tensor:
    """A pre-norm decoder layer's output (N, keep, H) at the last `keep` positions of hidden (N, T, H)."""
    attn, (n, length, _) = layer.self_attn, hidden.shape
    normed = layer.input_layernorm(hidden)
    full_queries = _hooked(attn.q_proj) or _random(attn.q_proj)
    query = attn.q_proj(normed if full_queries else normed[:, -keep:])[:, -keep:]
    key, value = attn.k_proj(normed), attn.v_proj(normed)
    d = attn.head_dim
    query = query.view(n, keep, -1, d).transpose(1, 2)
    key, value = (t.view(n, length, -1, d).transpose(1, 2) for t in (key, value))
    cos, sin = rotary
    query, key = _rotate(query, cos[:, -keep:], sin[:, -keep:]), _rotate(key, cos, sin)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=_tail_mask(attention_mask, keep),
                                         scale=attn.scaling)
    hidden = hidden[:, -keep:] + attn.o_proj(out.transpose(1, 2).reshape(n, keep, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def tail_hidden(peft_model: nn.Module, attention_mask: torch.Tensor, position_ids: torch.Tensor, keep: int,
                input_ids: torch.Tensor | None = None,
                trunk: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Final-normed hidden states (N, keep, H) at the last `keep` positions, the last decoder layer run only
    there (its keys / values everywhere); layers below it run as usual from `input_ids`, or from layer L₀ on
    given `trunk` = (L₀, hidden states entering L₀). `attention_mask` is the (N, T) real-token mask or the
    additive (N, 1, T, T) mask of packed multiple-choice rows (:func:`rayblora.data.batches.model_attention`).
    Only where :func:`tail_ready` holds."""
    parts = decoder_parts(peft_model)
    last = len(parts.layers) - 1
    start, hidden = trunk if trunk is not None else (0, None)
    if start < last:
        with layer_window(parts, start, last, final_norm=False, hidden=hidden):
            hidden = parts.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
    elif hidden is None:
        hidden = parts.embed(input_ids)
    rotary = parts.inner.rotary_emb(hidden, position_ids=position_ids)
    return parts.norm(_last_layer_tail(parts.layers[last], hidden, attention_mask, rotary, keep))


def prompt_summary(hidden: torch.Tensor, attention_mask: torch.Tensor,
                   segments: torch.Tensor | None = None) -> torch.Tensor:
    """A prompt's summary (B, 2H) from hidden states (B, T, H) of left-padded rows: the state at the prompt's last
    position (where the first answer token is read) and the mean over the prompt's real tokens, concatenated.
    Packed multiple-choice rows (`segments` > 0: option tokens after the prompt) summarise their prompt only."""
    prompt = attention_mask.bool() if segments is None else attention_mask.bool() & (segments == 0)
    options = torch.zeros_like(attention_mask) if segments is None else (segments > 0).long()
    last = hidden.shape[1] - 1 - options.sum(-1)
    at_read = hidden[torch.arange(len(hidden), device=hidden.device), last.to(hidden.device)]
    weights = prompt.to(hidden.dtype)[..., None]
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    return torch.cat([at_read, mean], -1).float()
