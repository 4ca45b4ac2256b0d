"""Base models found by structure, not by name: tiny random Mistral, Qwen2, Gemma, Phi-3, GPT-2 and GPT-NeoX
models, saved as model folders the way a user brings one (transformers configs, offline), train with the trunk
cache exactly as without it, run S adapter states batched exactly as one by one, and predict a posterior exactly
as without the cache, and decode generated answers as transformers' own greedy search does (or are refused,
naming what layer-by-layer decoding needs); each gets its architecture's default LoRA modules; an unsupported
model is refused up front naming what it lacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (AutoModelForCausalLM, BertConfig, GemmaConfig, GPT2Config, GPTNeoXConfig, MistralConfig,
                          Phi3Config, Qwen2Config)

from conftest import tiny_overrides
from rayblora.config import AdapterConfig, ModelConfig, load_config
from rayblora.data.batches import eval_batches
from rayblora.data.formats import classification_spec
from rayblora.generation.decode import DecodingSettings
from rayblora.generation.decoder import DecodingError
from rayblora.generation.run import StateSet, generate
from rayblora.model import ModelError, load_base_model, set_lora_state, tiny_tokenizer
from rayblora.scoring import build_scorer
from rayblora.trunk import decoder_parts, first_adapted_layer
from rayblora.workflows.evaluate import evaluate_methods
from rayblora.workflows.members import train_one_member
from rayblora.workflows.train import train
from rayblora.manifest import open_artifact

SIZE = {"vocab_size": len(tiny_tokenizer()), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "head_dim": 8}
TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
ARCHITECTURES = {
    "mistral": (MistralConfig(**SIZE, **TOKENS, sliding_window=None), ("q_proj", "v_proj")),
    "qwen2": (Qwen2Config(**SIZE, **TOKENS), ("q_proj", "v_proj")),
    "gemma": (GemmaConfig(**SIZE, **TOKENS), ("q_proj", "v_proj")),
    "phi3": (Phi3Config(**{k: v for k, v in SIZE.items() if k != "head_dim"}, **TOKENS), ("qkv_proj",)),
    "gpt2": (GPT2Config(vocab_size=SIZE["vocab_size"], n_embd=32, n_layer=3, n_head=4, n_positions=256,
                        embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0, **TOKENS), ("c_attn",)),
    "gpt_neox": (GPTNeoXConfig(vocab_size=SIZE["vocab_size"], hidden_size=32, intermediate_size=64,
                               num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256, **TOKENS),
                 ("query_key_value",)),
}
TOP_LAYER = {"adapter.layers": "[2]", "train.steps": "24", "train.eval_every": "0"}
"""LoRA on the top layer of three: layers 0 and 1 are the cached trunk; 24 steps of 16 pass the 300 rows again."""


def save_tiny_model(config, folder):
    """A random model of `config` and the tiny tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request, tmp_path_factory):
    config, modules = ARCHITECTURES[request.param]
    return request.param, save_tiny_model(config, tmp_path_factory.mktemp(request.param)), modules


def _config(files, out, folder, **extra):
    return load_config(None, tiny_overrides(files, out, **{"model.name": str(folder), **TOP_LAYER, **extra}))


def _without_cache(cfg):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, trunk_cache=False))


