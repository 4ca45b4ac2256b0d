"""Bring your own adapter, on the real model (issue 27): SmolLM2's demo members exported as plain PEFT folders,
re-imported, Laplace fitted and evaluated, against fitting and evaluating the original artifact.

    .venv/bin/python benchmarks/adapter_round_trip.py [--config jobs/configs/demo.yaml] [--out runs/byo] \
        [--json benchmarks/results/adapter_round_trip.json] [overrides ...]

Steps (each the command a user runs, through `rayblora.cli.main`): train the demo's members in process
(`posterior.method=ensemble`, so the members are the trained adapters), `export` them, `import` the folders,
`fit --method laplace_ensemble` on both artifacts, then evaluate `ensemble` and `laplace_ensemble` on both.
Recorded: the largest per-row probability difference per method and split, the largest difference of any
report metric, both report tables and the seconds of each step. A finished step is not redone on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import math
import numbers
import time
from pathlib import Path

from rayblora.cli import main as rayblora
from rayblora.config import load_config
from rayblora.data.sources import split_name
from rayblora.report import build_report, render_markdown
from rayblora.workflows.evaluate import evaluate_methods
from rayblora.manifest import open_artifact

METHODS = ["ensemble", "laplace_ensemble"]


def _step(name: str, done: Path, argv: list[str], seconds: dict[str, float]) -> None:
    if done.exists():
        print(f"[round-trip] {name}: {done} exists, kept")
        return
    t0 = time.time()
    if rayblora(argv) != 0:
        raise SystemExit(f"[round-trip] {name} failed: rayblora {' '.join(argv)}")
    seconds[name] = round(time.time() - t0, 1)


def _metric_gap(a: dict, b: dict) -> float:
    """The largest |a − b| over the numbers of two report dicts of the same shape (NaN equal to NaN)."""
    if isinstance(a, dict):
        return max((_metric_gap(a[k], b[k]) for k in a if k in b), default=0.0)
    if isinstance(a, list):
        return max((_metric_gap(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        a, b = float(a), float(b)
        return 0.0 if (math.isnan(a) and math.isnan(b)) else abs(a - b)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="jobs/configs/demo.yaml")
    parser.add_argument("--out", default="runs/byo")
    parser.add_argument("--json", default="benchmarks/results/adapter_round_trip.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out, seconds = Path(args.out), {}
    common = ["--config", args.config, *args.overrides]
    original, imported = out / "original", out / "imported"
    _step("train", original / "posterior", ["train", "--in-process", *common, "posterior.method=ensemble",
                                            f"output.dir={original}"], seconds)
    _step("export", out / "peft", ["export", "--posterior", str(original / "posterior"), "--out",
                                   str(out / "peft")], seconds)
    folders = sorted((out / "peft").glob("member-*"))
    _step("import", imported / "posterior", ["import", *[a for f in folders for a in ("--adapter", str(f))],
                                             *common, "--out", str(imported)], seconds)
    for name, run in (("original", original), ("imported", imported)):
        _step(f"fit {name}", run / "posterior-laplace", ["fit", "--posterior", str(run / "posterior"), "--method",
                                                         "laplace_ensemble", "--out", str(run / "posterior-laplace"),
                                                         *common], seconds)
    cfg = load_config(args.config, args.overrides)
    results, reports = {}, {}
    for name, run in (("original", original), ("imported", imported)):
        t0 = time.time()
        results[name] = evaluate_methods(open_artifact(run / "posterior-laplace"), load_config(args.config, [
            *args.overrides, f"output.dir={run}"]), METHODS)
        seconds[f"evaluate {name}"] = round(time.time() - t0, 1)
        reports[name] = build_report(results[name], split_name(cfg.data.task), {"artifact": name})
        print(render_markdown(reports[name]))
    probs_gap = {m: {s: float(abs(r.probs - results["imported"][m][s].probs).max())
                     for s, r in splits.items()} for m, splits in results["original"].items()}
    record = {"config": args.config, "overrides": args.overrides, "task": cfg.data.task, "members": len(folders),
              "max_abs_prob_difference": probs_gap,
              "max_abs_metric_difference": _metric_gap(*({k: r[k] for k in ("methods", "ood")}
                                                         for r in (reports["original"], reports["imported"]))),
              "seconds": seconds, "load_average": os.getloadavg(),
              "reports": {k: {"methods": v["methods"], "ood": v["ood"]} for k, v in reports.items()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2, default=float))
    print(json.dumps({k: record[k] for k in ("max_abs_prob_difference", "max_abs_metric_difference", "seconds")},
                     indent=2))


if __name__ == "__main__":
    main()
