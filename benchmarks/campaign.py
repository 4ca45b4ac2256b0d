"""The measurement campaign: which posterior recipe beats a temperature, on three tasks, resumable until done.

    .venv/bin/python benchmarks/campaign.py run [--tasks vader,obqa,triviaqa] [--recipes seed,...] [--seeds 0,1,2]
                                                [--set FIELD=VALUE ...] [--commit]
    .venv/bin/python benchmarks/campaign.py status
    .venv/bin/python benchmarks/campaign.py aggregate [--n-boot 1000]

A cell is one (task, recipe, seed): `benchmarks/results/campaign/<task>/<recipe>/seed<s>.npz` + `.json`
(:mod:`cells`: per-row predictions and scores, labels, row ids, the config digest, the wall seconds and the
machine record). `run` measures the cells that are missing, one seed per process, one after another (run it on
an otherwise idle machine: never beside the test suite or another benchmark), each committed as it lands with
`--commit`; stopped at any point, the next `run` starts at the first missing cell, and a cell whose config changed
is measured again, never mixed. `aggregate` rebuilds `benchmarks/results/calibration.json` (the classification and
multiple-choice tasks, one entry per task and recipe) and `generation.json` (TriviaQA) from the committed cells
alone, and prints the ablation table (one line per recipe and task) for RESULTS.md.

Recipes (members differ by ...): `seed` — their seed only (LoRA init of A, data order, dropout); `bootstrap_b` —
also each its own bootstrap resample of the training rows and a random B (N(0, 0.01²)); `random_a` — a large
random A (Xavier gain 10, LoRA-Ensemble, arXiv 2405.14438); `hyper` — each its own hyper-parameters, 4 chosen
greedily from a train sweep of 8 trials (`benchmarks/spaces/hyper_members.yaml`: rank, LoRA dropout, adapted layers,
learning rate). Each reports the distance-aware scores and the rows
recalibrated after pooling of the task's config; recipes other than `seed` evaluate the member families only
(:data:`MEMBER_FAMILIES`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = Path("benchmarks/results/campaign")
TASKS = {"vader": ("calibration", "jobs/configs/calibration.yaml"),
         "obqa": ("calibration", "jobs/configs/obqa.yaml"),
         "triviaqa": ("generation", "jobs/configs/triviaqa.yaml")}
"""task -> (benchmark script, config)."""
RECIPES = {"seed": ["train.member_data=all"],
           "bootstrap_b": ["train.member_data=bootstrap", "adapter.init_b_std=0.01"],
           "random_a": ["adapter.init_a_gain=10"],
           "hyper": ["posterior.method=ensemble", "train.torch_threads=1",
                     "posterior.eval_methods=[map,temperature,ensemble,temperature_ensemble]"]}
"""recipe -> config overrides on top of the task's config."""
RECIPE_FLAGS = {"hyper": ["--sweep", "benchmarks/spaces/hyper_members.yaml", "--sweep-samples", "8"]}
"""recipe -> options of the benchmark script (`hyper`: the members are a train sweep's hyper-parameter ensemble,
each trial a 1-thread Ray Train run, two at once; no SWAG moments, so no SWAG rows)."""
MEMBER_FAMILIES = "posterior.eval_methods=[map,temperature,ensemble,temperature_ensemble,swag,multiswag]"
"""What a recipe other than `seed` evaluates on a classification or multiple-choice task: the families built
from its members (the recipes differ in how members differ; Laplace, MC dropout and TFB are the same post-hoc
views of any member and cost half of a VADER cell's evaluation), each with its +T row and the density scores."""


def measured(task: str, recipe: str) -> bool:
    """Whether the campaign has the (task, recipe) pair: the sweep of `hyper` is the calibration script's only."""
    return recipe not in RECIPE_FLAGS or TASKS[task][0] == "calibration"


def cell_dir(task: str, recipe: str) -> Path:
    return CELLS / task / recipe


def finished(task: str, recipe: str, seed: int) -> bool:
    """Whether the cell's files exist (whether its digest still holds is the benchmark script's check)."""
    path = cell_dir(task, recipe) / f"seed{seed}.npz"
    return path.is_file() and path.with_suffix(".json").is_file()


