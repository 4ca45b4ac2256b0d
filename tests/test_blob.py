"""BLoB (blob, blob_mean): the KL term, the flipout estimator, the KL weighting, training on the tiny model and the
family's artifact round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rayblora.artifact import load_posterior, save_posterior
from rayblora.config import ConfigError, load_config
from rayblora.posteriors import get_posterior_class
from rayblora.posteriors.blob import BlobTraining, gaussian_kl_to_isotropic, kl_step_weight
from rayblora.scoring import build_scorer
from rayblora.workflows.members import train_members_in_process
from conftest import tiny_overrides


def test_kl_matches_the_closed_form_of_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(4, 7, generator=g), torch.rand(4, 7, generator=g) + 0.01
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(0.0, 0.2)).sum()
    torch.testing.assert_close(gaussian_kl_to_isotropic(mean, std, 0.2), expected, rtol=1e-5, atol=1e-5)
    assert float(gaussian_kl_to_isotropic(torch.zeros(3), torch.full((3,), 0.2), 0.2)) == pytest.approx(0.0)


@pytest.mark.parametrize("weighting", ["uniform", "reweighted"])
def test_an_epochs_kl_weights_add_up_to_one(weighting):
    for m in (1, 7, 40, 100):
        weights = [kl_step_weight(weighting, i, m) for i in range(m)]
        assert sum(weights) == pytest.approx(1.0, abs=1e-9 if m <= 60 else 1e-12 + 2.0 ** -m)
    if weighting == "reweighted":
        assert kl_step_weight(weighting, 0, 5) > kl_step_weight(weighting, 4, 5)


@pytest.fixture(scope="module")
def blob_config(sentiment_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("blob-run")
    return load_config(None, tiny_overrides(sentiment_files, out, **{
        "posterior.method": "blob", "posterior.members": "2", "train.steps": "12", "sampling.samples": "3"}))


def _objective(cfg, tiny_data):
    scorer = build_scorer(cfg.model, cfg.adapter, tiny_data.spec, cfg.data.max_length, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B ≠ 0, so noise on A reaches the logits
        for name, p in scorer.lora_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    objective = BlobTraining.from_config(cfg)
    params = dict(objective.trainable_parameters(scorer))
    return scorer, objective, params


def test_flipout_at_zero_std_is_the_deterministic_forward_and_noisy_otherwise(blob_config, tiny_data):
    scorer, objective, params = _objective(blob_config, tiny_data)
    batch = scorer.encode(["a good film\nSentiment:"] * 6)
    with torch.no_grad():
        plain = scorer.logits(batch)
        for g in objective.g:
            g.zero_()
        # the flipout hooks make the last layer's queries run at every position (rayblora.trunk.tail_ready): the
        # same values as the plain forward's answer-position queries, through other matmul shapes (float32 ulps)
        torch.testing.assert_close(objective.logits(scorer, batch), plain, rtol=1e-6, atol=1e-6)
        for g in objective.g:
            g.fill_(0.5)
        noisy = objective.logits(scorer, batch)
    assert not torch.allclose(noisy, plain)
    assert not torch.allclose(noisy[0], noisy[1])  # identical rows, their own signs: decorrelated draws


def test_elbo_gradients_reach_a_b_and_the_std(blob_config, tiny_data):
    scorer, objective, params = _objective(blob_config, tiny_data)
    batch = scorer.encode(["a good film\nSentiment:", "a dull plot\nSentiment:"])
    loss = torch.nn.functional.cross_entropy(objective.logits(scorer, batch), torch.tensor([1, 0]))
    (loss + objective.regulariser(scorer, 0, 400)).backward()
    grads = {n: p.grad for n, p in params.items()}
    assert any("lora_A" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert any("lora_B" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("blob."))


def test_the_kl_step_is_sgd_on_the_weighted_kl(blob_config, tiny_data):
    scorer, objective, params = _objective(blob_config, tiny_data)
    objective.regulariser(scorer, 0, 400)  # the loop's call: records N
    a_names = [n for n in params if "lora_A" in n]
    tensors = [params[n] for n in a_names] + list(objective.g)
    kl = objective.weighted_kl(4, 400)
    grads = torch.autograd.grad(kl, tensors)
    rate = blob_config.blob.kl_lr * objective.lr_at(4)
    expected = [(t - rate * g).detach() for t, g in zip(tensors, grads)]
    objective(5, scorer)  # after optimizer step 5 (1-based) = step index 4
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t.detach(), e)
    m = objective.steps_per_epoch(400)
    assert kl_step_weight("uniform", 4, m) == pytest.approx(1 / m)


@pytest.fixture(scope="module")
def blob_run(blob_config, tiny_data):
    scorer, members = train_members_in_process(blob_config, log=lambda _m: None, data=tiny_data)
    post = get_posterior_class("blob").build(scorer, [m.adapter for m in members], [m.info() for m in members],
                                             data=tiny_data, config=blob_config,
                                             member_dirs=[m.checkpoint_dir for m in members])
    return scorer, members, post


def test_trained_blob_samples_have_the_learnt_std_and_mean_variant_is_the_members(blob_run, blob_config,
                                                                                tiny_data):
    scorer, members, post = blob_run
    assert post.num_samples == 2 * 3 and len(post.stds) == 2
    key = sorted(post.stds[0])[0]
    std = post.stds[0][key]
    assert float(std.min()) > 0 and not torch.allclose(std, std.flatten()[0].expand_as(std))  # learnt, not init
    many = get_posterior_class("blob")(scorer, post.members, post.member_info, post.stds, samples=600)
    draws = torch.stack([s[key] for s in many.sample_states[:600]])
    torch.testing.assert_close(draws.mean(0), post.members[0][key], atol=4 * float(std.max()) / 600 ** 0.5,
                               rtol=0)
    torch.testing.assert_close(draws.std(0), std, rtol=0.2, atol=1e-6)
    batch = scorer.encode(tiny_data.test["prompt"][:8])
    mean = post.view("blob_mean", config=blob_config)
    ensemble = get_posterior_class("ensemble").build(scorer, post.members, post.member_info)
    torch.testing.assert_close(mean.predict_batch(batch).probs, ensemble.predict_batch(batch).probs)


def test_blob_artifact_round_trip(blob_run, blob_config, tiny_data, tmp_path):
    scorer, _members, post = blob_run
    path = save_posterior(post, tmp_path / "blob", model_config=blob_config.model,
                          adapter_config=blob_config.adapter)
    loaded = load_posterior(path, scorer=scorer)
    assert loaded.method == "blob" and loaded.num_samples == post.num_samples
    batch = scorer.encode(tiny_data.test["prompt"][:8])
    torch.testing.assert_close(loaded.predict_batch(batch).probs, post.predict_batch(batch).probs)


def test_blob_without_variances_fails_clearly(trained_members):
    scorer, states, infos = trained_members
    with pytest.raises(ValueError, match="needs the A variances"):
        get_posterior_class("blob").build(scorer, states, infos)


def test_blob_config_is_validated():
    with pytest.raises(ConfigError, match="blob.kl_weighting"):
        load_config(None, ["blob.kl_weighting=linear"])
    with pytest.raises(ConfigError, match="blob.prior_std"):
        load_config(None, ["blob.prior_std=0"])
    with pytest.raises(ConfigError, match="train.strategy"):
        BlobTraining.from_config(dataclasses.replace(
            load_config(None, ["posterior.method=blob"]),
            train=dataclasses.replace(load_config(None).train, strategy="deepspeed")))
