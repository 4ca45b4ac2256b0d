"""Batched execution of S adapter states in one forward over the shared frozen base model.

A posterior's S parameter samples (SWAG draws, ensemble members, MC-dropout passes) differ only in their LoRA
factors. Instead of S sequential forwards with the adapter tensors swapped in between, the input batch is
repeated S times (rows ordered sample-major: row s·B + b is input b under sample s) and every PEFT LoRA
`Linear` computes, for the rows of sample s,

    y = W₀ x + (α / r) · B_s A_s x        with A_s (r, d_in), B_s (d_out, r)

through two batched matrix products over the stacked factors A (S, r, d_in) and B (S, d_out, r)
(Hu et al., arXiv 2106.09685, eq. 3; the same per-row adapter selection as PEFT's mixed-adapter batches, but
with one bmm instead of a loop over adapters). The frozen base weights W₀ are shared: one copy in memory.

Adapters that are not plain LoRA on `Linear` layers (DoRA, LoRA on embeddings, other adapter types) fall back
to the sequential path, which gives the same logits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from peft.tuners.lora.layer import Linear, LoraLayer
from torch import nn

AdapterState = dict[str, torch.Tensor]
DEFAULT_MAX_ROWS = 256
"""Default cap on S_chunk · B rows of one batched forward (activation memory grows with the rows)."""


def lora_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA `Linear` layers by module name (the prefix of their keys in PEFT's saved-file naming)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, Linear)}


def plain_lora_adapter(layer: nn.Module) -> str | None:
    """The single active, unmerged, vanilla-LoRA adapter name of a layer, or None if it is anything else."""
    active = list(layer.active_adapters)
    if layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    name = active[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    return name


def supports_batching(model: nn.Module, states: Sequence[AdapterState]) -> bool:
    """Whether every state holds exactly the A and B factors of the model's plain LoRA `Linear` layers."""
    layers = lora_linear_layers(model)
    if not layers or not states:
        return False
    if any(isinstance(m, LoraLayer) and n not in layers for n, m in model.named_modules()):
        return False  # LoRA on embeddings / convolutions: not handled by the stacked forward
    if any(plain_lora_adapter(layer) is None for layer in layers.values()):
        return False
    expected = {f"{n}.lora_{f}.weight" for n in layers for f in ("A", "B")}
    return all(set(state) == expected for state in states)


def _stacked_lora_forward(layer: nn.Module, adapter: str, a: torch.Tensor, b: torch.Tensor, dropout,
                          x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of one LoRA Linear for S·B rows: base output + per-sample low-rank update.

    x: (S·B, ..., d_in) sample-major rows; a: (S, r, d_in); b: (S, d_out, r). Returns (S·B, ..., d_out).
    LoRA dropout is applied to x as PEFT does (active only when the dropout module is in training mode), or by
    `dropout(module, x)` where given (e.g. each block with its own member's random stream)."""
    result = layer.base_layer(x, *args, **kwargs)
    module = layer.lora_dropout[adapter]
    h = module(x.to(a.dtype)) if dropout is None else dropout(module, x.to(a.dtype))
    h = h.reshape(a.shape[0], -1, h.shape[-1])  # (S, B·T, d_in)
    delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))  # (S, B·T, d_out)
    return result + (delta * layer.scaling[adapter]).reshape(result.shape).to(result.dtype)


@contextmanager
def stacked_adapters(model: nn.Module, states: Sequence[AdapterState]) -> Iterator[None]:
    """Within the block, the model's LoRA Linear layers run the S `states` on S consecutive row blocks.

    The layers' own adapter tensors are not touched; their `forward` is shadowed by an instance attribute
    and restored on exit.
    """
    if not supports_batching(model, states):
        raise ValueError("stacked_adapters needs plain LoRA states whose keys match the model's LoRA layers")
    layers = lora_linear_layers(model)
    factors = {}
    for name, layer in layers.items():
        weight = layer.lora_A[plain_lora_adapter(layer)].weight
        factors[name] = tuple(torch.stack([s[f"{name}.lora_{f}.weight"] for s in states]).to(weight.device,
                                                                                              weight.dtype)
                              for f in ("A", "B"))
    with stacked_factors(model, factors):
        yield


