"""The non-LoRA parts of the hybrid adapter (BH-PEFT, arXiv 2508.02711, sec. 3.1), as small torch modules
attached to the decoder layers of a PEFT LoRA model with hooks.

PEFT cannot hold a prompt-learning adapter (prefix tuning) and a LoRA adapter in one `PeftModel`, so both
extra parts are plain modules here, hooked into the base model the PEFT model wraps:

* **prefix tuning** (Li & Liang 2021): per adapted layer, P learned key and value vectors per key/value head
  are prepended to the attention's keys and values (after RoPE, like PEFT's past-key-value prefix), and the
  attention mask gains P always-visible columns. Implemented by a forward pre-hook on `self_attn` that hands
  the attention a one-layer prefix cache and the widened mask.
* **bottleneck adapter** (Houlsby et al. 2019; sequential, after the MLP as in Pfeiffer et al. 2020):
  h ← h + W_up φ(W_down h) on the MLP output, W_up initialised to zero (the adapter starts as the identity).

Each decoder layer is hooked once per model; the hooks apply the parts of the *active* modules (kept in the
PEFT model's `__dict__`, not registered as its submodules, so PEFT's adapter files and `lora_state` keep
holding the LoRA tensors only) and do nothing while none are active.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from rayblora.config import AdapterConfig, HybridConfig
from rayblora.model import ModelError

ACTIVE = "_rayblora_hybrid_active"
DISPATCH = "_rayblora_hybrid_dispatch"


class PrefixKV(nn.Module):
    """Prefix keys and values of one attention layer: `keys`, `values` (kv_heads, P, head_dim)."""

    def __init__(self, kv_heads: int, tokens: int, head_dim: int, init_std: float):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(kv_heads, tokens, head_dim) * init_std)
        self.values = nn.Parameter(torch.randn(kv_heads, tokens, head_dim) * init_std)


class Bottleneck(nn.Module):
    """Bottleneck adapter h ↦ W_up GELU(W_down h) on (B, T, H); W_up = 0 at initialisation."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.down = nn.Linear(hidden, dim)
        self.up = nn.Linear(dim, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(hidden)))


class _PrefixCache:
    """Duck-typed one-layer cache: `update` prepends the prefix keys / values (B, kv_heads, P, D)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=2))


def widen_mask(mask: torch.Tensor | None, tokens: int, q_len: int, implementation: str,
               device: torch.device) -> torch.Tensor:
    """The attention mask (B|1, 1, T, T) with `tokens` always-visible columns prepended: (B|1, 1, T, P + T).

    A missing mask (SDPA's implicit causal mask) is made explicit first. Boolean masks mark visible entries
    with True; additive (eager) masks with 0.
    """
    if mask is None:
        mask = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()[None, None]
        if implementation == "eager":
            mask = torch.zeros(mask.shape, device=device).masked_fill(~mask, torch.finfo(torch.float32).min)
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros
    extra = visible(*mask.shape[:-1], tokens, dtype=mask.dtype, device=mask.device)
    return torch.cat([extra, mask], dim=-1)


def decoder_layers(peft_model) -> nn.ModuleList:
    """The decoder layers of the (Llama-style) base model wrapped by `peft_model`."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(layers[0], "self_attn") or \
            not hasattr(layers[0], "mlp"):
        raise ModelError("hybrid adapter: the base model has no `model.layers[i].self_attn / .mlp` "
                         "(a Llama-style decoder is needed for prefix / bottleneck adapters)")
    return layers


class HybridModules(nn.Module):
    """Prefix and bottleneck modules of the adapted layers (`adapter.layers`, empty = all), keyed by layer
    index (strings); initialised from torch's global RNG (seeded per member by the training worker).

    They act on the model only while active (:func:`set_active` / :func:`active`), so posteriors that share
    one scorer (e.g. in a Serve replica) each apply their own modules and never another's."""

    def __init__(self, peft_model, hybrid: HybridConfig, adapter: AdapterConfig):
        super().__init__()
        layers = decoder_layers(peft_model)
        config = peft_model.config
        indices = [i for i in (adapter.layers or range(len(layers))) if i < len(layers)]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.prefixes = nn.ModuleDict({str(i): PrefixKV(config.num_key_value_heads, hybrid.prefix_tokens, head_dim,
                                                        hybrid.prefix_init_std)
                                       for i in indices if hybrid.prefix_tokens > 0})
        self.bottlenecks = nn.ModuleDict({str(i): Bottleneck(config.hidden_size, hybrid.bottleneck_dim)
                                          for i in indices if hybrid.bottleneck_dim > 0})
        self.implementation = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
        if self.prefixes and self.implementation not in ("sdpa", "eager"):
            raise ModelError(f"hybrid.prefix_tokens: prefix tuning needs sdpa or eager attention, the base "
                             f"model uses {self.implementation!r}")
        self.to(next(peft_model.parameters()).device)
        _install_dispatch(peft_model)

    def prefix_kwargs(self, index: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The attention's kwargs with the prefix cache and the widened mask of layer `index`."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        prefix = self.prefixes[index]  # looked up per call: functional_call may have swapped its tensors
        batch, q_len = hidden.shape[0], hidden.shape[1]
        keys = prefix.keys[None].expand(batch, -1, -1, -1)
        values = prefix.values[None].expand(batch, -1, -1, -1)
        mask = widen_mask(kwargs.get("attention_mask"), prefix.keys.shape[1], q_len, self.implementation,
                          hidden.device)
        return {**kwargs, "past_key_values": _PrefixCache(keys, values), "attention_mask": mask}


def _install_dispatch(peft_model) -> None:
    """Hook every decoder layer once: its attention and MLP apply the active modules' parts, if any."""
    if DISPATCH in peft_model.__dict__:
        return
    handles = []
    for layer in decoder_layers(peft_model):
        index = str(layer.self_attn.layer_idx)

        def prefix_hook(module, args, kwargs, index=index):
            modules = peft_model.__dict__.get(ACTIVE)
            if modules is None or index not in modules.prefixes:
                return None
            return args, modules.prefix_kwargs(index, args, kwargs)

        def bottleneck_hook(module, args, output, index=index):
            modules = peft_model.__dict__.get(ACTIVE)
            if modules is None or index not in modules.bottlenecks:
                return None
            return output + modules.bottlenecks[index](output)

        handles.append(layer.self_attn.register_forward_pre_hook(prefix_hook, with_kwargs=True))
        handles.append(layer.mlp.register_forward_hook(bottleneck_hook))
    peft_model.__dict__[DISPATCH] = handles


def active_modules(peft_model) -> HybridModules | None:
    """The hybrid modules acting on `peft_model` now, if any."""
    return peft_model.__dict__.get(ACTIVE)


def set_active(peft_model, modules: HybridModules | None) -> None:
    """Make `modules` act on `peft_model` from now on (None: no hybrid parts); e.g. for a member's training."""
    peft_model.__dict__[ACTIVE] = modules


@contextmanager
def active(peft_model, modules: HybridModules | None) -> Iterator[None]:
    """`modules` act on `peft_model` inside the block; the previously active ones afterwards."""
    previous = active_modules(peft_model)
    set_active(peft_model, modules)
    try:
        yield
    finally:
        set_active(peft_model, previous)
