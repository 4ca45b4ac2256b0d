"""Answer scoring on the tiny model: answer tokens, padding invariance, training and resuming."""

import pytest
import torch

from rayblora.model import ModelError, answer_token_ids, tiny_tokenizer
from rayblora.train.loop import LoopContext, TrainerState, lr_factor, train_member


def test_answer_tokens_must_differ():
    tok = tiny_tokenizer()
    ids = answer_token_ids(tok, [" negative", " positive"])
    assert len(set(ids)) == 2
    with pytest.raises(ModelError, match="share a first token"):
        answer_token_ids(tok, [" pos", " positive"])


def test_score_does_not_depend_on_padding(trained_members):
    scorer = trained_members[0]
    short, long = "Review: good\nAnswer:", "Review: " + "the film was a plot " * 4 + "\nAnswer:"
    with torch.no_grad():
        alone = scorer.logits(scorer.encode([short]))
        padded = scorer.logits(scorer.encode([short, long]))[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_trained_members_beat_chance(trained_members, tiny_data):
    from rayblora.posteriors.ensemble import EnsemblePosterior

    scorer, states, infos = trained_members
    pred = EnsemblePosterior(scorer, states, infos).predict_dataset(tiny_data.test)
    acc = (pred.label == torch.tensor(tiny_data.test["label"])).float().mean().item()
    assert acc > 0.7
    assert infos[0]["metrics"]["val_accuracy"] > 0.7


def test_lr_schedule_warms_up_and_decays(tiny_session_config):
    f = lr_factor(tiny_session_config.train)
    steps = tiny_session_config.train.steps
    assert f(0) < f(1) <= 1.0 and abs(f(steps) - tiny_session_config.train.final_lr_fraction) < 1e-9


def test_resume_from_checkpoint_matches_uninterrupted(tiny_session_config, tiny_data, tmp_path):
    from dataclasses import replace

    from rayblora.scoring import build_scorer

    cfg = replace(tiny_session_config.train, steps=8, checkpoint_every=4)
    quiet = dict(log=lambda _m: None)

    def fresh():
        return build_scorer(tiny_session_config.model, tiny_session_config.adapter, tiny_data.spec,
                            tiny_session_config.data.max_length, seed=3)

    full = fresh()
    train_member(full, tiny_data.train, tiny_data.validation, cfg, LoopContext(seed=3, **quiet))

    def save_at_4(step, metrics, state: TrainerState):
        if step == 4:
            state.save(tmp_path / "ckpt", metrics)

    first = fresh()
    train_member(first, tiny_data.train, tiny_data.validation, replace(cfg, steps=8),
                 LoopContext(seed=3, on_checkpoint=save_at_4, **quiet))
    resumed = fresh()
    train_member(resumed, tiny_data.train, tiny_data.validation, cfg,
                 LoopContext(seed=3, resume_dir=str(tmp_path / "ckpt"), **quiet))
    a, b = full.adapter_state(), resumed.adapter_state()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_model_device_is_validated_and_placed(tiny_session_config):
    from dataclasses import replace

    from rayblora.config import ConfigError, load_config
    from rayblora.model import load_base_model

    with pytest.raises(ConfigError, match="model.device"):
        load_config(None, ["model.device=gpu0"])
    assert load_config(None, ["model.device=cuda:1"]).model.device == "cuda:1"
    model, _ = load_base_model(replace(tiny_session_config.model, device="auto"))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in model.parameters()} == {expected}
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="model.device"):
            load_base_model(replace(tiny_session_config.model, device="cuda"))


def test_random_b_init_is_seeded_and_zero_by_default(tiny_session_config):
    """adapter.init_b_std > 0 draws B from the member's seed (members start as different functions); 0 keeps
    PEFT's B = 0."""
    import dataclasses

    from rayblora.config import ConfigError, load_config
    from rayblora.data.formats import classification_spec
    from rayblora.scoring import build_scorer

    spec = classification_spec(("negative", "positive"), "{text}\nSentiment:")

    def b_weights(std, seed):
        adapter = dataclasses.replace(tiny_session_config.adapter, init_b_std=std)
        state = build_scorer(tiny_session_config.model, adapter, spec, 32, seed=seed).adapter_state()
        return torch.cat([v.reshape(-1) for k, v in sorted(state.items()) if "lora_B" in k])

    assert b_weights(0.0, 1).abs().max() == 0
    drawn = b_weights(0.05, 1)
    assert 0.03 < float(drawn.std()) < 0.07
    assert torch.equal(drawn, b_weights(0.05, 1)) and not torch.equal(drawn, b_weights(0.05, 2))
    with pytest.raises(ConfigError, match="adapter.init_b_std"):
        load_config(None, ["adapter.init_b_std=-1"])


