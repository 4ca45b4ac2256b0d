"""The train sweep (Ray Tune + Ray Train v2): member hyper-parameters with retraining and ASHA.

Each trial trains one member with a sampled config (LoRA rank / alpha, learning rate, weight decay = the MAP's
Gaussian prior precision, steps, ...). The trial is a Tune *function trainable* that runs the member's
TorchTrainer (:func:`rayblora.workflows.coordinator.member_trainer`) as its own Ray Train run; a Ray Train
callback relays every `ray.train.report` of the member's rank-0 worker (val_nll at each
`train.checkpoint_every` step) to the trial, so ASHA (Li et al., "A System for Massively Parallel
Hyperparameter Tuning", 2020) stops bad trials early. Stopping a trial ends its trainable actor and, with it,
the Train controller and workers it owns. The best completed trial's config is written as a YAML for
`rayblora train`. Resumable: the Tune experiment lives under `<out>/tune/`, and rerunning with the same `--out`
continues it with `Tuner.restore` (a trial's Train run resumes from its last checkpoint, because its run name
is derived from the trial id).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from safetensors.torch import load_file

from rayblora.config import Config, ConfigError, config_from_dict, dump_config, load_config
from rayblora.data.sources import load_task_data
from rayblora.manifest import write_text_atomic
from rayblora.scoring import build_scorer
from rayblora.train.checkpoint import ADAPTER, STATE_JSON, read_step_state
from rayblora.workflows.coordinator import member_resources, member_trainer, runs_that_fit
from rayblora.workflows.runtime import ensure_ray
from rayblora.workflows.padded_members import Candidate
from rayblora.workflows.sweeps.ensemble import select_ensemble
from rayblora.workflows.sweeps.results import (SweepOutcome, open_tuner, raise_if_unfinished, resumes_sweep,
                                               trial_states, tune_run_config, write_table)
from rayblora.workflows.sweeps.space import (Dimension, assign, check_space, flatten, load_space, param_space,
                                             space_digest)

VAL_NLL = "val_nll"
TRAIN_EXPERIMENT = "train_sweep"
TRIAL_DRIVER = {"memory": 256.0 * 2**20}
"""What a train-sweep trial reserves for itself: memory for its process, no CPU — it only drives its member's Train
run, which holds the CPUs (a CPU share, however small, would keep the last member run of an exactly divided
cluster from starting: two 1-CPU runs and their drivers do not fit 2 CPUs). Tune needs a non-zero bundle."""


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
    """A trial's Config: the base with the sampled dotted fields, its output under the trial's own directory."""
    values = assign(base, sampled)
    values["output"] = {**values.get("output", {}), "dir": str(trial_dir), "name": "trial"}
    return config_from_dict(values)


def _val_nll_relay():
    """A Ray Train callback relaying each report of the member run to its Tune trial (rank 0's metrics).

    A report whose val_nll was dropped as non-finite (a diverged trial) is relayed with val_nll = inf, so Tune
    always sees the metric and ASHA stops the trial."""
    class ValNllRelay(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            filled = [{**m, VAL_NLL: m.get(VAL_NLL, math.inf)} for m in metrics]
            super().after_report(run_context, filled, checkpoint)

    return ValNllRelay()


def member_trial(sampled: dict[str, Any], base: dict[str, Any], sweep_dir: str) -> None:
    """Tune function trainable: member 0 of the sampled config, trained as one Ray Train run.

    The run is named after the trial id and stored under the trial's directory, so a restored trial's run
    resumes from its last checkpoint."""
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, flatten(sampled), Path(sweep_dir) / "trials" / trial_id)
    member_trainer(cfg, 0, trial_id, callbacks=[_val_nll_relay()]).fit()


def _trial_slots(cfg: Config, log: Callable[[str], None] = print) -> int:
    """Member runs the cluster can hold at once (its CPUs, and GPUs when used, over one member's share).

    Raises ConfigError when even the whole cluster cannot hold one member run (the trials would wait forever);
    warns when it could but the resources are held by something else right now."""
    need = member_resources(cfg.cluster, driver=TRIAL_DRIVER)
    total, free = ray.cluster_resources(), ray.available_resources()
    if runs_that_fit(need, total) < 1:
        raise ConfigError(f"cluster: one trial's member run needs {need} but the whole cluster has "
                          f"{ {k: total.get(k, 0) for k in need} }; lower cluster.workers_per_member / "
                          "cpus_per_worker or add nodes")
    if runs_that_fit(need, free) < 1:
        log(f"[sweep] warning: only { {k: free.get(k, 0) for k in need} } free of {need} per trial; trials wait "
            "until other work on the cluster releases resources")
    return runs_that_fit(need, total)


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


def trial_values(dims: Sequence[Dimension], row: dict[str, Any]) -> dict[str, Any]:
    """The dotted fields a trial ran with: its sampled values, and the space's fixed ones."""
    return {d.field: row[d.field] if d.searched else d.values[0] for d in dims}


def write_best_config(cfg: Config, dims: Sequence[Dimension], best: dict[str, Any], path: Path,
                      table: Path) -> Path:
    """The user's config with the best trial's values, as a YAML for `rayblora train` (atomic write)."""
    chosen = config_from_dict(assign(cfg.to_dict(), trial_values(dims, best)))
    header = (f"# Best trial {best['trial']} of the train sweep {path.parent} (val_nll {best[VAL_NLL]:.4f} at "
              f"step {best['step']}; all trials: {table}).\n# Launch: rayblora train --config {path}\n")
    write_text_atomic(path, header + dump_config(chosen))
    load_config(path)  # what was written loads back
    return path


def final_adapter(trial_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    """The adapter of a completed trial's checkpoint at its last step (its member run's storage, any layout)."""
    for state in trial_dir.rglob(STATE_JSON):
        if read_step_state(state.parent)["step"] == steps and (state.parent / ADAPTER).is_file():
            return load_file(str(state.parent / ADAPTER))
    raise FileNotFoundError(f"{trial_dir}: no checkpoint at step {steps} holding {ADAPTER}")


def trial_candidates(rows: Sequence[dict[str, Any]], dims: Sequence[Dimension], base: dict[str, Any],
                     out: Path) -> list[Candidate]:
    """The completed trials as hyper-parameter ensemble candidates: config, final adapter, sampled values."""
    found = []
    for row in (r for r in rows if r["status"] == "completed"):
        sampled = trial_values(dims, row)
        cfg = trial_config(base, sampled, out / "trials" / row["trial"])
        found.append(Candidate(row["trial"], cfg, final_adapter(cfg.out_dir, cfg.train.steps),
                               {**sampled, "trial_val_nll": row[VAL_NLL]}))
    return found


def _check_task(cfg: Config) -> None:
    """Load the data and the base model on the driver, so a bad file or model fails before any cluster work."""
    data = load_task_data(cfg.data)
    build_scorer(cfg.model, cfg.adapter, data.spec, cfg.data.max_length)


def _train_identity(dims: Sequence[Dimension], base: dict[str, Any], num_samples: int, grace_period: int,
                    reduction_factor: float) -> dict[str, Any]:
    """What makes a train sweep the same sweep (config, space, samples, ASHA rungs): a rerun with it resumes."""
    max_t = _steps_candidates(base, dims)[1]
    grace = min(grace_period or base["train"]["checkpoint_every"], max_t)
    return {"sweep": "train", "config": base, "space": space_digest(dims), "num_samples": num_samples,
            "asha": {"max_t": max_t, "grace_period": grace, "reduction_factor": reduction_factor}}


def _train_tuner(cfg: Config, dims: Sequence[Dimension], base: dict[str, Any], out: Path, identity: dict[str, Any],
                 max_concurrent: int, log: Callable[[str], None]):
    """A new or restored Tuner of the train sweep: member trials whose drivers hold no CPU, ASHA on val_nll."""
    num_samples, asha_rungs = identity["num_samples"], identity["asha"]
    max_t, grace, reduction_factor = asha_rungs["max_t"], asha_rungs["grace_period"], asha_rungs["reduction_factor"]
    slots = _trial_slots(cfg, log)  # also refuses a member run the cluster cannot hold, whatever max_concurrent
    slots = max_concurrent or slots
    trainable = tune.with_resources(tune.with_parameters(member_trial, base=base, sweep_dir=str(out)),
                                    TRIAL_DRIVER)

    def fresh():
        asha = ASHAScheduler(time_attr="step", metric=VAL_NLL, mode="min", max_t=max_t, grace_period=grace,
                             reduction_factor=reduction_factor)
        return tune.Tuner(trainable, param_space=param_space(dims),
                          run_config=tune_run_config(out, TRAIN_EXPERIMENT),
                          tune_config=tune.TuneConfig(num_samples=num_samples, scheduler=asha,
                                                      max_concurrent_trials=slots))

    log(f"[sweep] train sweep of {len(dims)} field(s) into {out}: ASHA on {VAL_NLL} (rungs from step {grace}, "
        f"reduction {reduction_factor}), up to {slots} trial(s) at once")
    return open_tuner(out, TRAIN_EXPERIMENT, identity, trainable, fresh, log)


def sweep_train(cfg: Config, space: str | os.PathLike | Sequence[Dimension],
                out_dir: str | os.PathLike | None = None, *, num_samples: int = 1, max_concurrent: int = 0,
                grace_period: int = 0, reduction_factor: float = 2.0, ensemble_size: int = 0,
                log: Callable[[str], None] = print) -> SweepOutcome:
    """Sweep member hyper-parameters: one Ray Train run per trial, ASHA on val_nll, best config as YAML.

    Args:
        cfg: the base config (every trial starts from it; the space overrides its fields).
        space: a search-space YAML path or parsed dimensions (:mod:`rayblora.workflows.sweeps.space`).
        out_dir: sweep directory (default `<output.dir>/sweep-train`); rerunning with it resumes the sweep.
        num_samples: Tune samples of the space (grid dimensions multiply them).
        max_concurrent: trials at once (0 = as many member runs as the cluster's CPUs / GPUs hold).
        grace_period: steps before ASHA may stop a trial (0 = the report cadence).
        reduction_factor: ASHA keeps the best 1 / reduction_factor of the trials at each rung.
        ensemble_size: > 0 also chooses that many completed trials greedily by the validation NLL of their
            average and writes them as the artifact `<out>/ensemble/posterior` (`ensemble`, `map` for one): a
            hyper-parameter ensemble (:mod:`rayblora.workflows.sweeps.ensemble`).
    Writes `<out>/trials.csv`, `<out>/trials.md` and `<out>/best.yaml`. Raises SweepInterrupted (after writing
    the partial table) when the Tune run was stopped before every trial finished.
    """
    dims = load_space(space) if isinstance(space, (str, os.PathLike)) else list(space)
    if num_samples < 1 or reduction_factor <= 1 or grace_period < 0 or max_concurrent < 0 or ensemble_size < 0:
        raise ConfigError("sweep train: needs --num-samples >= 1, --reduction-factor > 1, --grace-period >= 0, "
                          "--max-concurrent >= 0, --ensemble >= 0")
    out = Path(out_dir or cfg.out_dir / "sweep-train").resolve()
    base = with_report_cadence(cfg, dims)
    check_space(base, dims)
    _check_task(cfg)
    identity = _train_identity(dims, base, num_samples, grace_period, reduction_factor)
    resumes_sweep(out, TRAIN_EXPERIMENT, identity)  # another sweep in `out` is refused before any Ray work
    ensure_ray(cfg.cluster)
    grid = _train_tuner(cfg, dims, base, out, identity, max_concurrent, log).fit()
    outcome = _train_outcome(cfg, grid, dims, base, out, log)
    if ensemble_size:
        outcome.ensemble = select_ensemble(trial_candidates(outcome.rows, dims, base, out), ensemble_size,
                                           out / "ensemble", log)
        log(f"[sweep] hyper-parameter ensemble of {ensemble_size} trial(s) -> {outcome.ensemble}")
    return outcome


def _train_outcome(cfg: Config, grid, dims: Sequence[Dimension], base: dict[str, Any], out: Path,
                   log: Callable[[str], None]) -> SweepOutcome:
    """Write the trial table and the best config of a finished train sweep (SweepInterrupted if unfinished)."""
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
