"""Decoding under a posterior (rayblora.generation): BMA decoding, per-state decoding, the token stream."""

from __future__ import annotations

import pytest
import torch

from rayblora.config import AdapterConfig, ModelConfig
from rayblora.data.formats import classification_spec
from rayblora.generation.answers import exact_match, group_scores, normalise_answer
from rayblora.generation.decode import DecodingSettings, GenerationSettingsError
from rayblora.generation.decoder import StackedDecoder
from rayblora.generation.run import StateSet, generate, stream
from rayblora.model import set_lora_state
from rayblora.scoring import build_scorer

PROMPTS = ["the film was good and", "awful", "a plot story the actors were lovely and great fun"]


def _noisy(state, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module", params=[(), (1,)], ids=["all-layers", "top-layer"])
def scorer(request):
    """A tiny 3-layer Llama with LoRA on every layer or on the top one (a shared frozen trunk below it)."""
    spec = classification_spec(("negative", "positive"), "{text}")
    adapter = AdapterConfig(rank=4, layers=request.param, dropout=0.1)
    return build_scorer(ModelConfig(name="tiny-llama", tiny_layers=3), adapter, spec, max_length=64, seed=0)


@pytest.fixture(scope="module")
def states(scorer):
    base = scorer.adapter_state()
    return [_noisy(base, s) for s in range(3)]


def _reference_greedy(scorer, state, prompt, max_new_tokens):
    """Hugging Face's own greedy decoding of one prompt under one adapter state (no padding)."""
    set_lora_state(scorer.model, state)
    scorer.model.eval()
    ids = scorer.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = scorer.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, pad_token_id=scorer.tokenizer.eos_token_id,
                                eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def test_identical_states_decode_as_the_single_adapter(scorer, states):
    settings = DecodingSettings(max_new_tokens=8, stop=())
    same = StateSet(scorer.model, scorer.tokenizer, [states[0]] * 3, max_length=64)
    with scorer.restoring_adapter():
        answers = generate(same, PROMPTS, settings, batch_size=3)  # left-padded batch of different lengths
        for prompt, answer in zip(PROMPTS, answers):
            assert answer.tokens == _reference_greedy(scorer, states[0], prompt, 8)
            assert max(answer.mutual_information) < 1e-5
            assert answer.scores["max_token_mi"] < 1e-5


def test_batched_decoding_equals_sequential_decoding(scorer, states):
    batch = scorer.encode(PROMPTS)
    with scorer.restoring_adapter():
        stacked, sequential = StackedDecoder(scorer.model, states, batched=True), StackedDecoder(
            scorer.model, states, batched=False)
        a = stacked.prefill(batch["input_ids"], batch["attention_mask"])
        b = sequential.prefill(batch["input_ids"], batch["attention_mask"])
        assert a.shape == (3, 3, len(scorer.tokenizer))
        for step in range(5):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), step
            if step == 2:
                tokens = a.argmax(-1)  # per state from here on (the trunk's rows split)
            else:
                tokens = a.mean(0).argmax(-1) if step < 2 else a.argmax(-1)
            a, b = stacked.step(tokens), sequential.step(tokens)
        assert (a[0] - a[1]).abs().max() > 1e-3  # the states really differ


def test_each_state_alone_gives_its_per_state_answer(scorer, states):
    settings = DecodingSettings(max_new_tokens=6, mode="per_state", stop=())
    with scorer.restoring_adapter():
        together = generate(StateSet(scorer.model, scorer.tokenizer, states, max_length=64), PROMPTS, settings)
        for s, state in enumerate(states):
            alone = generate(StateSet(scorer.model, scorer.tokenizer, [state], max_length=64), PROMPTS, settings)
            assert [g.samples[s] for g in together] == [g.text for g in alone]
            single = generate(StateSet(scorer.model, scorer.tokenizer, [state], max_length=64), PROMPTS,
                              DecodingSettings(max_new_tokens=6, stop=()))  # one state: BMA = its own decoding
            assert [g.state_scores[s]["mean_token_entropy"] for g in together] == pytest.approx(
                [g.scores["mean_token_entropy"] for g in single], abs=1e-5)
            assert [g.state_scores[s]["sequence_nll"] for g in together] == pytest.approx(
                [g.scores["sequence_nll"] for g in single], abs=1e-4)


