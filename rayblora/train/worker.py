"""The Ray Train per-worker function of one member: build the model from the config, train, report.

Everything the worker needs travels in its `train_loop_config` (DESIGN rule 1): the full config as a dict,
the member index and its seed. Checkpoints hold the adapter, optimizer, scheduler, step and hook state, so a
restarted worker resumes exactly where the last checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any

import torch

from rayblora.config import Config, config_from_dict
from rayblora.data.sources import load_task_data
from rayblora.scoring import build_scorer
from rayblora.train.faults import injected_hooks
from rayblora.train.loop import LoopContext, TrainerState, nan_safe, train_member


def member_seed(cfg: Config, member: int) -> int:
    """Seed of member `member` (LoRA init and data order)."""
    return cfg.train.seed + 1000 * member


def make_hooks(cfg: Config) -> list:
    """Per-step hooks the posterior family needs during training (e.g. SWAG moment collection)."""
    from rayblora.posteriors import get_posterior_class

    factory = getattr(get_posterior_class(cfg.posterior.method), "training_hooks", None)
    return list(factory(cfg)) if factory is not None else []


def member_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` for one member run (called by Ray Train on every worker)."""
    import ray.train

    cfg = config_from_dict(config["config"])
    member = int(config["member"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    test_hooks = injected_hooks(config, member, rank, ray.get_runtime_context().get_node_id())  # tests only
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    seed = member_seed(cfg, member)
    torch.manual_seed(seed)
    data = load_task_data(cfg.data)
    model_cfg = cfg.model
    if cfg.cluster.use_gpu:  # the GPU Ray Train assigned to this worker
        import ray.train.torch

        model_cfg = dataclasses.replace(cfg.model, device=str(ray.train.torch.get_device()))
    scorer = build_scorer(model_cfg, cfg.adapter, data.spec, cfg.data.max_length, seed=seed)

    def on_checkpoint(step: int, metrics: dict[str, float], state: TrainerState) -> None:
        clean = nan_safe(metrics)
        with tempfile.TemporaryDirectory() as d:
            state.save(d, clean, primary=rank == 0)  # every rank: ZeRO shards and gathers are collective
            has_files = any(os.scandir(d))
            ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)

    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume_dir = tempfile.mkdtemp(prefix="rayblora-resume-")
        with checkpoint.as_directory() as d:
            shutil.copytree(d, resume_dir, dirs_exist_ok=True)
    loop_ctx = LoopContext(seed=seed, rank=rank, world_size=world, hooks=make_hooks(cfg) + test_hooks,
                           on_checkpoint=on_checkpoint, label=f"member {member} rank {rank}",
                           resume_dir=resume_dir, use_gpu=cfg.cluster.use_gpu)
    try:
        train_member(scorer, data.train, data.validation, cfg.train, loop_ctx)
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
