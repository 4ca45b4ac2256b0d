"""Ray Tune sweeps: member hyper-parameters with retraining and ASHA, and the Laplace prior precision post-hoc.

* :func:`sweep_train` — each trial trains one member with a sampled config (LoRA rank / alpha, learning rate,
  weight decay = the MAP's Gaussian prior precision, steps, ...). Tune + Ray Train v2: the trial is a Tune
  *function trainable* that runs the member's TorchTrainer (:func:`rayblora.coordinator.member_trainer`) as its
  own Ray Train run; a Ray Train callback relays every `ray.train.report` of the member's rank-0 worker
  (val_nll at each `train.checkpoint_every` step) to the trial, so ASHA (Li et al., "A System for Massively
  Parallel Hyperparameter Tuning", 2020) stops bad trials early. Stopping a trial ends its trainable actor and,
  with it, the Train controller and workers it owns. The best completed trial's config is written as a YAML
  for `rayblora train`.
* :func:`sweep_prior` — post-hoc on a Laplace-LoRA artifact: the validation f_mu and rotated Jacobians and the
  curvature eigenbases are computed once (:class:`rayblora.prior_cache.PriorCache`, one validation pass of the
  GLM predictive), put in Ray's object store once (`tune.with_parameters`, numpy arrays the trials of a node
  read zero-copy), and each trial evaluates one prior precision δ — validation NLL / ECE / accuracy of the probit
  GLM predictive and the Laplace evidence — with no forward or backward pass (Laplace-LoRA, arXiv 2308.13111,
  sec. 3). The chosen δ (lowest val NLL, or highest evidence) is written into a new artifact version.

Both sweeps are resumable: their Tune experiment lives under `<out>/tune/`, and rerunning with the same `--out`
continues it with `Tuner.restore` (a trial's Train run resumes from its last checkpoint, because its run name is
derived from the trial id). Results come from Tune's ResultGrid and are summarised as a CSV + markdown table.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rayblora.config import Config, ConfigError, config_from_dict, dump_config, load_config
from rayblora.search_space import (Dimension, assign, check_space, flatten, load_space, param_space,
                                   space_digest)
from rayblora.sweep_results import (SweepInterrupted, SweepOutcome, open_tuner, raise_if_unfinished,
                                    trial_states, tune_run_config, write_table, write_text_atomic)

VAL_NLL = "val_nll"
TRAIN_EXPERIMENT = "train_sweep"
TRIAL_DRIVER_CPUS = 0.01
"""CPUs a train-sweep trial reserves for itself: it only drives its member's Train run, which holds the CPUs."""


# --- the train sweep ------------------------------------------------------------------------------------------
def _steps_candidates(base: dict[str, Any], dims: Sequence[Dimension]) -> tuple[int, int]:
    """Fewest and most optimizer steps any trial can run."""
    for dim in dims:
        if dim.field == "train.steps":
            values = [int(v) for v in dim.corners()]
            return min(values), max(values)
    return int(base["train"]["steps"]), int(base["train"]["steps"])


