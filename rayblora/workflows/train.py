"""Training a posterior end to end (the steps behind `rayblora train` / `demo` and `jobs/train_ensemble.py`):
check the task and model on the driver, train the members (Ray Train runs, or in this process), build the
family, write the artifact, and optionally evaluate it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rayblora.artifact import save_posterior
from rayblora.config import Config
from rayblora.data.sources import TaskData, load_task_data
from rayblora.data.trained_splits import split_record
from rayblora.posteriors import Posterior
from rayblora.registry import get_posterior_class
from rayblora.scoring import AnswerScorer, build_scorer
from rayblora.workflows.evaluate import evaluate_artifact
from rayblora.workflows.members import (MemberResult, best_adapter, check_member_adapter, make_hooks,
                                        prepare_trunk_cache, train_members_in_process, trunk_cache_for)


def fit_feature_density(posterior: Posterior, cfg: Config, data: TaskData, log: Callable[[str], None] = print,
                        required: bool = False) -> None:
    """Fit `posterior.density` on the training and validation rows (:meth:`Posterior.fit_density`), logging its
    cost; where the family or task has none, log why (or raise ValueError if `required`)."""
    t0, scorer = time.time(), posterior.scorer
    cache = scorer.trunk_cache
    if cache is None:  # the driver of a Ray run filled the run's cache for its workers: read it here too
        scorer.use_trunk_cache(trunk_cache_for(cfg, scorer, log, make_hooks(cfg)))
    try:
        density = posterior.fit_density(data.train, data.validation, cfg.posterior.density_quantile,
                                        cfg.train.batch_size, cfg.posterior.density_features)
    except ValueError as exc:
        if required:
            raise
        log(f"[density] not fitted: {exc}")
        return
    finally:
        scorer.use_trunk_cache(cache)
    density.meta["seconds"] = round(time.time() - t0, 2)
    log(f"[density] {density.features} features, fitted on {density.meta['rows']} training rows x "
        f"{len(density.means)} Gaussian(s) in "
        f"{density.meta['seconds']:.1f} s; in-distribution up to distance {density.threshold:.2f} "
        f"({density.quantile:.0%} of {density.meta['validation_rows']} validation rows)")


def write_posterior(cfg: Config, scorer: AnswerScorer, members: Sequence[MemberResult], data: TaskData,
                    training: dict[str, Any], lineage: dict[str, Any] | None = None,
                    family: type[Posterior] | None = None, log: Callable[[str], None] = print) -> Path:
    """Build the configured family from finished members (their checkpoints where the family needs them), fit
    its feature density (`posterior.density`), and write it as the artifact `<output.dir>/posterior`."""
    family = family or get_posterior_class(cfg.posterior.method)
    checkpoints = {"member_dirs": [m.checkpoint_dir for m in members]} if family.needs_checkpoints else {}
    early = cfg.posterior.member_adapter == "best"
    adapters = [best_adapter(m.checkpoint_dir) if early else m.adapter for m in members]
    posterior = family.build(scorer, adapters, [{**m.info(), "adapter": cfg.posterior.member_adapter}
                                                for m in members], data=data, config=cfg, **checkpoints)
    if cfg.posterior.density:
        fit_feature_density(posterior, cfg, data, log)
    return save_posterior(posterior, cfg.out_dir / "posterior", model_config=cfg.model,
                          adapter_config=cfg.adapter, training=training, lineage=lineage)


def train(cfg: Config, log: Callable[[str], None] = print, extra: dict[str, Any] | None = None,
          lineage: dict[str, Any] | None = None, in_process: bool = False) -> Path:
    """Train the configured posterior's members and write the artifact `<output.dir>/posterior`.

    The data, base model, adapter targets, answer tokens and the family's training hooks are checked on the
    driver first, so a bad config or file fails before any cluster work. Members are Ray Train runs, or, with
    `in_process`, trained one after another in this process (no Ray). If members fail for good, the posterior
    is built from the survivors when `posterior.min_members` allows it (the manifest's `training` says which),
    else `TrainingError` is raised and no artifact is written. `extra` goes to every member's
    train_loop_config (tests: `rayblora.train.faults`). `lineage` goes into the manifest (e.g. the parent
    artifact of a dynamic fine-tuning round, :mod:`rayblora.workflows.rounds`).
    """
    t0 = time.time()
    data = load_task_data(cfg.data)
    log(f"[train] task {cfg.data.task}: {len(data.train)} train / {len(data.validation)} val / "
        f"{len(data.test)} test; shifts {list(data.shifts)}; answers {list(data.spec.choices)}")
    family = get_posterior_class(cfg.posterior.method)
    make_hooks(cfg, family)  # the family's training hooks validate their config here, before any cluster work
    check_member_adapter(cfg, family)
    if in_process:
        scorer, members = train_members_in_process(cfg, log, data)
        record: dict[str, Any] = {"in_process": True}
    else:
        scorer = build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length)  # fails before Ray work
        prepare_trunk_cache(cfg, scorer, data, log)  # the members' workers read the frozen layers' output
        from rayblora.workflows.coordinator import run_members  # deferred: Ray, which in-process training never needs
        outcome = run_members(cfg, log, extra)
        members, record = outcome.members, outcome.summary()
    training = {"config": cfg.to_dict(), "seconds": round(time.time() - t0, 1), **record,
                "splits": split_record(data)}
    path = write_posterior(cfg, scorer, members, data, training, lineage, family, log)
    log(f"[train] wrote {cfg.posterior.method} posterior with {len(members)} member(s) to {path} "
        f"({time.time() - t0:.0f} s)")
    return path


def train_and_evaluate(cfg: Config, log: Callable[[str], None] = print, in_process: bool = False) -> dict:
    """Train (on Ray, or with `in_process` in this process), then evaluate every `posterior.eval_methods` row;
    prints the markdown table."""
    return evaluate_artifact(train(cfg, log, in_process=in_process), cfg, log=log)
