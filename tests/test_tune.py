"""Ray Tune sweeps: the search space and its errors, the model-free prior cache (against the Laplace posterior),
a 4-value prior sweep into a new artifact, and a 3-trial train sweep with ASHA that resumes."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rayblora.artifact import load_posterior
from rayblora.config import ConfigError, dump_config, load_config
from rayblora.workflows.sweeps.space import check_space, flatten, parse_space, param_space

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _space_error(cfg, space: dict) -> str:
    with pytest.raises(ConfigError) as info:
        check_space(cfg.to_dict(), parse_space(space))
    return str(info.value)


def test_search_space_errors_name_the_field(tiny_config):
    assert _space_error(tiny_config, {"train.lrr": {"loguniform": [1e-4, 1e-2]}}).startswith("train.lrr: unknown")
    assert "trian.lr" in _space_error(tiny_config, {"trian.lr": 1e-3})
    assert _space_error(tiny_config, {"adapter.rank": {"loguniform": [2, 16]}}).startswith(
        "adapter.rank: an integer field")
    assert _space_error(tiny_config, {"adapter.rank": {"choice": [4, 0]}}).startswith("adapter.rank: must be >= 1")
    assert _space_error(tiny_config, {"train.lr": {"loguniform": [0, 1e-2]}}).startswith("train.lr: loguniform")
    assert _space_error(tiny_config, {"train.lr": {"between": [1e-4, 1e-2]}}).startswith("train.lr: a distribution")
    assert _space_error(tiny_config, {"output.dir": "/tmp/x"}).startswith("output.dir: set by the sweep")
    assert _space_error(tiny_config, {"train.weight_decay": {"uniform": [-1.0, 0.1]}}).startswith(
        "train.weight_decay: must be >= 0")


def test_search_space_to_tune_and_back(tiny_config):
    from rayblora.workflows.sweeps import trial_config, with_report_cadence

    dims = parse_space({"adapter.rank": {"grid": [2, 4]}, "train.lr": {"loguniform": [1e-4, 1e-2]},
                        "train.steps": {"randint": [8, 12]}, "data.max_length": 32})
    check_space(tiny_config.to_dict(), dims)
    space = param_space(dims)
    assert space["adapter"]["rank"] == {"grid_search": [2, 4]} and space["data"]["max_length"] == 32
    assert space["train"]["steps"].upper == 13  # randint bounds are both included
    base = with_report_cadence(tiny_config, dims)
    assert base["train"]["checkpoint_every"] == base["train"]["eval_every"] == 2  # a quarter of the fewest steps
    sampled = {"adapter": {"rank": 4}, "train": {"lr": 3e-3, "steps": 9}, "data": {"max_length": 32}}
    assert flatten(sampled) == {"adapter.rank": 4, "train.lr": 3e-3, "train.steps": 9, "data.max_length": 32}
    cfg = trial_config(base, flatten(sampled), tiny_config.out_dir / "trials" / "t1")
    assert (cfg.adapter.rank, cfg.train.steps, cfg.output.dir) == (4, 9, str(tiny_config.out_dir / "trials/t1"))
    bad = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, eval_every=3,
                                                                     checkpoint_every=4))
    with pytest.raises(ConfigError, match="train.eval_every: must divide train.checkpoint_every"):
        with_report_cadence(bad, dims)


def test_sweep_cli_rejects_a_bad_space_before_any_ray_work(sentiment_files, tmp_path, capsys):
    from rayblora.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [1.0e-4, 1.0e-2]}\nadapter.ranks: {choice: [4, 8]}\n")
    args = ["sweep", "train", "--space", str(space), "--out", str(tmp_path / "sweep")]
    assert main(args + tiny_overrides(sentiment_files, tmp_path / "run")) == 2
    assert "adapter.ranks: unknown field" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


# --- the prior sweep ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def laplace_artifact(trained_members, tiny_data, tiny_session_config, tmp_path_factory):
    """A 2-member mixture of Laplaces on the tiny Llama (short curvature pass), saved as an artifact."""
    from rayblora.artifact import save_posterior
    from rayblora.posteriors import get_posterior_class

    scorer, states, infos = trained_members
    cfg = tiny_session_config
    cfg = dataclasses.replace(cfg, laplace=dataclasses.replace(cfg.laplace, fit_batches=4, link_samples=20,
                                                               prior_method="fixed", prior_precision=1.0))
    post = get_posterior_class("laplace_ensemble").build(scorer, states, infos, data=tiny_data, config=cfg)
    return save_posterior(post, tmp_path_factory.mktemp("lap") / "posterior", model_config=cfg.model,
                          adapter_config=cfg.adapter)


def test_prior_cache_equals_the_posterior_without_forward_passes(laplace_artifact, trained_members, tiny_data):
    from rayblora import metrics
    from rayblora.artifact import load_posterior
    from rayblora.posteriors.laplace.prior_cache import PriorCache

    scorer = trained_members[0]
    post = load_posterior(laplace_artifact, scorer=scorer)
    cache = PriorCache.from_posterior(post, tiny_data.validation, 16)
    assert cache.num_examples == len(tiny_data.validation) and len(cache.fits) == 2
    calls = []
    handle = scorer.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        arrays, meta = cache.to_arrays()
        for array in arrays.values():
            array.flags.writeable = False  # as the object store hands them to a trial
        shipped = PriorCache.from_arrays(arrays, meta)
        results = {delta: shipped.evaluate(delta) for delta in (0.01, 3.7)}
    finally:
        handle.remove()
    assert calls == []
    block = next(iter(meta["blocks"]))
    rotated = shipped.batches[1][0].blocks[block].rotated
    assert rotated.data_ptr() == arrays[f"m1.b0.{block}.rotated"].ctypes.data  # shared, not copied
    for delta, got in results.items():
        want = post.with_prior_precision(delta).predict_dataset(tiny_data.validation, batch_size=16).probs
        assert torch.allclose(shipped.probs(delta), want, atol=1e-6)
        labels = cache.labels.numpy()
        assert got["val_nll"] == pytest.approx(metrics.nll(want.double().numpy(), labels), rel=1e-5)
        assert got["val_accuracy"] == pytest.approx(metrics.accuracy(want.numpy(), labels))
        evidence = [f.log_marglik(torch.full((1,), delta)) for f in post.fits]
        assert got["log_marglik"] == pytest.approx(sum(evidence) / 2, rel=1e-6)
    assert results[0.01]["val_nll"] != pytest.approx(results[3.7]["val_nll"])


@pytest.mark.slow
def test_prior_sweep_writes_its_table_and_a_new_artifact(ray_session, laplace_artifact, tiny_session_config,
                                                         tmp_path):
    from rayblora.artifact import load_posterior
    from rayblora.manifest import sha256_file
    from rayblora.cli import main
    from rayblora.workflows.sweeps import sweep_prior

    parent_sha = sha256_file(laplace_artifact / "manifest.json")
    out = tmp_path / "sweep"
    result = sweep_prior(laplace_artifact, tiny_session_config, out, values=4, low=1e-3, high=1e3,
                         log=lambda _m: None)
    rows = list(csv.DictReader((out / "prior_sweep.csv").open()))
    assert [float(r["prior_precision"]) for r in rows] == pytest.approx([1e-3, 1e-1, 10.0, 1e3])
    assert all(r["status"] == "done" and float(r["val_ece"]) >= 0 for r in rows)
    assert (out / "prior_sweep.md").read_text().count("\n") == 6
    best = min(rows, key=lambda r: float(r["val_nll"]))
    assert result.best["prior_precision"] == pytest.approx(float(best["prior_precision"]))
    manifest = json.loads((out / "posterior" / "manifest.json").read_text())
    assert [f["prior_precision"] for f in manifest["family"]["fits"]] == [
        pytest.approx([float(best["prior_precision"])])] * 2
    sweep = manifest["lineage"]["prior_sweep"]
    assert sweep["select"] == "val_nll" and sweep["prior_precision"] == pytest.approx(float(best["prior_precision"]))
    assert manifest["lineage"]["parent_manifest_sha256"] == parent_sha
    assert sha256_file(laplace_artifact / "manifest.json") == parent_sha  # the parent is untouched
    loaded = load_posterior(out / "posterior")
    assert float(loaded.fits[0].prior) == pytest.approx(float(best["prior_precision"]))

    # the CLI reruns into the same --out: the finished trials are reused (Tuner.restore), chosen by evidence
    cfg_yaml = tmp_path / "cfg.yaml"
    cfg_yaml.write_text(dump_config(tiny_session_config))
    args = ["sweep", "prior", "--posterior", str(laplace_artifact), "--values", "4", "--min", "1e-3",
            "--max", "1e3", "--select", "marglik", "--out", str(out), "--config", str(cfg_yaml)]
    assert main(args) == 0
    by_evidence = max(rows, key=lambda r: float(r["log_marglik"]))
    manifest = json.loads((out / "posterior" / "manifest.json").read_text())
    assert manifest["lineage"]["prior_sweep"]["select"] == "marglik"
    assert manifest["lineage"]["prior_sweep"]["prior_precision"] == pytest.approx(
        float(by_evidence["prior_precision"]))
    assert len(list((out / "tune" / "prior_sweep").glob("prior_trial_*"))) == 4  # no new trials


# --- the train sweep ---------------------------------------------------------------------------------------------
def _sweep_train_cli(config: Path, space: Path, out: Path) -> subprocess.CompletedProcess:
    """`rayblora sweep train` in its own process with its own local Ray of the config's CPUs, as a user runs it
    (the trials' Ray Train runs then see only this sweep's resources, not what other tests left in the session
    Ray); trials at once as many as those CPUs hold."""
    cmd = [sys.executable, "-m", "rayblora.cli", "sweep", "train", "--config", str(config), "--space", str(space),
           "--out", str(out), "--num-samples", "1", "--ensemble", "1"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


LOCAL_RAY_PROBE = """
import ray
import ray.util.state
from rayblora.workflows.runtime import start_local_ray

