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
