"""SWAG-LoRA / MultiSWAG: moment collection, sampling covariance, resumable collection, artifact, views."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rayblora.artifact import ArtifactError, load_posterior, save_posterior
from rayblora.config import ConfigError, SwagConfig, TrainConfig, load_config
from rayblora.workflows.evaluate import evaluate_methods
from rayblora.posteriors import get_posterior_class
from rayblora.posteriors.swag import (SWAG_FILE, SwagCollector, SwagMoments, flatten_state,
                                      read_checkpoint_moments, sample_swag, swa_learning_rate)
from rayblora.train.loop import TrainerState
from rayblora.workflows.members import train_one_member
from rayblora.manifest import open_artifact
from conftest import tiny_overrides


class ToyProblem:
    """Noisy SGD on a quadratic over two parameter tensors; exposes them like a scorer's adapter state."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(2, 3, generator=g)),
                       torch.nn.Parameter(torch.randn(4, generator=g))]
        self.optimizer = torch.optim.SGD(self.params, lr=0.1)
        self.noise = g

    def step(self) -> None:
        self.optimizer.zero_grad()
        loss = sum(((p - 1.0) ** 2).sum() for p in self.params)
        loss.backward()
        for p in self.params:
            p.grad += torch.randn(p.shape, generator=self.noise)
        self.optimizer.step()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {"x.lora_A.weight": self.params[0].detach().clone(),
                "x.lora_B.weight": self.params[1].detach().clone()}


def _run_toy(cfg: SwagConfig, steps: int = 30):
    toy, hook, iterates = ToyProblem(), SwagCollector(cfg, TrainConfig(steps=steps, lr=0.1)), []
    hook.bind(SimpleNamespace(optimizer=toy.optimizer, stepper=toy))  # what the loop's TrainerState offers
    for step in range(1, steps + 1):
        toy.step()
        hook(step, toy)
        if hook.collects_at(step):
            iterates.append(flatten_state(toy.adapter_state(), hook.keys))
    return hook, torch.stack(iterates), toy


def test_collected_moments_equal_empirical_moments_of_iterates():
    hook, thetas, _ = _run_toy(SwagConfig(start_step=5, collect_every=2, max_rank=4))
    assert hook.moments.count == len(thetas) == 13  # steps 5, 7, ..., 29
    assert torch.allclose(hook.moments.mean, thetas.mean(0), atol=1e-12)
    assert torch.allclose(hook.moments.variance, thetas.var(0, unbiased=False), atol=1e-12)
    running_means = thetas.cumsum(0) / torch.arange(1, len(thetas) + 1, dtype=torch.float64)[:, None]
    expected = (thetas - running_means)[-4:].float()
    assert torch.allclose(hook.moments.deviations, expected, atol=1e-6)


def test_sample_covariance_matches_swag_formula():
    hook, _, _ = _run_toy(SwagConfig(start_step=2, collect_every=1, max_rank=3))
    scale, n = 0.7, 60_000
    draws = sample_swag(hook.moments, n, torch.Generator().manual_seed(0), scale)
    cov = hook.moments.covariance(scale)
    emp = torch.cov(draws.T)
    assert torch.allclose(draws.mean(0), hook.moments.mean, atol=5 * cov.diag().max().sqrt() / n ** 0.5)
    stderr = ((cov.diag()[:, None] * cov.diag()[None, :] + cov ** 2) / n).sqrt()
    assert ((emp - cov).abs() <= 5 * stderr + 1e-12).all()
    low_rank = hook.moments.deviations.double()
    assert torch.linalg.matrix_rank(cov - 0.5 * scale ** 2 * torch.diag(hook.moments.variance)) \
        == torch.linalg.matrix_rank(low_rank)


def test_swa_learning_rate_schedules_set_the_optimizer():
    constant = SwagConfig(start_step=10, swa_lr=0.01)
    assert swa_learning_rate(constant, 10, 0.1, 10) is None
    assert swa_learning_rate(constant, 10, 0.1, 11) == 0.01
    cyclic = SwagConfig(start_step=10, swa_lr=0.01, lr_schedule="cyclic", collect_every=4)
    lrs = [swa_learning_rate(cyclic, 10, 0.1, s) for s in range(11, 19)]
    assert lrs[3] == pytest.approx(0.01) and lrs[7] == pytest.approx(0.01)  # reached where snapshots are taken
    assert lrs[0] == pytest.approx(0.0775) and lrs[4] == pytest.approx(0.0775)
    hook, _, toy = _run_toy(SwagConfig(start_step=5, swa_lr=0.02), steps=8)
    assert toy.optimizer.param_groups[0]["lr"] == 0.02
    assert swa_learning_rate(SwagConfig(), 5, 0.1, 9) is None  # swa_lr = 0 keeps the schedule