start_local_ray(1)
list_nodes = ray.remote(lambda: len(ray.util.state.list_nodes()))
print("nodes", ray.get(list_nodes.remote()), ray.get_runtime_context().gcs_address)
"""


@pytest.mark.slow
def test_local_ray_workers_reach_their_own_state_api_beside_another_ray(ray_session):
    """Ray Train's placement-group cleaner runs the State API inside the cluster; beside a second local Ray
    (here the session's) it must still find its own, else ASHA-stopped trials leak their CPUs."""
    probe = subprocess.run([sys.executable, "-c", LOCAL_RAY_PROBE], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "nodes 1 " in probe.stdout and ray_session.get_runtime_context().gcs_address not in probe.stdout


@pytest.mark.slow
def test_train_sweep_stops_bad_trials_with_asha_and_resumes(ray_session, sentiment_files, tmp_path):
    """Beside another local Ray (the session's, as a notebook's on a laptop): the sweep's own Ray must still let
    Ray Train free the CPUs of the trials ASHA stops, or the later trials wait forever. Two 1-CPU member runs fill
    the 2 CPUs exactly, and both run at once: a trial's own driver holds no CPU."""
    cfg = load_config(None, tiny_overrides(sentiment_files, tmp_path / "run",
                                           **{"posterior.members": "1", "cluster.num_cpus": "2"}))
    config = tmp_path / "base.yaml"
    config.write_text(dump_config(cfg))
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [5.0e-3, 3.0e-3, 1.0e-7]}\nadapter.rank: 4\n")  # 2 at once: one waits
    out = tmp_path / "sweep"
    done = _sweep_train_cli(config, space, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "up to 2 trial(s) at once" in done.stdout + done.stderr
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed", "stopped (ASHA)"}
    stopped = [r for r in rows if r["status"] == "stopped (ASHA)"]
    assert all(int(r["step"]) < 20 for r in stopped)
    assert "1e-07" in [r["train.lr"] for r in stopped]  # the learning rate that cannot learn is stopped early
    assert all(int(r["step"]) == 20 for r in rows if r["status"] == "completed")
    assert "| trial | status | train.lr | step | val_nll |" in (out / "trials.md").read_text()
    best = load_config(out / "best.yaml")
    first = rows[0]
    assert first["status"] == "completed" and best.train.lr == pytest.approx(float(first["train.lr"]))
    assert float(first["val_nll"]) == min(float(r["val_nll"]) for r in rows if r["status"] == "completed")
    assert (best.adapter.rank, best.train.checkpoint_every, best.output.dir) == (4, 0, cfg.output.dir)
    assert (out / "best.yaml").read_text().startswith("# Best trial ")
    # --ensemble 1: the completed trials are the candidates, each its last checkpoint's adapter; greedy step 1
    # takes the one of lowest NLL on the whole validation split (a trial reports its rank-0 worker's shard)
    ensemble = load_posterior(out / "ensemble" / "posterior")
    manifest = json.loads((out / "ensemble" / "posterior" / "manifest.json").read_text())
    record, union = manifest["training"]["hyper_ensemble"], manifest["adapter"]
    alone = {c["name"]: c["val_nll"] for c in record["candidates"]}
    assert set(alone) == {r["trial"] for r in rows if r["status"] == "completed"}
    assert record["chosen"] == [min(alone, key=alone.get)] and ensemble.method == "map"  # one member: a map
    last = next(p.parent for p in (out / "trials" / record["chosen"][0]).rglob("state.json")
                if json.loads(p.read_text())["step"] == 20)
    own = load_file(str(last / "adapter.safetensors"))
    # the trial's scale alpha / rank over the artifact's: 1 where the trials share one LoRA config (kept as is)
    scale = (cfg.adapter.alpha / 4) / (union["alpha"] / union["rank"])
    for key, value in ensemble.members[0].items():
        torch.testing.assert_close(value, own[key] * (scale if "lora_B" in key else 1.0), rtol=1e-6, atol=0)

    # rerun (here in this process, on the session's Ray: no trial is left to run): restored, nothing retrained
    from rayblora.workflows.sweeps import sweep_train

    lines: list[str] = []
    again = sweep_train(load_config(config), space, out, max_concurrent=2, ensemble_size=1, log=lines.append)
    assert any("Tuner.restore" in line for line in lines) and again.rows[0]["trial"] == first["trial"]
    assert list(csv.DictReader((out / "trials.csv").open())) == rows
    space.write_text("train.lr: {grid: [5.0e-3, 1.0e-3]}\n")
    with pytest.raises(ConfigError, match="holds a sweep with another config, space or settings"):
        sweep_train(load_config(config), space, out, max_concurrent=2, ensemble_size=1, log=lines.append)


def test_train_sweep_refuses_a_member_run_the_cluster_cannot_hold(ray_session, tiny_config, tmp_path):
    from rayblora.workflows.sweeps import sweep_train

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {grid: [5.0e-3, 1.0e-3]}\n")
    too_big = dataclasses.replace(tiny_config, cluster=dataclasses.replace(tiny_config.cluster, cpus_per_worker=64))
    with pytest.raises(ConfigError, match="whole cluster has"):
        sweep_train(too_big, space, tmp_path / "sweep", log=lambda _m: None)
    assert not (tmp_path / "sweep" / "trials.csv").exists()