def command(task: str, recipe: str, seeds: list[int], extra: list[str], json_path: str,
            n_boot: int = 1000) -> list[str]:
    """The task's benchmark script over `seeds` of `recipe`, its cells under :func:`cell_dir`."""
    script, config = TASKS[task]
    return [sys.executable, f"benchmarks/{script}.py", "--config", config, "--seeds", ",".join(map(str, seeds)),
            "--out", f"runs/campaign/{task}-{recipe}", "--cells", str(cell_dir(task, recipe)), "--json", json_path,
            "--n-boot", str(n_boot), *(["--task-name", f"{task}/{recipe}"] if script == "calibration" else []),
            *RECIPE_FLAGS.get(recipe, []), *([MEMBER_FAMILIES] if script == "calibration" and recipe != "seed" else []),
            *RECIPES[recipe], *extra]


def run(args) -> None:
    """Measure every missing cell, one seed per process, in task / recipe / seed order."""
    for task in args.tasks:
        for recipe in (r for r in args.recipes if measured(task, r)):
            for seed in args.seeds:
                if finished(task, recipe, seed) and not args.check_digests:
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] cell {task}/{recipe}/seed{seed}", flush=True)
                scratch = f"runs/campaign/{task}-{recipe}/seed{seed}-table.json"  # a one-seed table: not a result
                cmd = command(task, recipe, [seed], args.set, scratch, n_boot=50)
                subprocess.run([*cmd, *(["--commit"] if args.commit else [])], cwd=ROOT, check=True)


def status(args) -> None:
    for task in args.tasks:
        for recipe in (r for r in args.recipes if measured(task, r)):
            cells = [s for s in args.seeds if finished(task, recipe, s)]
            seconds = [json.loads((cell_dir(task, recipe) / f"seed{s}.json").read_text()).get("seconds")
                       for s in cells]
            print(f"{task}/{recipe}: seeds {cells} of {args.seeds}; wall seconds {seconds}")


def ablation_line(name: str, task: dict) -> str:
    """One line of the ablation table from calibration.json's entry of a (task, recipe)."""
    t, splits = task["targets"], list(task["n_test"])
    in_domain = splits[0]
    vs = t["vs_temperature"]
    cells = [f"{v['best']} {v['delta']:+.4f} [{v['lo']:+.4f}, {v['hi']:+.4f}]" for s, v in vs.items()]
    far = t.get("far_ood_density", {})
    best_far = {s: round(v, 3) for s, v in far.items() if s not in ("row", "pass")}
    return (f"| {name} | {' / '.join(cells) or '—'} | {best_far or '—'} | "
            f"{t.get('shift_density', {}).get('mean', float('nan')):.3f} | "
            f"{t['reject10_best']['cut']:.3f} ({t['reject10_best']['row']}, {t['reject10_best']['score']}) | "
            f"{task.get('member_disagreement', {}).get(in_domain, float('nan')):.3f} | "
            f"{task['methods']['map'][in_domain]['accuracy']:.3f} | "
            f"{sum(task['seconds_per_seed']['main'].get(k, 0.0) for k in ('train', 'evaluate')) / 60:.1f} |")


def aggregate(args) -> None:
    """Rebuild the results JSONs from the committed cells of every complete (task, recipe); print the table."""
    lines = ["| task / recipe | ΔNLL vs temperature, best row [95 % CI] per split | far-OOD AUROC (density) | "
             "shift AUROC (density, mean) | Rej10 cut, best | member disagreement | map accuracy | minutes per seed |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for task in args.tasks:
        for recipe in (r for r in args.recipes if measured(task, r)):
            if not all(finished(task, recipe, s) for s in args.seeds):
                print(f"{task}/{recipe}: incomplete, left out", flush=True)
                continue
            script, _ = TASKS[task]
            out = f"benchmarks/results/{script}.json"
            subprocess.run(command(task, recipe, args.seeds, args.set, out, args.n_boot), cwd=ROOT, check=True)
            if script == "calibration":
                lines.append(ablation_line(f"{task}/{recipe}", json.loads(Path(ROOT / out).read_text())["tasks"]
                                           [f"{task}/{recipe}"]))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("run", "status", "aggregate"))
    parser.add_argument("--tasks", default=",".join(TASKS), type=lambda s: s.split(","))
    parser.add_argument("--recipes", default=",".join(RECIPES), type=lambda s: s.split(","))
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="overrides on top of every cell's config (part of its digest where they train)")
    parser.add_argument("--commit", action="store_true", help="git-commit each cell as it lands")
    parser.add_argument("--check-digests", action="store_true",
                        help="run the script for existing cells too (it remeasures those whose config changed)")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    unknown = [t for t in args.tasks if t not in TASKS] + [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown task or recipe {unknown}; tasks {list(TASKS)}, recipes {list(RECIPES)}")
    {"run": run, "status": status, "aggregate": aggregate}[args.mode](args)


if __name__ == "__main__":
    main()
