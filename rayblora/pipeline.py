"""End-to-end steps shared by the CLI and the `ray job submit` entry points: train -> artifact -> report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from rayblora.artifact import save_posterior
from rayblora.config import Config
from rayblora.coordinator import run_members
from rayblora.data.sources import load_task_data
from rayblora.posteriors import get_posterior_class
from rayblora.scoring import build_scorer
from rayblora.train.worker import make_hooks


def train(cfg: Config, log: Callable[[str], None] = print, extra: dict[str, Any] | None = None,
          lineage: dict[str, Any] | None = None) -> Path:
    """Train the configured posterior's members on Ray and write the artifact `<output.dir>/posterior`.

    The data, base model, adapter targets and answer tokens are checked on the driver first, so a bad
    config or file fails before any cluster work. If members fail for good, the posterior is built from the
    survivors when `posterior.min_members` allows it (the manifest's `training` says which), else
    `TrainingError` is raised and no artifact is written. `extra` goes to every member's train_loop_config
    (tests: `rayblora.train.faults`). `lineage` goes into the manifest (e.g. the parent artifact of a
    dynamic fine-tuning round, :mod:`rayblora.rounds`).
    """
    t0 = time.time()
    data = load_task_data(cfg.data)
    scorer = build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length)
    log(f"[train] task {cfg.data.task}: {len(data.train)} train / {len(data.validation)} val / "
        f"{len(data.test)} test; shifts {list(data.shifts)}; answers {list(data.spec.choices)}")
    cls = get_posterior_class(cfg.posterior.method)
    make_hooks(cfg)  # the family's training hooks validate their config here, before any cluster work
    outcome = run_members(cfg, log, extra)
    members = outcome.members
    checkpoints = {"member_dirs": [m.checkpoint_dir for m in members]} if cls.needs_checkpoints else {}
    posterior = cls.build(scorer, [m.adapter for m in members], [m.info() for m in members],
                          data=data, config=cfg, **checkpoints)
    training = {"config": cfg.to_dict(), "seconds": round(time.time() - t0, 1), **outcome.summary()}
    path = save_posterior(posterior, cfg.out_dir / "posterior", model_config=cfg.model,
                          adapter_config=cfg.adapter, training=training, lineage=lineage)
    log(f"[train] wrote {cls.method} posterior with {len(members)} member(s) to {path} "
        f"({time.time() - t0:.0f} s)")
    return path


def train_and_evaluate(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Train, then evaluate every `posterior.eval_methods` row; prints the markdown table."""
    from rayblora.evaluate import evaluate
    from rayblora.report import render_markdown

    path = train(cfg, log)
    report = evaluate(path, cfg, log=log)
    log(render_markdown(report))
    log(f"[report] {cfg.out_dir}/report.json, report.md, reliability.png, coverage.png")
    return report
