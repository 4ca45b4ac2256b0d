"""Evaluating a posterior on a generation task (the steps behind `rayblora evaluate` of a generation artifact
and `benchmarks/generation.py`): decode the test prompts under each method, grade the answers by exact match,
and judge every sequence score as a detector of wrong answers (:mod:`rayblora.generation.evaluation`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rayblora.artifact import Artifact, load_posterior
from rayblora.config import Config
from rayblora.data.sources import TaskData, split_name
from rayblora.data.trained_splits import artifact_data
from rayblora.generation.decode import DecodingSettings, Generation
from rayblora.generation.evaluation import correctness, summarise, uncertainty_scores
from rayblora.manifest import write_json_atomic, write_text_atomic
from rayblora.posteriors import Posterior
from rayblora.report import to_jsonable
from rayblora.workflows.members import trunk_cache_for
from rayblora.workflows.views import buildable_methods

GROUP_SCORES = ("group_entropy", "modal_share", "num_groups")


@dataclasses.dataclass
class MethodAnswers:
    """One method's answers on a split: correct (N,), uncertainty scores {name: (N,)}, decoding cost, and the
    per-state answers behind its group scores (empty without a per-state pass)."""

    correct: np.ndarray
    scores: dict[str, np.ndarray]
    summary: dict
    tokens: int
    seconds: float
    per_state: list[Generation] = dataclasses.field(default_factory=list)


def answer_split(post: Posterior, prompts: Sequence[str], targets: Sequence[str], settings: DecodingSettings,
                 per_state: bool, batch_size: int = 16) -> MethodAnswers:
    """BMA answers of `post` (graded, with their token scores; the BMA decoding timed) and, with `per_state`
    and S > 1, the group scores of its per-state answers judged against the BMA answers' correctness."""
    t0 = time.time()
    answers = post.generate(prompts, settings, batch_size)
    seconds = time.time() - t0
    states = []
    if per_state and len(post.generation_states()) > 1:
        states = post.generate(prompts, dataclasses.replace(settings, mode="per_state"), batch_size)
    correct, tokens = correctness(answers, targets), sum(len(a.tokens) for a in answers)
    scores = {**uncertainty_scores(answers),
              **{k: v for k, v in uncertainty_scores(states).items() if k in GROUP_SCORES}}
    summary = summarise(correct, scores)
    summary.update(tokens_per_second=tokens / max(seconds, 1e-9), decode_seconds=round(seconds, 2))
    return MethodAnswers(correct, scores, summary, tokens, seconds, states)


def evaluate_generation(artifact: Artifact, cfg: Config, methods: Sequence[str] | None = None,
                        settings: DecodingSettings | None = None, data: TaskData | None = None,
                        log: Callable[[str], None] = print) -> dict[str, MethodAnswers]:
    """Each method's answers on the artifact's test split (its trained splits, :mod:`rayblora.data.
    trained_splits`): results[method]. Families without a generative form (temperature, hybrid:
    `Posterior.generative` False) are refused when named in `methods`, skipped with a log line when taken from
    `posterior.eval_methods` (:func:`~rayblora.workflows.views.buildable_methods`)."""
    methods = buildable_methods(artifact, methods, cfg.posterior.eval_methods, log)
    settings = settings or DecodingSettings(max_new_tokens=16)
    data = data or artifact_data(artifact, cfg.data, log)
    full = load_posterior(artifact)
    full.scorer.use_trunk_cache(trunk_cache_for(cfg, full.scorer, log))
    prompts, targets = list(data.test["prompt"]), list(data.test["targets"])
    results = {}
    for method in methods:
        post = full.view(method, data=data, config=cfg)
        log(f"[evaluate] {method}: decoding {len(prompts)} test prompts")
        results[method] = answer_split(post, prompts, targets, settings, per_state=True)
        s = results[method].summary
        log(f"[evaluate] {method}: exact match {s['exact_match']:.3f}, {s['tokens_per_second']:.1f} tokens/s")
    return results


def markdown_table(results: dict[str, MethodAnswers], task: str) -> str:
    """Exact match and AUROC (wrong vs right) of the main scores per method."""
    names = ("mean_token_entropy", "mean_token_mi", "max_token_mi", "sequence_nll", "group_entropy", "feature_distance")
    lines = [f"### {task}: generated answers", "",
             "| method | N | exact match | " + " | ".join(f"AUROC {n}" for n in names) + " | tokens/s |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for method, r in results.items():
        cells = [f"{r.summary['scores'][n]['auroc']:.3f}" if n in r.summary["scores"] else "–" for n in names]
        lines.append(f"| {method} | {r.summary['n']} | {r.summary['exact_match']:.3f} | " + " | ".join(cells)
                     + f" | {r.summary['tokens_per_second']:.1f} |")
    return "\n".join(lines) + "\n"


def evaluate_generation_report(artifact: Artifact, cfg: Config, out_dir: str | Path | None = None,
                               methods: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Evaluate a generation artifact and write generation_report.json / .md; returns the report."""
    t0 = time.time()
    results = evaluate_generation(artifact, cfg, methods, log=log)
    meta = {"artifact": str(artifact.root), "task": cfg.data.task, "eval_seconds": round(time.time() - t0, 1)}
    report = {"meta": meta, "methods": {m: r.summary for m, r in results.items()}}
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, split_name(cfg.data.task))
    write_json_atomic(out / "generation_report.json", to_jsonable(report))
    write_text_atomic(out / "generation_report.md", table)
    log(table)
    return report
