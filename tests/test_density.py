"""Feature density: the Gaussian fit against an independent numpy GDA, the scores on the scorer's own features,
the artifact round trip, old artifacts, trunk cache / tail invariance, multiple choice and `rayblora fit --density`."""

import json
import shutil

import numpy as np
import pytest
import torch

from rayblora.artifact import load_posterior, save_posterior
from rayblora.density import FeatureDensity
from rayblora.posteriors.ensemble import EnsemblePosterior
from rayblora.manifest import open_artifact

FAR_TEXT = "0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9"
"""Text nothing like the synthetic reviews (digits and spaces only) for the tiny model's tokenizer."""


def numpy_gda(features: np.ndarray, labels: np.ndarray, classes: int, queries: np.ndarray):
    """Reference: class means, pooled covariance shrunk towards (tr S / H) I by the Ledoit–Wolf intensity (written
    from the paper's per-row outer products), min-class Mahalanobis distance and mixture log-density."""
    n, h = features.shape
    means = np.stack([features[labels == c].mean(0) for c in range(classes)])
    x = features - means[labels]
    s = x.T @ x / n
    m = np.trace(s) / h
    d2 = np.sum((s - m * np.eye(h)) ** 2) / h
    b2 = sum(np.sum((np.outer(r, r) - s) ** 2) for r in x) / (n * n * h)
    lam = min(b2, d2) / d2
    cov = (1 - lam) * s + lam * m * np.eye(h)
    prec = np.linalg.inv(cov)
    diffs = queries[:, None, :] - means[None]
    maha = np.einsum("nch,hg,ncg->nc", diffs, prec, diffs)
    prior = np.log(np.bincount(labels, minlength=classes) / n)
    joint = prior[None] - 0.5 * maha
    top = joint.max(1, keepdims=True)
    logdens = (top[:, 0] + np.log(np.exp(joint - top).sum(1)) - 0.5 * np.linalg.slogdet(cov)[1]
               - 0.5 * h * np.log(2 * np.pi))
    return np.sqrt(maha.min(1)), logdens, lam


@pytest.mark.parametrize("n,h", [(40, 12), (25, 30)])  # more rows than dimensions, and fewer (shrinkage needed)
def test_density_equals_numpy_gda(n, h):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    labels[:3] = [0, 1, 2]
    feats = rng.normal(size=(n, h)) + labels[:, None] * 0.7
    queries = rng.normal(size=(7, h)) * 2
    dist, logdens, lam = numpy_gda(feats, labels, 3, queries)
    density = FeatureDensity.fit(torch.tensor(feats)[None], torch.tensor(labels), 3)
    got_dist, got_logdens = density.raw_scores(torch.tensor(queries)[None])
    assert density.meta["shrinkage"][0] == pytest.approx(lam, abs=1e-6)
    np.testing.assert_allclose(got_dist[0].numpy(), dist, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_logdens[0].numpy(), logdens, rtol=1e-5, atol=1e-5)


def test_threshold_and_nearest_member():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 4)) + 10.0  # two members with far-apart features
    density = FeatureDensity.fit(torch.tensor(np.stack([a, b])), torch.zeros(50, dtype=torch.long), 1)
    density.calibrate(density.scores(torch.tensor(a)[None]).distance, 0.9)
    assert (density.scores(torch.tensor(a)[None]).in_distribution.float().mean() == pytest.approx(0.9, abs=0.03))
    # a feature near member 1's Gaussian is scored there, not by member 0
    near_b = density.scores(torch.tensor(b)[None])
    assert float(near_b.in_distribution.float().mean()) >= 0.8 and float(near_b.distance.mean()) < 3.0
    far = density.scores(torch.full((1, 3, 4), 100.0, dtype=torch.float64))
    assert not bool(far.in_distribution.any()) and bool((far.distance > density.threshold).all())


def test_scorer_features_are_the_final_hidden_state(trained_members, tiny_data):
    """The captured feature is the final-normed hidden state at the answer position of a full forward, with the
    exact tail and without, with the trunk cache and without."""
    scorer, states, _ = trained_members
    batch = scorer.encode(list(tiny_data.test["prompt"][:6]))
    with scorer.restoring_adapter():
        from rayblora.model import set_lora_state
        set_lora_state(scorer.model, states[0])
        reference = scorer.last_hidden(batch)
        outs = []
        for tail in (True, False):
            scorer.tail_only = tail
            with scorer.capturing_features() as feats:
                scorer.logits(batch)
            outs.append(feats.answer[0])
        scorer.tail_only = True
    for got in outs:
        torch.testing.assert_close(got, reference.float(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def with_density(sentiment_files, tmp_path_factory):
    """Two tiny members adapting layers 1-2 of 3 (so the frozen layer 0 can be cached), with a feature density."""
    from rayblora.config import load_config
    from rayblora.data import load_task_data
    from rayblora.workflows.members import train_members_in_process
    from conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path_factory.mktemp("density-run"), **{
        "model.tiny_layers": "3", "adapter.layers": "[1,2]"}))
    data = load_task_data(cfg.data)
    scorer, members = train_members_in_process(cfg, log=lambda _m: None, data=data)
    post = EnsemblePosterior(scorer, [m.adapter for m in members], [m.info() for m in members])
    post.fit_density(data.train, data.validation, 0.95)
    post.test_config, post.test_data = cfg, data
    return post


