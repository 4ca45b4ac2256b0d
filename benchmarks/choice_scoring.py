"""Letter vs option-likelihood scoring of one multiple-choice task, side by side: one adapter (map) trained and
evaluated per scoring on the same rows and seed, accuracy / NLL / ECE with paired-bootstrap 95 % intervals of the
difference to letter scoring (issue: multiple choice by option likelihood).

    .venv/bin/python benchmarks/choice_scoring.py --task arc_easy [overrides ...]

The task is a built-in multiple-choice task (`rayblora assets fetch --tasks arc_easy`), a multiple-choice file, or
a BIG-bench task extracted into the user's cache (`rayblora assets fetch --bigbench-choice --bigbench-choice-tasks
TASK`, from its release); the regime is jobs/configs/choice.yaml's, with one member. Writes
benchmarks/results/choice_scoring_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from record import BenchmarkRecord
from rayblora import bigbench
from rayblora.comparison import paired_bootstrap, row_metric
from rayblora.config import CHOICE_SCORINGS, load_config
from rayblora.data import load_task_data
from rayblora.data.sources import QA_TASKS
from rayblora.posteriors.ensemble import EnsemblePosterior
from rayblora.report import SplitResult
from rayblora.scoring import build_scorer
from rayblora.workflows.members import train_one_member


def one_scoring(config: str, task_path: str, scoring: str, overrides: list[str], out: str,
                zero_shot: bool = False) -> tuple[SplitResult, dict]:
    """Train one adapter with `scoring` (with `zero_shot`, none: LoRA's B = 0 leaves the base model) and predict
    the test split: (its SplitResult, seconds and split sizes)."""
    cfg = load_config(config, [f"data.task={task_path}", f"data.choice_scoring={scoring}", "posterior.members=1",
                               "posterior.method=ensemble", f"output.dir={out}/{scoring}", *overrides])
    data = load_task_data(cfg.data)
    started = time.time()
    if zero_shot:
        scorer = build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length, seed=0)
    else:
        scorer = train_one_member(cfg, 0, data=data, log=lambda m: print(f"[{scoring}] {m}", flush=True)).scorer
    trained = time.time()
    post = EnsemblePosterior(scorer, [scorer.adapter_state()], [{}])
    pred = post.predict_dataset(data.test)
    result = SplitResult(pred.probs.numpy(), np.asarray(data.test["label"]), pred.entropy.numpy(),
                         pred.mutual_information.numpy())
    chance = float(np.mean(1.0 / np.asarray(data.test["num_choices"])))
    return result, {"train_s": round(trained - started, 1), "evaluate_s": round(time.time() - trained, 1),
                    "chance_accuracy": chance, "train_rows": len(data.train), "test_rows": len(data.test)}


def task_source(task: str) -> str:
    """`data.task` for `task`: a built-in task or a file as given, else the extracted BIG-bench task's file."""
    if task in QA_TASKS or Path(task).exists():
        return task
    return str(bigbench.ensure_bigbench([], choice_tasks=[task])[f"choice/{task}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="arc_easy", help="a built-in multiple-choice task, a file, or an "
                        "extracted BIG-bench multiple-choice task")
    parser.add_argument("--config", default="jobs/configs/choice.yaml")
    parser.add_argument("--scorings", default=",".join(reversed(CHOICE_SCORINGS)))
    parser.add_argument("--out", default="runs/choice-scoring")
    parser.add_argument("--json", default="", help="default: benchmarks/results/choice_scoring_<task>.json")
    parser.add_argument("--zero-shot", action="store_true", help="no training: the base model under each scoring")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=80")
    args = parser.parse_args()
    record = BenchmarkRecord()
    task_path = task_source(args.task)
    results, info = {}, {}
    for scoring in args.scorings.split(","):
        results[scoring], info[scoring] = one_scoring(args.config, task_path, scoring, args.overrides, args.out,
                                                      args.zero_shot)
    reference = next(iter(results))
    deltas = paired_bootstrap({m: [r] for m, r in results.items()}, reference=reference)
    figures = {"task": args.task, "reference": reference, "zero_shot": args.zero_shot,
               "scorings": {m: {**info[m], **{k: row_metric(r, k) for k in ("accuracy", "nll", "ece")},
                                "vs_" + reference: deltas[m]} for m, r in results.items()}}
    default = f"benchmarks/results/choice_scoring_{Path(args.task).stem}{'_zero_shot' if args.zero_shot else ''}.json"
    record.write(args.json or default, figures)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