def test_start_step_after_last_step_fails_naming_the_field():
    with pytest.raises(ConfigError, match="swag.start_step"):
        SwagCollector(SwagConfig(start_step=30), TrainConfig(steps=20))
    assert SwagCollector(SwagConfig(), TrainConfig(steps=20)).start == 10  # 0 = half of train.steps


# --- tiny LLM trajectories ----------------------------------------------------------------------------------


def _swag_config(files, out: Path, **extra):
    values = {"posterior.method": "multiswag", "adapter.dropout": "0.1", "swag.start_step": "8",
              "swag.collect_every": "3", "swag.max_rank": "3", "swag.samples": "3", **extra}
    return load_config(None, tiny_overrides(files, out, **values))


class _Crash(RuntimeError):
    pass


def _train(cfg, data, member: int, checkpoint_dir: Path | None = None, crash_at: int = 0,
           resume_dir: Path | None = None):
    """One trajectory in-process (as the Ray worker runs it): returns (scorer, hooks)."""
    def on_checkpoint(step: int, metrics, state: TrainerState) -> None:
        if checkpoint_dir is not None:
            state.save(checkpoint_dir, {k: float(v) for k, v in metrics.items()})
        if step == crash_at:
            raise _Crash(step)

    trained = train_one_member(cfg, member, data=data, log=lambda _m: None, on_checkpoint=on_checkpoint,
                               resume_dir=str(resume_dir) if resume_dir else None)
    return trained.scorer, trained.hooks


def test_kill_and_resume_mid_collection_gives_same_moments(sentiment_files, tiny_data, tmp_path):
    cfg = _swag_config(sentiment_files, tmp_path, **{"train.checkpoint_every": "6", "swag.swa_lr": "2e-3",
                                                     "swag.lr_schedule": "cyclic"})
    full_scorer, full_hooks = _train(cfg, tiny_data, 0)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Crash):
        _train(cfg, tiny_data, 0, checkpoint_dir=ckpt, crash_at=12)  # snapshots at 8 and 11 taken, 14.. not
    assert read_checkpoint_moments(ckpt)[1].count == 2
    resumed_scorer, resumed_hooks = _train(cfg, tiny_data, 0, resume_dir=ckpt)
    full, resumed = full_hooks[0].state_dict(), resumed_hooks[0].state_dict()
    assert full["keys"] == resumed["keys"] and int(full["moments.count"]) == 5  # steps 8, 11, 14, 17, 20
    for name in ("moments.mean", "moments.sq_mean", "moments.deviations"):
        assert torch.allclose(full[name], resumed[name], atol=1e-7, rtol=0), name
    a, b = full_scorer.adapter_state(), resumed_scorer.adapter_state()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def swag_run(sentiment_files, tiny_data, tmp_path_factory):
    """Two tiny SWAG trajectories with their checkpoints, as the coordinator keeps them: (cfg, scorer, ...)."""
    out = tmp_path_factory.mktemp("swag-run")
    cfg = _swag_config(sentiment_files, out)
    finals, dirs, infos = [], [], []
    for i in range(2):
        d = out / "members" / str(i)
        scorer, _ = _train(cfg, tiny_data, i, checkpoint_dir=d)
        finals.append(scorer.adapter_state())
        dirs.append(str(d))
        infos.append({"index": i, "seed": cfg.train.seed + 1000 * i})
    return cfg, scorer, finals, dirs, infos


@pytest.fixture(scope="module")
def multiswag(swag_run, tiny_data):
    cfg, scorer, finals, dirs, infos = swag_run
    return get_posterior_class("multiswag").build(scorer, finals, infos, data=tiny_data, config=cfg, member_dirs=dirs)


@pytest.fixture(scope="module")
def swag_artifact(multiswag, swag_run, tmp_path_factory):
    cfg = swag_run[0]
    return save_posterior(multiswag, tmp_path_factory.mktemp("art") / "posterior", model_config=cfg.model,
                          adapter_config=cfg.adapter)


