"""Exact fast paths against the paths they replace. The last decoder layer run only at the positions the logits read
(rayblora.trunk.tail_hidden): equal to the full forward for answer logits, batched states, generation target
scores, training losses and every family's predictive, and refused wherever it would not be exact. Evaluation
batches of rows grouped by length: every row once, less padding, predictions back in row order."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides
from rayblora import trunk
from rayblora.config import load_config
from rayblora.data import load_task_data
from rayblora.data.batches import eval_batches
from rayblora.trunk import tail_ready
from rayblora.workflows.evaluate import evaluate_methods
from rayblora.workflows.members import train_one_member
from rayblora.workflows.train import train
from rayblora.manifest import open_artifact

THREE_LAYERS = {"model.tiny_layers": "3", "train.eval_every": "0", "adapter.dropout": "0.1"}


def _config(files, out, **extra):
    return load_config(None, tiny_overrides(files, out, **{**THREE_LAYERS, **extra}))


def _both_paths(scorer, fn):
    """fn() with the tail, then with every position of every layer."""
    try:
        with_tail = fn()
        scorer.tail_only = False
        return with_tail, fn()
    finally:
        scorer.tail_only = True


@pytest.fixture
def member(sentiment_files, tmp_path, tiny_data):
    cfg = _config(sentiment_files, tmp_path / "run", **{"adapter.layers": "[1,2]", "train.steps": "8"})
    scorer = train_one_member(cfg, 0, data=tiny_data, log=lambda _m: None).scorer
    scorer.model.eval()
    return scorer, next(eval_batches(tiny_data.test, scorer.tokenizer, 8, scorer.max_length))


@pytest.mark.parametrize("layers", ["[2]", "[1,2]", "[]"])
def test_answer_logits_and_batched_states_equal_the_full_forward(layers, sentiment_files, tmp_path, tiny_data):
    cfg = _config(sentiment_files, tmp_path / "run", **{"adapter.layers": layers, "train.steps": "8"})
    scorer = train_one_member(cfg, 0, data=tiny_data, log=lambda _m: None).scorer
    scorer.model.eval()
    batch = next(eval_batches(tiny_data.test, scorer.tokenizer, 8, scorer.max_length))
    assert batch["attention_mask"].min() == 0  # left padding is part of what is compared
    assert tail_ready(scorer.model, batch["input_ids"].shape[-1])
    with torch.no_grad():
        tail, full = _both_paths(scorer, lambda: scorer.logits(batch))
    assert (tail - full).abs().max() <= 1e-5
    g = torch.Generator().manual_seed(0)
    states = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in scorer.adapter_state().items()}
              for _ in range(3)]
    tail, full = _both_paths(scorer, lambda: scorer.logits_for_states(batch, states))
    assert tail.shape == (3, 8, 2) and (tail - full).abs().max() <= 1e-5
    mc_tail, mc_full = _both_paths(scorer, lambda: _seeded(lambda: scorer.logits_for_states(batch, states, True)))
    assert (mc_tail - mc_full).abs().max() <= 1e-5  # the same dropout masks: queries run everywhere under dropout


def _seeded(fn):
    torch.manual_seed(0)
    return fn()


def test_generation_target_scores_equal_the_full_forward(member):
    scorer, batch = member
    target_mask = torch.zeros_like(batch["attention_mask"])
    target_mask[:, -3:] = 1
    target_mask[0, -3] = 0  # targets of two lengths in one batch
    rows = {**batch, "target_mask": target_mask}
    with torch.no_grad():
        (nll_tail, hit_tail), (nll_full, hit_full) = _both_paths(scorer, lambda: scorer.target_scores(rows))
    assert (nll_tail - nll_full).abs().max() <= 1e-4 and torch.equal(hit_tail, hit_full)


def test_gradients_and_captured_block_inputs_equal_the_full_forward(member):
    """A hook on the last layer's query projection (Laplace's block capture) sees every position, as before."""
    scorer, batch = member
    q_proj = trunk.decoder_stack(scorer.model).layers[-1].self_attn.q_proj
    seen = []
    handle = q_proj.lora_A["default"].register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape))

    def grads():
        scorer.model.zero_grad()
        with torch.enable_grad():
            scorer.logits(batch).logsumexp(-1).sum().backward()
        return torch.cat([p.grad.flatten() for _, p in scorer.lora_parameters()])

    try:
        assert tail_ready(scorer.model, batch["input_ids"].shape[-1])
        tail, full = _both_paths(scorer, grads)
    finally:
        handle.remove()
    assert (tail - full).abs().max() <= 1e-5 and seen[0] == seen[1] == (8, batch["input_ids"].shape[-1], 64)


def test_the_tail_is_refused_where_it_would_not_be_exact(member):
    scorer, batch = member
    length = batch["input_ids"].shape[-1]
    last = trunk.decoder_stack(scorer.model).layers[-1]
    handle = last.mlp.register_forward_hook(lambda *_: None)  # e.g. the hybrid family's bottleneck adapter
    try:
        assert not tail_ready(scorer.model, length)
        with torch.no_grad():
            tail, full = _both_paths(scorer, lambda: scorer.logits(batch))
        torch.testing.assert_close(tail, full, rtol=0, atol=1e-6)  # one path: the full forward, run twice
    finally:
        handle.remove()
    assert tail_ready(scorer.model, length)
    scorer.model.config.attention_dropout = 0.1
    try:
        scorer.model.train()
        assert not tail_ready(scorer.model, length)  # attention dropout draws over every query
        scorer.model.eval()
        assert tail_ready(scorer.model, length)
    finally:
        scorer.model.config.attention_dropout = 0.0


def test_training_losses_equal_the_full_forward(sentiment_files, tmp_path, tiny_data, monkeypatch):
    cfg = _config(sentiment_files, tmp_path / "run", **{"adapter.layers": "[1,2]", "train.steps": "12"})
    quiet = {"data": tiny_data, "log": lambda _m: None}
    tail = train_one_member(cfg, 0, **quiet).history
    monkeypatch.setattr(trunk, "TAIL_MODEL_TYPES", ())
    full = train_one_member(cfg, 0, **quiet).history
    losses = torch.tensor([[a["train_loss"], b["train_loss"]] for a, b in zip(tail, full)])
    assert len(losses) == 12 and torch.allclose(losses[:, 0], losses[:, 1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_every_family_predicts_the_same_with_and_without_the_tail(sentiment_files, tmp_path, monkeypatch):
    swag = {"adapter.layers": "[2]", "train.steps": "40", "posterior.method": "multiswag",
            "swag.start_step": "20", "swag.max_rank": "3", "swag.samples": "3", "sampling.samples": "3",
            "laplace.fit_batches": "3", "laplace.link_samples": "20", "tfb.search_steps": "2"}
    cfg = _config(sentiment_files, tmp_path / "run", **swag)
    artifact = train(cfg, log=lambda _m: None, in_process=True)
    methods = ["map", "ensemble", "temperature", "mc_dropout", "laplace", "laplace_ensemble", "swag", "multiswag",
               "tfb"]
    data = load_task_data(cfg.data)
    tail = evaluate_methods(open_artifact(artifact), cfg, methods, data=data, log=lambda _m: None)
    monkeypatch.setattr(trunk, "TAIL_MODEL_TYPES", ())
    full = evaluate_methods(open_artifact(artifact), cfg, methods, data=data, log=lambda _m: None)
    for method in methods:
        for split, result in tail[method].items():
            assert abs(result.probs - full[method][split].probs).max() <= 1e-5, (method, split)


# --- evaluation batches grouped by length ---------------------------------------------------------------------------
def test_length_grouped_batches_cover_every_row_once_and_pad_less(tiny_data, trained_members):
    from rayblora.data.batches import eval_batches

    scorer = trained_members[0]
    split = tiny_data.test
    grouped = list(eval_batches(split, scorer.tokenizer, 8, scorer.max_length, by_length=True))
    rows = torch.cat([b["rows"] for b in grouped])
    assert sorted(rows.tolist()) == list(range(len(split)))
    lengths = torch.cat([b["attention_mask"].sum(-1) for b in grouped])
    assert (lengths[1:] >= lengths[:-1]).all()
    in_order = list(eval_batches(split, scorer.tokenizer, 8, scorer.max_length))
    assert sum(b["input_ids"].numel() for b in grouped) <= sum(b["input_ids"].numel() for b in in_order)
    assert torch.equal(torch.cat([b["labels"] for b in grouped]), torch.as_tensor(split["label"])[rows])


def test_a_split_is_predicted_in_row_order_from_length_grouped_batches(tiny_data, trained_members):
    """predict_dataset groups rows by length; what it returns is in the split's row order, equal (1e-5) to batches
    taken in row order."""
    from rayblora.data.batches import eval_batches
    from rayblora.posteriors import get_posterior_class

    scorer, states, infos = trained_members
    post = get_posterior_class("ensemble").build(scorer, states, infos)
    whole = post.predict_dataset(tiny_data.test, batch_size=8)
    in_order = torch.cat([post.predict_batch(b).sample_probs
                          for b in eval_batches(tiny_data.test, scorer.tokenizer, 8, scorer.max_length)], 1)
    assert whole.sample_probs.shape == in_order.shape
    assert (whole.sample_probs - in_order).abs().max() <= 1e-5
