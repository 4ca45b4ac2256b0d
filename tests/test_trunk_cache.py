"""The frozen-trunk feature cache: exact (training and every family's predictive match the uncached path), never
stale (other base, layer, dtype, tokenisation or examples miss), and a damaged file is rebuilt, not read."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_overrides
from rayblora.config import load_config
from rayblora.data import load_task_data
from rayblora.data.batches import eval_batches
from rayblora.trunk_cache import TrunkCache
from rayblora.workflows.evaluate import evaluate_methods
from rayblora.workflows.members import train_one_member, trunk_cache_for
from rayblora.workflows.train import train
from rayblora.manifest import open_artifact

TOP_LAYER = {"model.tiny_layers": "3", "adapter.layers": "[2]", "train.steps": "40", "train.eval_every": "0"}
"""LoRA on the top layer of three: layers 0 and 1 are the cached trunk; 40 steps of 16 = over 2 epochs of 300."""


def _config(files, out, **extra):
    return load_config(None, tiny_overrides(files, out, **{**TOP_LAYER, **extra}))


def _without_cache(cfg):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, trunk_cache=False))


def _logits(scorer, split):
    with torch.no_grad():
        return torch.cat([scorer.logits(b) for b in eval_batches(split, scorer.tokenizer, 16, scorer.max_length)])


def test_a_member_trains_the_same_with_and_without_the_cache(sentiment_files, tmp_path):
    cfg = _config(sentiment_files, tmp_path / "run", **{"adapter.dropout": "0.1"})
    data = load_task_data(cfg.data)
    quiet = {"data": data, "log": lambda _m: None}
    cached = train_one_member(cfg, 0, **quiet)
    plain = train_one_member(_without_cache(cfg), 0, **quiet)
    cache = cached.scorer.trunk_cache
    assert plain.scorer.trunk_cache is None and cache is not None
    unique = len(set(data.train["prompt"])) + len(set(data.validation["prompt"]))
    assert cache.hits > 40 * 16 - unique and cache.misses == len(cache.entries)
    losses = torch.tensor([[a["train_loss"], b["train_loss"]] for a, b in zip(cached.history, plain.history)])
    assert len(losses) == 40 and torch.allclose(losses[:, 0], losses[:, 1], atol=1e-5, rtol=0)
    cached_logits = _logits(cached.scorer, data.test)
    cached.scorer.use_trunk_cache(None)
    assert torch.allclose(cached_logits, _logits(cached.scorer, data.test), atol=1e-5, rtol=0)
    assert torch.allclose(cached_logits, _logits(plain.scorer, data.test), atol=1e-5, rtol=0)


def test_blob_trains_from_the_cache_as_without_it(sentiment_files, tmp_path, tiny_data):
    """BLoB's objective changes only the LoRA modules: its flipout training reads the trunk cache exactly."""
    cfg = _config(sentiment_files, tmp_path / "run", **{"posterior.method": "blob", "train.steps": "24"})
    quiet = {"data": tiny_data, "log": lambda _m: None}
    cached = train_one_member(cfg, 0, **quiet)
    plain = train_one_member(_without_cache(cfg), 0, **quiet)
    assert cached.scorer.trunk_cache is not None and cached.scorer.trunk_cache.hits > 0
    losses = torch.tensor([[a["train_loss"], b["train_loss"]] for a, b in zip(cached.history, plain.history)])
    assert len(losses) == 24 and torch.allclose(losses[:, 0], losses[:, 1], atol=1e-5, rtol=0)


def test_every_family_predicts_the_same_with_and_without_the_cache(sentiment_files, tmp_path):
    swag = {"posterior.method": "multiswag", "adapter.dropout": "0.1", "swag.start_step": "20",
            "swag.max_rank": "3", "swag.samples": "3", "sampling.samples": "3", "laplace.fit_batches": "3",
            "laplace.link_samples": "20"}
    cfg = _config(sentiment_files, tmp_path / "run", **swag)
    artifact = train(cfg, log=lambda _m: None, in_process=True)
    assert (tmp_path / "run" / "trunk_cache").is_dir()
    methods = ["map", "ensemble", "temperature", "mc_dropout", "laplace", "laplace_ensemble", "swa", "swag",
               "multiswag"]
    quiet = {"methods": methods, "log": lambda _m: None}
    cached = evaluate_methods(open_artifact(artifact), cfg, **quiet)
    plain = evaluate_methods(open_artifact(artifact), _without_cache(cfg), **quiet)
    for method in methods:
        for split, result in cached[method].items():
            assert abs(result.probs - plain[method][split].probs).max() <= 1e-5, (method, split)


def test_hybrid_training_and_deepspeed_members_run_without_the_cache(sentiment_files, tmp_path, tiny_data):
    cfg = _config(sentiment_files, tmp_path / "run", **{"posterior.method": "hybrid_vi", "train.steps": "2"})
    assert train_one_member(cfg, 0, data=tiny_data, log=lambda _m: None).scorer.trunk_cache is None
    messages = []
    ds = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, strategy="deepspeed"))
    scorer = train_one_member(_without_cache(cfg), 0, data=tiny_data, log=lambda _m: None).scorer
    assert trunk_cache_for(ds, scorer, messages.append) is None and "deepspeed" in messages[-1]
    all_layers = _config(sentiment_files, tmp_path / "all", **{"adapter.layers": "[]", "train.steps": "2"})
    assert train_one_member(all_layers, 0, data=tiny_data, log=lambda _m: None).scorer.trunk_cache is None


