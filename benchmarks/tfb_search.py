"""TFB's σ search (rayblora.posteriors.tfb) against one uncached validation pass, timed in one run.

    .venv/bin/python benchmarks/tfb_search.py [--run runs/calibration-bench/seed0] \
        [--config jobs/configs/calibration.yaml] [--repeats 3] [--out benchmarks/results/tfb_search.json]

On a trained run of the calibration regime (SmolLM2-135M-Instruct, LoRA on the last 4 of its 30 layers, the
run's trunk cache under `<run>/trunk_cache/`), for member 0:

* uncached pass: the MAP adapter over the whole validation split with the trunk cache off (every layer runs);
* search: `tfb.search_steps` + 1 validation passes of `tfb.search_samples` states each (TfbPosterior.build), with
  the run's trunk cache on (only the adapted layers run).

Reports the passes the search made and its wall time over the uncached pass (issue 17's targets: ≤ 12 passes,
≤ 2×), the median of `--repeats` runs of each path, alternating, plus the σ found. Writes the JSON with machine,
date, load average and command.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from record import BenchmarkRecord
from rayblora.artifact import load_posterior
from rayblora.config import load_config
from rayblora.data.trained_splits import artifact_data
from rayblora.posteriors import get_posterior_class
from rayblora.workflows.members import trunk_cache_for
from rayblora.manifest import open_artifact


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/calibration-bench/seed0", help="a trained run directory (output.dir)")
    p.add_argument("--config", default="jobs/configs/calibration.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/tfb_search.json")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. tfb.search_steps=8)")
    args = p.parse_args()
    record = BenchmarkRecord()
    run = Path(args.run)
    seed = "".join(ch for ch in run.name if ch.isdigit()) or "0"
    cfg = load_config(args.config, [f"data.seed={seed}", f"train.seed={seed}", f"output.dir={run}",
                                    *args.overrides])
    post = load_posterior(run / "posterior")
    scorer, member = post.scorer, post.members[:1]
    data = artifact_data(open_artifact(run / "posterior"), cfg.data)
    cache = trunk_cache_for(cfg, scorer)
    if cache is None or not cache.nbytes:
        raise SystemExit(f"{run}: no trunk cache to search with (train the run first)")
    plain = get_posterior_class("map")(scorer, member)
    uncached, search, built = [], [], None
    for _ in range(args.repeats):
        scorer.use_trunk_cache(None)
        t0 = time.perf_counter()
        plain.predict_dataset(data.validation, 16)
        uncached.append(time.perf_counter() - t0)
        scorer.use_trunk_cache(cache)
        t0 = time.perf_counter()
        built = get_posterior_class("tfb").build(scorer, member, post.member_info[:1], data=data, config=cfg)
        search.append(time.perf_counter() - t0)
        print(f"uncached pass {uncached[-1]:.2f} s, search {search[-1]:.2f} s", flush=True)
    info = built.search[0]
    figures = {"validation_rows": len(data.validation), "uncached_pass_s": statistics.median(uncached),
               "search_s": statistics.median(search), "uncached_runs_s": uncached, "search_runs_s": search,
               "passes": info["passes"], "sigma": built.sigmas[0], "search": info, "tfb": vars(cfg.tfb)}
    figures["search_over_uncached_pass"] = figures["search_s"] / figures["uncached_pass_s"]
    figures["targets"] = {"passes_le_12": info["passes"] <= 12,
                          "search_le_2x_uncached_pass": figures["search_over_uncached_pass"] <= 2.0}
    record.write(args.out, figures)
    print({k: figures[k] for k in ("passes", "sigma", "uncached_pass_s", "search_s", "search_over_uncached_pass")})


if __name__ == "__main__":
    main()
