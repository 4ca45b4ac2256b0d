"""One incremental forward of S adapter states over the shared frozen base model, with per-state KV caches.

Decoding under a posterior needs, at every step, the next-token distribution of each of its S adapter states
(ensemble members, SWAG / Laplace / TFB / BLoB draws, MC-dropout passes). :class:`StackedDecoder` keeps one
key/value cache per state and runs the decoder layer by layer:

* layers 0..L₀−1, below the first adapted one, are identical for every state: while the states read the same
  tokens (Bayesian-model-average decoding) they run once on the B prompts, with one cache of B rows
  (:mod:`rayblora.trunk`);
* layers L₀..N−1, the final norm and the LM head run on S·B rows, sample-major (row s·B + b is prompt b under
  state s), with the S states' LoRA factors applied to their row blocks by one batched matmul
  (:func:`rayblora.batched.stacked_adapters`); each row's cache is that state's own.

When the states diverge (per-state sampling, :meth:`StackedDecoder.split`), the trunk cache is repeated to S·B
rows and every layer runs per state from then on. Adapters the stacked forward cannot run (not plain LoRA) run
one state at a time with their tensors swapped in (the same logits). Applies to rotary decoders whose layers take
`past_key_values` and `position_embeddings` (Llama, Mistral, Qwen2, Gemma, Phi-3, SmolLM2), found by structure
(:func:`rayblora.trunk.decoder_parts`); others are refused naming what is missing.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn

from rayblora.batched import lora_dropout_active, stacked_adapters, supports_batching
from rayblora.model import set_lora_state
from rayblora.trunk import UnsupportedArchitecture, decoder_parts, first_adapted_layer, prompt_summary

AdapterState = dict[str, torch.Tensor]


class DecodingError(ValueError):
    """The model or the states cannot be decoded (e.g. a decoder without Llama's layer layout)."""


def _decodable_parts(peft_model: nn.Module):
    """The decoder parts of `peft_model` if :class:`StackedDecoder` can run its layers one by one: a rotary
    decoder whose layers take `past_key_values` and `position_embeddings`; else DecodingError naming the gap."""
    try:
        parts = decoder_parts(peft_model)
    except UnsupportedArchitecture as exc:
        raise DecodingError(str(exc)) from None
    accepted = inspect.signature(parts.layers[0].forward).parameters
    missing = [name for name in ("past_key_values", "position_embeddings") if name not in accepted]
    if not hasattr(parts.inner, "rotary_emb"):
        missing.insert(0, "rotary position embeddings (`rotary_emb`)")
    if missing:
        kind = getattr(getattr(peft_model, "config", None), "model_type", "?")
        raise DecodingError(f"model_type {kind!r}: decoding under a posterior runs the decoder layer by layer and "
                            f"needs {', '.join(missing)} in its layers' interface")
    return parts


class LayerCache:
    """Key/value cache of the decoder layers of one row set, keyed by the layers' own `layer_idx`.

    Implements the one method the attention modules call, `update(keys, values, layer_idx)` with tensors
    (R, heads, q, head_dim), returning the layer's keys / values so far (R, heads, T, head_dim).
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx in self.keys:
            keys = torch.cat([self.keys[layer_idx], keys], dim=-2)
            values = torch.cat([self.values[layer_idx], values], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def repeat(self, times: int) -> None:
        """Every row repeated `times` times, sample-major: (R, ...) -> (times·R, ...)."""
        for store in (self.keys, self.values):
            for idx, t in store.items():
                store[idx] = t.repeat(times, 1, 1, 1)


def attention_bias(key_mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (R, 1, q, K) for the last `queries` of K positions: causal and padding-aware.

    key_mask: (R, K), 1 for real tokens. Disallowed keys get the dtype's minimum rather than −inf, so a query
    with no allowed key (left padding) gets a uniform, finite attention instead of NaN.
    """
    k = key_mask.shape[1]
    positions = torch.arange(k, device=key_mask.device)
    causal = positions[None, :] <= positions[k - queries:, None]  # (q, K)
    allowed = causal[None] & key_mask.bool()[:, None, :]  # (R, q, K)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class _Rows:
    """The token mask and cache of one row set (the trunk's B rows, or S·B rows above it)."""

    def __init__(self, rows: int, device: torch.device):
        self.key_mask = torch.zeros(rows, 0, dtype=torch.long, device=device)
        self.cache = LayerCache()

    def extend(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Append positions whose mask is `new_mask` (R, q); returns their position ids (R, q), counted over
        real tokens only (so left padding does not shift a prompt, as in :func:`rayblora.data.batches.position_ids`)."""
        new_mask = new_mask.to(self.key_mask.device, self.key_mask.dtype)
        real = self.key_mask.sum(-1, keepdim=True)
        self.key_mask = torch.cat([self.key_mask, new_mask], dim=1)
        return (real + new_mask.cumsum(-1) - 1).clamp(min=0)

    def repeat(self, times: int) -> None:
        self.key_mask = self.key_mask.repeat(times, 1)
        self.cache.repeat(times)


class StackedDecoder:
    """Next-token logits of S adapter states, step by step, sharing the frozen trunk.

    Args:
        peft_model: the PEFT-wrapped causal LM whose LoRA slot the states fit (put in eval mode by the caller).
        states: S adapter states (PEFT saved-file naming).
        lora_dropout: keep LoRA dropout on (each state's rows an independent MC-dropout pass at every step).
        batched: run the S states in one stacked forward (None: whenever the states are plain LoRA).
    """

    def __init__(self, peft_model: nn.Module, states: Sequence[AdapterState], lora_dropout: bool = False,
                 batched: bool | None = None):
        if not states:
            raise DecodingError("decoding needs at least one adapter state")
        self.parts = _decodable_parts(peft_model)
        self.model, self.states, self.lora_dropout = peft_model, list(states), lora_dropout
        can_batch = supports_batching(peft_model, self.states)
        if batched and not can_batch:
            raise DecodingError("batched decoding needs plain LoRA states matching the model's LoRA layers")
        self.batched = can_batch if batched is None else batched
        self.start = first_adapted_layer(peft_model)
        self.trunk: _Rows | None = None
        self.upper: list[_Rows] = []
        self.shared = True

    @property
    def num_states(self) -> int:
        return len(self.states)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts (B, T); returns the next-token logits (S, B, V) in float32 and keeps
        `prompt_features` (S, B, H), the final-normed hidden state at each prompt's last position under each state,
        and `prompt_trunk` (B, 2H), the frozen layers' prompt summary (what a feature density scores,
        :mod:`rayblora.density`)."""
        s, rows, device = self.num_states, input_ids.shape[0], self.parts.embed.weight.device
        self.trunk, self.shared = _Rows(rows, device), True
        self.upper = [_Rows(s * rows, device)] if self.batched else [_Rows(rows, device) for _ in range(s)]
        logits = self._forward(input_ids, attention_mask)
        self.prompt_features = self.last_hidden.float().reshape(s, rows, -1).cpu()
        self.prompt_trunk = prompt_summary(self.trunk_hidden, attention_mask.to(self.trunk_hidden.device)).cpu()
        return logits

    def prompt_features_of(self, kind: str) -> torch.Tensor:
        """After :meth:`prefill`, what a feature density of `kind` scores for the prompts: (1, B, 2H) for "trunk",
        (S, B, H) for "answer" (:mod:`rayblora.density`)."""
        return self.prompt_trunk[None] if kind == "trunk" else self.prompt_features

    def split(self) -> None:
        """From the next step on, each state reads its own tokens: the trunk's B rows become S·B rows."""
        if self.shared:
            self.trunk.repeat(self.num_states)
            self.shared = False

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: (B,) the same for every state, or (S, B) per state (after :meth:`split`).
        Returns the next-token logits (S, B, V) in float32."""
        if tokens.dim() == 2:
            self.split()
        elif not self.shared:
            raise DecodingError("after split() every state needs its own tokens, shape (S, B)")
        ids = tokens.reshape(-1, 1)
        return self._forward(ids, torch.ones_like(ids))

    def _forward(self, ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """ids / new_mask: (B, q) while the states share their tokens, else (S·B, q)."""
        ids = ids.to(self.parts.embed.weight.device)
        hidden = self._run(self.parts.embed(ids), self.parts.layers[:self.start], self.trunk, new_mask)
        self.trunk_hidden = hidden
        if self.shared:
            hidden, new_mask = hidden.repeat(self.num_states, 1, 1), new_mask.repeat(self.num_states, 1)
        upper_layers = self.parts.layers[self.start:]
        with lora_dropout_active(self.model, self.lora_dropout):
            if self.batched:
                with stacked_adapters(self.model, self.states):
                    hidden = self._run(hidden, upper_layers, self.upper[0], new_mask)
            else:
                blocks = zip(hidden.chunk(self.num_states), new_mask.chunk(self.num_states))
                hidden = torch.cat([self._run_state(i, h, m, upper_layers) for i, (h, m) in enumerate(blocks)])
        normed = self.parts.norm(hidden[:, -1:])
        self.last_hidden = normed[:, 0]
        logits = self.parts.head(normed).float()[:, 0]
        return logits.reshape(self.num_states, -1, logits.shape[-1])

    def _run_state(self, index: int, hidden: torch.Tensor, new_mask: torch.Tensor, layers) -> torch.Tensor:
        set_lora_state(self.model, self.states[index])
        return self._run(hidden, layers, self.upper[index], new_mask)

    def _run(self, hidden: torch.Tensor, layers, rows: _Rows, new_mask: torch.Tensor) -> torch.Tensor:
        """`layers` on hidden (R, q, H); `rows` takes the q new positions (mask (R, q) and cache)."""
        positions = rows.extend(new_mask)
        if not len(layers):
            return hidden
        bias = attention_bias(rows.key_mask, hidden.shape[1], hidden.dtype)
        embeddings = self.parts.inner.rotary_emb(hidden, positions)
        for layer in layers:
            out = layer(hidden, attention_mask=bias, position_ids=positions, past_key_values=rows.cache,
                        use_cache=True, position_embeddings=embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden
