"""Base causal LM loading, the tiny test model, PEFT LoRA adapters and answer-token scoring.

Scoring follows Laplace-LoRA (arXiv 2308.13111, sec. 4): the logits at the last prompt position, restricted
to the first token of each answer choice, form the C-way classifier f(x) in R^C.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import string
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from rayblora import assets
from rayblora.config import AdapterConfig, ModelConfig
from rayblora.trunk import decoder_parts

TINY = "tiny-llama"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """The base model or its tokenizer cannot be used as configured."""


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")
"""The tiny tokenizer's chat template (a user turn, then the assistant's turn opened), so `data.chat_template`
is exercised without a real instruct model."""


def tiny_tokenizer():
    """A deterministic byte-level BPE tokenizer built in code (no files): 256 bytes + "Ġ<alnum>" merges.

    Words keep their leading space in their first token (" positive" -> "Ġp", ...), so answer choices that
    start with different letters have distinct first tokens, as with a real LLM tokenizer.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges = [("Ġ", c) for c in string.ascii_letters + string.digits]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left", truncation_side="left", chat_template=TINY_CHAT_TEMPLATE)


def _tiny_model(cfg: ModelConfig, vocab_size: int):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.tiny_hidden,
                         intermediate_size=cfg.tiny_hidden * 2, num_hidden_layers=cfg.tiny_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)


def _model_path(name: str) -> str:
    if name == assets.SMOLLM2:
        path = assets.model_dir(name)
        if not (path / "config.json").is_file():
            raise assets.AssetError(f"model {name!r} is not in the cache ({path}); run `make setup` or "
                                    "`rayblora assets fetch` first")
        return str(path)
    if not Path(name).is_dir():
        raise ModelError(f"model.name: {name!r} is neither {TINY!r}, {assets.SMOLLM2!r} nor a model folder")
    return name


def resolve_device(name: str) -> torch.device:
    """The torch device of a `model.device` value ("auto" = CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device: {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def check_architecture(path: str) -> None:
    """Refuse, before any weight is read, a model folder whose architecture rayblora cannot split into decoder
    layers (:func:`rayblora.trunk.decoder_parts`, checked on a weightless skeleton of it), naming what it lacks."""
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        decoder_parts(skeleton)
    except (ValueError, OSError, KeyError) as exc:  # UnsupportedArchitecture is a ValueError
        raise ModelError(f"model.name: {path}: {exc}") from None


def load_base_model(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """Load the frozen base causal LM and its tokenizer (pad = eos, left padding) onto `cfg.device`.

    No hub access.
    """
    if cfg.name == TINY:
        tokenizer = tiny_tokenizer()
        model = _tiny_model(cfg, len(tokenizer))
    else:
        path = _model_path(cfg.name)
        check_architecture(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.dtype])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = model.to(device=resolve_device(cfg.device), dtype=_DTYPES[cfg.dtype])
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over every base tensor's name, shape, dtype and a strided sample of its values.

    LoRA tensors are ignored and PEFT's `.base_layer` renaming is undone, so a base model has the same
    fingerprint before and after adapters are attached.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer", "").replace("base_model.model.", "")
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to(torch.float32).cpu().numpy().tobytes()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample)
    return h.hexdigest()


_OWN_DEFAULT_TARGETS = {"phi3": ("qkv_proj",)}
"""Default LoRA target modules of architectures PEFT's table lacks (Phi-3 fuses q, k, v into qkv_proj)."""


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """The LoRA target modules an architecture gets when `adapter.target_modules` is empty: PEFT's table by
    `model_type` (q_proj, v_proj for Llama-like decoders; c_attn for GPT-2; query_key_value for GPT-NeoX), and
    qkv_proj for Phi-3."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    modules = _OWN_DEFAULT_TARGETS.get(kind) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(kind)
    if not modules:
        raise ModelError(f"adapter.target_modules: model_type {kind!r} has no default target modules; name the "
                         "linear modules to adapt (e.g. adapter.target_modules=[q_proj,v_proj])")
    return tuple(modules)


def resolved_adapter_config(cfg: AdapterConfig, model: nn.Module) -> AdapterConfig:
    """`cfg` with its target modules named: `model`'s architecture's default when `cfg` names none."""
    return cfg if cfg.target_modules else dataclasses.replace(cfg, target_modules=default_target_modules(model))


def lora_config(cfg: AdapterConfig, model: nn.Module):
    """The PEFT LoraConfig for an adapter config on `model` (its architecture's default modules if none)."""
    modules = resolved_adapter_config(cfg, model).target_modules
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(modules),
                      bias="none", layers_to_transform=list(cfg.layers) or None, task_type="CAUSAL_LM")


