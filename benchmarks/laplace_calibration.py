"""Real run: `laplace` and `laplace_ensemble` vs `map` (and `ensemble`) on SmolLM2-135M-Instruct + VADER, in-domain
(movie) and on the three shifts (tweets, amazon, nyt).

    .venv/bin/python benchmarks/laplace_calibration.py --parent runs/demo/posterior [--fit-batches 24] [--n-eval 100]
        [--method laplace_ensemble|laplace] [--prior-method marglik|val_nll]

Takes a trained ensemble artifact (e.g. from `rayblora demo`), fits a mixture of Laplaces onto it with
`rayblora.workflows.fit.fit_posterior` (curvature on the first `--fit-batches` batches of the members' own training
split, prior precision by marginal likelihood), and evaluates every row on the first `--n-eval` test examples of each
split (the `data.test_size = n_eval` split). The `laplace` row is member 0's component of the mixture (its GLM moments
are computed once and shared with the mixture). Writes a report directory and prints the markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from record import BenchmarkRecord


def _config(parent: Path, fit_batches: int, prior_method: str):
    from rayblora.config import config_from_dict

    cfg = config_from_dict(json.loads((parent / "manifest.json").read_text())["training"]["config"])
    return dataclasses.replace(cfg, laplace=dataclasses.replace(
        cfg.laplace, fit_batches=fit_batches, prior_method=prior_method, link="probit", link_samples=20,
        fit_workers=0))


def _laplace_rows(post, splits: dict, batch_size: int, log) -> dict:
    """SplitResults of `laplace` (member 0) and `laplace_ensemble` from one GLM pass per member and batch."""
    from rayblora import predictive
    from rayblora.data.batches import eval_batches
    from rayblora.report import SplitResult

    methods = ["laplace", "laplace_ensemble"][:len(post.fits)]
    rows = {m: {} for m in methods}
    for name, ds in splits.items():
        parts = {m: [] for m in methods}
        t0 = time.time()
        for batch in eval_batches(ds, post.scorer.tokenizer, batch_size, post.scorer.max_length):
            moments = post.glm_moments(batch)
            for method in methods:
                parts[method].append(post.probit_predictive(moments[:1] if method == "laplace" else moments))
        log(f"[laplace] {name}: {len(ds)} examples in {time.time() - t0:.0f} s")
        for method, preds in parts.items():
            pred = predictive.concat(preds)
            rows[method][name] = SplitResult(pred.probs.numpy(), np.asarray(ds["label"]), pred.entropy.numpy(),
                                             pred.mutual_information.numpy())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", required=True, help="trained ensemble artifact")
    parser.add_argument("--fit-batches", type=int, default=24)
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--method", default="laplace_ensemble", choices=["laplace", "laplace_ensemble"])
    parser.add_argument("--prior-method", default="marglik", choices=["marglik", "val_nll"])
    parser.add_argument("--out", default="runs/laplace-calibration")
    args = parser.parse_args()
    from rayblora.artifact import load_posterior, open_artifact
    from rayblora.data import load_task_data, split_name
    from rayblora.workflows.evaluate import evaluate_methods
    from rayblora.workflows.fit import fit_posterior
    from rayblora.report import render_markdown, write_report

    record = BenchmarkRecord()
    log = lambda m: print(m, flush=True)  # noqa: E731
    parent, out = Path(args.parent), Path(args.out)
    cfg = _config(parent, args.fit_batches, args.prior_method)
    t0 = time.time()
    fitted = open_artifact(fit_posterior(parent, cfg, out / "posterior", method=args.method, log=log))
    fit_seconds = time.time() - t0
    eval_data = load_task_data(dataclasses.replace(cfg.data, test_size=args.n_eval))
    splits = eval_data.eval_splits(split_name(cfg.data.task))
    results = evaluate_methods(fitted, cfg, ["map", "ensemble"], data=eval_data, log=log)
    post = load_posterior(fitted)
    results.update(_laplace_rows(post, splits, 16, log))
    meta = {"model": cfg.model.name, "task": cfg.data.task, "members": len(post.members),
            "fit_batches": args.fit_batches, "n_eval": args.n_eval, "prior_method": args.prior_method,
            "fit_seconds": round(fit_seconds, 1),
            "prior_precision": [f.prior.tolist() for f in post.fits],
            "eval_seconds": round(time.time() - t0 - fit_seconds, 1), **record.meta()}
    report = write_report(out, results, split_name(cfg.data.task), meta)
    print(render_markdown(report))


if __name__ == "__main__":
    main()