def test_large_random_a_init_is_xavier_with_the_gain_and_seeded(tiny_session_config):
    """adapter.init_a_gain > 0 draws A Xavier-normal (std = gain · sqrt(2 / (r + d_in))) from the member's seed;
    0 keeps PEFT's Kaiming-uniform A."""
    import dataclasses

    from rayblora.config import ConfigError, load_config
    from rayblora.data.formats import classification_spec
    from rayblora.scoring import build_scorer

    spec = classification_spec(("negative", "positive"), "{text}\nSentiment:")

    def a_weights(gain, seed):
        adapter = dataclasses.replace(tiny_session_config.adapter, init_a_gain=gain)
        state = build_scorer(tiny_session_config.model, adapter, spec, 32, seed=seed).adapter_state()
        return {k: v for k, v in sorted(state.items()) if "lora_A" in k}

    default, large = a_weights(0.0, 1), a_weights(10.0, 1)
    for key, a in large.items():
        rank, d_in = a.shape
        assert 0.8 < float(a.std()) / (10.0 * (2 / (rank + d_in)) ** 0.5) < 1.2
        assert float(default[key].abs().max()) <= (1 / d_in) ** 0.5 + 1e-6  # PEFT's bound: sqrt(6 / ((1 + 5) d_in))
    assert all(torch.equal(a, b) for a, b in zip(large.values(), a_weights(10.0, 1).values()))
    assert not all(torch.equal(a, b) for a, b in zip(large.values(), a_weights(10.0, 2).values()))
    with pytest.raises(ConfigError, match="adapter.init_a_gain"):
        load_config(None, ["adapter.init_a_gain=-1"])


def test_bootstrap_rows_resample_the_split_with_replacement(tiny_data):
    from rayblora.config import ConfigError, load_config
    from rayblora.data.sources import bootstrap_rows

    rows = bootstrap_rows(tiny_data.train, 7)
    assert len(rows) == len(tiny_data.train)
    assert set(rows["prompt"]) <= set(tiny_data.train["prompt"])
    assert len(set(rows["prompt"])) < len(rows)  # a resample of n from n repeats rows
    assert rows["prompt"] == bootstrap_rows(tiny_data.train, 7)["prompt"]
    assert rows["prompt"] != bootstrap_rows(tiny_data.train, 8)["prompt"]
    with pytest.raises(ConfigError, match="train.member_data"):
        load_config(None, ["train.member_data=subsample"])


def test_keep_best_keeps_the_lowest_validation_nll_adapter(tiny_session_config, tiny_data, tmp_path):
    """train.keep_best with eval_every = 4: the checkpoint holds the adapter of the validation pass with the
    lowest val_nll (its step and value in state.json), and validating that adapter gives that value."""
    import json
    from dataclasses import replace

    from safetensors.torch import load_file

    from rayblora.config import ConfigError, load_config
    from rayblora.model import set_lora_state
    from rayblora.scoring import build_scorer
    from rayblora.train.loop import validate

    cfg = replace(tiny_session_config.train, steps=16, eval_every=4, keep_best=True, lr=3e-2)
    scorer = build_scorer(tiny_session_config.model, tiny_session_config.adapter, tiny_data.spec,
                          tiny_session_config.data.max_length, seed=3)
    ctx = LoopContext(seed=3, log=lambda _m: None,
                      on_checkpoint=lambda step, m, state: state.save(tmp_path / "ckpt", m))
    train_member(scorer, tiny_data.train, tiny_data.validation, cfg, ctx)
    passes = {h["step"]: h["val_nll"] for h in ctx.history if "val_nll" in h}
    assert sorted(passes) == [4, 8, 12, 16]
    best = json.loads((tmp_path / "ckpt" / "state.json").read_text())["best"]
    assert best["step"] == min(passes, key=passes.get) and best["val_nll"] == min(passes.values())
    set_lora_state(scorer.model, load_file(str(tmp_path / "ckpt" / "best_adapter.safetensors")))
    assert validate(scorer, tiny_data.validation, 16)["val_nll"] == pytest.approx(best["val_nll"], rel=1e-4)
    with pytest.raises(ConfigError, match="train.keep_best"):
        load_config(None, ["train.keep_best=true"])
