"""Shared frozen trunk: evaluate the decoder layers below the first adapted layer once for all adapter states.

When LoRA adapts only the top layers of a decoder (`adapter.layers`, e.g. the last 4 of SmolLM2's 30), S adapter
states (SWAG draws, ensemble members, MC-dropout passes) produce identical hidden states up to the first adapted
layer L₀. Instead of running the whole stack S times, the batch's hidden states h_{L₀} (B, T, H) are computed once
and only layers L₀..N−1, the final norm and the answer head run per state. On a compute-bound device this divides
the per-state cost by about N / (N − L₀) (SmolLM2, last 4 layers: 30 / 4 ≈ 7.5).

Applies to Hugging Face decoders whose inner model keeps its blocks in a `layers` ModuleList and takes
`inputs_embeds` (Llama, Mistral, Qwen2, SmolLM2, ...). Anything else reports no trunk and runs the full forward.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

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