@contextmanager
def stacked_factors(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    dropout=None) -> Iterator[None]:
    """Within the block, each LoRA Linear layer `name` of the model runs the S row blocks of its input with the
    factors `factors[name]` = (A (S, r, d_in), B (S, d_out, r)) — with autograd where they require grad (packed
    members' training, :mod:`rayblora.train.packed`) — and LoRA dropout by `dropout(module, x)` where given.
    The layers' own adapter tensors are not touched; their `forward` is shadowed and restored on exit."""
    layers = lora_linear_layers(model)
    try:
        for name, layer in layers.items():
            layer.forward = _bind(layer, plain_lora_adapter(layer), *factors[name], dropout)
        yield
    finally:
        for layer in layers.values():
            layer.__dict__.pop("forward", None)


def _bind(layer: nn.Module, adapter: str, a: torch.Tensor, b: torch.Tensor, dropout=None):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return _stacked_lora_forward(layer, adapter, a, b, dropout, x, *args, **kwargs)

    return forward


@contextmanager
def lora_dropout_active(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Put the LoRA dropout modules in training mode (MC dropout, Gal & Ghahramani 2016) inside the block."""
    modules = [m for n, m in model.named_modules() if ".lora_dropout." in f".{n}." and isinstance(m, nn.Dropout)]
    saved = [m.training for m in modules]
    try:
        for m in modules:
            m.train(active or m.training)
        yield
    finally:
        for m, was in zip(modules, saved):
            m.train(was)


def lora_dropout_rate(model: nn.Module) -> float:
    """The largest LoRA dropout probability in the model (0.0 when its LoRA layers have no dropout)."""
    rates = [m.p for n, m in model.named_modules() if ".lora_dropout." in f".{n}." and isinstance(m, nn.Dropout)]
    return max(rates, default=0.0)


def repeat_batch(batch: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """The batch repeated `times` times along rows, sample-major: (B, ...) -> (times·B, ...)."""
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) for k, v in batch.items() if torch.is_tensor(v)}


def _chunks(num_states: int, batch_rows: int, max_rows: int) -> list[range]:
    per_chunk = max(1, max_rows // max(1, batch_rows))
    return [range(i, min(num_states, i + per_chunk)) for i in range(0, num_states, per_chunk)]


@torch.no_grad()
def batched_logits(scorer, batch: dict[str, torch.Tensor], states: Sequence[AdapterState],
                   lora_dropout: bool = False, max_rows: int = DEFAULT_MAX_ROWS) -> torch.Tensor:
    """Answer logits (S, B, C) of S adapter states, in forwards of at most `max_rows` rows each.

    The frozen layers below the first adapted one run once for all states (`scorer.shared_trunk`).
    Falls back to `scorer.logits_for_states_sequential` where the adapter is not plain LoRA. With
    `lora_dropout`, LoRA dropout stays on, so each row block is an independent MC-dropout pass.
    """
    if not supports_batching(scorer.model, states):
        return scorer.logits_for_states_sequential(batch, states, lora_dropout=lora_dropout)
    rows = batch["input_ids"].shape[0]
    outs, trunk = [], scorer.shared_trunk(batch)
    with scorer.restoring_adapter(), lora_dropout_active(scorer.model, lora_dropout):
        for chunk in _chunks(len(states), rows, max_rows):
            chunk_trunk = None if trunk is None else (trunk[0], trunk[1].repeat(len(chunk), 1, 1))
            with stacked_adapters(scorer.model, [states[i] for i in chunk]):
                logits = scorer.logits(repeat_batch(batch, len(chunk)), chunk_trunk)
            outs.append(logits.reshape(len(chunk), rows, -1))
    return torch.cat(outs)
