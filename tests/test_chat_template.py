"""`data.chat_template`: every prompt wrapped in the tokenizer's own chat template, identically in training,
evaluation, serving and generation, and recorded in the artifact."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_overrides
from rayblora.artifact import load_posterior
from rayblora.config import ModelConfig, load_config
from rayblora.data.batches import encode, generation_batch, make_batch
from rayblora.data.formats import TaskSpec
from rayblora.model import ModelError, load_base_model, tiny_tokenizer
from rayblora.scoring import build_scorer
from rayblora.workflows.train import train


def wrapped(prompts):
    plain = tiny_tokenizer()
    return [plain.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def test_prompts_go_through_the_chat_template_in_every_path(sentiment_files, tmp_path):
    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path, **{"data.chat_template": "true",
                                                                        "posterior.members": "1"}))
    path = train(cfg, log=lambda _m: None, in_process=True)
    assert json.loads((path / "manifest.json").read_text())["task"]["chat_template"] is True
    posterior = load_posterior(path)  # the served / evaluated / generating scorer, rebuilt from the manifest
    tokenizer, plain = posterior.scorer.tokenizer, tiny_tokenizer()
    prompts = ["a fine film\nSentiment:", "dull\nSentiment:"]
    inside = wrapped(prompts)
    assert inside[0] == "<user>a fine film\nSentiment:\n<assistant>"
    expected = encode(plain, inside, cfg.data.max_length)
    for batch in (posterior.scorer.encode(prompts),  # serving and Posterior.predict
                  make_batch(tokenizer, {"prompt": prompts, "label": [1, 0], "num_choices": [2, 2]},
                             cfg.data.max_length)):  # training and evaluation batches
        assert torch.equal(batch["input_ids"], expected["input_ids"])
    generation = generation_batch(tokenizer, prompts, [" yes", " no"], 64)  # generation targets
    assert torch.equal(generation["input_ids"], generation_batch(plain, inside, [" yes", " no"], 64)["input_ids"])
    unwrapped = load_posterior(train(load_config(None, tiny_overrides(
        sentiment_files, tmp_path / "off", **{"posterior.members": "1"})), log=lambda _m: None, in_process=True))
    assert torch.equal(unwrapped.scorer.encode(prompts)["input_ids"],
                       encode(plain, prompts, cfg.data.max_length)["input_ids"])


def test_artifacts_without_the_field_load_unwrapped_and_a_tokenizer_without_a_template_is_refused():
    spec = TaskSpec.from_dict({"kind": "classification", "choices": [" negative", " positive"],
                               "label_names": ["negative", "positive"], "prompt_template": "{text}"})
    assert spec.chat_template is False
    model, tokenizer = load_base_model(ModelConfig(name="tiny-llama"))
    tokenizer.chat_template = None
    with pytest.raises(ModelError, match="data.chat_template: the base model's tokenizer has no chat template"):
        build_scorer(ModelConfig(name="tiny-llama"), load_config(None, []).adapter,
                     dataclasses.replace(spec, chat_template=True), 32, base=(model, tokenizer))
