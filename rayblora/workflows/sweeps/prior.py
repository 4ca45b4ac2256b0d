"""The prior sweep (Ray Tune, post hoc): the prior precision of a Laplace-LoRA artifact, no forward passes.

The validation f_mu and rotated Jacobians and the curvature eigenbases are computed once
(:class:`rayblora.posteriors.laplace.prior_cache.PriorCache`, one validation pass of the GLM predictive), put
in Ray's object store once (`tune.with_parameters`, numpy arrays the trials of a node read zero-copy), and each
trial evaluates one prior precision δ — validation NLL / ECE / accuracy of the probit GLM predictive and the
Laplace evidence — with no forward or backward pass (Laplace-LoRA, arXiv 2308.13111, sec. 3). The chosen δ
(lowest val NLL, or highest evidence) is written into a new artifact version whose lineage names the parent.
Resumable like the train sweep: rerunning with the same `--out` continues the Tune experiment.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from ray import tune
from ray.tune.search import BasicVariantGenerator

from rayblora.artifact import Artifact, load_posterior, open_artifact, save_derived
from rayblora.config import Config, ConfigError
from rayblora.data.trained_splits import artifact_data
from rayblora.posteriors.laplace import LaplacePosterior
from rayblora.posteriors.laplace.prior_cache import PriorCache
from rayblora.registry import get_posterior_class
from rayblora.workflows.members import trunk_cache_for
from rayblora.workflows.runtime import ensure_ray
from rayblora.workflows.sweeps.results import (SweepOutcome, open_tuner, raise_if_unfinished, resumes_sweep,
                                               trial_states, tune_run_config, write_table)

PRIOR_EXPERIMENT = "prior_sweep"
SELECT = {"val_nll": ("val_nll", "min"), "marglik": ("log_marglik", "max")}
"""--select -> (reported metric, Tune mode)."""
PRIOR_COLUMNS = ["trial", "status", "prior_precision", "val_nll", "val_ece", "val_accuracy", "log_marglik"]


def prior_grid(values: int, low: float, high: float) -> list[float]:
    """`values` prior precisions evenly spaced in log between `low` and `high` (both included)."""
    if values < 1 or not 0 < low <= high or (values > 1 and low == high):
        raise ConfigError(f"sweep prior: needs --values >= 1 and 0 < --min < --max, got {values}, {low}, {high}")
    if values == 1:
        return [float(low)]
    step = (math.log10(high) - math.log10(low)) / (values - 1)
    return [float(f"{10 ** (math.log10(low) + i * step):.10g}") for i in range(values)]


def prior_trial(config: dict[str, Any], arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    """Tune function trainable: metrics of one prior precision from the shared cache (no model, no pass)."""
    tune.report(PriorCache.from_arrays(arrays, meta).evaluate(float(config["prior_precision"])))


def _laplace_parent(artifact: Artifact, cfg: Config):
    """The Laplace posterior of `artifact` and the validation split it was fitted on."""
    if not issubclass(get_posterior_class(artifact.method), LaplacePosterior):
        raise ConfigError(f"--posterior {artifact.root}: a {artifact.method!r} artifact has no Laplace curvature; "
                          f"fit one first (rayblora fit --posterior {artifact.root} --config ...)")
    post = load_posterior(artifact)
    post.scorer.use_trunk_cache(trunk_cache_for(cfg, post.scorer))
    return post, artifact_data(artifact, cfg.data).validation  # scored under the artifact's spec (refused if not)


def _prior_tuner(arrays, meta, identity: dict[str, Any], out: Path, search: str, max_concurrent: int,
                 log: Callable[[str], None]):
    """A new or restored Tuner of the prior sweep: one CPU per trial, actors reused across trials."""
    values, low, high = identity["values"], identity["range"][0], identity["range"][1]
    trainable = tune.with_parameters(prior_trial, arrays=arrays, meta=meta)  # one object-store copy
    domain = tune.grid_search(prior_grid(values, low, high)) if search == "grid" else tune.loguniform(low, high)

    def fresh():
        return tune.Tuner(trainable, param_space={"prior_precision": domain},
                          run_config=tune_run_config(out, PRIOR_EXPERIMENT),
                          tune_config=tune.TuneConfig(num_samples=1 if search == "grid" else values,
                                                      search_alg=BasicVariantGenerator(random_state=0),
                                                      max_concurrent_trials=max_concurrent or None,
                                                      reuse_actors=True))

    return open_tuner(out, PRIOR_EXPERIMENT, identity, trainable, fresh, log)


def prior_rows(grid, states: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """One row per prior-sweep trial, by prior precision."""
    rows = []
    for result in grid:
        trial, status = states.get(Path(result.path).name, ("?", ""))
        metrics = result.metrics or {}
        row = {"trial": trial, "status": "error" if status == "ERROR" else
               "done" if status == "TERMINATED" and "val_nll" in metrics else "unfinished",
               "prior_precision": float((result.config or {}).get("prior_precision", math.nan))}
        rows.append({**row, **{c: metrics.get(c) for c in PRIOR_COLUMNS[3:]}})
    return sorted(rows, key=lambda r: r["prior_precision"])


def save_with_prior(post, artifact, best: dict[str, Any], select: str, out: Path, table: Path) -> Path:
    """The parent posterior with the chosen prior precision, as a new artifact at `<out>/posterior` (atomic),
    its lineage naming the parent and the sweep."""
    sweep = {"select": select, "prior_precision": best["prior_precision"],
             **{k: best[k] for k in PRIOR_COLUMNS[3:]}, "table": str(table),
             "experiment": str(out / "tune" / PRIOR_EXPERIMENT)}
    return save_derived(post.with_prior_precision(best["prior_precision"]), artifact, out / "posterior",
                        {"prior_sweep": sweep})


def _choose(rows: list[dict[str, Any]], select: str) -> dict[str, Any]:
    metric, mode = SELECT[select]
    done = [r for r in rows if r["status"] == "done" and r[metric] is not None]
    if not done:
        raise RuntimeError("no trial of the prior sweep finished")
    return (min if mode == "min" else max)(done, key=lambda r: r[metric])


def sweep_prior(artifact: str | os.PathLike, cfg: Config, out_dir: str | os.PathLike | None = None, *,
                values: int = 32, low: float = 1e-4, high: float = 1e4, search: str = "grid",
                select: str = "val_nll", max_concurrent: int = 0,
                log: Callable[[str], None] = print) -> SweepOutcome:
    """Sweep the prior precision of a Laplace artifact post-hoc; write the chosen one into a new artifact.

    Args:
        artifact: a `laplace` / `laplace_ensemble` artifact (e.g. from `rayblora fit`).
        cfg: the config it was fitted with (its data section gives the validation split, `train.batch_size`
            the batches).
        out_dir: sweep directory (default `<output.dir>/sweep-prior`): prior_sweep.csv / .md, the Tune
            experiment, and the new artifact `posterior/`; rerunning with it resumes (or reuses) the trials.
        values, low, high, search: `values` prior precisions on a log grid over [low, high] ("grid"), or
            `values` log-uniform samples of Tune's random search ("random").
        select: "val_nll" (lowest validation NLL) or "marglik" (highest Laplace evidence).
    The swept δ is one scalar for every block of every fitted member (as `laplace.prior_method: val_nll`); trials
    score the probit GLM predictive, whatever `laplace.link` the artifact predicts with (it keeps its link).
    Writes `<out>/prior_sweep.csv`, `<out>/prior_sweep.md` and the artifact `<out>/posterior`.
    """
    if search not in ("grid", "random") or select not in SELECT or max_concurrent < 0:
        raise ConfigError(f"sweep prior: --search must be grid|random, --select one of {list(SELECT)}, "
                          f"--max-concurrent >= 0; got {search!r}, {select!r}, {max_concurrent}")
    prior_grid(values, low, high)
    out = Path(out_dir or cfg.out_dir / "sweep-prior").resolve()
    artifact = open_artifact(artifact)
    identity = {"sweep": "prior", "artifact": artifact.manifest["files"], "data": cfg.to_dict()["data"],
                "batch_size": cfg.train.batch_size, "values": values, "range": [low, high], "search": search}
    resumes_sweep(out, PRIOR_EXPERIMENT, identity)  # another sweep in `out` is refused before any model or Ray work
    post, validation = _laplace_parent(artifact, cfg)
    ensure_ray(cfg.cluster)
    t0 = time.time()
    cache = PriorCache.from_posterior(post, validation, cfg.train.batch_size)
    arrays, meta = cache.to_arrays()
    seconds = {"cache": time.time() - t0}
    log(f"[sweep] cached f_mu and Jacobians of {cache.num_examples} validation examples for {len(cache.fits)} "
        f"fitted member(s) in {seconds['cache']:.1f} s ({sum(a.nbytes for a in arrays.values()) / 2**20:.0f} "
        "MiB, one object-store copy)")
    grid = _prior_tuner(arrays, meta, identity, out, search, max_concurrent, log).fit()
    seconds["tune"] = time.time() - t0 - seconds["cache"]
    return _prior_outcome(post, artifact, grid, select, out, seconds, t0, log)


def _prior_outcome(post, artifact, grid, select: str, out: Path, seconds: dict[str, float], t0: float,
                   log: Callable[[str], None]) -> SweepOutcome:
    """Write the table of a finished prior sweep and the artifact with the chosen prior (SweepInterrupted if
    unfinished)."""
    states = trial_states(out / "tune" / PRIOR_EXPERIMENT)
    rows = prior_rows(grid, states)
    table_csv, table_md = write_table(rows, PRIOR_COLUMNS, out / "prior_sweep")
    raise_if_unfinished(states, out, table_md)
    best = _choose(rows, select)
    path = save_with_prior(post, artifact, best, select, out, table_csv)
    seconds["total"] = time.time() - t0
    log(f"[sweep] {len(rows)} prior precisions in {seconds['tune']:.1f} s of Tune; by {select}: "
        f"{best['prior_precision']:.4g} (val_nll {best['val_nll']:.4f}, log_marglik {best['log_marglik']:.2f}) "
        f"-> {path}")
    return SweepOutcome(out, table_csv, table_md, rows, best, path, seconds)