def test_fit_equals_reference_on_member_features(with_density):
    """Trunk features (the default where frozen layers lie below the adapter): one Gaussian over the frozen layers'
    prompt summaries; answer features: one per member over its own final hidden states. Each equals the numpy GDA
    of its features, and the trunk summary equals the model's own hidden states entering layer 1."""
    post, tiny_data = with_density, with_density.test_data
    assert post.density.features == "trunk" and post.density.means.shape[0] == 1
    feats, labels = post.member_features(tiny_data.train, "trunk")
    queries = post.member_features(tiny_data.test, "trunk")[0]
    dist, _, _ = numpy_gda(feats[0].double().numpy(), labels.numpy(), 2, queries[0].double().numpy())
    np.testing.assert_allclose(post.density.raw_scores(queries)[0][0].numpy(), dist, rtol=1e-5, atol=1e-5)
    batch = post.scorer.encode(list(tiny_data.test["prompt"][:5]))
    with torch.no_grad():
        hidden = post.scorer.model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                                   output_hidden_states=True).hidden_states[1]
    mask = batch["attention_mask"].bool()
    mean = torch.stack([hidden[i][mask[i]].mean(0) for i in range(5)])
    torch.testing.assert_close(queries[0, :5], torch.cat([hidden[:, -1], mean], -1), rtol=1e-4, atol=1e-4)
    answer = EnsemblePosterior(post.scorer, post.members, post.member_info)
    answer.fit_density(tiny_data.train, tiny_data.validation, 0.95, features="answer")
    feats, labels = answer.member_features(tiny_data.train, "answer")
    queries = answer.member_features(tiny_data.test, "answer")[0]
    assert feats.shape[:2] == (len(post.members), len(tiny_data.train))
    for k in range(len(post.members)):
        dist, _, _ = numpy_gda(feats[k].double().numpy(), labels.numpy(), 2, queries[k].double().numpy())
        single = answer.density.member(k)
        np.testing.assert_allclose(single.raw_scores(queries[k:k + 1])[0][0].numpy(), dist, rtol=1e-5, atol=1e-5)
    assert answer.predict_dataset(tiny_data.test).distance.shape == (len(tiny_data.test),)


def test_predictions_carry_the_scores_and_far_text_is_flagged(with_density):
    post, tiny_data = with_density, with_density.test_data
    pred = post.predict_dataset(tiny_data.test)
    assert pred.distance.shape == (len(tiny_data.test),) and pred.in_distribution.dtype == torch.bool
    assert float(pred.in_distribution.float().mean()) > 0.8
    far = post.predict([FAR_TEXT + "\nSentiment:", "!!!! ???? #### $$$$ %%%% &&&& **** @@@@\nSentiment:"])
    assert float(far.distance.min()) > float(pred.distance.median()) and not bool(far.in_distribution.any())
    # the same inputs through predict_batch-sized calls give the same scores (row order restored)
    again = post.predict(list(tiny_data.test["prompt"]))
    torch.testing.assert_close(again.distance, pred.distance, rtol=1e-5, atol=1e-5)


def test_trunk_cache_and_tail_leave_the_scores_unchanged(with_density, tmp_path):
    from rayblora.trunk_cache import TrunkCache
    from rayblora.trunk import first_adapted_layer, trunk_dtype

    post, scorer, tiny_data = with_density, with_density.scorer, with_density.test_data
    plain = post.predict_dataset(tiny_data.test).distance
    assert first_adapted_layer(scorer.model) == 1
    cache = TrunkCache(scorer.fingerprint, 1, trunk_dtype(scorer.model), tmp_path / "cache", lambda _m: None)
    scorer.use_trunk_cache(cache)
    try:
        for _ in range(2):  # filling the cache, then reading it
            torch.testing.assert_close(post.predict_dataset(tiny_data.test).distance, plain, rtol=1e-5, atol=1e-5)
        assert cache.hits > 0
    finally:
        scorer.use_trunk_cache(None)
    scorer.tail_only = False
    try:
        torch.testing.assert_close(post.predict_dataset(tiny_data.test).distance, plain, rtol=1e-5, atol=1e-5)
    finally:
        scorer.tail_only = True


