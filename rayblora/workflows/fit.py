"""`rayblora fit`: fit a post-hoc family onto an existing artifact's members, as a new artifact.

A family says how it is fitted (:attr:`Posterior.post_hoc`) and this module calls only its interface: "build" —
:meth:`Posterior.view` with the artifact's splits (TFB, arXiv 2412.05723: forward passes over the validation
split); "curvature" — one pass over the training split per fitted member (:meth:`Posterior.fitted_members`,
:meth:`Posterior.curvature_pass`), then :meth:`Posterior.from_curvatures` (Laplace-LoRA, arXiv 2308.13111:
eigendecompose, choose the prior precision). With `laplace.fit_workers: 0` the curvature pass runs in this
process; with n > 0 it runs as one Ray Train run of n workers: each worker loads the artifact, takes every n-th
batch of the training split, and the workers sum their curvatures with an all-reduce over the run's process group
(:meth:`Curvature.sum_`). Rank 0 reports the summed curvature as a checkpoint; the driver finishes the fit and
writes the artifact atomically. The workers read the parent artifact from its path, so on a multi-node cluster it
must lie on storage every node sees.
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

from rayblora.artifact import Artifact, load_posterior, open_artifact, save_derived
from rayblora.config import Config, ConfigError, config_from_dict
from rayblora.data.trained_splits import artifact_data
from rayblora.posteriors.base import Curvature
from rayblora.registry import get_posterior_class, post_hoc_methods
from rayblora.workflows.members import trunk_cache_for
from rayblora.workflows.runtime import ensure_ray
from rayblora.workflows.train import fit_feature_density
from rayblora.workflows.views import buildable_methods


def post_hoc_method(cfg: Config, n_members: int, method: str | None = None) -> str:
    """The family to fit: `method`, else `posterior.method` if it is post-hoc, else `laplace_ensemble` for
    several members and `laplace` for one (:func:`rayblora.registry.post_hoc_methods`)."""
    families = post_hoc_methods()
    chosen = method or (cfg.posterior.method if cfg.posterior.method in families else
                        ("laplace_ensemble" if n_members > 1 else "laplace"))
    if chosen not in families:
        raise ConfigError(f"fit --method: must be one of {list(families)}, got {chosen!r}")
    return chosen


def _parent_and_data(artifact: Artifact, cfg: Config, log: Callable[[str], None]):
    """The parent posterior (reading the run's trunk cache) and the splits it was trained on."""
    parent = load_posterior(artifact)
    parent.scorer.use_trunk_cache(trunk_cache_for(cfg, parent.scorer, log))
    return parent, artifact_data(artifact, cfg.data, log)  # scored under the artifact's spec (refused if not)


def fit_density(artifact_dir: str | Path, cfg: Config, out_dir: str | Path | None = None,
                log: Callable[[str], None] = print) -> Path:
    """`rayblora fit --density`: the artifact `artifact_dir` (any family, trained, imported or fitted) with its
    members' feature density fitted on the rows it was trained on, written to `out_dir` (default
    `<output.dir>/posterior-density`) with its lineage."""
    artifact = open_artifact(artifact_dir)
    parent, data = _parent_and_data(artifact, cfg, log)
    try:
        fit_feature_density(parent, cfg, data, log, required=True)
    except ValueError as exc:
        raise ConfigError(f"fit --density: {exc}") from None
    return save_derived(parent, artifact, out_dir or cfg.out_dir / "posterior-density")


def fit_posterior(artifact_dir: str | Path, cfg: Config, out_dir: str | Path | None = None,
                  method: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Fit the post-hoc family `method` (:func:`~rayblora.registry.post_hoc_methods`) on the members of
    `artifact_dir`; write the new artifact (with its lineage and the parent's feature density) to `out_dir`, by
    default `<output.dir>/posterior-<the family fitted>`."""
    artifact = open_artifact(artifact_dir)
    chosen = post_hoc_method(cfg, len(artifact.members), method)
    buildable_methods(artifact, [chosen], (), log)  # refused before the model loads
    out_dir = out_dir or cfg.out_dir / f"posterior-{chosen}"
    cls = get_posterior_class(chosen)
    if cls.post_hoc == "curvature":
        return _fit_by_curvature(artifact, cls, cfg, out_dir, log)
    parent_post, data = _parent_and_data(artifact, cfg, log)
    t0 = time.time()
    post = parent_post.view(chosen, data=data, config=cfg)
    log(f"[fit] {chosen} on {len(post.members)} member(s): {time.time() - t0:.1f} s")
    return save_derived(post, artifact, out_dir)


def _fit_by_curvature(artifact: Artifact, cls, cfg: Config, out_dir: str | Path,
                      log: Callable[[str], None]) -> Path:
    """Fit the curvature family `cls` (e.g. `laplace` / `laplace_ensemble`) on the members of `artifact`; write it
    to `out_dir`."""
    parent, data = _parent_and_data(artifact, cfg, log)
    members = cls.fitted_members(len(parent.members))
    t0 = time.time()
    if cfg.laplace.fit_workers > 0:
        curvatures = distributed_curvatures(cls, artifact, cfg, parent.scorer, members, log)
    else:
        curvatures = {i: cls.curvature_pass(parent.scorer, parent.members[i], data.train, cfg) for i in members}
    curvature_seconds = time.time() - t0
    meta = {"workers": cfg.laplace.fit_workers or 1, "curvature_seconds": round(curvature_seconds, 2),
            "n_data": curvatures[members[0]].n_data}
    post = cls.from_curvatures(parent.scorer, parent.members, parent.member_info, curvatures, cfg,
                               data.validation, fit_meta=meta)
    post.density = parent.density
    meta["seconds"] = round(time.time() - t0, 2)
    log(f"[fit] {cls.method} on {len(members)} member(s), {meta['n_data']} examples, {meta['workers']} worker(s): "
        f"{meta['seconds']:.1f} s; {post.fit_summary()}")
    return save_derived(post, artifact, out_dir)


# --- the Ray Train path ----------------------------------------------------------------------------------------
def _curvature_file(member: int) -> str:
    return f"curvature_{member}.safetensors"


def curvature_fit_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker`: this worker's shard of the curvature pass, summed over all workers."""
    cfg = config_from_dict(config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    artifact = open_artifact(config["artifact"])  # this worker's own read of the parent
    family = get_posterior_class(config["method"])
    posterior = load_posterior(artifact)
    posterior.scorer.use_trunk_cache(trunk_cache_for(cfg, posterior.scorer))
    data = artifact_data(artifact, cfg.data)
    summed = {}
    for i in config["members"]:
        curv = family.curvature_pass(posterior.scorer, posterior.members[i], data.train, cfg, rank, world)
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


def distributed_curvatures(family, artifact: Artifact, cfg: Config, scorer, members: list[int],
                           log: Callable[[str], None] = print) -> dict[int, Curvature]:
    """Run the curvature pass as one Ray Train run of `laplace.fit_workers` workers; the summed curvatures."""
    ensure_ray(cfg.cluster)
    storage = cfg.cluster.storage_path or str(cfg.out_dir.resolve() / "ray_runs")
    trainer = TorchTrainer(
        curvature_fit_loop,
        train_loop_config={"config": cfg.to_dict(), "artifact": str(artifact.root), "method": family.method,
                           "members": list(members)},
        scaling_config=ScalingConfig(num_workers=cfg.laplace.fit_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.output.name}-{family.method}-{uuid.uuid4().hex[:8]}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)))
    log(f"[fit] curvature pass on {cfg.laplace.fit_workers} Ray Train worker(s)")
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("the curvature run finished without a checkpoint")
    out = {}
    with result.checkpoint.as_directory() as d:
        for i in members:
            curv = family.empty_curvature(scorer, cfg)
            curv.load_state_tensors(load_file(str(Path(d) / _curvature_file(i))))
            out[i] = curv
    return out
