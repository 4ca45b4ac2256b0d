"""Baselines: temperature scaling fitted on validation NLL, and MC dropout over LoRA dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rayblora.artifact import load_posterior, save_posterior
from rayblora.config import AdapterConfig
from rayblora.data.batches import eval_batches
from rayblora.posteriors import get_posterior_class
from rayblora.posteriors.baselines import fit_temperature
from rayblora.scoring import build_scorer


def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(3.0 * true_logits, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(0.5 * true_logits, labels) == pytest.approx(0.5, rel=0.1)


def test_fit_temperature_ignores_invalid_choices():
    logits = torch.tensor([[2.0, -1.0, float("-inf")], [0.5, 1.5, float("-inf")]]).repeat(50, 1)
    labels = torch.tensor([0, 0]).repeat(50)
    t = fit_temperature(logits, labels)
    assert t > 0 and torch.isfinite(torch.tensor(t))


def _val_nll(posterior, data) -> float:
    nll, n = 0.0, 0
    for batch in eval_batches(data.validation, posterior.scorer.tokenizer, 16, posterior.scorer.max_length):
        probs = posterior.predict_batch(batch).probs
        nll += F.nll_loss(probs.clamp_min(1e-12).log(), batch["labels"], reduction="sum").item()
        n += len(batch["labels"])
    return nll / n


def test_temperature_fit_lowers_validation_nll_and_round_trips(trained_members, tiny_data, tiny_session_config,
                                                               tmp_path):
    scorer, states, infos = trained_members
    scaled = get_posterior_class("temperature").build(scorer, states, infos, data=tiny_data)
    plain = get_posterior_class("map").build(scorer, states, infos)
    assert scaled.num_samples == 1 and scaled.temperature != pytest.approx(1.0, abs=1e-3)
    assert _val_nll(scaled, tiny_data) < _val_nll(plain, tiny_data)
    path = save_posterior(scaled, tmp_path / "temp", model_config=tiny_session_config.model,
                          adapter_config=tiny_session_config.adapter)
    loaded = load_posterior(path, scorer=scorer)
    assert loaded.method == "temperature" and loaded.temperature == scaled.temperature
    with pytest.raises(ValueError, match="temperature: needs data"):
        get_posterior_class("temperature").build(scorer, states, infos)


def test_mc_dropout_needs_lora_dropout(trained_members):
    scorer, states, infos = trained_members
    with pytest.raises(ValueError, match=r"adapter.dropout = 0"):
        get_posterior_class("mc_dropout").build(scorer, states, infos)


def test_mc_dropout_gives_nonzero_mutual_information(tiny_session_config, tiny_data):
    cfg = tiny_session_config
    scorer = build_scorer(cfg.model, AdapterConfig(dropout=0.3), tiny_data.spec, cfg.data.max_length, seed=0)
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in scorer.adapter_state().items()}
    post = get_posterior_class("mc_dropout").build(scorer, [state], [{}], config=cfg)
    assert post.num_samples == cfg.sampling.samples
    batch = scorer.encode(tiny_data.test["prompt"][:8])
    pred = post.predict_batch(batch)
    assert pred.sample_probs.shape == (cfg.sampling.samples, 8, 2)
    assert (pred.mutual_information > 0).all()
    again = post.predict_batch(batch)  # seeded masks: the same batch gives the same predictive
    # (to the last bits only where the BLAS reduces in a fixed order; other masks differ by far more than 1e-6)
    torch.testing.assert_close(pred.probs, again.probs, rtol=0, atol=1e-6)
    deterministic = get_posterior_class("map").build(scorer, [state], [{}]).predict_batch(batch)
    assert torch.all(deterministic.mutual_information == 0)


def test_temperature_ensemble_scales_every_member_and_rescales_a_member_pass(trained_members, tiny_data):
    """One T for all members, fitted on the validation NLL of their average; `rescale` of the members' plain
    probabilities equals the scaled posterior's own prediction (what evaluate uses), for both temperature rows."""
    scorer, states, infos = trained_members
    batch = next(eval_batches(tiny_data.test, scorer.tokenizer, 16, scorer.max_length))
    members = get_posterior_class("ensemble").build(scorer, states, infos).predict_batch(batch).sample_probs
    for method, n in (("temperature", 1), ("temperature_ensemble", len(states))):
        post = get_posterior_class(method).build(scorer, states, infos, data=tiny_data)
        own = post.predict_batch(batch)
        assert own.sample_probs.shape[0] == n and post.temperature > 0
        assert torch.allclose(post.rescale(members).probs, own.probs, atol=1e-5)
    val = next(eval_batches(tiny_data.validation, scorer.tokenizer, 64, scorer.max_length))
    logits = scorer.logits_for_states(val, states)
    ens_t = fit_temperature(logits, val["labels"])

    def nll(t):
        return float(-torch.log(torch.softmax(logits / t, -1).mean(0).gather(1, val["labels"][:, None])).mean())

    assert nll(ens_t) <= min(nll(ens_t * 0.9), nll(ens_t * 1.1)) + 1e-6