def test_artifact_round_trip_and_old_artifacts(with_density, tmp_path):
    post, tiny_data, cfg = with_density, with_density.test_data, with_density.test_config
    path = save_posterior(post, tmp_path / "posterior", model_config=cfg.model, adapter_config=cfg.adapter)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["density"]["file"] == "density.safetensors" and "density.safetensors" in manifest["files"]
    loaded = load_posterior(path, scorer=post.scorer)
    torch.testing.assert_close(loaded.density.precision, post.density.precision)
    assert loaded.density.threshold == post.density.threshold
    a, b = post.predict_dataset(tiny_data.test), loaded.predict_dataset(tiny_data.test)
    torch.testing.assert_close(a.distance, b.distance)
    # views carry the density (map, the temperature rows)
    assert loaded.view("map").density is loaded.density
    # an artifact written before the density existed: no section, no file -> loads, predictions without scores
    old = tmp_path / "old"
    shutil.copytree(path, old)
    (old / "density.safetensors").unlink()
    del manifest["density"], manifest["files"]["density.safetensors"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    legacy = load_posterior(old, scorer=post.scorer)
    assert legacy.density is None and legacy.predict_dataset(tiny_data.test).distance is None


def test_multiple_choice_density_reads_the_prompts_last_position(choice_files, tmp_path):
    from rayblora.config import load_config
    from rayblora.data import load_task_data
    from rayblora.workflows.members import train_members_in_process
    from conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(choice_files, tmp_path / "run", **{
        "data.shift_tasks": "[]", "data.val_size": "20", "data.test_size": "30", "data.max_length": "256",
        "model.tiny_layers": "3", "adapter.layers": "[1,2]", "train.steps": "4", "posterior.members": "1"}))
    data = load_task_data(cfg.data)
    scorer, members = train_members_in_process(cfg, log=lambda _m: None, data=data)
    post = EnsemblePosterior(scorer, [m.adapter for m in members], [m.info() for m in members])
    for kind in ("trunk", "answer"):
        post.fit_density(data.train, data.validation, features=kind)
        assert post.density.means.shape[1] == 1 and post.density.meta["position"] == "prompt_last"
        pred = post.predict_dataset(data.test)
        assert pred.distance.shape == (len(data.test),) and torch.isfinite(pred.log_density).all()
    # the options do not move a row's trunk summary (only its prompt is summarised)
    batch = post.scorer.encode(["Which one is good? the film"] * 2, [["bad", "good"], ["awful", "superb", "dull"]])
    with post.scorer.capturing_features() as captured:
        post.scorer.shared_trunk(batch)
    torch.testing.assert_close(captured.trunk[0][0], captured.trunk[0][1], rtol=1e-5, atol=1e-5)


def test_trained_artifact_reports_density_and_pooled_temperature_rows(sentiment_files, tmp_path):
    """train (in process) fits the density at training end; evaluate reports its OOD AUROC per split, the
    in-distribution rate, the histogram, and a `+T` row per family (one temperature after pooling)."""
    from rayblora.config import load_config
    from rayblora.workflows.evaluate import evaluate
    from rayblora.workflows.train import train
    from conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path / "run", **{
        "model.tiny_layers": "3", "adapter.layers": "[1,2]", "posterior.calibrate": "temperature",
        "posterior.eval_methods": "[map, temperature, ensemble, laplace]", "laplace.fit_batches": "3",
        "laplace.link_samples": "20"}))
    logs = []
    artifact = train(cfg, log=logs.append, in_process=True)
    assert any(line.startswith("[density] trunk features, fitted on") for line in logs)
    report = evaluate(open_artifact(artifact), cfg, log=lambda _m: None)
    assert set(report["methods"]) == {"map", "temperature", "ensemble", "laplace", "ensemble+T", "laplace+T"}
    shift = next(iter(report["ood"]["ensemble"]))
    assert 0.0 <= report["ood"]["ensemble"][shift]["auroc_density"] <= 1.0
    assert {"auroc_density"} <= set(report["ood"]["ensemble+T"][shift]) & set(report["ood"]["laplace"][shift])
    in_domain = next(iter(report["methods"]["ensemble"]))
    assert 0.5 <= report["methods"]["ensemble"][in_domain]["in_distribution"] <= 1.0
    assert report["methods"]["ensemble+T"][in_domain]["temperature"] > 0
    assert (cfg.out_dir / "density.png").is_file()
    assert "AUROC (density)" in (cfg.out_dir / "report.md").read_text()