@pytest.fixture
def scorer_and_batch(sentiment_files, tmp_path, tiny_data):
    cfg = _config(sentiment_files, tmp_path / "run", **{"train.steps": "1"})
    scorer = train_one_member(_without_cache(cfg), 0, data=tiny_data, log=lambda _m: None).scorer
    return cfg, scorer, next(eval_batches(tiny_data.test, scorer.tokenizer, 8, scorer.max_length))


def _trunk_fn(scorer):
    from rayblora.data.batches import position_ids
    from rayblora.trunk import trunk_hidden

    return lambda rows: trunk_hidden(scorer.model, rows, position_ids(rows), 2)


def test_another_base_layer_or_dtype_is_another_cache_file(scorer_and_batch, tmp_path):
    _, scorer, _ = scorer_and_batch
    base = TrunkCache(scorer.fingerprint, 2, torch.float32, tmp_path)
    others = [TrunkCache("0" * 64, 2, torch.float32, tmp_path), TrunkCache(scorer.fingerprint, 1, torch.float32,
              tmp_path), TrunkCache(scorer.fingerprint, 2, torch.bfloat16, tmp_path)]
    assert len({base.path, *(c.path for c in others)}) == 4
    with pytest.raises(ValueError, match="does not belong"):
        scorer.use_trunk_cache(others[0])
    with pytest.raises(ValueError, match="does not belong"):
        scorer.use_trunk_cache(others[1])


def test_other_tokens_or_examples_miss_and_equal_ones_hit(scorer_and_batch, tiny_data):
    _, scorer, batch = scorer_and_batch
    cache, compute = TrunkCache(scorer.fingerprint, 2, torch.float32), _trunk_fn(scorer)
    exact = compute(batch)
    got = cache.hidden(batch, compute)
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], exact[mask], atol=1e-5) and (got[~mask] == 0).all()
    seen = len(cache.entries)
    assert cache.misses == seen and cache.hits == 8 - seen
    cache.hidden(batch, compute)
    assert cache.misses == seen and cache.hits == 16 - seen
    shorter = {"input_ids": batch["input_ids"][:, -6:], "attention_mask": batch["attention_mask"][:, -6:]}
    shifted = {"input_ids": (batch["input_ids"] + 1) % 200, "attention_mask": batch["attention_mask"]}
    other = next(eval_batches(tiny_data.validation, scorer.tokenizer, 8, scorer.max_length))
    for changed in (shorter, shifted, other):  # max_length 6; another tokenizer's ids; other examples
        before = cache.misses
        cache.hidden(changed, compute)
        assert cache.misses > before and cache.misses == len(cache.entries)


def test_a_damaged_cache_file_is_detected_and_rebuilt(scorer_and_batch, tmp_path):
    _, scorer, batch = scorer_and_batch
    compute, messages = _trunk_fn(scorer), []
    cache = TrunkCache(scorer.fingerprint, 2, torch.float32, tmp_path, messages.append)
    expected = cache.hidden(batch, compute)
    path = cache.save()
    fresh = TrunkCache(scorer.fingerprint, 2, torch.float32, tmp_path, messages.append)
    assert fresh.load() and torch.equal(fresh.hidden(batch, compute), expected) and fresh.misses == 0
    assert fresh.save() is None  # nothing new: the file is not written again
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    damaged = TrunkCache(scorer.fingerprint, 2, torch.float32, tmp_path, messages.append)
    assert not damaged.load() and not damaged.entries and "not a valid cache" in messages[-1]
    damaged.hidden(batch, compute)
    assert damaged.misses == len(damaged.entries) > 0 and damaged.save() == path
    sidecar = path.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "first_adapted_layer": 1}))  # identity altered
    assert not TrunkCache(scorer.fingerprint, 2, torch.float32, tmp_path, messages.append).load()
    path.write_bytes(b"x" * 100)  # garbage with the old sidecar
    assert not TrunkCache(scorer.fingerprint, 2, torch.float32, tmp_path, messages.append).load()


@pytest.mark.slow
def test_ray_members_train_from_the_drivers_cache_as_without_it(ray_session, sentiment_files, tmp_path):
    """K = 2 Ray Train runs after the driver filled and wrote the cache: each member's adapter equals that
    member trained in this process without a cache."""
    cfg = _config(sentiment_files, tmp_path / "run", **{"train.steps": "24"})
    messages = []
    artifact = train(cfg, log=messages.append)
    written = [m for m in messages if m.startswith("[trunk cache] wrote")]
    assert written and list((tmp_path / "run" / "trunk_cache").glob("*.safetensors"))
    from rayblora.artifact import load_posterior

    members = load_posterior(artifact).members
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cfg.train.torch_threads)  # as the workers run
        for i, state in enumerate(members):
            expected = train_one_member(_without_cache(cfg), i, log=lambda _m: None).scorer.adapter_state()
            for key in expected:
                torch.testing.assert_close(state[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    finally:
        torch.set_num_threads(threads)