def test_multiswag_mixes_k_times_s_samples_and_members_are_swa_means(multiswag, swag_run, tiny_data):
    _, scorer, finals, dirs, _ = swag_run
    assert multiswag.num_samples == 2 * 3
    keys, moments = read_checkpoint_moments(dirs[1])
    assert moments.count == 5
    assert torch.allclose(flatten_state(multiswag.members[1], keys), moments.mean.float().double(), atol=1e-7)
    batch = scorer.encode(tiny_data.test["prompt"][:5])
    pred = multiswag.predict_batch(batch)
    assert pred.sample_probs.shape == (6, 5, 2) and (pred.mutual_information > 0).all()
    swag = multiswag.view("swag")
    assert swag.num_samples == 3 and torch.allclose(swag.sample_logits(batch), multiswag.sample_logits(batch)[:3])
    swa = multiswag.view("swa")
    assert swa.num_samples == 1
    mapped = multiswag.view("map")  # the last iterate of trajectory 0, not its SWA mean
    assert torch.equal(mapped.members[0][keys[0]], finals[0][keys[0]])


def test_artifact_round_trip_and_peft_loadable_swa_mean(multiswag, swag_artifact, swag_run, tiny_data):
    from peft import PeftModel

    scorer = swag_run[1]
    manifest = json.loads((swag_artifact / "manifest.json").read_text())
    assert manifest["method"] == "multiswag" and SWAG_FILE in manifest["files"]
    assert manifest["family"]["counts"] == [5, 5] and manifest["family"]["rank"] == [3, 3]
    loaded = load_posterior(swag_artifact)
    batch = scorer.encode(tiny_data.test["prompt"][:4])
    assert torch.allclose(loaded.sample_logits(batch), multiswag.sample_logits(batch), atol=1e-5)
    for t in range(2):
        for name in ("mean", "sq_mean", "deviations"):
            assert torch.equal(getattr(loaded.trajectories[t].moments, name),
                               getattr(multiswag.trajectories[t].moments, name))
    assert torch.allclose(load_posterior(swag_artifact, scorer=scorer, method="map").sample_logits(batch),
                          multiswag.view("map").sample_logits(batch), atol=1e-5)
    from rayblora.model import load_base_model
    base, _ = load_base_model(swag_run[0].model)
    peft = PeftModel.from_pretrained(base, str(swag_artifact / "members" / "0"))
    weight = dict(peft.named_parameters())
    key = next(k for k in weight if "lora_A" in k)
    saved = multiswag.members[0][key.replace(".default", "")]
    assert torch.equal(weight[key].detach(), saved)


def test_tampered_swag_file_is_rejected(swag_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(swag_artifact, copy)
    data = bytearray((copy / SWAG_FILE).read_bytes())
    data[-3] ^= 0xFF
    (copy / SWAG_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"checksum mismatch for {SWAG_FILE}"):
        load_posterior(copy)
    (copy / SWAG_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"{SWAG_FILE} listed in the manifest is missing"):
        load_posterior(copy)


def test_evaluate_methods_runs_every_new_row(swag_artifact, swag_run, tiny_data):
    cfg = swag_run[0]
    methods = ["map", "ensemble", "swa", "swag", "multiswag", "mc_dropout", "temperature"]
    results = evaluate_methods(open_artifact(swag_artifact), cfg, methods, data=tiny_data, log=lambda _m: None)
    assert set(results) == set(methods)
    for method in methods:
        for split in results[method].values():
            assert split.probs.shape[1] == 2 and torch.isfinite(torch.as_tensor(split.probs)).all()
    assert (results["multiswag"]["train"].mutual_information > 0).mean() > 0.9
    alone = evaluate_methods(open_artifact(swag_artifact), cfg, ["swag"], data=tiny_data, log=lambda _m: None)
    for split, result in alone["swag"].items():  # with multiswag, swag came out of multiswag's pass
        assert np.allclose(result.probs, results["swag"][split].probs, atol=1e-6)


def test_swag_without_moments_fails_clearly(trained_members, tiny_data, tmp_path):
    scorer, states, infos = trained_members
    for method in ("swa", "swag", "multiswag"):
        with pytest.raises(ValueError, match=f"{method}: needs the SWAG moments"):
            get_posterior_class(method).build(scorer, states, infos, data=tiny_data)
    ensemble = get_posterior_class("ensemble").build(scorer, states, infos)
    with pytest.raises(ValueError, match="needs the SWAG moments"):
        ensemble.view("swag")
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save({"hooks": []}, d / "trainer_state.pt")
    with pytest.raises(ValueError, match="holds no SWAG moments"):
        get_posterior_class("swag").build(scorer, states[:1], infos[:1], member_dirs=[str(d)])


def test_moments_survive_tensor_round_trip():
    hook, _, _ = _run_toy(SwagConfig(start_step=3, max_rank=2))
    again = SwagMoments.from_tensors(hook.moments.to_tensors("7"), "7")
    assert again.count == hook.moments.count and torch.equal(again.deviations, hook.moments.deviations)
    with pytest.raises(ValueError, match="lack"):
        SwagMoments.from_tensors({}, "0")