def test_members_train_and_predict_the_same_with_and_without_the_trunk_cache(architecture, sentiment_files,
                                                                              tmp_path, tiny_data):
    kind, folder, modules = architecture
    cfg = _config(sentiment_files, tmp_path / "run", folder)
    quiet = {"data": tiny_data, "log": lambda _m: None}
    cached, plain = train_one_member(cfg, 0, **quiet), train_one_member(_without_cache(cfg), 0, **quiet)
    scorer = cached.scorer
    assert scorer.model.config.model_type == kind and first_adapted_layer(scorer.model) == 2
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in scorer.adapter_state()} == set(modules)
    assert scorer.trunk_cache is not None and scorer.trunk_cache.hits > 0 and plain.scorer.trunk_cache is None
    losses = torch.tensor([[a["train_loss"], b["train_loss"]] for a, b in zip(cached.history, plain.history)])
    assert len(losses) == 24 and torch.allclose(losses[:, 0], losses[:, 1], atol=1e-5, rtol=0)
    assert losses[-1, 0] != losses[0, 0]  # the adapter learns: the equality is not of two untrained models

    scorer.model.eval()
    batch = next(eval_batches(tiny_data.test, scorer.tokenizer, 8, scorer.max_length))
    g = torch.Generator().manual_seed(0)
    states = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in scorer.adapter_state().items()}
              for _ in range(3)]
    batched = scorer.logits_for_states(batch, states)
    one_by_one = scorer.logits_for_states_sequential(batch, states, share_trunk=False)
    assert batched.shape == (3, 8, 2) and (batched - one_by_one).abs().max() <= 1e-5
    assert (batched[0] - batched[1]).abs().max() > 1e-4  # the states differ, and so do their logits


def test_a_posterior_predicts_the_same_with_and_without_the_trunk_cache(architecture, sentiment_files, tmp_path):
    _kind, folder, _modules = architecture
    cfg = _config(sentiment_files, tmp_path / "run", folder, **{"laplace.fit_batches": "2",
                                                                "laplace.link_samples": "10"})
    artifact = open_artifact(train(cfg, log=lambda _m: None, in_process=True))
    quiet = {"methods": ["ensemble", "laplace"], "log": lambda _m: None}
    cached, plain = evaluate_methods(artifact, cfg, **quiet), evaluate_methods(artifact, _without_cache(cfg), **quiet)
    for method in ("ensemble", "laplace"):
        for split, result in cached[method].items():
            assert abs(result.probs - plain[method][split].probs).max() <= 1e-5, (method, split)


def test_an_architecture_without_decoder_layers_is_refused_up_front(tmp_path, sentiment_files):
    folder = save_tiny_model(BertConfig(vocab_size=SIZE["vocab_size"], hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, is_decoder=True),
                             tmp_path / "bert")
    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path / "run", **{"model.name": str(folder)}))
    with pytest.raises(ModelError, match=r"model_type 'bert'.*missing .*ModuleList of its 2 decoder layers"):
        load_base_model(cfg.model)


def test_decoder_parts_name_each_architectures_own_modules(tmp_path):
    found = {}
    for kind, (config, _modules) in ARCHITECTURES.items():
        parts = decoder_parts(AutoModelForCausalLM.from_config(config))
        found[kind] = (parts.layers_name, parts.norm_name, len(parts.layers))
    assert found["gpt2"] == ("h", "ln_f", 3) and found["gpt_neox"] == ("layers", "final_layer_norm", 3)
    assert all(found[k] == ("layers", "norm", 3) for k in ("mistral", "qwen2", "gemma", "phi3"))


DECODABLE = {"mistral", "qwen2", "gemma", "phi3"}
"""Rotary decoders whose layers take a KV cache as `past_key_values`: decoded layer by layer under a posterior."""


def test_generation_decodes_as_transformers_own_greedy_search_or_is_refused_naming_why(architecture):
    kind, folder, _modules = architecture
    spec = classification_spec(("negative", "positive"), "{text}")
    scorer = build_scorer(ModelConfig(name=str(folder)), AdapterConfig(rank=4, layers=(2,)), spec, max_length=64)
    g = torch.Generator().manual_seed(1)
    state = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in scorer.adapter_state().items()}
    states = StateSet(scorer.model, scorer.tokenizer, [state] * 2, max_length=64)
    settings = DecodingSettings(max_new_tokens=6, stop=())
    if kind not in DECODABLE:
        with pytest.raises(DecodingError, match=f"model_type '{kind}'.*needs"):
            generate(states, ["the film was good and"], settings)
        return
    prompts = ["the film was good and", "awful"]
    with scorer.restoring_adapter():
        answers = generate(states, prompts, settings, batch_size=2)  # left-padded: prompts of other lengths
        set_lora_state(scorer.model, state)
        for prompt, answer in zip(prompts, answers):
            ids = scorer.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            want = scorer.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=6, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:]
            assert answer.tokens == want.tolist()