def test_streamed_pieces_concatenate_to_the_answer(scorer, states):
    settings = DecodingSettings(max_new_tokens=10, stop=())
    set_ = StateSet(scorer.model, scorer.tokenizer, states, max_length=64)
    with scorer.restoring_adapter():
        answer = generate(set_, PROMPTS[:1], settings)[0]
        events = list(stream(set_, PROMPTS[0], settings))
    tokens = [e for e in events if e["event"] == "token"]
    assert "".join(e["text"] for e in tokens) == answer.text == events[-1]["text"]
    assert [e["token"] for e in tokens] == answer.tokens == events[-1]["tokens"]
    assert [e["mutual_information"] for e in tokens] == pytest.approx(answer.mutual_information, abs=1e-6)
    assert events[-1]["scores"] == pytest.approx(answer.scores)


def test_decoding_leaves_the_adapter_unchanged(scorer, states):
    before = scorer.adapter_state()
    with scorer.restoring_adapter():
        generate(StateSet(scorer.model, scorer.tokenizer, states, max_length=64), PROMPTS, DecodingSettings(
            max_new_tokens=3), batched=False)
    after = scorer.adapter_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in vars(m) for m in scorer.model.modules())


def test_sampling_is_seeded_and_stops_at_stop_tokens(scorer, states):
    set_ = StateSet(scorer.model, scorer.tokenizer, states, max_length=64)
    settings = DecodingSettings(max_new_tokens=12, do_sample=True, temperature=1.5, seed=3)
    with scorer.restoring_adapter():
        first, again = generate(set_, PROMPTS, settings), generate(set_, PROMPTS, settings)
    assert [g.tokens for g in first] == [g.tokens for g in again]
    assert all("\n" not in g.text and len(g.tokens) <= 12 for g in first)


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("mode", "beam"), ("temperature", 0.0),
                                         ("stop", ("",))])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(GenerationSettingsError, match=field):
        DecodingSettings(**{field: value})


def test_blank_prompts_are_refused_by_index(scorer, states):
    set_ = StateSet(scorer.model, scorer.tokenizer, states, max_length=64)
    with pytest.raises(GenerationSettingsError, match=r"prompts\[1\]"):
        generate(set_, ["fine", "  "], DecodingSettings(max_new_tokens=2))
    with pytest.raises(GenerationSettingsError, match=r"prompts\[0\]"):
        list(stream(set_, "", DecodingSettings(max_new_tokens=2)))
    assert generate(set_, [], DecodingSettings(max_new_tokens=2)) == []


def test_answer_normalisation_and_groups():
    assert normalise_answer("  The  Answer. ") == "the answer"
    assert normalise_answer("-12") == "-12"
    assert exact_match(" 42.", "42") and not exact_match("43", ["42", "forty-two"])
    modal, scores = group_scores(["42", " 42", "41", "42."])
    assert modal == "42" and scores["modal_share"] == 0.75 and scores["num_groups"] == 2
    assert scores["group_entropy"] == pytest.approx(-(0.75 * torch.log(torch.tensor(0.75)) + 0.25 * torch.log(
        torch.tensor(0.25))).item())
    assert group_scores(["a", "a"])[1]["group_entropy"] == 0.0


# --- every family that yields adapter states decodes through Posterior.generate ------------------------------
FAMILY_PROMPTS = ["the film was good and", "awful dull"]


def _family(method, trained_members, tiny_data, cfg):
    import dataclasses

    from rayblora.registry import get_posterior_class

    scorer, states, infos = trained_members
    cfg = dataclasses.replace(cfg, laplace=dataclasses.replace(cfg.laplace, fit_batches=2, prior_method="fixed",
                                                               generation_samples=3))
    return get_posterior_class(method).build(scorer, states, infos, data=tiny_data, config=cfg)


@pytest.mark.parametrize("method,expected_states", [("map", 1), ("ensemble", 2), ("laplace", 3),
                                                    ("laplace_ensemble", 6)])
def test_families_generate_from_their_weight_space_samples(method, expected_states, trained_members, tiny_data,
                                                           tiny_session_config):
    post = _family(method, trained_members, tiny_data, tiny_session_config)
    assert len(post.generation_states()) == expected_states
    settings = DecodingSettings(max_new_tokens=4, stop=())
    answers = post.generate(FAMILY_PROMPTS, settings)
    assert len(answers) == 2 and all(len(a.tokens) == 4 and len(a.mutual_information) == 4 for a in answers)
    if expected_states == 1:
        assert max(a.scores["max_token_mi"] for a in answers) < 1e-5
    else:
        assert max(a.scores["max_token_mi"] for a in answers) > 0
    assert [a.tokens for a in post.generate(FAMILY_PROMPTS, settings)] == [a.tokens for a in answers]
    per_state = post.generate(FAMILY_PROMPTS, DecodingSettings(max_new_tokens=4, mode="per_state", stop=()))
    assert all(len(a.samples) == expected_states for a in per_state)