def with_report_cadence(cfg: Config, dims: Sequence[Dimension]) -> dict[str, Any]:
    """The base config dict of the trials: every checkpoint report carries val_nll, so ASHA sees it.

    `train.checkpoint_every` defaults to `train.eval_every`, else to a quarter of the fewest steps; a set
    `train.eval_every` must divide it."""
    base = cfg.to_dict()
    train = base["train"]
    every = train["checkpoint_every"] or train["eval_every"] or max(1, _steps_candidates(base, dims)[0] // 4)
    if train["eval_every"] and every % train["eval_every"]:
        raise ConfigError(f"train.eval_every: must divide train.checkpoint_every ({every}) so that every report "
                          f"of a sweep trial carries val_nll, got {train['eval_every']}")
    train["checkpoint_every"], train["eval_every"] = every, train["eval_every"] or every
    return base


def trial_config(base: dict[str, Any], sampled: dict[str, Any], trial_dir: Path) -> Config:
    """A trial's Config: the base with the sampled fields, its output under the trial's own directory."""
    values = assign(base, flatten(sampled))
    values["output"] = {**values.get("output", {}), "dir": str(trial_dir), "name": "trial"}
    return config_from_dict(values)


def _val_nll_relay():
    """A Ray Train callback relaying each report of the member run to its Tune trial (rank 0's metrics).

    A report whose val_nll was dropped as non-finite (a diverged trial) is relayed with val_nll = inf, so Tune
    always sees the metric and ASHA stops the trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValNllRelay(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            filled = [{**m, VAL_NLL: m.get(VAL_NLL, math.inf)} for m in metrics]
            super().after_report(run_context, filled, checkpoint)

    return ValNllRelay()


def member_trial(sampled: dict[str, Any], base: dict[str, Any], sweep_dir: str) -> None:
    """Tune function trainable: member 0 of the sampled config, trained as one Ray Train run.

    The run is named after the trial id and stored under the trial's directory, so a restored trial's run
    resumes from its last checkpoint."""
    from ray import tune

    from rayblora.coordinator import member_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, sampled, Path(sweep_dir) / "trials" / trial_id)
    member_trainer(cfg, 0, trial_id, callbacks=[_val_nll_relay()]).fit()


def _trial_slots(cfg: Config, log: Callable[[str], None] = print) -> int:
    """Member runs the cluster can hold at once (its CPUs, and GPUs when used, over one member's share).

    Raises ConfigError when even the whole cluster cannot hold one member run (the trials would wait forever);
    warns when it could but the resources are held by something else right now."""
    import ray

    per = cfg.cluster.workers_per_member
    need = {"CPU": per * cfg.cluster.cpus_per_worker + TRIAL_DRIVER_CPUS}
    if cfg.cluster.use_gpu:
        need["GPU"] = per

    def fits(resources: dict[str, float]) -> int:
        return min(int(resources.get(k, 0) // v) for k, v in need.items())

    total, free = ray.cluster_resources(), ray.available_resources()
    if fits(total) < 1:
        raise ConfigError(f"cluster: one trial's member run needs {need} but the whole cluster has "
                          f"{ {k: total.get(k, 0) for k in need} }; lower cluster.workers_per_member / "
                          "cpus_per_worker or add nodes")
    if fits(free) < 1:
        log(f"[sweep] warning: only { {k: free.get(k, 0) for k in need} } free of {need} per trial; trials wait "
            "until other work on the cluster releases resources")
    return fits(total)


def _train_status(status: str, steps: int, step: int | None) -> str:
    if status == "ERROR":
        return "error"
    if status != "TERMINATED":
        return "unfinished"
    if step is None:
        return "no report"
    return "completed" if step >= steps else "stopped (ASHA)"


def train_rows(grid, states: dict[str, tuple[str, str]], dims: Sequence[Dimension],
               base: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial of a train sweep's ResultGrid: sampled fields, status, last reported metrics; completed
    trials first, each group by val_nll."""
    rows = []
    for result in grid:
        metrics, sampled = result.metrics or {}, flatten(result.config or {})
        trial, status = states.get(Path(result.path).name, (metrics.get("trial_id", "?"), ""))
        step = int(metrics["step"]) if "step" in metrics else None
        steps = int(sampled.get("train.steps", base["train"]["steps"]))
        rows.append({"trial": trial, "status": _train_status(status, steps, step),
                     **{d.field: sampled.get(d.field) for d in dims if d.searched},
                     "step": step, VAL_NLL: metrics.get(VAL_NLL), "val_accuracy": metrics.get("val_accuracy"),
                     "seconds": metrics.get("time_total_s"), "checkpoint": metrics.get("checkpoint_path")})
    rows.sort(key=lambda r: (r["status"] != "completed", math.inf if r[VAL_NLL] is None else r[VAL_NLL]))
    return rows


def write_best_config(cfg: Config, dims: Sequence[Dimension], best: dict[str, Any], path: Path,
                      table: Path) -> Path:
    """The user's config with the best trial's values, as a YAML for `rayblora train` (atomic write)."""
    values = {d.field: best[d.field] if d.searched else d.values[0] for d in dims}
    chosen = config_from_dict(assign(cfg.to_dict(), values))
    header = (f"# Best trial {best['trial']} of the train sweep {path.parent} (val_nll {best[VAL_NLL]:.4f} at "
              f"step {best['step']}; all trials: {table}).\n# Launch: rayblora train --config {path}\n")
    write_text_atomic(path, header + dump_config(chosen))
    load_config(path)  # what was written loads back
    return path


def _check_task(cfg: Config) -> None:
    """Load the data and the base model on the driver, so a bad file or model fails before any cluster work."""
    from rayblora.data.sources import load_task_data
    from rayblora.scoring import build_scorer

    data = load_task_data(cfg.data)
    build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length)


def _train_tuner(cfg: Config, dims: Sequence[Dimension], base: dict[str, Any], out: Path, num_samples: int,
                 max_concurrent: int, grace_period: int, reduction_factor: float, log: Callable[[str], None]):
    """A new or restored Tuner of the train sweep: member trials with CPU-light drivers, ASHA on val_nll."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    max_t = _steps_candidates(base, dims)[1]
    grace = min(grace_period or base["train"]["checkpoint_every"], max_t)
    slots = _trial_slots(cfg, log)  # also refuses a member run the cluster cannot hold, whatever max_concurrent
    slots = max_concurrent or slots
    trainable = tune.with_resources(tune.with_parameters(member_trial, base=base, sweep_dir=str(out)),
                                    {"CPU": TRIAL_DRIVER_CPUS})

    def fresh():
        asha = ASHAScheduler(time_attr="step", metric=VAL_NLL, mode="min", max_t=max_t, grace_period=grace,
                             reduction_factor=reduction_factor)
        return tune.Tuner(trainable, param_space=param_space(dims),
                          run_config=tune_run_config(out, TRAIN_EXPERIMENT),
                          tune_config=tune.TuneConfig(num_samples=num_samples, scheduler=asha,
                                                      max_concurrent_trials=slots))

    identity = {"sweep": "train", "config": base, "space": space_digest(dims), "num_samples": num_samples,
                "asha": {"max_t": max_t, "grace_period": grace, "reduction_factor": reduction_factor}}
    log(f"[sweep] train sweep of {len(dims)} field(s) into {out}: ASHA on {VAL_NLL} (rungs from step {grace}, "
        f"reduction {reduction_factor}), up to {slots} trial(s) at once")
    return open_tuner(out, TRAIN_EXPERIMENT, identity, trainable, fresh, log)


def sweep_train(cfg: Config, space: str | os.PathLike | Sequence[Dimension],
                out_dir: str | os.PathLike | None = None, *, num_samples: int = 1, max_concurrent: int = 0,
                grace_period: int = 0, reduction_factor: float = 2.0,
                log: Callable[[str], None] = print) -> SweepOutcome:
    """Sweep member hyper-parameters: one Ray Train run per trial, ASHA on val_nll, best config as YAML.

    Args:
        cfg: the base config (every trial starts from it; the space overrides its fields).
        space: a search-space YAML path or parsed dimensions (:mod:`rayblora.search_space`).
        out_dir: sweep directory (default `<output.dir>/sweep-train`); rerunning with it resumes the sweep.
        num_samples: Tune samples of the space (grid dimensions multiply them).
        max_concurrent: trials at once (0 = as many member runs as the cluster's CPUs / GPUs hold).
        grace_period: steps before ASHA may stop a trial (0 = the report cadence).
        reduction_factor: ASHA keeps the best 1 / reduction_factor of the trials at each rung.
    Writes `<out>/trials.csv`, `<out>/trials.md` and `<out>/best.yaml`. Raises SweepInterrupted (after writing
    the partial table) when the Tune run was stopped before every trial finished.
    """
    from rayblora.coordinator import ensure_ray

    dims = load_space(space) if isinstance(space, (str, os.PathLike)) else list(space)
    if num_samples < 1 or reduction_factor <= 1 or grace_period < 0 or max_concurrent < 0:
        raise ConfigError("sweep train: needs --num-samples >= 1, --reduction-factor > 1, --grace-period >= 0, "
                          "--max-concurrent >= 0")
    out = Path(out_dir or cfg.out_dir / "sweep-train").resolve()
    base = with_report_cadence(cfg, dims)
    check_space(base, dims)
    _check_task(cfg)
    ensure_ray(cfg.cluster)
    grid = _train_tuner(cfg, dims, base, out, num_samples, max_concurrent, grace_period, reduction_factor,
                        log).fit()
    states = trial_states(out / "tune" / TRAIN_EXPERIMENT)
    rows = train_rows(grid, states, dims, base)
    columns = ["trial", "status", *[d.field for d in dims if d.searched], "step", VAL_NLL, "val_accuracy",
               "seconds", "checkpoint"]
    table_csv, table_md = write_table(rows, columns, out / "trials", csv_only=("checkpoint",))
    raise_if_unfinished(states, out, table_md)
    if not rows or rows[0]["status"] != "completed":
        raise RuntimeError(f"no trial of the sweep completed; see {table_md} and the Tune experiment in "
                           f"{out / 'tune'}")
    best = write_best_config(cfg, dims, rows[0], out / "best.yaml", table_md)
    log(f"[sweep] {sum(r['status'] == 'completed' for r in rows)} completed, "
        f"{sum(r['status'] == 'stopped (ASHA)' for r in rows)} stopped by ASHA; best {rows[0]['trial']} "
        f"({VAL_NLL} {rows[0][VAL_NLL]:.4f}) -> {best}")
    return SweepOutcome(out, table_csv, table_md, rows, rows[0], best)


# --- the prior sweep ------------------------------------------------------------------------------------------
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
    from ray import tune

    from rayblora.prior_cache import PriorCache

    tune.report(PriorCache.from_arrays(arrays, meta).evaluate(float(config["prior_precision"])))


def _laplace_parent(artifact: str | os.PathLike, cfg: Config):
    """The Laplace posterior of `artifact`, its manifest and the config's validation split (checked to match)."""
    from rayblora.artifact import load_posterior, read_manifest
    from rayblora.data.sources import load_task_data
    from rayblora.posteriors.laplace import LaplacePosterior

    post = load_posterior(artifact)
    if not isinstance(post, LaplacePosterior):
        raise ConfigError(f"--posterior {artifact}: a {post.method!r} artifact has no Laplace curvature; fit one "
                          f"first (rayblora fit --posterior {artifact} --config ...)")
    data = load_task_data(cfg.data)
    if tuple(data.spec.choices) != tuple(post.scorer.spec.choices):
        raise ConfigError(f"data: the task's answers {list(data.spec.choices)} differ from the artifact's "
                          f"{list(post.scorer.spec.choices)}; pass the config the posterior was fitted with")
    return post, read_manifest(artifact), data.validation


def _prior_tuner(arrays, meta, identity: dict[str, Any], out: Path, search: str, max_concurrent: int,
                 log: Callable[[str], None]):
    """A new or restored Tuner of the prior sweep: one CPU per trial, actors reused across trials."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

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


def save_with_prior(post, manifest: dict[str, Any], artifact, best: dict[str, Any], select: str,
                    out: Path, table: Path) -> Path:
    """The parent posterior with the chosen prior precision, as a new artifact at `<out>/posterior` (atomic),
    its lineage naming the parent and the sweep."""
    from rayblora.artifact import MANIFEST, save_posterior, sha256_file

    parent_cfg = config_from_dict({"model": manifest["base_model"]["config"], "adapter": manifest["adapter"]})
    lineage = {"parent": str(Path(artifact).resolve()), "parent_method": manifest["method"],
               "parent_manifest_sha256": sha256_file(Path(artifact) / MANIFEST),
               "prior_sweep": {"select": select, "prior_precision": best["prior_precision"],
                               **{k: best[k] for k in PRIOR_COLUMNS[3:]}, "table": str(table),
                               "experiment": str(out / "tune" / PRIOR_EXPERIMENT)}}
    return save_posterior(post.with_prior_precision(best["prior_precision"]), out / "posterior",
                          model_config=parent_cfg.model, adapter_config=parent_cfg.adapter,
                          training=manifest.get("training", {}), lineage=lineage)


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
    from rayblora.coordinator import ensure_ray
    from rayblora.prior_cache import PriorCache

    if search not in ("grid", "random") or select not in SELECT or max_concurrent < 0:
        raise ConfigError(f"sweep prior: --search must be grid|random, --select one of {list(SELECT)}, "
                          f"--max-concurrent >= 0; got {search!r}, {select!r}, {max_concurrent}")
    prior_grid(values, low, high)
    out = Path(out_dir or cfg.out_dir / "sweep-prior").resolve()
    post, manifest, validation = _laplace_parent(artifact, cfg)
    ensure_ray(cfg.cluster)
    t0 = time.time()
    cache = PriorCache.from_posterior(post, validation, cfg.train.batch_size)
    arrays, meta = cache.to_arrays()
    t1 = time.time()
    log(f"[sweep] cached f_mu and Jacobians of {cache.num_examples} validation examples for {len(cache.fits)} "
        f"fitted member(s) in {t1 - t0:.1f} s ({sum(a.nbytes for a in arrays.values()) / 2**20:.0f} MiB, "
        "one object-store copy)")
    identity = {"sweep": "prior", "artifact": manifest["files"], "data": cfg.to_dict()["data"],
                "batch_size": cfg.train.batch_size, "values": values, "range": [low, high], "search": search}
    grid = _prior_tuner(arrays, meta, identity, out, search, max_concurrent, log).fit()
    t2 = time.time()
    states = trial_states(out / "tune" / PRIOR_EXPERIMENT)
    rows = prior_rows(grid, states)
    table_csv, table_md = write_table(rows, PRIOR_COLUMNS, out / "prior_sweep")
    raise_if_unfinished(states, out, table_md)
    best = _choose(rows, select)
    path = save_with_prior(post, manifest, artifact, best, select, out, table_csv)
    seconds = {"cache": t1 - t0, "tune": t2 - t1, "total": time.time() - t0}
    log(f"[sweep] {len(rows)} prior precisions in {seconds['tune']:.1f} s of Tune; by {select}: "
        f"{best['prior_precision']:.4g} (val_nll {best['val_nll']:.4f}, log_marglik {best['log_marglik']:.2f}) "
        f"-> {path}")
    return SweepOutcome(out, table_csv, table_md, rows, best, path, seconds)



# --- command line ---------------------------------------------------------------------------------------------
def _cmd_sweep_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        sweep_train(cfg, args.space, args.out, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                    grace_period=args.grace_period, reduction_factor=args.reduction_factor)
    except SweepInterrupted as exc:
        print(f"rayblora: {exc}")
        return 1
    return 0


def _cmd_sweep_prior(args) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        sweep_prior(args.posterior, cfg, args.out, values=args.values, low=args.min, high=args.max,
                    search=args.search, select=args.select, max_concurrent=args.max_concurrent)
    except SweepInterrupted as exc:
        print(f"rayblora: {exc}")
        return 1
    return 0


def add_cli(subparsers) -> None:
    """Add `rayblora sweep train ...` and `rayblora sweep prior ...`."""
    sweep = subparsers.add_parser("sweep", help="Ray Tune sweeps: member training (ASHA) or the Laplace prior")
    verbs = sweep.add_subparsers(dest="sweep", required=True)
    p = verbs.add_parser("train", help="sweep rank / alpha / lr / weight decay / steps, one Ray Train run per "
                                       "trial, ASHA on val_nll; writes trials.csv/.md and best.yaml")
    p.add_argument("--config", default=None, help="base YAML config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. train.steps=50")
    p.add_argument("--space", required=True, help="search-space YAML (see jobs/configs/sweep_space.yaml)")
    p.add_argument("--num-samples", type=int, default=8, help="Tune samples of the space (default 8)")
    p.add_argument("--out", default=None, help="sweep directory (default <output.dir>/sweep-train); "
                                               "rerun with the same one to resume")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0 = what the cluster holds)")
    p.add_argument("--grace-period", type=int, default=0, help="steps before ASHA may stop a trial "
                                                               "(0 = train.checkpoint_every)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor (default 2)")
    p.set_defaults(func=_cmd_sweep_train)
    p = verbs.add_parser("prior", help="sweep the prior precision of a Laplace artifact post-hoc; writes "
                                       "prior_sweep.csv/.md and the new artifact <out>/posterior")
    p.add_argument("--config", default=None, help="the config the posterior was fitted with")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    p.add_argument("--posterior", required=True, help="a laplace / laplace_ensemble artifact directory")
    p.add_argument("--values", type=int, default=32, help="prior precisions to try (default 32)")
    p.add_argument("--min", type=float, default=1e-4, help="smallest prior precision (default 1e-4)")
    p.add_argument("--max", type=float, default=1e4, help="largest prior precision (default 1e4)")
    p.add_argument("--search", choices=["grid", "random"], default="grid",
                   help="log grid, or Tune's random search over log-uniform values (default grid)")
    p.add_argument("--select", choices=list(SELECT), default="val_nll",
                   help="choose by validation NLL or by marginal likelihood (default val_nll)")
    p.add_argument("--out", default=None, help="sweep directory (default <output.dir>/sweep-prior)")
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0 = one per CPU)")
    p.set_defaults(func=_cmd_sweep_prior)
