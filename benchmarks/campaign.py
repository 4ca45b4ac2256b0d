"""The measurement campaign: which posterior recipe beats a temperature, on three tasks, resumable until done.

    .venv/bin/python benchmarks/campaign.py run [--tasks vader,obqa,triviaqa] [--recipes seed,...] [--seeds 0,1,2]
                                                [--set FIELD=VALUE ...] [--commit]
    .venv/bin/python benchmarks/campaign.py status
    .venv/bin/python benchmarks/campaign.py aggregate [--n-boot 1000]
    .venv/bin/python benchmarks/campaign.py compare [--n-boot 1000]

A cell is one (task, recipe, seed): `benchmarks/results/campaign/<task>/<recipe>/seed<s>.npz` + `.json`
(:mod:`cells`: per-row predictions and scores, labels, row ids, the config digest, the wall seconds and the
machine record). `run` measures the cells that are missing, one seed per process, one after another (run it on
an otherwise idle machine: never beside the test suite or another benchmark), each committed as it lands with
`--commit`; stopped at any point, the next `run` starts at the first missing cell, and a cell whose config changed
is measured again, never mixed. `aggregate` rebuilds `benchmarks/results/calibration.json` (the classification and
multiple-choice tasks, one entry per task and recipe) and `generation.json` (TriviaQA) from the committed cells
alone, and prints the ablation table (one line per recipe and task) for RESULTS.md. `compare` (also run by
`aggregate`) judges every recipe against one baseline, :data:`BASELINE` on the same rows (the cells of one task
share their data seeds, so their rows are the same; checked by row id): a recipe whose own map is weaker (a
bootstrapped member) would otherwise beat its own temperature row without beating what a user deploys. It writes
`vs_baseline` into each calibration.json entry and prints one table per task.

Recipes (members differ by ...): `seed` — their seed only (LoRA init of A, data order, dropout); `bootstrap_b` —
also each its own bootstrap resample of the training rows and a random B (N(0, 0.01²)); `random_a` — a large
random A (Xavier gain 10, LoRA-Ensemble, arXiv 2405.14438); `hyper` — each its own hyper-parameters, 4 chosen
greedily from a train sweep of 8 trials (`benchmarks/spaces/hyper_members.yaml`: rank, LoRA dropout, adapted layers,
learning rate); `seed_k8` — as `seed`, with 8 members instead of 4 (what the other recipes point to: every added
source of diversity made the members weaker, so more members of full quality). Each reports the distance-aware
scores and the rows recalibrated after pooling of the task's config; recipes other than `seed` evaluate the member
families only (:data:`MEMBER_FAMILIES`); `random_a` was dropped after its seed 0 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CELLS = Path("benchmarks/results/campaign")
TASKS = {"vader": ("calibration", "jobs/configs/calibration.yaml"),
         "obqa": ("calibration", "jobs/configs/obqa.yaml"),
         "triviaqa": ("generation", "jobs/configs/triviaqa.yaml")}
"""task -> (benchmark script, config)."""
SEED_ONLY = ["train.member_data=all", "adapter.init_b_std=0.0"]
RECIPES = {"seed": SEED_ONLY,
           "bootstrap_b": ["train.member_data=bootstrap", "adapter.init_b_std=0.01"],
           "random_a": [*SEED_ONLY, "adapter.init_a_gain=10"],
           "seed_k8": [*SEED_ONLY, "posterior.members=8"],
           "hyper": [*SEED_ONLY, "posterior.method=ensemble", "train.torch_threads=1",
                     "posterior.eval_methods=[map,temperature,ensemble,temperature_ensemble]"]}
"""recipe -> config overrides on top of the task's config (each stated whole: a task config's own setting of
these fields, e.g. bootstrap members, does not leak into another recipe)."""
BASELINE = ("seed", "temperature")
"""(recipe, row) every recipe is judged against: one adapter trained on all rows (the `seed` recipe's member 0),
temperature-scaled on the validation split — what a user deploys without a posterior."""
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


def pairs(args):
    """The (task, recipe) pairs of `--tasks` x `--recipes` the campaign measures, in that order."""
    return [(task, recipe) for task in args.tasks for recipe in args.recipes if measured(task, recipe)]


def complete(task: str, recipe: str, seeds: list[int]) -> bool:
    return all(finished(task, recipe, s) for s in seeds)


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
    for task, recipe in pairs(args):
        for seed in args.seeds:
            if finished(task, recipe, seed) and not args.check_digests:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] cell {task}/{recipe}/seed{seed}", flush=True)
            scratch = f"runs/campaign/{task}-{recipe}/seed{seed}-table.json"  # a one-seed table: not a result
            cmd = command(task, recipe, [seed], args.set, scratch, n_boot=50)
            subprocess.run([*cmd, *(["--commit"] if args.commit else [])], cwd=ROOT, check=True)


def status(args) -> None:
    for task, recipe in pairs(args):
        cells = [s for s in args.seeds if finished(task, recipe, s)]
        seconds = [json.loads((cell_dir(task, recipe) / f"seed{s}.json").read_text()).get("seconds") for s in cells]
        print(f"{task}/{recipe}: seeds {cells} of {args.seeds}; wall seconds {seconds}")


def _cell_split(cell, method: str, split: str):
    """One row of a cell as a SplitResult (a member row keeps its member probabilities)."""
    from rayblora.report import SplitResult

    get = (lambda f: cell[f"{method}/{split}/{f}"] if f"{method}/{split}/{f}" in cell.files else None)
    return SplitResult(get("probs"), get("labels").astype(int), get("entropy"), get("mutual_information"),
                       member_probs=get("member_probs"))


def vs_baseline(task: str, recipe: str, seeds: list[int], splits: list[str], n_boot: int) -> dict[str, dict]:
    """ΔNLL of each Bayesian row and the temperature row of `recipe` against :data:`BASELINE`, per split:
    {SPLIT: {"best": ROW, "rows": {ROW: {"delta", "lo", "hi"}}}} (paired bootstrap over each seed's rows)."""
    from calibration import bayesian_rows
    from rayblora.comparison import paired_bootstrap

    base_recipe, base_row = BASELINE
    cells = {r: [np.load(cell_dir(task, r) / f"seed{s}.npz") for s in seeds] for r in (base_recipe, recipe)}
    out = {}
    for split in splits:
        for ours, theirs in zip(cells[recipe], cells[base_recipe]):
            if not np.array_equal(ours[f"ids/{split}"], theirs[f"ids/{split}"]):
                raise SystemExit(f"{task}: {recipe} and {base_recipe} cells hold other {split} rows")
        rows = ["temperature", *bayesian_rows(sorted({k.split("/")[0] for k in cells[recipe][0].files
                                                      if k.endswith(f"/{split}/probs")}))]
        per_seed = {f"{base_recipe}:{base_row}": [_cell_split(c, base_row, split) for c in cells[base_recipe]],
                    **{r: [_cell_split(c, r, split) for c in cells[recipe]] for r in rows}}
        deltas = paired_bootstrap(per_seed, f"{base_recipe}:{base_row}", ("nll",), n_boot)
        found = {r: deltas[r]["nll"] for r in rows}
        out[split] = {"best": min((r for r in rows if r != "temperature"), key=lambda r: found[r]["delta"]),
                      "rows": found}
    return out


def compare(args) -> None:
    """Write `vs_baseline` into every complete calibration entry of `--recipes` and print it per task."""
    from rayblora.manifest import write_json_atomic

    path = ROOT / "benchmarks/results/calibration.json"
    results = json.loads(path.read_text())
    for task in (t for t in args.tasks if TASKS[t][0] == "calibration"):
        print(f"\n{task}: ΔNLL vs {BASELINE[0]}'s {BASELINE[1]} row [95 % CI]\n| recipe | split | temperature | best "
              "Bayesian row |\n|---|---|---:|---:|")
        for recipe in (r for t, r in pairs(args) if t == task and complete(t, r, args.seeds)):
            entry = results["tasks"].get(f"{task}/{recipe}")
            if entry is None:
                continue
            splits = [s for s in entry["n_test"] if s in entry["vs_temperature"]]
            entry["vs_baseline"] = vs_baseline(task, recipe, args.seeds, splits, args.n_boot)
            for split, v in entry["vs_baseline"].items():
                t, b = v["rows"]["temperature"], v["rows"][v["best"]]
                print(f"| {recipe} | {split} | {t['delta']:+.4f} [{t['lo']:+.4f}, {t['hi']:+.4f}] | {v['best']} "
                      f"{b['delta']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}] |")
    write_json_atomic(path, results, allow_nan=True)


def ablation_line(name: str, task: dict) -> str:
    """One line of the ablation table from calibration.json's entry of a (task, recipe)."""
    t, in_domain = task["targets"], task["in_domain"]
    vs = t["vs_temperature"]
    order = [in_domain, *sorted(s for s in vs if s != in_domain)]
    cells = [f"{s} {vs[s]['best']} {vs[s]['delta']:+.4f} [{vs[s]['lo']:+.4f}, {vs[s]['hi']:+.4f}]"
             for s in order if s in vs]
    far = t.get("far_ood_density", {})
    best_far = " / ".join(f"{s} {v:.3f}" for s, v in far.items() if s not in ("row", "pass"))
    return (f"| {name} | {'; '.join(cells) or '—'} | {best_far or '—'} | "
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
    for task, recipe in pairs(args):
        if not complete(task, recipe, args.seeds):
            print(f"{task}/{recipe}: incomplete, left out", flush=True)
            continue
        script, _ = TASKS[task]
        out = f"benchmarks/results/{script}.json"
        subprocess.run(command(task, recipe, args.seeds, args.set, out, args.n_boot), cwd=ROOT, check=True)
        if script == "calibration":
            lines.append(ablation_line(f"{task}/{recipe}", json.loads(Path(ROOT / out).read_text())["tasks"]
                                       [f"{task}/{recipe}"]))
    print("\n".join(lines))
    compare(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("run", "status", "aggregate", "compare"))
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
    {"run": run, "status": status, "aggregate": aggregate, "compare": compare}[args.mode](args)


if __name__ == "__main__":
    main()