def test_families_without_a_generative_form_say_so(trained_members, tiny_data, tiny_session_config):
    post = _family("temperature", trained_members, tiny_data, tiny_session_config)
    with pytest.raises(ValueError, match="temperature: .*map"):
        post.generate(FAMILY_PROMPTS)


# --- the generation task kind: prompt + target rows, trained by the targets' likelihood ----------------------
def _addition_file(path, n, seed=0):
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a} plus {b} is", "target": f" {a + b}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory):
    from rayblora.config import load_config
    from rayblora.data import load_task_data
    from rayblora.workflows.members import train_members_in_process

    root = tmp_path_factory.mktemp("generation")
    overrides = {"model.name": "tiny-llama", "data.task": str(_addition_file(root / "add.jsonl", 240)),
                 "data.shift_tasks": "[]", "data.far_ood_tasks": "[]", "data.train_size": "0",
                 "data.val_size": "40", "data.test_size": "40", "data.max_length": "32", "train.steps": "6",
                 "train.lr": "5e-3", "train.batch_size": "16", "train.warmup_steps": "1", "posterior.members": "2",
                 "adapter.layers": "[1]", "output.dir": str(root / "run")}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    data = load_task_data(cfg.data)
    scorer, members = train_members_in_process(cfg, log=lambda _m: None, data=data)
    return cfg, data, scorer, members


def test_generation_rows_train_members_scored_by_their_targets(generation_run):
    cfg, data, scorer, members = generation_run
    assert data.spec.kind == "generation" and set(data.train.column_names) >= {"prompt", "target"}
    metrics = members[0].info()["metrics"]
    assert {"val_nll", "val_accuracy"} <= set(metrics) and metrics["val_nll"] > 0
    with pytest.raises(ValueError, match="generation task"):
        scorer.logits(scorer.encode(["1 plus 2 is"]))


def test_teacher_forced_exact_match_is_greedy_decoding_exact_match(generation_run):
    from rayblora.registry import get_posterior_class

    _, data, scorer, members = generation_run
    post = get_posterior_class("map").build(scorer, [m.adapter for m in members], [m.info() for m in members])
    prompts = data.test["prompt"][:6]
    greedy = [a.tokens for a in post.generate(prompts, DecodingSettings(max_new_tokens=3, stop=()))]
    ids, targets = [], []
    for i, (prompt, tokens) in enumerate(zip(prompts, greedy)):
        wrong = tokens[:-1] + [(tokens[-1] + 1) % len(scorer.tokenizer)] if i % 2 else tokens
        ids.append(scorer.tokenizer(prompt, add_special_tokens=False)["input_ids"] + wrong)
        targets.append(len(wrong))
    width = max(len(x) for x in ids)
    batch = {"input_ids": torch.tensor([[0] * (width - len(x)) + x for x in ids]),
             "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
             "target_mask": torch.tensor([[0] * (width - n) + [1] * n for n in targets])}
    set_lora_state(scorer.model, members[0].adapter)
    with torch.no_grad():
        nll, hit = scorer.target_scores(batch)
    assert hit.tolist() == [i % 2 == 0 for i in range(6)]  # greedy continuations hit, a changed last token misses
    assert bool((nll > 0).all())


def test_generation_rows_are_validated(tmp_path):
    import json

    from rayblora.config import load_config
    from rayblora.data import DataError, load_task_data

    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": "1 plus 1 is", "target": t}) for t in [" 2", " 3", ""]))
    cfg = load_config(None, [f"data.task={path}", "data.shift_tasks=[]", "data.far_ood_tasks=[]",
                             "data.train_size=0", "data.val_size=1", "data.test_size=1"])
    with pytest.raises(DataError, match="row 2, column 'target'"):
        load_task_data(cfg.data)
    path.write_text("\n".join(json.dumps({"prompt": "1 plus 1 is", "target": " 2", "targets": t})
                              for t in [[" 2", "two"], [], ["2"]]))
    with pytest.raises(DataError, match="row 1, column 'targets'"):
        load_task_data(cfg.data)


