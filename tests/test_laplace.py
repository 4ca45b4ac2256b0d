"""Laplace-LoRA posteriors on the tiny Llama: oracle against laplace-torch, low-rank convergence, cheap prior
re-evaluation, evidence, links, mixture of Laplaces, artifact round trip, `rayblora fit` and the Ray Train fit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rayblora.artifact import ArtifactError, load_posterior, save_posterior
from rayblora.config import ConfigError, load_config
from rayblora.data.batches import eval_batches
from rayblora.posteriors import get_posterior_class
from rayblora.posteriors.laplace import glm
from rayblora.posteriors.laplace.kfac import LoraCurvature, find_lora_sites
from rayblora.posteriors.laplace import LAPLACE_FILE, PRIOR_GRID, LaplacePosterior

from conftest import tiny_overrides


def with_laplace(cfg, **values):
    return dataclasses.replace(cfg, laplace=dataclasses.replace(cfg.laplace, **values))


def fast(cfg, **values):
    """The session config with a short curvature pass (4 batches of 16) and few link samples."""
    base = {"fit_batches": 4, "link_samples": 20, "prior_method": "fixed", "prior_precision": 1.0}
    return with_laplace(cfg, **{**base, **values})


def first_batch(scorer, dataset, n: int = 16):
    return next(eval_batches(dataset, scorer.tokenizer, n, scorer.max_length))


def build(method, trained_members, tiny_data, cfg):
    scorer, states, infos = trained_members
    return get_posterior_class(method).build(scorer, states, infos, data=tiny_data, config=cfg)


class ScorerLogits(torch.nn.Module):
    """The scorer as a module of unpadded token ids (B, T) -> answer logits (B, C), for laplace-torch."""

    def __init__(self, scorer):
        super().__init__()
        self.model, self.scorer = scorer.model, [scorer]

    def forward(self, x):
        return self.scorer[0].logits({"input_ids": x, "attention_mask": torch.ones_like(x)})


# --- oracle ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["kfac", "diag"])
def test_glm_predictive_and_evidence_match_laplace_torch(structure, tiny_session_config, tiny_data):
    """Full-LoRA K-FAC (reduce) and diagonal GGN on the tiny Llama, δ = 0.5: our GLM logit covariance and log
    evidence equal laplace-torch's (curvlinops backend) to float32 precision (covariance rtol 1e-4, evidence
    rtol 1e-5), and our probit equals laplace-torch's probit of the logit difference (their moments, C = 2;
    their own probit scales raw logits, which is not shift-invariant). Unpadded prompts, where both apply."""
    laplace = pytest.importorskip("laplace")
    from torch.utils.data import DataLoader, TensorDataset

    from rayblora.model import set_lora_state
    from rayblora.scoring import build_scorer

    cfg = fast(tiny_session_config, structure=structure, prior_precision=0.5)
    scorer = build_scorer(cfg.model, cfg.adapter, tiny_data.spec, cfg.data.max_length, seed=0)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in scorer.adapter_state().items()}
    set_lora_state(scorer.model, state)
    scorer.model.eval()
    ids, labels = torch.randint(1, 200, (16, 10), generator=g), torch.randint(0, 2, (16,), generator=g)
    test_ids = torch.randint(1, 200, (4, 10), generator=g)
    curv = LoraCurvature(find_lora_sites(scorer.model), structure)
    for i in (0, 8):
        curv.accumulate(scorer.logits, {"input_ids": ids[i:i + 8], "attention_mask": torch.ones(8, 10),
                                        "labels": labels[i:i + 8]})
    post = LaplacePosterior.from_curvatures(scorer, [state], [{}], {0: curv}, cfg)
    f_mu, f_var = post.glm_moments({"input_ids": test_ids, "attention_mask": torch.ones(4, 10)})[0]
    la = laplace.Laplace(ScorerLogits(scorer).eval(), "classification", subset_of_weights="all", prior_precision=0.5,
                         hessian_structure="kron" if structure == "kfac" else "diag",
                         asdl_fisher_kwargs={"kfac_approx": "reduce"} if structure == "kfac" else None)
    la.fit(DataLoader(TensorDataset(ids, labels), batch_size=16))
    their_mu, their_var = la._glm_predictive_distribution(test_ids)
    assert torch.allclose(f_mu, their_mu, atol=1e-6)
    assert torch.allclose(f_var, their_var, rtol=1e-4, atol=1e-7)
    diff = their_mu[:, 1:] - their_mu[:, :1]
    diff_var = (their_var[:, 0, 0] + their_var[:, 1, 1] - 2 * their_var[:, 0, 1])[:, None]
    probit_of_diff = torch.softmax(torch.cat([torch.zeros_like(diff), diff], 1) /
                                   torch.cat([torch.ones_like(diff), (1 + torch.pi / 8 * diff_var).sqrt()], 1), -1)
    assert torch.allclose(glm.probit_probs(f_mu, f_var), probit_of_diff, atol=1e-6)
    assert post.fits[0].log_marglik() == pytest.approx(float(la.log_marginal_likelihood()), rel=1e-5)


# --- low-rank factors -------------------------------------------------------------------------------------------
def test_low_rank_predictive_converges_to_exact(trained_members, tiny_data, tiny_session_config):
    scorer, states, infos = trained_members
    batch = first_batch(scorer, tiny_data.test)
    exact = build("laplace", trained_members, tiny_data, fast(tiny_session_config, fit_batches=2))
    _, exact_var = exact.glm_moments(batch)[0]
    errors = []
    for rank in (1, 4, 16, 64):
        post = build("laplace", trained_members, tiny_data,
                     fast(tiny_session_config, fit_batches=2, low_rank_threshold=16, low_rank=rank))
        assert any(not e.complete for e in post.fits[0].eigens.values()) or rank == 64
        _, var = post.glm_moments(batch)[0]
        errors.append(float((var - exact_var).abs().max() / exact_var.abs().max()))
    assert errors[0] > 1e-3, errors  # a rank-1 factor is a real approximation
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4, errors


# --- prior precision ---------------------------------------------------------------------------------------------
def test_with_prior_precision_equals_fresh_fit_without_forward_passes(trained_members, tiny_data,
                                                                      tiny_session_config):
    scorer = trained_members[0]
    val = tiny_data.validation
    post = build("laplace", trained_members, tiny_data, fast(tiny_session_config, prior_precision=1.0))
    post.enable_jacobian_cache()
    post.predict_dataset(val)
    calls = []
    handle = scorer.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        swept = post.with_prior_precision(3.7).predict_dataset(val)
    finally:
        handle.remove()
    assert calls == []
    fresh = build("laplace", trained_members, tiny_data, fast(tiny_session_config, prior_precision=3.7))
    expected = fresh.predict_dataset(val)
    assert torch.allclose(swept.probs, expected.probs, atol=1e-6)
    assert torch.allclose(swept.sample_probs, expected.sample_probs, atol=1e-5)
    assert not torch.allclose(swept.probs, post.predict_dataset(val).probs, atol=1e-4)


def test_marglik_prior_is_an_evidence_maximum_scalar_and_per_module(trained_members, tiny_data,
                                                                     tiny_session_config):
    scalar = build("laplace", trained_members, tiny_data, fast(tiny_session_config, prior_method="marglik"))
    fit = scalar.fits[0]
    best = fit.log_marglik()
    assert fit.prior_source == "marglik" and fit.prior.numel() == 1
    for factor in (0.7, 1.4):
        assert fit.log_marglik(fit.prior * factor) < best
    per_module = build("laplace", trained_members, tiny_data,
                       fast(tiny_session_config, prior_method="marglik", per_module=True))
    n_modules = len(find_lora_sites(trained_members[0].model))
    assert per_module.fits[0].prior.numel() == n_modules == 4
    assert per_module.fits[0].log_marglik() >= best - 1e-6


def test_val_nll_prior_and_config_errors(trained_members, tiny_data, tiny_session_config):
    post = build("laplace", trained_members, tiny_data, fast(tiny_session_config, prior_method="val_nll"))
    chosen = float(post.fits[0].prior)
    assert post.fits[0].prior_source == "val_nll" and min(abs(chosen - v) / v for v in PRIOR_GRID) < 1e-6
    with pytest.raises(ConfigError, match="laplace.per_module"):
        load_config(None, ["laplace.per_module=true", "laplace.prior_method=val_nll"])
    with pytest.raises(ValueError, match="needs the task data"):
        get_posterior_class("laplace").build(*trained_members)


# --- predictive -------------------------------------------------------------------------------------------------
def test_mixture_of_laplaces_averages_member_predictives(trained_members, tiny_data, tiny_session_config):
    scorer = trained_members[0]
    batch = first_batch(scorer, tiny_data.test)
    single = build("laplace", trained_members, tiny_data, fast(tiny_session_config))
    mixture = build("laplace_ensemble", trained_members, tiny_data, fast(tiny_session_config))
    moments = mixture.glm_moments(batch)
    assert len(mixture.fits) == 2 and len(single.fits) == 1
    pred = mixture.predict_batch(batch)
    member_probs = torch.stack([glm.probit_probs(mu, var) for mu, var in moments])
    assert torch.allclose(pred.probs, member_probs.mean(0), atol=1e-6)
    assert torch.allclose(single.predict_batch(batch).probs, member_probs[0], atol=1e-6)
    assert pred.sample_probs.shape == (40, 16, 2) and mixture.num_samples == 40
    assert (pred.mutual_information >= 0).all()
    assert not torch.allclose(moments[0][0], moments[1][0])  # two different MAP adapters


@pytest.mark.parametrize("link", ["mc", "nn"])
def test_sampling_links_are_seeded_and_match_the_glm_moments(link, trained_members, tiny_data,
                                                             tiny_session_config):
    """mc draws f ~ N(f_mu, J Σ Jᵀ); nn pushes θ ~ N(θ*, Σ) through the network, which for a tight posterior
    (large δ) has the same first two moments as the linearised model."""
    scorer = trained_members[0]
    batch = first_batch(scorer, tiny_data.test)
    samples, prior = (400, 0.3) if link == "mc" else (256, 1e4)
    post = build("laplace", trained_members, tiny_data, fast(tiny_session_config, link=link, link_samples=samples,
                                                             prior_precision=prior))
    a, b = post.predict_batch(batch), post.predict_batch(batch)
    torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=1e-6)  # seeded draws (other draws: far apart)
    assert a.sample_probs.shape[0] == samples
    assert (a.mutual_information > 0).any()
    logits = post.sample_logits(batch)
    f_mu, f_var = post.glm_moments(batch)[0]
    centred = logits - logits.mean(0)
    covariance = torch.einsum("sbc,sbd->bcd", centred, centred) / (samples - 1)
    assert float(torch.linalg.norm(covariance - f_var) / torch.linalg.norm(f_var)) < 0.2  # MC error ≈ 0.08
    scale = torch.diagonal(f_var, dim1=1, dim2=2).sqrt()
    assert float(((logits.mean(0) - f_mu).abs() / scale).max()) < 0.5
    post.settings = dataclasses.replace(post.settings, sample_seed=1)
    assert not torch.equal(post.predict_batch(batch).probs, a.probs)


# --- artifact ---------------------------------------------------------------------------------------------------
def test_artifact_round_trip_and_tamper_detection(trained_members, tiny_data, tiny_session_config, tmp_path):
    scorer = trained_members[0]
    cfg = fast(tiny_session_config, prior_method="marglik", subset="last_layer", low_rank_threshold=16,
               low_rank=8)
    post = build("laplace_ensemble", trained_members, tiny_data, cfg)
    path = save_posterior(post, tmp_path / "lap", model_config=cfg.model, adapter_config=cfg.adapter)
    manifest = json.loads((path / "manifest.json").read_text())
    family = manifest["family"]
    assert LAPLACE_FILE in manifest["files"] and family["settings"]["subset"] == "last_layer"
    assert [f["prior_method"] for f in family["fits"]] == ["marglik", "marglik"]
    assert len(family["blocks"]) == 2 and family["fits"][0]["n_data"] == 64
    loaded = load_posterior(path, scorer=scorer)
    stored, again = post.artifact_tensors()[LAPLACE_FILE], loaded.artifact_tensors()[LAPLACE_FILE]
    # the fit predicts from the very tensors it stores, in their layout too (matmul kernels depend on strides)
    assert all(torch.equal(stored[k], again[k]) and stored[k].stride() == again[k].stride() for k in stored)
    batch = first_batch(scorer, tiny_data.test)
    want, got = post.predict_batch(batch), loaded.predict_batch(batch)
    assert loaded.method == "laplace_ensemble"
    # same tensors, same layout, same code: equal bit for bit where the BLAS is deterministic; the tolerance leaves
    # room for a library whose kernels split work by thread timing, never for a difference in the stored posterior
    torch.testing.assert_close(got.probs, want.probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.sample_probs, want.sample_probs, rtol=1e-6, atol=1e-7)
    blob = bytearray((path / LAPLACE_FILE).read_bytes())
    blob[-3] ^= 0xFF
    (path / LAPLACE_FILE).write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="checksum mismatch for laplace.safetensors"):
        load_posterior(path, scorer=scorer)


@pytest.fixture(scope="module")
def ensemble_artifact(trained_members, tiny_session_config, tmp_path_factory):
    scorer, states, infos = trained_members
    post = get_posterior_class("ensemble").build(scorer, states, infos)
    return save_posterior(post, tmp_path_factory.mktemp("ens") / "posterior", model_config=tiny_session_config.model,
                          adapter_config=tiny_session_config.adapter)


def test_fit_cli_writes_a_new_laplace_artifact(ensemble_artifact, sentiment_files, tmp_path):
    from rayblora.cli import main

    out = tmp_path / "fitted"
    overrides = tiny_overrides(sentiment_files, tmp_path / "run", **{"laplace.fit_batches": "2",
                                                                      "laplace.link_samples": "10"})
    assert main(["fit", "--posterior", str(ensemble_artifact), "--out", str(out), *overrides]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "laplace_ensemble" and manifest["lineage"]["parent_method"] == "ensemble"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # atomic: no temporaries
    post = load_posterior(out)
    assert len(post.fits) == 2 and post.fits[0].prior_source == "marglik"
    from rayblora.workflows.fit import fit_posterior

    with pytest.raises(ConfigError, match="--method"):
        fit_posterior(ensemble_artifact, load_config(None, overrides), tmp_path / "x", method="ensemble")


def test_fit_offers_the_registrys_post_hoc_families_and_names_its_output_after_the_family(
        ensemble_artifact, sentiment_files, tmp_path, capsys):
    from rayblora.cli import build_parser, main
    from rayblora.posteriors.tfb import TfbPosterior
    from rayblora.registry import _CLASSES, _TABLE, post_hoc_methods, register

    assert post_hoc_methods() == ("laplace", "laplace_ensemble", "tfb", "tfb_ensemble")

    class SharperTfb(TfbPosterior):  # a family added outside rayblora declares how it is fitted, nothing else
        method = "sharper_tfb"

    register(SharperTfb)
    try:
        assert "sharper_tfb" in post_hoc_methods()
        assert build_parser().parse_args(["fit", "--posterior", "p", "--method", "sharper_tfb"]).method
    finally:
        _TABLE.pop("sharper_tfb"), _CLASSES.pop("sharper_tfb")
    run = tmp_path / "run"
    overrides = tiny_overrides(sentiment_files, run, **{"laplace.fit_batches": "2", "laplace.link_samples": "10",
                                                        "tfb.search_steps": "2"})
    assert main(["fit", "--posterior", str(ensemble_artifact), *overrides]) == 0
    assert main(["fit", "--posterior", str(ensemble_artifact), "--method", "tfb", *overrides]) == 0
    assert sorted(p.name for p in run.iterdir()) == ["posterior-laplace_ensemble", "posterior-tfb"]
    printed = capsys.readouterr().out.splitlines()
    assert str(run / "posterior-laplace_ensemble") in printed and str(run / "posterior-tfb") == printed[-1]


@pytest.mark.slow
def test_ray_train_fit_on_two_workers_equals_in_process_fit(ensemble_artifact, sentiment_files, tmp_path,
                                                            ray_session):
    from rayblora.workflows.fit import fit_posterior

    def cfg(workers: int):
        return load_config(None, tiny_overrides(sentiment_files, tmp_path / f"run{workers}", **{
            "laplace.fit_batches": "5", "laplace.fit_workers": str(workers), "laplace.link_samples": "10",
            "cluster.cpus_per_worker": "1"}))

    one = load_posterior(fit_posterior(ensemble_artifact, cfg(0), tmp_path / "one", method="laplace"))
    two = load_posterior(fit_posterior(ensemble_artifact, cfg(2), tmp_path / "two", method="laplace"),
                         scorer=one.scorer)
    assert two.fit_meta["workers"] == 2 and two.fits[0].n_data == one.fits[0].n_data == 80
    assert two.fits[0].log_lik == pytest.approx(one.fits[0].log_lik, rel=1e-6)
    assert torch.allclose(two.fits[0].prior, one.fits[0].prior, rtol=1e-4)
    batch = first_batch(one.scorer, load_task_data_for(cfg(0)).test)
    (mu1, var1), (mu2, var2) = one.glm_moments(batch)[0], two.glm_moments(batch)[0]
    assert torch.allclose(mu1, mu2) and torch.allclose(var1, var2, rtol=1e-4, atol=1e-7)


def load_task_data_for(cfg):
    from rayblora.data import load_task_data

    return load_task_data(cfg.data)


# --- the probit link --------------------------------------------------------------------------------------------
def test_probit_is_shift_invariant_and_close_to_monte_carlo():
    """Adding one random offset to every logit (mean c, variance s² in the all-ones direction) leaves the probit
    unchanged, as it leaves softmax; for C = 4 it is within 0.03 on average of a 100 000-draw Monte Carlo estimate,
    closer than the raw-logit probit (κ_c from Var f_c) of the same logits shifted by 20."""
    g = torch.Generator().manual_seed(0)
    f_mu = torch.randn(64, 4, generator=g) * 2
    root = torch.randn(64, 4, 4, generator=g) * 0.5
    f_var = root @ root.transpose(1, 2)
    ones = torch.ones(64, 4, 4)
    shifted = glm.probit_probs(f_mu + 25.0, f_var + 9.0 * ones)
    assert torch.allclose(glm.probit_probs(f_mu, f_var), shifted, atol=1e-5)
    draws = glm.sample_logits(f_mu, f_var, 100_000, torch.Generator().manual_seed(1))
    reference = torch.softmax(draws, -1).mean(0)
    error = (glm.probit_probs(f_mu, f_var) - reference).abs().mean()
    kappa = (1 + torch.pi / 8 * torch.diagonal(f_var, dim1=-2, dim2=-1)).rsqrt()
    raw_error = (torch.softmax(kappa * (f_mu + 20.0), -1) - reference).abs().mean()
    assert error < 0.03 and error < raw_error


def test_probit_keeps_invalid_choices_at_zero():
    f_mu = torch.tensor([[1.0, 2.0, float("-inf")]])
    probs = glm.probit_probs(f_mu, torch.eye(3)[None])
    assert probs[0, 2] == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    assert probs[0, 1] > probs[0, 0]


def test_binary_laplace_keeps_the_map_argmax_and_infinite_prior_precision_is_map(trained_members, tiny_data,
                                                                                  tiny_session_config):
    """C = 2: the probit of the logit difference cannot cross 0.5, whatever the per-class variances (the raw-logit
    probit could); δ → ∞ shrinks J Σ Jᵀ to 0 and the predictive to the MAP softmax."""
    scorer, states, _ = trained_members
    post = build("laplace", trained_members, tiny_data, fast(tiny_session_config, prior_precision=1e-3))
    batch = first_batch(scorer, tiny_data.test, 32)
    map_probs = get_posterior_class("map").build(*trained_members).predict_batch(batch).probs
    loose = post.predict_batch(batch)
    assert (loose.probs - map_probs).abs().max() > 1e-3  # the prior is loose enough to matter
    assert torch.equal(loose.probs.argmax(-1), map_probs.argmax(-1))
    tight = post.with_prior_precision(1e12).predict_batch(batch)
    assert torch.allclose(tight.probs, map_probs, atol=1e-5)
    assert float(tight.mutual_information.max()) < 1e-4


def test_b_only_laplace_leaves_a_at_the_map_and_round_trips(trained_members, tiny_data, tiny_session_config,
                                                            tmp_path):
    """laplace.factors=b: the curvature blocks are the lora_B weights only (weight-space draws perturb exactly
    those), and the artifact records and restores the setting."""
    scorer, states, infos = trained_members
    cfg = fast(tiny_session_config, factors="b", link="nn", link_samples=3, prior_precision=0.1)
    post = build("laplace", trained_members, tiny_data, cfg)
    assert post.modules and all(k.endswith("lora_B") for k in post.modules)
    full = build("laplace", trained_members, tiny_data, fast(tiny_session_config))
    assert len(full.modules) == 2 * len(post.modules)
    path = save_posterior(post, tmp_path / "b", model_config=tiny_session_config.model,
                          adapter_config=tiny_session_config.adapter)
    loaded = load_posterior(path)
    assert loaded.settings.factors == "b" and list(loaded.modules) == list(post.modules)
    batch = first_batch(scorer, tiny_data.test, 8)
    assert torch.allclose(loaded.predict_batch(batch).probs, post.predict_batch(batch).probs, atol=1e-6)
    with pytest.raises(ConfigError, match="laplace.factors"):
        load_config(None, ["laplace.factors=a"])


def test_laplace_ensemble_provides_the_laplace_row_of_the_same_fit(trained_members, tiny_data,
                                                                   tiny_session_config):
    cfg = fast(tiny_session_config)
    batch = first_batch(trained_members[0], tiny_data.test)
    views = build("laplace_ensemble", trained_members, tiny_data, cfg).predict_views(batch)
    single = build("laplace", trained_members, tiny_data, cfg).predict_batch(batch)
    assert set(views) == {"laplace", "laplace_ensemble"}
    assert torch.allclose(views["laplace"].probs, single.probs, atol=1e-6)
    assert torch.allclose(views["laplace"].mutual_information, single.mutual_information, atol=1e-6)