def add_lora(model: nn.Module, cfg: AdapterConfig, seed: int):
    """Wrap `model` (modified in place) with a fresh LoRA adapter whose init is seeded by `seed` (B ~ N(0,
    `adapter.init_b_std`²) instead of 0 when that is > 0; A Xavier-normal with gain `adapter.init_a_gain` instead
    of PEFT's Kaiming-uniform when that is > 0)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = lora_config(cfg, model)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise ModelError(f"adapter.target_modules {sorted(config.target_modules)}: {exc}") from None
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_A" in name and cfg.init_a_gain > 0:
                    nn.init.xavier_normal_(param, gain=cfg.init_a_gain)
                if "lora_B" in name and cfg.init_b_std > 0:
                    param.normal_(0.0, cfg.init_b_std)
    return peft_model


def union_adapter_config(configs: Sequence[AdapterConfig]) -> AdapterConfig:
    """The smallest LoRA config holding every one of `configs` as a zero-padded special case: the largest rank,
    every target module (first seen first), every adapted layer (all layers if any config adapts all), scale
    alpha / rank = 1 (each member's own scale moves into its B: :func:`pad_lora_state`), the first's dropout.
    Configs that are all equal are their own union (the members' parametrisation, which a Laplace or TFB fit
    on them depends on, is kept)."""
    if not configs:
        raise ValueError("union_adapter_config: no adapter configs")
    if all(c == configs[0] for c in configs[1:]):
        return configs[0]  # nothing to pad: the members' own config, scale and all
    if len({not c.target_modules for c in configs}) > 1:
        raise ValueError("union_adapter_config: some configs name their target modules and some take the "
                         "architecture's default (resolved_adapter_config names them)")
    rank = max(c.rank for c in configs)
    modules = tuple(dict.fromkeys(m for c in configs for m in c.target_modules))
    layers = () if any(not c.layers for c in configs) else tuple(sorted({i for c in configs for i in c.layers}))
    return AdapterConfig(rank=rank, alpha=float(rank), dropout=configs[0].dropout, target_modules=modules,
                         layers=layers)


def pad_lora_state(state: dict[str, torch.Tensor], cfg: AdapterConfig, union: AdapterConfig,
                   template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (an adapter of config `cfg`) as an adapter of config `union` computing the same function.

    `template` is any state of the union config (its keys and shapes: `lora_A.weight` (R, in), `lora_B.weight`
    (out, R)). A (r, in) fills A's first r rows, B (out, r) · (cfg's alpha / r) / (union's alpha / R) fills B's
    first r columns, and every module `cfg` does not adapt is zero: ΔW = s B A is unchanged, term by term."""
    unknown = sorted(set(state) - set(template))
    if unknown:
        raise ModelError(f"adapter state has modules the union config lacks, e.g. {unknown[:3]}")
    ratio = (cfg.alpha / cfg.rank) / (union.alpha / union.rank)
    out = {}
    for key, shape_of in template.items():
        padded = torch.zeros_like(shape_of)
        if key in state:
            own = state[key].to(padded.dtype)
            side = 1 if "lora_A" in key else 0  # A (r, in): its input size; B (out, r): its output size
            if own.shape[side] != padded.shape[side]:
                raise ModelError(f"{key}: shape {tuple(own.shape)} does not fit the base model's "
                                 f"{tuple(padded.shape)}; was this adapter trained on another base model?")
            if "lora_A" in key:
                padded[:own.shape[0]] = own
            else:
                padded[:, :own.shape[1]] = own * ratio
        out[key] = padded
    return out


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
"""Decoder block i in a PEFT key: its first numbered segment (`.layers.i.`, GPT-2's `.h.i.`), as PEFT's
`layers_to_transform` reads it."""
_UNSUPPORTED_PEFT = {"use_dora": "DoRA", "modules_to_save": "fully trained modules (modules_to_save)",
                     "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas "
                     "(alpha_pattern)", "layer_replication": "layer replication"}


def read_peft_adapter(folder: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor], str]:
    """A plain PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`, as `save_pretrained`
    writes it) as (its AdapterConfig, its tensors in PEFT's saved-file naming, the base model it names).

    rsLoRA's scale alpha / √r is expressed as an equivalent alpha. Refused with a ModelError naming the problem:
    no safetensors file (a `.bin` is a pickle, never loaded), not LoRA, biases, DoRA and per-module patterns, and
    tensors whose rank is not the config's `r`."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder}: no readable {PEFT_CONFIG} ({exc})") from None
    if not (folder / PEFT_WEIGHTS).is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ModelError(f"{folder}: no {PEFT_WEIGHTS}" + (" (adapter_model.bin is a pickle and is never loaded; "
                         "re-save the adapter with safe_serialization=True)" if pickled else ""))
    if meta.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"{folder}: peft_type {meta.get('peft_type')!r}; only LoRA adapters can be imported")
    if meta.get("bias", "none") != "none":
        raise ModelError(f"{folder}: bias={meta['bias']!r}; only adapters without trained biases can be imported")
    for key, what in _UNSUPPORTED_PEFT.items():
        if meta.get(key):
            raise ModelError(f"{folder}: {what} is not supported ({key}={meta[key]!r})")
    rank, alpha = int(meta["r"]), float(meta["lora_alpha"])
    if meta.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # the same scale, alpha / √r, as plain LoRA's alpha / r
    state = load_file(str(folder / PEFT_WEIGHTS))
    wrong = {k: tuple(v.shape) for k, v in state.items()
             if ("lora_A" in k and v.shape[0] != rank) or ("lora_B" in k and v.shape[1] != rank)}
    adapted = [k.split(".lora_A")[0] for k in state if ".lora_A" in k]
    if wrong or not adapted:
        raise ModelError(f"{folder}: tensors disagree with r={rank} in {PEFT_CONFIG}: "
                         f"{dict(list(wrong.items())[:2]) or 'no lora_A tensors'}")
    # the adapted modules and layers as the tensors hold them (a config may give them as a regex)
    layers = sorted({int(m.group(1)) for k in adapted if (m := _LAYER_INDEX.search(k))})
    cfg = AdapterConfig(rank=rank, alpha=alpha, dropout=float(meta.get("lora_dropout") or 0.0),
                        target_modules=tuple(sorted({k.rsplit(".", 1)[-1] for k in adapted})), layers=tuple(layers))
    return cfg, state, str(meta.get("base_model_name_or_path") or "")


def answer_token_ids(tokenizer, choices: Sequence[str]) -> list[int]:
    """First token id of each answer choice; distinct ids are required to tell the choices apart."""
    ids = []
    for choice in choices:
        tokens = tokenizer.encode(choice, add_special_tokens=False)
        if not tokens:
            raise ModelError(f"answer choice {choice!r} encodes to no tokens")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ModelError(f"answer choices {list(choices)} share a first token ({ids}); choose label names "
                         "whose first tokens differ")
    return ids


def lora_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors in PEFT's saved-file naming (detached CPU copies)."""
    return {k: v.detach().to("cpu").clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def set_lora_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (PEFT saved-file naming) into the active adapter; every key must match."""
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"adapter state has keys the model lacks, e.g. {unexpected[:3]}")


def lora_parameters(peft_model) -> list[tuple[str, nn.Parameter]]:
    """Trainable LoRA parameters (name, tensor) in module order."""
    return [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]


def clone_base(model: nn.Module) -> nn.Module:
    """Deep copy of a base model (used where two independent adapter stacks need the same base)."""
    return copy.deepcopy(model)
