"""Member-diversity ablation (issue 26): each recipe of member diversity through the calibration benchmark, over
seeds, against temperature-scaled map.

    # every (recipe, seed) as its own process at once (a GPU machine: a 135M model's steps are launch-bound, so
    # processes overlap), predictions packed into one tar as seeds finish:
    python benchmarks/diversity.py launch --device cuda --deadline 540 --pack $OUT/diversity.tar
    # where the predictions are (this machine, after unpacking the tar at the repo root): tables and JSON
    .venv/bin/python benchmarks/diversity.py aggregate [--json benchmarks/results/diversity.json]

A recipe is a config plus overrides (RECIPES). `launch` runs `benchmarks/calibration.py --seeds S` for each pair,
so every seed's predictions land in `runs/diversity/<recipe>/seed<S>/predictions.npz` with the config digest
beside them; `aggregate` runs calibration.py over all seeds of each recipe with the same overrides, which finds
those predictions, evaluates nothing, and writes the recipe's tables under its name in `--json`, then prints the
ablation table (one line per recipe: the targets of issue 26). Seeds a recipe lacks are trained by `aggregate`
itself (on this machine, slowly): pass `--recipes` to aggregate only the complete ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("runs/diversity")
VADER = "jobs/configs/calibration.yaml"
CHOICE = "jobs/configs/obqa.yaml"
RECIPES: dict[str, tuple[str, list[str]]] = {
    "vader_seed": (VADER, []),
    "vader_bootstrap": (VADER, ["train.member_data=bootstrap"]),
    "vader_random_b": (VADER, ["adapter.init_b_std=0.01"]),
    "vader_bootstrap_random_b": (VADER, ["train.member_data=bootstrap", "adapter.init_b_std=0.01"]),
    "choice_seed": (CHOICE, []),
}
"""name -> (config, overrides). `*_seed`: members differ by seed only (LoRA init of A, data order, dropout);
`bootstrap`: each member on its own resample of the training split; `random_b`: B drawn N(0, 0.01²) instead of
0, so members start as different functions. Every run also reports `ensemble_early` (the early-stopped members)."""


def run_name(recipe: str, args) -> str:
    """`<recipe>`, or `<recipe>-<regime>` with `--regime` (its own predictions, e.g. a shorter regime)."""
    return f"{recipe}-{args.regime}" if args.regime else recipe


def command(recipe: str, args, seeds: str, json_path: Path) -> list[str]:
    """calibration.py for `recipe` on `seeds`, with the `--set` overrides on top."""
    config, overrides = RECIPES[recipe]
    name = run_name(recipe, args)
    return [sys.executable, "benchmarks/calibration.py", "--config", config, "--seeds", seeds,
            "--out", str(OUT / name), "--json", str(json_path), "--task-name", name,
            *overrides, *args.set, f"model.device={args.device}", f"train.torch_threads={args.threads}"]


def pack(tar_path: Path) -> int:
    """Every finished seed's predictions, their digests and the logs, into `tar_path` (atomically); their count."""
    files = sorted([*OUT.glob("*/seed*/predictions.npz"), *OUT.glob("*/seed*/predictions.json"),
                    *OUT.glob("*/*.log")])
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for f in files:
            tar.add(f)
    tmp.replace(tar_path)
    return sum(f.name == "predictions.npz" for f in files)


def launch(args) -> None:
    """Start every (recipe, seed) at once; pack as each finishes; stop what is left at the deadline."""
    deadline = time.time() + args.deadline
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for recipe in args.recipes.split(","):
        for seed in args.seeds.split(","):
            folder = OUT / run_name(recipe, args)
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / f"seed{seed}.log", "w")
            one_seed = command(recipe, args, seed, folder / f"seed{seed}.json")
            one_seed[2:2] = ["--n-boot", "100"]  # its one-seed table is not the result: `aggregate` makes that
            procs[(recipe, seed)] = subprocess.Popen(one_seed, cwd=ROOT, env=env, stdout=log,
                                                     stderr=subprocess.STDOUT)
    while procs and time.time() < deadline:
        time.sleep(5)
        for key in [k for k, p in procs.items() if p.poll() is not None]:
            print(f"[{time.strftime('%H:%M:%S')}] {key} exited {procs.pop(key).returncode}; "
                  f"{pack(args.pack)} seeds packed", flush=True)
    for key, proc in procs.items():
        proc.kill()
        print(f"{key} stopped at the deadline", flush=True)
    print(f"{pack(args.pack)} seeds packed in {args.pack}", flush=True)


def ablation_line(name: str, task: dict) -> str:
    """One row of the ablation table from calibration.py's JSON for one recipe."""
    t, in_domain = task["targets"], next(iter(task["n_test"]))
    vs = t["vs_temperature"].get(in_domain, {})
    shift_wins = sum(v["pass"] for s, v in t["vs_temperature"].items() if s != in_domain)
    ens, early = task["methods"].get("ensemble", {}), task["methods"].get("ensemble_early", {})
    return (f"| {name} | {vs.get('best', '—')} {vs.get('delta', float('nan')):+.4f} "
            f"[{vs.get('lo', float('nan')):+.4f}, {vs.get('hi', float('nan')):+.4f}] | "
            f"{shift_wins}/{len(t['vs_temperature']) - 1} | "
            f"{ens.get(in_domain, {}).get('nll', float('nan')):.4f} / "
            f"{early.get(in_domain, {}).get('nll', float('nan')):.4f} | "
            f"{t['far_ood_auroc_mi_max']:.3f} | {t['reject10_error_cut_max']:.3f} |")


def aggregate(args) -> None:
    recipes = args.recipes.split(",")
    for recipe in recipes:
        subprocess.run(command(recipe, args, args.seeds, Path(args.json)), cwd=ROOT, check=True)
    tasks = json.loads(Path(args.json).read_text())["tasks"]
    print("| recipe | in-domain ΔNLL vs temperature, best row [95 % CI] | shift splits won | ensemble / "
          "ensemble_early NLL | far-OOD AUROC (MI), best row | Rej10 error cut, best row |")
    print("|---|---|---:|---|---:|---:|")
    for recipe in recipes:
        print(ablation_line(run_name(recipe, args), tasks[run_name(recipe, args)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("launch", "aggregate"))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="cuda", help="model.device of the runs (also part of their digest)")
    parser.add_argument("--deadline", type=float, default=540.0, help="launch: seconds before what is left stops")
    parser.add_argument("--pack", type=Path, default=OUT / "diversity.tar")
    parser.add_argument("--json", default="benchmarks/results/diversity.json")
    parser.add_argument("--threads", type=int, default=1, help="train.torch_threads of each run (1 where "
                        "several run at once; also part of the runs' digest)")
    parser.add_argument("--regime", default="", help="name of the --set overrides (suffix of runs and rows)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="overrides on top of every recipe (a regime, e.g. fewer steps on a CPU)")
    args = parser.parse_args()
    launch(args) if args.mode == "launch" else aggregate(args)


if __name__ == "__main__":
    main()
