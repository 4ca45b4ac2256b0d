"""Generated-answer uncertainty benchmark: does the posterior know when its generated answer is wrong?

    .venv/bin/python benchmarks/generation.py --config jobs/configs/triviaqa.yaml --seeds 0,1,2 \
        [--out runs/generation-bench] [--n-boot 1000] [--json benchmarks/results/generation.json] \
        [--cells benchmarks/results/campaign/triviaqa/seed --commit] [overrides ...]

The config's task is a generation task: TriviaQA by default (`rayblora assets fetch --tasks triviaqa`), any
`prompt` + `target` file, or a BIG-bench task for those who have its release (`--bigbench-task NAME` turns one into
a file under `--out`, never into the repository).
Each seed s trains the config's K members in this process (`data.seed = train.seed = s`: a new training subset,
test split, LoRA init and data order) and writes the artifact; then on the test split:

* `ensemble` (the K members, S = K states) decodes greedily by the Bayesian model average: its answers and
  their token MI / entropy / sequence NLL; the K members' own greedy answers (one per-state pass) give its
  group entropy and modal share, and each member alone (`member<k>`: a single adapter's answers with its own
  token entropy and sequence NLL);
* `map` (member 0, S = 1) decodes by the same BMA path, timed against the ensemble.

Reported: exact match of each, and per uncertainty score the AUROC of ranking wrong answers above right ones,
AURC and PRR (seed means); the paired-bootstrap 95 % interval of AUROC(posterior's score) − AUROC(single
adapter's mean token entropy, averaged over the K members alone), rows resampled within each seed; throughput
of S = K states vs one adapter in the same run (tokens/s, prefill included), with the load average. A seed's
per-row results are a cell (:mod:`cells`: `<--cells>/seed<s>.npz`, else `<out>/seed<s>/generation.npz`, with the
config and decoding digest), so a rerun resumes at the first unfinished seed and reruns a seed whose config changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cells import commit_cell, read_cell, write_cell
from record import BenchmarkRecord
from rayblora.artifact import load_posterior, open_artifact
from rayblora.bigbench import bigbench_path
from rayblora.config import Config, config_from_dict, load_config
from rayblora.data.sources import split_name
from rayblora.data.trained_splits import artifact_data
from rayblora.generation.answers import exact_match
from rayblora.generation.decode import DecodingSettings
from rayblora.generation.evaluation import detection_metrics, paired_difference
from rayblora.manifest import write_json_atomic, write_text_atomic
from rayblora.workflows.generation import answer_split
from rayblora.workflows.members import config_digest, trunk_cache_for
from rayblora.workflows.train import train

POSTERIOR_SCORES = ("mean_token_mi", "max_token_mi", "mean_token_entropy", "sequence_nll", "group_entropy")
TARGET_AUROC_GAIN, TARGET_SPEED_RATIO = 0.05, 2.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def bigbench_task_file(name: str, out: Path, template: str, subtasks: str = "") -> Path:
    """`<out>/<name>.jsonl`: the BIG-bench parquet's rows (of `subtasks`, comma-separated, if given) as
    {"prompt": template with BIG-bench's own rendering as {query}, "target": " " + target, "targets": [...]}."""
    rows = pq.read_table(bigbench_path(name), columns=["query", "target", "targets", "subtask"]).to_pylist()
    keep = {s.strip() for s in subtasks.split(",") if s.strip()}
    rows = [r for r in rows if not keep or r["subtask"] in keep]
    path = out / f"{name}.jsonl"
    write_text_atomic(path, "".join(json.dumps({"prompt": template.replace("{query}", r["query"].strip()),
                                                "target": " " + r["target"].strip(), "targets": r["targets"]})
                                    + "\n" for r in rows))
    return path


def seed_config(args, seed: int) -> Config:
    out = Path(args.out) / f"seed{seed}"
    task = [f"data.task={args.task_file}"] if args.task_file else []
    return load_config(args.config, [*args.overrides, *task, f"data.seed={seed}", f"train.seed={seed}",
                                      f"output.dir={out}", f"output.name=generation-seed{seed}"])


def run_seed(cfg: Config, settings: DecodingSettings) -> dict[str, np.ndarray]:
    """Train (unless the artifact exists), decode the test split; per-row arrays: "<method>/correct" and
    "<method>/<score>" for map, ensemble and member<k> (each member alone, from the per-state pass)."""
    artifact = cfg.out_dir / "posterior"
    if not (artifact / "manifest.json").is_file():
        train(cfg, log, in_process=True)
    opened = open_artifact(artifact)
    data = artifact_data(opened, cfg.data, log)
    full = load_posterior(opened)
    full.scorer.use_trunk_cache(trunk_cache_for(cfg, full.scorer, log))
    prompts, targets = list(data.test["prompt"]), list(data.test["targets"])
    rows: dict[str, np.ndarray] = {}
    for method in ("map", "ensemble"):  # BMA decoding of S = 1 and S = K states: the timed pair
        result = answer_split(full.view(method), prompts, targets, settings, per_state=method == "ensemble")
        rows[f"{method}/correct"] = result.correct
        rows.update({f"{method}/{name}": values for name, values in result.scores.items()})
        rows[f"{method}/tokens"], rows[f"{method}/seconds"] = np.array(result.tokens), np.array(result.seconds)
        log(f"{method}: exact match {result.summary['exact_match']:.3f}, "
            f"{result.summary['tokens_per_second']:.1f} tokens/s")
    states = result.per_state  # the ensemble's: each member's own greedy answer
    for k in range(len(full.members)):
        rows[f"member{k}/correct"] = np.array([exact_match(g.samples[k], t) for g, t in zip(states, targets)])
        for name in ("mean_token_entropy", "sequence_nll"):
            rows[f"member{k}/{name}"] = np.array([g.state_scores[k][name] for g in states])
    alone = np.mean([rows[f"member{k}/correct"].mean() for k in range(len(full.members))])
    log(f"members alone: exact match {alone:.3f}")
    return rows


def cell_digest(config: dict, decoding: dict) -> str:
    """A seed's digest: what trains its members (the config's) and how their answers are decoded."""
    decoded = hashlib.sha256(json.dumps(decoding, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config_digest(config_from_dict(config))}-{decoded}"


def seed_rows(args, seed: int, settings: DecodingSettings) -> dict[str, np.ndarray]:
    """A seed's per-row arrays: its cell (`<--cells>/seed<s>.npz`, else `<out>/seed<s>/generation.npz`) where one
    was measured with this config, else a new run written there (and committed with `--commit`)."""
    cfg = seed_config(args, seed)
    path = Path(args.cells) / f"seed{seed}.npz" if args.cells else cfg.out_dir / "generation.npz"
    digest = cell_digest(cfg.to_dict(), vars(settings))
    kept = read_cell(path, digest, lambda meta: cell_digest(meta["config"], meta["decoding"]))
    if kept is not None:
        log(f"seed {seed}: kept results {path}")
        return as_rows(kept)
    record = BenchmarkRecord()
    rows = run_seed(cfg, settings)
    write_cell(path, rows, digest, record, seconds=time.time() - record.started, decoding=vars(settings),
               config=cfg.to_dict())
    if args.commit:
        commit_cell(path, f"{split_name(cfg.data.task)} generation seed {seed}")
    return as_rows(read_cell(path, digest))  # as stored: a rerun that finds this cell aggregates the same numbers


def as_rows(cell: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A cell's arrays as :func:`run_seed` returns them: "<method>/correct" boolean (a cell written before booleans
    were kept as they are holds them as 0 / 1 integers)."""
    return {k: v.astype(bool) if k.endswith("/correct") else v for k, v in cell.items()}


def _methods(rows: dict) -> list[str]:
    return sorted({k.split("/", 1)[0] for k in rows}, key=lambda m: (m.startswith("member"), m))


def summarise(per_seed: list[dict[str, np.ndarray]], n_boot: int) -> dict:
    """Seed means of exact match and of each score's detection metrics; the AUROC gain over the single adapter
    (each member alone, its mean token entropy) and the speed ratio."""
    out: dict = {"methods": {}}
    for method in _methods(per_seed[0]):
        names = sorted(k.split("/", 1)[1] for k in per_seed[0] if k.startswith(f"{method}/")
                       and k.split("/", 1)[1] not in ("correct", "tokens", "seconds"))
        scores = {n: {m: float(np.nanmean([detection_metrics(r[f"{method}/{n}"], r[f"{method}/correct"])[m]
                                           for r in per_seed])) for m in ("auroc", "aurc", "prr")} for n in names}
        out["methods"][method] = {"exact_match": float(np.mean([r[f"{method}/correct"].mean() for r in per_seed])),
                                  "exact_match_per_seed": [float(r[f"{method}/correct"].mean()) for r in per_seed],
                                  "n_per_seed": int(len(per_seed[0][f"{method}/correct"])), "scores": scores}
        if f"{method}/tokens" in per_seed[0]:
            out["methods"][method]["tokens_per_second"] = float(np.mean(
                [float(r[f"{method}/tokens"]) / float(r[f"{method}/seconds"]) for r in per_seed]))
    members = [m for m in _methods(per_seed[0]) if m.startswith("member")]
    single = [[(r[f"{m}/mean_token_entropy"], r[f"{m}/correct"]) for m in members] for r in per_seed]
    out["auroc_vs_single_adapter_entropy"] = {
        name: paired_difference([(r[f"ensemble/{name}"], r["ensemble/correct"]) for r in per_seed], single,
                                resamples=n_boot) for name in POSTERIOR_SCORES if f"ensemble/{name}" in per_seed[0]}
    out["exact_match_vs_single_adapter"] = paired_difference(
        [(r["ensemble/sequence_nll"], r["ensemble/correct"]) for r in per_seed], single, "exact_match", n_boot)
    best = max(out["auroc_vs_single_adapter_entropy"].items(), key=lambda kv: kv[1]["delta"])
    ratio = out["methods"]["map"]["tokens_per_second"] / out["methods"]["ensemble"]["tokens_per_second"]
    out["targets"] = {"best_posterior_score": best[0], "auroc_gain": best[1]["delta"],
                      "auroc_gain_interval": [best[1]["low"], best[1]["high"]],
                      "auroc_gain_met": best[1]["delta"] >= TARGET_AUROC_GAIN,
                      "slowdown_S_vs_1": ratio, "slowdown_met": ratio <= TARGET_SPEED_RATIO}
    return out


def markdown(task: str, summary: dict, states: int) -> str:
    lines = [f"### {task}: AUROC of wrong vs right generated answers (seed means)", "",
             "| method | exact match | score | AUROC | AURC | PRR |", "|---|---|---|---|---|---|"]
    for method, m in summary["methods"].items():
        for name, s in m["scores"].items():
            lines.append(f"| {method} | {m['exact_match']:.3f} | {name} | {s['auroc']:.3f} | {s['aurc']:.3f} | "
                         f"{s['prr']:.3f} |")
    lines += ["", "| posterior score | ΔAUROC vs the single adapter's mean token entropy | 95 % interval |",
              "|---|---|---|"]
    for name, d in summary["auroc_vs_single_adapter_entropy"].items():
        lines.append(f"| {name} | {d['delta']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] |")
    g = summary["exact_match_vs_single_adapter"]
    lines += ["", f"Exact match, ensemble − each member alone: {g['delta']:+.3f} "
              f"[{g['low']:+.3f}, {g['high']:+.3f}]."]
    t, m = summary["targets"], summary["methods"]
    lines += ["", f"Decoding: map {m['map']['tokens_per_second']:.1f} tokens/s, ensemble (S = {states}) "
              f"{m['ensemble']['tokens_per_second']:.1f} tokens/s: {t['slowdown_S_vs_1']:.2f}× slower."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="jobs/configs/triviaqa.yaml")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/generation-bench")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--json", default="benchmarks/results/generation.json")
    parser.add_argument("--bigbench-task", default="", help="write this BIG-bench task's rows as the task file")
    parser.add_argument("--template", default="{query}", help="prompt around BIG-bench's rendering {query}")
    parser.add_argument("--subtasks", default="", help="only these BIG-bench subtasks (comma-separated)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--cells", default="", metavar="DIR",
                        help="keep each seed's rows as DIR/seed<s>.npz + .json (a committed campaign cell, e.g. "
                             "benchmarks/results/campaign/triviaqa/seed)")
    parser.add_argument("--commit", action="store_true", help="git-commit each cell as it is written")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.test_size=500")
    args = parser.parse_args()
    record = BenchmarkRecord()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.task_file = str(bigbench_task_file(args.bigbench_task, Path(args.out), args.template, args.subtasks)) \
        if args.bigbench_task else ""
    settings = DecodingSettings(max_new_tokens=args.max_new_tokens)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = [seed_rows(args, s, settings) for s in seeds]
    cfg = seed_config(args, seeds[0])
    summary = summarise(per_seed, args.n_boot)
    task = args.bigbench_task or split_name(cfg.data.task)
    write_json_atomic(Path(args.json), {"meta": {**record.meta(), "seeds": seeds, "config": args.config,
                                                 "overrides": args.overrides, "task": task,
                                                 "members": cfg.posterior.members}, **summary}, allow_nan=True)
    text = markdown(task, summary, cfg.posterior.members)
    write_text_atomic(Path(args.json).with_suffix(".md"), text)
    print(text)
    print(json.dumps(summary["targets"], indent=1))


if __name__ == "__main__":
    main()
