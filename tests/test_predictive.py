"""The Bayesian model average and the entropy = aleatoric + mutual information split."""

import math

import pytest
import torch

from rayblora import predictive


def test_identity_entropy_equals_aleatoric_plus_mi():
    logits = torch.randn(5, 7, 3, generator=torch.Generator().manual_seed(0)) * 3
    p = predictive.from_logits(logits)
    assert torch.allclose(p.entropy, p.aleatoric + p.mutual_information, atol=1e-6)
    assert (p.mutual_information >= 0).all()
    assert torch.allclose(p.probs.sum(-1), torch.ones(7))


def test_probabilities_not_logits_are_averaged():
    sample_probs = torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]])
    p = predictive.from_sample_probs(sample_probs)
    assert torch.allclose(p.probs, torch.tensor([[0.5, 0.5]]))
    assert math.isclose(p.entropy.item(), math.log(2), rel_tol=1e-6)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert math.isclose(p.aleatoric.item(), h, rel_tol=1e-5)
    assert math.isclose(p.mutual_information.item(), math.log(2) - h, rel_tol=1e-5)


def test_identical_members_have_zero_mutual_information():
    one = torch.softmax(torch.randn(1, 4, 5), -1)
    p = predictive.from_sample_probs(one.repeat(6, 1, 1))
    assert torch.allclose(p.mutual_information, torch.zeros(4), atol=1e-6)
    assert torch.allclose(p.entropy, p.aleatoric, atol=1e-6)


def test_masked_choices_get_zero_probability():
    logits = torch.tensor([[[1.0, 2.0, float("-inf")]]])
    p = predictive.from_logits(logits)
    assert p.probs[0, 2] == 0 and torch.isfinite(p.entropy).all()


def test_concat_and_shape_errors():
    a = predictive.from_logits(torch.randn(3, 2, 4))
    b = predictive.from_logits(torch.randn(3, 5, 4))
    c = predictive.concat([a, b])
    assert c.probs.shape == (7, 4) and c.sample_probs.shape == (3, 7, 4)
    assert c.label.shape == (7,) and (c.confidence <= 1).all()
    with pytest.raises(ValueError, match="sample_probs must be"):
        predictive.from_sample_probs(torch.rand(2, 3))
    with pytest.raises(ValueError, match="no predictive"):
        predictive.concat([])