def test_fit_density_onto_an_artifact_without_one(sentiment_files, tmp_path, capsys):
    """`rayblora fit --density` adds the density to an artifact trained without it (same family, lineage)."""
    from rayblora.cli import main
    from rayblora.config import load_config
    from rayblora.workflows.train import train
    from conftest import tiny_overrides

    overrides = tiny_overrides(sentiment_files, tmp_path / "run", **{"posterior.members": "1", "train.steps": "4"})
    artifact = train(load_config(None, [*overrides, "posterior.density=false"]), log=lambda _m: None,
                     in_process=True)
    assert load_posterior(artifact).density is None
    argv = ["fit", "--posterior", str(artifact), "--density"]
    assert main(argv + overrides) == 0
    out = tmp_path / "run" / "posterior-density"
    fitted = load_posterior(out)
    assert fitted.method == "ensemble" and fitted.density is not None
    assert json.loads((out / "manifest.json").read_text())["lineage"]["parent"]
    assert main(argv + ["--method", "laplace", *overrides]) == 2
    assert "fit: --density keeps the artifact's family" in capsys.readouterr().err


def test_generation_density_reads_the_prompts_last_position_from_the_prefill(tmp_path):
    """A generation task's density: fitted on the members' prefill features of the training prompts; each answer
    carries its prompt's feature_distance (a sequence score, so the generation report judges it), log-density
    and in-distribution flag, the same from batched decoding, per-state decoding and the stream; the features
    equal the scorer's full forward at the prompt's last position."""
    from rayblora.config import load_config
    from rayblora.data import load_task_data
    from rayblora.generation.decode import DecodingSettings
    from rayblora.generation.evaluation import uncertainty_scores
    from rayblora.model import set_lora_state
    from rayblora.workflows.members import train_members_in_process
    from test_generation import _addition_file

    overrides = {"model.name": "tiny-llama", "data.task": str(_addition_file(tmp_path / "add.jsonl", 200)),
                 "data.shift_tasks": "[]", "data.far_ood_tasks": "[]", "data.train_size": "0", "data.val_size": "40",
                 "data.test_size": "20", "data.max_length": "32", "train.steps": "4", "train.batch_size": "16",
                 "posterior.members": "2", "adapter.layers": "[1]", "output.dir": str(tmp_path / "run")}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    data = load_task_data(cfg.data)
    scorer, members = train_members_in_process(cfg, log=lambda _m: None, data=data)
    post = EnsemblePosterior(scorer, [m.adapter for m in members], [m.info() for m in members])
    assert post.fit_density(data.train, data.validation).features == "trunk"
    trunk_answers = post.generate(list(data.test["prompt"][:4]), DecodingSettings(max_new_tokens=2, stop=()))
    expected_trunk = post.density.scores(post.member_features(data.test.select(range(4)), "trunk")[0])
    np.testing.assert_allclose([a.scores["feature_distance"] for a in trunk_answers],
                               expected_trunk.distance.numpy(), rtol=1e-5, atol=1e-5)
    density = post.fit_density(data.train, data.validation, features="answer")
    assert density.means.shape[:2] == (2, 1) and density.meta["position"] == "prompt_last"
    prompts = list(data.test["prompt"][:4])
    feats, _ = post.member_features(data.test.select(range(4)), "answer")
    with scorer.restoring_adapter():
        set_lora_state(scorer.model, post.members[1])
        reference = scorer.last_hidden(scorer.encode(prompts))
    torch.testing.assert_close(feats[1], reference.float(), rtol=1e-5, atol=1e-5)
    settings = DecodingSettings(max_new_tokens=3, stop=())
    answers = post.generate(prompts + [FAR_TEXT + " plus"], settings)
    expected = density.scores(torch.cat([feats, post.member_features(
        data.test.select(range(1)).map(lambda _r: {"prompt": FAR_TEXT + " plus"}), "answer")[0]], 1))
    got = [a.scores["feature_distance"] for a in answers]
    np.testing.assert_allclose(got, expected.distance.numpy(), rtol=1e-5, atol=1e-5)
    assert answers[-1].in_distribution is False and all(isinstance(a.log_density, float) for a in answers)
    assert "feature_distance" in uncertainty_scores(answers)
    per_state = post.generate(prompts, DecodingSettings(max_new_tokens=3, stop=(), mode="per_state"))
    np.testing.assert_allclose([a.scores["feature_distance"] for a in per_state], got[:4], rtol=1e-5)
    done = list(post.generate_stream(prompts[0], settings))[-1]
    assert done["scores"]["feature_distance"] == pytest.approx(got[0], rel=1e-5) and "in_distribution" in done
