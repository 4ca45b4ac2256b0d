"""Multiple choice scored by option likelihood on the tiny Llama: option scores equal a teacher-forced computation
of each option after its prompt (with and without the tail, the trunk cache and batched states), ragged rows
equal each row alone, the GLM Jacobian of the option scores equals autograd's, and bad rows are refused by name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_overrides
from rayblora.config import load_config
from rayblora.data import DataError, load_task_data
from rayblora.data.batches import eval_batches
from rayblora.model import set_lora_state
from rayblora.scoring import build_scorer
from rayblora.trunk_cache import TrunkCache
from rayblora.manifest import open_artifact

CHOICE = {"data.shift_tasks": "[]", "data.val_size": "20", "data.test_size": "30", "data.max_length": "256",
          "model.tiny_layers": "3", "adapter.layers": "[1,2]"}


def _config(files, out, **extra):
    return load_config(None, tiny_overrides(files, out, **{**CHOICE, **extra}))


def _perturbed_scorer(cfg, spec, seed: int = 0):
    """A scorer whose LoRA factors are random (B non-zero), in eval mode."""
    scorer = build_scorer(cfg.model, cfg.adapter, spec, cfg.data.max_length, seed=0)
    g = torch.Generator().manual_seed(seed)
    set_lora_state(scorer.model, {k: 0.2 * torch.randn(v.shape, generator=g)
                                  for k, v in scorer.adapter_state().items()})
    scorer.model.eval()
    return scorer


def _teacher_forced(scorer, rows, per_token: bool) -> torch.Tensor:
    """(B, C) scores from one unpadded prompt + option forward per option: Σ_t log p(o_t | prompt, o_<t)."""
    tok, width = scorer.tokenizer, max(len(r["choices"]) for r in rows)
    out = torch.full((len(rows), width), float("-inf"))
    with torch.no_grad():
        for b, row in enumerate(rows):
            prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            for c, option in enumerate(row["choices"]):
                ids = tok(option, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(scorer.model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), -1)
                total = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(ids))
                out[b, c] = total / len(ids) if per_token else total
    return out


@pytest.fixture(scope="module")
def choice_data(choice_files, tmp_path_factory):
    cfg = _config(choice_files, tmp_path_factory.mktemp("choice-run"))
    return cfg, load_task_data(cfg.data)


@pytest.mark.parametrize("scoring", ["likelihood_per_token", "likelihood"])
def test_option_scores_equal_teacher_forced_option_likelihoods(scoring, choice_files, tmp_path):
    cfg = _config(choice_files, tmp_path / "run", **{"data.choice_scoring": scoring})
    data = load_task_data(cfg.data)
    assert data.spec.by_likelihood and data.spec.scoring == scoring
    scorer = _perturbed_scorer(cfg, data.spec)
    batch = next(eval_batches(data.test, scorer.tokenizer, 8, scorer.max_length))
    assert batch["attention_mask"].min() == 0 and set(batch["num_choices"].tolist()) == {2, 3, 5}
    expected = _teacher_forced(scorer, [data.test[i] for i in range(8)], scoring != "likelihood")
    with torch.no_grad():
        tail = scorer.logits(batch)
        scorer.tail_only = False
        full = scorer.logits(batch)
        scorer.tail_only = True
        scorer.use_trunk_cache(TrunkCache(scorer.fingerprint, 1, torch.float32, log=lambda _m: None))
        first, cached = scorer.logits(batch), scorer.logits(batch)
        assert scorer.trunk_cache.hits == 8
    for got in (tail, full, first, cached):
        assert torch.equal(got.isinf(), expected.isinf())
        assert (got - expected).nan_to_num(posinf=0, neginf=0).abs().max() <= 1e-5


def test_batched_states_and_ragged_rows_equal_each_state_and_row_alone(choice_data):
    cfg, data = choice_data
    scorer = _perturbed_scorer(cfg, data.spec)
    batch = next(eval_batches(data.test, scorer.tokenizer, 6, scorer.max_length))
    g = torch.Generator().manual_seed(1)
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in scorer.adapter_state().items()}
              for _ in range(3)]
    batched = scorer.logits_for_states(batch, states)  # (S, B, C), one stacked forward
    sequential = scorer.logits_for_states_sequential(batch, states, share_trunk=False)
    assert torch.equal(batched.isinf(), sequential.isinf())
    assert (batched - sequential).nan_to_num(neginf=0).abs().max() <= 1e-5
    together = torch.softmax(batched, -1)
    for row in range(6):
        alone = eval_batches(data.test.select([row]), scorer.tokenizer, 1, scorer.max_length)
        probs = torch.softmax(scorer.logits_for_states(next(alone), states), -1)[:, 0]
        width = int(batch["num_choices"][row])
        assert (probs - together[:, row, :probs.shape[-1]]).abs().max() <= 1e-5
        assert torch.all(together[:, row, width:] == 0)  # missing options: probability exactly 0


def test_glm_jacobian_of_option_scores_equals_autograd(choice_data):
    from rayblora.posteriors.laplace import LaplacePosterior
    from rayblora.posteriors.laplace.kfac import LoraCurvature, find_lora_sites

    cfg, data = choice_data
    scorer = _perturbed_scorer(cfg, data.spec)
    batch = next(eval_batches(data.train, scorer.tokenizer, 5, scorer.max_length))
    curv = LoraCurvature(find_lora_sites(scorer.model), "diag")
    curv.accumulate(scorer.logits, batch)
    post = LaplacePosterior.from_curvatures(scorer, [scorer.adapter_state()], [{}], {0: curv}, cfg)
    jac = post.glm_batch(0, batch)  # diagonal structure: the rotated Jacobian is J itself, (B, C, out, in)
    with torch.enable_grad():
        logits = scorer.logits(batch)
        for key, module in post.modules.items():
            rotated = jac.blocks[key].rotated
            for b in range(logits.shape[0]):
                for c in range(int(batch["num_choices"][b])):
                    (grad,) = torch.autograd.grad(logits[b, c], module.weight, retain_graph=True)
                    assert (rotated[b, c] - grad).abs().max() <= 1e-5 * max(1.0, float(grad.abs().max()))
                assert torch.all(rotated[b, int(batch["num_choices"][b]):] == 0)


def test_letter_scoring_stays_selectable(choice_files, tmp_path):
    cfg = _config(choice_files, tmp_path / "run", **{"data.choice_scoring": "letter"})
    data = load_task_data(cfg.data)
    assert not data.spec.by_likelihood and "choices" not in data.test.column_names
    assert data.test[0]["prompt"].endswith("Answer:") and "\nA. " in data.test[0]["prompt"]
    scorer = _perturbed_scorer(cfg, data.spec)
    logits = scorer.logits(next(eval_batches(data.test, scorer.tokenizer, 4, scorer.max_length)))
    assert logits.shape == (4, 5)


@pytest.mark.parametrize("row, field", [({"question": "q?", "choices": ["yes", " "], "label": 0}, "option 1"),
                                        ({"question": "q?", "choices": ["only"], "label": 0}, "'choices'"),
                                        ({"question": "", "choices": ["a", "b"], "label": 0}, "'question'"),
                                        ({"question": "q?", "choices": ["a", "b"], "label": 2}, "'label'")])
def test_bad_rows_are_refused_naming_row_and_field(row, field, choice_files, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"question": "q?", "choices": ["a", "b", "c"], "label": 1}
    path.write_text("".join(json.dumps(r) + "\n" for r in [good] * 3 + [row]))
    cfg = _config({"train": path, "shift": path}, tmp_path / "run")
    with pytest.raises(DataError, match=rf"row 3, column .*{field}|row 3.*{field}"):
        load_task_data(cfg.data)


def test_options_that_leave_no_room_for_the_question_are_refused(choice_data):
    cfg, data = choice_data
    scorer = _perturbed_scorer(cfg, data.spec)
    scorer.max_length = 8
    with pytest.raises(ValueError, match="data.max_length is 8"):
        scorer.encode(["Question: q\nAnswer:"], [[" a very long option text", " b"]])


# --- training and every family on option scores -------------------------------------------------------------------
def _check_results(results, data):
    num_choices = torch.as_tensor(data.test["num_choices"])
    for method, splits in results.items():
        probs = torch.as_tensor(splits["train"].probs)
        assert probs.shape == (len(data.test), 5), method
        assert torch.allclose(probs.sum(-1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-5), method
        missing = torch.arange(5)[None, :] >= num_choices[:, None]
        assert torch.all(probs[missing] == 0), method


def test_members_train_on_option_scores_and_every_family_predicts(choice_files, tmp_path):
    from rayblora.workflows.evaluate import evaluate_methods
    from rayblora.workflows.train import train

    cfg = _config(choice_files, tmp_path / "run", **{
        "posterior.method": "multiswag", "train.steps": "40", "swag.start_step": "20", "swag.max_rank": "3",
        "swag.samples": "3", "sampling.samples": "3", "laplace.fit_batches": "3", "laplace.link_samples": "20",
        "tfb.search_steps": "2", "adapter.dropout": "0.1"})
    artifact = train(cfg, log=lambda _m: None, in_process=True)
    assert (tmp_path / "run" / "trunk_cache").is_dir()  # packed rows went through the trunk cache
    data = load_task_data(cfg.data)
    methods = ["map", "ensemble", "temperature", "temperature_ensemble", "mc_dropout", "laplace",
               "laplace_ensemble", "swag", "multiswag", "tfb"]
    results = evaluate_methods(open_artifact(artifact), cfg, methods, data=data, log=lambda _m: None)
    _check_results(results, data)
    accuracy = (results["map"]["train"].probs.argmax(-1) == results["map"]["train"].labels).mean()
    assert accuracy >= 0.6  # chance is 1/2, 1/3, 1/5 by row: the positive word is learnt


@pytest.mark.parametrize("method", ["blob", "hybrid_vi"])
def test_variational_families_train_and_predict_on_option_scores(method, choice_files, tmp_path):
    from rayblora.workflows.evaluate import evaluate_methods
    from rayblora.workflows.train import train

    extra = {"hybrid.prefix_tokens": "2", "posterior.members": "1"} if method == "hybrid_vi" else {}
    cfg = _config(choice_files, tmp_path / "run", **{"posterior.method": method, "train.steps": "12",
                                                     "swag.samples": "3", "sampling.samples": "3", **extra})
    artifact = train(cfg, log=lambda _m: None, in_process=True)
    data = load_task_data(cfg.data)
    _check_results(evaluate_methods(open_artifact(artifact), cfg, [method], data=data, log=lambda _m: None), data)


def test_prior_cache_on_option_scores_equals_the_posterior(choice_data):
    from rayblora.posteriors import get_posterior_class
    from rayblora.posteriors.laplace.prior_cache import PriorCache

    cfg, data = choice_data
    cfg = dataclasses.replace(cfg, laplace=dataclasses.replace(cfg.laplace, fit_batches=2, prior_method="fixed",
                                                               prior_precision=1.0))
    scorer = _perturbed_scorer(cfg, data.spec)
    post = get_posterior_class("laplace").build(scorer, [scorer.adapter_state()], [{}], data=data, config=cfg)
    cache = PriorCache.from_posterior(post, data.validation, 8)
    for delta in (0.05, 4.0):
        want = post.with_prior_precision(delta).predict_dataset(data.validation, batch_size=8).probs
        assert torch.allclose(cache.probs(delta), want, atol=1e-6)


@pytest.mark.slow
def test_bootstrap_members_train_on_ray_with_zero2_on_option_scores(ray_session, choice_files, tmp_path):
    """Ray Train runs (two DeepSpeed ZeRO-2 workers per member, bootstrap resamples) on ragged multiple-choice
    rows, to a verified artifact whose ensemble predicts over each row's own options."""
    from rayblora.artifact import load_posterior
    from rayblora.workflows.train import train

    cfg = _config(choice_files, tmp_path / "run", **{
        "train.steps": "6", "train.member_data": "bootstrap", "train.strategy": "deepspeed",
        "train.zero_stage": "2", "cluster.workers_per_member": "2", "cluster.cpus_per_worker": "0.5",
        "cluster.max_failures": "0"})
    post = load_posterior(train(cfg, log=lambda _m: None))
    data = load_task_data(cfg.data)
    assert post.scorer.spec == data.spec and len(post.members) == 2
    probs = post.predict_dataset(data.test.select(range(12)), batch_size=6).probs
    widths = torch.as_tensor(data.test["num_choices"][:12])
    assert torch.allclose(probs.sum(-1), torch.ones(12), atol=1e-5)
    assert torch.all(probs[torch.arange(5)[None, :] >= widths[:, None]] == 0)


def test_options_too_long_for_max_length_are_refused_before_training(choice_files, tmp_path):
    from rayblora.workflows.members import train_one_member

    path = tmp_path / "long.jsonl"
    rows = [{"question": "q?", "choices": ["yes", "no"], "label": 0}] * 30
    rows[27] = {"question": "q?", "choices": ["a very long option " * 8, "no"], "label": 1}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config({"train": path, "shift": path}, tmp_path / "run", **{
        "data.max_length": "64", "data.val_size": "5", "data.test_size": "5"})
    data = load_task_data(cfg.data)
    split = next(name for name, ids in data.ids.items() if "train:27" in ids or "long:27" in ids)
    with pytest.raises(ValueError, match=rf"split '{split}': the options of 1 rows .* data.max_length=64"):
        train_one_member(cfg, 0, data=data, log=lambda _m: None)
