"""The posterior artifact: round trip, PEFT-loadable members, checksums, base-model identity, atomic writes."""

import json
from dataclasses import replace

import pytest
import torch

from rayblora.artifact import ArtifactError, load_posterior, save_posterior
from rayblora.model import load_base_model
from rayblora.posteriors.ensemble import EnsemblePosterior
from rayblora.workflows.members import member_seed


@pytest.fixture(scope="module")
def saved(trained_members, tiny_session_config, tmp_path_factory):
    scorer, states, infos = trained_members
    post = EnsemblePosterior(scorer, states, infos)
    path = save_posterior(post, tmp_path_factory.mktemp("art") / "posterior",
                          model_config=tiny_session_config.model, adapter_config=tiny_session_config.adapter,
                          training={"note": "test"})
    return post, path


@pytest.fixture
def copy_of(saved, tmp_path):
    import shutil

    def make():
        dst = tmp_path / "copy"
        shutil.copytree(saved[1], dst)
        return dst

    return make


def test_round_trip_reproduces_predictions(saved, tiny_data, tiny_session_config):
    post, path = saved
    loaded = load_posterior(path)
    assert isinstance(loaded, EnsemblePosterior) and len(loaded.members) == 2
    a = post.predict_dataset(tiny_data.test)
    b = loaded.predict_dataset(tiny_data.test)
    assert torch.allclose(a.sample_probs, b.sample_probs, atol=1e-6)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["method"] == "ensemble" and manifest["schema_version"] == 1
    assert manifest["task"]["answer_token_ids"] == post.scorer.answer_ids.tolist()
    assert set(manifest["files"]) >= {"members/0/adapter_model.safetensors", "members/1/adapter_config.json"}
    assert manifest["members"][1]["seed"] == member_seed(tiny_session_config, 1) and "metrics" in manifest["members"][1]


def test_members_load_with_peft_and_reproduce_member_probs(saved, tiny_session_config, tiny_data):
    from peft import PeftModel

    from rayblora.data.batches import eval_batches
    from rayblora.data.batches import position_ids

    post, path = saved
    batch = next(eval_batches(tiny_data.test, post.scorer.tokenizer, 16, post.scorer.max_length))
    expected = torch.softmax(post.sample_logits(batch), -1)
    for i in range(2):
        base, _ = load_base_model(tiny_session_config.model)
        model = PeftModel.from_pretrained(base, str(path / "members" / str(i))).eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=position_ids(batch)).logits[:, -1]
        probs = torch.softmax(logits[:, post.scorer.answer_ids], -1)
        assert torch.allclose(probs, expected[i], atol=1e-5)


def test_views_of_the_same_members(saved, tiny_data):
    _, path = saved
    map_view = load_posterior(path, method="map")
    assert map_view.method == "map" and map_view.num_samples == 1
    with pytest.raises(KeyError, match="known methods"):
        load_posterior(path, method="nope")


def test_flipped_byte_is_refused(copy_of):
    path = copy_of()
    f = path / "members" / "0" / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for members/0/adapter_model\.safetensors"):
        load_posterior(path)


def test_missing_file_wrong_schema_and_not_an_artifact(copy_of, tmp_path):
    path = copy_of()
    (path / "members" / "1" / "adapter_config.json").unlink()
    with pytest.raises(ArtifactError, match="members/1/adapter_config.json .* missing"):
        load_posterior(path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema version 99"):
        load_posterior(path)
    with pytest.raises(ArtifactError, match="not a posterior artifact"):
        load_posterior(tmp_path)


def test_other_base_model_is_refused(saved, tiny_session_config):
    _, path = saved
    other = load_base_model(replace(tiny_session_config.model, seed=123))
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_posterior(path, base=other)


def test_failed_save_leaves_nothing_behind(trained_members, tiny_session_config, tmp_path):
    scorer, states, infos = trained_members

    class Broken(EnsemblePosterior):
        def artifact_tensors(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_posterior(Broken(scorer, states, infos), tmp_path / "p", model_config=tiny_session_config.model,
                       adapter_config=tiny_session_config.adapter)
    assert list(tmp_path.iterdir()) == []
