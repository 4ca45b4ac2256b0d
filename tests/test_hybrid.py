"""BH-PEFT: the hybrid adapter (LoRA + prefix + bottleneck), its mean-field variational posterior, the
round-to-round Gaussian prior and the dynamic fine-tuning driver (tiny model, no Ray)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_overrides, write_sentiment_jsonl

HYBRID = {"posterior.method": "hybrid_vi", "posterior.members": "1", "hybrid.prefix_tokens": "2",
          "hybrid.bottleneck_dim": "4", "hybrid.samples": "3", "hybrid.init_std": "0.01", "train.steps": "6"}


def _config(files, out, **extra):
    from rayblora.config import load_config

    return load_config(None, tiny_overrides(files, out, **{**HYBRID, **extra}))


@pytest.fixture
def hybrid_config(sentiment_files, tmp_path):
    return _config(sentiment_files, tmp_path / "run")


def _scorer(cfg):
    from rayblora.data.formats import classification_spec
    from rayblora.scoring import build_scorer

    spec = classification_spec(cfg.data.label_names, cfg.data.prompt_template)
    return build_scorer(cfg.model, cfg.adapter, spec, cfg.data.max_length, seed=0)


def test_kl_matches_the_closed_form_for_gaussians():
    from torch.distributions import Normal, kl_divergence

    from rayblora.posteriors.hybrid.gaussian import DiagonalGaussian

    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64) + .1
    prior = DiagonalGaussian(torch.randn(7, generator=g, dtype=torch.float64),
                             torch.rand(7, generator=g, dtype=torch.float64) * 5 + 0.2)
    expected = kl_divergence(Normal(mean, std), Normal(prior.mean, prior.precision.rsqrt())).sum()
    assert torch.allclose(prior.kl_from(mean, std), expected, rtol=1e-10)
    assert float(prior.kl_from(prior.mean, prior.precision.rsqrt())) == pytest.approx(0.0, abs=1e-12)


def test_round_prior_penalty_is_zero_at_the_previous_mean_with_its_precision_as_hessian():
    from rayblora.posteriors.hybrid.gaussian import DiagonalGaussian, inverse_softplus, softplus_std

    g = torch.Generator().manual_seed(1)
    mean = torch.randn(5, generator=g, dtype=torch.float64)
    std = softplus_std(inverse_softplus(torch.rand(5, generator=g, dtype=torch.float64) + 0.05))
    prior = DiagonalGaussian.from_posterior(mean, std, scale=2.0)
    assert float(prior.penalty(prior.mean)) == 0.0
    theta = torch.randn(5, generator=g, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(prior.penalty, theta)
    assert torch.allclose(hessian, torch.diag(prior.precision.double()), rtol=1e-6)
    assert torch.allclose(prior.precision.double(), 2.0 / std ** 2, rtol=1e-5)


def test_hybrid_modules_respect_padding_start_as_identity_and_act_only_when_active(hybrid_config):
    import dataclasses

    from rayblora.posteriors.hybrid.modules import HybridModules, active

    scorer = _scorer(hybrid_config)
    prompts = ["good great film\nSentiment:", "bad\nSentiment:"]
    bottleneck_only = HybridModules(scorer.model, dataclasses.replace(hybrid_config.hybrid, prefix_tokens=0),
                                    hybrid_config.adapter)
    both = HybridModules(scorer.model, hybrid_config.hybrid, hybrid_config.adapter)
    with torch.no_grad():
        plain = scorer.logits(scorer.encode(prompts))
        with active(scorer.model, bottleneck_only):
            assert torch.allclose(scorer.logits(scorer.encode(prompts)), plain, atol=1e-6)  # W_up = 0
        with active(scorer.model, both):
            batched = scorer.logits(scorer.encode(prompts))
            alone = scorer.logits(scorer.encode(prompts[1:]))
        after = scorer.logits(scorer.encode(prompts))
    assert not torch.allclose(batched, plain, atol=1e-4)  # the prefix acts
    assert torch.allclose(batched[1:], alone, atol=1e-5)  # left padding is masked out of the widened mask
    torch.testing.assert_close(after, plain, rtol=0, atol=1e-6)  # inactive modules leave the model alone


def test_variational_objective_reaches_every_adapter_part(hybrid_config):
    from rayblora.posteriors.hybrid.variational import VariationalTraining

    scorer = _scorer(hybrid_config)
    objective = VariationalTraining.from_config(hybrid_config)
    params = dict(objective.trainable_parameters(scorer))
    assert set(params) == {"hybrid_vi.mean", "hybrid_vi.rho"}
    batch = scorer.encode(["good film\nSentiment:", "poor plot\nSentiment:"])
    loss = objective.logits(scorer, batch).logsumexp(-1).sum() + objective.regulariser(scorer, 0, 100)
    loss.backward()
    grads = objective.q.split(params["hybrid_vi.mean"].grad)
    for part in ("lora_B", "prefixes", "bottlenecks"):
        assert any(part in name and float(g.abs().sum()) > 0 for name, g in grads.items()), part
    assert float(params["hybrid_vi.rho"].grad.abs().sum()) > 0


def _train_one(cfg, directory):
    from rayblora.data import load_task_data
    from rayblora.posteriors import get_posterior_class
    from rayblora.workflows.members import train_one_member

    data = load_task_data(cfg.data)
    scorer = train_one_member(cfg, 0, data=data, log=lambda _m: None,
                              on_checkpoint=lambda step, m, state: state.save(directory, {})).scorer
    post = get_posterior_class("hybrid_vi").build(scorer, [scorer.adapter_state()], [{}], data=data,
                                                  config=cfg, member_dirs=[str(directory)])
    return post, data


def test_hybrid_vi_artifact_round_trip_and_peft_member(sentiment_files, tmp_path):
    from peft import PeftModel

    from rayblora.artifact import load_posterior, save_posterior
    from rayblora.model import load_base_model

    cfg = _config(sentiment_files, tmp_path / "run")
    post, data = _train_one(cfg, tmp_path / "ckpt")
    batch = post.scorer.encode(list(data.test["prompt"][:5]))
    logits = post.sample_logits(batch)
    assert logits.shape == (3, 5, 2) and not torch.allclose(logits[0], logits[1])
    path = save_posterior(post, tmp_path / "posterior", model_config=cfg.model, adapter_config=cfg.adapter)
    manifest = json.loads((path / "manifest.json").read_text())
    assert "hybrid.safetensors" in manifest["files"] and manifest["method"] == "hybrid_vi"
    loaded = load_posterior(path)
    assert torch.allclose(loaded.sample_logits(batch), logits, atol=1e-5)
    mean_view = loaded.view("map")
    assert mean_view.num_samples == 1
    base, _ = load_base_model(cfg.model)
    peft = PeftModel.from_pretrained(base, str(path / "members" / "0"))
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # the trained LoRA posterior mean


def test_config_rejects_an_empty_hybrid_and_rounds_of_another_family(sentiment_files, tmp_path):
    from rayblora.config import ConfigError
    from rayblora.workflows.rounds import run_rounds

    with pytest.raises(ConfigError, match="hybrid.lora"):
        _config(sentiment_files, tmp_path, **{"hybrid.lora": "false", "hybrid.prefix_tokens": "0",
                                              "hybrid.bottleneck_dim": "0"})
    cfg = _config(sentiment_files, tmp_path, **{"posterior.method": "ensemble"})
    with pytest.raises(ConfigError, match="posterior.method"):
        run_rounds(cfg, tasks=[str(sentiment_files["train"])], in_process=True)


def test_two_rounds_write_two_linked_artifacts_and_a_forgetting_report(sentiment_files, tmp_path):
    from safetensors.torch import load_file

    from rayblora.manifest import sha256_file
    from rayblora.workflows.rounds import run_rounds

    second = write_sentiment_jsonl(tmp_path / "second.jsonl", 300, seed=7, noise=0.2)
    cfg = _config(sentiment_files, tmp_path / "rounds", **{"hybrid.prior_scale": "0.5",
                                                            "hybrid.compare_retrain": "true"})
    report = run_rounds(cfg, tasks=[str(sentiment_files["train"]), str(second)], in_process=True,
                        log=lambda _m: None)
    first_dir, second_dir = tmp_path / "rounds" / "round-0" / "posterior", tmp_path / "rounds" / "round-1" / "posterior"
    lineage = json.loads((second_dir / "manifest.json").read_text())["lineage"]
    assert lineage["round"] == 1 and lineage["parent"] == str(first_dir) and lineage["round_prior"]
    assert lineage["parent_manifest_sha256"] == sha256_file(first_dir / "manifest.json")
    assert json.loads((first_dir / "manifest.json").read_text())["lineage"]["parent"] is None
    parent, child = load_file(str(first_dir / "hybrid.safetensors")), load_file(str(second_dir / "hybrid.safetensors"))
    std = torch.nn.functional.softplus(parent["0.rho"])
    assert torch.allclose(child["0.prior_mean"], parent["0.mean"])
    assert torch.allclose(child["0.prior_precision"], 0.5 / std ** 2, rtol=1e-4)
    naive = load_file(str(tmp_path / "rounds" / "naive" / "round-1" / "posterior" / "hybrid.safetensors"))
    assert float(naive["0.prior_mean"].abs().max()) == 0.0
    dynamic = report["chains"]["dynamic"]
    assert [len(row["metrics"]) for row in dynamic["forgetting"]] == [1, 2]
    assert len(dynamic["rejection"]["second"]["accuracy"]) == 10
    for name in ("report.json", "report.md", "rejection.png"):
        assert (tmp_path / "rounds" / name).stat().st_size > 0
    assert "naive" in (tmp_path / "rounds" / "report.md").read_text()
    retrain_dir = tmp_path / "rounds" / "retrain" / "posterior"  # one posterior on both rounds' data, from scratch
    retrain_manifest = json.loads((retrain_dir / "manifest.json").read_text())
    assert retrain_manifest["lineage"]["pooled_tasks"] == [str(sentiment_files["train"]), str(second)]
    assert retrain_manifest["training"]["config"]["train"]["steps"] == 2 * cfg.train.steps
    (row,) = report["chains"]["retrain"]["forgetting"]
    assert row["round"] == 1 and sorted(row["metrics"]) == ["second", "train"]
    assert report["chains"]["retrain"]["summary"]["mean_forgetting"] is None
    created = json.loads((second_dir / "manifest.json").read_text())["created"]
    messages: list[str] = []  # a rerun reuses every finished round: dynamic 0-1, naive 1, retrain
    again = run_rounds(cfg, tasks=[str(sentiment_files["train"]), str(second)], in_process=True,
                       log=messages.append)
    assert sum("reusing" in m for m in messages) == 4 and not any("] step " in m for m in messages)
    assert json.loads((second_dir / "manifest.json").read_text())["created"] == created
    for row, before in zip(again["chains"]["dynamic"]["forgetting"], dynamic["forgetting"], strict=True):
        assert {k: v for k, v in row.items() if k != "metrics"} == {k: v for k, v in before.items() if k != "metrics"}
        for task, metrics in row["metrics"].items():  # re-evaluated: equal to the BLAS's last bits
            assert metrics == pytest.approx(before["metrics"][task], abs=1e-6)
    messages.clear()  # another prior_scale retrains only the rounds with a round-to-round prior
    tempered = dataclasses.replace(cfg, hybrid=dataclasses.replace(cfg.hybrid, prior_scale=0.25))
    run_rounds(tempered, tasks=[str(sentiment_files["train"]), str(second)], in_process=True, log=messages.append)
    assert sum("reusing" in m for m in messages) == 3 and any("dynamic1 member 0] step" in m for m in messages)
    assert json.loads((second_dir / "manifest.json").read_text())["created"] != created


def test_variational_training_resumes_exactly_from_a_checkpoint(sentiment_files, tmp_path):
    from rayblora.data import load_task_data
    from rayblora.workflows.members import train_one_member

    cfg = _config(sentiment_files, tmp_path / "run", **{"train.checkpoint_every": "3"})
    data = load_task_data(cfg.data)

    def run(resume_dir=None, stop_at=None):
        def save(step, metrics, state):
            if step == 3:
                state.save(tmp_path / "ckpt", {})
                if stop_at == 3:
                    raise KeyboardInterrupt(state.hooks)  # the interrupted run's hooks, as they were at step 3

        try:
            hooks = train_one_member(cfg, 0, data=data, log=lambda _m: None, on_checkpoint=save,
                                     resume_dir=resume_dir).hooks
        except KeyboardInterrupt as stopped:
            hooks = stopped.args[0]
        return hooks[0].q.mean.detach().clone(), hooks[0].q.rho.detach().clone()

    straight = run()
    run(stop_at=3)
    resumed = run(resume_dir=str(tmp_path / "ckpt"))
    assert torch.allclose(straight[0], resumed[0], atol=1e-6) and torch.allclose(straight[1], resumed[1], atol=1e-6)
    assert not torch.allclose(straight[0], run(stop_at=3)[0])  # the check can fail: 3 steps differ from 6


def test_hybrid_draws_share_the_frozen_trunk_below_the_adapted_layers(sentiment_files, tmp_path):
    """Hybrid adapter on the top layer of three: the two layers below run once for all draws, logits unchanged."""
    cfg = _config(sentiment_files, tmp_path / "run", **{"model.tiny_layers": "3", "adapter.layers": "[2]",
                                                         "train.steps": "2", "hybrid.init_std": "0.1"})
    post, data = _train_one(cfg, tmp_path / "ckpt")
    batch = post.scorer.encode(list(data.test["prompt"][:5]))
    assert post.scorer.shared_trunk(batch)[0] == 2
    with post.scorer.restoring_adapter():  # reference: the whole stack per draw
        full = torch.stack([post.adapters[0].logits(batch, theta) for theta in post.draws[0]])
    assert (full[0] - full[1]).abs().max() > 1e-4
    calls = []
    bottom = post.scorer.model.get_base_model().model.layers[0]
    handle = bottom.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert torch.allclose(post.sample_logits(batch), full, atol=1e-5, rtol=0)
    finally:
        handle.remove()
    assert len(calls) == 1  # once for the 3 draws


def test_laplace_round_precision_is_the_ggn_diagonal_plus_the_prior_and_becomes_the_next_prior(sentiment_files,
                                                                                                 tmp_path):
    from rayblora.artifact import save_posterior
    from rayblora.config import ConfigError
    from rayblora.posteriors.hybrid.laplace_prior import diagonal_ggn
    from rayblora.posteriors.hybrid.variational import VariationalTraining, prior_from_artifact

    cfg = _config(sentiment_files, tmp_path / "run", **{"hybrid.round_precision": "laplace", "train.steps": "2"})
    post, data = _train_one(cfg, tmp_path / "ckpt")
    adapter, gaussian, few = post.adapters[0], post.gaussians[0], data.train.select(range(3))
    reference = torch.zeros_like(adapter.mean)  # diag(Jᵀ (diag p − p pᵀ) J) from full Jacobians
    with post.scorer.restoring_adapter():
        for row in range(3):
            batch = post.scorer.encode([few["prompt"][row]])
            jac = torch.autograd.functional.jacobian(lambda th: adapter.logits(batch, th)[0], adapter.mean.detach())
            p = torch.softmax(adapter.logits(batch, adapter.mean.detach())[0].detach(), -1)
            reference += torch.einsum("cp,cd,dp->p", jac, torch.diag(p) - torch.outer(p, p), jac)
    ggn = diagonal_ggn(adapter, few, post.scorer)
    assert float(ggn.max()) > 0 and torch.allclose(ggn, reference, rtol=1e-3, atol=1e-7)
    assert torch.all(gaussian.laplace_precision >= gaussian.prior.precision)
    assert float((gaussian.laplace_precision - gaussian.prior.precision).max()) > float(ggn.max())  # whole split

    path = save_posterior(post, tmp_path / "round0", model_config=cfg.model, adapter_config=cfg.adapter)
    _names, _std, prior = prior_from_artifact(str(path), "laplace")
    assert torch.allclose(prior.precision, gaussian.laplace_precision) and torch.allclose(prior.mean, gaussian.mean)
    hybrid = dataclasses.replace(cfg.hybrid, prior_artifact=str(path), prior_scale=0.5)
    hook = VariationalTraining(hybrid, cfg.adapter)
    hook.trainable_parameters(_scorer(cfg))
    assert torch.allclose(hook.prior.precision, 0.5 * gaussian.laplace_precision)

    gaussian.laplace_precision = None  # a round trained with the variational precision cannot seed a Laplace prior
    plain = save_posterior(post, tmp_path / "plain", model_config=cfg.model, adapter_config=cfg.adapter)
    with pytest.raises(ConfigError, match="round_precision"):
        prior_from_artifact(str(plain), "laplace")
