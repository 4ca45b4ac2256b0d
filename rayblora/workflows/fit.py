"""`rayblora fit`: fit a post-hoc posterior (Laplace-LoRA, TFB) onto an existing artifact's members, as a new artifact.

TFB (arXiv 2412.05723) needs forward passes over the validation split only (`fit_posterior`); the rest of this
module is the Laplace fit.

Laplace-LoRA (arXiv 2308.13111) is post-hoc: the members are already trained, and the curvature costs about
one pass over the training data per fitted member. With `laplace.fit_workers: 0` that pass runs in this process;
with n > 0 it runs as one Ray Train run of n workers: each worker loads the artifact, takes every n-th batch of
the training split (:func:`rayblora.posteriors.laplace.fit_curvature`), and the workers sum their Kronecker
factors, diagonals, counts and log-likelihoods with an all-reduce over the run's process group
(:meth:`LoraCurvature.sum_`). Rank 0 reports the summed curvature as a checkpoint; the driver eigendecomposes it,
chooses the prior precision and writes the artifact atomically. The workers read the parent artifact from its
path, so on a multi-node cluster it must lie on storage every node sees.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import ray.train
import torch
import torch.distributed as dist
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file, save_file

from rayblora.artifact import load_posterior, save_derived
from rayblora.config import Config, ConfigError, config_from_dict
from rayblora.data.trained_splits import artifact_data
from rayblora.manifest import read_manifest
from rayblora.posteriors.laplace import fit_curvature, laplace_sites
from rayblora.posteriors.laplace.kfac import LoraCurvature
from rayblora.registry import get_posterior_class, post_hoc_methods
from rayblora.workflows.members import trunk_cache_for
from rayblora.workflows.runtime import ensure_ray
from rayblora.workflows.train import fit_feature_density


def post_hoc_method(cfg: Config, n_members: int, method: str | None = None) -> str:
    """The family to fit: `method`, else `posterior.method` if it is post-hoc, else `laplace_ensemble` for
    several members and `laplace` for one (:func:`rayblora.registry.post_hoc_methods`)."""
    families = post_hoc_methods()
    chosen = method or (cfg.posterior.method if cfg.posterior.method in families else
                        ("laplace_ensemble" if n_members > 1 else "laplace"))
    if chosen not in families:
        raise ConfigError(f"fit --method: must be one of {list(families)}, got {chosen!r}")
    return chosen


def _parent_and_data(artifact_dir: str | Path, cfg: Config, log: Callable[[str], None]):
    """The parent artifact (reading the run's trunk cache) and the splits it was trained on."""
    parent = load_posterior(artifact_dir)
    parent.scorer.use_trunk_cache(trunk_cache_for(cfg, parent.scorer, log))
    return parent, artifact_data(artifact_dir, cfg.data, log)  # scored under the artifact's spec (refused if not)


def fit_density(artifact_dir: str | Path, cfg: Config, out_dir: str | Path | None = None,
                log: Callable[[str], None] = print) -> Path:
    """`rayblora fit --density`: the artifact `artifact_dir` (any family, trained, imported or fitted) with its
    members' feature density fitted on the rows it was trained on, written to `out_dir` (default
    `<output.dir>/posterior-density`) with its lineage."""
    parent, data = _parent_and_data(artifact_dir, cfg, log)
    try:
        fit_feature_density(parent, cfg, data, log, required=True)
    except ValueError as exc:
        raise ConfigError(f"fit --density: {exc}") from None
    return save_derived(parent, artifact_dir, out_dir or cfg.out_dir / "posterior-density")


def fit_posterior(artifact_dir: str | Path, cfg: Config, out_dir: str | Path | None = None,
                  method: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Fit the post-hoc family `method` (:func:`~rayblora.registry.post_hoc_methods`) on the members of
    `artifact_dir`; write the new artifact (with its lineage and the parent's feature density) to `out_dir`, by
    default `<output.dir>/posterior-<the family fitted>`."""
    parent = read_manifest(artifact_dir)
    chosen = post_hoc_method(cfg, len(parent["members"]), method)
    out_dir = out_dir or cfg.out_dir / f"posterior-{chosen}"
    if get_posterior_class(chosen).post_hoc == "curvature":
        return fit_laplace(artifact_dir, cfg, out_dir, chosen, log)
    parent_post, data = _parent_and_data(artifact_dir, cfg, log)
    t0 = time.time()
    post = parent_post.view(chosen, data=data, config=cfg)
    log(f"[fit] {chosen} on {len(post.members)} member(s): {time.time() - t0:.1f} s")
    return save_derived(post, artifact_dir, out_dir)


def fit_laplace(artifact_dir: str | Path, cfg: Config, out_dir: str | Path, method: str | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Fit `laplace` / `laplace_ensemble` on the members of the artifact `artifact_dir`; write it to `out_dir`."""
    parent, data = _parent_and_data(artifact_dir, cfg, log)
    chosen = post_hoc_method(cfg, len(parent.members), method)
    cls = get_posterior_class(chosen)
    if cls.post_hoc != "curvature":
        laplace = [m for m in post_hoc_methods() if get_posterior_class(m).post_hoc == "curvature"]
        raise ConfigError(f"fit --method: the Laplace fit takes one of {laplace}, got {chosen!r}")
    members = cls.fitted_members(len(parent.members))
    t0 = time.time()
    if cfg.laplace.fit_workers > 0:
        curvatures = distributed_curvatures(artifact_dir, cfg, parent.scorer, members, log)
    else:
        curvatures = {i: fit_curvature(parent.scorer, parent.members[i], data.train, cfg.laplace,
                                       cfg.train.batch_size) for i in members}
    curvature_seconds = time.time() - t0
    meta = {"workers": cfg.laplace.fit_workers or 1, "curvature_seconds": round(curvature_seconds, 2),
            "n_data": curvatures[members[0]].n_data}
    post = cls.from_curvatures(parent.scorer, parent.members, parent.member_info, curvatures, cfg,
                               data.validation, fit_meta=meta)
    post.density = parent.density
    meta["seconds"] = round(time.time() - t0, 2)
    log(f"[fit] {cls.method} on {len(members)} member(s), {meta['n_data']} examples, {meta['workers']} worker(s): "
        f"{meta['seconds']:.1f} s; prior precision {[f.prior.tolist() for f in post.fits]}")
    return save_derived(post, artifact_dir, out_dir)


# --- the Ray Train path ----------------------------------------------------------------------------------------
def _curvature_file(member: int) -> str:
    return f"curvature_{member}.safetensors"


def laplace_fit_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: this worker's shard of the curvature pass, summed over all workers."""
    cfg = config_from_dict(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    posterior = load_posterior(config["artifact"])
    posterior.scorer.use_trunk_cache(trunk_cache_for(cfg, posterior.scorer))
    data = artifact_data(config["artifact"], cfg.data)
    summed = {}
    for i in config["members"]:
        curv = fit_curvature(posterior.scorer, posterior.members[i], data.train, cfg.laplace,
                             cfg.train.batch_size, rank, world)
        if world > 1:
            curv.sum_(dist.all_reduce, rank, world)
        summed[i] = curv
    metrics = {"n_data": summed[config["members"][0]].n_data}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            for i, curv in summed.items():
                tensors = {k: v.contiguous() for k, v in curv.state_tensors().items()}
                save_file(tensors, str(Path(d) / _curvature_file(i)))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def distributed_curvatures(artifact_dir, cfg: Config, scorer, members: list[int],
                           log: Callable[[str], None] = print) -> dict[int, LoraCurvature]:
    """Run the curvature pass as one Ray Train run of `laplace.fit_workers` workers; the summed curvatures."""
    ensure_ray(cfg.cluster)
    storage = cfg.cluster.storage_path or str(cfg.out_dir.resolve() / "ray_runs")
    trainer = TorchTrainer(
        laplace_fit_loop,
        train_loop_config={"config": cfg.to_dict(), "artifact": str(Path(artifact_dir).resolve()),
                           "members": list(members)},
        scaling_config=ScalingConfig(num_workers=cfg.laplace.fit_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.output.name}-laplace-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)))
    log(f"[fit] curvature pass on {cfg.laplace.fit_workers} Ray Train worker(s)")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("the Laplace curvature run finished without a checkpoint")
    out = {}
    with result.checkpoint.as_directory() as d:
        for i in members:
            curv = LoraCurvature(laplace_sites(scorer.model, cfg.laplace), cfg.laplace.structure,
                                 cfg.laplace.hessian, cfg.laplace.low_rank_threshold, cfg.laplace.low_rank)
            curv.load_state_tensors(load_file(str(Path(d) / _curvature_file(i))))
            out[i] = curv
    return out