def test_prediction_rejection_ratio_and_answer_evaluation():
    import numpy as np

    from rayblora.generation.decode import Generation
    from rayblora.generation.evaluation import evaluate_answers, paired_difference
    from rayblora.metrics import prediction_rejection_ratio

    quality = np.array([1, 1, 0, 1, 0, 0], dtype=float)
    assert prediction_rejection_ratio(1 - quality, quality) == pytest.approx(1.0)  # the oracle's order
    assert prediction_rejection_ratio(quality, quality) < 0  # the worst order
    assert np.isnan(prediction_rejection_ratio(np.arange(3.0), np.ones(3)))
    answers = [Generation(t, [], scores={"mean_token_mi": u, "modal_share": 1 - u})
               for t, u in [("1", 0.1), ("2", 0.2), ("x", 0.9), ("4", 0.3)]]
    result = evaluate_answers(answers, ["1", "2", "3", "4"])
    assert result["exact_match"] == 0.75 and result["scores"]["mean_token_mi"]["auroc"] == 1.0
    assert result["scores"]["modal_share"]["auroc"] == 1.0  # 1 - share: the same ranking
    u, c = np.array([0.1, 0.9, 0.2, 0.8]), np.array([True, False, True, False])
    diff = paired_difference([(u, c)], [(1 - u, c)], resamples=200)
    assert diff["delta"] == pytest.approx(1.0) and diff["low"] <= diff["delta"] <= diff["high"]
    members = [(u, np.array([True, True, True, False])), (u, np.array([True, False, False, False]))]
    gain = paired_difference([(u, c)], [members], statistic="exact_match", resamples=200)
    assert gain["delta"] == pytest.approx(0.5 - 0.5)  # (0.75 + 0.25) / 2 for the members alone


def test_cli_trains_evaluates_and_generates_a_generation_task(tmp_path, capsys):
    import json

    from rayblora.cli import main

    task = _addition_file(tmp_path / "add.jsonl", 200, seed=1)
    overrides = ["model.name=tiny-llama", f"data.task={task}", "data.shift_tasks=[]", "data.far_ood_tasks=[]",
                 "data.train_size=0", "data.val_size=20", "data.test_size=30", "data.max_length=32",
                 "train.steps=4", "train.batch_size=16", "train.warmup_steps=1", "posterior.members=2",
                 "posterior.eval_methods=[map,ensemble,temperature]", "adapter.layers=[1]",
                 f"output.dir={tmp_path / 'run'}"]
    assert main(["train", "--in-process", "--evaluate", *overrides]) == 0
    report = json.loads((tmp_path / "run" / "generation_report.json").read_text())
    assert set(report["methods"]) == {"map", "ensemble"}  # temperature has no generative form: skipped
    ensemble = report["methods"]["ensemble"]
    assert ensemble["n"] == 30 and 0 <= ensemble["exact_match"] <= 1
    assert {"mean_token_mi", "group_entropy", "sequence_nll", "feature_distance"} <= set(ensemble["scores"])
    capsys.readouterr()
    assert main(["generate", "--posterior", str(tmp_path / "run" / "posterior"), "--prompt", "3 plus 4 is",
                 "--max-new-tokens", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "3 plus 4 is" and len(line["mutual_information"]) <= 3
    assert main(["generate", "--posterior", str(tmp_path / "run" / "posterior"), "--prompt", "x",
                 "--max-new-tokens", "0"]) != 0
    assert "max_new_tokens" in capsys.readouterr().err


def test_per_state_sampling_draws_several_answers_per_state(scorer, states):
    settings = DecodingSettings(max_new_tokens=4, mode="per_state", do_sample=True, samples_per_state=3, stop=())
    with scorer.restoring_adapter():
        out = generate(StateSet(scorer.model, scorer.tokenizer, states, max_length=64), PROMPTS, settings)
    assert all(len(g.samples) == 9 and len(g.state_scores) == 9 for g in out)
    assert all(1 <= g.scores["num_groups"] <= 9 for g in out)
    with pytest.raises(GenerationSettingsError, match="samples_per_state"):
        DecodingSettings(mode="per_state", samples_per_state=2)  # greedy: the copies would agree


def test_mc_dropout_decodes_seeded_dropout_passes(scorer, states):
    from rayblora.posteriors.baselines import McDropoutPosterior

    post = McDropoutPosterior(scorer, [states[0]], samples=3, seed=5)
    settings = DecodingSettings(max_new_tokens=4, stop=())
    first, again = post.generate(PROMPTS, settings), post.generate(PROMPTS, settings)
    for a, b in zip(first, again, strict=True):  # masks are seeded (to the BLAS's last bits)
        assert a.tokens == b.tokens and a.mutual_information == pytest.approx(b.mutual_information, abs=1e-6)
    assert max(a.scores["max_token_mi"] for a in first) > 1e-4  # the 3 passes differ: dropout stayed on
