"""Shared frozen trunk: evaluate the decoder layers below the first adapted layer once for all adapter states.

When LoRA adapts only the top layers of a decoder (`adapter.layers`, e.g. the last 4 of SmolLM2's 30), S adapter
states (SWAG draws, ensemble members, MC-dropout passes) produce identical hidden states up to the first adapted
layer L₀. Instead of running the whole stack S times, the batch's hidden states h_{L₀} (B, T, H) are computed once
and only layers L₀..N−1, the final norm and the answer head run per state. On a compute-bound device this divides
the per-state cost by about N / (N − L₀) (SmolLM2, last 4 layers: 30 / 4 ≈ 7.5).

Applies to Hugging Face decoders whose inner model keeps its blocks in a `layers` ModuleList and takes
`inputs_embeds` (Llama, Mistral, Qwen2, SmolLM2, ...). Anything else reports no trunk and runs the full forward.

The other end of the stack, the *tail*: answer scoring reads the logits of the last position only (a generation
target's, of its last few), so the last decoder layer's queries, attention output, MLP and final norm are needed
only there; its keys and values are needed at every position. :func:`tail_hidden` runs it so (exact: the skipped
outputs feed nothing), saving about (1 − k/v share) of one layer per prompt, a quarter of the adapted compute with
LoRA on the last 4 layers.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_ADAPTER_TAGS = ("lora_", "prompt_encoder", "modules_to_save")
"""Name parts of PEFT adapter parameters, which count as adapted even when frozen (e.g. at serving time)."""


def decoder_stack(peft_model: nn.Module) -> nn.Module | None:
    """The inner decoder (with `embed_tokens`, `layers`, `norm`) of a PEFT-wrapped causal LM, or None."""
    causal_lm = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    inner = getattr(causal_lm, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return None
    if not all(hasattr(inner, name) for name in ("embed_tokens", "norm")):
        return None
    return inner


def first_adapted_layer(peft_model: nn.Module) -> int:
    """Index L₀ of the lowest decoder layer holding trainable adapter weights; 0 when nothing can be shared.

    0 also when a trainable parameter lies outside the decoder layers (embeddings, head, prefix tokens), since
    then even the first layer's input depends on the adapter state.
    """
    if decoder_stack(peft_model) is None:
        return 0
    indices = []
    for name, param in peft_model.named_parameters():
        if not (param.requires_grad or any(tag in name for tag in _ADAPTER_TAGS)):
            continue
        match = _LAYER_INDEX.search(name)
        if match is None:
            return 0
        indices.append(int(match.group(1)))
    return min(indices, default=0)


@contextmanager
def layer_window(inner: nn.Module, start: int, stop: int | None, final_norm: bool = True) -> Iterator[None]:
    """Within the block, `inner` runs only decoder layers [start, stop) and, unless `final_norm`, no final norm."""
    layers, norm = inner.layers, inner.norm
    try:
        inner.layers = nn.ModuleList(list(layers)[start:stop])
        if not final_norm:
            inner.norm = nn.Identity()
        yield
    finally:
        inner.layers, inner.norm = layers, norm


@torch.no_grad()
def trunk_hidden(peft_model: nn.Module, batch: dict[str, torch.Tensor], position_ids: torch.Tensor,
                 start: int) -> torch.Tensor:
    """Hidden states entering decoder layer `start`, (B, T, H): embeddings followed by layers 0..start−1."""
    inner = decoder_stack(peft_model)
    with layer_window(inner, 0, start, final_norm=False):
        out = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


@contextmanager
def above_trunk(peft_model: nn.Module, start: int) -> Iterator[None]:
    """Within the block, a forward given `inputs_embeds` = trunk hidden states runs layers start..N−1 only."""
    with layer_window(decoder_stack(peft_model), start, None):
        yield


def trunk_dropout(peft_model: nn.Module, start: int) -> float:
    """The largest dropout probability active below layer `start` (embeddings, layers 0..start−1, attention
    dropout of the config); > 0 means the trunk's output is random in training mode and cannot be cached."""
    inner = decoder_stack(peft_model)
    if inner is None:
        return 0.0
    modules = [inner.embed_tokens, *list(inner.layers)[:start]]
    rates = [m.p for block in modules for m in block.modules() if isinstance(m, nn.Dropout)]
    config = getattr(getattr(peft_model, "config", None), "attention_dropout", 0.0) or 0.0
    return max([float(config), *rates])


def trunk_dtype(peft_model: nn.Module) -> torch.dtype:
    """The dtype the frozen trunk computes in (its embedding weights')."""
    return decoder_stack(peft_model).embed_tokens.weight.dtype


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
    inner = decoder_stack(peft_model)
    config = getattr(peft_model, "config", None)
    if inner is None or getattr(config, "model_type", None) not in TAIL_MODEL_TYPES or not hasattr(inner,
                                                                                                   "rotary_emb"):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < length:
        return False
    last = inner.layers[-1]
    attn = getattr(last, "self_attn", None)
    if attn is None or any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return False
    if attn.training and (getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    exact_parts = [last.input_layernorm, attn.o_proj, last.post_attention_layernorm, last.mlp, inner.norm]
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
    there (its keys / values everywhere); layers below it run as usual from `input_ids` or from `trunk` =
    (L₀, hidden states entering L₀). `attention_mask` is the (N, T) real-token mask or the additive (N, 1, T, T)
    mask of packed multiple-choice rows (:func:`rayblora.data.batches.model_attention`). Only where
    :func:`tail_ready` holds."""
    inner = decoder_stack(peft_model)
    last = len(inner.layers) - 1
    start, hidden = trunk if trunk is not None else (0, None)
    if start < last:
        with layer_window(inner, start, last, final_norm=False):
            hidden = inner(input_ids=None if hidden is not None else input_ids, inputs_embeds=hidden,
                           attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    elif hidden is None:
        hidden = inner.embed_tokens(input_ids)
    rotary = inner.rotary_emb(hidden, position_ids=position_ids)
    return inner.norm(_last_layer_tail(inner.layers[last], hidden, attention_mask, rotary, keep))
