"""Training-free Bayesianization (tfb, tfb_ensemble): the low-rank isotropic variance, the σ search, and the family
through its public interface on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from rayblora.artifact import load_posterior, save_posterior
from rayblora.config import ConfigError, load_config
from rayblora.data.batches import eval_batches
from rayblora.posteriors import get_posterior_class
from rayblora.posteriors.tfb import LowRankFactors, largest_within_tolerance, lora_factor_pairs, performance_drop


def _random_adapter(seed: int = 0, d_out: int = 12, d_in: int = 10, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}.lora_A.weight": torch.randn(r, d_in, generator=g) for i in range(2)} | {
        f"m{i}.lora_B.weight": torch.randn(d_out, r, generator=g) * (i + 1) for i in range(2)}


def test_factorisation_keeps_delta_w_and_b_prime_has_orthogonal_columns():
    state = _random_adapter()
    factors = LowRankFactors.from_state(state)
    for a_key, b_key in lora_factor_pairs(state):
        torch.testing.assert_close(factors.state[b_key] @ factors.state[a_key], state[b_key] @ state[a_key],
                                   atol=1e-5, rtol=1e-5)
        gram = factors.state[b_key].T @ factors.state[b_key]  # diag(D²)
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-4, rtol=0)


def test_sample_noise_is_isotropic_with_variance_sigma_squared_in_the_column_space_of_b():
    state, sigma = _random_adapter(1), 0.3
    factors = LowRankFactors.from_state(state)
    samples = factors.samples(sigma, factors.standard_draws(4000, seed=0))
    a_key, b_key = lora_factor_pairs(state)[1]
    b_prime = factors.state[b_key]
    noise = torch.stack([b_prime @ (s[a_key] - factors.state[a_key]) for s in samples])  # (N, d_out, d_in)
    u = torch.linalg.svd(state[b_key], full_matrices=False)[0]  # (d_out, r)
    cov = torch.einsum("nij,nkj->ik", noise, noise) / (noise.shape[0] * noise.shape[2])  # (d_out, d_out)
    torch.testing.assert_close(cov, sigma ** 2 * u @ u.T, atol=0.01, rtol=0)
    assert all(torch.equal(s[b_key], b_prime) for s in samples[:5])
    zero = factors.samples(0.0, factors.standard_draws(2, seed=0))
    assert all(torch.equal(z[a_key], factors.state[a_key]) for z in zero)


def test_a_zero_b_gets_no_noise():
    state = _random_adapter(2)
    state["m0.lora_B.weight"] = torch.zeros_like(state["m0.lora_B.weight"])
    factors = LowRankFactors.from_state(state)
    s = factors.samples(0.5, factors.standard_draws(3, seed=0))
    for sample in s:
        delta = sample["m0.lora_B.weight"] @ sample["m0.lora_A.weight"]
        assert torch.count_nonzero(delta) == 0


@pytest.mark.parametrize("answer", [0.1, 3e-3, 0.7])
def test_search_returns_the_largest_sigma_within_tolerance(answer):
    tolerance = 0.01
    calls = []

    def drop(sigma: float) -> float:  # grows with σ and crosses the tolerance at `answer`
        calls.append(sigma)
        return tolerance * (sigma / answer) ** 2

    sigma, trace = largest_within_tolerance(drop, tolerance, 1e-4, 1.0, steps=12)
    assert len(calls) == len(trace) == 12
    assert drop(sigma) <= tolerance and sigma == pytest.approx(answer, rel=0.01)
    assert max(s for s, d in trace if d <= tolerance) == sigma


def test_search_at_the_ends_of_its_range():
    assert largest_within_tolerance(lambda s: 0.0, 0.01, 1e-3, 1.0, steps=10)[0] > 0.99
    assert largest_within_tolerance(lambda s: 1.0, 0.01, 1e-3, 1.0, steps=10)[0] == 1e-3
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        largest_within_tolerance(lambda s: 0.0, 0.01, 1.0, 0.5, steps=3)


def test_performance_drop_of_both_metrics():
    probs, labels = torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0])
    ref = {"nll": 0.5, "accuracy": 1.0}
    nll = (-math.log(0.9) - math.log(0.2)) / 2
    assert performance_drop("nll", ref, probs, labels) == pytest.approx((nll - 0.5) / 0.5)
    assert performance_drop("accuracy", ref, probs, labels) == pytest.approx(0.5)


class _NoTraining:
    def __getattr__(self, name):
        raise AssertionError("tfb read the training split")

    def __len__(self):
        raise AssertionError("tfb read the training split")


def _probs(posterior, data, n: int = 32) -> torch.Tensor:
    batch = next(iter(eval_batches(data.test.select(range(n)), posterior.scorer.tokenizer, n,
                                   posterior.scorer.max_length)))
    return posterior.predict_batch(batch).probs


def test_tfb_searches_on_validation_only_without_gradients_and_round_trips(trained_members, tiny_data,
                                                                         tiny_session_config, tmp_path):
    scorer, states, infos = trained_members
    cfg = dataclasses.replace(tiny_session_config, tfb=dataclasses.replace(tiny_session_config.tfb,
                                                                          search_steps=8))
    data = dataclasses.replace(tiny_data, train=_NoTraining())
    before = {k: v.clone() for k, v in scorer.adapter_state().items()}
    for p in scorer.model.parameters():
        p.grad = None  # left by the fixture's training
    post = get_posterior_class("tfb").build(scorer, states, infos, data=data, config=cfg)
    assert all(p.grad is None for p in scorer.model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in scorer.adapter_state().items())
    (search,) = post.search
    assert search["passes"] == 9 and len(post.sigmas) == 1 and post.num_samples == cfg.sampling.samples
    within = [s for s, d in search["trace"] if d <= cfg.tfb.tolerance]
    assert post.sigmas[0] == (max(within) if within else cfg.tfb.sigma_min)
    path = save_posterior(post, tmp_path / "tfb", model_config=cfg.model, adapter_config=cfg.adapter)
    loaded = load_posterior(path, scorer=scorer)
    assert loaded.method == "tfb" and loaded.sigmas == post.sigmas
    torch.testing.assert_close(_probs(loaded, tiny_data), _probs(post, tiny_data))
    with pytest.raises(ValueError, match="tfb: needs data"):
        get_posterior_class("tfb").build(scorer, states, infos)


def test_tfb_at_sigma_zero_is_map_and_larger_sigma_spreads_the_samples(trained_members, tiny_data):
    scorer, states, infos = trained_members
    tfb = get_posterior_class("tfb")
    map_probs = _probs(get_posterior_class("map").build(scorer, states, infos), tiny_data)
    zero = tfb(scorer, states, infos, sigmas=[0.0], samples=3)
    torch.testing.assert_close(_probs(zero, tiny_data), map_probs, atol=1e-5, rtol=1e-5)
    wide = tfb(scorer, states, infos, sigmas=[2.0], samples=3)
    batch = next(iter(eval_batches(tiny_data.test.select(range(16)), scorer.tokenizer, 16, scorer.max_length)))
    assert wide.predict_batch(batch).mutual_information.mean() > zero.predict_batch(batch).mutual_information.mean()


def test_tfb_ensemble_bayesianizes_every_member(trained_members, tiny_data, tiny_session_config):
    scorer, states, infos = trained_members
    cfg = dataclasses.replace(tiny_session_config, tfb=dataclasses.replace(tiny_session_config.tfb,
                                                                          search_steps=3))
    post = get_posterior_class("tfb_ensemble").build(scorer, states, infos, data=tiny_data, config=cfg)
    assert len(post.sigmas) == len(states) == len(post.search)
    assert post.num_samples == len(states) * cfg.sampling.samples


def test_tfb_config_is_validated():
    with pytest.raises(ConfigError, match="tfb.sigma_min"):
        load_config(None, ["tfb.sigma_min=2", "tfb.sigma_max=1"])
    with pytest.raises(ConfigError, match="tfb.metric"):
        load_config(None, ["tfb.metric=ece"])
    assert load_config(None, ["tfb.tolerance=0.05"]).tfb.tolerance == 0.05


def test_fit_cli_bayesianizes_an_existing_artifact(trained_members, tiny_session_config, sentiment_files,
                                                    tmp_path):
    from conftest import tiny_overrides

    from rayblora.cli import main

    scorer, states, infos = trained_members
    parent = save_posterior(get_posterior_class("ensemble").build(scorer, states, infos), tmp_path / "parent",
                            model_config=tiny_session_config.model, adapter_config=tiny_session_config.adapter)
    out = tmp_path / "fitted"
    overrides = tiny_overrides(sentiment_files, tmp_path / "run", **{"tfb.search_steps": "4"})
    assert main(["fit", "--posterior", str(parent), "--method", "tfb_ensemble", "--out", str(out),
                 *overrides]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "tfb_ensemble" and manifest["lineage"]["parent_method"] == "ensemble"
    fitted = load_posterior(out)
    assert len(fitted.sigmas) == 2 and all(s["passes"] == 5 for s in fitted.search)
