"""Batched multi-adapter execution (rayblora.batched) gives the sequential path's logits."""

from __future__ import annotations

import pytest
import torch

from rayblora.batched import batched_logits, lora_dropout_rate, stacked_adapters, supports_batching
from rayblora.config import AdapterConfig
from rayblora.model import set_lora_state
from rayblora.scoring import build_scorer


def _noisy(state, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def scorer_states(trained_members):
    scorer, states, _ = trained_members
    return scorer, [states[0], states[1], _noisy(states[0], 1), _noisy(states[1], 2)]


@pytest.fixture(scope="module")
def batch(scorer_states, tiny_data):
    scorer, _ = scorer_states
    return scorer.encode(tiny_data.test["prompt"][:6])


def test_batched_equals_sequential(scorer_states, batch):
    scorer, states = scorer_states
    seq = scorer.logits_for_states_sequential(batch, states)
    out = scorer.logits_for_states(batch, states)
    assert out.shape == (4, 6, scorer.num_choices)
    assert torch.allclose(out, seq, atol=1e-5, rtol=0)
    assert (seq[0] - seq[2]).abs().max() > 1e-3  # the states really differ


def test_chunked_rows_give_same_logits(scorer_states, batch):
    scorer, states = scorer_states
    full = batched_logits(scorer, batch, states, max_rows=1000)
    chunked = batched_logits(scorer, batch, states, max_rows=7)  # one state per forward
    assert torch.allclose(full, chunked, atol=1e-5, rtol=0)


def test_model_is_left_unchanged(scorer_states, batch):
    scorer, states = scorer_states
    before = scorer.adapter_state()
    single = scorer.logits_for_states_sequential(batch, [before])
    scorer.logits_for_states(batch, states)
    after = scorer.adapter_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with stacked_adapters(scorer.model, states[:2]):
        pass
    assert not any("forward" in vars(m) for m in scorer.model.modules())
    torch.testing.assert_close(scorer.logits_for_states_sequential(batch, [before]), single, rtol=0, atol=1e-6)


def test_unsupported_states_fall_back_to_sequential(scorer_states, batch):
    scorer, states = scorer_states
    partial = [{k: v for i, (k, v) in enumerate(s.items()) if i > 0} for s in states[:2]]
    assert supports_batching(scorer.model, states) and not supports_batching(scorer.model, partial)
    with pytest.raises(ValueError, match="plain LoRA"):
        with stacked_adapters(scorer.model, partial):
            pass


def test_lora_dropout_rows_are_independent_passes(tiny_session_config, tiny_data):
    cfg = tiny_session_config
    scorer = build_scorer(cfg.model, AdapterConfig(dropout=0.3), tiny_data.spec, cfg.data.max_length, seed=0)
    state = _noisy(scorer.adapter_state(), 3, scale=0.5)
    batch = scorer.encode(tiny_data.test["prompt"][:4])
    assert lora_dropout_rate(scorer.model) == pytest.approx(0.3)
    scorer.model.eval()
    off = scorer.logits_for_states(batch, [state] * 3)
    assert torch.allclose(off[0], off[2], atol=1e-5)  # eval mode: dropout off, identical samples
    torch.manual_seed(0)
    on = scorer.logits_for_states(batch, [state] * 3, lora_dropout=True)
    assert (on[0] - on[1]).abs().max() > 1e-4
    assert not any(m.training for m in scorer.model.modules())  # eval mode put back


def test_shared_trunk_gives_full_forward_logits(tiny_session_config, tiny_data):
    """LoRA on the top layer only: layers below run once per batch, yet every state's logits are unchanged."""
    from dataclasses import replace

    from rayblora.trunk import first_adapted_layer

    cfg = tiny_session_config
    model_cfg = replace(cfg.model, tiny_layers=3)
    top = build_scorer(model_cfg, AdapterConfig(layers=(2,)), tiny_data.spec, cfg.data.max_length, seed=0)
    states = [_noisy(top.adapter_state(), seed, scale=0.5) for seed in range(3)]
    batch = top.encode(tiny_data.test["prompt"][:5])
    assert first_adapted_layer(top.model) == 2 and top.shared_trunk(batch)[1].shape[:2] == batch["input_ids"].shape
    full = []
    for state in states:  # reference: whole stack per state, no trunk
        with top.restoring_adapter():
            set_lora_state(top.model, state)
            full.append(top.logits(batch))
    full = torch.stack(full)
    assert (full[0] - full[1]).abs().max() > 1e-3
    assert torch.allclose(top.logits_for_states(batch, states), full, atol=1e-5, rtol=0)
    assert torch.allclose(top.logits_for_states_sequential(batch, states), full, atol=1e-5, rtol=0)
    assert len(top.model.get_base_model().model.layers) == 3  # the window is put back

    everywhere = build_scorer(model_cfg, AdapterConfig(), tiny_data.spec, cfg.data.max_length, seed=0)
    assert first_adapted_layer(everywhere.model) == 0 and everywhere.shared_trunk(batch) is None
